/**
 * The audit trail (SPEC D9) across services: the tenant service's mutations — successful or
 * refused — land in the dispatcher's audit store next to the dispatcher's own, and each tenant
 * sees only its own events while the admin sees them all.
 */
import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, expect, it } from "vitest";
import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { AuditService } from "@outpost/proto/outpost/dispatch/v1/audit_service_pb.js";
import { startTestMesh, type TestMesh } from "./harness.ts";

let t: TestMesh;

beforeAll(async () => {
  t = await startTestMesh({ serviceEnv: { tenant: { OUTPOST_SECRETS_MASTER_KEYS: `k1:${randomBytes(32).toString("base64")}` } } });
});

afterAll(async () => {
  await t?.mesh.stop();
});

const audit = () => createClient(AuditService, createConnectTransport({ baseUrl: t.mesh.urls.gateway, httpVersion: "1.1" }));

it("records the tenant service's mutations with caller, target and outcome, per tenant", async () => {
  const a = await t.newTenant("Audited A");
  const b = await t.newTenant("Audited B");
  await a.clients.secrets.putSecret({ name: "API_TOKEN", value: "value-1234" });
  await expect(a.clients.secrets.putSecret({ name: "bad name", value: "x" })).rejects.toThrow();
  await expect(a.clients.secrets.putSecret({ name: "X".repeat(300), value: "x" })).rejects.toThrow();
  // An id past every bound is refused, and still recorded: its target clipped to the trail's 256.
  await expect(a.clients.apiKeys.revokeApiKey({ apiKeyId: "X".repeat(300) })).rejects.toThrow();
  const { apiKey } = await a.clients.apiKeys.createApiKey({ displayName: "ci" });
  await a.clients.apiKeys.revokeApiKey({ apiKeyId: apiKey!.id });
  await a.clients.dispatches.createDispatch({ agent: "demo", task: "audited" });

  const headers = (credential: string) => ({ authorization: `Bearer ${credential}` });
  const mine = await audit().listAuditEvents({}, { headers: headers(a.apiKey) });
  const seen = mine.events.map((e) => `${e.method.split("/")[1]} ${e.target} ${e.outcome}`);
  expect(seen).toEqual(
    expect.arrayContaining([
      "PutSecret secret/API_TOKEN OK",
      // A refused secret name may be a value given in the wrong argument: never written down.
      "PutSecret secret/(invalid name) INVALID_ARGUMENT",
      `RevokeApiKey api_key/${"X".repeat(247)}… INVALID_ARGUMENT`,
      `CreateApiKey api_key/${apiKey!.id} OK`,
      `RevokeApiKey api_key/${apiKey!.id} OK`,
      expect.stringMatching(/^CreateDispatch dispatch\/\S+ OK$/),
    ]),
  );
  expect(mine.events.every((e) => e.tenantId === a.tenantId)).toBe(true);
  expect(mine.events.find((e) => e.method.endsWith("/PutSecret"))?.principal).toMatch(/^key\//);

  const theirs = await audit().listAuditEvents({}, { headers: headers(b.apiKey) });
  expect(theirs.events.some((e) => e.tenantId === a.tenantId)).toBe(false);

  // The admin sees the tenant's creation under the new tenant, made by the admin.
  const admin = await audit().listAuditEvents({ tenantId: a.tenantId }, { headers: headers(t.adminToken) });
  expect(admin.events.find((e) => e.method === "outpost.tenant.v1.TenantService/CreateTenant")).toMatchObject({
    tenantId: a.tenantId,
    principal: "admin",
    target: `tenant/${a.tenantId}`,
    outcome: "OK",
  });
});
