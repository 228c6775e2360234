/**
 * Measures how long the embedded store's retention sweep holds the event loop (not a test:
 * timings depend on the machine; docs/telemetry.md, "Retention", quotes its output).
 *
 *   node --disable-warning=ExperimentalWarning services/telemetry/test/retention-stall.ts [--runs 20] [--lines 50000] [--piece-rows 5000]
 *
 * Fills a store on disk with `runs` expired runs of `lines` chunks each (plus one run that is
 * not expired), then sweeps with the RetentionSweeper while a 1 ms timer ticks, and prints the
 * sweep's wall time and the longest gap between two ticks: the longest time the event loop was
 * held. `--piece-rows 0` deletes each batch in one transaction, as
 * the store did before it worked in pieces.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { ulid } from "ulid";
import { createLogger } from "@outpost/platform";
import type { StoredChunk } from "../src/core/model.ts";
import { RetentionSweeper } from "../src/core/retention.ts";
import { SqliteTelemetryStore } from "../src/store/sqlite-store.ts";

const { values } = parseArgs({
  options: {
    runs: { type: "string", default: "20" },
    lines: { type: "string", default: "50000" },
    "piece-rows": { type: "string", default: "5000" },
  },
});
const runs = Number(values.runs);
const lines = Number(values.lines);
const pieceRows = Number(values["piece-rows"]);

const dir = mkdtempSync(path.join(tmpdir(), "outpost-retention-stall-"));
try {
  const store = new SqliteTelemetryStore(dir, { deletePieceRows: pieceRows > 0 ? pieceRows : Number.MAX_SAFE_INTEGER });
  const fill = async (id: string) => {
    for (let from = 1; from <= lines; from += 10_000) {
      const batch: StoredChunk[] = [];
      for (let seq = from; seq < from + 10_000 && seq <= lines; seq++) {
        batch.push({ dispatchId: id, seq, stream: 1, text: `line ${seq} of a run's output, about sixty bytes long`, timeMs: Date.now() });
      }
      await store.insertChunks(id, "t-a", batch);
    }
  };
  for (let i = 0; i < runs; i++) {
    const id = ulid();
    await store.registerRun(id, "t-a", 60_000);
    await fill(id);
  }
  const kept = ulid();
  await store.registerRun(kept, "t-a");
  await store.insertChunks(kept, "t-a", [{ dispatchId: kept, seq: 1, stream: 1, text: "kept", timeMs: Date.now() }]);

  let last = performance.now();
  let longestGap = 0;
  const ticker = setInterval(() => {
    const now = performance.now();
    longestGap = Math.max(longestGap, now - last);
    last = now;
  }, 1);
  await new Promise((resolve) => setTimeout(resolve, 20));
  last = performance.now();
  const start = performance.now();
  const deleted = await new RetentionSweeper(store, createLogger("retention-stall", "silent"), 3_600_000).sweep(Date.now() + 120_000);
  const wall = performance.now() - start;
  longestGap = Math.max(longestGap, performance.now() - last);
  clearInterval(ticker);
  const left = await store.listChunks(kept, 0, 10);
  await store.close();
  console.log(
    JSON.stringify({
      runs,
      lines,
      pieceRows: pieceRows > 0 ? pieceRows : "one transaction per batch",
      deletedRuns: deleted,
      keptRunChunks: left.length,
      sweepMs: Math.round(wall),
      longestTickGapMs: Math.round(longestGap),
    }),
  );
} finally {
  rmSync(dir, { recursive: true, force: true });
}
