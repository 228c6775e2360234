/**
 * The calls the raw path leaves to Connect (gRPC-Web, compressed requests, Connect GET, health)
 * get the edge decision on their headers too, before their body is read (http/admit-first.ts):
 * a client over its rate budget is answered RESOURCE_EXHAUSTED at once, in its own protocol,
 * while its body is still open, where connect-node would first have waited for, read and decoded
 * the body. An admitted call is counted once, not again by the edge interceptor.
 */
import http2 from "node:http2";
import { gzipSync } from "node:zlib";
import { create, toBinary, toJsonString } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { errorInfoOf } from "@outpost/platform";
import { GetDispatchRequestSchema } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { CountingUpstream } from "../../test/support/counting-upstream.ts";
import { startRateLimitedGateway, type RateLimitedGateway } from "./rate-limited-gateway.ts";
import { envelope } from "../../test/support/envelopes.ts";
import { answerError, h2Call, type H2Answer } from "../../test/support/h2.ts";

const ADMIN = "c".repeat(40);
const GET = "/outpost.dispatch.v1.DispatchService/GetDispatch";
const SUBSCRIBE = "/outpost.telemetry.v1.LogService/SubscribeLogs";
const HEALTH = "/grpc.health.v1.Health/Check";
const READS_PER_IP = 2;
const JUNK = Buffer.alloc(200 * 1024, "{");

describe("Connect path: the rate limit comes before the body", () => {
  let edge: RateLimitedGateway;
  let upstream: CountingUpstream;
  let sessionFrom: RateLimitedGateway["sessionFrom"];

  beforeAll(async () => {
    edge = await startRateLimitedGateway({ adminToken: ADMIN, readsPerIp: READS_PER_IP });
    ({ upstream, sessionFrom } = edge);
  });

  afterAll(() => edge?.close());

  const request = create(GetDispatchRequestSchema, { dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" });
  const message = toBinary(GetDispatchRequestSchema, request);

  /** The answer's error as its protocol reads it (gRPC-Web text: the body is base64 first). */
  const errorOf = (answer: H2Answer, type: string) =>
    answerError(type === "application/grpc-web-text" ? { ...answer, body: Buffer.from(answer.body.toString("latin1"), "base64") } : answer, type);

  it("answers a client over its IP budget at once, with its body still open, in each protocol Connect serves", { timeout: 30_000 }, async () => {
    const session = sessionFrom("127.0.0.6");
    try {
      // Keyless calls use up the address's read budget (each refused UNAUTHENTICATED).
      for (let i = 0; i < READS_PER_IP; i++) {
        const answer = await h2Call(session, { ":path": GET, "content-type": "application/grpc-web+proto" }, envelope(0, message)).answer;
        expect(answer).not.toBe("no answer");
        if (answer === "no answer") return;
        expect(errorOf(answer, "application/grpc-web+proto")?.code).toBe(Code.Unauthenticated);
      }
      const calls: Array<{ what: string; type: string; headers: http2.OutgoingHttpHeaders; body: Buffer }> = [
        { what: "gRPC-Web", type: "application/grpc-web+proto", headers: { ":path": GET }, body: envelope(0, JUNK) },
        { what: "gRPC-Web text", type: "application/grpc-web-text", headers: { ":path": GET }, body: Buffer.from(envelope(0, JUNK).toString("base64")) },
        { what: "gRPC-Web health", type: "application/grpc-web+proto", headers: { ":path": HEALTH }, body: envelope(0, JUNK) },
        { what: "gRPC, compressed", type: "application/grpc", headers: { ":path": GET, te: "trailers", "grpc-encoding": "gzip" }, body: envelope(1, gzipSync(JUNK)) },
        { what: "Connect unary, compressed", type: "application/json", headers: { ":path": GET, "content-encoding": "gzip" }, body: gzipSync(JUNK) },
        { what: "Connect stream, compressed", type: "application/connect+json", headers: { ":path": SUBSCRIBE, "connect-content-encoding": "gzip" }, body: envelope(1, gzipSync(JUNK)) },
      ];
      for (const { what, type, headers, body } of calls) {
        // The body is never ended: only an answer given before it is read comes back in time.
        const answer = await h2Call(session, { ...headers, "content-type": type }, body, { end: false, timeoutMs: 5000 }).answer;
        expect(answer, what).not.toBe("no answer");
        if (answer === "no answer") return;
        const error = errorOf(answer, type);
        expect(error?.code, what).toBe(Code.ResourceExhausted);
        expect(errorInfoOf(error!)?.reason, what).toBe("RATE_LIMITED");
        // Headers for Connect unary and gRPC-Web, trailers or headers for gRPC, the end-of-stream metadata for a Connect stream.
        const remaining = type === "application/connect+json" ? error!.metadata.get("ratelimit-remaining") : (answer.head["ratelimit-remaining"] ?? answer.trailers["ratelimit-remaining"]);
        expect(remaining, what).toBe("0");
      }
      // Connect GET (headers only, as Connect clients send it): refused the same way.
      const query = `encoding=json&message=${encodeURIComponent(toJsonString(GetDispatchRequestSchema, request))}`;
      const get = await new Promise<H2Answer>((resolve) => {
        const stream = session.request({ ":method": "GET", ":path": `${GET}?${query}` }, { endStream: true });
        const chunks: Buffer[] = [];
        let head: http2.IncomingHttpHeaders = {};
        stream.on("response", (h) => (head = h));
        stream.on("data", (c: Buffer) => chunks.push(c));
        stream.on("close", () => resolve({ head, trailers: {}, body: Buffer.concat(chunks), ms: 0 }));
      });
      expect(Number(get.head[":status"])).toBe(429);
      expect(errorInfoOf(errorOf(get, "application/json")!)?.reason).toBe("RATE_LIMITED");
      expect(upstream.calls()).toBe(0);
    } finally {
      session.destroy();
    }
  });

  it("counts an admitted call once, and still reads and checks its body", { timeout: 10_000 }, async () => {
    const session = sessionFrom("127.0.0.7");
    try {
      const auth = { authorization: `Bearer ${ADMIN}` };
      const before = upstream.calls();
      const good = await h2Call(session, { ":path": GET, "content-type": "application/grpc-web+proto", ...auth }, envelope(0, message)).answer;
      expect(good).not.toBe("no answer");
      if (good === "no answer") return;
      expect(errorOf(good, "application/grpc-web+proto")).toBeUndefined();
      // Decided (and counted) before the body, not again by the interceptor: one of two used.
      expect(good.head["ratelimit-remaining"]).toBe(String(READS_PER_IP - 1));
      expect(upstream.calls()).toBe(before + 1);
      // Compressed Connect JSON that does not decode: admitted on its headers, refused on its body.
      const bad = await h2Call(session, { ":path": GET, "content-type": "application/json", "content-encoding": "gzip", ...auth }, gzipSync('{"dispatchId":')).answer;
      expect(bad).not.toBe("no answer");
      if (bad === "no answer") return;
      expect(errorOf(bad, "application/json")?.code).toBe(Code.InvalidArgument);
      expect(bad.head["ratelimit-remaining"]).toBe("0");
      expect(upstream.calls()).toBe(before + 1);
    } finally {
      session.destroy();
    }
  });
});
