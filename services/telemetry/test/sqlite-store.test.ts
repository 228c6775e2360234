import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { DatabaseSync } from "node:sqlite";
import { ulid } from "ulid";
import { afterAll, describe, expect, it } from "vitest";
import { createLogger } from "@outpost/platform";
import type { StoredChunk } from "../src/core/model.ts";
import { RetentionSweeper } from "../src/core/retention.ts";
import { DELETE_PIECE_ROWS, SqliteTelemetryStore } from "../src/store/sqlite-store.ts";
import { telemetryStoreConformance } from "./store-conformance.ts";

function lines(dispatchId: string, count: number): StoredChunk[] {
  return Array.from({ length: count }, (_, i) => ({ dispatchId, seq: i + 1, stream: 1, text: `line ${i + 1}`, timeMs: 1_700_000_000_000 + i }));
}

/**
 * Records what a second connection sees of the store's file each time the event loop gets a
 * turn (a setImmediate that re-arms itself: one observation per loop iteration), keeping each
 * state once. A deletion that never yielded would show only the states before and after it.
 */
function observeBetweenTurns(dataDir: string, look: (db: DatabaseSync) => string) {
  const db = new DatabaseSync(path.join(dataDir, "telemetry.db"), { readOnly: true });
  const seen: string[] = [];
  let stopped = false;
  const record = () => {
    const state = look(db);
    if (seen.at(-1) !== state) seen.push(state);
  };
  const turn = () => {
    if (stopped) return;
    record();
    setImmediate(turn);
  };
  setImmediate(turn);
  return {
    /** Stops observing after one last look; answers the states seen, in order. */
    stop(): string[] {
      stopped = true;
      record();
      db.close();
      return seen;
    },
  };
}

telemetryStoreConformance("sqlite (:memory:)", async () => new SqliteTelemetryStore(":memory:"));

describe("SqliteTelemetryStore on disk", () => {
  const dir = mkdtempSync(path.join(tmpdir(), "outpost-telemetry-store-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("keeps runs and chunks across a reopen", async () => {
    const id = ulid();
    const first = new SqliteTelemetryStore(dir);
    await first.insertChunks(id, "t-a", [{ dispatchId: id, seq: 1, stream: 2, text: "boom", timeMs: 5 }]);
    await first.endRun(id, "t-a", { state: 5, exitCode: 2, failureReason: "exit 2", lastSeq: 1 });
    await first.close();
    const second = new SqliteTelemetryStore(dir);
    expect(await second.getRun(id)).toMatchObject({
      dispatchId: id,
      tenantId: "t-a",
      ackedSeq: 1,
      end: { state: 5, exitCode: 2, failureReason: "exit 2", lastSeq: 1 },
    });
    expect(await second.listChunks(id, 0, 10)).toEqual([{ dispatchId: id, seq: 1, stream: 2, text: "boom", timeMs: 5 }]);
    await second.close();
  });

  it("adds the expire time to a data directory from before retention", async () => {
    const { DatabaseSync } = await import("node:sqlite");
    const old = mkdtempSync(path.join(tmpdir(), "outpost-telemetry-old-"));
    const db = new DatabaseSync(path.join(old, "telemetry.db"));
    db.exec(`CREATE TABLE runs (dispatch_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, acked_seq INTEGER NOT NULL DEFAULT 0,
      ended INTEGER NOT NULL DEFAULT 0, end_state INTEGER NOT NULL DEFAULT 0, exit_code INTEGER, failure_reason TEXT NOT NULL DEFAULT '',
      last_seq INTEGER NOT NULL DEFAULT 0, create_time INTEGER NOT NULL, end_time INTEGER) STRICT`);
    db.prepare("INSERT INTO runs (dispatch_id, tenant_id, create_time) VALUES (?, ?, ?)").run("01OLD", "t-a", 1000);
    db.close();
    const store = new SqliteTelemetryStore(old, { defaultRetentionMs: 5000 });
    expect((await store.getRun("01OLD"))?.expireTimeMs).toBe(6000);
    expect(await store.deleteExpired(6000, 10)).toBe(1);
    await store.close();
    rmSync(old, { recursive: true, force: true });
  });
});

describe("SqliteTelemetryStore retention in pieces", () => {
  const dir = mkdtempSync(path.join(tmpdir(), "outpost-telemetry-retention-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("sweeps a run of 30,000 chunks in pieces of 5,000 rows, yielding between them and deleting the run row last", async () => {
    expect(DELETE_PIECE_ROWS).toBe(5000);
    const dataDir = mkdtempSync(path.join(dir, "big-"));
    const store = new SqliteTelemetryStore(dataDir);
    const big = ulid();
    const small = [ulid(), ulid()];
    const kept = ulid();
    await store.registerRun(big, "t-a", 60_000);
    await store.insertChunks(big, "t-a", lines(big, 30_000));
    for (const id of small) {
      await store.registerRun(id, "t-a", 90_000); // expires after `big`: the sweep reaches it later
      await store.insertChunks(id, "t-a", lines(id, 10));
    }
    await store.registerRun(kept, "t-a"); // the default retention, 7 days
    await store.insertChunks(kept, "t-a", lines(kept, 100));

    const count = (db: DatabaseSync, id: string) => (db.prepare("SELECT count(*) AS n FROM chunks WHERE dispatch_id = ?").get(id) as { n: number }).n;
    const observer = observeBetweenTurns(dataDir, (db) => {
      const run = db.prepare("SELECT 1 AS x FROM runs WHERE dispatch_id = ?").get(big) === undefined ? "gone" : "there";
      return `${count(db, big)} chunks, run ${run}`;
    });
    const sweeper = new RetentionSweeper(store, createLogger("telemetry-test", "silent"), 3_600_000);
    const deleted = await sweeper.sweep(Date.now() + 120_000);
    const seen = observer.stop();

    // (a) everything expired is gone, the unexpired run is untouched.
    expect(deleted).toBe(3);
    for (const id of [big, ...small]) {
      expect(await store.getRun(id)).toBeUndefined();
      expect(await store.listChunks(id, 0, 10)).toEqual([]);
    }
    expect(await store.getRun(kept)).toMatchObject({ tenantId: "t-a", ackedSeq: 100 });
    expect((await store.listChunks(kept, 0, 1000)).map((c) => c.seq)).toEqual(lines(kept, 100).map((c) => c.seq));

    // (b) the event loop had a turn after every piece of 5,000 rows (the first piece runs
    // before the sweep's first await), and the run row went only after its last chunk.
    expect(seen).toEqual([
      "25000 chunks, run there",
      "20000 chunks, run there",
      "15000 chunks, run there",
      "10000 chunks, run there",
      "5000 chunks, run there",
      "0 chunks, run there",
      "0 chunks, run gone",
    ]);
    await store.close();
  });

  it("fills a piece from several runs in expiry order and keeps a run whose retention is extended during the sweep", async () => {
    const dataDir = mkdtempSync(path.join(dir, "small-"));
    const store = new SqliteTelemetryStore(dataDir, { deletePieceRows: 7 });
    const runs = [ulid(), ulid(), ulid()];
    for (const [i, id] of runs.entries()) {
      await store.registerRun(id, "t-a", 60_000 + i * 1000);
      await store.insertChunks(id, "t-a", lines(id, 10));
    }
    const extended = ulid(); // expired when the sweep starts, the last one it would reach
    await store.registerRun(extended, "t-a", 63_000);
    await store.insertChunks(extended, "t-a", lines(extended, 5));

    const observer = observeBetweenTurns(dataDir, (db) => {
      const row = db.prepare("SELECT (SELECT count(*) FROM chunks) AS chunks, (SELECT count(*) FROM runs) AS runs").get() as { chunks: number; runs: number };
      return `${row.chunks}/${row.runs}`;
    });
    // A RegisterRun served between two pieces (the first turn of the event loop) extends it.
    const extending = new Promise((resolve) => setImmediate(() => resolve(store.registerRun(extended, "t-a", 86_400_000))));
    expect(await store.deleteExpired(Date.now() + 120_000, 10)).toBe(3);
    const seen = observer.stop();
    expect(await extending).toMatchObject({ outcome: "ok" });
    // 35 chunks in 4 runs; pieces of 7 rows: 7 of run 1; its last 3, its row and 4 of run 2;
    // run 2's last 6, its row and 1 of run 3; 7 of run 3; its last 2 and its row.
    expect(seen).toEqual(["28/4", "21/3", "14/2", "7/2", "5/1"]);
    expect(await store.getRun(extended)).toMatchObject({ ackedSeq: 5 });
    expect(await store.listChunks(extended, 0, 10)).toHaveLength(5);
    await store.close();
  });

  it("stops a sweep after its current batch of 200 runs when the sweeper stops", async () => {
    const store = new SqliteTelemetryStore(":memory:");
    for (let i = 0; i < 201; i++) await store.registerRun(ulid(), "t-a", 60_000);
    const sweeper = new RetentionSweeper(store, createLogger("telemetry-test", "silent"), 3_600_000);
    const later = Date.now() + 120_000;
    const sweeping = sweeper.sweep(later);
    await sweeper.stop();
    expect(await sweeping).toBe(200);
    expect(await sweeper.sweep(later)).toBe(1); // a sweep after stop() runs to the end again
    await store.close();
  });
});
