import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { DatabaseSync } from "node:sqlite";
import { describe, expect, it } from "vitest";
import { SqliteTenantStore } from "../src/store/sqlite-store.ts";
import { ADMISSION_RETENTION_MS } from "../src/store/store.ts";

const DAY_MS = 86_400_000;
import { keyFixture, secretFixture, tenantFixture, tenantStoreConformance } from "./store-conformance.ts";

tenantStoreConformance("sqlite :memory:", () => new SqliteTenantStore(":memory:"));

describe("SqliteTenantStore on a file from before issue #3", () => {
  it("adds the suspend_reason column in place and keeps the rows", async () => {
    const dir = mkdtempSync(path.join(tmpdir(), "outpost-tenant-migrate-"));
    try {
      const old = new DatabaseSync(path.join(dir, "tenant.db"));
      old.exec(`CREATE TABLE tenants (id TEXT PRIMARY KEY, name TEXT NOT NULL, contact_email TEXT NOT NULL, tier TEXT NOT NULL,
        state TEXT NOT NULL, create_time INTEGER NOT NULL, update_time INTEGER NOT NULL) STRICT;
        INSERT INTO tenants VALUES ('01ARZ3NDEKTSV4RRFFQ69G5FAV', 'Old', 'o@o.test', 'pro', 'suspended', 1, 2);`);
      old.close();
      const store = new SqliteTenantStore(dir);
      expect(await store.getTenant("01ARZ3NDEKTSV4RRFFQ69G5FAV")).toMatchObject({ name: "Old", state: "suspended", suspendReason: "" });
      expect(await store.listSuspendedTenantIds()).toEqual(["01ARZ3NDEKTSV4RRFFQ69G5FAV"]);
      await store.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("SqliteTenantStore on a file: what a secret leaves behind", () => {
  it("keeps no old ciphertext in the file or its write-ahead log once a secret is re-sealed, replaced or deleted", async () => {
    const dir = mkdtempSync(path.join(tmpdir(), "outpost-tenant-leftover-"));
    try {
      const store = new SqliteTenantStore(dir);
      const tenant = tenantFixture();
      await store.createTenantWithKey(tenant, keyFixture(tenant.id));
      const marker = (label: string) => Buffer.from(`${label}-ciphertext-under-a-retired-key-`.repeat(4));
      const [rotated, replaced, deleted] = [marker("ROTATED"), marker("REPLACED"), marker("DELETED")];
      const iv = Uint8Array.from({ length: 12 }, (_, i) => i);
      await store.putSecret(secretFixture(tenant.id, "ROTATED", { ciphertext: rotated, iv }), 200);
      await store.putSecret(secretFixture(tenant.id, "REPLACED", { ciphertext: replaced, iv }), 200);
      await store.putSecret(secretFixture(tenant.id, "DELETED", { ciphertext: deleted, iv }), 200);
      // Shorter new values, so nothing lines up to overwrite the old bytes by chance.
      await store.resealSecret(tenant.id, "ROTATED", { keyId: "k1", iv }, { keyId: "k2", iv: new Uint8Array(12).fill(9), ciphertext: Buffer.from("n".repeat(40)) });
      await store.putSecret(secretFixture(tenant.id, "REPLACED", { ciphertext: Buffer.from("m".repeat(40)) }), 200);
      await store.deleteSecret(tenant.id, "DELETED");
      // While the store is open (a backup or a copied disk of a running service), then after close.
      for (const phase of ["open", "closed"]) {
        if (phase === "closed") await store.close();
        for (const file of ["tenant.db", "tenant.db-wal"]) {
          if (!existsSync(path.join(dir, file))) continue;
          const bytes = readFileSync(path.join(dir, file));
          for (const old of [rotated, replaced, deleted]) expect(bytes.includes(old), `${phase}: ${file} holds ${old.subarray(0, 8).toString()}`).toBe(false);
        }
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("SqliteTenantStore: released admissions are kept for the retention, then deleted as later ones are released", () => {
  it("deletes admissions released over ADMISSION_RETENTION_MS ago, keeps newer ones and held ones", async () => {
    const store = new SqliteTenantStore(":memory:");
    const db = (store as unknown as { db: DatabaseSync }).db;
    const T0 = Date.parse("2025-01-01T00:00:00Z");
    const admit = (dispatchId: string, at: number) =>
      store.admitDispatch({ tenantId: "t1", dispatchId, day: new Date(at).toISOString().slice(0, 10), admitTime: new Date(at), concurrentLimit: 100, dailyLimit: 100 });
    await admit("old-released", T0);
    await admit("old-held", T0);
    await admit("recent-released", T0 + 10 * DAY_MS);
    await store.releaseDispatch("t1", "old-released", new Date(T0 + 1000));
    await store.releaseDispatch("t1", "recent-released", new Date(T0 + 10 * DAY_MS));
    const ids = () => db.prepare("SELECT dispatch_id FROM admissions ORDER BY dispatch_id").all().map((r) => r.dispatch_id);
    expect(ids()).toEqual(["old-held", "old-released", "recent-released"]);
    // A release just within the retention of the old one deletes nothing.
    await admit("later", T0 + 30 * DAY_MS);
    await store.releaseDispatch("t1", "later", new Date(T0 + 1000 + ADMISSION_RETENTION_MS));
    expect(ids()).toEqual(["later", "old-held", "old-released", "recent-released"]);
    // Past it, the old released one goes; the one still held stays (it holds a slot), and so do newer ones.
    await admit("latest", T0 + 31 * DAY_MS);
    await store.releaseDispatch("t1", "latest", new Date(T0 + 1001 + ADMISSION_RETENTION_MS));
    expect(ids()).toEqual(["later", "latest", "old-held", "recent-released"]);
    expect(await store.usageOf("t1", "2025-01-01")).toEqual({ activeRuns: 1, runsToday: 1 });
    await store.close();
  });
});
