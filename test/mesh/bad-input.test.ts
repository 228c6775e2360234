/**
 * Bad input at the edge (issue #3): every tenant-facing method with missing fields,
 * out-of-range numbers, enum zero values, oversize strings and messages, invalid UTF-8
 * (hand-built protobuf bytes), wrong content types and truncated frames over raw HTTP/2 and
 * HTTP/1.1. Each answers INVALID_ARGUMENT naming the field (or the right code), never INTERNAL,
 * never a crash or a hang. Then a bounded, seeded random test: malformed requests over gRPC
 * and Connect, after which the gateway is still alive and every answer had a proper code.
 */
import http2 from "node:http2";
import net from "node:net";
import { gzipSync } from "node:zlib";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { findTrailerError } from "@connectrpc/connect/protocol-grpc";
import { ErrorInfoSchema } from "@outpost/proto/google/rpc/error_details_pb.js";
import type { DescService } from "@bufbuild/protobuf";
import { errorInfoOf } from "@outpost/platform";
import { AgentService } from "@outpost/proto/outpost/dispatch/v1/agent_service_pb.js";
import { AuditService } from "@outpost/proto/outpost/dispatch/v1/audit_service_pb.js";
import type { Dispatch_State, ModelTier } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { DispatchService } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { LogService } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { Tier } from "@outpost/proto/outpost/tenant/v1/tenant_pb.js";
import { ApiKeyService, SecretService, TenantService } from "@outpost/proto/outpost/tenant/v1/tenant_service_pb.js";
import { PUBLIC_SERVICES } from "../../gateway/src/core/routing.ts";
import { startTestMesh, type TestMesh } from "./harness.ts";
import { envelope, envelopesOf } from "../support/envelopes.ts";
import { signAs } from "../support/signing.ts";

let t: TestMesh;
let tenant: Awaited<ReturnType<TestMesh["newTenant"]>>;
let gw: URL;

beforeAll(async () => {
  t = await startTestMesh({ serviceEnv: { tenant: { OUTPOST_SECRETS_MASTER_KEYS: `k1:${Buffer.alloc(32, 7).toString("base64")}` } } });
  tenant = await t.newTenant("Bad input");
  gw = new URL(t.mesh.urls.gateway);
});

afterAll(async () => {
  await t?.mesh.stop();
});

function client<T extends DescService>(service: T, credential = tenant.apiKey): Client<T> {
  return createClient(
    service,
    createGrpcTransport({ baseUrl: t.mesh.urls.gateway, interceptors: [(next) => (req) => (req.header.set("authorization", `Bearer ${credential}`), next(req))] }),
  );
}

async function failure(call: () => Promise<unknown>): Promise<ConnectError> {
  try {
    await call();
  } catch (err) {
    return ConnectError.from(err);
  }
  throw new Error("expected the call to fail");
}

async function drain(stream: AsyncIterable<unknown>) {
  for await (const _ of stream) {
    // fails before the first message
  }
}

const long = (n: number) => "x".repeat(n);
/** A page token built by the client (base64url JSON, as the services issue them) with values of the wrong type. */
const crafted = (cursor: unknown) => Buffer.from(JSON.stringify(cursor)).toString("base64url");
const ULID = "01ARZ3NDEKTSV4RRFFQ69G5FAV";

/** [label, call, field the error must name] — all must answer INVALID_ARGUMENT. */
function cases(): [string, () => Promise<unknown>, string][] {
  const d = client(DispatchService);
  const logs = client(LogService);
  const keys = client(ApiKeyService);
  const secrets = client(SecretService);
  const agents = client(AgentService);
  const audit = client(AuditService);
  const tenants = client(TenantService, t.adminToken);
  return [
    ["CreateDispatch: missing agent", () => d.createDispatch({ task: "x" }), "agent"],
    ["CreateDispatch: missing task", () => d.createDispatch({ agent: "demo" }), "task"],
    ["CreateDispatch: oversize task", () => d.createDispatch({ agent: "demo", task: long(300_000) }), "task"],
    ["CreateDispatch: negative timeout", () => d.createDispatch({ agent: "demo", task: "x", timeout: { seconds: -5n } }), "timeout"],
    ["CreateDispatch: unknown model tier", () => d.createDispatch({ agent: "demo", task: "x", model: { case: "modelTier", value: 99 as ModelTier } }), "model_tier"],
    ["CreateDispatch: secret name syntax", () => d.createDispatch({ agent: "demo", task: "x", secretNames: ["not a name"] }), "secret_names"],
    ["CreateDispatch: oversize request_id", () => d.createDispatch({ agent: "demo", task: "x", requestId: long(10_000) }), "request_id"],
    ["GetDispatch: missing id", () => d.getDispatch({}), "dispatch_id"],
    ["GetDispatch: malformed id", () => d.getDispatch({ dispatchId: "not-a-ulid" }), "dispatch_id"],
    ["ListDispatches: negative page_size", () => d.listDispatches({ pageSize: -1 }), "page_size"],
    ["ListDispatches: huge page_size", () => d.listDispatches({ pageSize: 2_000_000_000 }), "page_size"],
    ["ListDispatches: forged page_token", () => d.listDispatches({ pageToken: "garbage!!" }), "page_token"],
    ["ListDispatches: crafted page_token (an object where the id belongs)", () => d.listDispatches({ pageToken: crafted({ after: { $gt: "" } }) }), "page_token"],
    ["ListAuditEvents: crafted page_token", () => audit.listAuditEvents({ pageToken: crafted({ after: 7 }) }), "page_token"],
    ["ListApiKeys: crafted page_token", () => keys.listApiKeys({ pageToken: crafted({ after: ["x"] }) }), "page_token"],
    ["GetLogs: crafted page_token", () => logs.getLogs({ dispatchId: ULID, pageToken: crafted({ d: ULID, a: "1" }) }), "page_token"],
    ["ListDispatches: unknown state", () => d.listDispatches({ state: 77 as Dispatch_State }), "state"],
    ["CancelDispatch: missing id", () => d.cancelDispatch({}), "dispatch_id"],
    ["WatchDispatch: missing id", () => drain(d.watchDispatch({})), "dispatch_id"],
    ["SubscribeLogs: missing id", () => drain(logs.subscribeLogs({})), "dispatch_id"],
    ["SubscribeLogs: negative after_seq", () => drain(logs.subscribeLogs({ dispatchId: ULID, afterSeq: -1n })), "after_seq"],
    ["GetLogs: negative page_size", () => logs.getLogs({ dispatchId: ULID, pageSize: -3 }), "page_size"],
    ["CreateApiKey: oversize display_name", () => keys.createApiKey({ displayName: long(10_000) }), "display_name"],
    ["RevokeApiKey: missing id", () => keys.revokeApiKey({}), "api_key_id"],
    ["ListApiKeys: negative page_size", () => keys.listApiKeys({ pageSize: -1 }), "page_size"],
    ["PutSecret: missing name", () => secrets.putSecret({ value: "v" }), "name"],
    ["PutSecret: bad name", () => secrets.putSecret({ name: "lower-case", value: "v" }), "name"],
    ["PutSecret: oversize value", () => secrets.putSecret({ name: "BIG", value: long(200_000) }), "value"],
    ["DeleteSecret: missing name", () => secrets.deleteSecret({}), "name"],
    ["ListSecrets: negative page_size", () => secrets.listSecrets({ pageSize: -1 }), "page_size"],
    ["GetAgent: missing name", () => agents.getAgent({}), "name"],
    ["ListAuditEvents: negative page_size", () => audit.listAuditEvents({ pageSize: -1 }), "page_size"],
    ["CreateTenant (admin): missing name", () => tenants.createTenant({ contactEmail: "a@b.example" }), "name"],
    ["CreateTenant (admin): unknown tier", () => tenants.createTenant({ name: "n", contactEmail: "a@b.example", tier: 42 as Tier }), "tier"],
    ["UpdateTenant (admin): tier zero value", () => tenants.updateTenant({ tenantId: ULID, tier: Tier.UNSPECIFIED }), "tier"],
    ["UpdateTenant (admin): unknown tier", () => tenants.updateTenant({ tenantId: ULID, tier: 42 as Tier }), "tier"],
    ["GetTenant (admin): missing id", () => tenants.getTenant({}), "tenant_id"],
    ["ListTenants (admin): negative page_size", () => tenants.listTenants({ pageSize: -1 }), "page_size"],
    ["SuspendTenant (admin): missing id", () => tenants.suspendTenant({}), "tenant_id"],
  ];
}

describe("every tenant-facing method refuses bad fields by name", () => {
  it("answers INVALID_ARGUMENT naming the field, never INTERNAL", async () => {
    const problems: string[] = [];
    for (const [label, call, field] of cases()) {
      const err = await failure(call);
      const named = errorInfoOf(err)?.metadata["field"];
      // A repeated field may be named down to the element, e.g. secret_names[0].
      const namesField = named === field || named?.startsWith(`${field}[`) === true;
      if (err.code !== Code.InvalidArgument || !namesField) problems.push(`${label}: ${Code[err.code]} field=${named} (${err.rawMessage})`);
    }
    expect(problems.join("\n")).toBe("");
  });
});

/** One raw request over HTTP/2 prior knowledge; resolves status, headers, trailers, body. */
function h2Request(path: string, headers: Record<string, string>, body: Buffer, endEarly = false) {
  return new Promise<{ status: number; headers: http2.IncomingHttpHeaders; trailers: http2.IncomingHttpHeaders; body: Buffer }>((resolve, reject) => {
    const session = http2.connect(gw.origin);
    session.on("error", reject);
    const req = session.request({ ":method": "POST", ":path": path, ...headers });
    const timer = setTimeout(() => reject(new Error(`no answer to ${path} within 10 s`)), 10_000);
    let resHeaders: http2.IncomingHttpHeaders = {};
    let trailers: http2.IncomingHttpHeaders = {};
    const chunks: Buffer[] = [];
    req.on("response", (h) => (resHeaders = h));
    req.on("trailers", (h) => (trailers = h));
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      clearTimeout(timer);
      session.close();
      resolve({ status: Number(resHeaders[":status"]), headers: resHeaders, trailers, body: Buffer.concat(chunks) });
    });
    req.on("error", (err) => {
      clearTimeout(timer);
      session.close();
      reject(err);
    });
    if (endEarly) req.end(body);
    else req.end(body);
  });
}

const grpcFrame = (message: Buffer, declaredLength = message.length) => {
  const header = Buffer.alloc(5);
  header.writeUInt32BE(declaredLength, 1);
  return Buffer.concat([header, message]);
};
const grpcHeaders = () => ({ "content-type": "application/grpc+proto", te: "trailers", authorization: `Bearer ${tenant.apiKey}` });
const grpcStatusOf = (r: { headers: http2.IncomingHttpHeaders; trailers: http2.IncomingHttpHeaders }) => Number(r.trailers["grpc-status"] ?? r.headers["grpc-status"]);
/** The reason and field of the ErrorInfo in a gRPC answer's status ("none" without one). */
const grpcErrorInfoOf = (r: { headers: http2.IncomingHttpHeaders; trailers: http2.IncomingHttpHeaders }) => {
  const status = new Headers();
  for (const [name, value] of Object.entries({ ...r.headers, ...r.trailers })) if (typeof value === "string" && !name.startsWith(":")) status.set(name, value);
  const info = findTrailerError(status)?.findDetails(ErrorInfoSchema)[0];
  return `${info?.reason ?? "none"} ${info?.metadata["field"] ?? "none"}`;
};
/** The same from a Connect error body. */
const connectErrorInfoOf = (body: { details?: { type: string; debug?: { reason?: string; metadata?: Record<string, string> } }[] }) => {
  const info = body.details?.find((d) => d.type === "google.rpc.ErrorInfo")?.debug;
  return `${info?.reason ?? "none"} ${info?.metadata?.["field"] ?? "none"}`;
};

async function expectAlive() {
  const res = await fetch(`${t.mesh.urls.gateway}/healthz`);
  expect(res.status).toBe(200);
  const { dispatches } = await tenant.clients.dispatches.listDispatches({});
  expect(Array.isArray(dispatches)).toBe(true);
}

describe("malformed bytes and framing", () => {
  it("refuses invalid UTF-8 in a string field (hand-built protobuf) over gRPC and Connect", async () => {
    // GetDispatchRequest { dispatch_id (1) = 0xff 0xfe 0xfd } and CreateDispatchRequest { agent = "demo", task (2) = invalid }.
    const badId = Buffer.from([0x0a, 0x03, 0xff, 0xfe, 0xfd]);
    const badTask = Buffer.concat([Buffer.from([0x0a, 0x04]), Buffer.from("demo"), Buffer.from([0x12, 0x02, 0xc3, 0x28])]);
    for (const [path, body] of [
      ["/outpost.dispatch.v1.DispatchService/GetDispatch", badId],
      ["/outpost.dispatch.v1.DispatchService/CreateDispatch", badTask],
    ] as const) {
      const r = await h2Request(path, grpcHeaders(), grpcFrame(body));
      expect(grpcStatusOf(r), `${path} over gRPC`).toBe(Code.InvalidArgument);
      expect(grpcErrorInfoOf(r), `${path} over gRPC`).toBe("MALFORMED_MESSAGE (request body)");
      const c = await fetch(`${t.mesh.urls.gateway}${path}`, {
        method: "POST",
        headers: { "content-type": "application/proto", authorization: `Bearer ${tenant.apiKey}` },
        body,
      });
      expect(c.status, `${path} over Connect`).toBe(400);
      const answer = (await c.json()) as { code: string; details?: [] };
      expect(answer.code).toBe("invalid_argument");
      expect(connectErrorInfoOf(answer), `${path} over Connect`).toBe("MALFORMED_MESSAGE (request body)");
      // gRPC-Web: the status travels in the trailer frame of the body.
      const w = await fetch(`${t.mesh.urls.gateway}${path}`, {
        method: "POST",
        headers: { "content-type": "application/grpc-web+proto", authorization: `Bearer ${tenant.apiKey}` },
        body: grpcFrame(body),
      });
      const trailer = Buffer.from(await w.arrayBuffer()).toString("latin1");
      expect(trailer, `${path} over gRPC-Web`).toMatch(/grpc-status: 3\r\n/);
      expect(decodeURIComponent(trailer.slice(5))).toContain("request message could not be decoded");
      expect(trailer, `${path} over gRPC-Web`).toMatch(/grpc-status-details-bin: /);
    }
    await expectAlive();
  });

  it("refuses invalid UTF-8 in a Connect JSON body (PutSecret) at the gateway and at the service, and stores nothing", async () => {
    const path = "/outpost.tenant.v1.SecretService/PutSecret";
    // A lenient decoder would store "ab\uFFFD\uFFFDcd" for the value, and answer 200.
    const json = (name: string) => Buffer.concat([Buffer.from(`{"name":"${name}","value":"ab`), Buffer.from([0xff, 0xfe]), Buffer.from('cd"}')]);
    const refusals: Record<string, string> = {};
    const post = async (label: string, url: string, headers: Record<string, string>, body: Buffer) => {
      const res = await fetch(`${url}${path}`, { method: "POST", headers: { "content-type": "application/json", ...headers }, body });
      const answer = (await res.json()) as { code: string; message?: string; details?: [] };
      refusals[label] = `${res.status} ${answer.code} ${connectErrorInfoOf(answer)} ${/utf-8/i.test(answer.message ?? "")}`;
    };
    const auth = { authorization: `Bearer ${tenant.apiKey}` };
    // The gateway: its raw path (uncompressed) and its lean path (compressed).
    await post("gateway", t.mesh.urls.gateway, auth, json("BAD_UTF8_EDGE"));
    await post("gateway, gzip", t.mesh.urls.gateway, { ...auth, "content-encoding": "gzip" }, gzipSync(json("BAD_UTF8_EDGE_GZIP")));
    // The tenant service itself (its lean path), with a validly signed identity of the tenant.
    const signed = new Headers();
    signAs(signed, { kind: "tenant", tenantId: tenant.tenantId, principal: "key/direct" }, SecretService);
    await post("tenant service", t.mesh.urls.tenant, Object.fromEntries(signed), json("BAD_UTF8_DIRECT"));
    const refused = "400 invalid_argument MALFORMED_MESSAGE (request body) true";
    expect(refusals).toEqual({ gateway: refused, "gateway, gzip": refused, "tenant service": refused });
    // Valid UTF-8 beyond ASCII is stored; none of the refused ones is.
    const ok = await fetch(`${t.mesh.urls.gateway}${path}`, {
      method: "POST",
      headers: { "content-type": "application/json", ...auth },
      body: JSON.stringify({ name: "GOOD_UTF8", value: "ab\u00e9\u{1f600}cd" }),
    });
    expect(ok.status).toBe(200);
    const { secrets } = await tenant.clients.secrets.listSecrets({});
    const names = secrets.map((s) => s.name);
    expect(names).toContain("GOOD_UTF8");
    expect(names.filter((n) => n.startsWith("BAD_UTF8"))).toEqual([]);
    await expectAlive();
  });

  it("answers wrong content types with 415 (Connect) or a gRPC status, not INTERNAL", async () => {
    const path = "/outpost.dispatch.v1.DispatchService/GetDispatch";
    const res = await fetch(`${t.mesh.urls.gateway}${path}`, {
      method: "POST",
      headers: { "content-type": "text/plain", authorization: `Bearer ${tenant.apiKey}` },
      body: "hello",
    });
    expect(res.status).toBe(415);
    const xml = await fetch(`${t.mesh.urls.gateway}${path}`, { method: "POST", headers: { "content-type": "application/xml" }, body: "<a/>" });
    expect(xml.status).toBe(415);
    const r = await h2Request(path, { ...grpcHeaders(), "content-type": "application/grpc+xml" }, grpcFrame(Buffer.alloc(0)));
    expect([415, 200]).toContain(r.status);
    if (r.status === 200) expect(grpcStatusOf(r)).not.toBe(Code.Internal);
    // Malformed JSON for a Connect JSON call.
    const json = await fetch(`${t.mesh.urls.gateway}${path}`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${tenant.apiKey}` },
      body: '{"dispatchId": ',
    });
    expect(json.status).toBe(400);
    const jsonAnswer = (await json.json()) as { code: string; details?: [] };
    expect(jsonAnswer.code).toBe("invalid_argument");
    expect(connectErrorInfoOf(jsonAnswer)).toBe("MALFORMED_MESSAGE (request body)");
    await expectAlive();
  });

  it("answers a truncated gRPC frame over HTTP/2 with a proper status and keeps serving", async () => {
    const message = Buffer.from([0x0a, 0x1a, ...Buffer.from(ULID)]);
    // The frame says 100 bytes; the stream ends after 28.
    const r = await h2Request("/outpost.dispatch.v1.DispatchService/GetDispatch", grpcHeaders(), grpcFrame(message, 100));
    expect(grpcStatusOf(r)).toBe(Code.InvalidArgument);
    expect(grpcErrorInfoOf(r)).toBe("MALFORMED_FRAME (request body)");
    // A frame header cut in the middle.
    const cut = await h2Request("/outpost.dispatch.v1.DispatchService/GetDispatch", grpcHeaders(), Buffer.from([0, 0, 0]));
    expect(grpcStatusOf(cut)).toBe(Code.InvalidArgument);
    expect(grpcErrorInfoOf(cut)).toBe("MALFORMED_FRAME (request body)");
    // A protobuf message whose length prefix overruns it.
    const overrun = await h2Request("/outpost.dispatch.v1.DispatchService/GetDispatch", grpcHeaders(), grpcFrame(Buffer.from([0x0a, 0x7f, 0x41])));
    expect(grpcStatusOf(overrun)).toBe(Code.InvalidArgument);
    expect(grpcErrorInfoOf(overrun)).toBe("MALFORMED_MESSAGE (request body)");
    // The "compressed" flag with no grpc-encoding.
    const flagged = grpcFrame(message);
    flagged[0] = 1;
    const flaggedAnswer = await h2Request("/outpost.dispatch.v1.DispatchService/GetDispatch", grpcHeaders(), flagged);
    expect(grpcStatusOf(flaggedAnswer)).toBe(Code.InvalidArgument);
    expect(grpcErrorInfoOf(flaggedAnswer)).toBe("MALFORMED_COMPRESSION (request body)");
    // Two messages where a unary call takes one.
    const twice = Buffer.concat([grpcFrame(message), grpcFrame(message)]);
    const twiceAnswer = await h2Request("/outpost.dispatch.v1.DispatchService/GetDispatch", grpcHeaders(), twice);
    expect(grpcStatusOf(twiceAnswer)).toBe(Code.InvalidArgument);
    expect(grpcErrorInfoOf(twiceAnswer)).toBe("MALFORMED_FRAME (request body)");
    // A malformed deadline names its header.
    const late = await h2Request("/outpost.dispatch.v1.DispatchService/GetDispatch", { ...grpcHeaders(), "grpc-timeout": "1 hour" }, grpcFrame(message));
    expect(grpcStatusOf(late)).toBe(Code.InvalidArgument);
    expect(grpcErrorInfoOf(late)).toBe("MALFORMED_TIMEOUT grpc-timeout");
    await expectAlive();
  });

  it("survives a truncated HTTP/1.1 body and a connection dropped mid-request", async () => {
    const sendRaw = (payload: string) =>
      new Promise<string>((resolve) => {
        const socket = net.connect(Number(gw.port), gw.hostname);
        let answer = "";
        socket.on("data", (c) => (answer += c.toString()));
        socket.on("close", () => resolve(answer));
        socket.on("error", () => resolve(answer));
        socket.write(payload);
        // Half-close: no more bytes will come, though the body is short.
        socket.end();
        setTimeout(() => socket.destroy(), 5000).unref();
      });
    const partial = await sendRaw(
      `POST /outpost.dispatch.v1.DispatchService/GetDispatch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer ${tenant.apiKey}\r\nContent-Length: 100\r\n\r\n{"dispatchId":`,
    );
    // Either the server answered with a client error or it closed: never a 5xx.
    if (partial !== "") expect(partial).not.toMatch(/^HTTP\/1\.1 5/);
    await sendRaw("POST /outpost.dispatch.v1.DispatchService/GetDispatch HTTP/1.1\r\nHost: x\r\nContent-Le");
    await sendRaw("\x00\x01\x02garbage\r\n\r\n");
    await expectAlive();
  });
});

/** mulberry32: a small seeded PRNG, so a failing run can be replayed. */
function prng(seed: number) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

describe("randomized malformed requests (bounded)", () => {
  it("500 seeded requests over gRPC and Connect (unary and streams): every answer has a proper code and the gateway stays up", async () => {
    const seed = Number(process.env.OUTPOST_FUZZ_SEED ?? 20261123);
    const random = prng(seed);
    const pick = <T>(items: readonly T[]) => items[Math.floor(random() * items.length)]!;
    const methods = PUBLIC_SERVICES.flatMap(({ service }) => service.methods.map((m) => ({ path: `/${service.typeName}/${m.name}`, streaming: m.methodKind !== "unary" })));
    const randomBytes = (n: number) => Buffer.from(Array.from({ length: n }, () => Math.floor(random() * 256)));
    const junkJson = () =>
      pick([
        "{",
        "[]",
        "null",
        '{"dispatchId": 12}',
        '{"pageSize": "many"}',
        '{"task": "' + "\\ud800" + '"}',
        '{"agent":"demo","task":"x","timeout":"-9s"}',
        JSON.stringify({ dispatchId: randomBytes(8).toString("latin1") }),
        '{"state": "STATE_NOPE"}',
        randomBytes(20).toString("base64"),
      ]);
    const forbidden = new Set([Code.Internal, Code.Unknown, Code.DataLoss, Code.Unavailable, Code.DeadlineExceeded]);
    const bad: string[] = [];
    const TOTAL = 500;
    const started = Date.now();
    const session = http2.connect(gw.origin);
    session.on("error", () => {});

    const grpcCall = (path: string, body: Buffer) =>
      new Promise<number>((resolve) => {
        const req = session.request({ ":method": "POST", ":path": path, ...grpcHeaders() });
        let status: number | undefined;
        const timer = setTimeout(() => (req.close(http2.constants.NGHTTP2_CANCEL), resolve(-1)), 10_000);
        req.on("response", (h) => h["grpc-status"] !== undefined && (status = Number(h["grpc-status"])));
        req.on("trailers", (h) => (status = Number(h["grpc-status"])));
        req.on("data", () => {});
        req.on("close", () => (clearTimeout(timer), resolve(status ?? -2)));
        req.end(body);
      });
    /** An authenticated POST to the gateway; undefined when no answer came within 10 s. */
    const post = (path: string, contentType: string, body: Buffer | string) =>
      fetch(`${t.mesh.urls.gateway}${path}`, {
        method: "POST",
        headers: { "content-type": contentType, authorization: `Bearer ${tenant.apiKey}` },
        body,
        signal: AbortSignal.timeout(10_000),
      }).catch(() => undefined);
    const connectCall = async (path: string, json: boolean, body: Buffer | string) => {
      const res = await post(path, json ? "application/json" : "application/proto", body);
      if (!res) return "hang";
      const text = await res.text();
      if (res.status === 200) return "ok";
      try {
        return (JSON.parse(text) as { code: string }).code;
      } catch {
        return `http ${res.status}`;
      }
    };

    /** A Connect server stream: HTTP 200 and an end-of-stream message whose error names the code. */
    const connectStreamCall = async (path: string, json: boolean, body: Buffer) => {
      const res = await post(path, json ? "application/connect+json" : "application/connect+proto", body);
      if (!res) return "hang";
      const bytes = Buffer.from(await res.arrayBuffer().catch(() => new ArrayBuffer(0)));
      if (res.status !== 200) return `http ${res.status}`;
      const end = envelopesOf(bytes).find((e) => (e.flags & 2) !== 0);
      if (!end) return "no end";
      try {
        return (JSON.parse(end.message.toString()) as { error?: { code: string } }).error?.code ?? "ok";
      } catch {
        return "malformed end";
      }
    };

    const one = async (i: number) => {
      const { path, streaming } = pick(methods);
      const kind = streaming ? pick(["grpc", "connect-stream-proto", "connect-stream-json"] as const) : pick(["grpc", "connect-proto", "connect-json"] as const);
      if (kind === "connect-stream-proto" || kind === "connect-stream-json") {
        const json = kind === "connect-stream-json";
        const message = json ? Buffer.from(junkJson()) : randomBytes(Math.floor(random() * 64));
        const shape = random();
        const body =
          shape < 0.4 ? envelope(0, message)
          : shape < 0.55 ? envelope(0, message, message.length + 1 + Math.floor(random() * 1000)) // truncated
          : shape < 0.7 ? envelope(pick([1, 2, 3, 0x80]), message) // compressed or end-of-stream flags
          : shape < 0.85 ? Buffer.concat([envelope(0, message), envelope(0, message)]) // two messages
          : randomBytes(Math.floor(random() * 5)); // cut header
        const answer = await connectStreamCall(path, json, body);
        if (["hang", "internal", "unknown", "unavailable", "data_loss", "deadline_exceeded", "malformed end", "no end"].includes(answer) || answer.startsWith("http")) {
          bad.push(`#${i} ${kind} ${path}: ${answer}`);
        }
        return;
      }
      if (kind === "grpc") {
        const shape = random();
        const body =
          shape < 0.4 ? grpcFrame(randomBytes(Math.floor(random() * 64)))
          : shape < 0.6 ? grpcFrame(randomBytes(10), 10 + Math.floor(random() * 1000)) // truncated
          : shape < 0.8 ? Buffer.concat([Buffer.from([1]), randomBytes(20)]) // "compressed" flag without an encoding
          : randomBytes(Math.floor(random() * 5)); // cut header
        const status = await grpcCall(path, body);
        if (status < 0 || forbidden.has(status)) bad.push(`#${i} grpc ${path}: ${status}`);
      } else {
        const answer = await connectCall(path, kind === "connect-json", kind === "connect-json" ? junkJson() : randomBytes(Math.floor(random() * 64)));
        if (answer === "hang" || answer === "internal" || answer === "unknown" || answer === "unavailable" || answer.startsWith("http 5")) {
          bad.push(`#${i} ${kind} ${path}: ${answer}`);
        }
      }
    };
    // 8 at a time, stopping at the time bound whatever is left.
    let next = 0;
    await Promise.all(
      Array.from({ length: 8 }, async () => {
        while (next < TOTAL && Date.now() - started < 45_000) await one(next++);
      }),
    );
    session.close();
    expect(bad.slice(0, 20), `seed ${seed}: ${bad.length} bad answers`).toEqual([]);
    expect(next).toBeGreaterThanOrEqual(200); // the bound did not cut the run to nothing
    await expectAlive();
    expect(t.mesh.processes.get("gateway")!.exitCode).toBeNull();
  });
});
