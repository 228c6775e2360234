/**
 * The embedded store's database: one SQLite file per service under the data directory, or
 * ":memory:" in tests, through Node's built-in node:sqlite (no native addon to build).
 * WAL lets readers proceed while a writer commits; the busy timeout lets two processes that
 * share a file (replicas on one machine) wait for each other instead of failing.
 */
import { mkdirSync } from "node:fs";
import path from "node:path";
import { DatabaseSync } from "node:sqlite";

/**
 * Opens (creating if needed) the service's database and brings its schema up to date.
 * `prepareSchema` runs inside one write transaction, so replicas starting together on a
 * fresh file apply it one after the other: the second sees the first one's tables and
 * columns instead of racing it (a duplicate-column ALTER, or a "database is locked").
 */
export function openSqlite(dataDir: string, fileName: string, prepareSchema?: (db: DatabaseSync) => void): DatabaseSync {
  let db: DatabaseSync;
  if (dataDir === ":memory:") db = configure(new DatabaseSync(":memory:"));
  else {
    mkdirSync(dataDir, { recursive: true });
    db = configure(new DatabaseSync(path.join(dataDir, fileName)));
  }
  if (prepareSchema) inTransaction(db, () => prepareSchema(db));
  return db;
}

const LOCKED_RETRIES = 50;

/** How long a statement waits for another process's lock on the file before SQLITE_BUSY. */
export const SQLITE_BUSY_TIMEOUT_MS = 5000;

function configure(db: DatabaseSync): DatabaseSync {
  // The busy timeout comes first so the statements after it wait for a lock instead of failing.
  db.exec(`PRAGMA busy_timeout = ${SQLITE_BUSY_TIMEOUT_MS}`);
  // Switching a fresh file to WAL upgrades a shared lock to an exclusive one; when two
  // processes do it at once SQLite refuses one at once (a waiting upgrade could deadlock) and
  // the busy timeout does not apply, so that step is retried briefly.
  for (let attempt = 1; ; attempt++) {
    try {
      db.exec("PRAGMA journal_mode = WAL");
      break;
    } catch (err) {
      if (attempt >= LOCKED_RETRIES || !isLocked(err)) throw err;
      sleepSync(5 + Math.random() * 20);
    }
  }
  db.exec("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;");
  return db;
}

function isLocked(err: unknown): boolean {
  return err instanceof Error && /database is locked|SQLITE_BUSY/i.test(err.message);
}

/** Blocks the thread: only used while opening the store, before the process serves anything. */
function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/** Runs `fn` in a write transaction (BEGIN IMMEDIATE takes the write lock up front). */
export function inTransaction<T>(db: DatabaseSync, fn: () => T): T {
  db.exec("BEGIN IMMEDIATE");
  try {
    const result = fn();
    db.exec("COMMIT");
    return result;
  } catch (err) {
    db.exec("ROLLBACK");
    throw err;
  }
}

/**
 * Writes a consistent copy of the SQLite database `sourceFile` to `destinationFile` while the
 * service that owns it keeps running: `VACUUM INTO` reads one snapshot (WAL lets the writer go on)
 * and writes a compact file with no write-ahead log to go with it, which a plain copy of a live
 * file could not promise. The destination must not exist. Answers SQLite's integrity check of
 * the copy ("ok" when it is sound).
 */
export function backupSqlite(sourceFile: string, destinationFile: string): string {
  const source = new DatabaseSync(sourceFile, { readOnly: true });
  try {
    source.exec(`PRAGMA busy_timeout = ${SQLITE_BUSY_TIMEOUT_MS}`);
    source.prepare("VACUUM INTO ?").run(destinationFile);
  } finally {
    source.close();
  }
  const copy = new DatabaseSync(destinationFile, { readOnly: true });
  try {
    return copy.prepare("PRAGMA integrity_check").all().map((row) => String(row.integrity_check)).join("; ");
  } finally {
    copy.close();
  }
}
