/**
 * The HTTP layer below the RPC at the edge, against a hostile client on loopback (docs/edge.md,
 * Hygiene, "Headers and connections"): repeated headers read the same way on every path,
 * overlong protocol headers quoted short in their refusal, and the HTTP/2 floods Node and
 * nghttp2 already bound (kept here so an upgrade that loses one is seen).
 */
import net from "node:net";
import { create, toBinary } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { errorInfoOf } from "@outpost/platform";
import { GetDispatchRequestSchema } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { envelope } from "../../test/support/envelopes.ts";
import { answerError, h2Call, type H2Answer } from "../../test/support/h2.ts";
import { startRateLimitedGateway, type RateLimitedGateway } from "./rate-limited-gateway.ts";

const ADMIN = "c".repeat(40);
const GET = "/outpost.dispatch.v1.DispatchService/GetDispatch";
const JSON_BODY = '{"dispatchId":"01ARZ3NDEKTSV4RRFFQ69G5FAV"}';
const KEY_A = `otp_${"a".repeat(64)}`;
const KEY_B = `otp_${"b".repeat(64)}`;

describe("the edge's HTTP layer against a hostile client", () => {
  let edge: RateLimitedGateway;
  const message = toBinary(GetDispatchRequestSchema, create(GetDispatchRequestSchema, { dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }));

  beforeAll(async () => {
    edge = await startRateLimitedGateway({ adminToken: ADMIN, readsPerIp: 100_000 });
  });
  afterAll(() => edge?.close());

  /** Raw HTTP/1.1: writes `text`, resolves what came back when the connection closed or after `ms`. */
  function h1(text: string, ms = 3000): Promise<string> {
    return new Promise((resolve) => {
      const socket = net.connect(edge.port, "127.0.0.1");
      let answer = "";
      socket.on("data", (chunk: Buffer) => (answer += chunk.toString("latin1")));
      socket.on("error", () => {});
      const timer = setTimeout(() => (socket.destroy(), resolve(answer)), ms);
      socket.on("close", () => (clearTimeout(timer), resolve(answer)));
      socket.write(text);
    });
  }

  async function h2(headers: Record<string, string | string[]>, body: Buffer): Promise<H2Answer> {
    const session = edge.sessionFrom("127.0.0.1");
    try {
      const answer = await h2Call(session, { ":path": GET, ...headers }, body).answer;
      if (answer === "no answer") throw new Error("no answer");
      return answer;
    } finally {
      session.destroy();
    }
  }

  /** Bytes of an answer's headers and trailers as sent (names and values). */
  const headerBytes = (answer: H2Answer) =>
    [...Object.entries(answer.head), ...Object.entries(answer.trailers)].reduce((n, [name, value]) => n + name.length + String(value).length, 0);

  it("reads a header sent twice over HTTP/2 as HTTP/1.1 does (values joined), on the raw path too", async () => {
    const grpc = { "content-type": "application/grpc", te: "trailers", authorization: `Bearer ${ADMIN}` };
    // Two deadlines: refused as malformed (Node joins the values), never a call without one.
    const twoDeadlines = await h2({ ...grpc, "grpc-timeout": ["5S", "1m"] }, envelope(0, message));
    const error = answerError(twoDeadlines, "application/grpc");
    expect(error?.code).toBe(Code.InvalidArgument);
    expect(errorInfoOf(error!)?.reason).toBe("MALFORMED_TIMEOUT");
    // Two keys: malformed, over HTTP/2 as over HTTP/1.1.
    const connect = { "content-type": "application/json" };
    const h2Keys = answerError(await h2({ ...connect, "x-api-key": [KEY_A, KEY_B] }, Buffer.from(JSON_BODY)), "application/json");
    expect(errorInfoOf(h2Keys!)?.reason).toBe("API_KEY_MALFORMED");
    const h1Keys = await h1(
      `POST ${GET} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Api-Key: ${KEY_A}\r\nX-Api-Key: ${KEY_B}\r\nContent-Length: ${JSON_BODY.length}\r\n\r\n${JSON_BODY}`,
      1000,
    );
    expect(h1Keys).toMatch(/^HTTP\/1\.1 401 /);
    expect(h1Keys).toContain("API_KEY_MALFORMED");
  });

  it("takes the first authorization header and prefers it to x-api-key, the same over both protocols and both paths", async () => {
    // HTTP/1.1 (raw path: Connect JSON; Connect path: gRPC-Web): Node keeps the first of a
    // repeated authorization header (over HTTP/2 too, where node:http2 will not even send two).
    const webBody = envelope(0, message);
    for (const [type, body] of [["application/json", Buffer.from(JSON_BODY)], ["application/grpc-web+proto", webBody]] as const) {
      const call = (auth: string) =>
        h1(`POST ${GET} HTTP/1.1\r\nHost: x\r\nContent-Type: ${type}\r\n${auth}Content-Length: ${body.length}\r\nConnection: close\r\n\r\n${body.toString("latin1")}`, 1500);
      const first = await call(`Authorization: Bearer ${ADMIN}\r\nAuthorization: Bearer nope\r\n`);
      expect(first, type).toMatch(/^HTTP\/1\.1 200 /);
      expect(first, type).not.toContain("grpc-status: 16");
      const second = await call(`Authorization: Bearer nope\r\nAuthorization: Bearer ${ADMIN}\r\n`);
      expect(second, type).toMatch(type === "application/json" ? /^HTTP\/1\.1 401 / : /grpc-status: 16/);
    }
    // authorization wins over x-api-key, whichever is valid (raw path: gRPC; Connect path: gRPC-Web).
    for (const type of ["application/grpc", "application/grpc-web+proto"]) {
      const headers = { "content-type": type, te: "trailers" };
      expect(answerError(await h2({ ...headers, authorization: `Bearer ${ADMIN}`, "x-api-key": "nope" }, envelope(0, message)), type), type).toBeUndefined();
      const keyIgnored = answerError(await h2({ ...headers, authorization: "Bearer nope", "x-api-key": ADMIN }, envelope(0, message)), type);
      expect(errorInfoOf(keyIgnored!)?.reason, type).toBe("API_KEY_MALFORMED");
    }
  });

  it("quotes an overlong protocol header short in its refusal, on every path (no amplified or unsendable answer)", async () => {
    const long = "9".repeat(15_000);
    // gRPC on the raw path. Before: trailers of over 64 KiB that Node could not send; the client's
    // connection was closed with no status at all.
    const grpc = await h2({ "content-type": "application/grpc", te: "trailers", authorization: `Bearer ${ADMIN}`, "grpc-timeout": long }, envelope(0, message));
    const grpcError = answerError(grpc, "application/grpc");
    expect(grpcError?.code).toBe(Code.InvalidArgument);
    expect(errorInfoOf(grpcError!)?.reason).toBe("MALFORMED_TIMEOUT");
    expect(grpcError!.rawMessage).toContain("(15000 characters)");
    expect(headerBytes(grpc)).toBeLessThan(2048);
    // gRPC-Web on the Connect path, and a compression nobody knows (the lean unary path).
    const webAnswer = await h2({ "content-type": "application/grpc-web+proto", authorization: `Bearer ${ADMIN}`, "grpc-timeout": long }, envelope(0, message));
    expect(answerError(webAnswer, "application/grpc-web+proto")?.code).toBe(Code.InvalidArgument);
    expect(headerBytes(webAnswer) + webAnswer.body.length).toBeLessThan(2048);
    const encoding = await h2({ "content-type": "application/grpc", te: "trailers", authorization: `Bearer ${ADMIN}`, "grpc-encoding": "z".repeat(15_000) }, envelope(1, message));
    expect(answerError(encoding, "application/grpc")?.code).toBeDefined();
    expect(headerBytes(encoding)).toBeLessThan(2048);
    // Connect over HTTP/1.1: a 5 KB connect-timeout-ms made a 29 KB error body.
    for (const header of [`Connect-Timeout-Ms: ${long.slice(0, 5000)}`, `Connect-Protocol-Version: ${"1".repeat(5000)}`]) {
      const answer = await h1(
        `POST ${GET} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer ${ADMIN}\r\n${header}\r\nContent-Length: ${JSON_BODY.length}\r\n\r\n${JSON_BODY}`,
        1000,
      );
      expect(answer, header.slice(0, 20)).toMatch(/^HTTP\/1\.1 400 /);
      expect(answer.length, header.slice(0, 20)).toBeLessThan(2048);
    }
  });
});

/** A minimal HTTP/2 frame writer for floods node:http2's client will not send. */
const PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
function frame(type: number, flags: number, stream: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const head = Buffer.alloc(9);
  head.writeUIntBE(payload.length, 0, 3);
  head[3] = type;
  head[4] = flags;
  head.writeUInt32BE(stream, 5);
  return Buffer.concat([head, payload]);
}
/** An HPACK literal header field without indexing (names and values under 127 bytes). */
const literal = (name: string, value: string) => Buffer.concat([Buffer.from([0, name.length]), Buffer.from(name), Buffer.from([value.length]), Buffer.from(value)]);
const requestHeaders = (extra: Buffer[] = []) =>
  Buffer.concat([literal(":method", "POST"), literal(":scheme", "http"), literal(":path", GET), literal(":authority", "x"), literal("content-type", "application/grpc"), ...extra]);
const FRAME = { DATA: 0, HEADERS: 1, RST_STREAM: 3, SETTINGS: 4, PING: 6, GOAWAY: 7, CONTINUATION: 9 } as const;
const END_HEADERS = 4;

describe("HTTP/2 floods (bounded by Node and nghttp2; regression guards)", () => {
  let edge: RateLimitedGateway;
  beforeAll(async () => {
    edge = await startRateLimitedGateway({ adminToken: ADMIN, readsPerIp: 100_000 });
  });
  afterAll(() => edge?.close());

  /**
   * Opens a raw connection, writes the preface and then `frames()` in batches without reading
   * anything back; resolves whether the gateway closed the connection within `ms`, and the
   * frame types it sent first.
   */
  function flood(frames: (i: number) => Buffer, count: number, ms = 5000): Promise<{ closed: boolean; sent: number }> {
    return new Promise((resolve) => {
      const socket = net.connect(edge.port, "127.0.0.1");
      socket.on("error", () => {});
      socket.pause(); // never reads: acks pile up on the gateway's side
      let sent = 0;
      let closed = false;
      const timer = setTimeout(() => (socket.destroy(), resolve({ closed, sent })), ms);
      socket.on("close", () => {
        closed = true;
        clearTimeout(timer);
        resolve({ closed, sent });
      });
      socket.write(Buffer.concat([PREFACE, frame(FRAME.SETTINGS, 0, 0)]));
      const batch = async () => {
        for (let i = 0; i < count && !socket.destroyed; i += 200) {
          const chunk: Buffer[] = [];
          for (let j = i; j < Math.min(count, i + 200); j++) chunk.push(frames(j));
          sent += chunk.length;
          socket.write(Buffer.concat(chunk));
          await new Promise((r) => setImmediate(r));
        }
      };
      void batch();
    });
  }

  /** The gateway still serves a well-formed call afterwards. */
  async function stillServes(): Promise<void> {
    const session = edge.sessionFrom("127.0.0.1");
    try {
      const message = toBinary(GetDispatchRequestSchema, create(GetDispatchRequestSchema, { dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }));
      const answer = await h2Call(session, { ":path": GET, "content-type": "application/grpc", te: "trailers", authorization: `Bearer ${ADMIN}` }, envelope(0, message)).answer;
      expect(answer !== "no answer" && answerError(answer, "application/grpc")).toBeUndefined();
    } finally {
      session.destroy();
    }
  }

  it("closes a connection that opens and resets streams in a loop (rapid reset), forwarding none of them", { timeout: 15_000 }, async () => {
    const before = edge.upstream.calls();
    const auth = literal("authorization", `Bearer ${ADMIN}`);
    const outcome = await flood((i) => Buffer.concat([frame(FRAME.HEADERS, END_HEADERS, 2 * i + 1, requestHeaders([auth])), frame(FRAME.RST_STREAM, 0, 2 * i + 1, Buffer.from([0, 0, 0, 8]))]), 20_000);
    expect(outcome.closed).toBe(true);
    expect(outcome.sent).toBeLessThan(20_000);
    expect(edge.upstream.calls() - before).toBeLessThan(100);
    await stillServes();
  });

  it("closes a connection that floods PINGs or SETTINGS without reading the acknowledgements", { timeout: 15_000 }, async () => {
    expect((await flood(() => frame(FRAME.PING, 0, 0, Buffer.alloc(8)), 100_000)).closed).toBe(true);
    expect((await flood(() => frame(FRAME.SETTINGS, 0, 0, Buffer.from([0, 4, 0, 0, 0xff, 0xff])), 100_000)).closed).toBe(true);
    await stillServes();
  });

  it("closes a connection whose header block never ends (CONTINUATION flood), and resets a stream with too many headers", { timeout: 15_000 }, async () => {
    const continuation = await flood((i) => (i === 0 ? frame(FRAME.HEADERS, 0, 1, requestHeaders()) : frame(FRAME.CONTINUATION, 0, 1, literal("x-a", "b".repeat(100)))), 50_000);
    expect(continuation.closed).toBe(true);
    expect(continuation.sent).toBeLessThan(50_000);
    // 1,000 header fields (Node takes 128 per block): the stream is reset, the connection serves on.
    const session = edge.sessionFrom("127.0.0.1");
    try {
      const many: Record<string, string> = {};
      for (let i = 0; i < 1000; i++) many[`x-h${i}`] = "v";
      const answer = await h2Call(session, { ":path": GET, "content-type": "application/grpc", te: "trailers", ...many }, Buffer.alloc(0)).answer;
      expect(answer !== "no answer" && answer.head[":status"]).toBeUndefined();
    } finally {
      session.destroy();
    }
    await stillServes();
  });
});

describe("Expect: 100-continue", () => {
  let edge: RateLimitedGateway;
  beforeAll(async () => {
    edge = await startRateLimitedGateway({ adminToken: ADMIN, readsPerIp: 100_000 });
  });
  afterAll(() => edge?.close());

  /** Sends `head`, then `body` once "100 Continue" came (if it does); resolves everything read until the connection closed. */
  function expectContinue(head: string, body: string): Promise<string> {
    return new Promise((resolve) => {
      const socket = net.connect(edge.port, "127.0.0.1");
      let answer = "";
      socket.on("data", (chunk: Buffer) => {
        answer += chunk.toString("latin1");
        if (answer.startsWith("HTTP/1.1 100 Continue\r\n\r\n") && body !== "") {
          socket.write(body);
          body = "";
        }
      });
      socket.on("error", () => {});
      const timer = setTimeout(() => (socket.destroy(), resolve(answer)), 3000);
      socket.on("close", () => (clearTimeout(timer), resolve(answer)));
      socket.write(head);
    });
  }

  it("is refused without \"100 Continue\" (the body is never asked for), and an admitted call gets it", async () => {
    const body = JSON_BODY.padEnd(100_000, " ");
    const head = (auth: string) =>
      `POST ${GET} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n${auth}Expect: 100-continue\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n`;
    // Before: "100 Continue" went out at once, before the credential was looked at.
    const refused = await expectContinue(head(""), body);
    expect(refused).toMatch(/^HTTP\/1\.1 401 /);
    expect(refused).not.toContain("100 Continue");
    const admitted = await expectContinue(head(`Authorization: Bearer ${ADMIN}\r\n`), body);
    expect(admitted).toMatch(/^HTTP\/1\.1 100 Continue\r\n\r\nHTTP\/1\.1 200 /);
  });
});
