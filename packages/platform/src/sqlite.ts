/**
 * The embedded store's database: one SQLite file per service under the data directory, or
 * ":memory:" in tests, through Node's built-in node:sqlite (no native addon to build).
 * WAL lets readers proceed while a writer commits; the busy timeout lets two processes that
 * share a file (replicas on one machine) wait for each other instead of failing.
 */
import { mkdirSync } from "node:fs";
import path from "node:path";
import { DatabaseSync } from "node:sqlite";

export function openSqlite(dataDir: string, fileName: string): DatabaseSync {
  if (dataDir === ":memory:") return configure(new DatabaseSync(":memory:"));
  mkdirSync(dataDir, { recursive: true });
  return configure(new DatabaseSync(path.join(dataDir, fileName)));
}

function configure(db: DatabaseSync): DatabaseSync {
  db.exec("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;");
  return db;
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
