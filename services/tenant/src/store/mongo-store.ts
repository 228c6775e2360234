/**
 * The tenant store on MongoDB (official driver), for several tenant-service replicas in
 * production (OUTPOST_MONGO_URL). Same contract as the SQLite adapter, without multi-document
 * transactions (a standalone server has none), so every check that must be atomic is either a
 * single-document conditional update or a unique index:
 * - state changes are findOneAndUpdate / updateOne with the expected value in the filter;
 * - uniqueness (tenant id, key id, key hash, secret name per tenant) is a unique index, and a
 *   duplicate-key error (11000) becomes DuplicateRecordError;
 * - counted limits (concurrent runs, runs per day, secrets per tenant) are guarded in the filter
 *   of one update of one document, so two replicas can never both take the last slot;
 * - indexes are created at start-up; released admissions and old day counters expire by TTL.
 *
 * Admission (SPEC T3) uses three collections:
 *   admissions        one document per (tenant, dispatch id), unique _id: the idempotency claim
 *                     and the record released later. Inserted first as "pending", so of two
 *                     parallel calls for one dispatch exactly one decides; the other waits for
 *                     the decision (admitted -> "duplicate"; refused -> the claim is deleted and
 *                     it decides again itself).
 *   tenant_active     one document per tenant, { active: [dispatchId…] }: the concurrent slots.
 *                     Reserved with $addToSet under the filter "already a member, or fewer than
 *                     <limit> members" (`active.<limit-1>` does not exist). Membership (not a
 *                     counter) makes reserve and release idempotent per dispatch id: a retried
 *                     reservation or release after a crash neither double counts nor leaks.
 *   tenant_days       one document per (tenant, UTC day), { count }: the daily quota, $inc-ed
 *                     under { count: { $lt: limit } }. Released runs still count; the count is
 *                     decremented only by a release with refundDay (the dispatcher never stored
 *                     the id), and only by the call whose conditional update marked that
 *                     admission `refunded`, so a repeated refund gives back nothing more.
 * The owner of a pending claim reserves the concurrent slot, then the day (recording on the
 * claim that it counted it: `dayCounted`), then marks the claim admitted; every write to the
 * claim is conditional on still owning it (pending, with its claimedAt). A refusal undoes what it
 * reserved and deletes its claim. A write that fails after the slot was reserved (a network
 * error, a step-down) has the owner undo its reservations, best effort, before it answers the
 * error: the claim becomes a released mark, the slot is freed and a counted day given back.
 * A process that dies mid-way (or whose undo failed too) leaves a pending claim: after
 * CLAIM_STALE_MS another admission of that dispatch takes it over (keeping a day already
 * counted), and so does a release: it turns the claim into a released mark, frees its slot and,
 * for a refund, gives back the day the claim says was counted. A release that finds the claim
 * pending and not yet stale flags it (`releaseRequested`, and `refundRequested` for a refund), so
 * that the decision, as it admits, releases it so, and answers AdmissionUndecidedError: the
 * dispatcher asks again until the decision has released it or the claim is stale and taken over.
 * An owner that finds its claim taken over settles only what the claim does not record. The only
 * residue a crash can leave is a day count one too high (never one too low; a refund marks before
 * it decrements), so a failure errs toward refusing, never toward admitting past a limit.
 */
import { Binary, MongoClient, MongoServerError, type Collection, type Db, type Filter } from "mongodb";
import {
  ADMISSION_RETENTION_MS,
  AdmissionUndecidedError,
  DuplicateRecordError,
  type AdmissionOutcome,
  type AdmissionRequest,
  type ApiKeyRecord,
  type ReleaseOptions,
  type SecretRecord,
  type TenantRecord,
  type TenantState,
  type TenantStore,
  type TenantTier,
  type TenantUsage,
} from "./store.ts";

type TenantDoc = Omit<TenantRecord, "id"> & { _id: string };
type ApiKeyDoc = Omit<ApiKeyRecord, "id"> & { _id: string };
/** iv and ciphertext come back from the driver as BSON Binary. */
type SecretDoc = Omit<SecretRecord, "iv" | "ciphertext"> & { _id: string; iv: Uint8Array | Binary; ciphertext: Uint8Array | Binary };
type SecretSlotsDoc = { _id: string; names: string[] };
type AdmissionState = "pending" | "admitted";
interface AdmissionDoc {
  _id: string;
  tenantId: string;
  dispatchId: string;
  day: string;
  admitTime: Date;
  releaseTime: Date | null;
  state: AdmissionState;
  /** Wall-clock time the current owner claimed it (takeover of abandoned claims). */
  claimedAt: Date;
  /** Set at release: the TTL index deletes the record then (unreleased ones never expire). */
  expireAt?: Date;
  /** A release arrived while the admission was being decided: the decision releases it. */
  releaseRequested?: boolean;
  /** That release was a refund (never-created dispatch): the decision's release gives the day back too. */
  refundRequested?: boolean;
  /** Its run of the day was given back (set before the day counter is decremented, once). */
  refunded?: boolean;
  /**
   * Set by the deciding call right after its increment of the day's counter answered: a call
   * that takes the claim over (as abandoned) knows the run of the day is already counted.
   */
  dayCounted?: boolean;
}
type ActiveDoc = { _id: string; active: string[] };
type DayDoc = { _id: string; tenantId: string; day: string; count: number; expireAt: Date };

const DUPLICATE_KEY = 11000;
/** A pending claim older than this is taken as abandoned (its owner died mid-admission). */
export const CLAIM_STALE_MS = 30_000;
/** How long a day counter is kept after its day. */
export const DAY_COUNTER_RETENTION_MS = 40 * 24 * 60 * 60 * 1000;
/** Bound on waiting for another call's pending decision about the same dispatch. */
const ADMISSION_ROUNDS = 200;
const ADMISSION_POLL_MS = 15;
/** Bound on a release looking again at an admission that changed under it (admitted or refused just then). */
const RELEASE_ROUNDS = 5;

// ---- Pure helpers (unit-tested without a server) ----------------------------------------

/** _id of the admission of one dispatch; ULIDs never contain "/". */
export function admissionId(tenantId: string, dispatchId: string): string {
  return `${tenantId}/${dispatchId}`;
}

/** _id of a tenant's counter for one UTC day ("YYYY-MM-DD"). */
export function dayCounterId(tenantId: string, day: string): string {
  return `${tenantId}/${day}`;
}

/** _id of a secret; names match ^[A-Z_][A-Z0-9_]*$, so "/" cannot be ambiguous. */
export function secretId(tenantId: string, name: string): string {
  return `${tenantId}/${name}`;
}

/**
 * Filter for reserving `member` in the set array `field` of document `ownerId` with at most
 * `limit` members: matches when the member is already in (idempotent retry) or when the array
 * has no element at index limit-1 (fewer than `limit` members). Used with $addToSet on an
 * existing document. Undefined when the limit admits nothing.
 */
export function setSlotFilter(ownerId: string, field: string, member: string, limit: number): Filter<{ _id: string }> | undefined {
  if (!Number.isInteger(limit) || limit <= 0) return undefined;
  return { _id: ownerId, $or: [{ [field]: member }, { [`${field}.${limit - 1}`]: { $exists: false } }] } as Filter<{ _id: string }>;
}

/** Filter for taking one of `limit` daily admissions: the counter must still be below it. */
export function dayCountFilter(tenantId: string, day: string, limit: number): Filter<DayDoc> | undefined {
  if (!Number.isInteger(limit) || limit <= 0) return undefined;
  return { _id: dayCounterId(tenantId, day), count: { $lt: limit } };
}

/** When a day counter may be deleted: DAY_COUNTER_RETENTION_MS after the start of its day. */
export function dayCounterExpiry(day: string): Date {
  const start = Date.parse(`${day}T00:00:00.000Z`);
  return new Date((Number.isNaN(start) ? Date.now() : start) + DAY_COUNTER_RETENTION_MS);
}

/** A fresh Uint8Array of a value the driver returns as Binary (or a Uint8Array given back). */
export function bytesOf(value: Uint8Array | Binary): Uint8Array {
  return new Uint8Array(value instanceof Binary ? value.value() : value);
}

export function isDuplicateKey(err: unknown): boolean {
  return err instanceof MongoServerError && err.code === DUPLICATE_KEY;
}

function toTenant(doc: TenantDoc): TenantRecord {
  return {
    id: doc._id,
    name: doc.name,
    contactEmail: doc.contactEmail,
    tier: doc.tier,
    state: doc.state,
    suspendReason: doc.suspendReason ?? "",
    createTime: doc.createTime,
    updateTime: doc.updateTime,
  };
}

function toApiKey(doc: ApiKeyDoc): ApiKeyRecord {
  return {
    id: doc._id,
    tenantId: doc.tenantId,
    displayName: doc.displayName,
    keyHash: doc.keyHash,
    prefix: doc.prefix,
    lastFour: doc.lastFour,
    createTime: doc.createTime,
    lastUsedTime: doc.lastUsedTime ?? null,
    revokeTime: doc.revokeTime ?? null,
  };
}

/** Maps a stored secret document back to a record (exported for the unit test of Binary handling). */
export function toSecret(doc: SecretDoc): SecretRecord {
  return {
    tenantId: doc.tenantId,
    name: doc.name,
    keyId: doc.keyId,
    iv: bytesOf(doc.iv),
    ciphertext: bytesOf(doc.ciphertext),
    createTime: doc.createTime,
    updateTime: doc.updateTime,
  };
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

export class MongoTenantStore implements TenantStore {
  private readonly client: MongoClient;
  private readonly tenants: Collection<TenantDoc>;
  private readonly apiKeys: Collection<ApiKeyDoc>;
  private readonly secrets: Collection<SecretDoc>;
  private readonly secretSlots: Collection<SecretSlotsDoc>;
  private readonly admissions: Collection<AdmissionDoc>;
  private readonly active: Collection<ActiveDoc>;
  private readonly days: Collection<DayDoc>;

  private constructor(client: MongoClient, db: Db) {
    this.client = client;
    this.tenants = db.collection<TenantDoc>("tenants");
    this.apiKeys = db.collection<ApiKeyDoc>("api_keys");
    this.secrets = db.collection<SecretDoc>("secrets");
    this.secretSlots = db.collection<SecretSlotsDoc>("tenant_secret_slots");
    this.admissions = db.collection<AdmissionDoc>("admissions");
    this.active = db.collection<ActiveDoc>("tenant_active");
    this.days = db.collection<DayDoc>("tenant_days");
  }

  /** Connects and creates the indexes (idempotent). `dbName` defaults to the URL's database or "outpost". */
  static async connect(url: string, dbName?: string): Promise<MongoTenantStore> {
    const client = new MongoClient(url, { serverSelectionTimeoutMS: 5000 });
    await client.connect();
    const store = new MongoTenantStore(client, client.db(dbName));
    try {
      await store.createIndexes();
    } catch (err) {
      await client.close();
      throw err;
    }
    return store;
  }

  private async createIndexes(): Promise<void> {
    await Promise.all([
      this.tenants.createIndex({ state: 1, _id: 1 }, { name: "state" }),
      this.apiKeys.createIndex({ keyHash: 1 }, { unique: true, name: "key_hash" }),
      this.apiKeys.createIndex({ tenantId: 1, _id: 1 }, { name: "tenant" }),
      this.secrets.createIndex({ tenantId: 1, name: 1 }, { unique: true, name: "tenant_name" }),
      this.secrets.createIndex({ keyId: 1, tenantId: 1, name: 1 }, { name: "key_id" }),
      this.admissions.createIndex({ expireAt: 1 }, { expireAfterSeconds: 0, name: "retention" }),
      this.days.createIndex({ expireAt: 1 }, { expireAfterSeconds: 0, name: "retention" }),
    ]);
  }

  // ---- Tenants and keys -----------------------------------------------------------------

  /**
   * Key first, then tenant: a colliding key (the likely conflict) writes nothing; a colliding
   * tenant id removes the key again. A crash in between leaves a key whose tenant is missing,
   * which authentication already treats as unknown.
   */
  async createTenantWithKey(tenant: TenantRecord, key: ApiKeyRecord): Promise<void> {
    await this.createApiKey(key);
    const { id, ...rest } = tenant;
    try {
      await this.tenants.insertOne({ _id: id, ...rest });
    } catch (err) {
      await this.apiKeys.deleteOne({ _id: key.id });
      if (isDuplicateKey(err)) throw new DuplicateRecordError(`tenant ${tenant.id} already exists`, { cause: err });
      throw err;
    }
  }

  async getTenant(id: string): Promise<TenantRecord | null> {
    const doc = await this.tenants.findOne({ _id: id });
    return doc ? toTenant(doc) : null;
  }

  async transitionTenantState(
    id: string,
    expected: TenantState,
    next: TenantState,
    updateTime: Date,
    suspendReason = "",
  ): Promise<TenantRecord | null> {
    const doc = await this.tenants.findOneAndUpdate(
      { _id: id, state: expected },
      { $set: { state: next, suspendReason, updateTime } },
      { returnDocument: "after" },
    );
    return doc ? toTenant(doc) : null;
  }

  async updateTenantTier(id: string, tier: TenantTier, updateTime: Date): Promise<TenantRecord | null> {
    const doc = await this.tenants.findOneAndUpdate({ _id: id }, { $set: { tier, updateTime } }, { returnDocument: "after" });
    return doc ? toTenant(doc) : null;
  }

  async listTenants(afterId: string | undefined, limit: number): Promise<TenantRecord[]> {
    const docs = await this.tenants
      .find(afterId ? { _id: { $gt: afterId } } : {})
      .sort({ _id: 1 })
      .limit(limit)
      .toArray();
    return docs.map(toTenant);
  }

  async listSuspendedTenantIds(): Promise<string[]> {
    const docs = await this.tenants.find({ state: "suspended" }, { projection: { _id: 1 } }).sort({ _id: 1 }).toArray();
    return docs.map((d) => d._id);
  }

  async createApiKey(key: ApiKeyRecord, activeLimit?: number): Promise<boolean> {
    if (activeLimit !== undefined && (await this.apiKeys.countDocuments({ tenantId: key.tenantId, revokeTime: null }, { limit: activeLimit })) >= activeLimit) {
      return false;
    }
    const { id, ...rest } = key;
    try {
      await this.apiKeys.insertOne({ _id: id, ...rest });
    } catch (err) {
      // The message names the constraint only, never the hash value.
      if (isDuplicateKey(err)) throw new DuplicateRecordError(`api key ${key.id} collides with an existing id or hash`, { cause: err });
      throw err;
    }
    return true;
  }

  async getApiKey(id: string): Promise<ApiKeyRecord | null> {
    const doc = await this.apiKeys.findOne({ _id: id });
    return doc ? toApiKey(doc) : null;
  }

  async findApiKeyByHash(keyHash: string): Promise<ApiKeyRecord | null> {
    const doc = await this.apiKeys.findOne({ keyHash });
    return doc ? toApiKey(doc) : null;
  }

  async revokeApiKey(id: string, revokeTime: Date): Promise<ApiKeyRecord | null> {
    const doc = await this.apiKeys.findOneAndUpdate({ _id: id, revokeTime: null }, { $set: { revokeTime } }, { returnDocument: "after" });
    return doc ? toApiKey(doc) : null;
  }

  async touchApiKey(id: string, usedTime: Date, staleBefore: Date): Promise<boolean> {
    // { lastUsedTime: null } matches null and absent alike.
    const result = await this.apiKeys.updateOne(
      { _id: id, $or: [{ lastUsedTime: null }, { lastUsedTime: { $lt: staleBefore } }] },
      { $set: { lastUsedTime: usedTime } },
    );
    return result.modifiedCount > 0;
  }

  async listApiKeys(tenantId: string, afterId: string | undefined, limit: number): Promise<ApiKeyRecord[]> {
    const filter: Filter<ApiKeyDoc> = { tenantId };
    if (afterId) filter._id = { $gt: afterId };
    const docs = await this.apiKeys.find(filter).sort({ _id: 1 }).limit(limit).toArray();
    return docs.map(toApiKey);
  }

  // ---- Secrets --------------------------------------------------------------------------

  /**
   * An existing name is replaced in place. A new name first reserves a slot in the tenant's
   * name set (tenant_secret_slots, guarded like the concurrent-run slots), then inserts; a
   * racing put of the same name that inserted first turns this into a replace.
   */
  async putSecret(secret: SecretRecord, maxSecrets: number): Promise<SecretRecord | null> {
    const replaced = await this.replaceSecret(secret);
    if (replaced) return replaced;
    const filter = setSlotFilter(secret.tenantId, "names", secret.name, maxSecrets);
    if (!filter) return null;
    await this.secretSlots.updateOne({ _id: secret.tenantId }, { $setOnInsert: { names: [] } }, { upsert: true });
    const reserved = await this.secretSlots.updateOne(filter, { $addToSet: { names: secret.name } });
    if (reserved.matchedCount === 0) return null;
    const _id = secretId(secret.tenantId, secret.name);
    try {
      await this.secrets.insertOne({ _id, ...secret });
    } catch (err) {
      if (!isDuplicateKey(err)) throw err;
      const again = await this.replaceSecret(secret);
      if (!again) throw new Error(`secret ${secret.name} conflicted but no existing document was found`, { cause: err });
      return again;
    }
    // A delete of this name between the reservation and the insert found nothing to delete and
    // freed the slot: the value stored now would count against nothing, and a tenant racing put
    // and delete could hold secrets past the limit. So the slot is taken again after the insert
    // (deleteSecret checks the other way round, after its release); if the set filled up
    // meanwhile, this put gives its value up (unless a newer put replaced it) and is refused.
    const kept = await this.secretSlots.updateOne(filter, { $addToSet: { names: secret.name } });
    if (kept.matchedCount === 0) {
      await this.secrets.deleteOne({ _id, iv: new Binary(secret.iv) });
      return null;
    }
    return { ...secret, iv: new Uint8Array(secret.iv), ciphertext: new Uint8Array(secret.ciphertext) };
  }

  private async replaceSecret(secret: SecretRecord): Promise<SecretRecord | null> {
    const doc = await this.secrets.findOneAndUpdate(
      { _id: secretId(secret.tenantId, secret.name) },
      { $set: { keyId: secret.keyId, iv: secret.iv, ciphertext: secret.ciphertext, updateTime: secret.updateTime } },
      { returnDocument: "after" },
    );
    return doc ? toSecret(doc) : null;
  }

  async getSecrets(tenantId: string, names: readonly string[]): Promise<SecretRecord[]> {
    if (names.length === 0) return [];
    const docs = await this.secrets.find({ _id: { $in: names.map((n) => secretId(tenantId, n)) } }).toArray();
    return docs.map(toSecret);
  }

  async listSecrets(tenantId: string, afterName: string | undefined, limit: number): Promise<SecretRecord[]> {
    const filter: Filter<SecretDoc> = { tenantId };
    if (afterName !== undefined) filter.name = { $gt: afterName };
    const docs = await this.secrets.find(filter).sort({ name: 1 }).limit(limit).toArray();
    return docs.map(toSecret);
  }

  async deleteSecret(tenantId: string, name: string): Promise<boolean> {
    const _id = secretId(tenantId, name);
    const result = await this.secrets.deleteOne({ _id });
    // Freed even when nothing was deleted: heals a slot left by a put that died before inserting.
    await this.secretSlots.updateOne({ _id: tenantId }, { $pull: { names: name } });
    // A put of the name that inserted after the delete (its reservation found the name still in
    // the set) must not be left without its slot: checked after the release, as putSecret checks
    // after its insert, so of the two one always sees the other.
    if (await this.secrets.findOne({ _id }, { projection: { _id: 1 } })) {
      await this.secretSlots.updateOne({ _id: tenantId }, { $addToSet: { names: name } });
    }
    return result.deletedCount > 0;
  }

  async listSecretsNotSealedWith(keyId: string, limit: number): Promise<SecretRecord[]> {
    const docs = await this.secrets
      .find({ keyId: { $ne: keyId } })
      .sort({ tenantId: 1, name: 1 })
      .limit(limit)
      .toArray();
    return docs.map(toSecret);
  }

  async resealSecret(
    tenantId: string,
    name: string,
    expected: { keyId: string; iv: Uint8Array },
    next: { keyId: string; iv: Uint8Array; ciphertext: Uint8Array },
  ): Promise<boolean> {
    const result = await this.secrets.updateOne(
      { _id: secretId(tenantId, name), keyId: expected.keyId, iv: new Binary(expected.iv) },
      { $set: { keyId: next.keyId, iv: next.iv, ciphertext: next.ciphertext } },
    );
    return result.modifiedCount > 0;
  }

  // ---- Admission (design in the header comment) -----------------------------------------

  async admitDispatch(request: AdmissionRequest): Promise<AdmissionOutcome> {
    const _id = admissionId(request.tenantId, request.dispatchId);
    for (let round = 0; round < ADMISSION_ROUNDS; round++) {
      const claimedAt = new Date();
      const claim: AdmissionDoc = {
        _id,
        tenantId: request.tenantId,
        dispatchId: request.dispatchId,
        day: request.day,
        admitTime: request.admitTime,
        releaseTime: null,
        state: "pending",
        claimedAt,
      };
      let claimed = true;
      try {
        await this.admissions.insertOne(claim);
      } catch (err) {
        if (!isDuplicateKey(err)) throw err;
        claimed = false;
      }
      if (claimed) return await this.decide(request, claim);
      const existing = await this.admissions.findOne({ _id });
      if (!existing) continue; // refused and deleted meanwhile: decide again
      if (existing.state === "admitted") return { kind: "duplicate" };
      if (existing.claimedAt.getTime() < Date.now() - CLAIM_STALE_MS) {
        // Its owner died mid-way: take the claim over (only one taker wins the compare). A run of
        // the day its owner already counted stays counted, in its day, and is not counted again.
        const counted = existing.dayCounted === true;
        const taken = await this.admissions.findOneAndUpdate(
          { _id, state: "pending", claimedAt: existing.claimedAt, dayCounted: counted ? true : { $ne: true } },
          { $set: counted ? { claimedAt, admitTime: request.admitTime } : { claimedAt, day: request.day, admitTime: request.admitTime } },
          { returnDocument: "after" },
        );
        if (taken) return await this.decide(request, taken);
        continue;
      }
      await sleep(ADMISSION_POLL_MS);
    }
    throw new Error(`admission of dispatch ${request.dispatchId} still undecided by a parallel call`);
  }

  /**
   * Runs the checks for a claim this call owns; on refusal undoes its reservations and drops the
   * claim. Every write to the claim is conditional on still owning it (pending, with this
   * claimedAt), so a call that lost it (taken over as abandoned) changes nothing there and
   * settles only what it did itself (lostClaim). If a write fails after the slot was reserved,
   * the reservations are undone (best effort) before the error is passed on: the claim becomes a
   * released mark, the slot is freed and a counted day given back (undoDecision); if that fails
   * too, the claim stays pending and a later release takes it over once it is stale.
   */
  private async decide(request: AdmissionRequest, claim: AdmissionDoc): Promise<AdmissionOutcome> {
    const { tenantId, dispatchId } = request;
    const owned = { _id: claim._id, state: "pending" as const, claimedAt: claim.claimedAt };
    // The day this admission's run is counted in, once it is: set after the increment answered,
    // or from the start for a claim taken over from an owner that counted it.
    let countedDay: string | undefined = claim.dayCounted === true ? claim.day : undefined;
    // Whether the claim itself says so (then whoever holds the claim gives the day back).
    let flagged = claim.dayCounted === true;
    let reserving = false;
    // Set once the claim is no longer this call's (dropped by it, or found taken over): from then
    // on nothing is left for an undo to do, and an undo could give a day back twice.
    let settled = false;
    const lost = (): Promise<AdmissionOutcome> => {
      settled = true;
      return this.lostClaim(request, countedDay, flagged);
    };
    const refuse = async (quota: "concurrent_runs" | "runs_per_day"): Promise<AdmissionOutcome> => {
      const dropped = await this.admissions.deleteOne(owned);
      if (dropped.deletedCount === 0) return lost();
      settled = true;
      if (countedDay !== undefined) await this.uncountDay(tenantId, countedDay);
      return { kind: "over_quota", quota };
    };

    try {
      if (countedDay === undefined) {
        // The day first (a read; the counted increment below is what enforces it): with both used
        // up, the one to name is the one a wait for a run cannot fix.
        const day = await this.days.findOne({ _id: dayCounterId(tenantId, request.day) });
        if (!dayCountFilter(tenantId, request.day, request.dailyLimit) || (day && day.count >= request.dailyLimit)) return await refuse("runs_per_day");
      }
      const slot = setSlotFilter(tenantId, "active", dispatchId, request.concurrentLimit);
      if (!slot) return await refuse("concurrent_runs");
      // Create the tenant's document by an equality upsert first: a conditional upsert could
      // collide with a parallel first insert and be mistaken for "full".
      await this.active.updateOne({ _id: tenantId }, { $setOnInsert: { active: [] } }, { upsert: true });
      reserving = true; // from here a failure may leave the slot taken
      const reserved = await this.active.updateOne(slot as Filter<ActiveDoc>, { $addToSet: { active: dispatchId } });
      if (reserved.matchedCount === 0) return await refuse("concurrent_runs");

      if (countedDay === undefined) {
        const today = dayCountFilter(tenantId, request.day, request.dailyLimit)!;
        await this.days.updateOne(
          { _id: dayCounterId(tenantId, request.day) },
          { $setOnInsert: { tenantId, day: request.day, count: 0, expireAt: dayCounterExpiry(request.day) } },
          { upsert: true },
        );
        const counted = (await this.days.updateOne(today, { $inc: { count: 1 } })).matchedCount > 0;
        if (!counted) {
          await this.active.updateOne({ _id: tenantId }, { $pull: { active: dispatchId } });
          return await refuse("runs_per_day");
        }
        countedDay = request.day;
        // Recorded on the claim, so a release that takes it over as abandoned can give it back.
        const recorded = await this.admissions.updateOne(owned, { $set: { dayCounted: true } });
        if (recorded.matchedCount === 0) return await lost();
        flagged = true;
      }
      const admitted = await this.admissions.findOneAndUpdate(owned, { $set: { state: "admitted" } }, { returnDocument: "after" });
      if (!admitted) return await lost();
      // Released while it was being decided (the dispatcher gave up waiting for this answer).
      if (admitted.releaseRequested) await this.releaseDispatch(tenantId, dispatchId, new Date(), { refundDay: admitted.refundRequested === true });
      return { kind: "admitted" };
    } catch (err) {
      if (reserving && !settled) await this.undoDecision(request, owned, countedDay, flagged).catch(() => undefined);
      throw err;
    }
  }

  /**
   * After a write of `decide` failed: turns the claim it still owns into a released mark (no
   * day, so nothing is given back twice; a late admission of the id answers "duplicate"), then
   * frees the slot and gives back the run of the day if it was counted. A claim it no longer
   * owns (admitted by this very call, its answer lost; or taken over) is settled as lostClaim
   * does, without its answer.
   */
  private async undoDecision(request: AdmissionRequest, owned: Filter<AdmissionDoc>, countedDay: string | undefined, flagged: boolean): Promise<void> {
    const now = new Date();
    const marked = await this.admissions.findOneAndUpdate(owned, {
      $set: { state: "admitted", day: "", releaseTime: now, expireAt: new Date(now.getTime() + ADMISSION_RETENTION_MS) },
    });
    if (!marked) {
      await this.settleLostClaim(request, countedDay, flagged);
      return;
    }
    await this.active.updateOne({ _id: request.tenantId }, { $pull: { active: request.dispatchId } });
    if (countedDay !== undefined) await this.uncountDay(request.tenantId, countedDay);
  }

  /**
   * This call's claim was taken over (its owner was taken for dead) before it decided: what the
   * claim does not record is settled here (a run of the day counted but not yet recorded on it
   * is given back; the slot is freed if the taker released the dispatch, since this call's
   * reservation may have landed after the taker freed it). The answer is the taker's: "duplicate"
   * when it admitted the dispatch, otherwise an error (no definite answer: the dispatcher
   * releases the id, which does no harm).
   */
  private async lostClaim(request: AdmissionRequest, countedDay: string | undefined, flagged: boolean): Promise<AdmissionOutcome> {
    const now = await this.settleLostClaim(request, countedDay, flagged);
    if (now?.state === "admitted" && now.releaseTime === null) return { kind: "duplicate" };
    throw new Error(`admission of dispatch ${request.dispatchId} was taken over by another call before it was decided`);
  }

  private async settleLostClaim(request: AdmissionRequest, countedDay: string | undefined, flagged: boolean): Promise<AdmissionDoc | null> {
    const { tenantId, dispatchId } = request;
    if (countedDay !== undefined && !flagged) await this.uncountDay(tenantId, countedDay);
    const now = await this.admissions.findOne({ _id: admissionId(tenantId, dispatchId) });
    if (now?.state === "admitted" && now.releaseTime !== null) await this.active.updateOne({ _id: tenantId }, { $pull: { active: dispatchId } });
    return now;
  }

  /** Takes one run off a day's counter (never below zero). */
  private async uncountDay(tenantId: string, day: string): Promise<void> {
    await this.days.updateOne({ _id: dayCounterId(tenantId, day), count: { $gt: 0 } }, { $inc: { count: -1 } });
  }

  async releaseDispatch(tenantId: string, dispatchId: string, releaseTime: Date, options: ReleaseOptions = {}): Promise<boolean> {
    const _id = admissionId(tenantId, dispatchId);
    const refundDay = options.refundDay === true;
    const expireAt = new Date(releaseTime.getTime() + ADMISSION_RETENTION_MS);
    let doc: AdmissionDoc | null = null;
    for (let round = 0; round < RELEASE_ROUNDS; round++) {
      doc = await this.admissions.findOneAndUpdate({ _id, state: "admitted", releaseTime: null }, { $set: { releaseTime, expireAt } });
      if (doc) break;
      const before = await this.releaseBeforeAdmitted(_id, tenantId, dispatchId, releaseTime, expireAt, refundDay);
      if (before === "done") return false;
      if (before === "undecided") {
        throw new AdmissionUndecidedError(`the admission of dispatch ${dispatchId} is still being decided; its release is recorded, ask again shortly`);
      }
      if (before === "released") break;
      // "changed": it was admitted (or refused) just now; release it as it is now.
    }
    // The slot is freed on every call for a released admission, so a retried release heals a
    // crash between the two writes; $pull of an absent member changes nothing.
    if (doc || (await this.admissions.countDocuments({ _id, state: "admitted" })) > 0) {
      await this.active.updateOne({ _id: tenantId }, { $pull: { active: dispatchId } });
    }
    if (refundDay) await this.refundDayOf(_id, tenantId);
    return doc !== null;
  }

  /**
   * Gives back the run of the day an admission took, at most once: only the call whose
   * conditional update marks the admission `refunded` decrements its day's counter (the day it
   * was counted in). A released mark (day "") took nothing and gives back nothing. A crash between
   * the two writes leaves the count one too high, never one too low.
   */
  private async refundDayOf(_id: string, tenantId: string): Promise<void> {
    const marked = await this.admissions.findOneAndUpdate({ _id, state: "admitted", day: { $ne: "" }, refunded: { $ne: true } }, { $set: { refunded: true } });
    if (!marked) return;
    await this.uncountDay(tenantId, marked.day);
  }

  /**
   * A release of an id with no unreleased admitted record:
   * - missing: a released mark with no day is left (a later admission of it finds the mark and
   *   answers "duplicate") — "done";
   * - still being decided: flagged, and its decision releases it as it admits (giving back the
   *   day too when `refundDay`) — "undecided": the caller should ask again, so that a decision
   *   that never finishes (its owner died, or failed and could not undo) is taken over below;
   * - pending and abandoned (claimed more than CLAIM_STALE_MS ago): taken over by a compare on
   *   its claimedAt and turned into a released mark; its slot is freed and, when the release or
   *   an earlier flagged one was a refund, the run of the day its owner recorded as counted is
   *   given back — "done";
   * - already released — "released"; changed under this call (admitted or deleted just now) —
   *   "changed": the caller looks again.
   */
  private async releaseBeforeAdmitted(
    _id: string,
    tenantId: string,
    dispatchId: string,
    releaseTime: Date,
    expireAt: Date,
    refundDay: boolean,
  ): Promise<"done" | "undecided" | "released" | "changed"> {
    const mark: AdmissionDoc = { _id, tenantId, dispatchId, day: "", admitTime: releaseTime, releaseTime, state: "admitted", claimedAt: releaseTime, expireAt };
    try {
      await this.admissions.insertOne(mark);
      return "done";
    } catch (err) {
      if (!isDuplicateKey(err)) throw err;
    }
    const existing = await this.admissions.findOne({ _id });
    if (!existing) return "changed"; // refused and deleted meanwhile: the mark can go in now
    if (existing.state === "admitted") return existing.releaseTime === null ? "changed" : "released";
    const ownedByIt = { _id, state: "pending" as const, claimedAt: existing.claimedAt };
    if (existing.claimedAt.getTime() < Date.now() - CLAIM_STALE_MS) {
      const taken = await this.admissions.findOneAndUpdate(ownedByIt, {
        $set: { state: "admitted", day: "", releaseTime, expireAt, claimedAt: new Date() },
      });
      if (!taken) return "changed";
      await this.active.updateOne({ _id: tenantId }, { $pull: { active: dispatchId } });
      if (taken.dayCounted === true && (refundDay || taken.refundRequested === true)) await this.uncountDay(tenantId, taken.day);
      return "done";
    }
    const flagged = await this.admissions.updateOne(ownedByIt, {
      $set: refundDay ? { releaseRequested: true, refundRequested: true } : { releaseRequested: true },
    });
    return flagged.matchedCount > 0 ? "undecided" : "changed";
  }

  /** The counts admission enforces: slots held (pending decisions included) and the day's counter. */
  async usageOf(tenantId: string, day: string): Promise<TenantUsage> {
    const [active, today] = await Promise.all([this.active.findOne({ _id: tenantId }), this.days.findOne({ _id: dayCounterId(tenantId, day) })]);
    return { activeRuns: active?.active.length ?? 0, runsToday: today?.count ?? 0 };
  }

  async close(): Promise<void> {
    await this.client.close();
  }
}
