/**
 * Where the CLI finds its gateway and key: flags, then OUTPOST_GATEWAY_URL / OUTPOST_API_KEY /
 * OUTPOST_ADMIN_TOKEN, then the development credentials file that `npm start` writes.
 */
import { readFileSync, writeFileSync, mkdirSync } from "node:fs";
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

/** Written with mode 0600: it holds a live API key and the admin token. */
export function writeDevCredentials(credentials: DevCredentials, env: NodeJS.ProcessEnv = process.env): string {
  const file = devCredentialsPath(env);
  mkdirSync(path.dirname(file), { recursive: true });
  writeFileSync(file, `${JSON.stringify(credentials, null, 2)}\n`, { mode: 0o600 });
  return file;
}
