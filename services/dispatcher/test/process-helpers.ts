/** Spawning dispatcher processes for tests that cross the real boundary. */
import { spawn, type ChildProcess } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { freePort } from "../../../scripts/lib/ports.ts";
import { signingEnv } from "../../../test/support/signing.ts";

export { freePort };

const MAIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../src/main.ts");

export type Proc = { child: ChildProcess; output: () => string; exited: Promise<number | null> };

export function startProcess(env: Record<string, string>): Proc {
  const { OUTPOST_SIGNING_KEY: _a, OUTPOST_TRUSTED_SIGNERS: _c, OUTPOST_TELEMETRY_URL: _b, ...inherited } = process.env;
  const child = spawn(process.execPath, ["--disable-warning=ExperimentalWarning", MAIN], {
    env: { ...inherited, ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  child.stdout!.on("data", (b: Buffer) => (out += b.toString()));
  child.stderr!.on("data", (b: Buffer) => (out += b.toString()));
  const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
  return { child, output: () => out, exited };
}

export async function waitHealthy(baseUrl: string, proc: Proc): Promise<void> {
  let done = false;
  void proc.exited.then(() => (done = true));
  const deadline = Date.now() + 20_000;
  while (Date.now() < deadline) {
    if (done) throw new Error(`dispatcher process exited early:\n${proc.output()}`);
    try {
      const res = await fetch(`${baseUrl}/healthz`);
      if (res.ok) return;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`dispatcher process not healthy in time:\n${proc.output()}`);
}

export async function startDispatcherProcess(dataDir: string, extra: Record<string, string> = {}) {
  const port = await freePort();
  const telemetryPort = await freePort(); // nothing listens there
  const baseUrl = `http://127.0.0.1:${port}`;
  const proc = startProcess({
    ...signingEnv("dispatcher"),
    OUTPOST_DISPATCHER_HOST: "127.0.0.1",
    OUTPOST_DISPATCHER_PORT: String(port),
    OUTPOST_DATA_DIR: dataDir,
    OUTPOST_TELEMETRY_URL: `http://127.0.0.1:${telemetryPort}`,
    ...extra,
  });
  await waitHealthy(baseUrl, proc);
  return { baseUrl, proc };
}

export async function stop(proc: Proc | undefined) {
  if (proc && proc.child.exitCode === null) {
    proc.child.kill("SIGTERM");
    await proc.exited;
  }
}

