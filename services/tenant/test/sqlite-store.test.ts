import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { DatabaseSync } from "node:sqlite";
import { describe, expect, it } from "vitest";
import { SqliteTenantStore } from "../src/store/sqlite-store.ts";
import { tenantStoreConformance } from "./store-conformance.ts";

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
