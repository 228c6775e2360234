/**
 * The raw path makes the edge decision (credential, rate budgets: `admitCall`) before it reads a
 * request's body (raw-unary.ts). A client over its IP's rate budget gets RESOURCE_EXHAUSTED
 * RATE_LIMITED with the RateLimit-* headers, however large or malformed its body, and without
 * the gateway waiting for (or reading) that body: before, each body was read and decoded first,
 * so refused clients with large malformed bodies got INVALID_ARGUMENT (HTTP 400) and never 429,
 * and a body that never ended held the call until the body time limit.
 */
import http from "node:http";
import net from "node:net";
import { create, toBinary } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { errorInfoOf } from "@outpost/platform";
import { GetDispatchRequestSchema } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { CountingUpstream } from "../../test/support/counting-upstream.ts";
import { startRateLimitedGateway, type RateLimitedGateway } from "./rate-limited-gateway.ts";
import { envelope } from "../../test/support/envelopes.ts";
import { answerError, h2Call } from "../../test/support/h2.ts";

const ADMIN = "b".repeat(40);
const GET = "/outpost.dispatch.v1.DispatchService/GetDispatch";
const SUBSCRIBE = "/outpost.telemetry.v1.LogService/SubscribeLogs";
/** Reads per minute per client IP. */
const READS_PER_IP = 2;
/** A large body that is not JSON (and not a protobuf message either). */
const JUNK = Buffer.alloc(500 * 1024, "{");

describe("raw path: the rate limit comes before the body", () => {
  let edge: RateLimitedGateway;
  let upstream: CountingUpstream;
  let gateway: { port: number };
  let url: string;
  let sessionFrom: RateLimitedGateway["sessionFrom"];

  beforeAll(async () => {
    edge = await startRateLimitedGateway({ adminToken: ADMIN, readsPerIp: READS_PER_IP });
    ({ upstream, url, sessionFrom } = edge);
    gateway = edge;
  });

  afterAll(() => edge?.close());

  const message = toBinary(GetDispatchRequestSchema, create(GetDispatchRequestSchema, { dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }));

  /** Raw HTTP/1.1 from 127.0.0.1: sends `head` and `body` and resolves what came back once the gateway closed the connection. */
  function h1(head: string, body: Buffer): Promise<string> {
    return new Promise((resolve) => {
      const socket = net.connect({ host: "127.0.0.1", port: gateway.port, localAddress: "127.0.0.1" });
      let text = "";
      socket.on("data", (c) => (text += c.toString("latin1")));
      socket.on("close", () => resolve(text));
      socket.on("error", () => {});
      socket.write(head);
      socket.write(body);
      setTimeout(() => socket.destroy(), 5000).unref();
    });
  }

  it("over HTTP/1.1, a call refused before its small body was read keeps the connection open (no reset, no connection: close)", async () => {
    // Keyless calls from an address of their own: refused UNAUTHENTICATED, then RATE_LIMITED.
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    const call = () =>
      new Promise<{ status: number; connection: string | undefined; reused: boolean }>((resolve, reject) => {
        const req = http.request(`${url}${GET}`, { method: "POST", agent, localAddress: "127.0.0.5", headers: { "content-type": "application/json" } }, (res) => {
          res.resume();
          res.on("end", () => resolve({ status: res.statusCode!, connection: res.headers.connection, reused: req.reusedSocket }));
        });
        req.on("error", reject);
        req.end('{"dispatchId":"01ARZ3NDEKTSV4RRFFQ69G5FAV"}');
      });
    try {
      const answers = [await call(), await call(), await call()];
      expect(answers.map((a) => a.status)).toEqual([401, 401, 429]);
      expect(answers.map((a) => a.connection)).toEqual(["keep-alive", "keep-alive", "keep-alive"]);
      expect(answers.map((a) => a.reused)).toEqual([false, true, true]);
    } finally {
      agent.destroy();
    }
  });

  it("refuses a keyless client over its IP budget with 429 without reading its large malformed body, on every raw protocol", { timeout: 30_000 }, async () => {
    const session = sessionFrom("127.0.0.1");
    try {
      // Keyless well-formed calls use up the IP's read budget (each is refused UNAUTHENTICATED).
      for (let i = 0; i < READS_PER_IP; i++) {
        const answer = await h2Call(session, { ":path": GET, "content-type": "application/grpc", te: "trailers" }, envelope(0, message)).answer;
        expect(answer).not.toBe("no answer");
        if (answer === "no answer") return;
        expect(answerError(answer, "application/grpc")?.code).toBe(Code.Unauthenticated);
      }

      // Connect JSON over HTTP/1.1, the whole 500 KB malformed body sent: 429 RATE_LIMITED, not 400.
      const h1Answer = await h1(
        `POST ${GET} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${JUNK.length}\r\n\r\n`,
        JUNK,
      );
      expect(h1Answer).toMatch(/^HTTP\/1\.1 429 /);
      const h1Head = h1Answer.slice(0, h1Answer.indexOf("\r\n\r\n")).toLowerCase();
      expect(h1Head).toContain(`ratelimit-limit: ${READS_PER_IP}`);
      expect(h1Head).toContain("ratelimit-remaining: 0");
      expect(h1Head).toMatch(/retry-after: \d+/);
      expect(h1Head).toContain("connection: close");
      const h1Error = JSON.parse(h1Answer.slice(h1Answer.indexOf("\r\n\r\n") + 4)) as { code: string; details?: { type: string }[] };
      expect(h1Error.code).toBe("resource_exhausted");

      // HTTP/2: bodies that never end (one announced but not sent at all, one of 500 KB of junk
      // left open) are answered at once. Had the gateway waited for them, there would be no
      // answer until the body time limit (60 s).
      const calls = [
        { path: GET, type: "application/json", headers: { "content-length": String(JUNK.length) }, body: Buffer.alloc(0) },
        { path: GET, type: "application/json", headers: {}, body: JUNK },
        { path: GET, type: "application/grpc", headers: { te: "trailers" }, body: envelope(0, JUNK) },
        { path: SUBSCRIBE, type: "application/grpc", headers: { te: "trailers" }, body: envelope(0, JUNK) },
        { path: SUBSCRIBE, type: "application/connect+json", headers: {}, body: envelope(0, JUNK) },
      ];
      for (const { path, type, headers, body } of calls) {
        const answer = await h2Call(session, { ":path": path, "content-type": type, ...headers }, body, { end: false, timeoutMs: 5000 }).answer;
        const what = `${type} ${path}`;
        expect(answer, what).not.toBe("no answer");
        if (answer === "no answer") return;
        const error = answerError(answer, type);
        expect(error?.code, what).toBe(Code.ResourceExhausted);
        expect(errorInfoOf(error!)?.reason, what).toBe("RATE_LIMITED");
        // Headers for Connect unary, trailers for gRPC, the end-of-stream metadata for a Connect
        // stream; each said once.
        const remaining = type === "application/grpc" ? answer.trailers["ratelimit-remaining"] : type === "application/json" ? answer.head["ratelimit-remaining"] : error!.metadata.get("ratelimit-remaining");
        expect(remaining, what).toBe("0");
      }
      expect(upstream.calls()).toBe(0);
    } finally {
      session.destroy();
    }
  });

  it("still checks the body of an admitted call, and its answer carries the budget", { timeout: 10_000 }, async () => {
    const session = sessionFrom("127.0.0.2");
    try {
      const auth = { authorization: `Bearer ${ADMIN}` };
      const bad = await h2Call(session, { ":path": GET, "content-type": "application/json", ...auth }, Buffer.from('{"dispatchId":')).answer;
      expect(bad).not.toBe("no answer");
      if (bad === "no answer") return;
      expect(answerError(bad, "application/json")?.code).toBe(Code.InvalidArgument);
      expect(bad.head["ratelimit-remaining"]).toBe(String(READS_PER_IP - 1));
      const good = await h2Call(session, { ":path": GET, "content-type": "application/grpc", te: "trailers", ...auth }, envelope(0, message)).answer;
      expect(good).not.toBe("no answer");
      if (good === "no answer") return;
      expect(answerError(good, "application/grpc")).toBeUndefined();
      expect(upstream.calls()).toBe(1);
    } finally {
      session.destroy();
    }
  });
});
