import { createHash } from "node:crypto";
import http2 from "node:http2";
import net from "node:net";
import { gzipSync } from "node:zlib";
import { fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { ErrorInfoSchema } from "@outpost/proto/google/rpc/error_details_pb.js";
import { loadConfig } from "@outpost/platform";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { create } from "@bufbuild/protobuf";
import { ServerReflectionRequestSchema } from "@outpost/proto/grpc/reflection/v1/reflection_pb.js";
import { DispatchService } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { LogService } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { Authenticator } from "../src/core/authenticator.ts";
import { corsAnswer, corsPolicyOf } from "../src/core/cors.ts";
import { methodClassOf } from "../src/core/method-class.ts";
import { RateLimitPolicy, parseAllowList, tightest, type RateDecision } from "../src/core/rate-limit.ts";
import { ReflectionIndex } from "../src/core/reflection.ts";
import { MemoryRateCounter } from "../src/store/rate-counter.ts";
import { gatewayConfigShape } from "../src/config.ts";
import { startGateway } from "../src/service.ts";
import { envelope } from "../../test/support/envelopes.ts";
import { answerError, h2Exchange } from "../../test/support/h2.ts";
import { signingEnv } from "../../test/support/signing.ts";

describe("methodClassOf", () => {
  it("classifies by verb", () => {
    expect(["CreateDispatch", "PutSecret", "RegisterAgent", "CreateApiKey"].map(methodClassOf)).toEqual(["create", "create", "create", "create"]);
    expect(["GetDispatch", "ListDispatches", "WatchDispatch", "SubscribeLogs"].map(methodClassOf)).toEqual(["read", "read", "read", "read"]);
    expect(["CancelDispatch", "RevokeApiKey", "SuspendTenant", "DeleteSecret", "UpdateTenant"].map(methodClassOf)).toEqual(Array(5).fill("trigger"));
  });
});

describe("CORS", () => {
  const policy = corsPolicyOf("https://a.example, https://b.example/");
  it("answers an allowed preflight with the protocol headers and refuses others", () => {
    const ok = corsAnswer(policy, "OPTIONS", "https://b.example", "POST");
    expect(ok.kind).toBe("preflight");
    if (ok.kind !== "preflight") return;
    expect(ok.status).toBe(204);
    expect(ok.headers["Access-Control-Allow-Origin"]).toBe("https://b.example");
    expect(ok.headers["Access-Control-Allow-Headers"]).toContain("Connect-Protocol-Version");
    expect(ok.headers["Vary"]).toBe("Origin");
    const no = corsAnswer(policy, "OPTIONS", "https://c.example", "POST");
    expect(no.kind === "preflight" && no.status).toBe(403);
    expect(no.kind === "preflight" && no.headers["Access-Control-Allow-Origin"]).toBeUndefined();
  });
  it("exposes status and rate-limit headers on calls; nothing without an Origin; * allows any", () => {
    const call = corsAnswer(policy, "POST", "https://a.example", undefined);
    expect(call.kind === "call" && call.headers["Access-Control-Expose-Headers"]).toContain("RateLimit-Remaining");
    expect(corsAnswer(policy, "POST", undefined, undefined).kind).toBe("none");
    const any = corsAnswer(corsPolicyOf("*"), "POST", "https://z.example", undefined);
    expect(any.kind === "call" && any.headers["Access-Control-Allow-Origin"]).toBe("*");
  });
});

describe("RateLimitPolicy", () => {
  const limits = { create: 2, trigger: 3, read: 4 };
  it("counts per tenant and class, with the tier's limit when sent", async () => {
    const policy = new RateLimitPolicy({ counter: new MemoryRateCounter(), defaults: limits, perIp: { create: 100, trigger: 100, read: 100 }, allow: [] });
    const results = [];
    for (let i = 0; i < 3; i++) results.push(await policy.checkTenant("10.0.0.1", "T1", "create"));
    expect(results.map((r) => r!.allowed)).toEqual([true, true, false]);
    expect(results[2]!.limit).toBe(2);
    expect(results[2]!.msBeforeReset).toBeGreaterThan(0);
    expect((await policy.checkTenant("10.0.0.1", "T2", "create"))!.allowed).toBe(true); // another tenant
    expect((await policy.checkTenant("10.0.0.1", "T1", "read"))!.allowed).toBe(true); // another class
    const tier = await policy.checkTenant("10.0.0.1", "T3", "create", { create: 50 });
    expect(tier!.limit).toBe(50);
    expect(tier!.remaining).toBe(49);
  });
  it("skips allow-listed callers (v4-mapped addresses too) and rejects bad entries", async () => {
    const policy = new RateLimitPolicy({ counter: new MemoryRateCounter(), defaults: limits, perIp: limits, allow: ["10.1.0.0/16", "::1"] });
    expect(await policy.checkIp("::ffff:10.1.2.3", "create")).toBeUndefined();
    expect(await policy.checkIp("::1", "create")).toBeUndefined();
    expect(await policy.checkIp("10.2.0.1", "create")).toBeDefined();
    expect(() => parseAllowList(["10.0.0.0/33"])).toThrow(/CIDR/);
    expect(() => parseAllowList(["nope"])).toThrow(/nope/);
  });
  it("reports the refusal, else the budget with the fewest calls left", () => {
    const d = (allowed: boolean, remaining: number, subject: "ip" | "tenant"): RateDecision => ({ allowed, remaining, subject, limit: 10, msBeforeReset: 1, methodClass: "read" });
    expect(tightest(d(true, 5, "ip"), d(true, 2, "tenant"))!.subject).toBe("tenant");
    expect(tightest(d(false, 0, "ip"), d(true, 0, "tenant"))!.subject).toBe("ip");
    expect(tightest(undefined, undefined)).toBeUndefined();
  });
});

describe("ReflectionIndex", () => {
  const index = new ReflectionIndex([DispatchService, LogService]);
  it("lists services and finds files by symbol (service, method, nested message) with imports", () => {
    expect(index.listServices()).toEqual(["outpost.dispatch.v1.DispatchService", "outpost.telemetry.v1.LogService"]);
    for (const symbol of ["outpost.dispatch.v1.DispatchService", "outpost.dispatch.v1.DispatchService.GetDispatch", ".outpost.dispatch.v1.GetDispatchRequest"]) {
      const files = index.fileContainingSymbol(symbol)!.map((b) => fromBinary(FileDescriptorProtoSchema, b).name);
      expect(files[0]).toBe("outpost/dispatch/v1/dispatch_service.proto");
      expect(new Set(files).size).toBe(files.length);
    }
    expect(fromBinary(FileDescriptorProtoSchema, index.fileContainingSymbol("outpost.dispatch.v1.Dispatch.State")![0]!).name).toBe("outpost/dispatch/v1/dispatch.proto");
    expect(index.fileContainingSymbol("outpost.nope.Missing")).toBeUndefined();
  });
  it("answers errors in-band", () => {
    const res = index.answer(create(ServerReflectionRequestSchema, { messageRequest: { case: "fileByFilename", value: "nope.proto" } }));
    expect(res.messageResponse.case).toBe("errorResponse");
    const none = index.answer(create(ServerReflectionRequestSchema, {}));
    expect(none.messageResponse.case === "errorResponse" && none.messageResponse.value.errorCode).toBe(3);
  });
});

describe("Authenticator invalidation", () => {
  const KEY = `otp_${"c3".repeat(32)}`;
  const headers = new Headers({ authorization: `Bearer ${KEY}` });
  const hash = createHash("sha256").update(KEY).digest("hex");
  const setup = () => {
    const lookup = vi.fn(async () => ({ tenantId: "T1", apiKeyId: "K1", rateLimits: { read: 7 } }));
    return { lookup, auth: new Authenticator({ adminToken: "a".repeat(40), cacheTtlMs: 60_000, lookup }) };
  };
  it("drops a key by its hash and a tenant's keys by tenant:<id>", async () => {
    const { auth, lookup } = setup();
    await auth.authenticate(headers);
    await auth.authenticate(headers);
    expect(lookup).toHaveBeenCalledTimes(1);
    expect(auth.rateLimitsOf("T1")).toEqual({ read: 7 });
    auth.invalidate(hash);
    expect(auth.cachedIdentity(headers)).toBeUndefined();
    await auth.authenticate(headers);
    expect(lookup).toHaveBeenCalledTimes(2);
    auth.invalidate("tenant:T1");
    expect(auth.cachedIdentity(headers)).toBeUndefined();
  });
  it("asks once for concurrent calls, and does not cache an answer that raced a revocation", async () => {
    const { auth, lookup } = setup();
    let release!: () => void;
    lookup.mockImplementationOnce(() => new Promise((resolve) => (release = () => resolve({ tenantId: "T1", apiKeyId: "K1", rateLimits: { read: 7 } }))));
    const calls = [auth.authenticate(headers), auth.authenticate(headers)];
    auth.invalidate(hash); // revoked while the tenant service was answering
    release();
    await Promise.all(calls);
    expect(lookup).toHaveBeenCalledTimes(1);
    expect(auth.cachedIdentity(headers)).toBeUndefined();
  });
});

/**
 * A gateway in this process on a real port, its upstreams nowhere (nothing here reaches them):
 * what a hostile client gets from the edge itself, over raw sockets.
 */
describe("the edge against a hostile client (real socket)", () => {
  const ADMIN = "a".repeat(40);
  let gateway: Awaited<ReturnType<typeof startGateway>>;
  let port: number;
  beforeAll(async () => {
    const config = loadConfig(gatewayConfigShape, {
      ...signingEnv("gateway"),
      OUTPOST_ADMIN_TOKEN: ADMIN,
      OUTPOST_GATEWAY_PORT: "0",
      OUTPOST_TENANT_URL: "http://127.0.0.1:9",
      OUTPOST_DISPATCHER_URL: "http://127.0.0.1:9",
      OUTPOST_TELEMETRY_URL: "http://127.0.0.1:9",
      OUTPOST_RATE_LIMIT: "off",
      OUTPOST_MAX_REQUEST_BYTES: "1024",
    });
    gateway = await startGateway(config, pino({ level: "silent" }));
    port = gateway.port;
  });
  afterAll(() => gateway?.close());

  const GET = "/outpost.dispatch.v1.DispatchService/GetDispatch";
  const SUBSCRIBE = "/outpost.telemetry.v1.LogService/SubscribeLogs";

  /**
   * One HTTP/2 request whose body is written but never ended; resolves the answer once the stream
   * has closed (the gateway must close it: the client never ends its side).
   */
  async function unendedH2(path: string, headers: Record<string, string>, body: Buffer) {
    const answer = await h2Exchange(`http://127.0.0.1:${port}`, { ":path": path, authorization: `Bearer ${ADMIN}`, ...headers }, body, { end: false });
    if (answer === "no answer") return answer;
    const grpcStatus = answer.trailers["grpc-status"] ?? answer.head["grpc-status"];
    return { grpcStatus: grpcStatus as string | undefined, status: Number(answer.head[":status"]), body: answer.body, ms: answer.ms };
  }

  /** Raw HTTP/1.1: writes `payload` and keeps the socket open; resolves what came back within 5 s. */
  function h1(payload: string) {
    return new Promise<{ text: string; ms: number }>((resolve) => {
      const started = Date.now();
      const socket = net.connect(port, "127.0.0.1");
      let text = "";
      const done = () => resolve({ text, ms: Date.now() - started });
      socket.on("data", (c) => (text += c.toString("latin1")));
      socket.on("close", done);
      socket.on("error", () => {});
      socket.write(payload);
      setTimeout(() => socket.destroy(), 5000).unref();
    });
  }

  const message = Buffer.from([0x0a, 0x1a, ...Buffer.from("01ARZ3NDEKTSV4RRFFQ69G5FAV")]);

  it("ends a raw-path call whose body never ends at the client's deadline (gRPC unary and stream, Connect unary and stream)", async () => {
    const grpc = { "content-type": "application/grpc", te: "trailers", "grpc-timeout": "300m" };
    for (const path of [GET, SUBSCRIBE]) {
      const answer = await unendedH2(path, grpc, envelope(0, message).subarray(0, 10));
      expect(answer, `gRPC ${path}`).not.toBe("no answer");
      if (answer === "no answer") return;
      expect(answer.grpcStatus, `gRPC ${path}`).toBe(String(Code.DeadlineExceeded));
      expect(answer.ms).toBeLessThan(2000);
    }
    const unary = await unendedH2(GET, { "content-type": "application/json", "connect-timeout-ms": "300" }, Buffer.from('{"dispatchId":'));
    expect(unary).not.toBe("no answer");
    if (unary === "no answer") return;
    expect(unary.status).toBe(504);
    expect(JSON.parse(unary.body.toString()).code).toBe("deadline_exceeded");
    const stream = await unendedH2(SUBSCRIBE, { "content-type": "application/connect+json", "connect-timeout-ms": "300" }, envelope(0, '{"dispatchId":', 100));
    expect(stream).not.toBe("no answer");
    if (stream === "no answer") return;
    expect(stream.body.toString()).toContain('"code":"deadline_exceeded"');
    // HTTP/1.1: the answer, and the connection closed (the rest of the body will not come).
    const h1Answer = await h1(
      `POST ${GET} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnect-Timeout-Ms: 300\r\nAuthorization: Bearer ${ADMIN}\r\nContent-Length: 100\r\n\r\n{"dispatchId":`,
    );
    expect(h1Answer.text).toMatch(/^HTTP\/1\.1 504 /);
    expect(h1Answer.text.toLowerCase()).toContain("connection: close");
    expect(h1Answer.ms).toBeLessThan(2000);
  });

  it("answers a compressed request that does not decompress with INVALID_ARGUMENT over every protocol", async () => {
    const gzipped = gzipSync(message);
    const cut = gzipped.subarray(0, gzipped.length - 6);
    const answers: Record<string, string> = {};
    const call = (path: string, headers: Record<string, string>, body: Buffer) =>
      fetch(`http://127.0.0.1:${port}${path}`, { method: "POST", headers: { authorization: `Bearer ${ADMIN}`, ...headers }, body, signal: AbortSignal.timeout(5000) });
    for (const path of [GET, SUBSCRIBE]) {
      // gRPC-Web: the status is in the trailer frame at the end of the body.
      const web = await call(path, { "content-type": "application/grpc-web+proto", "grpc-encoding": "gzip" }, envelope(1, cut));
      answers[`gRPC-Web ${path}`] = /grpc-status: (\d+)/.exec(Buffer.from(await web.arrayBuffer()).toString("latin1"))?.[1] ?? "none";
      // gRPC (HTTP/2): compressed calls take the Connect path.
      const session = http2.connect(`http://127.0.0.1:${port}`);
      answers[`gRPC ${path}`] = await new Promise<string>((resolve) => {
        const stream = session.request({ ":method": "POST", ":path": path, "content-type": "application/grpc", te: "trailers", "grpc-encoding": "gzip", authorization: `Bearer ${ADMIN}` });
        let status = "none";
        stream.on("response", (h) => (status = String(h["grpc-status"] ?? status)));
        stream.on("trailers", (t) => (status = String(t["grpc-status"])));
        stream.on("data", () => {});
        stream.on("close", () => resolve(status));
        stream.end(envelope(1, cut));
      });
      session.close();
    }
    const unary = await call(GET, { "content-type": "application/proto", "content-encoding": "gzip" }, cut);
    answers["Connect unary"] = String(unary.status);
    const stream = await call(SUBSCRIBE, { "content-type": "application/connect+proto", "connect-content-encoding": "gzip" }, envelope(1, cut));
    answers["Connect stream"] = /"code":"(\w+)"/.exec(Buffer.from(await stream.arrayBuffer()).toString("latin1"))?.[1] ?? "none";
    const invalid = String(Code.InvalidArgument);
    expect(answers).toEqual({
      [`gRPC-Web ${GET}`]: invalid,
      [`gRPC ${GET}`]: invalid,
      [`gRPC-Web ${SUBSCRIBE}`]: invalid,
      [`gRPC ${SUBSCRIBE}`]: invalid,
      "Connect unary": "400",
      "Connect stream": "invalid_argument",
    });
  });

  /**
   * One HTTP/2 call, its answer read as the client's protocol reads it: the error's code, and the
   * reason and field of its ErrorInfo ("none" without one).
   */
  async function h2Error(path: string, headers: Record<string, string>, body: Buffer): Promise<string> {
    const answer = await h2Exchange(`http://127.0.0.1:${port}`, { ":path": path, authorization: `Bearer ${ADMIN}`, ...headers }, body);
    if (answer === "no answer") throw new Error(`no answer from ${path}`);
    let error: ConnectError | undefined;
    try {
      error = answerError(answer, headers["content-type"]!);
    } catch {
      return `HTTP ${String(answer.head[":status"])} ${answer.body.toString("latin1")}`;
    }
    if (!error) return "OK";
    const info = error.findDetails(ErrorInfoSchema)[0];
    return `${Code[error.code]} ${info?.reason ?? "none"} ${info?.metadata["field"] ?? "none"}`;
  }

  it("answers every malformed request with INVALID_ARGUMENT and an ErrorInfo naming the header or the body, on every path", async () => {
    const grpc = { "content-type": "application/grpc", te: "trailers" };
    const grpcWeb = { "content-type": "application/grpc-web+proto" };
    const json = { "content-type": "application/json" };
    const proto = { "content-type": "application/proto" };
    const connectStream = { "content-type": "application/connect+proto" };
    const gzipped = gzipSync(message);
    const cutGzip = gzipped.subarray(0, gzipped.length - 6);
    const garbage = Buffer.from([0xff, 0xff, 0xff, 0xff, 0x0f]);
    const timeout = "MALFORMED_TIMEOUT";
    const frame = "MALFORMED_FRAME";
    const msg = "MALFORMED_MESSAGE";
    const compression = "MALFORMED_COMPRESSION";
    const body = "(request body)";
    // [what, path, headers, body, expected reason, expected field]; the path the call takes in brackets.
    const cases: [string, string, Record<string, string>, Buffer, string, string][] = [
      // the raw path (uncompressed gRPC, unary Connect, Connect streams)
      ["raw gRPC timeout", GET, { ...grpc, "grpc-timeout": "soon" }, envelope(0, message), timeout, "grpc-timeout"],
      ["raw gRPC stream timeout", SUBSCRIBE, { ...grpc, "grpc-timeout": "123456789m" }, envelope(0, message), timeout, "grpc-timeout"],
      ["raw Connect timeout", GET, { ...json, "connect-timeout-ms": "-5" }, Buffer.from("{}"), timeout, "connect-timeout-ms"],
      ["raw Connect stream timeout", SUBSCRIBE, { ...connectStream, "connect-timeout-ms": "x" }, envelope(0, message), timeout, "connect-timeout-ms"],
      ["raw gRPC truncated frame", GET, grpc, envelope(0, message, message.length + 10), frame, body],
      ["raw gRPC frame longer than declared", GET, grpc, envelope(0, message, message.length - 3), frame, body],
      ["raw Connect stream truncated frame", SUBSCRIBE, connectStream, envelope(0, message, message.length + 10), frame, body],
      ["raw gRPC garbage message", GET, grpc, envelope(0, garbage), msg, body],
      ["raw Connect bad JSON", GET, json, Buffer.from('{"dispatchId":'), msg, body],
      ["raw Connect garbage proto", GET, proto, garbage, msg, body],
      ["raw Connect stream garbage", SUBSCRIBE, connectStream, envelope(0, garbage), msg, body],
      ["raw gRPC compressed flag without encoding", GET, grpc, envelope(1, message), compression, body],
      ["raw gRPC unknown flag", SUBSCRIBE, grpc, envelope(4, message), compression, body],
      ["raw Connect stream compressed flag", SUBSCRIBE, connectStream, envelope(1, message), compression, body],
      // the platform's lean unary path (compressed unary gRPC and Connect)
      ["lean gRPC timeout", GET, { ...grpc, "grpc-encoding": "gzip", "grpc-timeout": "1x" }, envelope(1, gzipped), timeout, "grpc-timeout"],
      ["lean Connect timeout", GET, { ...proto, "content-encoding": "gzip", "connect-timeout-ms": "soon" }, gzipped, timeout, "connect-timeout-ms"],
      ["lean gRPC truncated frame", GET, { ...grpc, "grpc-encoding": "gzip" }, envelope(1, gzipped, gzipped.length + 10), frame, body],
      ["lean gRPC cut gzip", GET, { ...grpc, "grpc-encoding": "gzip" }, envelope(1, cutGzip), compression, body],
      ["lean gRPC unknown flag", GET, { ...grpc, "grpc-encoding": "gzip" }, envelope(6, gzipped), compression, body],
      ["lean gRPC garbage message", GET, { ...grpc, "grpc-encoding": "gzip" }, envelope(1, gzipSync(garbage)), msg, body],
      ["lean Connect garbage JSON", GET, { ...json, "content-encoding": "gzip" }, gzipSync('{"dispatchId":'), msg, body],
      ["lean Connect cut gzip", GET, { ...proto, "content-encoding": "gzip" }, cutGzip, compression, body],
      // connect-node (gRPC-Web; compressed streams)
      ["gRPC-Web timeout", GET, { ...grpcWeb, "grpc-timeout": "soon" }, envelope(0, message), timeout, "grpc-timeout"],
      ["gRPC-Web stream timeout", SUBSCRIBE, { ...grpcWeb, "grpc-timeout": "soon" }, envelope(0, message), timeout, "grpc-timeout"],
      ["gRPC-Web truncated frame", GET, grpcWeb, envelope(0, message, message.length + 10), frame, body],
      ["gRPC-Web stream truncated frame", SUBSCRIBE, grpcWeb, envelope(0, message, message.length + 10), frame, body],
      ["gRPC-Web garbage message", GET, grpcWeb, envelope(0, garbage), msg, body],
      ["gRPC-Web stream garbage message", SUBSCRIBE, grpcWeb, envelope(0, garbage), msg, body],
      ["gRPC-Web compressed flag without encoding", GET, grpcWeb, envelope(1, message), compression, body],
      ["gRPC-Web cut gzip", GET, { ...grpcWeb, "grpc-encoding": "gzip" }, envelope(1, cutGzip), compression, body],
      ["compressed gRPC stream timeout", SUBSCRIBE, { ...grpc, "grpc-encoding": "gzip", "grpc-timeout": "soon" }, envelope(1, gzipped), timeout, "grpc-timeout"],
      ["compressed gRPC stream truncated frame", SUBSCRIBE, { ...grpc, "grpc-encoding": "gzip" }, envelope(1, gzipped, gzipped.length + 10), frame, body],
      ["compressed gRPC stream cut gzip", SUBSCRIBE, { ...grpc, "grpc-encoding": "gzip" }, envelope(1, cutGzip), compression, body],
      ["compressed Connect stream timeout", SUBSCRIBE, { ...connectStream, "connect-content-encoding": "gzip", "connect-timeout-ms": "soon" }, envelope(1, gzipped), timeout, "connect-timeout-ms"],
      ["compressed Connect stream truncated frame", SUBSCRIBE, { ...connectStream, "connect-content-encoding": "gzip" }, envelope(1, gzipped, gzipped.length + 10), frame, body],
      ["compressed Connect stream cut gzip", SUBSCRIBE, { ...connectStream, "connect-content-encoding": "gzip" }, envelope(1, cutGzip), compression, body],
      ["compressed Connect stream garbage", SUBSCRIBE, { ...connectStream, "connect-content-encoding": "gzip" }, envelope(1, gzipSync(garbage)), msg, body],
    ];
    const got: Record<string, string> = {};
    const want: Record<string, string> = {};
    for (const [what, path, headers, bytes, reason, field] of cases) {
      got[what] = await h2Error(path, headers, bytes);
      want[what] = `InvalidArgument ${reason} ${field}`;
    }
    expect(got).toEqual(want);
  });

  it("refuses JSON that is not UTF-8 with INVALID_ARGUMENT and an ErrorInfo on every path, never passing it on", async () => {
    // {"dispatchId":"01AR<ff fe>..."}: a lenient decoder reads U+FFFD for the two bytes and the
    // call goes upstream (here nothing listens: UNAVAILABLE) with other text than was sent.
    const invalid = Buffer.concat([Buffer.from('{"dispatchId":"01AR'), Buffer.from([0xff, 0xfe]), Buffer.from('Z3NDEKTSV4RRFFQ69G5F"}')]);
    const refused = "InvalidArgument MALFORMED_MESSAGE (request body)";
    // [what, path, headers, body]; the path the call takes first.
    const cases: [string, string, Record<string, string>, Buffer][] = [
      ["raw Connect unary", GET, { "content-type": "application/json" }, invalid],
      ["raw Connect stream", SUBSCRIBE, { "content-type": "application/connect+json" }, envelope(0, invalid)],
      ["lean Connect unary (gzip)", GET, { "content-type": "application/json", "content-encoding": "gzip" }, gzipSync(invalid)],
      ["lean gRPC JSON unary", GET, { "content-type": "application/grpc+json", te: "trailers" }, envelope(0, invalid)],
      ["connect-node gRPC-Web JSON", GET, { "content-type": "application/grpc-web+json" }, envelope(0, invalid)],
      ["connect-node gRPC-Web JSON stream", SUBSCRIBE, { "content-type": "application/grpc-web+json" }, envelope(0, invalid)],
      ["connect-node compressed Connect stream", SUBSCRIBE, { "content-type": "application/connect+json", "connect-content-encoding": "gzip" }, envelope(1, gzipSync(invalid))],
    ];
    const got: Record<string, string> = {};
    for (const [what, path, headers, bytes] of cases) got[what] = await h2Error(path, headers, bytes);
    expect(got).toEqual(Object.fromEntries(cases.map(([what]) => [what, refused])));
    // Over HTTP/1.1 too, with the decoder's reason.
    const h1Answer = await fetch(`http://127.0.0.1:${port}${GET}`, {
      method: "POST",
      headers: { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" },
      body: invalid,
      signal: AbortSignal.timeout(5000),
    });
    expect(h1Answer.status).toBe(400);
    const answer = (await h1Answer.json()) as { code: string; message: string };
    expect(answer.code).toBe("invalid_argument");
    expect(answer.message).toMatch(/^\(request body\): request message could not be decoded: .*utf-8/i);
  });

  it("refuses a Connect call whose connect-protocol-version is not 1, on every path (INVALID_ARGUMENT with ErrorInfo)", async () => {
    const refused = "InvalidArgument UNSUPPORTED_PROTOCOL_VERSION connect-protocol-version";
    const v2 = { "connect-protocol-version": "2" };
    const answers = {
      unary: await h2Error(GET, { "content-type": "application/json", ...v2 }, Buffer.from(JSON.stringify({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }))),
      "compressed unary": await h2Error(GET, { "content-type": "application/proto", "content-encoding": "gzip", ...v2 }, gzipSync(message)),
      stream: await h2Error(SUBSCRIBE, { "content-type": "application/connect+proto", ...v2 }, envelope(0, message)),
      "compressed stream": await h2Error(SUBSCRIBE, { "content-type": "application/connect+proto", "connect-content-encoding": "gzip", ...v2 }, envelope(1, gzipSync(message))),
    };
    expect(answers).toEqual({ unary: refused, "compressed unary": refused, stream: refused, "compressed stream": refused });
    // Over HTTP/1.1 too.
    const h1Answer = await fetch(`http://127.0.0.1:${port}${GET}`, {
      method: "POST",
      headers: { authorization: `Bearer ${ADMIN}`, "content-type": "application/json", "connect-protocol-version": "0" },
      body: "{}",
      signal: AbortSignal.timeout(5000),
    });
    expect(h1Answer.status).toBe(400);
    expect(await h1Answer.text()).toContain("UNSUPPORTED_PROTOCOL_VERSION");
  });

  it("refuses a Connect body whose content-length is over the limit before reading it", async () => {
    const answer = await h1(
      `POST ${GET} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer ${ADMIN}\r\nContent-Length: 5000\r\n\r\n{"dispatchId":`,
    );
    expect(answer.text).toMatch(/^HTTP\/1\.1 429 /);
    expect(answer.text).toContain("resource_exhausted");
    expect(answer.ms).toBeLessThan(2000);
  });
});
