/**
 * Tenant isolation (SPEC T4) over the real mesh: tenant B aims every tenant-facing method of
 * every service at tenant A's resources. Each attempt must answer exactly as for an id that
 * does not exist (same code, same ErrorInfo reason, the same message with the id in it), and
 * lists never show A's items. Each service checks the tenant itself: the same attempts made
 * directly at the service ports with a validly signed identity of B answer NOT_FOUND too.
 */
import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { DescService } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { errorInfoOf } from "@outpost/platform";
import { signAs } from "../support/signing.ts";
import { AuditInternalService, AuditService } from "@outpost/proto/outpost/dispatch/v1/audit_service_pb.js";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { DispatchService } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { LogService } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { ApiKeyService, SecretService, TenantService } from "@outpost/proto/outpost/tenant/v1/tenant_service_pb.js";
import { startTestMesh, type TestMesh } from "./harness.ts";

let t: TestMesh;
type TenantHandle = Awaited<ReturnType<TestMesh["newTenant"]>>;
let a: TenantHandle;
let b: TenantHandle;
let aDispatchId: string;
let aKeyId: string;
const A_SECRET = "A_ONLY_TOKEN";
/** Well-formed ids that exist nowhere. */
const MISSING_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
const MISSING_SECRET = "NO_SUCH_SECRET";

function gatewayClient<T extends DescService>(service: T, apiKey: string): Client<T> {
  return createClient(
    service,
    createGrpcTransport({
      baseUrl: t.mesh.urls.gateway,
      interceptors: [(next) => (req) => (req.header.set("authorization", `Bearer ${apiKey}`), next(req))],
    }),
  );
}

/** A client straight to a service port, signed as tenant B, as a compromised or buggy gateway would call. */
function directAsB<T extends DescService>(service: T, url: string): Client<T> {
  return createClient(
    service,
    createGrpcTransport({
      baseUrl: url,
      interceptors: [
        (next) => (req) => {
          signAs(req.header, { kind: "tenant", tenantId: b.tenantId, principal: "key/direct" }, req.service);
          return next(req);
        },
      ],
    }),
  );
}

async function outcome(call: () => Promise<unknown>): Promise<ConnectError | "ok"> {
  try {
    await call();
    return "ok";
  } catch (err) {
    return ConnectError.from(err);
  }
}

async function drain(stream: AsyncIterable<unknown>): Promise<void> {
  for await (const _ of stream) {
    // an isolated stream fails before its first message
  }
}

/** The attempt on A's id answers exactly as the same attempt on an id that does not exist. */
async function expectSameAsMissing(attempt: (id: string) => Promise<unknown>, foreignId: string, missingId: string, expectedCode = Code.NotFound) {
  const foreign = await outcome(() => attempt(foreignId));
  const missing = await outcome(() => attempt(missingId));
  expect(foreign, "the attempt on the other tenant's resource must fail").not.toBe("ok");
  expect(missing).not.toBe("ok");
  const f = foreign as ConnectError;
  const m = missing as ConnectError;
  expect(Code[f.code]).toBe(Code[expectedCode]);
  expect(Code[f.code]).toBe(Code[m.code]);
  expect(errorInfoOf(f)?.reason).toBe(errorInfoOf(m)?.reason);
  if (expectedCode === Code.NotFound) expect(f.rawMessage).toContain(foreignId);
  expect(f.rawMessage.replaceAll(foreignId, "<id>")).toBe(m.rawMessage.replaceAll(missingId, "<id>"));
}

beforeAll(async () => {
  t = await startTestMesh({ serviceEnv: { tenant: { OUTPOST_SECRETS_MASTER_KEYS: `k1:${randomBytes(32).toString("base64")}` } } });
  a = await t.newTenant("Tenant A");
  b = await t.newTenant("Tenant B");
  const created = await a.clients.dispatches.createDispatch({ agent: "demo", task: "isolated lines=2", labels: { owner: "a" } });
  aDispatchId = created.dispatch!.id;
  const key = await a.clients.apiKeys.createApiKey({ displayName: "a-second-key" });
  aKeyId = key.apiKey!.id;
  await gatewayClient(SecretService, a.apiKey).putSecret({ name: A_SECRET, value: "a-secret-value-1234" });
  // B owns something too, so its lists are not trivially empty.
  await b.clients.dispatches.createDispatch({ agent: "demo", task: "b's own run", labels: { owner: "a" } });
});

afterAll(async () => {
  await t?.mesh.stop();
});

describe("through the gateway, B on A's resources answers as for a missing id", () => {
  it("DispatchService.GetDispatch / CancelDispatch / WatchDispatch", async () => {
    const d = gatewayClient(DispatchService, b.apiKey);
    await expectSameAsMissing((id) => d.getDispatch({ dispatchId: id }), aDispatchId, MISSING_ID);
    await expectSameAsMissing((id) => d.cancelDispatch({ dispatchId: id }), aDispatchId, MISSING_ID);
    await expectSameAsMissing((id) => drain(d.watchDispatch({ dispatchId: id }, { timeoutMs: 10_000 })), aDispatchId, MISSING_ID);
    // A's run was not cancelled by B's attempt.
    const { dispatch } = await a.clients.dispatches.getDispatch({ dispatchId: aDispatchId });
    expect(dispatch!.tenantId).toBe(a.tenantId);
    expect(dispatch!.state).not.toBe(Dispatch_State.CANCELLED);
  });

  it("DispatchService.ListDispatches never includes A's dispatches, whatever the filter", async () => {
    const d = gatewayClient(DispatchService, b.apiKey);
    for (const req of [{}, { labels: { owner: "a" } }, { agent: "demo" }, { pageSize: 1000 }]) {
      const { dispatches } = await d.listDispatches(req);
      expect(dispatches.length).toBeGreaterThan(0);
      expect(dispatches.map((x) => x.id)).not.toContain(aDispatchId);
      expect(dispatches.every((x) => x.tenantId === b.tenantId)).toBe(true);
    }
  });

  it("LogService.SubscribeLogs / GetLogs", async () => {
    const logs = gatewayClient(LogService, b.apiKey);
    await expectSameAsMissing((id) => logs.getLogs({ dispatchId: id }), aDispatchId, MISSING_ID);
    await expectSameAsMissing((id) => drain(logs.subscribeLogs({ dispatchId: id }, { timeoutMs: 10_000 })), aDispatchId, MISSING_ID);
  });

  it("ApiKeyService.RevokeApiKey / ListApiKeys / CreateApiKey", async () => {
    const keys = gatewayClient(ApiKeyService, b.apiKey);
    await expectSameAsMissing((id) => keys.revokeApiKey({ apiKeyId: id }), aKeyId, MISSING_ID);
    const own = await keys.listApiKeys({});
    expect(own.apiKeys.map((k) => k.id)).not.toContain(aKeyId);
    expect(own.apiKeys.every((k) => k.tenantId === b.tenantId)).toBe(true);
    // Naming A's tenant does not reach A's keys: refused, or B's own.
    const named = await outcome(() => keys.listApiKeys({ tenantId: a.tenantId }));
    if (named === "ok") {
      const again = await keys.listApiKeys({ tenantId: a.tenantId });
      expect(again.apiKeys.map((k) => k.id)).not.toContain(aKeyId);
    } else expect([Code.PermissionDenied, Code.InvalidArgument, Code.NotFound]).toContain(named.code);
    // A key "for A" asked for with B's key: refused exactly as for a missing tenant, or made for B.
    let created;
    try {
      created = await keys.createApiKey({ tenantId: a.tenantId, displayName: "sneaky" });
    } catch {
      await expectSameAsMissing((id) => keys.createApiKey({ tenantId: id, displayName: "sneaky" }), a.tenantId, MISSING_ID);
    }
    if (created) expect(created.apiKey!.tenantId).toBe(b.tenantId);
    // A's key still works.
    const aKeys = await gatewayClient(ApiKeyService, a.apiKey).listApiKeys({});
    expect(aKeys.apiKeys.find((k) => k.id === aKeyId)?.revokeTime).toBeUndefined();
  });

  it("SecretService.DeleteSecret / ListSecrets / PutSecret", async () => {
    const secrets = gatewayClient(SecretService, b.apiKey);
    await expectSameAsMissing((name) => secrets.deleteSecret({ name }), A_SECRET, MISSING_SECRET);
    const { secrets: listed } = await secrets.listSecrets({});
    expect(listed.map((s) => s.name)).not.toContain(A_SECRET);
    // B's secret of the same name is B's; A still has its own.
    await secrets.putSecret({ name: A_SECRET, value: "b-value-5678" });
    await secrets.deleteSecret({ name: A_SECRET });
    const aList = await gatewayClient(SecretService, a.apiKey).listSecrets({});
    expect(aList.secrets.map((s) => s.name)).toContain(A_SECRET);
  });

  it("AuditService.ListAuditEvents shows only B's events, and never A's on request", async () => {
    const audit = gatewayClient(AuditService, b.apiKey);
    const { events } = await audit.listAuditEvents({});
    expect(events.length).toBeGreaterThan(0); // B created a key and a secret
    expect(events.every((e) => e.tenantId === b.tenantId)).toBe(true);
    const named = await outcome(() => audit.listAuditEvents({ tenantId: a.tenantId }));
    expect(named).not.toBe("ok");
  });

  it("AuditInternalService is not reachable at the edge", async () => {
    const forged = await outcome(() =>
      gatewayClient(AuditInternalService, b.apiKey).recordAuditEvent({ tenantId: a.tenantId, principal: "key/x", method: "m", target: aDispatchId, outcome: "OK" }),
    );
    expect((forged as ConnectError).code).toBe(Code.Unimplemented);
  });

  it("TenantService.GetTenant on A answers as on a missing tenant (admin only)", async () => {
    const tenants = gatewayClient(TenantService, b.apiKey);
    await expectSameAsMissing((id) => tenants.getTenant({ tenantId: id }), a.tenantId, MISSING_ID, Code.PermissionDenied);
    await expectSameAsMissing((id) => tenants.suspendTenant({ tenantId: id, reason: "x" }), a.tenantId, MISSING_ID, Code.PermissionDenied);
  });
});

describe("each service checks the tenant itself (direct calls signed as B)", () => {
  it("dispatcher: GetDispatch, CancelDispatch, WatchDispatch, ListDispatches", async () => {
    const d = directAsB(DispatchService, t.mesh.urls.dispatcher);
    await expectSameAsMissing((id) => d.getDispatch({ dispatchId: id }), aDispatchId, MISSING_ID);
    await expectSameAsMissing((id) => d.cancelDispatch({ dispatchId: id }), aDispatchId, MISSING_ID);
    await expectSameAsMissing((id) => drain(d.watchDispatch({ dispatchId: id }, { timeoutMs: 10_000 })), aDispatchId, MISSING_ID);
    const { dispatches } = await d.listDispatches({ pageSize: 1000 });
    expect(dispatches.map((x) => x.id)).not.toContain(aDispatchId);
  });

  it("telemetry: GetLogs, SubscribeLogs", async () => {
    const logs = directAsB(LogService, t.mesh.urls.telemetry);
    await expectSameAsMissing((id) => logs.getLogs({ dispatchId: id }), aDispatchId, MISSING_ID);
    await expectSameAsMissing((id) => drain(logs.subscribeLogs({ dispatchId: id }, { timeoutMs: 10_000 })), aDispatchId, MISSING_ID);
  });

  it("tenant: RevokeApiKey, DeleteSecret, ListApiKeys, ListSecrets", async () => {
    const keys = directAsB(ApiKeyService, t.mesh.urls.tenant);
    const secrets = directAsB(SecretService, t.mesh.urls.tenant);
    await expectSameAsMissing((id) => keys.revokeApiKey({ apiKeyId: id }), aKeyId, MISSING_ID);
    await expectSameAsMissing((name) => secrets.deleteSecret({ name }), A_SECRET, MISSING_SECRET);
    expect((await keys.listApiKeys({})).apiKeys.map((k) => k.id)).not.toContain(aKeyId);
    expect((await secrets.listSecrets({})).secrets.map((s) => s.name)).not.toContain(A_SECRET);
  });

  it("dispatcher: ListAuditEvents", async () => {
    const { events } = await directAsB(AuditService, t.mesh.urls.dispatcher).listAuditEvents({});
    expect(events.every((e) => e.tenantId === b.tenantId)).toBe(true);
  });
});
