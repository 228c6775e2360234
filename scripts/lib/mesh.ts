/**
 * Starts the five Outpost processes on loopback, each its own Node process with its own port
 * and data file, wired together by environment variables. Used by `npm start` and by the
 * tests that cross real process boundaries, so both exercise the same composition.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createWriteStream, mkdirSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { generateSigningKeySet, SIGNER_ROLES, type SigningKeySet } from "@outpost/platform";
import { startBalancer, type Balancer } from "./balancer.ts";
import { freePort } from "./ports.ts";

export { freePort };

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

export const SERVICES = ["tenant", "telemetry", "dispatcher", "executor", "gateway"] as const;
export type ServiceName = (typeof SERVICES)[number];

const ENTRY: Record<ServiceName, string> = {
  tenant: "services/tenant/src/main.ts",
  telemetry: "services/telemetry/src/main.ts",
  dispatcher: "services/dispatcher/src/main.ts",
  executor: "services/executor/src/main.ts",
  gateway: "gateway/src/main.ts",
};

export const DEFAULT_PORTS: Record<ServiceName, number> = {
  gateway: 7100,
  tenant: 7101,
  dispatcher: 7102,
  executor: 7103,
  telemetry: 7104,
};

export interface MeshOptions {
  dataDir: string;
  logDir: string;
  /**
   * Each process's signing key and the trusted signers (identity.ts). An executor uses the key
   * of its own id when the set has one, else the role's. When omitted, a fresh set in which
   * every executor has a key of its own and none is trusted for the role as a whole.
   */
  signingKeys?: SigningKeySet;
  adminToken: string;
  /** Fixed ports; omitted ones are picked free. */
  ports?: Partial<Record<ServiceName, number>>;
  /** Extra environment for every process, or per process. */
  env?: Record<string, string>;
  serviceEnv?: Partial<Record<ServiceName, Record<string, string>>>;
  /** Which processes to start (default all). */
  only?: readonly ServiceName[];
  /**
   * Replicas per service (default 1). A replicated service gets a TCP balancer on its URL
   * (a stand-in for a Kubernetes Service) and each replica its own free port; executors get
   * no balancer (nobody calls them) but distinct ids (`<OUTPOST_EXECUTOR_ID>-<n>`). Replicas
   * share the data directory (SQLite in WAL mode) and whatever Redis `env` points them at.
   */
  replicas?: Partial<Record<ServiceName, number>>;
}

/** One running (or stopped) process of a service. */
export interface MeshInstance {
  service: ServiceName;
  index: number;
  port: number;
  url: string;
  process: ChildProcess | undefined;
}

export interface Mesh {
  urls: Record<ServiceName, string>;
  processes: Map<ServiceName, ChildProcess>;
  /** Starts (or restarts) one process and waits until it answers its liveness path. */
  start(name: ServiceName): Promise<void>;
  /** Sends a signal and waits for the exit code. */
  kill(name: ServiceName, signal?: NodeJS.Signals): Promise<number | null>;
  stop(): Promise<void>;
  /** Every replica of every service, replica 0 first. */
  instances(name?: ServiceName): MeshInstance[];
  /** Starts (or restarts) one replica on its port and waits for its liveness path. */
  startReplica(name: ServiceName, index: number): Promise<void>;
  /** Signals one replica (SIGKILL for a crash) and waits for it to exit. */
  killReplica(name: ServiceName, index: number, signal?: NodeJS.Signals): Promise<number | null>;
}

/**
 * V8 flags every service runs with (deploy/Dockerfile sets the same in NODE_OPTIONS). Node's
 * default young generation grows to tens of MiB here; a scavenge of it stopped the gateway for
 * 10-15 ms every half second under load, and the edge p99 at half load was those pauses.
 * Capped at 8 MiB, scavenges come more often but take 1-3 ms (docs/operations.md, "Runtime").
 * An operator's NODE_OPTIONS that sets the size wins.
 */
export const SERVICE_NODE_OPTIONS = "--max-semi-space-size=8";

/** NODE_OPTIONS for a service process: the operator's, plus SERVICE_NODE_OPTIONS unless they set the size. */
export function serviceNodeOptions(operator: string | undefined): string {
  const own = (operator ?? "").trim();
  if (own.includes("--max-semi-space-size")) return own;
  return own ? `${own} ${SERVICE_NODE_OPTIONS}` : SERVICE_NODE_OPTIONS;
}

export async function startMesh(options: MeshOptions): Promise<Mesh> {
  mkdirSync(options.dataDir, { recursive: true });
  mkdirSync(options.logDir, { recursive: true });
  const ports = {} as Record<ServiceName, number>;
  for (const name of SERVICES) ports[name] = options.ports?.[name] ?? (await freePort());
  const replicaCount = (name: ServiceName) => Math.max(1, Math.floor(options.replicas?.[name] ?? 1));
  // Replica ports: a replicated service's own port belongs to its balancer (not the executor's).
  const replicaPorts = {} as Record<ServiceName, number[]>;
  for (const name of SERVICES) {
    const n = replicaCount(name);
    replicaPorts[name] = n === 1 ? [ports[name]] : await Promise.all(Array.from({ length: n }, () => freePort()));
    if (n > 1 && name === "executor") replicaPorts[name][0] = ports[name];
  }
  const urls = Object.fromEntries(SERVICES.map((n) => [n, `http://127.0.0.1:${ports[n]}`])) as Record<ServiceName, string>;

  /** The id each executor runs with: set explicitly, so its key can be bound to it. */
  const executorIdOf = (index: number) => {
    const base = options.serviceEnv?.executor?.OUTPOST_EXECUTOR_ID ?? options.env?.OUTPOST_EXECUTOR_ID;
    return replicaCount("executor") > 1 ? `${base ?? "executor"}-${index}` : (base ?? os.hostname());
  };
  const signing = options.signingKeys ?? generateSigningKeySet(SIGNER_ROLES, replicaPorts.executor.map((_, i) => executorIdOf(i)));
  const signingKeyOf = (name: ServiceName, index: number) =>
    (name === "executor" ? signing.executorKeys[executorIdOf(index)] : undefined) ?? signing.signingKeys[name];
  const baseEnv: Record<string, string> = {
    OUTPOST_TRUSTED_SIGNERS: signing.trustedSigners,
    OUTPOST_ADMIN_TOKEN: options.adminToken,
    OUTPOST_DATA_DIR: options.dataDir,
    OUTPOST_TENANT_URL: urls.tenant,
    OUTPOST_DISPATCHER_URL: urls.dispatcher,
    OUTPOST_TELEMETRY_URL: urls.telemetry,
    // The executor reports these images present (or not) from start-up, so fleet status knows
    // the demo agent is runnable before its first run.
    OUTPOST_EXECUTOR_IMAGES: "outpost/demo-agent:latest",
    ...Object.fromEntries(SERVICES.map((n) => [`OUTPOST_${n.toUpperCase()}_PORT`, String(ports[n])])),
    ...options.env,
  };

  const processes = new Map<ServiceName, ChildProcess>();
  const replicaProcesses = new Map<string, ChildProcess>();
  const balancers: Balancer[] = [];

  async function start(name: ServiceName) {
    return startReplica(name, 0);
  }

  async function startReplica(name: ServiceName, index: number) {
    const port = replicaPorts[name][index];
    if (port === undefined) throw new Error(`${name} has no replica ${index}`);
    const replicaEnv: Record<string, string> = {};
    if (replicaCount(name) > 1) replicaEnv[`OUTPOST_${name.toUpperCase()}_PORT`] = String(port);
    if (name === "executor") replicaEnv.OUTPOST_EXECUTOR_ID = executorIdOf(index);
    const child = spawn(process.execPath, ["--disable-warning=ExperimentalWarning", ENTRY[name]], {
      cwd: REPO_ROOT,
      env: { ...process.env, NODE_OPTIONS: serviceNodeOptions(process.env.NODE_OPTIONS), ...baseEnv, OUTPOST_SIGNING_KEY: signingKeyOf(name, index), ...options.serviceEnv?.[name], ...replicaEnv },
      stdio: ["ignore", "pipe", "pipe"],
    });
    const log = createWriteStream(path.join(options.logDir, index === 0 ? `${name}.log` : `${name}-${index}.log`), { flags: "a" });
    child.stdout.pipe(log);
    child.stderr.pipe(log);
    if (index === 0) processes.set(name, child);
    replicaProcesses.set(`${name}#${index}`, child);
    await waitForLiveness(replicaCount(name) > 1 ? `${name}-${index}` : name, `http://127.0.0.1:${port}`, child);
  }

  async function killReplica(name: ServiceName, index: number, signal: NodeJS.Signals = "SIGTERM") {
    const child = replicaProcesses.get(`${name}#${index}`);
    if (!child || child.exitCode !== null || child.signalCode !== null) return child?.exitCode ?? null;
    const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
    child.kill(signal);
    return exited;
  }

  async function kill(name: ServiceName, signal: NodeJS.Signals = "SIGTERM") {
    if (replicaCount(name) > 1) return killReplica(name, 0, signal);
    const child = processes.get(name);
    if (!child || child.exitCode !== null || child.signalCode !== null) return child?.exitCode ?? null;
    const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
    child.kill(signal);
    return exited;
  }

  const mesh: Mesh = {
    urls,
    processes,
    start,
    kill,
    async stop() {
      // Edge first, so no new work arrives while the rest drains.
      const killAll = (n: ServiceName) => Promise.all(replicaPorts[n].map((_, i) => (i === 0 ? kill(n) : killReplica(n, i))));
      await killAll("gateway");
      await Promise.all(SERVICES.filter((n) => n !== "gateway").map(killAll));
      await Promise.all(balancers.map((b) => b.close()));
    },
    instances(name) {
      return (name ? [name] : SERVICES).flatMap((service) =>
        replicaPorts[service].map((port, index) => ({
          service,
          index,
          port,
          url: `http://127.0.0.1:${port}`,
          process: replicaProcesses.get(`${service}#${index}`),
        })),
      );
    },
    startReplica,
    killReplica,
  };
  try {
    for (const name of SERVICES) {
      if (replicaCount(name) > 1 && name !== "executor") {
        balancers.push(await startBalancer(() => replicaPorts[name], "127.0.0.1", ports[name]));
      }
    }
    await Promise.all((options.only ?? SERVICES).flatMap((name) => replicaPorts[name].map((_, i) => startReplica(name, i))));
  } catch (err) {
    await mesh.stop();
    throw err;
  }
  return mesh;
}

async function waitForLiveness(name: string, url: string, child: ChildProcess, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`${name} exited with code ${child.exitCode} during start-up (see its log)`);
    try {
      const res = await fetch(`${url}/healthz`);
      if (res.ok) return;
    } catch {
      // not listening yet
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`${name} did not answer ${url}/healthz within ${timeoutMs} ms`);
}
