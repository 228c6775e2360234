/**
 * Where the CLI finds its gateway and key: flags, then OUTPOST_GATEWAY_URL / OUTPOST_API_KEY /
 * OUTPOST_ADMIN_TOKEN, then the development credentials file that `npm start` writes in the
 * Outpost home ($OUTPOST_HOME, else ~/.outpost) — never in the working directory, where a
 * cloned repository could have planted one. The file is read only if it belongs to the current
 * user and nobody else can read it (npm start tightens one of the user's own first).
 */
import { randomBytes } from "node:crypto";
import { chmodSync, closeSync, constants, fchmodSync, fstatSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, rmSync, statSync, writeSync } from "node:fs";
import os from "node:os";
import path from "node:path";

export const DEFAULT_GATEWAY_URL = "http://127.0.0.1:7100";

export interface DevCredentials {
  gatewayUrl: string;
  apiKey: string;
  adminToken: string;
  tenantId: string;
}

/** A credentials file the CLI refuses to use (another owner, readable by others, not JSON). */
export class CredentialsError extends Error {}

/** $OUTPOST_HOME if set, else ~/.outpost: a fixed place, whatever the working directory. */
export function outpostHome(env: NodeJS.ProcessEnv = process.env): string {
  if (env.OUTPOST_HOME) return path.resolve(env.OUTPOST_HOME);
  return path.join(env.HOME || os.homedir(), ".outpost");
}

export function devCredentialsPath(env: NodeJS.ProcessEnv = process.env): string {
  return path.join(outpostHome(env), "credentials.json");
}

/**
 * The development credentials, or {} when there is no file. Throws CredentialsError for a file
 * owned by another user or readable by group or others (checked on the opened file, so a swap
 * between the check and the read changes nothing), and for one that is not a JSON object.
 */
export function readDevCredentials(env: NodeJS.ProcessEnv = process.env): Partial<DevCredentials> {
  const file = devCredentialsPath(env);
  let fd: number;
  try {
    fd = openSync(file, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return {};
    throw new CredentialsError(`cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  let text: string;
  try {
    const stat = fstatSync(fd);
    const uid = process.getuid?.();
    if (!stat.isFile()) throw new CredentialsError(`${file} is not a regular file`);
    if (uid !== undefined && stat.uid !== uid) {
      throw new CredentialsError(`${file} is owned by uid ${stat.uid}, not by you (uid ${uid}): refusing to use it; point OUTPOST_HOME at a directory of your own`);
    }
    if ((stat.mode & 0o077) !== 0) {
      const mode = (stat.mode & 0o777).toString(8).padStart(4, "0");
      throw new CredentialsError(`${file} can be read by other users (mode ${mode}): refusing to use it; run chmod 600 ${file}`);
    }
    text = readFileSync(fd, "utf8");
  } finally {
    closeSync(fd);
  }
  // The fix for a file that is not what npm start writes; the parser's own message is not shown:
  // it can quote the file (a bare API key, say) and span lines.
  const fix = "fix it, or delete it and run npm start, which provisions a development tenant and writes a new one";
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    const where = /line \d+ column \d+/.exec((err as Error).message)?.[0];
    throw new CredentialsError(`${file} is not valid JSON${where ? ` (${where})` : ""}: ${fix}`);
  }
  if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) throw new CredentialsError(`${file} must hold one JSON object: ${fix}`);
  return parsed as Partial<DevCredentials>;
}

/**
 * For `npm start`, before it reads the file: a credentials file of the current user's that
 * others can read (an older version wrote it with the umask's mode, 0644 — e.g. in an old
 * checkout's .outpost that OUTPOST_HOME now names) is made 0600, and its directory 0700, as npm
 * start does with its other secrets. The mode is changed on the opened file, after checking
 * that it is a regular file of the current user's. Anything else (no file, another owner, not
 * readable) is left as it is, for readDevCredentials to refuse with its reason.
 */
export function tightenDevCredentials(env: NodeJS.ProcessEnv = process.env): void {
  const file = devCredentialsPath(env);
  const uid = process.getuid?.();
  let fd: number;
  try {
    fd = openSync(file, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch {
    return;
  }
  try {
    const stat = fstatSync(fd);
    if (!stat.isFile() || (uid !== undefined && stat.uid !== uid)) return;
    if ((stat.mode & 0o077) !== 0) fchmodSync(fd, 0o600);
    const dir = path.dirname(file);
    const dirStat = statSync(dir);
    if ((uid === undefined || dirStat.uid === uid) && (dirStat.mode & 0o077) !== 0) chmodSync(dir, 0o700);
  } catch (err) {
    throw new CredentialsError(`cannot make ${file} private: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  } finally {
    closeSync(fd);
  }
}

/**
 * The Outpost home (or another directory) for secrets: created with mode 0700, and an existing
 * one tightened to it (an older version made it with the umask's mode).
 */
export function ensurePrivateDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  chmodSync(dir, 0o700);
}

/**
 * Writes a file only its owner can read (0600), whatever mode an existing one had: the
 * content goes to a new temporary file (created 0600, exclusively) in the same directory,
 * which is then renamed over the file. writeFile's `mode` alone applies only when it creates
 * the file, so a file an older version left 0644 would have stayed readable by everyone.
 */
export function writePrivateFile(file: string, content: string): void {
  ensurePrivateDir(path.dirname(file));
  const temporary = path.join(path.dirname(file), `.${path.basename(file)}.${randomBytes(6).toString("hex")}.tmp`);
  const fd = openSync(temporary, "wx", 0o600);
  try {
    writeSync(fd, content);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  try {
    chmodSync(temporary, 0o600); // the umask could only have removed bits; this makes it exact
    renameSync(temporary, file);
  } catch (err) {
    rmSync(temporary, { force: true });
    throw err;
  }
}

/** Written with mode 0600 (replacing any older, looser file): it holds a live API key and the admin token. */
export function writeDevCredentials(credentials: DevCredentials, env: NodeJS.ProcessEnv = process.env): string {
  const file = devCredentialsPath(env);
  writePrivateFile(file, `${JSON.stringify(credentials, null, 2)}\n`);
  return file;
}
