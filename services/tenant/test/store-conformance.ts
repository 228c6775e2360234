/**
 * The conformance suite every TenantStore adapter must pass (SQLite now, MongoDB later): call
 * it from an adapter's test file with a factory that returns a fresh, empty store.
 */
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { ulid } from "ulid";
import type { AdmissionRequest, ApiKeyRecord, SecretRecord, TenantRecord, TenantStore } from "../src/store/store.ts";
import { DuplicateRecordError } from "../src/store/store.ts";

const T0 = new Date("2025-01-01T00:00:00.000Z");
const at = (ms: number) => new Date(T0.getTime() + ms);

export function tenantFixture(overrides: Partial<TenantRecord> = {}): TenantRecord {
  return {
    id: ulid(),
    name: "Acme",
    contactEmail: "ops@acme.test",
    tier: "pro",
    state: "active",
    suspendReason: "",
    createTime: T0,
    updateTime: T0,
    ...overrides,
  };
}

let hashCounter = 0;
export function keyFixture(tenantId: string, overrides: Partial<ApiKeyRecord> = {}): ApiKeyRecord {
  hashCounter++;
  return {
    id: ulid(),
    tenantId,
    displayName: "ci",
    keyHash: hashCounter.toString(16).padStart(64, "0"),
    prefix: "otp_abcd",
    lastFour: "wxyz",
    createTime: T0,
    lastUsedTime: null,
    revokeTime: null,
    ...overrides,
  };
}

export function secretFixture(tenantId: string, name: string, overrides: Partial<SecretRecord> = {}): SecretRecord {
  return {
    tenantId,
    name,
    keyId: "k1",
    iv: Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
    ciphertext: Uint8Array.from([0xde, 0xad, 0xbe, 0xef, ...new Array<number>(16).fill(9)]),
    createTime: T0,
    updateTime: T0,
    ...overrides,
  };
}

export function tenantStoreConformance(adapter: string, factory: () => Promise<TenantStore> | TenantStore): void {
  describe(`TenantStore conformance: ${adapter}`, () => {
    let store: TenantStore;
    beforeEach(async () => {
      store = await factory();
    });
    afterEach(async () => {
      await store.close();
    });

    it("stores a tenant with its first key and reads both back exactly", async () => {
      const tenant = tenantFixture();
      const key = keyFixture(tenant.id);
      await store.createTenantWithKey(tenant, key);
      expect(await store.getTenant(tenant.id)).toEqual(tenant);
      expect(await store.getApiKey(key.id)).toEqual(key);
      expect(await store.findApiKeyByHash(key.keyHash)).toEqual(key);
    });

    it("answers null for missing tenants and keys", async () => {
      expect(await store.getTenant(ulid())).toBeNull();
      expect(await store.getApiKey(ulid())).toBeNull();
      expect(await store.findApiKeyByHash("f".repeat(64))).toBeNull();
    });

    it("creates tenant and key atomically: a colliding key leaves no tenant behind", async () => {
      const first = tenantFixture();
      const key = keyFixture(first.id);
      await store.createTenantWithKey(first, key);
      const second = tenantFixture();
      await expect(store.createTenantWithKey(second, keyFixture(second.id, { keyHash: key.keyHash }))).rejects.toBeInstanceOf(
        DuplicateRecordError,
      );
      expect(await store.getTenant(second.id)).toBeNull();
    });

    it("creates a key only while the tenant holds fewer active keys than the limit; revoked ones do not count", async () => {
      const tenant = tenantFixture();
      const first = keyFixture(tenant.id);
      await store.createTenantWithKey(tenant, first);
      expect(await store.createApiKey(keyFixture(tenant.id), 2)).toBe(true);
      const refused = keyFixture(tenant.id);
      expect(await store.createApiKey(refused, 2)).toBe(false);
      expect(await store.getApiKey(refused.id)).toBeNull();
      // Another tenant's keys are its own count.
      const other = tenantFixture();
      await store.createTenantWithKey(other, keyFixture(other.id));
      expect(await store.createApiKey(keyFixture(other.id), 2)).toBe(true);
      await store.revokeApiKey(first.id, new Date());
      expect(await store.createApiKey(keyFixture(tenant.id), 2)).toBe(true);
    });

    it("refuses a second key with the same hash (key_hash is unique)", async () => {
      const tenant = tenantFixture();
      const key = keyFixture(tenant.id);
      await store.createTenantWithKey(tenant, key);
      await expect(store.createApiKey(keyFixture(tenant.id, { keyHash: key.keyHash }))).rejects.toBeInstanceOf(DuplicateRecordError);
      const other = keyFixture(tenant.id, { displayName: "other" });
      await store.createApiKey(other);
      expect(await store.getApiKey(other.id)).toEqual(other);
    });

    it("transitions tenant state only from the expected state", async () => {
      const tenant = tenantFixture();
      await store.createTenantWithKey(tenant, keyFixture(tenant.id));
      const suspended = await store.transitionTenantState(tenant.id, "active", "suspended", at(1000));
      expect(suspended).toEqual({ ...tenant, state: "suspended", suspendReason: "", updateTime: at(1000) });
      // A second, racing suspension loses.
      expect(await store.transitionTenantState(tenant.id, "active", "suspended", at(2000))).toBeNull();
      expect((await store.getTenant(tenant.id))?.updateTime).toEqual(at(1000));
      expect(await store.transitionTenantState(ulid(), "active", "suspended", at(2000))).toBeNull();
    });

    it("revokes a key once", async () => {
      const tenant = tenantFixture();
      const key = keyFixture(tenant.id);
      await store.createTenantWithKey(tenant, key);
      expect(await store.revokeApiKey(key.id, at(5000))).toEqual({ ...key, revokeTime: at(5000) });
      expect(await store.revokeApiKey(key.id, at(6000))).toBeNull();
      expect((await store.findApiKeyByHash(key.keyHash))?.revokeTime).toEqual(at(5000));
      expect(await store.revokeApiKey(ulid(), at(6000))).toBeNull();
    });

    it("records last use only when the previous one is older than the window", async () => {
      const tenant = tenantFixture();
      const key = keyFixture(tenant.id);
      await store.createTenantWithKey(tenant, key);
      expect(await store.touchApiKey(key.id, at(10_000), at(10_000 - 60_000))).toBe(true);
      expect((await store.getApiKey(key.id))?.lastUsedTime).toEqual(at(10_000));
      // Within the window: no write.
      expect(await store.touchApiKey(key.id, at(20_000), at(20_000 - 60_000))).toBe(false);
      expect((await store.getApiKey(key.id))?.lastUsedTime).toEqual(at(10_000));
      // After the window: written again.
      expect(await store.touchApiKey(key.id, at(80_000), at(80_000 - 60_000))).toBe(true);
      expect((await store.getApiKey(key.id))?.lastUsedTime).toEqual(at(80_000));
      expect(await store.touchApiKey(ulid(), at(90_000), at(30_000))).toBe(false);
    });
    it("keeps the suspension reason and clears it on reactivation", async () => {
      const tenant = tenantFixture();
      await store.createTenantWithKey(tenant, keyFixture(tenant.id));
      const suspended = await store.transitionTenantState(tenant.id, "active", "suspended", at(1000), "unpaid invoice");
      expect(suspended?.suspendReason).toBe("unpaid invoice");
      expect((await store.getTenant(tenant.id))?.suspendReason).toBe("unpaid invoice");
      expect(await store.listSuspendedTenantIds()).toEqual([tenant.id]);
      const active = await store.transitionTenantState(tenant.id, "suspended", "active", at(2000), "");
      expect(active).toEqual({ ...tenant, updateTime: at(2000) });
      expect(await store.listSuspendedTenantIds()).toEqual([]);
    });

    it("updates the tier of an existing tenant only", async () => {
      const tenant = tenantFixture({ tier: "free" });
      await store.createTenantWithKey(tenant, keyFixture(tenant.id));
      expect(await store.updateTenantTier(tenant.id, "enterprise", at(3000))).toEqual({ ...tenant, tier: "enterprise", updateTime: at(3000) });
      expect(await store.updateTenantTier(ulid(), "pro", at(3000))).toBeNull();
    });

    it("lists tenants and a tenant's keys in id order, page by page, and no other tenant's keys", async () => {
      const tenants = [tenantFixture(), tenantFixture(), tenantFixture()];
      for (const t of tenants) await store.createTenantWithKey(t, keyFixture(t.id));
      const ids = tenants.map((t) => t.id).sort();
      const first = await store.listTenants(undefined, 2);
      expect(first.map((t) => t.id)).toEqual(ids.slice(0, 2));
      expect((await store.listTenants(first[1]!.id, 2)).map((t) => t.id)).toEqual(ids.slice(2));

      const owner = tenants[0]!;
      const extra = [keyFixture(owner.id), keyFixture(owner.id)];
      for (const k of extra) await store.createApiKey(k);
      const all = await store.listApiKeys(owner.id, undefined, 10);
      expect(all).toHaveLength(3);
      expect(all.every((k) => k.tenantId === owner.id)).toBe(true);
      expect(all.map((k) => k.id)).toEqual([...all.map((k) => k.id)].sort());
      expect(await store.listApiKeys(owner.id, all[0]!.id, 1)).toEqual([all[1]]);
    });

    it("puts, replaces (keeping create_time), lists by name, gets and deletes secrets per tenant", async () => {
      const a = tenantFixture();
      const b = tenantFixture();
      await store.createTenantWithKey(a, keyFixture(a.id));
      await store.createTenantWithKey(b, keyFixture(b.id));
      const first = secretFixture(a.id, "TOKEN");
      expect(await store.putSecret(first, 10)).toEqual(first);
      const replaced = secretFixture(a.id, "TOKEN", { keyId: "k2", iv: new Uint8Array(12).fill(5), createTime: at(9000), updateTime: at(9000) });
      expect(await store.putSecret(replaced, 10)).toEqual({ ...replaced, createTime: T0 });
      await store.putSecret(secretFixture(a.id, "API_KEY"), 10);
      await store.putSecret(secretFixture(b.id, "TOKEN"), 10);

      expect((await store.listSecrets(a.id, undefined, 10)).map((s) => s.name)).toEqual(["API_KEY", "TOKEN"]);
      expect((await store.listSecrets(a.id, "API_KEY", 10)).map((s) => s.name)).toEqual(["TOKEN"]);
      const got = await store.getSecrets(a.id, ["TOKEN", "MISSING"]);
      expect(got).toEqual([{ ...replaced, createTime: T0 }]);
      expect(await store.getSecrets(a.id, [])).toEqual([]);

      expect(await store.deleteSecret(b.id, "API_KEY")).toBe(false);
      expect(await store.deleteSecret(a.id, "TOKEN")).toBe(true);
      expect(await store.deleteSecret(a.id, "TOKEN")).toBe(false);
      expect((await store.getSecrets(b.id, ["TOKEN"])).map((s) => s.tenantId)).toEqual([b.id]);
    });

    it("refuses a new secret name past the per-tenant limit, but still replaces existing ones", async () => {
      const a = tenantFixture();
      await store.createTenantWithKey(a, keyFixture(a.id));
      expect(await store.putSecret(secretFixture(a.id, "ONE"), 2)).not.toBeNull();
      expect(await store.putSecret(secretFixture(a.id, "TWO"), 2)).not.toBeNull();
      expect(await store.putSecret(secretFixture(a.id, "THREE"), 2)).toBeNull();
      expect(await store.putSecret(secretFixture(a.id, "ONE", { updateTime: at(5) }), 2)).not.toBeNull();
      expect((await store.listSecrets(a.id, undefined, 10)).map((s) => s.name)).toEqual(["ONE", "TWO"]);
    });

    it("reseals only a value that has not changed since it was read", async () => {
      const a = tenantFixture();
      await store.createTenantWithKey(a, keyFixture(a.id));
      const old = secretFixture(a.id, "TOKEN");
      await store.putSecret(old, 10);
      await store.putSecret(secretFixture(a.id, "OTHER", { keyId: "k2" }), 10);
      expect((await store.listSecretsNotSealedWith("k2", 10)).map((s) => s.name)).toEqual(["TOKEN"]);
      const next = { keyId: "k2", iv: new Uint8Array(12).fill(8), ciphertext: new Uint8Array(20).fill(3) };
      // A stale read (other nonce) loses.
      expect(await store.resealSecret(a.id, "TOKEN", { keyId: "k1", iv: new Uint8Array(12) }, next)).toBe(false);
      expect(await store.resealSecret(a.id, "TOKEN", { keyId: old.keyId, iv: old.iv }, next)).toBe(true);
      expect(await store.resealSecret(a.id, "TOKEN", { keyId: old.keyId, iv: old.iv }, next)).toBe(false);
      const [stored] = await store.getSecrets(a.id, ["TOKEN"]);
      expect(stored).toEqual({ ...old, ...next });
      expect(await store.listSecretsNotSealedWith("k2", 10)).toEqual([]);
    });

    it("admits up to the concurrent limit, idempotently per dispatch id, and frees slots on release", async () => {
      const tenantId = ulid();
      const req = (dispatchId: string): AdmissionRequest => ({
        tenantId,
        dispatchId,
        day: "2025-01-01",
        admitTime: T0,
        concurrentLimit: 2,
        dailyLimit: 100,
      });
      const ids = [ulid(), ulid(), ulid()];
      expect(await store.admitDispatch(req(ids[0]!))).toEqual({ kind: "admitted" });
      expect(await store.admitDispatch(req(ids[0]!))).toEqual({ kind: "duplicate" });
      expect(await store.admitDispatch(req(ids[1]!))).toEqual({ kind: "admitted" });
      expect(await store.admitDispatch(req(ids[2]!))).toEqual({ kind: "over_quota", quota: "concurrent_runs" });
      expect(await store.usageOf(tenantId, "2025-01-01")).toEqual({ activeRuns: 2, runsToday: 2 });
      // Another tenant is counted apart.
      expect(await store.admitDispatch({ ...req(ulid()), tenantId: ulid() })).toEqual({ kind: "admitted" });
      expect(await store.releaseDispatch(tenantId, ids[0]!, at(1))).toBe(true);
      expect(await store.releaseDispatch(tenantId, ids[0]!, at(2))).toBe(false);
      expect(await store.releaseDispatch(ulid(), ids[1]!, at(2))).toBe(false);
      // A released id admitted again counts nothing.
      expect(await store.admitDispatch(req(ids[0]!))).toEqual({ kind: "duplicate" });
      expect(await store.admitDispatch(req(ids[2]!))).toEqual({ kind: "admitted" });
      expect(await store.usageOf(tenantId, "2025-01-01")).toEqual({ activeRuns: 2, runsToday: 3 });
    });

    it("a release that arrives before its admission leaves a mark: the late admission takes nothing", async () => {
      const tenantId = ulid();
      const req = (dispatchId: string): AdmissionRequest => ({ tenantId, dispatchId, day: "2025-01-01", admitTime: T0, concurrentLimit: 1, dailyLimit: 100 });
      const abandoned = ulid();
      expect(await store.releaseDispatch(tenantId, abandoned, at(1))).toBe(false);
      expect(await store.releaseDispatch(tenantId, abandoned, at(2))).toBe(false);
      expect(await store.admitDispatch(req(abandoned))).toEqual({ kind: "duplicate" });
      expect(await store.usageOf(tenantId, "2025-01-01")).toEqual({ activeRuns: 0, runsToday: 0 });
      // The one slot is still there for the next run.
      expect(await store.admitDispatch(req(ulid()))).toEqual({ kind: "admitted" });
    });

    it("a refund release (never-created dispatch) gives back the slot and the run of the day, exactly once", async () => {
      const tenantId = ulid();
      const req = (dispatchId: string): AdmissionRequest => ({ tenantId, dispatchId, day: "2025-01-01", admitTime: T0, concurrentLimit: 10, dailyLimit: 2 });
      const [kept, refunded, later, refused] = [ulid(), ulid(), ulid(), ulid()];
      expect(await store.admitDispatch(req(kept))).toEqual({ kind: "admitted" });
      expect(await store.admitDispatch(req(refunded))).toEqual({ kind: "admitted" });
      expect(await store.admitDispatch(req(later))).toEqual({ kind: "over_quota", quota: "runs_per_day" });
      expect(await store.releaseDispatch(tenantId, refunded, at(1), { refundDay: true })).toBe(true);
      expect(await store.usageOf(tenantId, "2025-01-01")).toEqual({ activeRuns: 1, runsToday: 1 });
      // Repeated (a retried release), in sequence and in parallel: nothing more is given back.
      expect(await store.releaseDispatch(tenantId, refunded, at(2), { refundDay: true })).toBe(false);
      await Promise.all(Array.from({ length: 5 }, () => store.releaseDispatch(tenantId, refunded, at(3), { refundDay: true })));
      expect(await store.usageOf(tenantId, "2025-01-01")).toEqual({ activeRuns: 1, runsToday: 1 });
      // The refunded id stays known: admitting it again counts nothing.
      expect(await store.admitDispatch(req(refunded))).toEqual({ kind: "duplicate" });
      expect(await store.usageOf(tenantId, "2025-01-01")).toEqual({ activeRuns: 1, runsToday: 1 });
      // The run given back is there for another dispatch, and only the one.
      expect(await store.admitDispatch(req(later))).toEqual({ kind: "admitted" });
      expect(await store.admitDispatch(req(refused))).toEqual({ kind: "over_quota", quota: "runs_per_day" });
      expect(await store.usageOf(tenantId, "2025-01-01")).toEqual({ activeRuns: 2, runsToday: 2 });
    });

    it("a refund gives the run back to the day it was counted in", async () => {
      const tenantId = ulid();
      const dispatchId = ulid();
      await store.admitDispatch({ tenantId, dispatchId, day: "2025-01-01", admitTime: T0, concurrentLimit: 10, dailyLimit: 10 });
      await store.admitDispatch({ tenantId, dispatchId: ulid(), day: "2025-01-02", admitTime: at(86_400_000), concurrentLimit: 10, dailyLimit: 10 });
      expect(await store.releaseDispatch(tenantId, dispatchId, at(86_400_001), { refundDay: true })).toBe(true);
      expect(await store.usageOf(tenantId, "2025-01-01")).toEqual({ activeRuns: 1, runsToday: 0 });
      expect(await store.usageOf(tenantId, "2025-01-02")).toEqual({ activeRuns: 1, runsToday: 1 });
    });

    it("a refund release of an id never admitted leaves the mark: the late admission answers duplicate and counts nothing", async () => {
      const tenantId = ulid();
      const req = (dispatchId: string): AdmissionRequest => ({ tenantId, dispatchId, day: "2025-01-01", admitTime: T0, concurrentLimit: 1, dailyLimit: 1 });
      const abandoned = ulid();
      expect(await store.releaseDispatch(tenantId, abandoned, at(1), { refundDay: true })).toBe(false);
      expect(await store.releaseDispatch(tenantId, abandoned, at(2), { refundDay: true })).toBe(false);
      expect(await store.admitDispatch(req(abandoned))).toEqual({ kind: "duplicate" });
      expect(await store.usageOf(tenantId, "2025-01-01")).toEqual({ activeRuns: 0, runsToday: 0 });
      // Nothing was taken, and nothing was given back past zero: the day's one run is still one.
      expect(await store.admitDispatch(req(ulid()))).toEqual({ kind: "admitted" });
      expect(await store.releaseDispatch(tenantId, abandoned, at(3), { refundDay: true })).toBe(false);
      expect(await store.admitDispatch(req(ulid()))).toEqual({ kind: "over_quota", quota: "runs_per_day" });
      expect(await store.usageOf(tenantId, "2025-01-01")).toEqual({ activeRuns: 1, runsToday: 1 });
    });

    it("a normal release (a run that ended) keeps the run of the day", async () => {
      const tenantId = ulid();
      const req = (dispatchId: string): AdmissionRequest => ({ tenantId, dispatchId, day: "2025-01-01", admitTime: T0, concurrentLimit: 10, dailyLimit: 1 });
      const ended = ulid();
      expect(await store.admitDispatch(req(ended))).toEqual({ kind: "admitted" });
      expect(await store.releaseDispatch(tenantId, ended, at(1))).toBe(true);
      expect(await store.releaseDispatch(tenantId, ended, at(2), { refundDay: false })).toBe(false);
      expect(await store.usageOf(tenantId, "2025-01-01")).toEqual({ activeRuns: 0, runsToday: 1 });
      expect(await store.admitDispatch(req(ulid()))).toEqual({ kind: "over_quota", quota: "runs_per_day" });
    });

    it("counts the daily quota per day, released runs included", async () => {
      const tenantId = ulid();
      const req = (day: string): AdmissionRequest => ({ tenantId, dispatchId: ulid(), day, admitTime: T0, concurrentLimit: 10, dailyLimit: 2 });
      const first = req("2025-01-01");
      expect(await store.admitDispatch(first)).toEqual({ kind: "admitted" });
      await store.releaseDispatch(tenantId, first.dispatchId, at(1));
      expect(await store.admitDispatch(req("2025-01-01"))).toEqual({ kind: "admitted" });
      expect(await store.admitDispatch(req("2025-01-01"))).toEqual({ kind: "over_quota", quota: "runs_per_day" });
      expect(await store.admitDispatch(req("2025-01-02"))).toEqual({ kind: "admitted" });
    });

    it("names the daily quota when both are used up", async () => {
      const tenantId = ulid();
      const req = (): AdmissionRequest => ({ tenantId, dispatchId: ulid(), day: "2025-01-01", admitTime: T0, concurrentLimit: 1, dailyLimit: 1 });
      expect(await store.admitDispatch(req())).toEqual({ kind: "admitted" });
      expect(await store.admitDispatch(req())).toEqual({ kind: "over_quota", quota: "runs_per_day" });
    });

    it("never admits more than the limit when many admissions race", async () => {
      const tenantId = ulid();
      const outcomes = await Promise.all(
        Array.from({ length: 30 }, () =>
          store.admitDispatch({ tenantId, dispatchId: ulid(), day: "2025-01-01", admitTime: T0, concurrentLimit: 7, dailyLimit: 1000 }),
        ),
      );
      expect(outcomes.filter((o) => o.kind === "admitted")).toHaveLength(7);
      expect(outcomes.filter((o) => o.kind === "over_quota")).toHaveLength(23);
    });
  });
}
