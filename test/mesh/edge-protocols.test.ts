/**
 * The edge over real sockets (issue #3, SPEC G1, G4, C4): CORS for browsers, gRPC server
 * reflection read by a real reflection client, a @grpc/grpc-js client on the unary and
 * streaming methods, the request size limit, deadlines reaching the services, and internal
 * errors masked with a trace id the operator finds in the gateway log.
 */
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import http2 from "node:http2";
import path from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import * as grpc from "@grpc/grpc-js";
import { create, createFileRegistry, fromBinary, toBinary, toJsonString, type DescMessage } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema, FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { connectNodeAdapter, createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import { errorInfoOf } from "@outpost/platform";
import { TEST_SIGNING_KEY_SET } from "../support/signing.ts";
import { ServerReflection, type ServerReflectionRequest, type ServerReflectionResponse } from "@outpost/proto/grpc/reflection/v1/reflection_pb.js";
import { ServerReflection as ServerReflectionV1Alpha } from "@outpost/proto/grpc/reflection/v1alpha/reflection_pb.js";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import {
  DispatchService,
  GetDispatchRequestSchema,
  GetDispatchResponseSchema,
  type GetDispatchResponse,
  WatchDispatchResponseSchema,
} from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { SubscribeLogsRequestSchema, SubscribeLogsResponseSchema, type SubscribeLogsResponse } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { startMesh, freePort, type Mesh } from "../../scripts/lib/mesh.ts";
import { startTestMesh, type TestMesh } from "./harness.ts";
import { envelope, envelopesOf } from "../support/envelopes.ts";

const ORIGIN = "https://console.example";
let t: TestMesh;
let tenant: Awaited<ReturnType<TestMesh["newTenant"]>>;

beforeAll(async () => {
  t = await startTestMesh({ serviceEnv: { gateway: { OUTPOST_CORS_ORIGINS: ORIGIN } } });
  tenant = await t.newTenant("Edge");
});

afterAll(async () => {
  await t?.mesh.stop();
});

async function failure(call: Promise<unknown> | (() => Promise<unknown>)): Promise<ConnectError> {
  try {
    await (typeof call === "function" ? call() : call);
  } catch (err) {
    return ConnectError.from(err);
  }
  throw new Error("expected the call to fail");
}

const traceIdPattern = /trace id ([0-9a-f]{32})/;

describe("CORS (G1)", () => {
  it("answers a browser preflight from an allowed origin with the protocol headers", async () => {
    const res = await fetch(`${t.mesh.urls.gateway}/outpost.dispatch.v1.DispatchService/GetDispatch`, {
      method: "OPTIONS",
      headers: {
        origin: ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type,connect-protocol-version,authorization,x-grpc-web",
      },
    });
    expect(res.status).toBe(204);
    expect(res.headers.get("access-control-allow-origin")).toBe(ORIGIN);
    const allowed = res.headers.get("access-control-allow-headers")!.toLowerCase().split(/,\s*/);
    for (const h of ["content-type", "connect-protocol-version", "connect-timeout-ms", "authorization", "x-api-key", "x-grpc-web", "grpc-timeout"]) {
      expect(allowed).toContain(h);
    }
    expect(res.headers.get("access-control-allow-methods")).toContain("POST");
  });

  it("refuses the preflight of an origin that is not configured", async () => {
    const res = await fetch(`${t.mesh.urls.gateway}/outpost.dispatch.v1.DispatchService/GetDispatch`, {
      method: "OPTIONS",
      headers: { origin: "https://evil.example", "access-control-request-method": "POST" },
    });
    expect(res.status).toBe(403);
    expect(res.headers.get("access-control-allow-origin")).toBeNull();
  });

  it("lets the browser read the status and rate-limit headers of a cross-origin call", async () => {
    const res = await fetch(`${t.mesh.urls.gateway}/outpost.dispatch.v1.DispatchService/GetDispatch`, {
      method: "POST",
      headers: { origin: ORIGIN, "content-type": "application/json", authorization: `Bearer ${tenant.apiKey}` },
      body: JSON.stringify({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }),
    });
    expect(res.status).toBe(404); // Connect maps NOT_FOUND to 404
    expect(((await res.json()) as { code: string }).code).toBe("not_found");
    expect(res.headers.get("access-control-allow-origin")).toBe(ORIGIN);
    const exposed = res.headers.get("access-control-expose-headers")!.toLowerCase();
    for (const h of ["grpc-status", "grpc-message", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "retry-after"]) expect(exposed).toContain(h);
  });
});

/** Runs one reflection stream: sends the requests, collects one answer per request. */
async function reflect(requests: Partial<ServerReflectionRequest>[], alpha = false): Promise<ServerReflectionResponse[]> {
  const transport = createGrpcTransport({ baseUrl: t.mesh.urls.gateway });
  const client = createClient(alpha ? ServerReflectionV1Alpha : ServerReflection, transport) as unknown as ReturnType<typeof createClient<typeof ServerReflection>>;
  async function* input() {
    for (const r of requests) yield r as ServerReflectionRequest;
  }
  const out: ServerReflectionResponse[] = [];
  for await (const res of client.serverReflectionInfo(input(), { timeoutMs: 10_000 })) out.push(res);
  return out;
}

describe("gRPC server reflection (G1)", () => {
  it("lists the public services and describes DispatchService with its imports, enough to call it", async () => {
    const [list, symbol, missing] = await reflect([
      { messageRequest: { case: "listServices", value: "" } },
      { messageRequest: { case: "fileContainingSymbol", value: "outpost.dispatch.v1.DispatchService" } },
      { messageRequest: { case: "fileContainingSymbol", value: "outpost.nothing.v1.Nope" } },
    ]);
    expect(list!.messageResponse.case).toBe("listServicesResponse");
    const names = list!.messageResponse.case === "listServicesResponse" ? list!.messageResponse.value.service.map((s) => s.name) : [];
    for (const name of [
      "outpost.dispatch.v1.DispatchService",
      "outpost.dispatch.v1.AgentService",
      "outpost.telemetry.v1.LogService",
      "outpost.tenant.v1.TenantService",
      "outpost.tenant.v1.ApiKeyService",
      "outpost.tenant.v1.SecretService",
      "grpc.reflection.v1.ServerReflection",
    ]) {
      expect(names).toContain(name);
    }
    // Internal services are not exposed at the edge, so reflection does not list them either.
    expect(names).not.toContain("outpost.executor.v1.LeaseService");
    expect(names).not.toContain("outpost.tenant.v1.TenantInternalService");

    expect(symbol!.messageResponse.case).toBe("fileDescriptorResponse");
    const bytes = symbol!.messageResponse.case === "fileDescriptorResponse" ? symbol!.messageResponse.value.fileDescriptorProto : [];
    const files = bytes.map((b) => fromBinary(FileDescriptorProtoSchema, b));
    expect(files[0]!.name).toBe("outpost/dispatch/v1/dispatch_service.proto");
    expect(files[0]!.service[0]!.method.map((m) => m.name)).toContain("GetDispatch");
    const fileNames = files.map((f) => f.name);
    expect(fileNames).toContain("outpost/dispatch/v1/dispatch.proto");
    expect(fileNames).toContain("google/protobuf/timestamp.proto");

    // What grpcurl does next: build the types from the descriptors alone and make the call.
    // Reflection sends files in any order; a registry wants imports first.
    const ordered: typeof files = [];
    while (ordered.length < files.length) {
      const next = files.find((f) => !ordered.includes(f) && f.dependency.every((d) => ordered.some((o) => o.name === d)));
      expect(next, "every import of the answer is in the answer").toBeDefined();
      ordered.push(next!);
    }
    const registry = createFileRegistry(create(FileDescriptorSetSchema, { file: ordered }));
    const service = registry.getService("outpost.dispatch.v1.DispatchService")!;
    expect(service.methods.map((m) => m.name)).toContain("WatchDispatch");
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "reflected" });
    const dynamic = createClient(service, createGrpcTransport({ baseUrl: t.mesh.urls.gateway })) as unknown as Record<
      string,
      (req: unknown, o: unknown) => Promise<{ dispatch?: { id: string } }>
    >;
    const got = await dynamic["getDispatch"]!({ dispatchId: dispatch!.id }, { headers: { authorization: `Bearer ${tenant.apiKey}` } });
    expect(got.dispatch!.id).toBe(dispatch!.id);

    expect(missing!.messageResponse.case).toBe("errorResponse");
    if (missing!.messageResponse.case === "errorResponse") expect(missing!.messageResponse.value.errorCode).toBe(Code.NotFound);
  });

  it("answers file_by_filename and method symbols, and speaks v1alpha for older tools", async () => {
    const [byName, method] = await reflect([
      { messageRequest: { case: "fileByFilename", value: "outpost/telemetry/v1/log_service.proto" } },
      { messageRequest: { case: "fileContainingSymbol", value: "outpost.telemetry.v1.LogService.SubscribeLogs" } },
    ]);
    for (const res of [byName!, method!]) {
      expect(res.messageResponse.case).toBe("fileDescriptorResponse");
      if (res.messageResponse.case === "fileDescriptorResponse") {
        expect(fromBinary(FileDescriptorProtoSchema, res.messageResponse.value.fileDescriptorProto[0]!).name).toBe("outpost/telemetry/v1/log_service.proto");
      }
    }
    const [alphaList] = await reflect([{ messageRequest: { case: "listServices", value: "*" } }], true);
    expect(alphaList!.messageResponse.case).toBe("listServicesResponse");
    if (alphaList!.messageResponse.case === "listServicesResponse") {
      expect(alphaList!.messageResponse.value.service.map((s) => s.name)).toContain("outpost.dispatch.v1.DispatchService");
    }
  });
});

/** A @grpc/grpc-js client built only from the contracts, with protobuf-es doing the bytes. */
function grpcJsClient(address: string) {
  const serializerOf = <T extends DescMessage>(schema: T) => ({
    serialize: (m: object) => Buffer.from(toBinary(schema, create(schema, m as never))),
  });
  const definition: grpc.ServiceDefinition = {
    GetDispatch: {
      path: "/outpost.dispatch.v1.DispatchService/GetDispatch",
      requestStream: false,
      responseStream: false,
      requestSerialize: serializerOf(GetDispatchRequestSchema).serialize,
      requestDeserialize: (b: Buffer) => fromBinary(GetDispatchRequestSchema, b),
      responseSerialize: (m: object) => Buffer.from(toBinary(GetDispatchResponseSchema, m as GetDispatchResponse)),
      responseDeserialize: (b: Buffer) => fromBinary(GetDispatchResponseSchema, b),
    },
    SubscribeLogs: {
      path: "/outpost.telemetry.v1.LogService/SubscribeLogs",
      requestStream: false,
      responseStream: true,
      requestSerialize: serializerOf(SubscribeLogsRequestSchema).serialize,
      requestDeserialize: (b: Buffer) => fromBinary(SubscribeLogsRequestSchema, b),
      responseSerialize: (m: object) => Buffer.from(toBinary(SubscribeLogsResponseSchema, m as SubscribeLogsResponse)),
      responseDeserialize: (b: Buffer) => fromBinary(SubscribeLogsResponseSchema, b),
    },
  };
  const Client = grpc.makeGenericClientConstructor(definition, "DispatchAndLogs");
  return new Client(address, grpc.credentials.createInsecure()) as unknown as grpc.Client & {
    GetDispatch(req: object, md: grpc.Metadata, cb: (err: grpc.ServiceError | null, res?: GetDispatchResponse) => void): void;
    SubscribeLogs(req: object, md: grpc.Metadata): grpc.ClientReadableStream<SubscribeLogsResponse>;
  };
}

describe("@grpc/grpc-js against the edge (C4)", () => {
  it("gets a dispatch and follows its log stream to the end", async () => {
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "grpc-js lines=3" });
    const client = grpcJsClient(new URL(t.mesh.urls.gateway).host);
    const md = new grpc.Metadata();
    md.set("authorization", `Bearer ${tenant.apiKey}`);
    try {
      const got = await new Promise<GetDispatchResponse>((resolve, reject) =>
        client.GetDispatch({ dispatchId: dispatch!.id }, md, (err, res) => (err ? reject(err) : resolve(res!))),
      );
      expect(got.dispatch!.id).toBe(dispatch!.id);
      expect(got.dispatch!.tenantId).toBe(tenant.tenantId);

      const lines: string[] = [];
      let endState: Dispatch_State | undefined;
      const stream = client.SubscribeLogs({ dispatchId: dispatch!.id, afterSeq: 0n }, md);
      for await (const message of stream as AsyncIterable<SubscribeLogsResponse>) {
        for (const chunk of message.chunks) lines.push(chunk.text);
        if (message.runEnd) endState = message.runEnd.state;
      }
      expect(endState).toBe(Dispatch_State.SUCCEEDED);
      expect(lines).toContain("aarch64");
      expect(lines.filter((l) => /^line \d+$/.test(l)).length).toBeGreaterThanOrEqual(3);

      // A missing key is refused with the gRPC status a grpc-js client expects.
      const err = await new Promise<grpc.ServiceError>((resolve) =>
        client.GetDispatch({ dispatchId: dispatch!.id }, new grpc.Metadata(), (e) => resolve(e!)),
      );
      expect(err.code).toBe(grpc.status.UNAUTHENTICATED);
    } finally {
      client.close();
    }
  });
});

describe("request hygiene (G4)", () => {
  it("refuses a 2 MiB message with RESOURCE_EXHAUSTED over gRPC and Connect, and keeps serving", async () => {
    const task = "x".repeat(2 * 1024 * 1024);
    const auth = { authorization: `Bearer ${tenant.apiKey}` };
    for (const [name, transport] of [
      ["grpc", createGrpcTransport({ baseUrl: t.mesh.urls.gateway })],
      ["connect h1 json", createConnectTransport({ baseUrl: t.mesh.urls.gateway, httpVersion: "1.1" })],
      ["connect h2 binary", createConnectTransport({ baseUrl: t.mesh.urls.gateway, httpVersion: "2", useBinaryFormat: true })],
    ] as const) {
      const client = createClient(DispatchService, transport);
      const err = await failure(client.createDispatch({ agent: "demo", task }, { headers: auth }));
      expect(`${name}: ${Code[err.code]} ${err.rawMessage}`).toMatch(new RegExp(`^${name}: ResourceExhausted`));
    }
    const { dispatches } = await tenant.clients.dispatches.listDispatches({});
    expect(Array.isArray(dispatches)).toBe(true);
    expect((await fetch(`${t.mesh.urls.gateway}/healthz`)).status).toBe(200);
  });

  it("advertises its limit of concurrent streams per HTTP/2 connection; the internal services set none", async () => {
    const settingsOf = async (url: string) => {
      const session = http2.connect(url);
      try {
        await new Promise<void>((resolve, reject) => {
          session.once("remoteSettings", () => resolve());
          session.once("error", reject);
        });
        return session.remoteSettings.maxConcurrentStreams;
      } finally {
        session.close();
      }
    };
    expect(await settingsOf(t.mesh.urls.gateway)).toBe(1000);
    expect(await settingsOf(t.mesh.urls.telemetry)).toBeGreaterThan(1_000_000);
  });

  it("draws the size line exactly at OUTPOST_MAX_REQUEST_BYTES (1 MiB here) for a Connect JSON body", async () => {
    const limit = 1024 * 1024;
    // A body of exactly `size` bytes: the task pads it (the dispatcher then refuses the task
    // as too long, which is its own, different answer).
    const bodyOf = (size: number) => {
      const head = '{"agent":"demo","task":"';
      return head + "x".repeat(size - head.length - 2) + '"}';
    };
    const call = async (size: number) => {
      const body = bodyOf(size);
      expect(Buffer.byteLength(body)).toBe(size);
      const res = await fetch(`${t.mesh.urls.gateway}/outpost.dispatch.v1.DispatchService/CreateDispatch`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${tenant.apiKey}` },
        body,
      });
      return (JSON.parse(await res.text()) as { code: string }).code;
    };
    expect(await call(limit)).toBe("invalid_argument");
    expect(await call(limit + 1)).toBe("resource_exhausted");
  });

  it("ends a call at the client's deadline with DEADLINE_EXCEEDED and cancels the upstream call", async () => {
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "slow sleep=20" });
    const traceId = randomBytes(16).toString("hex");
    const started = Date.now();
    const err = await failure(async () => {
      for await (const _ of tenant.clients.dispatches.watchDispatch(
        { dispatchId: dispatch!.id },
        { timeoutMs: 1500, headers: { traceparent: `00-${traceId}-${randomBytes(8).toString("hex")}-01` } },
      )) {
        // state changes until the deadline
      }
    });
    expect(err.code).toBe(Code.DeadlineExceeded);
    expect(Date.now() - started).toBeLessThan(10_000);
    // The dispatcher's side of the same trace ended too, long before the run would have.
    const dispatcherLog = path.join(t.dir, "logs", "dispatcher.log");
    let ended: { ms: number } | undefined;
    for (let i = 0; i < 50 && !ended; i++) {
      ended = readFileSync(dispatcherLog, "utf8")
        .split("\n")
        .filter((l) => l.includes(traceId) && l.includes("WatchDispatch"))
        .map((l) => JSON.parse(l) as { ms: number; msg: string })
        .find((l) => l.msg === "rpc" || l.msg === "rpc failed");
      if (!ended) await new Promise((r) => setTimeout(r, 100));
    }
    expect(ended, "the dispatcher logged the end of the watch under the client's trace id").toBeDefined();
    expect(ended!.ms).toBeLessThan(5000);
    await tenant.clients.dispatches.cancelDispatch({ dispatchId: dispatch!.id });
  });

  it("serves calls with very long deadlines: gRPC ones rewritten in units the service accepts, none ended at once", async () => {
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "long deadline" });
    const message = toBinary(GetDispatchRequestSchema, create(GetDispatchRequestSchema, { dispatchId: dispatch!.id }));
    const frame = envelope(0, message);
    // 99999999 hours and 9999999 seconds: in milliseconds both take more than 8 digits, which
    // the dispatcher would refuse, so the gateway must write what is left in coarser units.
    for (const timeout of ["99999999H", "9999999S"]) {
      const session = http2.connect(t.mesh.urls.gateway);
      try {
        const answer = await new Promise<{ status: string; body: Buffer }>((resolve, reject) => {
          const stream = session.request({
            ":method": "POST",
            ":path": "/outpost.dispatch.v1.DispatchService/GetDispatch",
            "content-type": "application/grpc",
            te: "trailers",
            "grpc-timeout": timeout,
            authorization: `Bearer ${tenant.apiKey}`,
          });
          const chunks: Buffer[] = [];
          let status = "";
          stream.on("response", (h) => (status = String(h["grpc-status"] ?? "")));
          stream.on("trailers", (h) => (status = String(h["grpc-status"] ?? status)));
          stream.on("data", (chunk: Buffer) => chunks.push(chunk));
          stream.on("end", () => resolve({ status, body: Buffer.concat(chunks) }));
          stream.on("error", reject);
          stream.end(frame);
        });
        expect(`${timeout}: grpc-status ${answer.status}`).toBe(`${timeout}: grpc-status 0`);
        expect(fromBinary(GetDispatchResponseSchema, answer.body.subarray(5)).dispatch?.id).toBe(dispatch!.id);
      } finally {
        session.close();
      }
    }
    // The longest Connect deadline (10 digits of milliseconds, ~116 days) is past what a timer
    // can hold: the call is still served, not ended at once.
    const res = await fetch(`${t.mesh.urls.gateway}/outpost.dispatch.v1.DispatchService/GetDispatch`, {
      method: "POST",
      headers: { "content-type": "application/json", "connect-timeout-ms": "9999999999", authorization: `Bearer ${tenant.apiKey}` },
      body: JSON.stringify({ dispatchId: dispatch!.id }),
    });
    expect(res.status).toBe(200);
    expect(((await res.json()) as GetDispatchResponse).dispatch?.id).toBe(dispatch!.id);
  });

});

/**
 * Against a stand-in dispatcher (a bare connect-node server) behind a gateway of its own: what
 * a buggy or slow upstream does, over the raw path in both protocols (Connect JSON over
 * HTTP/1.1, Connect binary over HTTP/2, gRPC) and over the Connect path (gRPC-Web).
 */
describe("a misbehaving upstream, over every path", () => {
  const leak = `db password ${randomBytes(6).toString("hex")}`;
  // A DATA_LOSS is also HTTP 500 in Connect, and its long message is gzipped for clients that
  // accept it: it must come through as it is, not be mistaken for an internal error.
  const longLoss = `chunk store lost segment ${"x".repeat(2048)}`;
  const LOSS_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAW";
  const SLOW_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAX";
  const STREAM_FAIL_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAY";
  const STREAM_HANG_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAZ";
  const STREAM_CHATTY_ID = "01ARZ3NDEKTSV4RRFFQ69G5FB0";
  const TRUNCATED_STREAM = "outpost-test/truncated-stream";
  /** Streams of the hanging kind, and whether the stand-in saw each one cancelled. */
  const hangingStreams: { cancelled: boolean }[] = [];
  const RESET_AFTER_HEADERS = "outpost-test/reset-after-headers";
  const DIES_MID_STREAM = "outpost-test/dies-mid-stream";
  /**
   * How the stand-in misbehaves: named by the client's user-agent, which the raw path passes on,
   * or set here for every call (the Connect path, gRPC-Web's, passes no user-agent on).
   */
  let misbehaviour: string | undefined;
  const NEVER_ANSWER = "outpost-test/never-answer";
  /** Calls of the slow method, and whether the stand-in saw each one cancelled. */
  const slowCalls: { cancelled: boolean }[] = [];
  let fake: http2.Http2Server;
  let edge: Mesh;
  const paths = () =>
    [
      ["connect h1 json", createConnectTransport({ baseUrl: edge.urls.gateway, httpVersion: "1.1" })],
      ["connect h2 binary", createConnectTransport({ baseUrl: edge.urls.gateway, httpVersion: "2", useBinaryFormat: true })],
      ["grpc", createGrpcTransport({ baseUrl: edge.urls.gateway })],
      ["grpc-web", createGrpcWebTransport({ baseUrl: edge.urls.gateway, httpVersion: "1.1" })],
    ] as const;

  beforeAll(async () => {
    const adapter = connectNodeAdapter({
        routes(router) {
          router.service(DispatchService, {
            async getDispatch(req, ctx) {
              if (req.dispatchId === LOSS_ID) throw new ConnectError(longLoss, Code.DataLoss);
              if (req.dispatchId === SLOW_ID) {
                const call = { cancelled: false };
                slowCalls.push(call);
                await new Promise((resolve) => {
                  const timer = setTimeout(resolve, 10_000);
                  ctx.signal.addEventListener("abort", () => {
                    call.cancelled = true;
                    clearTimeout(timer);
                    resolve(undefined);
                  });
                });
                return {};
              }
              // What a buggy or foreign upstream might send: an internal error with its cause
              // spelled out, in its message and in its metadata.
              throw new ConnectError(`connection to mongodb failed: ${leak}`, Code.Internal, { "x-upstream-debug": leak });
            },
            async *watchDispatch(req, ctx) {
              // A message every couple of milliseconds until the call ends.
              for (let i = 1; req.dispatchId === STREAM_CHATTY_ID && !ctx.signal.aborted; i++) {
                yield { dispatch: { id: req.dispatchId, attempt: i } };
                await new Promise((resolve) => setTimeout(resolve, 2));
              }
              for (let i = 1; i <= 3; i++) {
                yield { dispatch: { id: req.dispatchId, attempt: i, failureReason: "x".repeat(i === 2 ? 40_000 : 10) } };
                if (req.dispatchId === STREAM_HANG_ID) {
                  const stream = { cancelled: false };
                  hangingStreams.push(stream);
                  await new Promise<void>((resolve, reject) => {
                    const timer = setTimeout(resolve, 10_000);
                    ctx.signal.addEventListener("abort", () => {
                      stream.cancelled = true;
                      clearTimeout(timer);
                      // As a service honouring its deadline does: the stream ends with the
                      // signal's reason (DEADLINE_EXCEEDED when the propagated deadline passed),
                      // never OK. Ending OK here raced the gateway's own deadline (same instant).
                      reject(ConnectError.from(ctx.signal.reason));
                    });
                  });
                  return;
                }
                if (req.dispatchId === STREAM_FAIL_ID && i === 2) {
                  throw new ConnectError(`cursor lost: ${leak}`, Code.Internal, { "x-upstream-debug": leak });
                }
              }
            },
          });
        },
      });
    fake = http2.createServer((req, res) => {
      const mode = misbehaviour ?? req.headers["user-agent"];
      // An upstream that takes the call and never answers, whatever its deadline.
      if (req.headers["user-agent"] === NEVER_ANSWER) return;
      if (req.headers["user-agent"] === TRUNCATED_STREAM) {
        // A stream whose body stops inside a message, then ends as if complete.
        const grpc = String(req.headers["content-type"]).startsWith("application/grpc");
        const partial = Buffer.from([0, 0, 0, 0, 100, 1, 2, 3]);
        res.writeHead(200, { "content-type": grpc ? "application/grpc" : String(req.headers["content-type"]) });
        if (grpc) res.addTrailers({ "grpc-status": "0" });
        req.resume();
        res.end(partial);
        return;
      }
      if (mode === DIES_MID_STREAM) {
        // An upstream that dies (its connection drops) after two whole messages of a stream.
        const contentType = String(req.headers["content-type"]);
        const message = (attempt: number) => {
          const msg = create(WatchDispatchResponseSchema, { dispatch: { id: "01ARZ3NDEKTSV4RRFFQ69G5FAV", attempt } });
          return envelope(0, contentType.endsWith("json") ? toJsonString(WatchDispatchResponseSchema, msg) : toBinary(WatchDispatchResponseSchema, msg));
        };
        req.resume();
        res.stream.respond({ ":status": 200, "content-type": contentType });
        res.stream.write(Buffer.concat([message(1), message(2)]));
        setTimeout(() => res.stream.session?.destroy(), 50);
        return;
      }
      if (mode !== RESET_AFTER_HEADERS) return adapter(req, res);
      // An upstream that dies (its connection drops) between its response headers and its body.
      const grpc = String(req.headers["content-type"]).startsWith("application/grpc");
      res.stream.respond({ ":status": grpc ? 200 : 500, "content-type": grpc ? "application/grpc" : "application/json" });
      setTimeout(() => res.stream.session?.destroy(), 50);
    });
    const fakePort = await freePort();
    await new Promise<void>((resolve) => fake.listen(fakePort, "127.0.0.1", resolve));
    edge = await startMesh({
      dataDir: path.join(t.dir, "data-masking"),
      logDir: path.join(t.dir, "logs-masking"),
      signingKeys: TEST_SIGNING_KEY_SET,
      adminToken: t.adminToken,
      only: ["gateway"],
      ports: { tenant: Number(new URL(t.mesh.urls.tenant).port), telemetry: Number(new URL(t.mesh.urls.telemetry).port), dispatcher: fakePort },
    });
  });

  afterAll(async () => {
    await edge?.stop();
    fake?.close();
  });

  afterEach(() => {
    misbehaviour = undefined;
  });

  it("masks an internal error as INTERNAL with a trace id found in the gateway log; a compressed DATA_LOSS passes", async () => {
    for (const [name, transport] of paths()) {
      const client = createClient(DispatchService, transport);
      const headers = { authorization: `Bearer ${tenant.apiKey}` };
      const err = await failure(client.getDispatch({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }, { headers }));
      expect(`${name}: ${Code[err.code]}`).toBe(`${name}: Internal`);
      expect(err.rawMessage).not.toContain(leak);
      expect(err.rawMessage).not.toContain("mongodb");
      expect(err.metadata.get("x-upstream-debug"), `${name}: metadata`).toBeNull();
      const traceId = traceIdPattern.exec(err.rawMessage)?.[1];
      expect(traceId).toMatch(/^[0-9a-f]{32}$/);
      // The log reaches the file through a pipe: give it a moment.
      let found = false;
      for (let i = 0; i < 50 && !found; i++) {
        found = readFileSync(path.join(t.dir, "logs-masking", "gateway.log"), "utf8")
          .split("\n")
          .some((l) => l.includes(`"trace_id":"${traceId!}"`) && l.includes(leak));
        if (!found) await new Promise((r) => setTimeout(r, 100));
      }
      expect(found, `${name}: the cause is in the gateway log under the trace id`).toBe(true);

      const loss = await failure(client.getDispatch({ dispatchId: LOSS_ID }, { headers }));
      expect(`${name}: ${Code[loss.code]} ${loss.rawMessage.length}`).toBe(`${name}: DataLoss ${longLoss.length}`);
    }
  });

  it("passes a server stream's messages through, and masks an INTERNAL that ends it, over every path", async () => {
    const headers = { authorization: `Bearer ${tenant.apiKey}` };
    const collect = async (client: ReturnType<typeof createClient<typeof DispatchService>>, dispatchId: string) => {
      const got: number[] = [];
      try {
        for await (const res of client.watchDispatch({ dispatchId }, { headers })) got.push(res.dispatch!.attempt);
        return { got };
      } catch (err) {
        return { got, error: ConnectError.from(err) };
      }
    };
    for (const [name, transport] of paths()) {
      const client = createClient(DispatchService, transport);
      // Three messages, one of them 40 kB (several DATA frames, split anywhere), then OK.
      const ok = await collect(client, "01ARZ3NDEKTSV4RRFFQ69G5FAV");
      expect(`${name}: ${ok.got.join(",")} ${ok.error?.message ?? "ok"}`).toBe(`${name}: 1,2,3 ok`);
      // Two messages, then an internal error: the client gets both, then INTERNAL with a trace id only.
      const failed = await collect(client, STREAM_FAIL_ID);
      expect(`${name}: ${failed.got.join(",")} ${Code[failed.error?.code ?? 0]}`).toBe(`${name}: 1,2 Internal`);
      expect(failed.error!.rawMessage).not.toContain(leak);
      expect(failed.error!.rawMessage).toMatch(traceIdPattern);
      expect(failed.error!.metadata.get("x-upstream-debug"), `${name}: metadata`).toBeNull();
    }
  });

  it("cancels a stream upstream when its client leaves", async () => {
    const headers = { authorization: `Bearer ${tenant.apiKey}` };
    for (const [name, transport] of paths()) {
      const client = createClient(DispatchService, transport);
      const before = hangingStreams.length;
      const leave = new AbortController();
      const got: number[] = [];
      const err = await failure(async () => {
        for await (const res of client.watchDispatch({ dispatchId: STREAM_HANG_ID }, { headers, signal: leave.signal })) {
          got.push(res.dispatch!.attempt);
          leave.abort();
        }
      });
      expect(`${name}: ${got.join(",")} ${Code[err.code]}`).toBe(`${name}: 1 Canceled`);
      for (let i = 0; i < 50 && !hangingStreams[before]?.cancelled; i++) await new Promise((r) => setTimeout(r, 100));
      expect(hangingStreams[before]?.cancelled, `${name}: cancelled upstream`).toBe(true);
    }
  });

  it("ends a stream at its deadline with DEADLINE_EXCEEDED in the stream's own terms, and breaks off one the upstream cut mid-message", async () => {
    const call = (dispatchId: string, extra: Record<string, string>) =>
      fetch(`${edge.urls.gateway}/outpost.dispatch.v1.DispatchService/WatchDispatch`, {
        method: "POST",
        headers: { "content-type": "application/connect+json", authorization: `Bearer ${tenant.apiKey}`, ...extra },
        body: envelope(0, JSON.stringify({ dispatchId })),
      });
    // A plain HTTP client enforces no deadline itself: the gateway ends the stream properly.
    const late = await call(STREAM_HANG_ID, { "connect-timeout-ms": "600" });
    const frames = envelopesOf(Buffer.from(await late.arrayBuffer()));
    expect(frames.map((f) => f.flags)).toEqual([0, 2]);
    expect((JSON.parse(frames[1]!.message.toString()) as { error?: { code: string } }).error?.code).toBe("deadline_exceeded");
    // The upstream's body stops inside a message: the client's answer breaks, it does not look complete.
    const cut = await call("01ARZ3NDEKTSV4RRFFQ69G5FAV", { "user-agent": TRUNCATED_STREAM });
    await expect(cut.arrayBuffer()).rejects.toThrow();
    const grpcClient = createClient(DispatchService, createGrpcTransport({ baseUrl: edge.urls.gateway }));
    const grpcErr = await failure(async () => {
      for await (const _ of grpcClient.watchDispatch({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }, { headers: { authorization: `Bearer ${tenant.apiKey}`, "user-agent": TRUNCATED_STREAM } })) {
        // nothing whole arrives
      }
    });
    expect(Code[grpcErr.code]).toBe("Internal");
    expect((await fetch(`${edge.urls.gateway}/healthz`)).status).toBe(200);
  });

  it("refuses a malformed Connect stream request at the edge, in the stream's own terms", async () => {
    const call = (body: Buffer) =>
      fetch(`${edge.urls.gateway}/outpost.dispatch.v1.DispatchService/WatchDispatch`, {
        method: "POST",
        headers: { "content-type": "application/connect+json", authorization: `Bearer ${tenant.apiKey}` },
        body,
      });
    const endOf = async (res: Response) => {
      expect(res.status).toBe(200);
      const bytes = Buffer.from(await res.arrayBuffer());
      expect(bytes[0]).toBe(2); // the end-of-stream message, and nothing before it
      expect(bytes.readUInt32BE(1)).toBe(bytes.length - 5);
      return JSON.parse(bytes.subarray(5).toString()) as { error?: { code: string; message: string } };
    };
    for (const [why, body] of [
      ["truncated", envelope(0, JSON.stringify({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" })).subarray(0, 12)],
      ["two messages", Buffer.concat([envelope(0, "{}"), envelope(0, "{}")])],
      ["end-of-stream flag", envelope(2, "{}")],
      ["not JSON", envelope(0, "{nope")],
      ["wrong field type", envelope(0, JSON.stringify({ dispatchId: 7 }))],
    ] as const) {
      const end = await endOf(await call(body));
      expect(`${why}: ${end.error?.code}`).toBe(`${why}: invalid_argument`);
    }
    // A good one passes, in the stream's own framing, and ends OK.
    const res = await call(envelope(0, JSON.stringify({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" })));
    expect(res.headers.get("content-type")).toBe("application/connect+json");
    expect(envelopesOf(Buffer.from(await res.arrayBuffer())).map((e) => e.flags)).toEqual([0, 0, 0, 2]);
  });

  it("answers UNAVAILABLE when the upstream's connection drops after its headers but before its answer", async () => {
    const headers = { authorization: `Bearer ${tenant.apiKey}` };
    misbehaviour = RESET_AFTER_HEADERS;
    for (const [name, transport] of paths()) {
      const client = createClient(DispatchService, transport);
      const err = await failure(client.getDispatch({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }, { headers }));
      // Over Connect nothing had reached the client yet, so it gets a proper answer; over gRPC
      // the headers were out, and the answer ends with the status in trailers; gRPC-Web goes
      // through connect-node, whose client error for the dropped connection is mapped too.
      // Either way a retry policy can retry it (a reset reads as INTERNAL, which none does).
      expect(`${name}: ${Code[err.code]}`).toBe(`${name}: Unavailable`);
    }
    expect((await fetch(`${edge.urls.gateway}/healthz`)).status).toBe(200);
  });

  it("ends a stream whose upstream dies between two messages with UNAVAILABLE, after the messages that came", async () => {
    // What a log subscriber sees when its telemetry replica is killed: what reached it, then a
    // status it can act on (resume from its last sequence), not a broken stream.
    const headers = { authorization: `Bearer ${tenant.apiKey}` };
    misbehaviour = DIES_MID_STREAM;
    for (const [name, transport] of paths()) {
      const client = createClient(DispatchService, transport);
      const got: number[] = [];
      const err = await failure(
        (async () => {
          for await (const res of client.watchDispatch({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }, { headers })) got.push(res.dispatch!.attempt);
        })(),
      );
      expect(`${name}: ${got.join(",")} ${Code[err.code]}`).toBe(`${name}: 1,2 Unavailable`);
    }
    expect((await fetch(`${edge.urls.gateway}/healthz`)).status).toBe(200);
  });

  it("holds the client's deadline itself: an upstream that never answers cannot keep the client waiting", async () => {
    // The raw path passes the client's user-agent on, which is how the stand-in knows to hang;
    // the Connect path (gRPC-Web) does not, and its deadline is connect-node's own.
    const headers = { authorization: `Bearer ${tenant.apiKey}`, "user-agent": NEVER_ANSWER };
    for (const [name, transport] of paths().filter(([name]) => name !== "grpc-web")) {
      const client = createClient(DispatchService, transport);
      const started = Date.now();
      const err = await failure(client.getDispatch({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }, { headers, timeoutMs: 700 }));
      expect(`${name}: ${Code[err.code]}`).toBe(`${name}: DeadlineExceeded`);
      expect(Date.now() - started, name).toBeLessThan(5000);
    }
    // Over plain HTTP/1.1, where only the gateway can end the call: the deadline answer comes
    // from the gateway, and a malformed deadline is refused as connect-node would.
    const raw = (timeout: string) =>
      fetch(`${edge.urls.gateway}/outpost.dispatch.v1.DispatchService/GetDispatch`, {
        method: "POST",
        headers: { "content-type": "application/json", "connect-timeout-ms": timeout, authorization: `Bearer ${tenant.apiKey}`, "user-agent": NEVER_ANSWER },
        body: JSON.stringify({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }),
      });
    const late = await raw("500");
    expect(((await late.json()) as { code: string }).code).toBe("deadline_exceeded");
    const malformed = await raw("soon");
    expect(malformed.status).toBe(400);
    expect(((await malformed.json()) as { code: string }).code).toBe("invalid_argument");
  });

  it("ends a slow unary call at the client's deadline, or when the client leaves, and cancels it upstream", async () => {
    const headers = { authorization: `Bearer ${tenant.apiKey}` };
    for (const [name, transport] of paths()) {
      const client = createClient(DispatchService, transport);
      // The deadline travels with the call; the client leaving (no deadline sent) must too.
      for (const [how, options] of [
        ["deadline", () => ({ headers, timeoutMs: 700 })],
        ["client gone", () => ({ headers, signal: AbortSignal.timeout(700) })],
      ] as const) {
        const before = slowCalls.length;
        const started = Date.now();
        const err = await failure(client.getDispatch({ dispatchId: SLOW_ID }, options()));
        expect(`${name}, ${how}: ${Code[err.code]}`).toBe(`${name}, ${how}: ${how === "deadline" ? "DeadlineExceeded" : "Canceled"}`);
        expect(Date.now() - started, name).toBeLessThan(5000);
        // The stand-in got the call and saw it end long before its 10 s.
        for (let i = 0; i < 50 && !slowCalls[before]?.cancelled; i++) await new Promise((r) => setTimeout(r, 100));
        expect(slowCalls.length, `${name}, ${how}`).toBe(before + 1);
        expect(slowCalls[before]!.cancelled, `${name}, ${how}: cancelled upstream`).toBe(true);
      }
    }
  });

  // Last here: it stops the gateway of this describe.
  it("ends open streams cleanly when the gateway drains (SIGTERM), and cancels them upstream", async () => {
    const headers = { authorization: `Bearer ${tenant.apiKey}` };
    const before = hangingStreams.length;
    // Streams with messages in flight at the moment of the drain: each ends (cleanly, or broken
    // off inside a message), and none takes the gateway down (it exits 0).
    const chatty = paths().map(async ([name, transport]) => {
      const client = createClient(DispatchService, transport);
      let got = 0;
      try {
        for await (const _ of client.watchDispatch({ dispatchId: STREAM_CHATTY_ID }, { headers })) got++;
        return `${name}: ended, ${got > 0 ? "messages" : "none"}`;
      } catch (err) {
        return `${name}: ${Code[ConnectError.from(err).code]}, ${got > 0 ? "messages" : "none"}`;
      }
    });
    const streams = paths().map(async ([name, transport]) => {
      const client = createClient(DispatchService, transport);
      const got: number[] = [];
      try {
        for await (const res of client.watchDispatch({ dispatchId: STREAM_HANG_ID }, { headers })) got.push(res.dispatch!.attempt);
        return `${name}: ${got.join(",")} ended ok`;
      } catch (err) {
        return `${name}: ${got.join(",")} ${Code[ConnectError.from(err).code]}`;
      }
    });
    for (let i = 0; i < 100 && hangingStreams.length < before + paths().length; i++) await new Promise((r) => setTimeout(r, 50));
    expect(hangingStreams.length).toBe(before + paths().length);
    const started = Date.now();
    expect(await edge.kill("gateway")).toBe(0);
    expect(Date.now() - started).toBeLessThan(5000);
    expect(await Promise.all(streams)).toEqual(paths().map(([name]) => `${name}: 1 ended ok`));
    for (const outcome of await Promise.all(chatty)) expect(outcome).toMatch(/: (ended|Internal|Unavailable|Unknown), messages$/);
    for (let i = 0; i < 50 && hangingStreams.slice(before).some((s) => !s.cancelled); i++) await new Promise((r) => setTimeout(r, 100));
    expect(hangingStreams.slice(before).every((s) => s.cancelled)).toBe(true);
  });
});

describe("errors keep their details through the edge", () => {
  it("passes an upstream NOT_FOUND with its ErrorInfo unchanged, over Connect and over gRPC", async () => {
    const err = await failure(tenant.clients.dispatches.getDispatch({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }));
    expect(err.code).toBe(Code.NotFound);
    expect(errorInfoOf(err)?.reason).toBe("DISPATCH_NOT_FOUND");
    const viaGrpc = createClient(DispatchService, createGrpcTransport({ baseUrl: t.mesh.urls.gateway }));
    const grpcErr = await failure(viaGrpc.getDispatch({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }, { headers: { authorization: `Bearer ${tenant.apiKey}` } }));
    expect(grpcErr.code).toBe(Code.NotFound);
    expect(errorInfoOf(grpcErr)?.reason).toBe("DISPATCH_NOT_FOUND");
    expect(errorInfoOf(grpcErr)?.metadata).toEqual(errorInfoOf(err)?.metadata);
  });

  it("refuses a unary call with a bad key with UNAUTHENTICATED and its ErrorInfo, in every protocol", async () => {
    for (const [name, transport] of [
      ["grpc", createGrpcTransport({ baseUrl: t.mesh.urls.gateway })],
      ["connect h1 json", createConnectTransport({ baseUrl: t.mesh.urls.gateway, httpVersion: "1.1" })],
      ["connect h2 binary", createConnectTransport({ baseUrl: t.mesh.urls.gateway, httpVersion: "2", useBinaryFormat: true })],
      ["grpc-web", createGrpcWebTransport({ baseUrl: t.mesh.urls.gateway, httpVersion: "1.1" })],
    ] as const) {
      const client = createClient(DispatchService, transport);
      const err = await failure(client.listDispatches({}, { headers: { authorization: `Bearer otp_${"0".repeat(64)}` } }));
      expect(`${name}: ${Code[err.code]}`).toBe(`${name}: Unauthenticated`);
      expect(errorInfoOf(err)?.reason, name).toBeTruthy();
    }
  });

  it("answers hand-made Connect unary calls over HTTP/1.1 and HTTP/2, and refuses a malformed one at the edge", async () => {
    // (The RateLimit-* headers of these answers are checked in edge-redis.test.ts; this mesh
    // allow-lists loopback.)
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "raw connect" });
    for (const http of ["1.1", "2"] as const) {
      const answer = await rawConnectCall(http, "/outpost.dispatch.v1.DispatchService/GetDispatch", JSON.stringify({ dispatchId: dispatch!.id, unknownField: 1 }));
      expect(answer.status).toBe(200);
      expect(answer.headers["content-type"]).toBe("application/json");
      expect(Number(answer.headers["content-length"])).toBe(Buffer.byteLength(answer.body));
      expect((JSON.parse(answer.body) as { dispatch: { id: string } }).dispatch.id).toBe(dispatch!.id);
      // The client's own mistakes are answered at the edge, in Connect's error format.
      const bad = await rawConnectCall(http, "/outpost.dispatch.v1.DispatchService/GetDispatch", '{"dispatchId": 7');
      expect(bad.status).toBe(400);
      expect(JSON.parse(bad.body)).toMatchObject({ code: "invalid_argument" });
    }
  });
});

/** A Connect unary POST by hand, over HTTP/1.1 or HTTP/2: status, headers and body as sent. */
async function rawConnectCall(version: "1.1" | "2", path: string, body: string) {
  const headers = { "content-type": "application/json", "connect-protocol-version": "1", authorization: `Bearer ${tenant.apiKey}` };
  if (version === "1.1") {
    const res = await fetch(`${t.mesh.urls.gateway}${path}`, { method: "POST", headers, body });
    return { status: res.status, headers: Object.fromEntries(res.headers), body: await res.text() };
  }
  const session = http2.connect(t.mesh.urls.gateway);
  try {
    return await new Promise<{ status: number; headers: Record<string, string>; body: string }>((resolve, reject) => {
      const stream = session.request({ ":method": "POST", ":path": path, ...headers });
      let answer: Record<string, string> = {};
      let text = "";
      stream.on("response", (h) => (answer = Object.fromEntries(Object.entries(h).map(([k, v]) => [k, String(v)]))));
      stream.on("data", (chunk: Buffer) => (text += chunk.toString("utf8")));
      stream.on("end", () => resolve({ status: Number(answer[":status"]), headers: answer, body: text }));
      stream.on("error", reject);
      stream.end(body);
    });
  } finally {
    session.close();
  }
}

describe("the raw unary path across an upstream restart", () => {
  it("drains with the dispatcher (SIGTERM ends promptly) and serves gRPC again over a fresh session", async () => {
    const viaGrpc = createClient(DispatchService, createGrpcTransport({ baseUrl: t.mesh.urls.gateway }));
    const auth = { headers: { authorization: `Bearer ${tenant.apiKey}` } };
    const before = (await viaGrpc.listDispatches({}, auth)).dispatches.map((d) => d.id);
    // The gateway's idle session to the dispatcher must not hold up the dispatcher's shutdown.
    const stopping = Date.now();
    expect(await t.mesh.kill("dispatcher")).toBe(0);
    expect(Date.now() - stopping).toBeLessThan(15_000);
    await t.mesh.start("dispatcher");
    // The first call may still meet the old session (UNAVAILABLE, safe to retry); then it is served.
    let after: string[] | undefined;
    for (let i = 0; i < 50 && !after; i++) {
      try {
        after = (await viaGrpc.listDispatches({}, auth)).dispatches.map((d) => d.id);
      } catch (err) {
        expect(ConnectError.from(err).code).toBe(Code.Unavailable);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    expect(after).toEqual(before);
  });
});
