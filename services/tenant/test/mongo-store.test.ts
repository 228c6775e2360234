/**
 * The MongoDB adapter of the tenant store. The conformance suite (the same one SQLite passes)
 * runs when OUTPOST_TEST_MONGO_URL names a server (each test gets its own database, dropped
 * after); without it the suite is skipped with a note. The pure helpers that build the
 * guarded filters and map BSON values are tested always.
 */
import { describe, expect, it } from "vitest";
import { ulid } from "ulid";
import { Binary, MongoClient, MongoServerError } from "mongodb";
import { ADMISSION_RETENTION_MS } from "../src/store/store.ts";
import {
  CLAIM_STALE_MS,
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
import { AdmissionUndecidedError, type AdmissionRequest, type SecretRecord } from "../src/store/store.ts";
import { FakeCollection } from "./fake-mongo.ts";
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

/**
 * The admission collections on an in-memory fake (test/fake-mongo.ts), so that failures and
 * interleavings between two writes can be placed exactly: a real server cannot be made to fail
 * on cue. Only admitDispatch, releaseDispatch and usageOf are used (they touch only these).
 */
function fakeAdmissionStore() {
  const admissions = new FakeCollection();
  const active = new FakeCollection();
  const days = new FakeCollection();
  const store = Object.create(MongoTenantStore.prototype) as MongoTenantStore;
  Object.assign(store, { admissions, active, days }); // the collections the admission methods use
  return { store, admissions, active, days };
}

describe("MongoTenantStore admission when writes fail (in-memory fake, no server)", () => {
  const tenantId = ulid();
  const DAY = "2025-01-01";
  const req = (dispatchId: string, concurrentLimit = 1, dailyLimit = 100): AdmissionRequest => ({
    tenantId,
    dispatchId,
    day: DAY,
    admitTime: new Date(),
    concurrentLimit,
    dailyLimit,
  });
  const claimOf = (admissions: FakeCollection, dispatchId: string) => admissions.docs.get(admissionId(tenantId, dispatchId));
  /** Makes a pending claim look abandoned: claimed longer ago than CLAIM_STALE_MS. */
  const age = (admissions: FakeCollection, dispatchId: string) => {
    claimOf(admissions, dispatchId)!.claimedAt = new Date(Date.now() - CLAIM_STALE_MS - 1000);
  };

  it("a write failing after the slot was reserved undoes the reservation: nothing is held, the id is marked released", async () => {
    const { store, admissions, days } = fakeAdmissionStore();
    // The day's increment fails (a network error, a step-down) once the slot is reserved.
    days.failures.push({ method: "updateOne", when: (_f, u) => u?.$inc?.count === 1 });
    await expect(store.admitDispatch(req("X"))).rejects.toThrow("injected");
    expect(await store.usageOf(tenantId, DAY)).toEqual({ activeRuns: 0, runsToday: 0 });
    expect(claimOf(admissions, "X")).toMatchObject({ state: "admitted", day: "" });
    expect(claimOf(admissions, "X")!.releaseTime).toBeInstanceOf(Date);
    // The dispatcher, without an answer, releases the id as never created: nothing more moves.
    expect(await store.releaseDispatch(tenantId, "X", new Date(), { refundDay: true })).toBe(false);
    expect(await store.usageOf(tenantId, DAY)).toEqual({ activeRuns: 0, runsToday: 0 });
    // The tenant's one slot is free for the next run, and a late duplicate of X takes nothing.
    expect(await store.admitDispatch(req("X"))).toEqual({ kind: "duplicate" });
    expect(await store.admitDispatch(req("Y"))).toEqual({ kind: "admitted" });
    expect(await store.usageOf(tenantId, DAY)).toEqual({ activeRuns: 1, runsToday: 1 });
  });

  it("a failure after the day was counted gives the day back too", async () => {
    const { store, admissions } = fakeAdmissionStore();
    // The last write (pending -> admitted) fails.
    admissions.failures.push({ method: "findOneAndUpdate", when: (_f, u) => u?.$set?.state === "admitted" && u.$set.day === undefined });
    await expect(store.admitDispatch(req("X"))).rejects.toThrow("injected");
    expect(await store.usageOf(tenantId, DAY)).toEqual({ activeRuns: 0, runsToday: 0 });
    expect(await store.admitDispatch(req("Y"))).toEqual({ kind: "admitted" });
  });

  it("a last write that was applied though its answer was lost stands: the dispatcher's release gives it back", async () => {
    const { store, admissions } = fakeAdmissionStore();
    admissions.failures.push({ method: "findOneAndUpdate", when: (_f, u) => u?.$set?.state === "admitted" && u.$set.day === undefined, applied: true });
    await expect(store.admitDispatch(req("X"))).rejects.toThrow("injected");
    // Admitted after all: the undo's compare on the pending claim found nothing to undo.
    expect(await store.usageOf(tenantId, DAY)).toEqual({ activeRuns: 1, runsToday: 1 });
    expect(await store.releaseDispatch(tenantId, "X", new Date(), { refundDay: true })).toBe(true);
    expect(await store.usageOf(tenantId, DAY)).toEqual({ activeRuns: 0, runsToday: 0 });
  });

  it("a decision whose undo failed too is taken over by a release once stale: slot freed, counted day given back", async () => {
    const { store, admissions } = fakeAdmissionStore();
    // The last write fails, and so does the undo's (the database is away for both).
    const isFinal = (_f: Record<string, unknown>, u?: Record<string, { state?: string; day?: string }>) => u?.$set?.state === "admitted";
    admissions.failures.push({ method: "findOneAndUpdate", when: isFinal }, { method: "findOneAndUpdate", when: isFinal });
    await expect(store.admitDispatch(req("X"))).rejects.toThrow("injected");
    expect(claimOf(admissions, "X")).toMatchObject({ state: "pending", dayCounted: true });
    expect(await store.usageOf(tenantId, DAY)).toEqual({ activeRuns: 1, runsToday: 1 });
    // The dispatcher's release (never created) while the claim is fresh: recorded, but it is
    // told to ask again, since nothing may ever finish that decision.
    await expect(store.releaseDispatch(tenantId, "X", new Date(), { refundDay: true })).rejects.toBeInstanceOf(AdmissionUndecidedError);
    expect(claimOf(admissions, "X")).toMatchObject({ state: "pending", releaseRequested: true, refundRequested: true });
    // Asked again once the claim is stale: taken over, released, slot and day given back.
    age(admissions, "X");
    expect(await store.releaseDispatch(tenantId, "X", new Date(), { refundDay: true })).toBe(false);
    expect(claimOf(admissions, "X")).toMatchObject({ state: "admitted", day: "" });
    expect(claimOf(admissions, "X")!.expireAt).toBeInstanceOf(Date);
    expect(await store.usageOf(tenantId, DAY)).toEqual({ activeRuns: 0, runsToday: 0 });
    // Repeated: nothing more is given back.
    expect(await store.releaseDispatch(tenantId, "X", new Date(), { refundDay: true })).toBe(false);
    expect(await store.usageOf(tenantId, DAY)).toEqual({ activeRuns: 0, runsToday: 0 });
    expect(await store.admitDispatch(req("Y"))).toEqual({ kind: "admitted" });
  });

  it("an abandoned claim whose day was not recorded as counted frees its slot and keeps the day (one too high, never too low)", async () => {
    const { store, admissions, active, days } = fakeAdmissionStore();
    // An owner that died between the day's increment and recording it on the claim.
    admissions.docs.set(admissionId(tenantId, "X"), {
      _id: admissionId(tenantId, "X"), tenantId, dispatchId: "X", day: DAY, admitTime: new Date(), releaseTime: null, state: "pending",
      claimedAt: new Date(Date.now() - CLAIM_STALE_MS - 1000),
    });
    active.docs.set(tenantId, { _id: tenantId, active: ["X"] });
    days.docs.set(dayCounterId(tenantId, DAY), { _id: dayCounterId(tenantId, DAY), count: 1 });
    expect(await store.releaseDispatch(tenantId, "X", new Date(), { refundDay: true })).toBe(false);
    expect(await store.usageOf(tenantId, DAY)).toEqual({ activeRuns: 0, runsToday: 1 });
  });

  it("an owner whose claim a release took over while it decided frees the slot it reserved after, and gives back its day", async () => {
    const { store, admissions, active } = fakeAdmissionStore();
    let stalled = false;
    active.before = async (method, _f, update) => {
      if (!stalled || method !== "updateOne" || !update?.$addToSet) return;
      stalled = false;
      // The owner stalls past CLAIM_STALE_MS just before reserving: the dispatcher's release takes the claim over.
      age(admissions, "X");
      expect(await store.releaseDispatch(tenantId, "X", new Date(), { refundDay: true })).toBe(false);
    };
    expect(await store.admitDispatch(req("Z", 2))).toEqual({ kind: "admitted" }); // another run, counted apart
    stalled = true;
    // The owner then reserves and counts, finds the claim gone from under it, and settles both (once).
    await expect(store.admitDispatch(req("X", 2))).rejects.toThrow("taken over");
    expect(await store.usageOf(tenantId, DAY)).toEqual({ activeRuns: 1, runsToday: 1 });
    expect(await store.admitDispatch(req("Y", 2))).toEqual({ kind: "admitted" });
  });

  it("a release whose flag misses because the decision just admitted releases the admission (expiry set, day back once)", async () => {
    const { store, admissions, active, days } = fakeAdmissionStore();
    const _id = admissionId(tenantId, "X");
    // A decision between its day count and its last write.
    admissions.docs.set(_id, { _id, tenantId, dispatchId: "X", day: DAY, admitTime: new Date(), releaseTime: null, state: "pending", claimedAt: new Date(), dayCounted: true });
    active.docs.set(tenantId, { _id: tenantId, active: ["X"] });
    days.docs.set(dayCounterId(tenantId, DAY), { _id: dayCounterId(tenantId, DAY), count: 1 });
    admissions.before = (method, filter) => {
      // The decision's last write lands just before the release's flag: admitted, the flag unseen.
      if (method === "updateOne" && filter.state === "pending") admissions.docs.get(_id)!.state = "admitted";
    };
    const releaseTime = new Date();
    expect(await store.releaseDispatch(tenantId, "X", releaseTime, { refundDay: true })).toBe(true);
    expect(admissions.docs.get(_id)).toMatchObject({ state: "admitted", releaseTime, expireAt: new Date(releaseTime.getTime() + ADMISSION_RETENTION_MS), refunded: true });
    expect(await store.usageOf(tenantId, DAY)).toEqual({ activeRuns: 0, runsToday: 0 });
    admissions.before = undefined;
    expect(await store.releaseDispatch(tenantId, "X", new Date(), { refundDay: true })).toBe(false);
    expect(await store.usageOf(tenantId, DAY)).toEqual({ activeRuns: 0, runsToday: 0 });
  });

  it("an admission that takes over an abandoned claim whose day was counted does not count it again", async () => {
    const { store, admissions, active, days } = fakeAdmissionStore();
    const _id = admissionId(tenantId, "X");
    admissions.docs.set(_id, {
      _id, tenantId, dispatchId: "X", day: DAY, admitTime: new Date(), releaseTime: null, state: "pending",
      claimedAt: new Date(Date.now() - CLAIM_STALE_MS - 1000), dayCounted: true,
    });
    active.docs.set(tenantId, { _id: tenantId, active: ["X"] });
    days.docs.set(dayCounterId(tenantId, DAY), { _id: dayCounterId(tenantId, DAY), count: 1 });
    expect(await store.admitDispatch(req("X", 1, 1))).toEqual({ kind: "admitted" });
    expect(await store.usageOf(tenantId, DAY)).toEqual({ activeRuns: 1, runsToday: 1 });
  });
});

/** The secret collections on the fake: putSecret and deleteSecret touch only these. */
function fakeSecretStore() {
  const secrets = new FakeCollection();
  const secretSlots = new FakeCollection();
  const store = Object.create(MongoTenantStore.prototype) as MongoTenantStore;
  Object.assign(store, { secrets, secretSlots });
  return { store, secrets, secretSlots };
}

describe("MongoTenantStore secrets limit under racing put and delete (in-memory fake, no server)", () => {
  const tenantId = ulid();
  const secret = (name: string): SecretRecord => ({
    tenantId,
    name,
    keyId: "k1",
    iv: new Uint8Array(12).fill(1),
    ciphertext: new Uint8Array(20).fill(2),
    createTime: new Date(),
    updateTime: new Date(),
  });
  const LIMIT = 1;

  it("a delete of the same name landing between a put's reservation and its insert leaves the slot counted", async () => {
    const { store, secrets } = fakeSecretStore();
    let raced = false;
    secrets.before = async (method) => {
      if (method !== "insertOne" || raced) return;
      raced = true;
      expect(await store.deleteSecret(tenantId, "A")).toBe(false); // nothing to delete yet: it frees the slot
    };
    expect(await store.putSecret(secret("A"), LIMIT)).not.toBeNull();
    expect(raced).toBe(true);
    // A is stored, so it holds the tenant's one slot: B is refused.
    expect(await store.putSecret(secret("B"), LIMIT)).toBeNull();
  });

  it("a put of the same name landing between a delete's removal and its release of the slot leaves the slot counted", async () => {
    const { store, secretSlots } = fakeSecretStore();
    await store.putSecret(secret("A"), LIMIT);
    let raced = false;
    secretSlots.before = async (method, _filter, update) => {
      if (method !== "updateOne" || raced || !update?.$pull) return;
      raced = true;
      expect(await store.putSecret(secret("A"), LIMIT)).not.toBeNull(); // recreated before the slot is pulled
    };
    expect(await store.deleteSecret(tenantId, "A")).toBe(true);
    expect(raced).toBe(true);
    expect(await store.putSecret(secret("B"), LIMIT)).toBeNull();
  });

  it("a put whose freed slot was taken meanwhile by another name gives its value up: never past the limit", async () => {
    const { store, secrets } = fakeSecretStore();
    let raced = false;
    secrets.before = async (method, filter) => {
      if (method !== "insertOne" || raced || filter.name !== "A") return;
      raced = true;
      await store.deleteSecret(tenantId, "A"); // frees A's reservation
      expect(await store.putSecret(secret("B"), LIMIT)).not.toBeNull(); // and B takes the one slot
    };
    expect(await store.putSecret(secret("A"), LIMIT)).toBeNull();
    expect(raced).toBe(true);
    expect([...secrets.docs.values()].map((d) => d.name)).toEqual(["B"]);
  });
});
