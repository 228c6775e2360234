/**
 * Persistence of runs and their chunks behind an interface, so the embedded SQLite adapter and
 * a MongoDB adapter (production, SPEC O1) pass one conformance suite. Every write that could
 * race between replicas is conditional: the run's owner is fixed on first insert and compared
 * afterwards; a run's end is written only while it has not ended.
 */
import type { RunEndRecord, RunRecord, StoredChunk } from "../core/model.ts";

/** Result of an operation that names a run's owner. */
export type OwnedResult<T> = ({ outcome: "ok" } & T) | { outcome: "other-tenant"; owner: string };

/** insertChunks' refusal of chunks past the end of a run that ended at `lastSeq`. */
export interface PastEnd {
  outcome: "past-end";
  lastSeq: number;
}

/** Whether `chunks` reach past the end of a run that ended (with a known last seq). */
export function pastEnd(end: RunEndRecord | undefined, chunks: readonly StoredChunk[]): PastEnd | undefined {
  if (!end || end.lastSeq <= 0 || !chunks.some((c) => c.seq > end.lastSeq)) return undefined;
  return { outcome: "past-end", lastSeq: end.lastSeq };
}

export interface TelemetryStore {
  /**
   * Creates the run owned by `tenantId` unless it exists; refuses a run owned by another tenant.
   * `retentionMs` (when given) sets the run's expire time to its creation time + retention,
   * also for a run that ingest created first; otherwise a new run gets the store's default.
   */
  registerRun(dispatchId: string, tenantId: string, retentionMs?: number): Promise<OwnedResult<{ created: boolean; run: RunRecord }>>;

  getRun(dispatchId: string): Promise<RunRecord | undefined>;

  /**
   * Stores chunks of a run (registering it for `tenantId` when unknown). Chunks whose seq is
   * already stored are ignored, so resends are safe. Answers the chunks actually inserted and
   * the run's contiguous high-water mark afterwards. A run that ended with a known last seq
   * (> 0) takes no chunk past it: a batch holding one is refused whole ("past-end", nothing
   * stored), so history never holds output that subscriptions, which stop at the end, omit.
   */
  insertChunks(
    dispatchId: string,
    tenantId: string,
    chunks: StoredChunk[],
  ): Promise<OwnedResult<{ inserted: StoredChunk[]; ackedSeq: number }> | PastEnd>;

  /**
   * Records the run's end once (registering the run when unknown). `recorded` is false when the
   * run had already ended; `run` is the run as stored afterwards (the first end wins).
   */
  endRun(dispatchId: string, tenantId: string, end: RunEndRecord): Promise<OwnedResult<{ recorded: boolean; run: RunRecord }>>;

  /** Chunks with seq > afterSeq (and <= endSeq when given) in seq order, at most `limit`. */
  listChunks(dispatchId: string, afterSeq: number, limit: number, endSeq?: number): Promise<StoredChunk[]>;

  /**
   * Deletes up to `limit` runs whose expire time is at or before `nowMs`, with their chunks;
   * answers how many runs it deleted (call again while it answers `limit`). `limit` bounds runs,
   * not chunks: an adapter whose calls block (SQLite) splits the work into bounded pieces and
   * yields to the event loop between them, so other calls are served meanwhile. A run whose
   * expire time was extended before it was reached is kept.
   */
  deleteExpired(nowMs: number, limit: number): Promise<number>;

  close(): Promise<void>;
}
