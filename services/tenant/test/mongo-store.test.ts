/**
 * The MongoDB adapter of the tenant store. The conformance suite (the same one SQLite passes)
 * runs when OUTPOST_TEST_MONGO_URL names a server (each test gets its own database, dropped
 * after); without it the suite is skipped with a note. The pure helpers that build the
 * guarded filters and map BSON values are tested always.
 */
import { describe, expect, it } from "vitest";
import { ulid } from "ulid";
import { Binary, MongoClient, MongoServerError } from "mongodb";
import {
  ADMISSION_RETENTION_MS,
  DAY_COUNTER_RETENTION_MS,
  MongoTenantStore,
  admissionId,
  bytesOf,
  dayCountFilter,
  dayCounterExpiry,
  dayCounterId,
  isDuplicateKey,
  secretId,
  setSlotFilter,
  toSecret,
} from "../src/store/mongo-store.ts";
import { tenantStoreConformance } from "./store-conformance.ts";

const url = process.env.OUTPOST_TEST_MONGO_URL;

if (!url) {
  console.log("MongoDB tenant store: skipped (set OUTPOST_TEST_MONGO_URL to run the conformance suite against MongoDB)");
}

describe.skipIf(!url)("MongoTenantStore", () => {
  const dbs: string[] = [];
  tenantStoreConformance("mongodb", () => {
    const db = `outpost_test_${ulid().toLowerCase()}`;
    dbs.push(db);
    return MongoTenantStore.connect(url!, db);
  });
  it("drops its test databases", async () => {
    const client = await MongoClient.connect(url!);
    for (const db of dbs.splice(0)) await client.db(db).dropDatabase();
    await client.close();
  });
});

describe("MongoTenantStore helpers (no server needed)", () => {
  it("keys admissions, day counters and secrets per tenant without collisions", () => {
    const tenant = ulid();
    const other = ulid();
    const dispatch = ulid();
    expect(admissionId(tenant, dispatch)).toBe(`${tenant}/${dispatch}`);
    expect(admissionId(tenant, dispatch)).not.toBe(admissionId(other, dispatch));
    expect(dayCounterId(tenant, "2025-01-01")).not.toBe(dayCounterId(tenant, "2025-01-02"));
    expect(secretId(tenant, "TOKEN")).not.toBe(secretId(other, "TOKEN"));
  });

  it("guards a set-slot reservation by membership or by the element at index limit-1", () => {
    expect(setSlotFilter("t1", "active", "d1", 7)).toEqual({
      _id: "t1",
      $or: [{ active: "d1" }, { "active.6": { $exists: false } }],
    });
    expect(setSlotFilter("t1", "names", "TOKEN", 1)).toEqual({
      _id: "t1",
      $or: [{ names: "TOKEN" }, { "names.0": { $exists: false } }],
    });
    // A limit that admits nothing never reaches the server (and "active.-1" would be invalid).
    expect(setSlotFilter("t1", "active", "d1", 0)).toBeUndefined();
    expect(setSlotFilter("t1", "active", "d1", -3)).toBeUndefined();
    expect(setSlotFilter("t1", "active", "d1", 2.5)).toBeUndefined();
  });

  it("guards the daily counter with $lt the limit on that day's document", () => {
    expect(dayCountFilter("t1", "2025-01-01", 100)).toEqual({ _id: "t1/2025-01-01", count: { $lt: 100 } });
    expect(dayCountFilter("t1", "2025-01-01", 0)).toBeUndefined();
  });

  it("expires a day counter a retention period after the start of its day", () => {
    expect(dayCounterExpiry("2025-01-01").getTime()).toBe(Date.parse("2025-01-01T00:00:00Z") + DAY_COUNTER_RETENTION_MS);
    expect(DAY_COUNTER_RETENTION_MS).toBeGreaterThan(31 * 24 * 60 * 60 * 1000);
    expect(ADMISSION_RETENTION_MS).toBeGreaterThan(0);
  });

  it("maps Binary values the driver returns back to exact Uint8Arrays", () => {
    const iv = Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    // A Binary with spare capacity, as the driver may hand out: only `position` bytes count.
    const roomy = new Binary();
    roomy.write(iv, 0);
    expect(roomy.buffer.length).toBeGreaterThan(12);
    expect(roomy.length()).toBe(12);
    expect(bytesOf(roomy)).toEqual(iv);
    const copy = bytesOf(iv);
    expect(copy).toEqual(iv);
    expect(copy).not.toBe(iv);

    const t = new Date("2025-01-01T00:00:00Z");
    const record = toSecret({
      _id: "t1/TOKEN",
      tenantId: "t1",
      name: "TOKEN",
      keyId: "k1",
      iv: new Binary(iv),
      ciphertext: new Binary(Uint8Array.from([0xde, 0xad])),
      createTime: t,
      updateTime: t,
    });
    expect(record).toEqual({ tenantId: "t1", name: "TOKEN", keyId: "k1", iv, ciphertext: Uint8Array.from([0xde, 0xad]), createTime: t, updateTime: t });
    expect(record.iv).toBeInstanceOf(Uint8Array);
    expect(record.iv).not.toBeInstanceOf(Binary);
  });

  it("recognises duplicate-key errors only", () => {
    expect(isDuplicateKey(new MongoServerError({ message: "E11000 duplicate key", code: 11000 }))).toBe(true);
    expect(isDuplicateKey(new MongoServerError({ message: "other", code: 2 }))).toBe(false);
    expect(isDuplicateKey(new Error("E11000"))).toBe(false);
  });

  it("fails to connect within the selection timeout when no server answers (no hang)", async () => {
    await expect(MongoTenantStore.connect("mongodb://127.0.0.1:1/outpost")).rejects.toThrow();
  }, 20_000);
});
