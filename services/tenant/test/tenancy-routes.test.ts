/**
 * Issue #3 tenancy methods through the real routes over an in-process transport: tenants
 * admin, keys, secrets, admission, isolation between tenants (SPEC T4) and bad input.
 */
import { beforeEach, describe, expect, it } from "vitest";
import { Code } from "@connectrpc/connect";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { errorInfoOf, type Identity } from "@outpost/platform";
import { QuotaFailureSchema } from "@outpost/proto/google/rpc/error_details_pb.js";
import { TenantInternalService } from "@outpost/proto/outpost/tenant/v1/tenant_internal_service_pb.js";
import { Tenant_State, Tier } from "@outpost/proto/outpost/tenant/v1/tenant_pb.js";
import { ApiKeyService, SecretService, TenantService } from "@outpost/proto/outpost/tenant/v1/tenant_service_pb.js";
import { ulid } from "ulid";
import { SecretBox } from "../src/core/secret-box.ts";
import { DEFAULT_TIERS, tiersFrom } from "../src/core/tiers.ts";
import { AUTH_INVALIDATE_CHANNEL, publishingInvalidation } from "../src/core/invalidation.ts";
import { hashApiKey } from "../src/core/api-keys.ts";
import type { TenantCores } from "../src/routes.ts";
import { SqliteTenantStore } from "../src/store/sqlite-store.ts";
import { ADMIN, GATEWAY, TEST_MASTER_KEYS, buildCores, clientFor, expectError, tenantIdentity } from "./helpers.ts";
import { grantOf } from "../../../test/support/signing.ts";

const DISPATCHER: Identity = { kind: "service", principal: "dispatcher" };
const EXECUTOR: Identity = { kind: "service", principal: "executor/host-1" };
const MISSING = "01ARZ3NDEKTSV4RRFFQ69G5FAV";

let store: SqliteTenantStore;
let cores: TenantCores;
let published: [string, string][];
let now: Date;

beforeEach(() => {
  store = new SqliteTenantStore(":memory:");
  published = [];
  now = new Date("2025-06-01T10:00:00Z");
  const publisher = {
    publish: (channel: string, message: string) => {
      published.push([channel, message]);
      return Promise.resolve(1);
    },
  };
  cores = buildCores(store, {
    tiers: tiersFrom({ free: { concurrent_runs: 2, runs_per_day: 3, max_timeout_seconds: 120 } }),
    invalidation: publishingInvalidation(publisher, { warn: () => {} }),
    now: () => now,
  });
});

const admin = () => clientFor(cores, TenantService, ADMIN);
const keysAs = (identity: Identity) => clientFor(cores, ApiKeyService, identity);
const secretsAs = (tenantId: string) => clientFor(cores, SecretService, tenantIdentity(tenantId));
const internal = (identity: Identity) => clientFor(cores, TenantInternalService, identity);

async function newTenant(tier = Tier.FREE, name = "Acme") {
  const res = await admin().createTenant({ name, contactEmail: "ops@acme.test", tier });
  return { id: res.tenant!.id, key: res.apiKeyPlaintext, keyId: res.apiKey!.id };
}

async function expectInvalid(call: Promise<unknown>, field: string) {
  const err = await expectError(call, Code.InvalidArgument);
  expect(errorInfoOf(err)?.metadata.field).toBe(field);
  expect(err.rawMessage).toContain(field);
}

describe("tenant administration", () => {
  it("lists tenants page by page with opaque tokens", async () => {
    const ids = [];
    for (let i = 0; i < 5; i++) ids.push((await newTenant(Tier.FREE, `T${i}`)).id);
    const seen: string[] = [];
    let pageToken = "";
    let pages = 0;
    do {
      const page = await admin().listTenants({ pageSize: 2, pageToken });
      expect(page.tenants.length).toBeLessThanOrEqual(2);
      seen.push(...page.tenants.map((t) => t.id));
      pageToken = page.nextPageToken;
      pages++;
    } while (pageToken);
    expect(pages).toBe(3);
    expect(seen).toEqual([...ids].sort());
    await expectInvalid(admin().listTenants({ pageToken: "garbage!" }), "page_token");
    await expectInvalid(admin().listTenants({ pageSize: -1 }), "page_size");
    await expectInvalid(admin().listTenants({ pageSize: 100_000 }), "page_size");
  });

  it("sets the tier, which the gateway then sees in the key's limits", async () => {
    const t = await newTenant(Tier.FREE);
    const before = await internal(GATEWAY).authenticateApiKey({ apiKey: t.key });
    expect(before.limits?.concurrentRuns).toBe(2);
    expect(before.limits?.maxTimeout?.seconds).toBe(120n);
    const updated = await admin().updateTenant({ tenantId: t.id, tier: Tier.PRO });
    expect(updated.tenant?.tier).toBe(Tier.PRO);
    const after = await internal(GATEWAY).authenticateApiKey({ apiKey: t.key });
    expect(after.limits).toMatchObject({ concurrentRuns: 10, runsPerDay: 500, createPerMinute: 100, triggerPerMinute: 500, readPerMinute: 1000 });
    expect(after.limits?.maxTimeout?.seconds).toBe(1800n);
    await expectInvalid(admin().updateTenant({ tenantId: t.id, tier: Tier.UNSPECIFIED }), "tier");
    await expectInvalid(admin().updateTenant({ tenantId: t.id, tier: 42 as Tier }), "tier");
    await expectInvalid(admin().updateTenant({ tier: Tier.PRO }), "tenant_id");
    await expectError(admin().updateTenant({ tenantId: MISSING, tier: Tier.PRO }), Code.NotFound, "TENANT_NOT_FOUND");
  });

  it("suspends with a reason: keys answer PERMISSION_DENIED with it, gateways are told, dispatcher sees it", async () => {
    const t = await newTenant();
    const other = await newTenant();
    const res = await admin().suspendTenant({ tenantId: t.id, reason: "unpaid invoice" });
    expect(res.tenant?.state).toBe(Tenant_State.SUSPENDED);
    expect(res.tenant?.suspendReason).toBe("unpaid invoice");
    expect(published).toEqual([[AUTH_INVALIDATE_CHANNEL, `tenant:${t.id}`]]);

    const err = await expectError(internal(GATEWAY).authenticateApiKey({ apiKey: t.key }), Code.PermissionDenied, "TENANT_SUSPENDED");
    expect(err.rawMessage).toContain("unpaid invoice");
    expect(err.rawMessage).not.toContain(t.id);
    expect((await internal(DISPATCHER).listSuspendedTenants({})).tenantIds).toEqual([t.id]);
    await expectError(
      internal(DISPATCHER).admitDispatch({ tenantId: t.id, dispatchId: ulid() }),
      Code.PermissionDenied,
      "TENANT_SUSPENDED",
    );
    await expectError(admin().suspendTenant({ tenantId: t.id, reason: "again" }), Code.FailedPrecondition, "TENANT_ALREADY_SUSPENDED");
    await expectError(admin().reactivateTenant({ tenantId: other.id }), Code.FailedPrecondition, "TENANT_NOT_SUSPENDED");

    const back = await admin().reactivateTenant({ tenantId: t.id });
    expect(back.tenant?.state).toBe(Tenant_State.ACTIVE);
    expect(back.tenant?.suspendReason).toBe("");
    expect((await internal(GATEWAY).authenticateApiKey({ apiKey: t.key })).tenant?.id).toBe(t.id);
    expect((await internal(DISPATCHER).listSuspendedTenants({})).tenantIds).toEqual([]);

    await expectInvalid(admin().suspendTenant({ tenantId: t.id }), "reason");
    await expectInvalid(admin().suspendTenant({ tenantId: t.id, reason: "x".repeat(501) }), "reason");
    await expectInvalid(admin().suspendTenant({ tenantId: t.id, reason: "bad\u0007" }), "reason");
    // Names and reasons that would show as something else in a list: direction overrides, zero-width space.
    await expectInvalid(admin().suspendTenant({ tenantId: t.id, reason: "paid\u202Edeifitrec" }), "reason");
    await expectInvalid(admin().createTenant({ name: "\u202Eevil\u200B", contactEmail: "e@e.test" }), "name");
    await expectInvalid(admin().createTenant({ name: "Acme\u2066 Corp", contactEmail: "e@e.test" }), "name");
    // Every other format character (\p{Cf}) and the Hangul fillers show as nothing too: word
    // joiner, soft hyphen, zero-width non-joiner, Mongolian vowel separator, tag characters.
    for (const hidden of ["\u2060", "\u00AD", "\u200C", "\u180E", "\u{E0001}", "\u{E0041}", "\u{E007F}", "\u3164", "\uFFA0", "\u115F", "\u1160"]) {
      await expectInvalid(admin().createTenant({ name: `Acme${hidden}Corp`, contactEmail: "e@e.test" }), "name");
      await expectInvalid(admin().createTenant({ name: hidden, contactEmail: "e@e.test" }), "name");
      await expectInvalid(admin().suspendTenant({ tenantId: t.id, reason: `late${hidden}` }), "reason");
    }
    // Nothing visible once the joiners are set aside: refused, even though joiners are allowed.
    await expectInvalid(admin().createTenant({ name: "\u200D", contactEmail: "e@e.test" }), "name");
    await expectInvalid(admin().createTenant({ name: "\u200D \u200D", contactEmail: "e@e.test" }), "name");
    // An emoji sequence joined by zero-width joiners is a name like any other.
    expect((await admin().createTenant({ name: "Team \u{1F469}\u200D\u{1F4BB}", contactEmail: "e@e.test" })).tenant?.name).toBe("Team \u{1F469}\u200D\u{1F4BB}");
    await expectInvalid(admin().suspendTenant({ reason: "r" }), "tenant_id");
    await expectInvalid(admin().reactivateTenant({ tenantId: "nope" }), "tenant_id");
    await expectError(admin().suspendTenant({ tenantId: MISSING, reason: "r" }), Code.NotFound, "TENANT_NOT_FOUND");
    await expectError(admin().reactivateTenant({ tenantId: MISSING }), Code.NotFound, "TENANT_NOT_FOUND");
  });

  it("every admin method refuses tenant keys and services (SPEC T6)", async () => {
    const t = await newTenant();
    for (const identity of [tenantIdentity(t.id), GATEWAY, DISPATCHER]) {
      const c = clientFor(cores, TenantService, identity);
      const calls = [
        c.createTenant({ name: "X", contactEmail: "x@y.test" }),
        c.getTenant({ tenantId: t.id }),
        c.listTenants({}),
        c.updateTenant({ tenantId: t.id, tier: Tier.PRO }),
        c.suspendTenant({ tenantId: t.id, reason: "r" }),
        c.reactivateTenant({ tenantId: t.id }),
      ];
      for (const call of calls) await expectError(call, Code.PermissionDenied, "ADMIN_REQUIRED");
    }
    expect((await admin().getTenant({ tenantId: t.id })).tenant?.state).toBe(Tenant_State.ACTIVE);
  });
});

describe("API keys", () => {
  it("lists keys masked (prefix and last four), with last-used time", async () => {
    const t = await newTenant();
    const second = await keysAs(tenantIdentity(t.id)).createApiKey({ displayName: "ci" });
    await internal(GATEWAY).authenticateApiKey({ apiKey: second.apiKeyPlaintext });
    const { apiKeys } = await keysAs(tenantIdentity(t.id)).listApiKeys({});
    expect(apiKeys.map((k) => k.displayName)).toEqual(["default", "ci"]);
    const shown = apiKeys.find((k) => k.id === second.apiKey!.id)!;
    expect(shown.prefix).toBe(second.apiKeyPlaintext.slice(0, 8));
    expect(shown.lastFour).toBe(second.apiKeyPlaintext.slice(-4));
    expect(shown.lastUsedTime).toBeDefined();
    expect(apiKeys.find((k) => k.displayName === "default")!.lastUsedTime).toBeUndefined();
    expect(JSON.stringify(apiKeys, (_k, v: unknown) => (typeof v === "bigint" ? String(v) : v))).not.toContain(second.apiKeyPlaintext.slice(8, -4));
    // The admin names the tenant.
    expect((await keysAs(ADMIN).listApiKeys({ tenantId: t.id })).apiKeys).toHaveLength(2);
    await expectInvalid(keysAs(ADMIN).listApiKeys({}), "tenant_id");
    await expectError(keysAs(ADMIN).listApiKeys({ tenantId: MISSING }), Code.NotFound, "TENANT_NOT_FOUND");
    // Paging.
    const page = await keysAs(ADMIN).listApiKeys({ tenantId: t.id, pageSize: 1 });
    expect(page.apiKeys).toHaveLength(1);
    const rest = await keysAs(ADMIN).listApiKeys({ tenantId: t.id, pageSize: 1, pageToken: page.nextPageToken });
    expect(rest.apiKeys.map((k) => k.id)).toEqual([second.apiKey!.id]);
    expect(rest.nextPageToken).toBe("");
  });

  it("revokes: the key stops authenticating, gateways get its hash, revoking again changes nothing", async () => {
    const t = await newTenant();
    const res = await keysAs(tenantIdentity(t.id)).revokeApiKey({ apiKeyId: t.keyId });
    expect(res.apiKey?.revokeTime).toBeDefined();
    expect(published).toEqual([[AUTH_INVALIDATE_CHANNEL, hashApiKey(t.key)]]);
    await expectError(internal(GATEWAY).authenticateApiKey({ apiKey: t.key }), Code.Unauthenticated, "API_KEY_REVOKED");
    const again = await keysAs(ADMIN).revokeApiKey({ apiKeyId: t.keyId });
    expect(again.apiKey?.revokeTime).toEqual(res.apiKey?.revokeTime);
    expect(published).toHaveLength(1);
    await expectInvalid(keysAs(ADMIN).revokeApiKey({}), "api_key_id");
    await expectError(keysAs(ADMIN).revokeApiKey({ apiKeyId: MISSING }), Code.NotFound, "API_KEY_NOT_FOUND");
    await expectError(keysAs(GATEWAY).revokeApiKey({ apiKeyId: t.keyId }), Code.PermissionDenied, "TENANT_OR_ADMIN_REQUIRED");
  });
});

describe("isolation between tenants (SPEC T4)", () => {
  it("another tenant's keys and secrets answer exactly like missing ones, and lists leave them out", async () => {
    const a = await newTenant(Tier.FREE, "A");
    const b = await newTenant(Tier.FREE, "B");
    await secretsAs(b.id).putSecret({ name: "B_TOKEN", value: "b-secret-value" });

    const cross = await expectError(keysAs(tenantIdentity(a.id)).revokeApiKey({ apiKeyId: b.keyId }), Code.NotFound, "API_KEY_NOT_FOUND");
    const missing = await expectError(keysAs(tenantIdentity(a.id)).revokeApiKey({ apiKeyId: MISSING }), Code.NotFound, "API_KEY_NOT_FOUND");
    expect(cross.rawMessage.replace(b.keyId, "ID")).toBe(missing.rawMessage.replace(MISSING, "ID"));
    await internal(GATEWAY).authenticateApiKey({ apiKey: b.key }); // B's key still works

    const crossList = await expectError(keysAs(tenantIdentity(a.id)).listApiKeys({ tenantId: b.id }), Code.NotFound, "TENANT_NOT_FOUND");
    const missingList = await expectError(keysAs(tenantIdentity(a.id)).listApiKeys({ tenantId: MISSING }), Code.NotFound, "TENANT_NOT_FOUND");
    expect(crossList.rawMessage.replace(b.id, "ID")).toBe(missingList.rawMessage.replace(MISSING, "ID"));
    expect((await keysAs(tenantIdentity(a.id)).listApiKeys({})).apiKeys.every((k) => k.tenantId === a.id)).toBe(true);
    // A tenant naming a malformed id gets INVALID_ARGUMENT as the admin does, not a NOT_FOUND
    // that echoes whatever it sent (100 KB of it broke the gateway's HTTP/2 frame).
    for (const junk of ["bad id", "x".repeat(100_000)]) {
      await expectInvalid(keysAs(tenantIdentity(a.id)).listApiKeys({ tenantId: junk }), "tenant_id");
      const err = await expectError(keysAs(tenantIdentity(a.id)).createApiKey({ tenantId: junk, displayName: "x" }), Code.InvalidArgument);
      expect(err.rawMessage.length).toBeLessThan(300);
    }

    const crossDelete = await expectError(secretsAs(a.id).deleteSecret({ name: "B_TOKEN" }), Code.NotFound, "SECRET_NOT_FOUND");
    const missingDelete = await expectError(secretsAs(a.id).deleteSecret({ name: "NOPE_TOKEN" }), Code.NotFound, "SECRET_NOT_FOUND");
    expect(crossDelete.rawMessage.replace("B_TOKEN", "N")).toBe(missingDelete.rawMessage.replace("NOPE_TOKEN", "N"));
    expect((await secretsAs(a.id).listSecrets({})).secrets).toEqual([]);
    // A's dispatch naming B's secret is refused as missing; B's still exists.
    await expectError(
      internal(DISPATCHER).admitDispatch({ tenantId: a.id, dispatchId: ulid(), secretNames: ["B_TOKEN"] }),
      Code.NotFound,
      "SECRET_NOT_FOUND",
    );
    await expectError(internal(EXECUTOR).resolveSecrets({ tenantId: a.id, names: ["B_TOKEN"], grant: grantOf(a.id, ["B_TOKEN"]) }), Code.NotFound, "SECRET_NOT_FOUND");
    expect((await internal(EXECUTOR).resolveSecrets({ tenantId: b.id, names: ["B_TOKEN"], grant: grantOf(b.id, ["B_TOKEN"]) })).values).toEqual({ B_TOKEN: "b-secret-value" });
  });
});

describe("secrets", () => {
  it("puts, lists names only, replaces, deletes; resolves values for executors only", async () => {
    const t = await newTenant();
    const put = await secretsAs(t.id).putSecret({ name: "GITHUB_TOKEN", value: "ghp_value_1" });
    expect(put.secret?.name).toBe("GITHUB_TOKEN");
    expect(JSON.stringify(put.secret, (_k, v: unknown) => (typeof v === "bigint" ? String(v) : v))).not.toContain("ghp_value_1");
    await secretsAs(t.id).putSecret({ name: "API_KEY", value: "second" });
    now = new Date(now.getTime() + 1000);
    const replaced = await secretsAs(t.id).putSecret({ name: "GITHUB_TOKEN", value: "ghp_value_2" });
    expect(replaced.secret?.createTime).toEqual(put.secret?.createTime);
    expect(replaced.secret?.updateTime).not.toEqual(put.secret?.updateTime);
    const { secrets } = await secretsAs(t.id).listSecrets({});
    expect(secrets.map((s) => s.name)).toEqual(["API_KEY", "GITHUB_TOKEN"]);
    expect(Object.keys(secrets[0]!).filter((k) => /value/i.test(k))).toEqual([]);

    const resolved = await internal(EXECUTOR).resolveSecrets({ tenantId: t.id, names: ["GITHUB_TOKEN", "API_KEY"], grant: grantOf(t.id, ["GITHUB_TOKEN", "API_KEY"]) });
    expect(resolved.values).toEqual({ GITHUB_TOKEN: "ghp_value_2", API_KEY: "second" });
    const missing = await expectError(
      internal(EXECUTOR).resolveSecrets({ tenantId: t.id, names: ["API_KEY", "NOPE"], grant: grantOf(t.id, ["API_KEY", "NOPE"]) }),
      Code.NotFound,
      "SECRET_NOT_FOUND",
    );
    expect(errorInfoOf(missing)?.metadata.secret).toBe("NOPE");
    for (const identity of [GATEWAY, DISPATCHER, ADMIN, tenantIdentity(t.id)]) {
      await expectError(internal(identity).resolveSecrets({ tenantId: t.id, names: ["API_KEY"], grant: grantOf(t.id, ["API_KEY"]) }), Code.PermissionDenied);
    }
    // An executor reads only what the dispatcher granted it with a lease: no grant, another
    // executor's grant, a grant for another tenant or for fewer secrets are all refused.
    const other = await newTenant(Tier.FREE, "Other");
    await expectInvalid(internal(EXECUTOR).resolveSecrets({ tenantId: t.id, names: ["API_KEY"] }), "grant");
    for (const grant of [grantOf(t.id, ["API_KEY"], "executor/host-2"), grantOf(other.id, ["API_KEY"]), grantOf(t.id, ["GITHUB_TOKEN"])]) {
      await expectError(internal(EXECUTOR).resolveSecrets({ tenantId: t.id, names: ["API_KEY"], grant }), Code.PermissionDenied, "SECRET_GRANT_INVALID");
    }

    await secretsAs(t.id).deleteSecret({ name: "API_KEY" });
    expect((await secretsAs(t.id).listSecrets({})).secrets.map((s) => s.name)).toEqual(["GITHUB_TOKEN"]);
    await expectError(secretsAs(t.id).deleteSecret({ name: "API_KEY" }), Code.NotFound, "SECRET_NOT_FOUND");
    // Secrets are the tenant's own: the admin and services are refused.
    await expectError(clientFor(cores, SecretService, ADMIN).listSecrets({}), Code.PermissionDenied, "TENANT_REQUIRED");
  });

  it("checks names and values", async () => {
    const t = await newTenant();
    const s = secretsAs(t.id);
    for (const name of ["", "lower", "1ABC", "A-B", "A B", `A${"B".repeat(128)}`, "ÄÖ"]) {
      await expectInvalid(s.putSecret({ name, value: "v" }), "name");
      await expectInvalid(s.deleteSecret({ name }), "name");
    }
    await s.putSecret({ name: `A${"B".repeat(127)}`, value: "v" });
    await s.putSecret({ name: "_X9", value: "v" });
    await expectInvalid(s.putSecret({ name: "OK", value: "" }), "value");
    await expectInvalid(s.putSecret({ name: "OK", value: "a\u0000b" }), "value");
    await expectInvalid(s.putSecret({ name: "OK", value: "x".repeat(32 * 1024 + 1) }), "value");
    await expectInvalid(s.putSecret({ name: "OK", value: "é".repeat(16 * 1024 + 1) }), "value"); // bytes, not characters
    await s.putSecret({ name: "OK", value: "x".repeat(32 * 1024) });
    await expectInvalid(s.listSecrets({ pageToken: "%%%" }), "page_token");
    await expectInvalid(internal(EXECUTOR).resolveSecrets({ tenantId: "", names: [], grant: "" }), "tenant_id");
    await expectInvalid(internal(EXECUTOR).resolveSecrets({ tenantId: t.id, names: ["OK", "bad"], grant: grantOf(t.id, ["OK", "bad"]) }), "names[1]");
  });

  it("answers FAILED_PRECONDITION when no master key is configured", async () => {
    const bare = buildCores(store, { box: null });
    const t = (await clientFor(bare, TenantService, ADMIN).createTenant({ name: "N", contactEmail: "n@n.test" })).tenant!;
    await expectError(
      clientFor(bare, SecretService, tenantIdentity(t.id)).putSecret({ name: "A", value: "v" }),
      Code.FailedPrecondition,
      "SECRETS_NOT_CONFIGURED",
    );
  });

  it("rotation: values written under the old key read after rotation, move lazily, and re-encrypt in bulk", async () => {
    const k1 = TEST_MASTER_KEYS;
    const k2 = `k2:${Buffer.alloc(32, 9).toString("base64")}`;
    const t = await newTenant();
    await secretsAs(t.id).putSecret({ name: "LAZY", value: "lazy-value" });
    await secretsAs(t.id).putSecret({ name: "BULK", value: "bulk-value" });
    expect((await store.getSecrets(t.id, ["LAZY", "BULK"])).map((s) => s.keyId)).toEqual(["k1", "k1"]);

    const rotated = buildCores(store, { box: SecretBox.fromSetting(`${k2},${k1}`) });
    expect((await clientFor(rotated, TenantInternalService, EXECUTOR).resolveSecrets({ tenantId: t.id, names: ["LAZY"], grant: grantOf(t.id, ["LAZY"]) })).values).toEqual({
      LAZY: "lazy-value",
    });
    const byName = async () => Object.fromEntries((await store.getSecrets(t.id, ["LAZY", "BULK"])).map((s) => [s.name, s.keyId]));
    expect(await byName()).toEqual({ LAZY: "k2", BULK: "k1" });
    expect(await rotated.secrets.reencryptAll()).toEqual({ resealed: 1, failed: 0 });
    expect(await byName()).toEqual({ LAZY: "k2", BULK: "k2" });

    // A re-seal that fails to write (the store busy) does not fail the read: the value comes
    // back, and stays under the old key for the next read or the bulk command to move.
    await secretsAs(t.id).putSecret({ name: "STUCK", value: "stuck-value" });
    const refusingReseal = Object.create(store, { resealSecret: { value: async () => Promise.reject(new Error("database is locked")) } }) as typeof store;
    expect((await clientFor(buildCores(refusingReseal, { box: SecretBox.fromSetting(`${k2},${k1}`) }), TenantInternalService, EXECUTOR).resolveSecrets({ tenantId: t.id, names: ["STUCK"], grant: grantOf(t.id, ["STUCK"]) })).values).toEqual({
      STUCK: "stuck-value",
    });
    expect((await store.getSecrets(t.id, ["STUCK"]))[0]?.keyId).toBe("k1");
    expect(await rotated.secrets.reencryptAll()).toEqual({ resealed: 1, failed: 0 });

    // The old key can now be dropped.
    const onlyNew = buildCores(store, { box: SecretBox.fromSetting(k2) });
    expect((await clientFor(onlyNew, TenantInternalService, EXECUTOR).resolveSecrets({ tenantId: t.id, names: ["LAZY", "BULK"], grant: grantOf(t.id, ["LAZY", "BULK"]) })).values).toEqual({
      LAZY: "lazy-value",
      BULK: "bulk-value",
    });
    // A value under a key that was dropped too early says which key is missing.
    const k3 = `k3:${Buffer.alloc(32, 3).toString("base64")}`;
    const err = await expectError(
      clientFor(buildCores(store, { box: SecretBox.fromSetting(k3) }), TenantInternalService, EXECUTOR).resolveSecrets({ tenantId: t.id, names: ["LAZY"], grant: grantOf(t.id, ["LAZY"]) }),
      Code.FailedPrecondition,
      "SECRET_KEY_UNAVAILABLE",
    );
    expect(err.rawMessage).toContain('"k2"');
    expect(err.rawMessage).not.toContain("lazy-value");
  });
});

describe("admission (contract A)", () => {
  const admit = (tenantId: string, dispatchId = ulid(), secretNames: string[] = []) =>
    internal(DISPATCHER).admitDispatch({ tenantId, dispatchId, secretNames, requestedTimeout: durationFromMs(60_000) });

  it("reserves concurrent slots atomically and idempotently, answering the tier's max timeout", async () => {
    const t = await newTenant(Tier.FREE); // test tiers: 2 concurrent, 3 a day, 120 s
    const results = await Promise.allSettled(Array.from({ length: 6 }, () => admit(t.id)));
    const ok = results.filter((r) => r.status === "fulfilled");
    expect(ok).toHaveLength(2);
    expect(ok[0]!.value.maxTimeout?.seconds).toBe(120n);
    expect(ok[0]!.value.tier).toBe(Tier.FREE);
    for (const r of results.filter((r) => r.status === "rejected")) {
      const err = await expectError(Promise.reject(r.reason), Code.ResourceExhausted, "QUOTA_EXCEEDED");
      expect(errorInfoOf(err)?.metadata).toMatchObject({ quota: "concurrent_runs", limit: "2" });
      expect(err.findDetails(QuotaFailureSchema)[0]?.violations[0]?.subject).toBe("concurrent_runs");
    }
    expect(await store.usageOf(t.id, "2025-06-01")).toEqual({ activeRuns: 2, runsToday: 2 });
  });

  it("same dispatch id twice counts once; release frees the slot but not the day", async () => {
    const t = await newTenant(Tier.FREE);
    const id = ulid();
    await admit(t.id, id);
    await admit(t.id, id);
    expect(await store.usageOf(t.id, "2025-06-01")).toEqual({ activeRuns: 1, runsToday: 1 });
    await internal(DISPATCHER).releaseDispatch({ tenantId: t.id, dispatchId: id });
    await internal(DISPATCHER).releaseDispatch({ tenantId: t.id, dispatchId: id });
    expect(await store.usageOf(t.id, "2025-06-01")).toEqual({ activeRuns: 0, runsToday: 1 });
  });

  it("a release saying never_created gives back the run of the day too, once; a normal one keeps it", async () => {
    const t = await newTenant(Tier.FREE); // 3 a day
    const [ended, unstored] = [ulid(), ulid()];
    await admit(t.id, ended);
    await admit(t.id, unstored);
    await internal(DISPATCHER).releaseDispatch({ tenantId: t.id, dispatchId: ended });
    await internal(DISPATCHER).releaseDispatch({ tenantId: t.id, dispatchId: unstored, neverCreated: true });
    await internal(DISPATCHER).releaseDispatch({ tenantId: t.id, dispatchId: unstored, neverCreated: true });
    expect(await store.usageOf(t.id, "2025-06-01")).toEqual({ activeRuns: 0, runsToday: 1 });
    // A never-created release that arrives before its admission: the admission takes nothing.
    const late = ulid();
    await internal(DISPATCHER).releaseDispatch({ tenantId: t.id, dispatchId: late, neverCreated: true });
    await admit(t.id, late);
    expect(await store.usageOf(t.id, "2025-06-01")).toEqual({ activeRuns: 0, runsToday: 1 });
  });

  it("the daily quota names its reset time (next UTC midnight) and resets then", async () => {
    const t = await newTenant(Tier.FREE);
    for (let i = 0; i < 3; i++) {
      const id = ulid();
      await admit(t.id, id);
      await internal(DISPATCHER).releaseDispatch({ tenantId: t.id, dispatchId: id });
    }
    const err = await expectError(admit(t.id), Code.ResourceExhausted, "QUOTA_EXCEEDED");
    expect(errorInfoOf(err)?.metadata).toMatchObject({ quota: "runs_per_day", limit: "3", reset_time: "2025-06-02T00:00:00.000Z" });
    now = new Date("2025-06-02T00:00:01Z");
    await admit(t.id);
  });

  it("names the first missing secret before counting anything", async () => {
    const t = await newTenant(Tier.FREE);
    await secretsAs(t.id).putSecret({ name: "PRESENT", value: "v" });
    const err = await expectError(admit(t.id, ulid(), ["PRESENT", "ABSENT", "ALSO_ABSENT"]), Code.NotFound, "SECRET_NOT_FOUND");
    expect(errorInfoOf(err)?.metadata.secret).toBe("ABSENT");
    expect(err.rawMessage).toContain("ABSENT");
    expect(await store.usageOf(t.id, "2025-06-01")).toEqual({ activeRuns: 0, runsToday: 0 });
    await admit(t.id, ulid(), ["PRESENT"]);
  });

  it("is for the dispatcher only and checks every field", async () => {
    const t = await newTenant();
    for (const identity of [GATEWAY, EXECUTOR, ADMIN, tenantIdentity(t.id)]) {
      await expectError(internal(identity).admitDispatch({ tenantId: t.id, dispatchId: ulid() }), Code.PermissionDenied);
      await expectError(internal(identity).releaseDispatch({ tenantId: t.id, dispatchId: ulid() }), Code.PermissionDenied);
      await expectError(internal(identity).listSuspendedTenants({}), Code.PermissionDenied);
    }
    const d = internal(DISPATCHER);
    await expectInvalid(d.admitDispatch({ dispatchId: ulid() }), "tenant_id");
    await expectInvalid(d.admitDispatch({ tenantId: t.id, dispatchId: "x" }), "dispatch_id");
    await expectInvalid(d.admitDispatch({ tenantId: t.id, dispatchId: ulid(), secretNames: ["ok_lower"] }), "secret_names[0]");
    await expectInvalid(
      d.admitDispatch({ tenantId: t.id, dispatchId: ulid(), requestedTimeout: { seconds: -5n, nanos: 0 } }),
      "requested_timeout",
    );
    await expectInvalid(d.releaseDispatch({ tenantId: t.id }), "dispatch_id");
    await expectError(d.admitDispatch({ tenantId: MISSING, dispatchId: ulid() }), Code.NotFound, "TENANT_NOT_FOUND");
  });

  it("uses the default tiers when none are configured", async () => {
    const plain = buildCores(store);
    const t = (await clientFor(plain, TenantService, ADMIN).createTenant({ name: "P", contactEmail: "p@p.test", tier: Tier.PRO })).tenant!;
    const res = await clientFor(plain, TenantInternalService, DISPATCHER).admitDispatch({ tenantId: t.id, dispatchId: ulid() });
    expect(Number(res.maxTimeout?.seconds) * 1000).toBe(DEFAULT_TIERS.pro.maxTimeoutMs);
    // Pro keeps logs 30 days (SPEC L3); the dispatcher hands this to telemetry.
    expect(Number(res.logRetention?.seconds)).toBe(30 * 24 * 3600);
  });
});
