import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import { Code, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import { errorInfoOf, generateSigningKeySet, internalClient, metricsText, signingKeysOf, startServer, type RunningServer } from "@outpost/platform";
import { Health, HealthCheckResponse_ServingStatus as Status } from "@outpost/proto/grpc/health/v1/health_pb.js";
import { LogService } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { fakeLogRoutes, silentLogger, sleep, startTestServer } from "./helpers.ts";
import { keysOf } from "../../../test/support/signing.ts";
import { answerError, h2Call, h2Exchange } from "../../../test/support/h2.ts";
import { envelope, envelopesOf } from "../../../test/support/envelopes.ts";
import { errorOf } from "../../../test/support/rpc.ts";

function postJson(url: string, method: string, body: unknown, headers: Record<string, string> = {}) {
  return fetch(`${url}/outpost.telemetry.v1.LogService/${method}`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: JSON.stringify(body),
  });
}

describe("one port, every protocol", () => {
  let server: RunningServer;
  beforeAll(async () => {
    server = await startTestServer();
  });
  afterAll(() => server.close());

  it("serves Connect JSON over HTTP/1.1 to a plain fetch", async () => {
    const res = await postJson(server.url, "GetLogs", { dispatchId: "hello" });
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toContain("application/json");
    const body = (await res.json()) as { chunks: { text: string; seq: string }[] };
    expect(body.chunks).toEqual([expect.objectContaining({ text: "hello", seq: "1" })]);
  });

  const transports: Record<string, () => Transport> = {
    "Connect over HTTP/2": () => createConnectTransport({ baseUrl: server.url, httpVersion: "2" }),
    "Connect over HTTP/1.1": () => createConnectTransport({ baseUrl: server.url, httpVersion: "1.1" }),
    gRPC: () => createGrpcTransport({ baseUrl: server.url }),
    "gRPC-Web over HTTP/1.1": () => createGrpcWebTransport({ baseUrl: server.url, httpVersion: "1.1" }),
    "gRPC-Web over HTTP/2": () => createGrpcWebTransport({ baseUrl: server.url, httpVersion: "2" }),
  };
  for (const [name, transport] of Object.entries(transports)) {
    it(`serves ${name} (unary and server streaming)`, async () => {
      const client = createClient(LogService, transport());
      const res = await client.getLogs({ dispatchId: name });
      expect(res.chunks.map((c) => c.text)).toEqual([name]);
      const controller = new AbortController();
      for await (const msg of client.subscribeLogs({ dispatchId: "s" }, { signal: controller.signal })) {
        expect(msg.chunks[0]?.text).toBe("first");
        break;
      }
    });
  }

  it("masks a plain Error as INTERNAL with a trace id and without the original message", async () => {
    for (const transport of [transports.gRPC!(), transports["Connect over HTTP/1.1"]!()]) {
      const err = await errorOf(createClient(LogService, transport).getLogs({ dispatchId: "boom" }));
      expect(err.code).toBe(Code.Internal);
      expect(err.rawMessage).toMatch(/trace id [0-9a-f]{32}/);
      expect(err.message).not.toContain("hunter2");
      expect(JSON.stringify(err.metadata)).not.toContain("hunter2");
    }
    const res = await postJson(server.url, "GetLogs", { dispatchId: "boom" });
    expect(await res.text()).not.toContain("hunter2");
  });

  it("passes a ConnectError through unchanged", async () => {
    const err = await errorOf(createClient(LogService, transports.gRPC!()).getLogs({ dispatchId: "missing" }));
    expect(err.code).toBe(Code.NotFound);
    expect(err.rawMessage).toBe('dispatch "D1" not found');
    expect(errorInfoOf(err)?.reason).toBe("DISPATCH_NOT_FOUND");
  });

  it("continues the trace of an incoming traceparent", async () => {
    const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";
    const res = await postJson(server.url, "GetLogs", { dispatchId: "trace" }, { traceparent: `00-${traceId}-00f067aa0ba902b7-01` });
    expect(((await res.json()) as { nextPageToken: string }).nextPageToken).toBe(traceId);
    const viaGrpc = await createClient(LogService, transports.gRPC!()).getLogs(
      { dispatchId: "trace" },
      { headers: { traceparent: `00-${traceId}-00f067aa0ba902b7-01` } },
    );
    expect(viaGrpc.nextPageToken).toBe(traceId);
  });

  it("starts a fresh trace per call without (or with an invalid) traceparent", async () => {
    const client = createClient(LogService, transports.gRPC!());
    const a = await client.getLogs({ dispatchId: "trace" });
    const b = await client.getLogs({ dispatchId: "trace" }, { headers: { traceparent: `00-${"0".repeat(32)}-00f067aa0ba902b7-01` } });
    expect(a.nextPageToken).toMatch(/^[0-9a-f]{32}$/);
    expect(b.nextPageToken).toMatch(/^[0-9a-f]{32}$/);
    expect(b.nextPageToken).not.toBe("0".repeat(32));
    expect(a.nextPageToken).not.toBe(b.nextPageToken);
  });
});

describe("an httpHandler that decides later (a promise)", () => {
  let server: RunningServer;
  // The handler decides each request by its x-decide header, after 50 ms.
  beforeAll(async () => {
    server = await startTestServer({
      httpHandler(req, res) {
        const decide = req.headers["x-decide"];
        if (decide === undefined) return false;
        return (async () => {
          await sleep(50);
          if (decide === "answer") {
            res.statusCode = 418;
            res.setHeader("content-type", "text/plain");
            res.end("answered by the handler\n");
            return true;
          }
          if (decide === "fail") throw new Error("the handler broke");
          return false;
        })();
      },
    });
  });
  afterAll(() => server.close());

  it("false after the wait hands the request, body unread until then, to Connect", async () => {
    const res = await postJson(server.url, "GetLogs", { dispatchId: "later" }, { "x-decide": "pass" });
    expect(res.status).toBe(200);
    expect(((await res.json()) as { chunks: { text: string }[] }).chunks[0]?.text).toBe("later");
  });

  it("true after the wait leaves the answer to the handler", async () => {
    const res = await postJson(server.url, "GetLogs", { dispatchId: "x" }, { "x-decide": "answer" });
    expect(res.status).toBe(418);
    expect(await res.text()).toBe("answered by the handler\n");
  });

  it("a handler that rejects is answered 500, and the server keeps serving", async () => {
    const res = await postJson(server.url, "GetLogs", { dispatchId: "x" }, { "x-decide": "fail" });
    expect(res.status).toBe(500);
    const next = await postJson(server.url, "GetLogs", { dispatchId: "after" });
    expect(next.status).toBe(200);
  });
});

describe("liveness and readiness", () => {
  let reason: string | null = "store unreachable";
  let server: RunningServer;
  beforeAll(async () => {
    server = await startTestServer({ readiness: async () => reason });
  });
  afterAll(() => server.close());

  it("/healthz answers 200 ok even when not ready; /readyz answers 503 with the reason", async () => {
    reason = "store unreachable";
    const live = await fetch(`${server.url}/healthz`);
    expect(live.status).toBe(200);
    expect(await live.text()).toBe("ok\n");
    const ready = await fetch(`${server.url}/readyz`);
    expect(ready.status).toBe(503);
    expect(await ready.text()).toContain("store unreachable");
  });

  it("grpc.health Check follows readiness", async () => {
    const health = createClient(Health, createGrpcTransport({ baseUrl: server.url }));
    reason = "store unreachable";
    expect((await health.check({ service: "" })).status).toBe(Status.NOT_SERVING);
    expect((await health.check({ service: "outpost.telemetry.v1.LogService" })).status).toBe(Status.NOT_SERVING);
    reason = null;
    expect((await health.check({ service: "" })).status).toBe(Status.SERVING);
    expect((await fetch(`${server.url}/readyz`)).status).toBe(200);
    expect((await errorOf(health.check({ service: "no.such.Service" }))).code).toBe(Code.NotFound);
  });

  it("a readiness check that throws counts as not ready", async () => {
    const throwing = await startTestServer({
      readiness: async () => {
        throw new Error("redis down");
      },
    });
    try {
      const ready = await fetch(`${throwing.url}/readyz`);
      expect(ready.status).toBe(503);
      expect(await ready.text()).toContain("redis down");
    } finally {
      await throwing.close();
    }
  });
});

describe("caller identity", () => {
  let server: RunningServer;
  beforeAll(async () => {
    server = await startTestServer({ signingKeys: keysOf("telemetry") });
  });
  afterAll(() => server.close());

  it("refuses a call without identity, over gRPC and Connect", async () => {
    const grpcErr = await errorOf(createClient(LogService, createGrpcTransport({ baseUrl: server.url })).getLogs({ dispatchId: "x" }));
    expect(grpcErr.code).toBe(Code.Unauthenticated);
    expect(errorInfoOf(grpcErr)?.reason).toBe("IDENTITY_MISSING");
    const res = await postJson(server.url, "GetLogs", { dispatchId: "x" });
    expect(res.status).toBe(401);
  });

  it("refuses a unary call without identity on its headers, before (and without) reading its body", async () => {
    // Declares a 1 MiB message, sends 100 bytes of it and never finishes.
    const answer = await h2Exchange(
      server.url,
      { ":path": "/outpost.telemetry.v1.LogService/GetLogs", "content-type": "application/grpc", te: "trailers" },
      envelope(0, Buffer.alloc(100), 1024 * 1024),
      { end: false, timeoutMs: 3000 },
    );
    expect(answer).not.toBe("no answer");
    if (answer === "no answer") return;
    expect(answer.trailers["grpc-status"] ?? answer.head["grpc-status"]).toBe(String(Code.Unauthenticated));
  });

  it("counts a refusal on the headers in the RPC metrics like any other answer", async () => {
    const unauthenticated = async () => {
      const line = (await metricsText()).body.split("\n").find((l) => l.startsWith('outpost_rpc_requests_total{method="outpost.telemetry.v1.LogService/GetLogs",code="unauthenticated",'));
      return Number(line?.split(" ").at(-1) ?? 0);
    };
    const before = await unauthenticated();
    const client = createClient(LogService, createGrpcTransport({ baseUrl: server.url }));
    for (let i = 0; i < 3; i++) expect((await errorOf(client.getLogs({ dispatchId: "x" }))).code).toBe(Code.Unauthenticated);
    expect(await unauthenticated()).toBe(before + 3);
  });

  it("refuses an identity signed with a key it does not trust", async () => {
    const client = internalClient(LogService, {
      baseUrl: server.url,
      signingKeys: signingKeysOf(generateSigningKeySet(), "dispatcher"),
      identity: { kind: "service", principal: "dispatcher/1" },
    });
    const err = await errorOf(client.getLogs({ dispatchId: "x" }));
    expect(err.code).toBe(Code.Unauthenticated);
    expect(errorInfoOf(err)?.reason).toBe("IDENTITY_FORGED");
  });

  it("accepts a signed call and always allows health", async () => {
    const client = internalClient(LogService, { baseUrl: server.url, signingKeys: keysOf("dispatcher"), identity: { kind: "service", principal: "dispatcher/1" } });
    expect((await client.getLogs({ dispatchId: "signed" })).chunks[0]?.text).toBe("signed");
    const health = createClient(Health, createGrpcTransport({ baseUrl: server.url }));
    expect((await health.check({ service: "" })).status).toBe(Status.SERVING);
  });
});

describe("message size limit", () => {
  let server: RunningServer;
  beforeAll(async () => {
    server = await startTestServer({ readMaxBytes: 1024 });
  });
  afterAll(() => server.close());

  it("refuses an oversize message with RESOURCE_EXHAUSTED and keeps serving", async () => {
    const big = "x".repeat(4096);
    const grpc = createClient(LogService, createGrpcTransport({ baseUrl: server.url }));
    expect((await errorOf(grpc.getLogs({ dispatchId: big }))).code).toBe(Code.ResourceExhausted);
    const connect = createClient(LogService, createConnectTransport({ baseUrl: server.url, httpVersion: "1.1" }));
    expect((await errorOf(connect.getLogs({ dispatchId: big }))).code).toBe(Code.ResourceExhausted);
    const res = await postJson(server.url, "GetLogs", { dispatchId: big });
    expect(((await res.json()) as { code: string }).code).toBe("resource_exhausted");
    expect((await grpc.getLogs({ dispatchId: "small" })).chunks[0]?.text).toBe("small");
    expect((await connect.getLogs({ dispatchId: "small" })).chunks[0]?.text).toBe("small");
  });
});

describe("a request body that never ends, on the connect-node path (gRPC-Web, streams)", () => {
  let server: RunningServer;
  beforeAll(async () => {
    server = await startTestServer();
  });
  afterAll(() => server.close());

  /** Writes part of a body and never ends it; resolves the status once the server closed the stream. */
  async function unended(path: string, headers: Record<string, string>, body: Buffer) {
    const answer = await h2Exchange(server.url, { ":path": `/outpost.telemetry.v1.LogService/${path}`, ...headers }, body, { end: false });
    if (answer === "no answer") return answer;
    const text = answer.body.toString("latin1");
    const grpcStatus = answer.trailers["grpc-status"] ?? answer.head["grpc-status"] ?? /grpc-status: (\d+)/.exec(text)?.[1];
    return { grpcStatus: grpcStatus as string | undefined, body: text, ms: answer.ms };
  }

  const partial = Buffer.from([0, 0, 0, 0, 20, 0x0a]); // an envelope promising 20 bytes, 1 sent

  it("answers DEADLINE_EXCEEDED at the deadline and closes the stream", async () => {
    const web = await unended("GetLogs", { "content-type": "application/grpc-web+proto", "grpc-timeout": "200m" }, partial);
    const stream = await unended("SubscribeLogs", { "content-type": "application/grpc", te: "trailers", "grpc-timeout": "200m" }, partial);
    const connectStream = await unended("SubscribeLogs", { "content-type": "application/connect+proto", "connect-timeout-ms": "200" }, partial);
    expect(web !== "no answer" && web.grpcStatus).toBe(String(Code.DeadlineExceeded));
    expect(stream !== "no answer" && stream.grpcStatus).toBe(String(Code.DeadlineExceeded));
    expect(connectStream !== "no answer" && connectStream.body).toContain('"code":"deadline_exceeded"');
    for (const answer of [web, stream, connectStream]) expect(answer !== "no answer" && answer.ms).toBeLessThan(2000);
  });
});

describe("JSON that is not UTF-8, on the connect-node path (gRPC-Web, streams)", () => {
  let server: RunningServer;
  beforeAll(async () => {
    server = await startTestServer();
  });
  afterAll(() => server.close());

  it("answers INVALID_ARGUMENT instead of reading U+FFFD in place of the bytes", async () => {
    // {"dispatchId":"ab<ff fe>cd"}: a lenient decoder would hand the handler "ab\uFFFD\uFFFDcd".
    const invalid = envelope(0, Buffer.concat([Buffer.from('{"dispatchId":"ab'), Buffer.from([0xff, 0xfe]), Buffer.from('cd"}')]));
    const cases: [string, string, Record<string, string>][] = [
      ["gRPC-Web unary", "GetLogs", { "content-type": "application/grpc-web+json" }],
      ["gRPC-Web stream", "SubscribeLogs", { "content-type": "application/grpc-web+json" }],
      ["gRPC stream", "SubscribeLogs", { "content-type": "application/grpc+json", te: "trailers" }],
      ["Connect stream", "SubscribeLogs", { "content-type": "application/connect+json" }],
    ];
    const got: Record<string, string> = {};
    for (const [name, method, headers] of cases) {
      const answer = await h2Exchange(server.url, { ":path": `/outpost.telemetry.v1.LogService/${method}`, ...headers }, invalid, { timeoutMs: 3000 });
      const error = answer === "no answer" ? undefined : answerError(answer, headers["content-type"]!);
      got[name] = error ? `${Code[error.code]} ${/utf-8/i.test(error.rawMessage)}` : String(answer === "no answer" ? answer : "OK");
    }
    expect(got).toEqual(Object.fromEntries(cases.map(([name]) => [name, "InvalidArgument true"])));
    // Valid UTF-8 beyond ASCII is read as before.
    const valid = await h2Exchange(server.url, { ":path": "/outpost.telemetry.v1.LogService/GetLogs", "content-type": "application/grpc-web+json" }, envelope(0, JSON.stringify({ dispatchId: "ab\u00e9cd" })));
    expect(valid !== "no answer" && answerError(valid, "application/grpc-web+json")).toBeUndefined();
    expect(valid !== "no answer" && JSON.parse(envelopesOf(valid.body)[0]!.message.toString()).chunks[0].text).toBe("ab\u00e9cd");
  });
});

describe("connections that say nothing", () => {
  function connect(port: number): Promise<net.Socket> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(port, "127.0.0.1", () => resolve(socket));
      socket.once("error", reject);
    });
  }
  const closed = (socket: net.Socket) => new Promise<number>((resolve) => socket.once("close", () => resolve(Date.now())));

  it("are closed after the first-bytes deadline; one that speaks in time is served", async () => {
    const server = await startTestServer({ firstBytesTimeoutMs: 300 });
    try {
      const opened = Date.now();
      const quiet = await connect(server.port);
      const quietClosed = closed(quiet);
      const talker = await connect(server.port);
      let answer = "";
      talker.on("data", (chunk: Buffer) => (answer += chunk.toString()));
      talker.write("GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n");
      expect((await quietClosed) - opened).toBeGreaterThanOrEqual(250);
      await sleep(400); // past the deadline: the talker's connection is the HTTP server's now
      expect(answer).toMatch(/^HTTP\/1\.1 200/);
      expect(talker.destroyed).toBe(false);
      talker.write("GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n");
      await sleep(100);
      expect(answer.match(/HTTP\/1\.1 200/g)).toHaveLength(2);
      talker.destroy();
    } finally {
      await server.close();
    }
  });

  it("a connection that sends only part of the HTTP/2 preface is closed at the deadline too", async () => {
    const server = await startTestServer({ firstBytesTimeoutMs: 300 });
    try {
      for (const start of ["P", "PRI * HTTP/2.0\r\n"]) {
        const opened = Date.now();
        const socket = await connect(server.port);
        const socketClosed = closed(socket);
        socket.write(start);
        const outcome = await Promise.race([socketClosed, sleep(3000).then(() => "still open")]);
        expect(outcome, start).not.toBe("still open");
        expect((outcome as number) - opened).toBeGreaterThanOrEqual(250);
      }
    } finally {
      await server.close();
    }
  });

  it("are closed at shutdown", async () => {
    const server = await startTestServer({ firstBytesTimeoutMs: 60_000 });
    const quiet = await connect(server.port);
    const quietClosed = closed(quiet);
    await server.close();
    await expect(Promise.race([quietClosed, sleep(1000).then(() => "still open")])).resolves.not.toBe("still open");
  });
});

describe("connections that stall after they spoke", () => {
  it("an HTTP/1.1 request whose headers never finish is answered 408 and closed at the headers deadline", async () => {
    const server = await startTestServer({ headersTimeoutMs: 400 });
    try {
      const socket = net.connect(server.port, "127.0.0.1");
      let answer = "";
      socket.on("data", (chunk: Buffer) => (answer += chunk.toString()));
      socket.write("POST /x HTTP/1.1\r\nHost: x\r\nX-A: ");
      const outcome = await Promise.race([new Promise((resolve) => socket.once("close", () => resolve("closed"))), sleep(5000).then(() => "still open")]);
      expect(outcome).toBe("closed");
      expect(answer).toMatch(/^HTTP\/1\.1 408/);
    } finally {
      await server.close();
    }
  });

  it("an HTTP/2 connection with no call open that stays silent is closed (GOAWAY); one with a call open is not", async () => {
    const server = await startTestServer({ idleSessionTimeoutMs: 300 });
    try {
      const idle = http2.connect(server.url);
      idle.on("error", () => {});
      const idleGone = new Promise((resolve) => idle.once("goaway", () => resolve("goaway")));
      const busy = http2.connect(server.url);
      busy.on("error", () => {});
      let busyGoaway = false;
      busy.once("goaway", () => (busyGoaway = true));
      // A server stream that sends its first message and then waits, silent, until cancelled.
      const stream = busy.request({ ":method": "POST", ":path": "/outpost.telemetry.v1.LogService/SubscribeLogs", "content-type": "application/grpc" });
      stream.on("error", () => {});
      stream.end(envelope(0, Buffer.from([0x0a, 0x01, 0x73])));
      expect(await Promise.race([idleGone, sleep(3000).then(() => "still open")])).toBe("goaway");
      await sleep(700);
      expect(busyGoaway).toBe(false);
      stream.close();
      idle.destroy();
      busy.destroy();
    } finally {
      await server.close();
    }
  });
});

describe("idle HTTP/2 connections", () => {
  const idleWithin = (session: http2.ClientHttp2Session, ms: number) =>
    Promise.race([new Promise((resolve) => session.once("goaway", () => resolve("goaway"))), sleep(ms).then(() => "still open")]);

  it("a connection goes idle again once a call that outlived the idle timeout ends, and is closed then", async () => {
    const server = await startTestServer({ idleSessionTimeoutMs: 200 });
    try {
      const session = http2.connect(server.url);
      session.on("error", () => {});
      // The idle timer fires (at 200 ms) while this 300 ms call is open: not closed then.
      const slow = h2Call(session, { ":path": "/outpost.telemetry.v1.LogService/GetLogs", "content-type": "application/json" }, Buffer.from('{"dispatchId":"slow"}'));
      const answer = await slow.answer;
      expect(answer !== "no answer" && answer.body.toString()).toContain('"slow"');
      // Silence after it: closed at the timeout, not kept for ever.
      expect(await idleWithin(session, 2000)).toBe("goaway");
      session.destroy();
    } finally {
      await server.close();
    }
  });

  it("pings from the client keep an idle connection open; when they stop it is closed", async () => {
    const server = await startTestServer({ idleSessionTimeoutMs: 300 });
    try {
      const session = http2.connect(server.url);
      session.on("error", () => {});
      await new Promise((resolve) => session.once("connect", resolve));
      const pinging = setInterval(() => session.ping(() => {}), 100);
      const whilePinging = await idleWithin(session, 1000);
      clearInterval(pinging);
      expect(whilePinging).toBe("still open");
      expect(await idleWithin(session, 2000)).toBe("goaway");
      session.destroy();
    } finally {
      await server.close();
    }
  });
});

describe("graceful close", () => {
  it("finishes in-flight unary calls, refuses new connections", async () => {
    const server = await startTestServer({ shutdownGraceMs: 5000 });
    const grpc = createClient(LogService, createGrpcTransport({ baseUrl: server.url }));
    const connect = createClient(LogService, createConnectTransport({ baseUrl: server.url, httpVersion: "1.1" }));
    const slowGrpc = grpc.getLogs({ dispatchId: "slow" });
    const slowConnect = connect.getLogs({ dispatchId: "slow" });
    const slowFetch = postJson(server.url, "GetLogs", { dispatchId: "slow" }).then(async (r) => ({ status: r.status, body: await r.text() }));
    await sleep(100);
    const closing = server.close();
    await sleep(20);
    await expect(fetch(`${server.url}/healthz`)).rejects.toThrow();
    expect((await slowGrpc).chunks[0]?.text).toBe("slow");
    expect((await slowConnect).chunks[0]?.text).toBe("slow");
    const fetched = await slowFetch;
    expect(fetched.status).toBe(200);
    expect(fetched.body).toContain('"slow"');
    await closing;
  });

  it("sends GOAWAY at once: a call started on an open connection after close() began is refused, the one in flight finishes", async () => {
    const server = await startTestServer({ shutdownGraceMs: 5000 });
    const session = http2.connect(server.url);
    session.on("error", () => {});
    const getLogs = (dispatchId: string) =>
      h2Call(session, { ":path": "/outpost.telemetry.v1.LogService/GetLogs", "content-type": "application/json" }, Buffer.from(JSON.stringify({ dispatchId })));
    const slow = getLogs("slow");
    await sleep(100);
    const closing = server.close();
    await sleep(50); // the slow call (300 ms) is still in flight
    const late = (() => {
      try {
        return getLogs("late").answer;
      } catch (err) {
        return Promise.resolve(String(err));
      }
    })();
    const lateAnswer = await late;
    expect(lateAnswer === "no answer" || typeof lateAnswer === "string" || Number(lateAnswer.head[":status"]) !== 200).toBe(true);
    const slowAnswer = await slow.answer;
    expect(slowAnswer !== "no answer" && slowAnswer.body.toString()).toContain('"slow"');
    await closing;
    session.destroy();
  });

  it("answers an HTTP/1.1 request whose headers were still arriving when close() began", async () => {
    const server = await startTestServer({ shutdownGraceMs: 5000 });
    const { socket, answered } = await rawHttp1(server.port);
    socket.write("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    await sleep(100);
    const closing = server.close();
    await sleep(50);
    socket.write("\r\n");
    const answer = await answered;
    expect(answer).toMatch(/^HTTP\/1\.1 200/);
    expect(answer.toLowerCase()).toContain("connection: close");
    await closing;
  });

  it("waits for a unary call whose body was still arriving when close() began, and answers it", async () => {
    const server = await startTestServer({ shutdownGraceMs: 5000 });
    const { socket, answered } = await rawHttp1(server.port);
    const body = JSON.stringify({ dispatchId: "late-body" });
    socket.write(
      `POST /outpost.telemetry.v1.LogService/GetLogs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body.slice(0, 5)}`,
    );
    await sleep(100);
    const closing = server.close();
    // Longer than the 2 s the drain gives answers still being written: only a count of the call
    // from its headers keeps the server waiting for the rest of its body.
    await sleep(2500);
    socket.write(body.slice(5));
    const answer = await answered;
    expect(answer).toMatch(/^HTTP\/1\.1 200/);
    expect(answer).toContain('"late-body"');
    await closing;
  });

  it("closes an idle HTTP/1.1 keep-alive connection before close() resolves", async () => {
    const server = await startTestServer();
    const socket = net.connect(server.port, "127.0.0.1");
    await new Promise((resolve) => socket.once("connect", resolve));
    socket.write("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    await new Promise((resolve) => socket.once("data", resolve));
    const socketClosed = new Promise((resolve) => socket.once("close", () => resolve("closed")));
    await server.close();
    expect(await Promise.race([socketClosed, sleep(500).then(() => "still open")])).toBe("closed");
  });

  it("ends a stream waiting on callEndSignal cleanly when close() is called", async () => {
    const server = await startTestServer({ shutdownGraceMs: 10_000 });
    for (const transport of [createGrpcTransport({ baseUrl: server.url })]) {
      const client = createClient(LogService, transport);
      const seen: string[] = [];
      let closing: Promise<void> | undefined;
      const startedAt = performance.now();
      for await (const msg of client.subscribeLogs({ dispatchId: "s" })) {
        seen.push(msg.chunks[0]!.text);
        closing = server.close();
      }
      expect(seen).toEqual(["first"]);
      await closing;
      // The stream ended on the drain signal, not after the grace period.
      expect(performance.now() - startedAt).toBeLessThan(3000);
    }
  });

  it("ends a Connect HTTP/1.1 stream cleanly too", async () => {
    const server = await startTestServer({ shutdownGraceMs: 10_000 });
    const client = createClient(LogService, createConnectTransport({ baseUrl: server.url, httpVersion: "1.1" }));
    const seen: string[] = [];
    let closing: Promise<void> | undefined;
    for await (const msg of client.subscribeLogs({ dispatchId: "s" })) {
      seen.push(msg.chunks[0]!.text);
      closing = server.close();
    }
    expect(seen).toEqual(["first"]);
    await closing;
  });

  it("a grpc.health Watch stream does not hold shutdown for the grace period", async () => {
    const server = await startTestServer({ shutdownGraceMs: 10_000 });
    const health = createClient(Health, createGrpcTransport({ baseUrl: server.url }));
    const statuses: Status[] = [];
    const watching = (async () => {
      try {
        for await (const res of health.watch({ service: "" })) statuses.push(res.status);
      } catch {
        // The connection may close under the stream; what matters is how long close() takes.
      }
    })();
    await sleep(100);
    expect(statuses).toEqual([Status.SERVING]);
    const startedAt = performance.now();
    await server.close();
    expect(performance.now() - startedAt).toBeLessThan(3000);
    await watching;
    // Watchers learn that the server went away before their stream ends.
    expect(statuses).toEqual([Status.SERVING, Status.NOT_SERVING]);
  });
});

describe("HTTP below the RPC: header blocks and pipelining", () => {
  /** Sends one raw HTTP/1.1 write and resolves what came back once the server closed the connection (or after `ms`). */
  function rawH1(port: number, text: string, ms = 5000): Promise<{ text: string; closed: boolean }> {
    return new Promise((resolve) => {
      const socket = net.connect(port, "127.0.0.1");
      let answer = "";
      socket.on("data", (chunk: Buffer) => (answer += chunk.toString("latin1")));
      socket.on("error", () => {});
      const timer = setTimeout(() => (socket.destroy(), resolve({ text: answer, closed: false })), ms);
      socket.on("close", () => (clearTimeout(timer), resolve({ text: answer, closed: true })));
      socket.write(text);
    });
  }

  it("takes the same header block over HTTP/2 as over HTTP/1.1 (16 KiB): a larger one is refused on both, and HTTP/2 advertises it", async () => {
    const server = await startServer({ name: "test", host: "127.0.0.1", port: 0, logger: silentLogger, routes: fakeLogRoutes, signingKeys: undefined });
    const session = http2.connect(server.url, { maxSendHeaderBlockLength: 1 << 20 });
    session.on("error", () => {});
    try {
      const call = (size: number) =>
        h2Call(session, { ":path": "/outpost.telemetry.v1.LogService/GetLogs", "content-type": "application/json", "x-padding": "a".repeat(size) }, Buffer.from('{"dispatchId":"h"}'))
          .answer;
      const small = await call(8 * 1024);
      expect(small !== "no answer" && small.head[":status"]).toBe(200);
      expect(session.remoteSettings.maxHeaderListSize).toBe(http.maxHeaderSize);
      // Before: HTTP/2 took 64 KiB of headers where HTTP/1.1 answered 431.
      const big = await call(20 * 1024);
      expect(big !== "no answer" && big.head[":status"]).toBeUndefined(); // reset (ENHANCE_YOUR_CALM), no answer
      const after = await call(10);
      expect(after !== "no answer" && after.head[":status"]).toBe(200); // the connection still serves
      const h1 = await rawH1(server.port, `POST /outpost.telemetry.v1.LogService/GetLogs HTTP/1.1\r\nHost: x\r\nX-Padding: ${"a".repeat(20 * 1024)}\r\n\r\n`);
      expect(h1.text).toMatch(/^HTTP\/1\.1 431/);
    } finally {
      session.destroy();
      await server.close();
    }
  });

  it("serves at most maxStreamsPerConnection pipelined HTTP/1.1 requests at once: the next is answered 503 and the connection closed", async () => {
    const server = await startServer({
      name: "test",
      host: "127.0.0.1",
      port: 0,
      logger: silentLogger,
      routes: fakeLogRoutes,
      signingKeys: undefined,
      maxStreamsPerConnection: 2,
    });
    try {
      const body = '{"dispatchId":"slow"}';
      const request = `POST /outpost.telemetry.v1.LogService/GetLogs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`;
      // Before: all 6 were served at once (Node queues only the answers), whatever the limit.
      const answer = await rawH1(server.port, request.repeat(6));
      const statuses = [...answer.text.matchAll(/HTTP\/1\.1 (\d{3})/g)].map((m) => Number(m[1]));
      expect(statuses).toEqual([200, 200, 503]);
      expect(answer.text).toMatch(/503 Service Unavailable\r\n[^]*connection: close/i);
      expect(answer.closed).toBe(true);
      // One at a time is fine, on a new connection.
      const single = await rawH1(server.port, request, 1500);
      expect(single.text).toMatch(/^HTTP\/1\.1 200/);
    } finally {
      await server.close();
    }
  });
});

/** A raw HTTP/1.1 connection to the server; `answered` resolves with all it got once it closes. */
async function rawHttp1(port: number): Promise<{ socket: net.Socket; answered: Promise<string> }> {
  const socket = net.connect(port, "127.0.0.1");
  await new Promise((resolve) => socket.once("connect", resolve));
  let answer = "";
  socket.on("data", (chunk: Buffer) => (answer += chunk.toString()));
  const answered = new Promise<string>((resolve) => socket.once("close", () => resolve(answer)));
  return { socket, answered };
}
