/**
 * Worker thread for the concurrent-open test: waits at a shared barrier so every worker opens
 * the same fresh database file at the same moment, as replicas starting together would, then
 * applies a schema with a column migration and reports what went wrong, if anything.
 */
import { parentPort, workerData } from "node:worker_threads";
import { openSqlite } from "../src/sqlite.ts";

const { dataDir, barrier, parties } = workerData as { dataDir: string; barrier: SharedArrayBuffer; parties: number };
const arrived = new Int32Array(barrier);
if (Atomics.add(arrived, 0, 1) + 1 === parties) Atomics.notify(arrived, 0);
else while (Atomics.load(arrived, 0) < parties) Atomics.wait(arrived, 0, Atomics.load(arrived, 0), 1000);

try {
  const db = openSqlite(dataDir, "shared.db", (schemaDb) => {
    schemaDb.exec("CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY)");
    const columns = schemaDb.prepare("PRAGMA table_info(items)").all().map((c) => c.name);
    if (!columns.includes("added")) schemaDb.exec("ALTER TABLE items ADD COLUMN added INTEGER NOT NULL DEFAULT 0");
  });
  db.close();
  parentPort!.postMessage("ok");
} catch (err) {
  parentPort!.postMessage(err instanceof Error ? err.message : String(err));
}
