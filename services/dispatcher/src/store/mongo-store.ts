/**
 * The dispatcher store on MongoDB (official driver), for several dispatcher replicas in
 * production (OUTPOST_MONGO_URL). Same contract as the SQLite adapter:
 * - conditional updates are findOneAndUpdate with the expected state (and lease) in the filter;
 * - leaseNext picks the fairest candidate, then claims it with findOneAndUpdate on
 *   {_id, state: "QUEUED"}: of two replicas racing for one run, exactly one matches; the
 *   loser picks again;
 * - the request-id idempotency is a unique partial index (duplicate key -> the existing one);
 * - indexes are created at start-up; audit events and executor reports expire by TTL indexes.
 */
import { MongoClient, MongoServerError, type Collection, type Db, type Filter } from "mongodb";
import { AUDIT_RETENTION_MS, EXECUTOR_RETENTION_MS } from "./store.ts";
import type {
  AuditRecord,
  DispatchPatch,
  DispatchRecord,
  DispatcherStore,
  DispatchState,
  Expectation,
  ExecutorReport,
  KeyBinding,
  LeaseRequest,
  ListFilter,
  StoredAgent,
} from "./store.ts";

/**
 * `labelPairs` ("key=value", derived from `labels` on every write) is what label filters query:
 * label keys may hold dots ("app.kubernetes.io"), which a query path `labels.<key>` would read
 * as nested fields and never match. Keys cannot hold "=", so a pair is unambiguous.
 */
type DispatchDoc = Omit<DispatchRecord, "id"> & { _id: string; labelPairs: string[] };
type AgentDoc = Omit<StoredAgent, "name"> & { _id: string };
type AuditDoc = Omit<AuditRecord, "id"> & { _id: string; expireAt: Date };
type ExecutorDoc = Omit<ExecutorReport, "executorId"> & { _id: string; expireAt: Date };
/** An executor id's key binding (bindExecutorKey); `expireAt` lets MongoDB drop it long after it ended. */
type ExecutorKeyDoc = { _id: string; publicKey: string; expiresAt: number; expireAt: Date };
type TurnDoc = { _id: string; lastTurn: number };
/** One document, `_id: "turn"`: the turn counter every replica increments atomically. */
type CounterDoc = { _id: string; value: number };

/** Candidates examined per leaseNext pick before trying to claim one. */
const LEASE_CANDIDATES = 5;
const DUPLICATE_KEY = 11000;

export function toDoc(record: DispatchRecord): DispatchDoc {
  const { id, ...rest } = record;
  return { _id: id, ...rest, labelPairs: labelPairsOf(record.labels) };
}

export function fromDoc(doc: DispatchDoc): DispatchRecord {
  const { _id, labelPairs: _derived, ...rest } = doc;
  // Written before slots were tracked on the dispatch: ended ones were released then.
  return { id: _id, ...rest, slotHeld: rest.slotHeld ?? false };
}

function labelPairsOf(labels: Record<string, string>): string[] {
  return Object.entries(labels).map(([key, value]) => `${key}=${value}`);
}

/** The query of `list`: the tenant's dispatches matching every filter, before `afterId`. */
export function listQuery(tenantId: string, filter: ListFilter, afterId?: string): Filter<DispatchDoc> {
  const query: Filter<DispatchDoc> = { tenantId };
  if (afterId) query._id = { $lt: afterId };
  if (filter.state) query.state = filter.state;
  if (filter.agent) query.agent = filter.agent;
  const pairs = labelPairsOf(filter.labels ?? {});
  if (pairs.length > 0) query.labelPairs = { $all: pairs };
  return query;
}

export class MongoDispatchStore implements DispatcherStore {
  private readonly client: MongoClient;
  private readonly dispatches: Collection<DispatchDoc>;
  private readonly agents: Collection<AgentDoc>;
  private readonly audit: Collection<AuditDoc>;
  private readonly executors: Collection<ExecutorDoc>;
  private readonly executorKeys: Collection<ExecutorKeyDoc>;
  private readonly turns: Collection<TurnDoc>;
  private readonly counters: Collection<CounterDoc>;

  private constructor(client: MongoClient, db: Db) {
    this.client = client;
    this.dispatches = db.collection<DispatchDoc>("dispatches");
    this.agents = db.collection<AgentDoc>("agents");
    this.audit = db.collection<AuditDoc>("audit_events");
    this.executors = db.collection<ExecutorDoc>("executors");
    this.executorKeys = db.collection<ExecutorKeyDoc>("executor_keys");
    this.turns = db.collection<TurnDoc>("tenant_turns");
    this.counters = db.collection<CounterDoc>("counters");
  }

  /** Connects and creates the indexes (idempotent). `dbName` defaults to the URL's database or "outpost". */
  static async connect(url: string, dbName?: string): Promise<MongoDispatchStore> {
    const client = new MongoClient(url, { serverSelectionTimeoutMS: 5000 });
    await client.connect();
    const store = new MongoDispatchStore(client, client.db(dbName));
    await store.createIndexes();
    await store.markActiveSlotsHeld();
    await store.seedTurnCounter();
    return store;
  }

  private async createIndexes(): Promise<void> {
    await Promise.all([
      this.dispatches.createIndex(
        { tenantId: 1, requestId: 1 },
        { unique: true, partialFilterExpression: { requestId: { $gt: "" } }, name: "request_id" },
      ),
      this.dispatches.createIndex({ tenantId: 1, _id: -1 }, { name: "tenant" }),
      this.dispatches.createIndex({ tenantId: 1, labelPairs: 1 }, { name: "labels" }),
      this.dispatches.createIndex({ state: 1, tenantId: 1, _id: 1 }, { name: "queue" }),
      this.dispatches.createIndex({ state: 1, leaseExpiresAt: 1 }, { name: "lease" }),
      this.dispatches.createIndex({ executorId: 1, state: 1 }, { name: "executor" }),
      this.dispatches.createIndex({ createTime: 1 }, { name: "created" }),
      this.dispatches.createIndex({ endTime: 1 }, { partialFilterExpression: { slotHeld: true }, name: "slot_owed" }),
      this.audit.createIndex({ tenantId: 1, _id: -1 }, { name: "tenant" }),
      this.audit.createIndex({ expireAt: 1 }, { expireAfterSeconds: 0, name: "retention" }),
      this.executors.createIndex({ expireAt: 1 }, { expireAfterSeconds: 0, name: "retention" }),
      this.executorKeys.createIndex({ expireAt: 1 }, { expireAfterSeconds: 0, name: "retention" }),
    ]);
  }

  /** Runs written before slots were tracked on the dispatch, and still active, hold theirs. */
  private async markActiveSlotsHeld(): Promise<void> {
    await this.dispatches.updateMany(
      { slotHeld: { $exists: false }, state: { $in: ["QUEUED", "STARTING", "RUNNING"] } },
      { $set: { slotHeld: true } },
    );
  }

  async insert(record: DispatchRecord) {
    try {
      await this.dispatches.insertOne(toDoc(record));
      return { record, created: true };
    } catch (err) {
      if (!(err instanceof MongoServerError && err.code === DUPLICATE_KEY) || !record.requestId) throw err;
      const existing = await this.findByRequestId(record.tenantId, record.requestId);
      if (!existing) throw new Error(`dispatch ${record.id} conflicted but no existing document was found`, { cause: err });
      return { record: existing, created: false };
    }
  }

  async get(id: string) {
    const doc = await this.dispatches.findOne({ _id: id });
    return doc ? fromDoc(doc) : undefined;
  }

  async findByRequestId(tenantId: string, requestId: string) {
    if (!requestId) return undefined;
    const doc = await this.dispatches.findOne({ tenantId, requestId });
    return doc ? fromDoc(doc) : undefined;
  }

  async list(tenantId: string, filter: ListFilter, limit: number, afterId?: string) {
    const docs = await this.dispatches.find(listQuery(tenantId, filter, afterId)).sort({ _id: -1 }).limit(limit).toArray();
    return docs.map(fromDoc);
  }

  async update(id: string, expected: Expectation, patch: DispatchPatch) {
    const filter: Filter<DispatchDoc> = { _id: id, state: { $in: [...expected.states] } };
    if (expected.leaseId !== undefined) filter.leaseId = expected.leaseId;
    if (expected.leaseExpiredBefore !== undefined) filter.leaseExpiresAt = { $ne: null, $lt: expected.leaseExpiredBefore };
    if (expected.cancelRequested !== undefined) filter.cancelRequested = expected.cancelRequested;
    const set: Partial<DispatchDoc> = patch.labels ? { ...patch, labelPairs: labelPairsOf(patch.labels) } : patch;
    const doc = await this.dispatches.findOneAndUpdate(filter, { $set: set }, { returnDocument: "after" });
    return doc ? fromDoc(doc) : undefined;
  }

  async leaseNext(lease: LeaseRequest) {
    for (let round = 0; round < 10; round++) {
      const candidates = await this.candidates(lease);
      if (candidates.length === 0) return undefined;
      for (const id of candidates) {
        const doc = await this.dispatches.findOneAndUpdate(
          { _id: id, state: "QUEUED" },
          {
            $set: { state: "STARTING", executorId: lease.executorId, leaseId: lease.leaseId, leaseExpiresAt: lease.expiresAt, updateTime: lease.now },
            $inc: { attempt: 1 },
          },
          { returnDocument: "after" },
        );
        if (!doc) continue; // another replica won this one
        await this.takeTurn(doc.tenantId);
        return fromDoc(doc);
      }
    }
    return undefined;
  }

  /** Oldest leasable run of each tenant, least recently served tenant first. */
  private async candidates(lease: LeaseRequest): Promise<string[]> {
    const heads = await this.dispatches
      .aggregate<{ _id: string; first: string }>([
        { $match: { state: "QUEUED", notBefore: { $lte: lease.now }, tenantId: { $nin: [...(lease.excludeTenants ?? [])] } } },
        { $sort: { tenantId: 1, _id: 1 } },
        { $group: { _id: "$tenantId", first: { $first: "$_id" } } },
      ])
      .toArray();
    if (heads.length === 0) return [];
    const turns = new Map((await this.turns.find({ _id: { $in: heads.map((h) => h._id) } }).toArray()).map((t) => [t._id, t.lastTurn]));
    return heads
      .sort((a, b) => (turns.get(a._id) ?? 0) - (turns.get(b._id) ?? 0) || a.first.localeCompare(b.first))
      .slice(0, LEASE_CANDIDATES)
      .map((h) => h.first);
  }

  /**
   * The turn counter starts at the highest turn already given (a database whose turns were
   * numbered before the counter existed); otherwise the tenants with the lowest old turns would
   * be served again and again until the counter caught up. Idempotent ($max).
   */
  private async seedTurnCounter(): Promise<void> {
    const top = await this.turns.find().sort({ lastTurn: -1 }).limit(1).toArray();
    await this.counters.updateOne({ _id: "turn" }, { $max: { value: top[0]?.lastTurn ?? 0 } }, { upsert: true });
  }

  /**
   * Marks the tenant as served now: its turn number becomes the highest. The number comes from
   * one counter incremented atomically, so replicas leasing at the same moment never give two
   * tenants the same turn (reading the highest and adding one would).
   */
  private async takeTurn(tenantId: string): Promise<void> {
    const counter = await this.counters.findOneAndUpdate({ _id: "turn" }, { $inc: { value: 1 } }, { upsert: true, returnDocument: "after" });
    await this.turns.updateOne({ _id: tenantId }, { $max: { lastTurn: counter?.value ?? 0 } }, { upsert: true });
  }

  async listExpiredLeases(now: number, limit: number) {
    const docs = await this.dispatches
      .find({ state: { $in: ["STARTING", "RUNNING"] }, leaseExpiresAt: { $lt: now } })
      .sort({ leaseExpiresAt: 1 })
      .limit(limit)
      .toArray();
    return docs.map(fromDoc);
  }

  async listSlotsOwed(endedBefore: number, limit: number) {
    const docs = await this.dispatches
      .find({ slotHeld: true, endTime: { $ne: null, $lt: endedBefore } })
      .sort({ endTime: 1 })
      .limit(limit)
      .toArray();
    return docs.map(fromDoc);
  }

  async listLeasedTo(executorId: string, limit: number) {
    const docs = await this.dispatches
      .find({ executorId, state: { $in: ["STARTING", "RUNNING"] } })
      .sort({ _id: 1 })
      .limit(limit)
      .toArray();
    return docs.map(fromDoc);
  }

  queueDepth() {
    return this.dispatches.countDocuments({ state: "QUEUED" });
  }

  activeLeases() {
    return this.dispatches.countDocuments({ state: { $in: ["STARTING", "RUNNING"] } });
  }

  async countByStateSince(since: number) {
    const rows = await this.dispatches
      .aggregate<{ _id: DispatchState; n: number }>([{ $match: { createTime: { $gte: since } } }, { $group: { _id: "$state", n: { $sum: 1 } } }])
      .toArray();
    const counts: Partial<Record<DispatchState, number>> = {};
    for (const row of rows) counts[row._id] = row.n;
    return counts;
  }

  async listAgents(): Promise<StoredAgent[]> {
    const docs = await this.agents.find().sort({ _id: 1 }).toArray();
    return docs.map(({ _id, ...rest }) => ({ name: _id, ...rest }));
  }

  async putAgent(name: string, agentJson: string, expectedVersion: number, now: number): Promise<StoredAgent | undefined> {
    if (expectedVersion === 0) {
      try {
        await this.agents.insertOne({ _id: name, agentJson, version: 1, updateTime: now });
        return { name, agentJson, version: 1, updateTime: now };
      } catch (err) {
        if (err instanceof MongoServerError && err.code === DUPLICATE_KEY) return undefined;
        throw err;
      }
    }
    const doc = await this.agents.findOneAndUpdate(
      { _id: name, version: expectedVersion },
      { $set: { agentJson, updateTime: now }, $inc: { version: 1 } },
      { returnDocument: "after" },
    );
    return doc ? { name, agentJson: doc.agentJson, version: doc.version, updateTime: doc.updateTime } : undefined;
  }

  async appendAudit(event: AuditRecord) {
    const { id, ...rest } = event;
    await this.audit.insertOne({ _id: id, ...rest, expireAt: new Date(event.time + AUDIT_RETENTION_MS) });
  }

  async listAudit(tenantId: string | undefined, limit: number, afterId?: string): Promise<AuditRecord[]> {
    const query: Filter<AuditDoc> = {};
    if (tenantId !== undefined) query.tenantId = tenantId;
    if (afterId) query._id = { $lt: afterId };
    const docs = await this.audit.find(query).sort({ _id: -1 }).limit(limit).toArray();
    return docs.map(({ _id, expireAt: _e, ...rest }) => ({ id: _id, ...rest }));
  }

  async recordExecutor(report: ExecutorReport) {
    const { executorId, ...rest } = report;
    await this.executors.replaceOne(
      { _id: executorId },
      { ...rest, expireAt: new Date(report.seenAt + EXECUTOR_RETENTION_MS) },
      { upsert: true },
    );
  }

  async bindExecutorKey(executorId: string, publicKey: string, expiresAt: number, now: number): Promise<KeyBinding> {
    // Matches the id only while the binding may change (same key, or over); otherwise the
    // upsert's insert collides with the existing _id (E11000) and the binding stays.
    try {
      const before = await this.executorKeys.findOneAndUpdate(
        { _id: executorId, $or: [{ publicKey }, { expiresAt: { $lt: now } }] },
        { $set: { publicKey, expiresAt, expireAt: new Date(expiresAt + EXECUTOR_RETENTION_MS) } },
        { upsert: true, returnDocument: "before" },
      );
      return { bound: true, renewed: before?.publicKey === publicKey && before.expiresAt >= now };
    } catch (err) {
      if (!(err instanceof MongoServerError) || err.code !== 11000) throw err;
      const doc = await this.executorKeys.findOne({ _id: executorId });
      return { bound: false, boundUntil: doc?.expiresAt ?? 0 };
    }
  }

  async listExecutors(seenSince: number): Promise<ExecutorReport[]> {
    const docs = await this.executors.find({ seenAt: { $gte: seenSince } }).sort({ _id: 1 }).toArray();
    return docs.map(({ _id, expireAt: _e, ...rest }) => ({ executorId: _id, ...rest }));
  }

  async close() {
    await this.client.close();
  }
}
