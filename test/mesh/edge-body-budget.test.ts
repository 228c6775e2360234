/**
 * The gateway's body budget (docs/edge.md, "Request bodies") across a real gateway process and
 * real sockets, over every path that reads a body whole: the raw path (gRPC, Connect unary over
 * HTTP/1.1 and HTTP/2, Connect streams), the lean unary path (compressed gRPC and Connect) and
 * connect-node (gRPC-Web, compressed streams). The upstream is a stand-in that answers every call
 * OK. Budgets are sized from the bodies: the calls held open from 127.0.0.1 fill its per-IP share
 * but for 500 bytes; one more from 127.0.0.2 fills the total but for 500 bytes.
 */
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import path from "node:path";
import { gzipSync } from "node:zlib";
import { create, toBinary } from "@bufbuild/protobuf";
import { Code, type ConnectError } from "@connectrpc/connect";
import { errorInfoOf } from "@outpost/platform";
import { DispatchService, GetDispatchRequestSchema } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { LogService, SubscribeLogsRequestSchema } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { envelope, envelopesOf } from "../support/envelopes.ts";
import { answerError, h2Call, type H2Answer } from "../support/h2.ts";
import { sample, scrape } from "../support/metrics.ts";
import { startStandInGateway, type StandInGateway } from "../support/stand-in-gateway.ts";

const ADMIN = randomBytes(32).toString("hex");
const GET = "/outpost.dispatch.v1.DispatchService/GetDispatch";
const SUBSCRIBE = "/outpost.telemetry.v1.LogService/SubscribeLogs";
const MAX_REQUEST_BYTES = 64 * 1024;
/** Bytes every held call leaves unsent until it is finished. */
const HELD_BACK = 7;

/** A dispatch id of `n` random hex characters: gzip halves it at best. */
const id = (n: number) => randomBytes(n / 2).toString("hex");
const getMessage = (n: number) => toBinary(GetDispatchRequestSchema, create(GetDispatchRequestSchema, { dispatchId: id(n) }));
const subscribeMessage = (n: number) => toBinary(SubscribeLogsRequestSchema, create(SubscribeLogsRequestSchema, { dispatchId: id(n) }));

/** One call over HTTP/2, as the client sends it: headers and whole body. */
interface H2Request {
  what: string;
  headers: http2.OutgoingHttpHeaders;
  body: Buffer;
}

const auth = { authorization: `Bearer ${ADMIN}` };
const grpc = { "content-type": "application/grpc", te: "trailers", ...auth };
const grpcWeb = { "content-type": "application/grpc-web+proto", ...auth };
const connectStream = { "content-type": "application/connect+proto", ...auth };

/** One call of each kind over HTTP/2, on every path, with messages of about `n` bytes. */
function h2Requests(n: number): H2Request[] {
  const gzipped = gzipSync(getMessage(n));
  return [
    { what: "raw gRPC", headers: { ":path": GET, ...grpc }, body: envelope(0, getMessage(n)) },
    { what: "raw Connect stream", headers: { ":path": SUBSCRIBE, ...connectStream }, body: envelope(0, subscribeMessage(n)) },
    {
      what: "raw Connect unary (content-length)",
      headers: { ":path": GET, "content-type": "application/proto", "content-length": String(getMessage(n).length), ...auth },
      body: Buffer.from(getMessage(n)),
    },
    { what: "lean gRPC (gzip)", headers: { ":path": GET, ...grpc, "grpc-encoding": "gzip" }, body: envelope(1, gzipped) },
    {
      what: "lean Connect unary (gzip)",
      headers: { ":path": GET, "content-type": "application/proto", "content-encoding": "gzip", "content-length": String(gzipped.length), ...auth },
      body: gzipped,
    },
    { what: "connect-node gRPC-Web", headers: { ":path": GET, ...grpcWeb }, body: envelope(0, getMessage(n)) },
    {
      what: "connect-node Connect stream (gzip)",
      headers: { ":path": SUBSCRIBE, ...connectStream, "connect-content-encoding": "gzip" },
      body: envelope(1, gzipSync(subscribeMessage(n))),
    },
    { what: "connect-node gRPC stream (gzip)", headers: { ":path": SUBSCRIBE, ...grpc, "grpc-encoding": "gzip" }, body: envelope(1, gzipSync(subscribeMessage(n))) },
  ];
}

/** A Connect JSON call (the raw path) or a gRPC-Web call (connect-node) over HTTP/1.1. */
function h1Request(kind: "connect" | "grpc-web", n: number, { chunked = false } = {}) {
  const body = kind === "connect" ? Buffer.from(JSON.stringify({ dispatchId: id(n) })) : envelope(0, getMessage(n));
  const headers: http.OutgoingHttpHeaders = { "content-type": kind === "connect" ? "application/json" : "application/grpc-web+proto", ...auth };
  if (!chunked) headers["content-length"] = String(body.length);
  return { what: `HTTP/1.1 ${kind}${chunked ? " (chunked)" : ""}`, headers, body };
}

/**
 * An HTTP/1.1 call on a connection of its own that sends `first` of its body: the request, to
 * send the rest or cut it, and the answer as an HTTP/2 one reads (status and headers in `head`).
 */
function h1Call(port: number, headers: http.OutgoingHttpHeaders, first: Buffer, localAddress = "127.0.0.1") {
  const req = http.request({ host: "127.0.0.1", port, localAddress, method: "POST", path: GET, headers, agent: false });
  req.on("error", () => {});
  const started = Date.now();
  const answer = new Promise<H2Answer | "no answer">((resolve) => {
    const timer = setTimeout(() => resolve("no answer"), 5000);
    req.on("close", () => setTimeout(() => resolve("no answer"), 100));
    req.on("response", (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("error", () => {});
      res.on("close", () => {
        clearTimeout(timer);
        resolve({ head: { ...res.headers, ":status": String(res.statusCode) }, trailers: {}, body: Buffer.concat(chunks), ms: Date.now() - started });
      });
    });
  });
  req.write(first);
  return { req, answer };
}

/** "OK" (the protocol's own mark of success is there), or the code, ErrorInfo reason and budget of the error an answer carries. */
function outcome(answer: H2Answer | "no answer", requestType: string): string {
  if (answer === "no answer") return "no answer";
  const error: ConnectError | undefined = answerError(answer, requestType);
  if (error) {
    const info = errorInfoOf(error);
    return `${Code[error.code]} ${info?.reason ?? "none"} ${info?.metadata["budget"] ?? "none"}`;
  }
  const text = answer.body.toString("latin1");
  const succeeded = requestType.startsWith("application/grpc-web")
    ? /grpc-status: ?0\r\n/.test(text)
    : requestType.startsWith("application/grpc")
      ? (answer.trailers["grpc-status"] ?? answer.head["grpc-status"]) === "0"
      : requestType.startsWith("application/connect+")
        ? envelopesOf(answer.body).some((e) => (e.flags & 2) === 2)
        : Number(answer.head[":status"]) === 200;
  return succeeded ? "OK" : `no status (HTTP ${String(answer.head[":status"])})`;
}

/**
 * A gateway process with `env` in front of a stand-in upstream that answers every call OK, and
 * what the tests use of it. Call `start` in beforeAll and `stop` in afterAll.
 */
function edgeUnderTest(env: () => Record<string, string>) {
  const edge = {
    gateway: undefined as StandInGateway | undefined,
    dir: "",
    port: 0,
    async start() {
      edge.gateway = await startStandInGateway({
        adminToken: ADMIN,
        routes(router) {
          router.service(DispatchService, { getDispatch: () => ({}) } as never);
          router.service(LogService, { async *subscribeLogs() {} } as never);
        },
        env: { OUTPOST_MAX_REQUEST_BYTES: String(MAX_REQUEST_BYTES), ...env() },
      });
      edge.dir = edge.gateway.dir;
      edge.port = edge.gateway.port;
    },
    stop: async () => edge.gateway?.stop(),
    session(localAddress = "127.0.0.1") {
      const s = http2.connect(`http://127.0.0.1:${edge.port}`, { createConnection: () => net.connect({ port: edge.port, host: "127.0.0.1", localAddress }) });
      s.on("error", () => {});
      return s;
    },
    /** A sample of the gateway's metrics (NaN when absent). */
    metric: async (name: string): Promise<number> => sample(await scrape(edge.gateway!.url), name) ?? NaN,
  };
  return edge;
}

describe("the gateway's body budget (real process, every path)", () => {
  const under = edgeUnderTest(() => ({
    OUTPOST_GATEWAY_BODY_BUDGET_PER_IP_BYTES: String(heldBytes + 500),
    OUTPOST_GATEWAY_BODY_BUDGET_BYTES: String(heldBytes + other.body.length + 500),
  }));
  let dir: string;
  let port: number;
  const session = (localAddress = "127.0.0.1") => under.session(localAddress);
  const scrape = () => under.metric("outpost_request_body_buffered_bytes");
  /** The buffered bytes once they stop changing toward `want` (releases follow closes by a turn or two). */
  const settledGauge = async (want: number) => {
    let got = await scrape();
    for (let i = 0; i < 40 && got !== want; i++) {
      await new Promise((resolve) => setTimeout(resolve, 50));
      got = await scrape();
    }
    return got;
  };

  // Held open from 127.0.0.1: one call of each kind over HTTP/2 on one connection, and two over
  // HTTP/1.1; from 127.0.0.2 one more.
  const held = h2Requests(40_000);
  const heldH1 = [h1Request("connect", 40_000), h1Request("grpc-web", 40_000)];
  const other = h2Requests(40_000)[0]!;
  const heldBytes = [...held, ...heldH1].reduce((sum, r) => sum + r.body.length, 0);

  beforeAll(async () => {
    await under.start();
    dir = under.dir;
    port = under.port;
  });

  afterAll(() => under.stop());

  it("refuses calls past the budget at once, RESOURCE_EXHAUSTED BODY_BUDGET_EXHAUSTED over each protocol, and the held calls still complete", async () => {
    expect(await scrape()).toBe(0);
    const one = session();
    const calls = held.map((r) => ({ ...r, ...h2Call(one, r.headers, r.body.subarray(0, -HELD_BACK), { end: false, timeoutMs: 10_000 }) }));
    const h1Calls = heldH1.map((r) => ({ ...r, ...h1Call(port, r.headers, r.body.subarray(0, -HELD_BACK)) }));
    const fromOther = session("127.0.0.2");
    const otherCall = h2Call(fromOther, other.headers, other.body.subarray(0, -HELD_BACK), { end: false, timeoutMs: 10_000 });
    // Every held body reserved its declared size; nothing else is held.
    expect(await settledGauge(heldBytes + other.body.length)).toBe(heldBytes + other.body.length);

    // Later calls from 127.0.0.1: refused by its share, answered before their bodies end.
    const probes = h2Requests(2000);
    const refused: Record<string, string> = {};
    const want: Record<string, string> = {};
    const slow: string[] = [];
    const probeSession = session();
    for (const probe of [...probes, { what: "raw Connect unary (no length)", headers: { ":path": GET, "content-type": "application/proto", ...auth }, body: Buffer.from(getMessage(2000)) }]) {
      const answer = await h2Call(probeSession, probe.headers, probe.body.subarray(0, -HELD_BACK), { end: false }).answer;
      refused[probe.what] = outcome(answer, String(probe.headers["content-type"]));
      want[probe.what] = "ResourceExhausted BODY_BUDGET_EXHAUSTED per_client_ip";
      if (answer !== "no answer" && answer.ms > 2000) slow.push(probe.what);
    }
    // From 127.0.0.2: its share has room, the total has not.
    const otherProbe = await h2Call(fromOther, probes[0]!.headers, probes[0]!.body.subarray(0, -HELD_BACK), { end: false }).answer;
    refused["raw gRPC from 127.0.0.2"] = outcome(otherProbe, "application/grpc");
    want["raw gRPC from 127.0.0.2"] = "ResourceExhausted BODY_BUDGET_EXHAUSTED total";
    expect(refused).toEqual(want);
    expect(slow).toEqual([]);
    // HTTP/1.1, declared or chunked: the answer, and the connection closed (the rest of the body is not read).
    const h1Refused: Record<string, string> = {};
    for (const probe of [h1Request("connect", 2000), h1Request("connect", 2000, { chunked: true }), h1Request("grpc-web", 2000)]) {
      const answer = await h1Call(port, probe.headers, probe.body.subarray(0, -HELD_BACK)).answer;
      const closes = answer !== "no answer" && answer.head["connection"] === "close";
      h1Refused[probe.what] = `${outcome(answer, String(probe.headers["content-type"]))}, connection closed: ${closes}`;
    }
    const h1Want = "ResourceExhausted BODY_BUDGET_EXHAUSTED per_client_ip, connection closed: true";
    expect(h1Refused).toEqual({ "HTTP/1.1 connect": h1Want, "HTTP/1.1 connect (chunked)": h1Want, "HTTP/1.1 grpc-web": h1Want });
    // Refused calls gave back whatever they took.
    expect(await settledGauge(heldBytes + other.body.length)).toBe(heldBytes + other.body.length);

    // The held calls finish their bodies: every one completes.
    for (const call of calls) call.stream.end(call.body.subarray(-HELD_BACK));
    for (const call of h1Calls) call.req.end(call.body.subarray(-HELD_BACK));
    otherCall.stream.end(other.body.subarray(-HELD_BACK));
    const done: Record<string, string> = {};
    for (const call of calls) done[call.what] = outcome(await call.answer, String(call.headers["content-type"]));
    done["from 127.0.0.2"] = outcome(await otherCall.answer, "application/grpc");
    for (const call of h1Calls) done[call.what] = outcome(await call.answer, String(call.headers["content-type"]));
    expect(done).toEqual({
      ...Object.fromEntries(held.map((r) => [r.what, "OK"])),
      "from 127.0.0.2": "OK",
      "HTTP/1.1 connect": "OK",
      "HTTP/1.1 grpc-web": "OK",
    });
    expect(await settledGauge(0)).toBe(0);
    one.close();
    probeSession.close();
    fromOther.close();

    // Many refusals, one warning (at most one a minute).
    const warnings = readFileSync(path.join(dir, "logs", "gateway.log"), "utf8").split("\n").filter((l) => l.includes("request body budget exhausted"));
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toContain('"level":"warn"');
  });

  it("gives back what aborted calls held: reset streams, closed connections, deadlines; then new calls pass", async () => {
    const cut = session();
    const reset = session();
    const calls = [
      ...h2Requests(40_000).slice(0, 4).map((r) => ({ how: "connection closed", ...r, ...h2Call(cut, r.headers, r.body.subarray(0, -HELD_BACK), { end: false }) })),
      ...h2Requests(40_000).slice(4).map((r) => ({ how: "stream reset", ...r, ...h2Call(reset, r.headers, r.body.subarray(0, -HELD_BACK), { end: false }) })),
    ];
    const sockets = [h1Request("connect", 40_000), h1Request("grpc-web", 40_000)].map((r) => ({ ...r, ...h1Call(port, r.headers, r.body.subarray(0, -HELD_BACK)) }));
    const held = [...calls, ...sockets].reduce((sum, r) => sum + r.body.length, 0);
    expect(await settledGauge(held)).toBe(held);
    cut.destroy();
    for (const call of calls) if (call.how === "stream reset") call.stream.close(http2.constants.NGHTTP2_CANCEL);
    for (const socket of sockets) socket.req.destroy();
    expect(await settledGauge(0)).toBe(0);
    reset.close();

    // Bodies still open at their deadline, on each path: DEADLINE_EXCEEDED, and their bytes back.
    const late = session();
    const withDeadline = h2Requests(40_000).filter((r) => ["raw gRPC", "lean gRPC (gzip)", "connect-node gRPC-Web"].includes(r.what));
    const answers = await Promise.all(
      withDeadline.map((r) => h2Call(late, { ...r.headers, "grpc-timeout": "300m" }, r.body.subarray(0, -HELD_BACK), { end: false }).answer.then((a) => outcome(a, String(r.headers["content-type"])))),
    );
    expect(answers).toEqual(withDeadline.map(() => "DeadlineExceeded none none"));
    expect(await settledGauge(0)).toBe(0);

    // The budget is whole again: new calls of full size pass on every path.
    const fresh: Record<string, string> = {};
    for (const r of h2Requests(40_000)) fresh[r.what] = outcome(await h2Call(late, r.headers, r.body).answer, String(r.headers["content-type"]));
    expect(fresh).toEqual(Object.fromEntries(Object.keys(fresh).map((what) => [what, "OK"])));
    late.close();
    expect(await settledGauge(0)).toBe(0);
  });
});

describe("the gateway's body time limit (OUTPOST_GATEWAY_BODY_TIMEOUT_MS, real process, every path)", () => {
  const LIMIT_MS = 600;
  const under = edgeUnderTest(() => ({ OUTPOST_GATEWAY_BODY_TIMEOUT_MS: String(LIMIT_MS) }));
  beforeAll(() => under.start());
  afterAll(() => under.stop());

  it("fails a body still arriving at the limit with DEADLINE_EXCEEDED REQUEST_BODY_TIMEOUT on every path, gives its bytes back, and lets a slow but finished body through", async () => {
    const timeoutsBefore = await under.metric("outpost_request_body_timeouts_total");
    const one = under.session();
    // No deadline from the client: only the gateway's limit can end these.
    const h2 = h2Requests(20_000).map((r) => ({ ...r, ...h2Call(one, r.headers, r.body.subarray(0, -HELD_BACK), { end: false, timeoutMs: 10_000 }) }));
    const h1 = [h1Request("connect", 20_000), h1Request("grpc-web", 20_000)].map((r) => ({ ...r, ...h1Call(under.port, r.headers, r.body.subarray(0, -HELD_BACK)) }));
    const got: Record<string, string> = {};
    const early: string[] = [];
    for (const call of [...h2, ...h1]) {
      const answer = await call.answer;
      got[call.what] = outcome(answer, String(call.headers["content-type"]));
      if (answer !== "no answer" && answer.ms < LIMIT_MS - 50) early.push(`${call.what} after ${answer.ms} ms`);
    }
    expect(got).toEqual(Object.fromEntries([...h2, ...h1].map((c) => [c.what, "DeadlineExceeded REQUEST_BODY_TIMEOUT none"])));
    expect(early).toEqual([]);
    // HTTP/1.1: the rest of the body is not read, so the connection is not kept.
    for (const call of h1) {
      const answer = await call.answer;
      expect(answer !== "no answer" && answer.head["connection"], call.what).toBe("close");
    }
    expect(await under.metric("outpost_request_body_buffered_bytes")).toBe(0);
    expect((await under.metric("outpost_request_body_timeouts_total")) - timeoutsBefore).toBe(h2.length + h1.length);

    // A body sent in two parts, the second after a pause well within the limit, passes.
    const slow = h2Requests(20_000)[0]!;
    const call = h2Call(one, slow.headers, slow.body.subarray(0, -HELD_BACK), { end: false });
    await new Promise((resolve) => setTimeout(resolve, LIMIT_MS / 3));
    call.stream.end(slow.body.subarray(-HELD_BACK));
    expect(outcome(await call.answer, "application/grpc")).toBe("OK");
    one.close();
  });
});
