/**
 * Where the CLI finds its gateway and key: flags, then OUTPOST_GATEWAY_URL / OUTPOST_API_KEY /
 * OUTPOST_ADMIN_TOKEN, then the development credentials file that `npm start` writes.
 */
import { randomBytes } from "node:crypto";
import { chmodSync, closeSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, rmSync, writeSync } from "node:fs";
import path from "node:path";

export const DEFAULT_GATEWAY_URL = "http://127.0.0.1:7100";

export interface DevCredentials {
  gatewayUrl: string;
  apiKey: string;
  adminToken: string;
  tenantId: string;
}

export function outpostHome(env: NodeJS.ProcessEnv = process.env): string {
  return path.resolve(env.OUTPOST_HOME ?? ".outpost");
}

export function devCredentialsPath(env: NodeJS.ProcessEnv = process.env): string {
  return path.join(outpostHome(env), "credentials.json");
}

export function readDevCredentials(env: NodeJS.ProcessEnv = process.env): Partial<DevCredentials> {
  try {
    return JSON.parse(readFileSync(devCredentialsPath(env), "utf8")) as Partial<DevCredentials>;
  } catch {
    return {};
  }
}

/**
 * The Outpost home (.outpost) for secrets: created with mode 0700, and an existing one
 * tightened to it (an older version made it with the umask's mode).
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
