/**
 * The embedded store: SQLite through node:sqlite (one file per service, ":memory:" in tests).
 * Calls are synchronous underneath (each blocks the event loop while it runs); the interface is
 * async so MongoDB can implement it too. The one call whose work has no natural bound,
 * deleteExpired (a run may hold millions of chunks), therefore works in pieces of at most
 * `deletePieceRows` chunk rows, each its own transaction, and yields to the event loop between
 * pieces so ingest and subscriptions are served meanwhile (docs/telemetry.md, "Retention").
 */
import type { DatabaseSync, StatementSync } from "node:sqlite";
import { inTransaction, openSqlite } from "@outpost/platform";
import { DEFAULT_RETENTION_MS, type RunEndRecord, type RunRecord, type StoredChunk } from "../core/model.ts";
import { pastEnd, type OwnedResult, type PastEnd, type TelemetryStore } from "./store.ts";

const SCHEMA = `
CREATE TABLE IF NOT EXISTS runs (
  dispatch_id    TEXT PRIMARY KEY,
  tenant_id      TEXT NOT NULL,
  acked_seq      INTEGER NOT NULL DEFAULT 0,
  ended          INTEGER NOT NULL DEFAULT 0,
  end_state      INTEGER NOT NULL DEFAULT 0,
  exit_code      INTEGER,
  failure_reason TEXT NOT NULL DEFAULT '',
  last_seq       INTEGER NOT NULL DEFAULT 0,
  create_time    INTEGER NOT NULL,
  end_time       INTEGER,
  expire_time    INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS chunks (
  dispatch_id TEXT NOT NULL,
  seq         INTEGER NOT NULL,
  stream      INTEGER NOT NULL,
  text        TEXT NOT NULL,
  time_ms     INTEGER NOT NULL,
  PRIMARY KEY (dispatch_id, seq)
) STRICT, WITHOUT ROWID;
`;

interface RunRow {
  dispatch_id: string;
  tenant_id: string;
  acked_seq: number;
  ended: number;
  end_state: number;
  exit_code: number | null;
  failure_reason: string;
  last_seq: number;
  expire_time: number;
}

interface ChunkRow {
  dispatch_id: string;
  seq: number;
  stream: number;
  text: string;
  time_ms: number;
}

function runOf(row: RunRow): RunRecord {
  return {
    dispatchId: row.dispatch_id,
    tenantId: row.tenant_id,
    ackedSeq: row.acked_seq,
    end:
      row.ended === 1
        ? {
            state: row.end_state,
            exitCode: row.exit_code ?? undefined,
            failureReason: row.failure_reason,
            lastSeq: row.last_seq,
          }
        : undefined,
    expireTimeMs: row.expire_time,
  };
}

function chunkOf(row: ChunkRow): StoredChunk {
  return { dispatchId: row.dispatch_id, seq: row.seq, stream: row.stream, text: row.text, timeMs: row.time_ms };
}

export interface SqliteTelemetryStoreOptions {
  /** Retention of runs registered without one (ingest before RegisterRun, or none given). */
  defaultRetentionMs?: number;
  /**
   * Most chunk rows deleteExpired removes in one transaction before it yields to the event
   * loop (default 5,000: about 5-15 ms on a 2-core VM).
   */
  deletePieceRows?: number;
}

/** Chunk rows per deleteExpired piece unless the options say otherwise. */
export const DELETE_PIECE_ROWS = 5000;

const nextMacrotask = () => new Promise<void>((resolve) => setImmediate(resolve));

export class SqliteTelemetryStore implements TelemetryStore {
  readonly #db: DatabaseSync;
  readonly #defaultRetentionMs: number;
  readonly #deletePieceRows: number;
  readonly #setRetention: StatementSync;
  readonly #listChunksUpTo: StatementSync;
  readonly #expired: StatementSync;
  readonly #isExpired: StatementSync;
  readonly #deleteExpiredRun: StatementSync;
  readonly #pieceStart: StatementSync;
  readonly #deleteChunksFrom: StatementSync;
  readonly #deleteChunks: StatementSync;
  readonly #insertRun: StatementSync;
  readonly #selectRun: StatementSync;
  readonly #insertChunk: StatementSync;
  readonly #seqsAfter: StatementSync;
  readonly #setAcked: StatementSync;
  readonly #endRun: StatementSync;
  readonly #listChunks: StatementSync;

  constructor(dataDir: string, options: SqliteTelemetryStoreOptions = {}) {
    this.#defaultRetentionMs = options.defaultRetentionMs ?? DEFAULT_RETENTION_MS;
    this.#deletePieceRows = Math.max(1, Math.floor(options.deletePieceRows ?? DELETE_PIECE_ROWS));
    this.#db = openSqlite(dataDir, "telemetry.db", (db) => {
      db.exec(SCHEMA);
      this.#migrate(db);
    });
    this.#insertRun = this.#db.prepare(
      "INSERT INTO runs (dispatch_id, tenant_id, create_time, expire_time) VALUES (?, ?, ?, ?) ON CONFLICT (dispatch_id) DO NOTHING",
    );
    this.#setRetention = this.#db.prepare("UPDATE runs SET expire_time = create_time + ? WHERE dispatch_id = ?");
    this.#listChunksUpTo = this.#db.prepare("SELECT * FROM chunks WHERE dispatch_id = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?");
    this.#expired = this.#db.prepare("SELECT dispatch_id FROM runs WHERE expire_time <= ? ORDER BY expire_time LIMIT ?");
    this.#isExpired = this.#db.prepare("SELECT 1 AS expired FROM runs WHERE dispatch_id = ? AND expire_time <= ?");
    this.#deleteExpiredRun = this.#db.prepare("DELETE FROM runs WHERE dispatch_id = ? AND expire_time <= ?");
    // A piece is the run's highest `n` seqs: the lowest of them found by the primary key
    // (dispatch_id, seq), then one range delete on it. What stays is a prefix of the output.
    this.#pieceStart = this.#db.prepare("SELECT seq FROM chunks WHERE dispatch_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?");
    this.#deleteChunksFrom = this.#db.prepare("DELETE FROM chunks WHERE dispatch_id = ? AND seq >= ?");
    this.#deleteChunks = this.#db.prepare("DELETE FROM chunks WHERE dispatch_id = ?");
    this.#selectRun = this.#db.prepare("SELECT * FROM runs WHERE dispatch_id = ?");
    this.#insertChunk = this.#db.prepare(
      "INSERT INTO chunks (dispatch_id, seq, stream, text, time_ms) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    );
    this.#seqsAfter = this.#db.prepare("SELECT seq FROM chunks WHERE dispatch_id = ? AND seq > ? ORDER BY seq");
    this.#setAcked = this.#db.prepare("UPDATE runs SET acked_seq = ? WHERE dispatch_id = ? AND acked_seq < ?");
    this.#endRun = this.#db.prepare(
      `UPDATE runs SET ended = 1, end_state = ?, exit_code = ?, failure_reason = ?, last_seq = ?, end_time = ?
       WHERE dispatch_id = ? AND ended = 0`,
    );
    this.#listChunks = this.#db.prepare("SELECT * FROM chunks WHERE dispatch_id = ? AND seq > ? ORDER BY seq LIMIT ?");
  }

  /** Data directories from before retention (issue 6) get the column, filled with the default. Runs in openSqlite's transaction. */
  #migrate(db: DatabaseSync): void {
    const columns = db.prepare("PRAGMA table_info(runs)").all() as Array<{ name: string }>;
    if (!columns.some((c) => c.name === "expire_time")) {
      db.exec("ALTER TABLE runs ADD COLUMN expire_time INTEGER NOT NULL DEFAULT 0");
      db.prepare("UPDATE runs SET expire_time = create_time + ?").run(this.#defaultRetentionMs);
    }
    db.exec("CREATE INDEX IF NOT EXISTS runs_by_expire_time ON runs (expire_time)");
  }

  /** Inserts the run if missing and returns it; the caller holds the write transaction. */
  #ensureRun(dispatchId: string, tenantId: string): { created: boolean; run: RunRecord } {
    const now = Date.now();
    const created = Number(this.#insertRun.run(dispatchId, tenantId, now, now + this.#defaultRetentionMs).changes) === 1;
    return { created, run: runOf(this.#selectRun.get(dispatchId) as unknown as RunRow) };
  }

  async registerRun(dispatchId: string, tenantId: string, retentionMs?: number): Promise<OwnedResult<{ created: boolean; run: RunRecord }>> {
    return inTransaction(this.#db, () => {
      const { created, run } = this.#ensureRun(dispatchId, tenantId);
      if (run.tenantId !== tenantId) return { outcome: "other-tenant", owner: run.tenantId };
      if (retentionMs === undefined) return { outcome: "ok", created, run };
      this.#setRetention.run(retentionMs, dispatchId);
      return { outcome: "ok", created, run: runOf(this.#selectRun.get(dispatchId) as unknown as RunRow) };
    });
  }

  async getRun(dispatchId: string): Promise<RunRecord | undefined> {
    const row = this.#selectRun.get(dispatchId) as unknown as RunRow | undefined;
    return row ? runOf(row) : undefined;
  }

  async insertChunks(
    dispatchId: string,
    tenantId: string,
    chunks: StoredChunk[],
  ): Promise<OwnedResult<{ inserted: StoredChunk[]; ackedSeq: number }> | PastEnd> {
    return inTransaction(this.#db, () => {
      const { run } = this.#ensureRun(dispatchId, tenantId);
      if (run.tenantId !== tenantId) return { outcome: "other-tenant", owner: run.tenantId };
      const refused = pastEnd(run.end, chunks); // in the transaction: an end cannot slip in between
      if (refused) return refused;
      const inserted: StoredChunk[] = [];
      for (const chunk of chunks) {
        const changes = this.#insertChunk.run(dispatchId, chunk.seq, chunk.stream, chunk.text, chunk.timeMs).changes;
        if (Number(changes) === 1) inserted.push({ ...chunk, dispatchId });
      }
      // Advance the contiguous high-water mark past every seq that now follows it.
      let acked = run.ackedSeq;
      if (inserted.length > 0) {
        for (const row of this.#seqsAfter.iterate(dispatchId, acked) as Iterable<{ seq: number }>) {
          if (row.seq !== acked + 1) break;
          acked = row.seq;
        }
        if (acked > run.ackedSeq) this.#setAcked.run(acked, dispatchId, acked);
      }
      return { outcome: "ok", inserted, ackedSeq: acked };
    });
  }

  async endRun(dispatchId: string, tenantId: string, end: RunEndRecord): Promise<OwnedResult<{ recorded: boolean; run: RunRecord }>> {
    return inTransaction(this.#db, () => {
      const { run } = this.#ensureRun(dispatchId, tenantId);
      if (run.tenantId !== tenantId) return { outcome: "other-tenant", owner: run.tenantId };
      const changes = this.#endRun.run(
        end.state,
        end.exitCode ?? null,
        end.failureReason,
        end.lastSeq,
        Date.now(),
        dispatchId,
      ).changes;
      return { outcome: "ok", recorded: Number(changes) === 1, run: runOf(this.#selectRun.get(dispatchId) as unknown as RunRow) };
    });
  }

  async listChunks(dispatchId: string, afterSeq: number, limit: number, endSeq?: number): Promise<StoredChunk[]> {
    const rows = endSeq === undefined ? this.#listChunks.all(dispatchId, afterSeq, limit) : this.#listChunksUpTo.all(dispatchId, afterSeq, endSeq, limit);
    return (rows as unknown as ChunkRow[]).map(chunkOf);
  }

  /**
   * In pieces of at most `deletePieceRows` chunk rows, one transaction each, with a macrotask
   * between pieces: a piece takes chunks from the batch's runs in turn (several small runs fit
   * in one piece, a large run spans many). A run's row is deleted in the transaction that
   * deletes its last chunks, never before, so a crash midway leaves a run that the next sweep
   * finds again (not orphan chunks); chunks ingested into it meanwhile go with it. Each piece
   * checks the run is still expired: a run whose retention was extended meanwhile stays (with
   * whatever prefix of its output the earlier pieces left).
   */
  async deleteExpired(nowMs: number, limit: number): Promise<number> {
    if (limit <= 0) return 0;
    const ids = (this.#expired.all(nowMs, limit) as unknown as Array<{ dispatch_id: string }>).map((r) => r.dispatch_id);
    let next = 0;
    let deleted = 0;
    for (let piece = 0; next < ids.length; piece++) {
      if (piece > 0) await nextMacrotask();
      inTransaction(this.#db, () => {
        let budget = this.#deletePieceRows;
        while (next < ids.length && budget > 0) {
          const id = ids[next]!;
          if (this.#isExpired.get(id, nowMs) === undefined) {
            next++; // deleted meanwhile, or its retention was extended
            continue;
          }
          const start = this.#pieceStart.get(id, budget - 1) as { seq: number } | undefined;
          if (start !== undefined) {
            // At least `budget` chunks left: delete exactly the highest `budget`; the run's
            // remaining chunks (if any) and row go in the next piece.
            budget -= Number(this.#deleteChunksFrom.run(id, start.seq).changes);
            continue;
          }
          budget -= Number(this.#deleteChunks.run(id).changes);
          deleted += Number(this.#deleteExpiredRun.run(id, nowMs).changes);
          next++;
        }
      });
    }
    return deleted;
  }

  async close(): Promise<void> {
    if (this.#db.isOpen) this.#db.close();
  }
}
