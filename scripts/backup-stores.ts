/**
 * Backs up the embedded stores (one SQLite file per service) while the mesh runs:
 *
 *   npm run -s backup -- <directory>        into <directory>/outpost-backup-<UTC time>/
 *   npm run -s backup -- <directory> --data-dir /var/lib/outpost/data
 *
 * The data directory is --data-dir, else OUTPOST_DATA_DIR, else the development mesh's
 * ($OUTPOST_HOME/data, ~/.outpost/data). Each of tenant.db, dispatcher.db and telemetry.db that
 * exists is copied with SQLite's VACUUM INTO (one consistent snapshot per file, taken while the
 * services write) and checked with its integrity check; the copies are 0600 in a 0700 directory.
 * The secrets' master key is not copied: a backup of encrypted secrets and the key that opens
 * them belong in different places (docs/operations.md, "Backing up the embedded stores").
 * MongoDB deployments back up with MongoDB's own tools. Exit 0 when every copy is sound, 1 when
 * one failed, 2 for a usage error.
 */
import { existsSync, mkdirSync, statSync } from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";
import { outpostHome } from "@outpost/cli";
import { backupSqlite } from "@outpost/platform";

/** The services' store files under the data directory (the executor keeps no store). */
const STORE_FILES = ["tenant.db", "dispatcher.db", "telemetry.db"];

function usage(message: string): never {
  process.stderr.write(`backup: ${message}\nusage: npm run -s backup -- <directory> [--data-dir <dir>]\n`);
  process.exit(2);
}

let parsed;
try {
  parsed = parseArgs({ allowPositionals: true, options: { "data-dir": { type: "string" } } });
} catch (err) {
  usage((err as Error).message);
}
const { values, positionals } = parsed;
if (positionals.length !== 1) usage("give one directory to write the backup into");
const dataDir = path.resolve(values["data-dir"] ?? process.env.OUTPOST_DATA_DIR ?? path.join(outpostHome(), "data"));
const present = STORE_FILES.filter((file) => existsSync(path.join(dataDir, file)));
if (present.length === 0) usage(`no store in ${dataDir} (${STORE_FILES.join(", ")}); name it with --data-dir or OUTPOST_DATA_DIR`);

// A new directory per backup, named by its time: never an earlier backup overwritten.
const stamp = new Date().toISOString().replace(/[:.]/g, "-");
const target = path.join(path.resolve(positionals[0]!), `outpost-backup-${stamp}`);
mkdirSync(target, { recursive: true, mode: 0o700 });
// VACUUM INTO creates its file with the process's umask: 0600 for the copies of secrets and keys' hashes.
process.umask(0o077);

let failed = false;
for (const file of present) {
  const destination = path.join(target, file);
  try {
    const check = backupSqlite(path.join(dataDir, file), destination);
    if (check !== "ok") throw new Error(`the copy failed SQLite's integrity check: ${check}`);
    process.stdout.write(`${destination} (${statSync(destination).size} bytes)\n`);
  } catch (err) {
    failed = true;
    process.stderr.write(`backup: ${file}: ${(err as Error).message}\n`);
  }
}
process.exit(failed ? 1 : 0);
