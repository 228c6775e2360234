import { beforeEach, describe, expect, it } from "vitest";
import { Code } from "@connectrpc/connect";
import { errorInfoOf } from "@outpost/platform";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { toJsonString } from "@bufbuild/protobuf";
import { TenantInternalService } from "@outpost/proto/outpost/tenant/v1/tenant_internal_service_pb.js";
import { ApiKeySchema, Tenant_State, Tier } from "@outpost/proto/outpost/tenant/v1/tenant_pb.js";
import { ApiKeyService, TenantService } from "@outpost/proto/outpost/tenant/v1/tenant_service_pb.js";
import { generateApiKey } from "../src/core/api-keys.ts";
import type { TenantCores } from "../src/routes.ts";
import { SqliteTenantStore } from "../src/store/sqlite-store.ts";
import { ADMIN, GATEWAY, buildCores, clientFor, expectError, tenantIdentity } from "./helpers.ts";

let store: SqliteTenantStore;
let core: TenantCores;

beforeEach(() => {
  store = new SqliteTenantStore(":memory:");
  core = buildCores(store);
});

const admin = () => clientFor(core, TenantService, ADMIN);
const gateway = () => clientFor(core, TenantInternalService, GATEWAY);

async function createTenant(tier = Tier.PRO) {
  return admin().createTenant({ name: "Acme Robotics", contactEmail: "ops@acme.test", tier });
}

async function expectInvalid(call: Promise<unknown>, field: string) {
  const err = await expectError(call, Code.InvalidArgument);
  expect(errorInfoOf(err)?.metadata.field).toBe(field);
  expect(err.rawMessage).toContain(field);
}

describe("TenantService.CreateTenant", () => {
  it("creates an active tenant and returns its first key once, masked in api_key", async () => {
    const res = await createTenant();
    expect(res.tenant?.state).toBe(Tenant_State.ACTIVE);
    expect(res.tenant?.tier).toBe(Tier.PRO);
    expect(res.tenant?.name).toBe("Acme Robotics");
    expect(res.tenant?.id).toMatch(/^[0-9A-HJKMNP-TV-Z]{26}$/);
    expect(res.apiKeyPlaintext).toMatch(/^otp_[0-9a-f]{64}$/);
    expect(res.apiKey?.displayName).toBe("default");
    expect(res.apiKey?.tenantId).toBe(res.tenant?.id);
    expect(res.apiKey?.prefix).toBe(res.apiKeyPlaintext.slice(0, 8));
    expect(res.apiKey?.lastFour).toBe(res.apiKeyPlaintext.slice(-4));
    expect(toJsonString(ApiKeySchema, res.apiKey!)).not.toContain(res.apiKeyPlaintext.slice(8, -4));
    expect(res.apiKey?.revokeTime).toBeUndefined();
  });

  it("defaults an unspecified tier to TIER_FREE", async () => {
    const res = await createTenant(Tier.UNSPECIFIED);
    expect(res.tenant?.tier).toBe(Tier.FREE);
  });

  it("refuses invalid input naming the field", async () => {
    const ok = { name: "Acme", contactEmail: "ops@acme.test", tier: Tier.FREE };
    await expectInvalid(admin().createTenant({ ...ok, name: "" }), "name");
    await expectInvalid(admin().createTenant({ ...ok, name: "   " }), "name");
    await expectInvalid(admin().createTenant({ ...ok, name: "x".repeat(201) }), "name");
    await expectInvalid(admin().createTenant({ ...ok, name: "bad\u0000name" }), "name");
    await expectInvalid(admin().createTenant({ ...ok, name: "line\nbreak" }), "name");
    await expectInvalid(admin().createTenant({ ...ok, contactEmail: "" }), "contact_email");
    await expectInvalid(admin().createTenant({ ...ok, contactEmail: "not-an-email" }), "contact_email");
    await expectInvalid(admin().createTenant({ ...ok, contactEmail: "a@b" }), "contact_email");
    await expectInvalid(admin().createTenant({ ...ok, contactEmail: "a b@c.test" }), "contact_email");
    await expectInvalid(admin().createTenant({ ...ok, contactEmail: `${"a".repeat(64)}@${"b".repeat(250)}.test` }), "contact_email");
    await expectInvalid(admin().createTenant({ ...ok, tier: 99 as Tier }), "tier");
    // Boundaries that are fine.
    await admin().createTenant({ ...ok, name: "x".repeat(200) });
    await admin().createTenant({ ...ok, name: "Ünïcødé 株式会社", contactEmail: "first.last+ops@sub.example.co.uk" });
  });

  it("is refused to tenants and services", async () => {
    const { tenant } = await createTenant();
    await expectError(
      clientFor(core, TenantService, tenantIdentity(tenant!.id)).createTenant({ name: "X", contactEmail: "x@y.test" }),
      Code.PermissionDenied,
      "ADMIN_REQUIRED",
    );
    await expectError(
      clientFor(core, TenantService, GATEWAY).createTenant({ name: "X", contactEmail: "x@y.test" }),
      Code.PermissionDenied,
      "ADMIN_REQUIRED",
    );
  });
});

describe("TenantService.GetTenant", () => {
  it("returns the tenant", async () => {
    const created = await createTenant();
    const res = await admin().getTenant({ tenantId: created.tenant!.id });
    expect(res.tenant).toEqual(created.tenant);
  });

  it("needs a ULID and answers NOT_FOUND for a missing tenant", async () => {
    await expectInvalid(admin().getTenant({ tenantId: "" }), "tenant_id");
    await expectInvalid(admin().getTenant({ tenantId: "nope" }), "tenant_id");
    await expectError(admin().getTenant({ tenantId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }), Code.NotFound, "TENANT_NOT_FOUND");
  });

  it("is admin only", async () => {
    const { tenant } = await createTenant();
    await expectError(
      clientFor(core, TenantService, tenantIdentity(tenant!.id)).getTenant({ tenantId: tenant!.id }),
      Code.PermissionDenied,
    );
  });
});

describe("ApiKeyService.CreateApiKey", () => {
  it("a tenant creates a key for itself; it authenticates to that tenant", async () => {
    const { tenant } = await createTenant();
    const res = await clientFor(core, ApiKeyService, tenantIdentity(tenant!.id)).createApiKey({ displayName: "ci" });
    expect(res.apiKey?.tenantId).toBe(tenant!.id);
    expect(res.apiKey?.displayName).toBe("ci");
    expect(res.apiKeyPlaintext).toMatch(/^otp_[0-9a-f]{64}$/);
    const auth = await gateway().authenticateApiKey({ apiKey: res.apiKeyPlaintext });
    expect(auth.tenant?.id).toBe(tenant!.id);
    expect(auth.apiKeyId).toBe(res.apiKey?.id);
  });

  it("a tenant naming another tenant gets NOT_FOUND, as for a missing one", async () => {
    const a = await createTenant();
    const b = await createTenant();
    await expectError(
      clientFor(core, ApiKeyService, tenantIdentity(a.tenant!.id)).createApiKey({ tenantId: b.tenant!.id, displayName: "x" }),
      Code.NotFound,
      "TENANT_NOT_FOUND",
    );
    // Naming itself is fine.
    await clientFor(core, ApiKeyService, tenantIdentity(a.tenant!.id)).createApiKey({ tenantId: a.tenant!.id });
  });

  it("the admin must name an existing tenant", async () => {
    const { tenant } = await createTenant();
    const k = clientFor(core, ApiKeyService, ADMIN);
    await expectInvalid(k.createApiKey({ displayName: "x" }), "tenant_id");
    await expectError(k.createApiKey({ tenantId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }), Code.NotFound, "TENANT_NOT_FOUND");
    const res = await k.createApiKey({ tenantId: tenant!.id, displayName: "ops" });
    expect(res.apiKey?.tenantId).toBe(tenant!.id);
  });

  it("checks display_name", async () => {
    const { tenant } = await createTenant();
    const k = clientFor(core, ApiKeyService, tenantIdentity(tenant!.id));
    await expectInvalid(k.createApiKey({ displayName: "x".repeat(101) }), "display_name");
    await expectInvalid(k.createApiKey({ displayName: "tab\there" }), "display_name");
    await k.createApiKey({ displayName: "x".repeat(100) });
  });

  it("is refused to services", async () => {
    await expectError(clientFor(core, ApiKeyService, GATEWAY).createApiKey({}), Code.PermissionDenied);
  });
});

describe("TenantInternalService.AuthenticateApiKey", () => {
  it("resolves a key to its tenant and records the use", async () => {
    const created = await createTenant();
    const res = await gateway().authenticateApiKey({ apiKey: created.apiKeyPlaintext });
    expect(res.tenant).toEqual(created.tenant);
    expect(res.apiKeyId).toBe(created.apiKey?.id);
    const key = await store.getApiKey(created.apiKey!.id);
    expect(key?.lastUsedTime).not.toBeNull();
    expect(Math.abs(key!.lastUsedTime!.getTime() - Date.now())).toBeLessThan(5000);
    expect(timestampDate(created.apiKey!.createTime!).getTime()).toBeLessThanOrEqual(key!.lastUsedTime!.getTime());
  });

  it("a malformed key is UNAUTHENTICATED API_KEY_MALFORMED", async () => {
    const good = generateApiKey().plaintext;
    for (const bad of ["otp_123", good.toUpperCase(), `Bearer ${good}`, `${good} `, "sk_" + "a".repeat(64)]) {
      const err = await expectError(gateway().authenticateApiKey({ apiKey: bad }), Code.Unauthenticated, "API_KEY_MALFORMED");
      expect(err.rawMessage).toMatch(/malformed/);
    }
  });

  it("an empty key is UNAUTHENTICATED API_KEY_MISSING", async () => {
    const err = await expectError(gateway().authenticateApiKey({ apiKey: "" }), Code.Unauthenticated, "API_KEY_MISSING");
    expect(err.rawMessage).toMatch(/no API key/);
  });

  it("an unknown key is UNAUTHENTICATED API_KEY_UNKNOWN", async () => {
    await createTenant();
    const err = await expectError(
      gateway().authenticateApiKey({ apiKey: generateApiKey().plaintext }),
      Code.Unauthenticated,
      "API_KEY_UNKNOWN",
    );
    expect(err.rawMessage).toMatch(/not recognised/);
  });

  it("a revoked key is UNAUTHENTICATED API_KEY_REVOKED and names no tenant", async () => {
    const created = await createTenant();
    await store.revokeApiKey(created.apiKey!.id, new Date());
    const err = await expectError(
      gateway().authenticateApiKey({ apiKey: created.apiKeyPlaintext }),
      Code.Unauthenticated,
      "API_KEY_REVOKED",
    );
    expect(err.rawMessage).toMatch(/revoked/);
    expect(err.message).not.toContain(created.tenant!.id);
    expect(err.message).not.toContain("Acme");
    expect(JSON.stringify(errorInfoOf(err)?.metadata)).not.toContain(created.tenant!.id);
  });

  it("a suspended tenant's key is PERMISSION_DENIED TENANT_SUSPENDED", async () => {
    const created = await createTenant();
    await store.transitionTenantState(created.tenant!.id, "active", "suspended", new Date());
    const err = await expectError(
      gateway().authenticateApiKey({ apiKey: created.apiKeyPlaintext }),
      Code.PermissionDenied,
      "TENANT_SUSPENDED",
    );
    expect(err.message).not.toContain(created.tenant!.id);
    expect(err.message).not.toContain("Acme");
  });

  it("is refused to tenants, admins and services other than the gateway", async () => {
    const created = await createTenant();
    for (const identity of [tenantIdentity(created.tenant!.id), ADMIN, { kind: "service" as const, principal: "executor/host-1" }]) {
      await expectError(
        clientFor(core, TenantInternalService, identity).authenticateApiKey({ apiKey: created.apiKeyPlaintext }),
        Code.PermissionDenied,
        "SERVICE_REQUIRED",
      );
    }
  });
});
