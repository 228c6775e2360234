import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { DatabaseSync } from "node:sqlite";
import { describe, expect, it } from "vitest";
import { SqliteTenantStore } from "../src/store/sqlite-store.ts";
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
