/**
 * The raw path's shared upstream sessions are pinged (raw-unary.ts, `UpstreamSession`): an
 * upstream host that vanishes without closing the connection (here: a TCP proxy between the
 * forwarder and a stand-in service that stops passing bytes but keeps its sockets open) ends
 * the calls on its session UNAVAILABLE once a ping goes unanswered, deadline or not, and later
 * calls go to a new session. Without the pings they hung (no deadline) or ended
 * DEADLINE_EXCEEDED, and new calls joined the dead session. Loopback only; short ping settings.
 */
import http2 from "node:http2";
import { create, toBinary } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { GetDispatchRequestSchema } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Authenticator } from "../src/core/authenticator.ts";
import { OpenStreams } from "../src/core/open-streams.ts";
import { rawUnaryForwarder } from "../src/http/raw-unary.ts";
import { envelope } from "../../test/support/envelopes.ts";
import { startCountingUpstream, type CountingUpstream } from "../../test/support/counting-upstream.ts";
import { startFreezableProxy, type FreezableProxy } from "../../test/support/freezable-proxy.ts";
import { answerError, h2Call, type H2Answer } from "../../test/support/h2.ts";
import { keysOf } from "../../test/support/signing.ts";

const ADMIN = "k".repeat(40);
const GET = "/outpost.dispatch.v1.DispatchService/GetDispatch";
const PING = { intervalMs: 200, timeoutMs: 300 };
/** Far more than a ping interval and timeout: a call still open then was never failed. */
const BOUND_MS = 5000;

describe("raw path: keep-alive pings on upstream sessions", () => {
  const logger = pino({ level: "silent" });
  let upstream: CountingUpstream;
  let proxy: FreezableProxy;
  let gateway: http2.Http2Server;
  let forwarder: ReturnType<typeof rawUnaryForwarder>;
  let openStreams: OpenStreams;
  let client: http2.ClientHttp2Session;

  beforeAll(async () => {
    upstream = await startCountingUpstream();
    proxy = await startFreezableProxy(upstream.port);
    const authenticator = new Authenticator({
      adminToken: ADMIN,
      cacheTtlMs: 2000,
      lookup: () => Promise.reject(new Error("no tenant keys in this test")),
    });
    openStreams = new OpenStreams({ authenticator, recheckMs: 60_000, logger });
    forwarder = rawUnaryForwarder({
      authenticator,
      rateLimits: undefined,
      upstreamUrls: { tenant: proxy.url, dispatcher: proxy.url, telemetry: proxy.url },
      signingKeys: keysOf("gateway"),
      readMaxBytes: 64 * 1024,
      openStreams,
      logger,
      upstreamPing: PING,
    });
    const calls = { start() {}, end() {}, drainSignal: new AbortController().signal };
    gateway = http2.createServer((req, res) => {
      if (!forwarder.handle(req, res, calls)) {
        res.writeHead(404);
        res.end();
      }
    });
    await new Promise<void>((resolve) => gateway.listen(0, "127.0.0.1", resolve));
    client = http2.connect(`http://127.0.0.1:${(gateway.address() as { port: number }).port}`);
    client.on("error", () => {});
  });

  afterAll(async () => {
    client?.destroy();
    forwarder?.close();
    openStreams?.close();
    await proxy?.close();
    await new Promise((resolve) => gateway?.close(resolve));
    await upstream?.close();
  });

  const message = toBinary(GetDispatchRequestSchema, create(GetDispatchRequestSchema, { dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }));
  const auth = { authorization: `Bearer ${ADMIN}` };

  /** A raw-path call (gRPC, or Connect JSON) through the forwarder; its code, or "no answer" within BOUND_MS. */
  async function call(kind: "grpc" | "connect", extra: Record<string, string> = {}): Promise<{ code: Code | 0 | "no answer"; ms: number }> {
    const started = Date.now();
    const [headers, body, type] =
      kind === "grpc"
        ? [{ ":path": GET, "content-type": "application/grpc", te: "trailers", ...auth, ...extra }, envelope(0, message), "application/grpc"]
        : [{ ":path": GET, "content-type": "application/json", ...auth, ...extra }, Buffer.from('{"dispatchId":"01ARZ3NDEKTSV4RRFFQ69G5FAV"}'), "application/json"];
    const answer: H2Answer | "no answer" = await h2Call(client, headers, body, { timeoutMs: BOUND_MS }).answer;
    if (answer === "no answer") return { code: "no answer", ms: Date.now() - started };
    return { code: answerError(answer, type)?.code ?? 0, ms: Date.now() - started };
  }

  it("fails calls on a session whose upstream stopped answering UNAVAILABLE, deadline or not, and later calls use a new session", { timeout: 30_000 }, async () => {
    // A working session through the proxy.
    expect((await call("grpc")).code).toBe(0);
    expect((await call("connect")).code).toBe(0);
    expect(proxy.accepted).toBe(1);
    const answered = upstream.calls();

    // The upstream host vanishes: bytes stop, the connection stays open.
    proxy.freeze();
    const stuck = await Promise.all([
      call("grpc"),
      call("grpc", { "grpc-timeout": "20S" }),
      call("connect"),
      call("connect", { "connect-timeout-ms": "20000" }),
    ]);
    for (const [i, outcome] of stuck.entries()) {
      expect(outcome.code, `call ${i}`).toBe(Code.Unavailable);
      // An unanswered ping within an interval and a timeout, with room for a slow machine.
      expect(outcome.ms, `call ${i}`).toBeLessThan(BOUND_MS);
    }
    expect(upstream.calls()).toBe(answered);
    // The dead session was dropped: the next call opened a new connection (held by the frozen
    // proxy too, so it fails the same way, on its own ping).
    const whileFrozen = await call("grpc");
    expect(whileFrozen.code).toBe(Code.Unavailable);
    expect(proxy.accepted).toBe(2);

    // The host is back: a new session, and the call is answered.
    proxy.thaw();
    expect((await call("grpc")).code).toBe(0);
    expect((await call("connect")).code).toBe(0);
    expect(proxy.accepted).toBe(3);
    expect(upstream.calls()).toBe(answered + 2);
  });

  it("keeps a healthy session while it is pinged", { timeout: 10_000 }, async () => {
    const before = proxy.accepted;
    for (let i = 0; i < 3; i++) {
      expect((await call("grpc")).code).toBe(0);
      // Longer than a ping interval and timeout: pings were sent and answered meanwhile.
      await new Promise((resolve) => setTimeout(resolve, PING.intervalMs + PING.timeoutMs));
    }
    expect(proxy.accepted).toBe(before);
  });
});
