/**
 * Starts the five Outpost processes on loopback, each its own Node process with its own port
 * and data file, wired together by environment variables. Used by `npm start` and by the
 * tests that cross real process boundaries, so both exercise the same composition.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { closeSync, mkdirSync, openSync, readdirSync, readFileSync, readlinkSync } from "node:fs";
import https from "node:https";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { generateSigningKeySet, SIGNER_ROLES, type SigningKeySet } from "@outpost/platform";
import { startBalancer, type Balancer } from "./balancer.ts";
import { freePort } from "./ports.ts";
import type { TlsCertSet } from "./tls-certs.ts";

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
  /**
   * Internal mutual TLS (docs/operations.md, "Internal TLS"): each service serves and presents
   * the certificate of its name in `certs` (makeTlsCerts with SERVICES), all trust its CA, and
   * internal URLs are https://. `publicGateway`: the gateway's public port serves TLS too, with
   * its certificate (clients then trust `certs.ca`).
   */
  tls?: { certs: TlsCertSet; publicGateway?: boolean };
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
  /**
   * SIGTERM to every process (the gateway first, so no new work arrives while the rest drain)
   * and waits for them to exit; those still running `timeoutMs` after (default
   * STOP_TIMEOUT_MS) get SIGKILL. A mesh being started stops starting processes.
   */
  stop(options?: { timeoutMs?: number }): Promise<void>;
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

/**
 * How long stop() waits for a process to exit after SIGTERM before it sends SIGKILL: above the
 * executor's default shutdown grace (OUTPOST_EXECUTOR_SHUTDOWN_GRACE_MS, 30 s, in which its runs
 * may finish; containers still running then are left for its next start to settle) plus a
 * server's drain (10 s).
 */
export const STOP_TIMEOUT_MS = 60_000;

/** A start-up failure whose message says all there is to say (a port in use, a process that died). */
export class MeshStartError extends Error {
  override name = "MeshStartError";
}

/**
 * Every service process of this process's meshes that has not exited yet. When this process
 * exits (normally, by process.exit, or after an uncaught exception) they get SIGTERM, so no
 * service outlives a harness that failed or forgot to stop its mesh. A `kill -9` of this process
 * runs no code here: each service also watches its stdin, a pipe from this process, and stops
 * itself when the pipe closes (CHILD_WATCHDOG).
 */
const liveChildren = new Set<ChildProcess>();
let exitHookInstalled = false;

function track(child: ChildProcess): void {
  liveChildren.add(child);
  child.once("exit", () => liveChildren.delete(child));
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const c of liveChildren) c.kill("SIGTERM");
  });
}

/**
 * Preloaded into every service process (`--import`): when its stdin (a pipe whose other end
 * only the parent holds) closes, the parent is gone, whichever way it died; the service then
 * stops as on SIGTERM, and is killed if that has not ended it within a minute. The pipe does
 * not keep the process alive (unref).
 */
const CHILD_WATCHDOG =
  "data:text/javascript," +
  encodeURIComponent(
    [
      "const input = process.stdin;",
      "input.on('error', () => {});",
      "input.on('end', () => {",
      "  process.kill(process.pid, 'SIGTERM');",
      "  setTimeout(() => process.kill(process.pid, 'SIGKILL'), 60000).unref();",
      "});",
      "input.resume();",
      "input.unref?.();",
    ].join("\n"),
  );

/** Resolves when the process has exited (at once if it had). */
function exitOf(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => child.once("exit", () => resolve()));
}

/**
 * SIGTERM to each process still running, then waits until they exit or `deadline` (epoch ms)
 * passes; those left get SIGKILL (said on stderr).
 */
async function terminate(children: { label: string; child: ChildProcess }[], deadline: number): Promise<void> {
  const running = children.filter(({ child }) => child.exitCode === null && child.signalCode === null);
  for (const { child } of running) child.kill("SIGTERM");
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<void>((resolve) => (timer = setTimeout(resolve, Math.max(0, deadline - Date.now()))));
  await Promise.race([Promise.all(running.map(({ child }) => exitOf(child))), timedOut]);
  clearTimeout(timer);
  const stuck = running.filter(({ child }) => child.exitCode === null && child.signalCode === null);
  for (const { label, child } of stuck) {
    process.stderr.write(`mesh: ${label} (pid ${child.pid}) had not exited after SIGTERM by the deadline; sending SIGKILL\n`);
    child.kill("SIGKILL");
  }
  await Promise.all(stuck.map(({ child }) => exitOf(child)));
}

/**
 * Stops every service process this process started through startMesh and that is still
 * running, whichever mesh it belongs to (or one still being started): SIGTERM, then SIGKILL
 * after `timeoutMs`.
 */
export function stopAllMeshProcesses(timeoutMs = STOP_TIMEOUT_MS): Promise<void> {
  return terminate([...liveChildren].map((child) => ({ label: `process ${child.pid}`, child })), Date.now() + timeoutMs);
}

/**
 * For a script that owns a mesh (`npm start`, `npm run load`); call it before anything that can
 * throw. On SIGINT, SIGTERM or SIGHUP (exit code `signalExitCode`, default 128 + the signal's
 * number), an uncaught exception or an unhandled rejection (exit code 1), and when the script
 * calls the returned function itself: runs `cleanup` once (e.g. stopping the mesh, removing
 * containers; bounded by `timeoutMs`), stops whatever mesh process is still running (one being
 * started included), then exits. A second signal while stopping kills the processes at once.
 */
export function exitWithMesh(
  cleanup: () => Promise<void>,
  options: { say: (line: string) => void; signalExitCode?: number; timeoutMs?: number },
): (code: number) => Promise<never> {
  const timeoutMs = options.timeoutMs ?? STOP_TIMEOUT_MS + 10_000;
  let stopping: Promise<never> | undefined;
  const shutdown = (code: number): Promise<never> =>
    (stopping ??= (async () => {
      let timer: NodeJS.Timeout | undefined;
      try {
        await Promise.race([
          cleanup(),
          new Promise<void>((resolve) => {
            timer = setTimeout(() => {
              options.say(`cleanup did not finish within ${timeoutMs} ms; stopping the processes`);
              resolve();
            }, timeoutMs);
          }),
        ]);
      } catch (err) {
        options.say(`cleanup failed: ${err instanceof Error ? err.message : String(err)}`);
      } finally {
        clearTimeout(timer);
      }
      await stopAllMeshProcesses(5_000);
      process.exit(code);
    })());
  const onSignal = (signal: NodeJS.Signals) => {
    if (stopping) {
      options.say(`${signal} again: killing the mesh processes`);
      for (const child of liveChildren) child.kill("SIGKILL");
      process.exit(1);
    }
    options.say(`${signal}: stopping`);
    void shutdown(options.signalExitCode ?? 128 + (os.constants.signals[signal] ?? 0));
  };
  for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) process.on(signal, onSignal);
  const onError = (err: unknown) => {
    options.say(err instanceof MeshStartError ? err.message : `failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    void shutdown(1);
  };
  process.on("uncaughtException", onError);
  process.on("unhandledRejection", onError);
  return shutdown;
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
  const tls = options.tls;
  const schemeOf = (name: ServiceName) => (tls && (name !== "gateway" || tls.publicGateway) ? "https" : "http");
  const urls = Object.fromEntries(SERVICES.map((n) => [n, `${schemeOf(n)}://127.0.0.1:${ports[n]}`])) as Record<ServiceName, string>;
  const caPem = tls ? readFileSync(tls.certs.ca) : undefined;
  /** Each process's TLS settings: its own certificate, the CA; the gateway's public port's. */
  const tlsEnvOf = (name: ServiceName): Record<string, string> => {
    if (!tls) return {};
    const own = tls.certs.certs[name];
    if (!own) throw new MeshStartError(`mesh TLS: no certificate for ${name} (make one per service: makeTlsCerts(dir, SERVICES))`);
    const env: Record<string, string> = { OUTPOST_TLS_CA_FILE: tls.certs.ca, OUTPOST_TLS_CERT_FILE: own.cert, OUTPOST_TLS_KEY_FILE: own.key };
    if (name === "gateway" && tls.publicGateway) Object.assign(env, { OUTPOST_GATEWAY_TLS_CERT_FILE: own.cert, OUTPOST_GATEWAY_TLS_KEY_FILE: own.key });
    return env;
  };

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
  /** Set by stop(): replicas whose start is still under way spawn nothing more. */
  let stopped = false;

  async function start(name: ServiceName) {
    return startReplica(name, 0);
  }

  async function startReplica(name: ServiceName, index: number) {
    const port = replicaPorts[name][index];
    if (port === undefined) throw new Error(`${name} has no replica ${index}`);
    const label = replicaCount(name) > 1 ? `${name}-${index}` : name;
    const replicaEnv: Record<string, string> = {};
    if (replicaCount(name) > 1) replicaEnv[`OUTPOST_${name.toUpperCase()}_PORT`] = String(port);
    if (name === "executor") replicaEnv.OUTPOST_EXECUTOR_ID = executorIdOf(index);
    const env: Record<string, string | undefined> = {
      ...process.env,
      NODE_OPTIONS: serviceNodeOptions(process.env.NODE_OPTIONS),
      ...baseEnv,
      ...tlsEnvOf(name),
      OUTPOST_SIGNING_KEY: signingKeyOf(name, index),
      ...options.serviceEnv?.[name],
      ...replicaEnv,
    };
    const host = env[`OUTPOST_${name.toUpperCase()}_HOST`] ?? "127.0.0.1";
    // Whatever already listens there would answer the liveness probe in our process's stead
    // while ours dies on EADDRINUSE: say so instead.
    const taken = await portInUse(host, port);
    if (taken) throw new MeshStartError(`${label}: ${await describeTakenPort(host, port, taken)}`);
    if (stopped) throw new MeshStartError(`${label}: not started, the mesh is stopping`);
    const logFile = path.join(options.logDir, index === 0 ? `${name}.log` : `${name}-${index}.log`);
    // The process writes its log file itself, so its logs do not depend on this process living
    // (a write to a pipe nobody reads any more fails, and a service logging as it stops then hangs).
    const logFd = openSync(logFile, "a");
    let child: ChildProcess;
    try {
      child = spawn(process.execPath, ["--disable-warning=ExperimentalWarning", `--import=${CHILD_WATCHDOG}`, ENTRY[name]], {
        cwd: REPO_ROOT,
        env,
        // stdin: the pipe the watchdog watches (nothing is ever written to it).
        stdio: ["pipe", logFd, logFd],
      });
    } finally {
      closeSync(logFd);
    }
    track(child);
    if (index === 0) processes.set(name, child);
    replicaProcesses.set(`${name}#${index}`, child);
    await waitForLiveness(label, host, port, child, logFile, schemeOf(name) === "https" ? caPem : undefined);
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
    async stop({ timeoutMs = STOP_TIMEOUT_MS } = {}) {
      stopped = true;
      const deadline = Date.now() + timeoutMs;
      const of = (names: readonly ServiceName[]) =>
        names.flatMap((n) =>
          replicaPorts[n].flatMap((_, i) => {
            const child = replicaProcesses.get(`${n}#${i}`);
            return child ? [{ label: replicaCount(n) > 1 ? `${n}-${i}` : n, child }] : [];
          }),
        );
      // Edge first, so no new work arrives while the rest drains.
      await terminate(of(["gateway"]), deadline);
      await terminate(of(SERVICES.filter((n) => n !== "gateway")), deadline);
      await Promise.all(balancers.map((b) => b.close()));
    },
    instances(name) {
      return (name ? [name] : SERVICES).flatMap((service) =>
        replicaPorts[service].map((port, index) => ({
          service,
          index,
          port,
          url: `${schemeOf(service)}://127.0.0.1:${port}`,
          process: replicaProcesses.get(`${service}#${index}`),
        })),
      );
    },
    startReplica,
    killReplica,
  };
  let starting: Promise<void>[] = [];
  try {
    for (const name of SERVICES) {
      if (replicaCount(name) > 1 && name !== "executor") {
        balancers.push(await startBalancer(() => replicaPorts[name], "127.0.0.1", ports[name]));
      }
    }
    starting = (options.only ?? SERVICES).flatMap((name) => replicaPorts[name].map((_, i) => startReplica(name, i)));
    await Promise.all(starting);
  } catch (err) {
    await mesh.stop({ timeoutMs: 15_000 });
    // The other starts end at once now (their process stopped, or not spawned): nothing they
    // spawn is left behind when this rejects.
    await Promise.allSettled(starting);
    throw err;
  }
  return mesh;
}

/** Why `host:port` cannot be bound, or undefined when it can (the probe closes at once). */
function portInUse(host: string, port: number): Promise<string | undefined> {
  return new Promise((resolve) => {
    const probe = net.createServer();
    probe.once("error", (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message));
    probe.listen({ host, port, exclusive: true }, () => probe.close(() => resolve(undefined)));
  });
}

async function describeTakenPort(host: string, port: number, reason: string): Promise<string> {
  if (reason !== "EADDRINUSE") return `cannot listen on ${host}:${port} (${reason})`;
  let answersHealthz = false;
  try {
    answersHealthz = (await fetch(`http://127.0.0.1:${port}/healthz`, { signal: AbortSignal.timeout(1000) })).ok;
  } catch {
    // not an HTTP server, or not on loopback
  }
  return (
    `port ${port} is already in use by another process` +
    (answersHealthz ? " that answers /healthz (another Outpost mesh? an earlier `npm start` may still be running)" : "") +
    "; stop it or choose other ports"
  );
}

/**
 * Whether process `pid` holds a TCP socket listening on `port`: its open descriptors (Linux
 * /proc/<pid>/fd) include the socket inode /proc/net/tcp{,6} lists as listening there.
 * Undefined where /proc cannot tell (not Linux).
 */
export function listensOn(pid: number, port: number): boolean | undefined {
  const inodes = new Set<string>();
  let readable = false;
  for (const file of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    let text: string;
    try {
      text = readFileSync(file, "utf8");
    } catch {
      continue;
    }
    readable = true;
    for (const line of text.split("\n").slice(1)) {
      // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
      const fields = line.trim().split(/\s+/);
      if (fields.length < 10 || fields[3] !== "0A") continue; // 0A: LISTEN
      if (Number.parseInt(fields[1]!.split(":").at(-1)!, 16) === port) inodes.add(fields[9]!);
    }
  }
  if (!readable) return undefined;
  let fds: string[];
  try {
    fds = readdirSync(`/proc/${pid}/fd`);
  } catch {
    return false; // gone
  }
  for (const fd of fds) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
      if (m && inodes.has(m[1]!)) return true;
    } catch {
      // closed meanwhile
    }
  }
  return false;
}

/**
 * Waits until `child` answers its liveness path, and proves the answer came from it: the
 * process listening on the port must be `child` (listensOn; where /proc cannot tell, `child`
 * must still be running after the answer). Fails at once when `child` exits or is killed.
 */
/** Whether 127.0.0.1:port answers its liveness path 200: over TLS verified against `ca` when given. */
async function livenessAnswers(port: number, ca: Buffer | undefined): Promise<boolean> {
  if (ca === undefined) return (await fetch(`http://127.0.0.1:${port}/healthz`, { signal: AbortSignal.timeout(2000) })).ok;
  return new Promise((resolve, reject) => {
    const req = https.get(`https://127.0.0.1:${port}/healthz`, { ca, timeout: 2000 }, (res) => {
      res.resume();
      resolve(res.statusCode === 200);
    });
    req.once("timeout", () => req.destroy(new Error("no answer within 2 s")));
    req.once("error", reject);
  });
}

/** `ca`: the process serves TLS; its liveness path is asked over https, trusting this CA. */
async function waitForLiveness(label: string, host: string, port: number, child: ChildProcess, logFile: string, ca?: Buffer, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  const exited = exitOf(child);
  let strangerAnswered = false;
  const died = async () => {
    const how = child.signalCode !== null ? `was killed by ${child.signalCode}` : `exited with code ${child.exitCode}`;
    const taken = await portInUse(host, port);
    return new MeshStartError(`${label} ${how} during start-up${taken ? `: ${await describeTakenPort(host, port, taken)}` : ""} (see ${logFile})`);
  };
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) throw await died();
    try {
      if (await livenessAnswers(port, ca)) {
        const ours = child.pid === undefined ? false : listensOn(child.pid, port);
        if (ours === true || (ours === undefined && child.exitCode === null && child.signalCode === null)) return;
        strangerAnswered = true;
      }
    } catch {
      // not listening yet
    }
    await Promise.race([new Promise((resolve) => setTimeout(resolve, 50)), exited]);
  }
  if (child.exitCode !== null || child.signalCode !== null) throw await died();
  throw new MeshStartError(
    strangerAnswered
      ? `${label}: port ${port} answers /healthz, but not from the process started for it (pid ${child.pid}); another process listens there (see ${logFile})`
      : `${label} did not answer ${ca ? "https" : "http"}://127.0.0.1:${port}/healthz within ${timeoutMs} ms (see ${logFile})`,
  );
}
