import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { DatabaseSync } from "node:sqlite";
import { afterEach, describe, expect, it } from "vitest";
import { Code } from "@connectrpc/connect";
import { API_KEY_PATTERN, generateApiKey, hashApiKey, isWellFormedApiKey } from "../src/core/api-keys.ts";
import { LAST_USED_WRITE_INTERVAL_MS, MAX_ACTIVE_API_KEYS, TenantCore } from "../src/core/tenants.ts";
import { AdmissionCore } from "../src/core/admission.ts";
import { SecretsCore } from "../src/core/secrets.ts";
import { AdmissionUndecidedError } from "../src/store/store.ts";
import { errorInfoOf } from "@outpost/platform";
import { SqliteTenantStore } from "../src/store/sqlite-store.ts";
import { expectError } from "./helpers.ts";

describe("api key material", () => {
  it("is otp_ + 64 lowercase hex, different every time, with display parts of the key", () => {
    const seen = new Set<string>();
    for (let i = 0; i < 200; i++) {
      const key = generateApiKey();
      expect(key.plaintext).toMatch(/^otp_[0-9a-f]{64}$/);
      expect(API_KEY_PATTERN.test(key.plaintext)).toBe(true);
      expect(key.prefix).toBe(key.plaintext.slice(0, 8));
      expect(key.prefix).toMatch(/^otp_[0-9a-f]{4}$/);
      expect(key.lastFour).toBe(key.plaintext.slice(-4));
      expect(key.hash).toMatch(/^[0-9a-f]{64}$/);
      expect(key.hash).not.toContain(key.plaintext.slice(4));
      seen.add(key.plaintext);
    }
    expect(seen.size).toBe(200);
  });

  it("hashes with SHA-256 (known vector)", () => {
    expect(hashApiKey("abc")).toBe("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  });

  it("recognises only well-formed keys", () => {
    const good = generateApiKey().plaintext;
    expect(isWellFormedApiKey(good)).toBe(true);
    for (const bad of ["", "otp_", good.toUpperCase(), good.replace("otp_", "otx_"), good + "0", good.slice(0, -1), ` ${good}`, `${good}\n`]) {
      expect(isWellFormedApiKey(bad)).toBe(false);
    }
  });
});

describe("TenantCore", () => {
  const dirs: string[] = [];
  afterEach(() => {
    for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
  });

  it(`refuses a key past ${MAX_ACTIVE_API_KEYS} active ones with RESOURCE_EXHAUSTED naming the limit; revoking one makes room`, async () => {
    const core = new TenantCore({ store: new SqliteTenantStore(":memory:") });
    const created = await core.createTenant({ name: "Many keys", contactEmail: "ops@acme.test", tier: "pro" });
    const keys = [created.apiKey];
    while (keys.length < MAX_ACTIVE_API_KEYS) keys.push((await core.createApiKey(created.tenant.id, "k")).apiKey);
    const err = await expectError(core.createApiKey(created.tenant.id, "one too many"), Code.ResourceExhausted, "QUOTA_EXCEEDED");
    expect(errorInfoOf(err)?.metadata).toMatchObject({ quota: "active_api_keys", limit: String(MAX_ACTIVE_API_KEYS) });
    await core.revokeApiKey(keys[0]!.id, created.tenant.id);
    await core.createApiKey(created.tenant.id, "room again");
  });

  it("stores only the hash: the plaintext appears in no row and nowhere in the database files", async () => {
    const dir = mkdtempSync(path.join(tmpdir(), "outpost-tenant-core-"));
    dirs.push(dir);
    const store = new SqliteTenantStore(dir);
    const core = new TenantCore({ store });
    const created = await core.createTenant({ name: "Acme", contactEmail: "ops@acme.test", tier: "pro" });
    const second = await core.createApiKey(created.tenant.id, "ci");
    const plaintexts = [created.plaintext, second.plaintext];
    // Read while open (WAL and main file) and after close.
    const scan = () => {
      const blobs = readdirSync(dir).map((f) => readFileSync(path.join(dir, f)).toString("latin1"));
      const all = blobs.join("\n");
      for (const p of plaintexts) {
        expect(all).not.toContain(p);
        expect(all).not.toContain(p.slice(4)); // nor the hex body
      }
      return all;
    };
    expect(scan()).toContain(hashApiKey(created.plaintext));
    await store.close();
    scan();

    const db = new DatabaseSync(path.join(dir, "tenant.db"));
    const rows = db.prepare("SELECT * FROM api_keys").all();
    db.close();
    expect(rows).toHaveLength(2);
    const dump = JSON.stringify(rows);
    for (const p of plaintexts) expect(dump).not.toContain(p.slice(4));
    expect(rows.map((r) => r.key_hash).sort()).toEqual(plaintexts.map(hashApiKey).sort());
    expect(rows.map((r) => r.prefix).sort()).toEqual(plaintexts.map((p) => p.slice(0, 8)).sort());
  });

  it("creates an active tenant with a 'default' first key that authenticates", async () => {
    const core = new TenantCore({ store: new SqliteTenantStore(":memory:") });
    const created = await core.createTenant({ name: "Acme", contactEmail: "ops@acme.test", tier: "enterprise" });
    expect(created.tenant.state).toBe("active");
    expect(created.tenant.tier).toBe("enterprise");
    expect(created.apiKey.displayName).toBe("default");
    expect(created.apiKey.tenantId).toBe(created.tenant.id);
    const auth = await core.authenticateApiKey(created.plaintext);
    expect(auth.tenant.id).toBe(created.tenant.id);
    expect(auth.apiKeyId).toBe(created.apiKey.id);
  });

  it("creating a key for a missing tenant is NOT_FOUND", async () => {
    const core = new TenantCore({ store: new SqliteTenantStore(":memory:") });
    await expectError(core.createApiKey("01ARZ3NDEKTSV4RRFFQ69G5FAV", "x"), Code.NotFound, "TENANT_NOT_FOUND");
  });

  it("writes last_used_time at most once per key per minute", async () => {
    const store = new SqliteTenantStore(":memory:");
    let now = new Date("2025-03-01T00:00:00Z");
    const core = new TenantCore({ store, now: () => now });
    const { apiKey, plaintext } = await core.createTenant({ name: "A", contactEmail: "a@b.test", tier: "free" });
    let writes = 0;
    const touch = store.touchApiKey.bind(store);
    store.touchApiKey = async (...args) => {
      writes++;
      return touch(...args);
    };
    const t0 = now;
    await core.authenticateApiKey(plaintext);
    expect((await store.getApiKey(apiKey.id))?.lastUsedTime).toEqual(t0);
    for (let i = 1; i <= 5; i++) {
      now = new Date(t0.getTime() + i * 10_000);
      await core.authenticateApiKey(plaintext);
    }
    expect(writes).toBe(1);
    expect((await store.getApiKey(apiKey.id))?.lastUsedTime).toEqual(t0);
    now = new Date(t0.getTime() + LAST_USED_WRITE_INTERVAL_MS + 1);
    await core.authenticateApiKey(plaintext);
    expect(writes).toBe(2);
    expect((await store.getApiKey(apiKey.id))?.lastUsedTime).toEqual(now);
  });

  it("still authenticates a key when its last-used write fails under load, and says so in the log (without the key)", async () => {
    const store = new SqliteTenantStore(":memory:");
    const warnings: { obj: object; msg: string }[] = [];
    const core = new TenantCore({ store, logger: { warn: (obj, msg) => warnings.push({ obj, msg }) } });
    const { apiKey, plaintext } = await core.createTenant({ name: "A", contactEmail: "a@b.test", tier: "free" });
    store.touchApiKey = async () => {
      throw new Error("database is locked");
    };
    const authenticated = await core.authenticateApiKey(plaintext);
    expect(authenticated.apiKeyId).toBe(apiKey.id);
    expect(warnings).toHaveLength(1);
    expect(warnings[0]!.obj).toMatchObject({ api_key_id: apiKey.id, err: "database is locked" });
    expect(JSON.stringify(warnings)).not.toContain(plaintext);
    expect(JSON.stringify(warnings)).not.toContain(apiKey.keyHash);
  });
});

describe("AdmissionCore.release", () => {
  it("answers UNAVAILABLE ADMISSION_UNDECIDED when the store says the admission is still being decided, so the dispatcher asks again", async () => {
    const store = new SqliteTenantStore(":memory:");
    const undecided = Object.assign(Object.create(store) as SqliteTenantStore, {
      releaseDispatch: async () => {
        throw new AdmissionUndecidedError("still being decided");
      },
    });
    const core = new AdmissionCore({ store: undecided, tenants: new TenantCore({ store: undecided }), secrets: new SecretsCore({ store: undecided, box: undefined }) });
    await expectError(core.release("01JTENANTAAAAAAAAAAAAAAAAA", "01JDISPATCHAAAAAAAAAAAAAAA", { neverCreated: true }), Code.Unavailable, "ADMISSION_UNDECIDED");
    await store.close();
  });
});
