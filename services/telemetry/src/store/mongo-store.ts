/**
 * The telemetry store on MongoDB (official driver), for several telemetry replicas sharing one
 * store in production (OUTPOST_MONGO_URL). Same contract as the SQLite adapter, without
 * multi-document transactions (a standalone server has none): every check that must be atomic
 * is a single-document conditional update or a unique index.
 *
 * Collections (names prefixed so the services can share one database):
 *   telemetry_runs    one document per run, _id = dispatch id:
 *                     { tenantId, ackedSeq, end: {...} | null, createTime, endTime, expireAt }
 *   telemetry_chunks  one document per chunk: { dispatchId, seq, stream, text, timeMs, expireAt },
 *                     unique index (dispatchId, seq).
 *
 * - Ownership: the run is created by an upsert whose fields are all $setOnInsert, so the first
 *   writer (RegisterRun or ingest, on any replica) fixes the tenant; every call then compares
 *   the stored tenant with its own and answers "other-tenant" on a mismatch.
 * - Idempotent ingest: insertMany(ordered: false) against the unique (dispatchId, seq) index;
 *   duplicate-key write errors (11000) are resends and are dropped, any other error is thrown.
 *   The chunks actually inserted are those without a write error; a seq repeated within one
 *   batch is inserted once (the first), as in SQLite.
 * - Contiguous acked seq under concurrent ingest (two replicas, no transaction): after its
 *   insert, a call reads the run's ackedSeq `a` (every chunk 1..a is stored) and walks the
 *   stored seqs > a in order, stopping at the first gap; the end of that walk is a lower bound
 *   of the true contiguous prefix (chunks are only ever added), so writing it with $max (the
 *   store only moves forward, never back) can never overshoot. Of several concurrent inserts,
 *   the one that completes last walks after every insert is visible and so computes the full
 *   prefix: the stored ackedSeq ends correct without any lock. The walk runs on every ingest
 *   call with chunks, also when all were resends, so a process that died between its insert
 *   and the $max is healed by the executor's resend. A walk reads only the newly contiguous
 *   seqs plus one (the cursor is closed at the first gap).
 * - End once: findOneAndUpdate with { end: null } in the filter; the first end wins, later
 *   ones see no match and answer the stored end.
 * - Retention (SPEC L3): `expireAt` (a Date) = createTime + retention is stamped on the run and
 *   on every chunk; a TTL index { expireAt: 1 } (expireAfterSeconds 0) on both collections lets
 *   the server's TTL monitor delete them (it runs about once a minute), so the service runs no
 *   RetentionSweeper with this store. A RegisterRun that changes the retention after ingest
 *   created the run re-stamps the run first, then its chunks; an ingest stamps its chunks with
 *   the expiry it read, then (after its insert) reads the run again and re-stamps its chunks if
 *   the expiry changed in between, so no chunk keeps a stale expiry whichever order the two
 *   calls interleave in. deleteExpired is kept (the interface and conformance suite use it, and
 *   an operator may call it) and deletes the run first, then its chunks: a crash in between
 *   leaves chunks that still carry their expireAt, which the TTL monitor removes.
 */
import {
  MongoBulkWriteError,
  MongoClient,
  MongoServerError,
  type Collection,
  type Db,
  type Filter,
  type UpdateFilter,
} from "mongodb";
import { DEFAULT_RETENTION_MS, type RunEndRecord, type RunRecord, type StoredChunk } from "../core/model.ts";
import { pastEnd, type OwnedResult, type PastEnd, type TelemetryStore } from "./store.ts";

interface EndDoc {
  state: number;
  exitCode: number | null;
  failureReason: string;
  lastSeq: number;
}

export interface RunDoc {
  _id: string;
  tenantId: string;
  ackedSeq: number;
  end: EndDoc | null;
  /** Epoch ms of the first write (retention counts from here). */
  createTime: number;
  endTime: number | null;
  expireAt: Date;
}

export interface ChunkDoc {
  dispatchId: string;
  seq: number;
  stream: number;
  text: string;
  timeMs: number;
  expireAt: Date;
}

const DUPLICATE_KEY = 11000;
/** Bounded retries of the run upsert when a parallel first insert collides on _id. */
const UPSERT_ATTEMPTS = 3;
/** Seqs fetched per round trip while walking the contiguous prefix. */
const WALK_BATCH = 1000;

export interface MongoTelemetryStoreOptions {
  /** Retention of runs registered without one (ingest before RegisterRun, or none given). */
  defaultRetentionMs?: number;
  /** Database name; defaults to the URL's database or "outpost". */
  dbName?: string;
  /** How long connect waits for a server (default 5 s), so a wrong URL fails start-up fast. */
  serverSelectionTimeoutMS?: number;
}

// ---- Pure helpers (unit-tested without a server) ----------------------------------------

export function isDuplicateKey(err: unknown): boolean {
  return err instanceof MongoServerError && err.code === DUPLICATE_KEY;
}

/**
 * For an insertMany(ordered: false) failure: the batch indexes that were refused as duplicates,
 * when duplicates are the only failure (everything else was inserted). Undefined for any other
 * error (another write error, a write-concern error, a network error): the caller rethrows.
 */
export function duplicateIndexes(err: unknown): Set<number> | undefined {
  if (!(err instanceof MongoBulkWriteError)) return undefined;
  const errors = Array.isArray(err.writeErrors) ? err.writeErrors : err.writeErrors ? [err.writeErrors] : [];
  // With write errors present the driver reports a write-concern failure only in the result.
  if (errors.length === 0 || err.err !== undefined || hasWriteConcernError(err)) return undefined;
  const indexes = new Set<number>();
  for (const e of errors) {
    if (e.code !== DUPLICATE_KEY) return undefined;
    indexes.add(e.index);
  }
  return indexes;
}

function hasWriteConcernError(err: MongoBulkWriteError): boolean {
  const result = err.result as MongoBulkWriteError["result"] | undefined;
  return typeof result?.getWriteConcernError === "function" && result.getWriteConcernError() !== undefined;
}

/** When a run (and its chunks) expire: creation + retention. */
export function expiryOf(createTimeMs: number, retentionMs: number): Date {
  return new Date(createTimeMs + retentionMs);
}

/** Chunks of one run with afterSeq < seq (<= endSeq when given). */
export function chunkRangeFilter(dispatchId: string, afterSeq: number, endSeq?: number): Filter<ChunkDoc> {
  return { dispatchId, seq: endSeq === undefined ? { $gt: afterSeq } : { $gt: afterSeq, $lte: endSeq } };
}

/** The upsert that creates a run owned by `tenantId` unless it exists (every field $setOnInsert). */
export function runUpsert(tenantId: string, nowMs: number, defaultRetentionMs: number): UpdateFilter<RunDoc> {
  return {
    $setOnInsert: { tenantId, ackedSeq: 0, end: null, createTime: nowMs, endTime: null, expireAt: expiryOf(nowMs, defaultRetentionMs) },
  };
}

/** Filter + update that record a run's end only while it has none (first end wins). */
export function endRunUpdate(dispatchId: string, tenantId: string, end: RunEndRecord, nowMs: number): { filter: Filter<RunDoc>; update: UpdateFilter<RunDoc> } {
  const doc: EndDoc = { state: end.state, exitCode: end.exitCode ?? null, failureReason: end.failureReason, lastSeq: end.lastSeq };
  // { end: null } matches null and absent alike.
  return { filter: { _id: dispatchId, tenantId, end: null }, update: { $set: { end: doc, endTime: nowMs } } };
}

/** The update that moves ackedSeq forward to `seq` and never back. */
export function advanceAckedUpdate(seq: number): UpdateFilter<RunDoc> {
  return { $max: { ackedSeq: seq } };
}

/**
 * The highest seq reached from `acked` through consecutive seqs of `sortedSeqs` (ascending,
 * all > acked, no repeats): stops reading at the first gap.
 */
export async function contiguousEnd(acked: number, sortedSeqs: AsyncIterable<number> | Iterable<number>): Promise<number> {
  let end = acked;
  for await (const seq of sortedSeqs) {
    if (seq !== end + 1) break;
    end = seq;
  }
  return end;
}

export function runOf(doc: RunDoc): RunRecord {
  return {
    dispatchId: doc._id,
    tenantId: doc.tenantId,
    ackedSeq: doc.ackedSeq,
    end: doc.end
      ? { state: doc.end.state, exitCode: doc.end.exitCode ?? undefined, failureReason: doc.end.failureReason, lastSeq: doc.end.lastSeq }
      : undefined,
    expireTimeMs: doc.expireAt.getTime(),
  };
}

export function chunkDoc(dispatchId: string, chunk: StoredChunk, expireAt: Date): ChunkDoc {
  return { dispatchId, seq: chunk.seq, stream: chunk.stream, text: chunk.text, timeMs: chunk.timeMs, expireAt };
}

function chunkOf(doc: ChunkDoc): StoredChunk {
  return { dispatchId: doc.dispatchId, seq: doc.seq, stream: doc.stream, text: doc.text, timeMs: doc.timeMs };
}

// ---- The adapter ------------------------------------------------------------------------

export class MongoTelemetryStore implements TelemetryStore {
  private readonly client: MongoClient;
  private readonly runs: Collection<RunDoc>;
  private readonly chunks: Collection<ChunkDoc>;
  private readonly defaultRetentionMs: number;

  private constructor(client: MongoClient, db: Db, defaultRetentionMs: number) {
    this.client = client;
    this.runs = db.collection<RunDoc>("telemetry_runs");
    this.chunks = db.collection<ChunkDoc>("telemetry_chunks");
    this.defaultRetentionMs = defaultRetentionMs;
  }

  /** Connects and creates the indexes (idempotent); closes the client again when that fails. */
  static async connect(url: string, options: MongoTelemetryStoreOptions = {}): Promise<MongoTelemetryStore> {
    const client = new MongoClient(url, { serverSelectionTimeoutMS: options.serverSelectionTimeoutMS ?? 5000 });
    try {
      await client.connect();
      const store = new MongoTelemetryStore(client, client.db(options.dbName), options.defaultRetentionMs ?? DEFAULT_RETENTION_MS);
      await store.createIndexes();
      return store;
    } catch (err) {
      await client.close();
      throw err;
    }
  }

  private async createIndexes(): Promise<void> {
    await Promise.all([
      // Idempotent ingest, and the index every read by seq range and the acked walk use.
      this.chunks.createIndex({ dispatchId: 1, seq: 1 }, { unique: true, name: "run_seq" }),
      this.chunks.createIndex({ expireAt: 1 }, { expireAfterSeconds: 0, name: "retention" }),
      this.runs.createIndex({ expireAt: 1 }, { expireAfterSeconds: 0, name: "retention" }),
    ]);
  }

  /** Creates the run for `tenantId` unless it exists; answers the run as stored and whether this call created it. */
  private async ensureRun(dispatchId: string, tenantId: string): Promise<{ created: boolean; doc: RunDoc }> {
    for (let attempt = 1; ; attempt++) {
      try {
        const result = await this.runs.findOneAndUpdate({ _id: dispatchId }, runUpsert(tenantId, Date.now(), this.defaultRetentionMs), {
          upsert: true,
          returnDocument: "after",
          includeResultMetadata: true,
        });
        if (!result.value) throw new Error(`run ${dispatchId} upsert returned no document`);
        return { created: result.lastErrorObject?.updatedExisting === false, doc: result.value };
      } catch (err) {
        // Two first upserts of one _id can collide; the server retries most such cases itself,
        // the rest land here and the next attempt finds the winner's document.
        if (!isDuplicateKey(err) || attempt >= UPSERT_ATTEMPTS) throw err;
      }
    }
  }

  async registerRun(dispatchId: string, tenantId: string, retentionMs?: number): Promise<OwnedResult<{ created: boolean; run: RunRecord }>> {
    const { created, doc } = await this.ensureRun(dispatchId, tenantId);
    if (doc.tenantId !== tenantId) return { outcome: "other-tenant", owner: doc.tenantId };
    if (retentionMs === undefined) return { outcome: "ok", created, run: runOf(doc) };
    const expireAt = expiryOf(doc.createTime, retentionMs);
    const updated = await this.runs.findOneAndUpdate({ _id: dispatchId, tenantId }, { $set: { expireAt } }, { returnDocument: "after" });
    // Run first, then chunks (see the header: an ingest racing this re-stamps its own chunks).
    await this.restampChunks(dispatchId, expireAt);
    // A run deleted meanwhile (expired) is answered as it was before this update.
    return { outcome: "ok", created, run: runOf(updated ?? { ...doc, expireAt }) };
  }

  private async restampChunks(dispatchId: string, expireAt: Date): Promise<void> {
    await this.chunks.updateMany({ dispatchId, expireAt: { $ne: expireAt } }, { $set: { expireAt } });
  }

  async getRun(dispatchId: string): Promise<RunRecord | undefined> {
    const doc = await this.runs.findOne({ _id: dispatchId });
    return doc ? runOf(doc) : undefined;
  }

  async insertChunks(
    dispatchId: string,
    tenantId: string,
    chunks: StoredChunk[],
  ): Promise<OwnedResult<{ inserted: StoredChunk[]; ackedSeq: number }> | PastEnd> {
    const { doc } = await this.ensureRun(dispatchId, tenantId);
    if (doc.tenantId !== tenantId) return { outcome: "other-tenant", owner: doc.tenantId };
    // Checked on the run as read, not atomically with the insert (no transactions): an end
    // recorded meanwhile lets this batch in, as before the check. The executor reports the end
    // only after its output was acknowledged, so only a stale writer can race it.
    const tooLate = pastEnd(runOf(doc).end, chunks);
    if (tooLate) return tooLate;
    if (chunks.length === 0) return { outcome: "ok", inserted: [], ackedSeq: doc.ackedSeq };

    let refused = new Set<number>();
    try {
      await this.chunks.insertMany(
        chunks.map((c) => chunkDoc(dispatchId, c, doc.expireAt)),
        { ordered: false },
      );
    } catch (err) {
      const duplicates = duplicateIndexes(err);
      if (!duplicates) throw err;
      refused = duplicates;
    }
    const inserted = chunks.filter((_, i) => !refused.has(i)).map((c) => ({ ...c, dispatchId }));

    // Read the run again after the insert: its acked seq (start of the walk) and its expiry.
    const current = await this.runs.findOne({ _id: dispatchId });
    if (!current) return { outcome: "ok", inserted, ackedSeq: doc.ackedSeq }; // expired and deleted meanwhile
    if (inserted.length > 0 && current.expireAt.getTime() !== doc.expireAt.getTime()) {
      await this.restampChunks(dispatchId, current.expireAt);
    }
    const cursor = this.chunks
      .find(chunkRangeFilter(dispatchId, current.ackedSeq), { projection: { _id: 0, seq: 1 } })
      .sort({ seq: 1 })
      .batchSize(WALK_BATCH);
    let end: number;
    try {
      end = await contiguousEnd(current.ackedSeq, (async function* () {
        for await (const row of cursor) yield row.seq;
      })());
    } finally {
      await cursor.close();
    }
    if (end <= current.ackedSeq) return { outcome: "ok", inserted, ackedSeq: current.ackedSeq };
    const after = await this.runs.findOneAndUpdate({ _id: dispatchId }, advanceAckedUpdate(end), { returnDocument: "after" });
    return { outcome: "ok", inserted, ackedSeq: after?.ackedSeq ?? end };
  }

  async endRun(dispatchId: string, tenantId: string, end: RunEndRecord): Promise<OwnedResult<{ recorded: boolean; run: RunRecord }>> {
    const { doc } = await this.ensureRun(dispatchId, tenantId);
    if (doc.tenantId !== tenantId) return { outcome: "other-tenant", owner: doc.tenantId };
    const { filter, update } = endRunUpdate(dispatchId, tenantId, end, Date.now());
    const ended = await this.runs.findOneAndUpdate(filter, update, { returnDocument: "after" });
    if (ended) return { outcome: "ok", recorded: true, run: runOf(ended) };
    const current = await this.runs.findOne({ _id: dispatchId });
    return { outcome: "ok", recorded: false, run: runOf(current ?? doc) };
  }

  async listChunks(dispatchId: string, afterSeq: number, limit: number, endSeq?: number): Promise<StoredChunk[]> {
    if (limit <= 0) return []; // limit(0) means "no limit" to MongoDB
    const docs = await this.chunks
      .find(chunkRangeFilter(dispatchId, afterSeq, endSeq), { projection: { _id: 0 } })
      .sort({ seq: 1 })
      .limit(limit)
      .toArray();
    return docs.map(chunkOf);
  }

  /** Not scheduled with this store (the TTL monitor deletes expired documents); see the header. */
  async deleteExpired(nowMs: number, limit: number): Promise<number> {
    if (limit <= 0) return 0;
    const now = new Date(nowMs);
    const expired = await this.runs.find({ expireAt: { $lte: now } }, { projection: { _id: 1 } }).sort({ expireAt: 1 }).limit(limit).toArray();
    let deleted = 0;
    for (const { _id } of expired) {
      // Conditional: a run whose retention was extended meanwhile stays, with its chunks.
      const result = await this.runs.deleteOne({ _id, expireAt: { $lte: now } });
      if (result.deletedCount === 0) continue;
      deleted++;
      await this.chunks.deleteMany({ dispatchId: _id });
    }
    return deleted;
  }

  async close(): Promise<void> {
    await this.client.close();
  }
}
