/**
 * Real-boundary test kit: stub dispatcher (LeaseService), telemetry (LogIngestService) and
 * tenant (ResolveSecrets) servers on loopback ports with signed identity, and the executor
 * process spawned as in production against the real Docker engine.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { callEndSignal, callerOf, checkLogGrant, checkSecretGrant, failedPrecondition, issueLogGrant, issueSecretGrant, notFound, permissionDenied, resourceExhausted, startServer, unimplemented, type RunningServer } from "@outpost/platform";
import { Dispatch_State, NetworkPolicy, type Agent } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import {
  LeaseSchema,
  LeaseService,
  type ExecutorCapacity,
  type Lease,
  type ReleaseLeaseRequest,
  type ReportRunStateRequest,
} from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { LogIngestService } from "@outpost/proto/outpost/telemetry/v1/log_ingest_service_pb.js";
import type { LogChunk } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";
import { TenantInternalService } from "@outpost/proto/outpost/tenant/v1/tenant_internal_service_pb.js";
import { ulid } from "ulid";
import { createDockerRuntime } from "../src/adapters/docker-runtime.ts";
import { createHostWorkspaces } from "../src/adapters/host-workspaces.ts";
import { Executor } from "../src/core/executor.ts";
import { NOBODY } from "../src/core/run.ts";
import { QueuedLeases, RunSink, silentLogger } from "./fakes.ts";
import { keysOf, signingEnv } from "../../../test/support/signing.ts";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const IMAGE = "outpost/demo-agent:latest";
export const LEASE_TTL_MS = 3000;
export const TERMINAL = new Set([Dispatch_State.SUCCEEDED, Dispatch_State.FAILED, Dispatch_State.TIMED_OUT, Dispatch_State.CANCELLED]);

export function dockerUp(): boolean {
  try {
    execFileSync("docker", ["info"], { stdio: "ignore", timeout: 10_000 });
    return true;
  } catch {
    return false;
  }
}

export const docker = (...args: string[]) => execFileSync("docker", args, { encoding: "utf8" }).trim();

export function buildDemoAgent(): void {
  execFileSync("bash", [path.join(ROOT, "test/fixtures/agents/build.sh")], { stdio: "inherit" });
}

type Router = Parameters<Parameters<typeof startServer>[0]["routes"]>[0];

/** The dispatcher side: hands out queued leases, answers heartbeats, records reports. */
export class StubDispatcher {
  readonly queue: Lease[] = [];
  readonly reports: ReportRunStateRequest[] = [];
  readonly releases: ReleaseLeaseRequest[] = [];
  readonly cancelled = new Set<string>();
  /** Leases currently held (removed once settled). */
  readonly leases = new Map<string, Lease>();
  readonly callers: string[] = [];
  readonly capacities: ExecutorCapacity[] = [];
  /** Whether contract C's ReleaseLease/ListExecutorLeases answer (false = UNIMPLEMENTED). */
  contractC = true;
  /** Whether heartbeat answers carry cancellation (false: only WatchCancellations tells). */
  cancelViaHeartbeat = true;
  /** Runs whose reports carrying a result are refused, as the real dispatcher refuses one too large for it. */
  readonly refusingResults = new Set<string>();
  private cancelWatchers: Array<() => void> = [];

  cancel(dispatchId: string) {
    this.cancelled.add(dispatchId);
    for (const wake of this.cancelWatchers.splice(0)) wake();
  }
  private wakers: Array<() => void> = [];

  enqueue(lease: Lease) {
    this.leases.set(lease.leaseId, lease);
    this.queue.push(lease);
    for (const wake of this.wakers.splice(0)) wake();
  }

  reportsFor(dispatchId: string) {
    return this.reports.filter((r) => r.dispatchId === dispatchId);
  }

  routes = (router: Router) => {
    // eslint-disable-next-line @typescript-eslint/no-this-alias -- the generator below needs the stub
    const stub = this;
    router.service(LeaseService, {
      acquireLease: async (req, ctx) => {
        this.callers.push(req.executorId);
        if (req.capacity) this.capacities.push(req.capacity);
        const deadline = Date.now() + Number(req.wait?.seconds ?? 0n) * 1000;
        const signal = callEndSignal(ctx);
        while (this.queue.length === 0 && Date.now() < deadline && !signal.aborted) {
          await new Promise<void>((resolve) => {
            this.wakers.push(resolve);
            setTimeout(resolve, Math.max(0, Math.min(500, deadline - Date.now())));
          });
        }
        // A caller that left (an executor stopped or killed mid-poll) must not take the next
        // test's lease with it: nobody would run it.
        if (signal.aborted) return {};
        const lease = this.queue.shift();
        if (lease) lease.expireTime = timestampFromDate(new Date(Date.now() + LEASE_TTL_MS));
        // As the real dispatcher does: the run's secrets granted to the executor that took it.
        const { id: dispatchId = "", tenantId = "", secretNames: names = [] } = lease?.dispatch ?? {};
        if (lease && names.length > 0) {
          lease.secretGrant = issueSecretGrant(keysOf("dispatcher"), { dispatchId, tenantId, names, executor: callerOf(ctx).principal });
        }
        if (lease) lease.logGrant = issueLogGrant(keysOf("dispatcher"), { dispatchId, tenantId, executor: callerOf(ctx).principal }, Date.now() + LEASE_TTL_MS);
        return { lease };
      },
      heartbeat: async (req, ctx) => {
        const held = this.leases.get(req.leaseId);
        if (!held) throw failedPrecondition("LEASE_LOST", "lease is not held");
        if (req.capacity) this.capacities.push(req.capacity);
        const expiresAt = Date.now() + LEASE_TTL_MS;
        const { id: dispatchId = "", tenantId = "" } = held.dispatch ?? {};
        return {
          expireTime: timestampFromDate(new Date(expiresAt)),
          cancelRequested: this.cancelViaHeartbeat && this.cancelled.has(req.dispatchId),
          // As the real dispatcher does: the log grant renewed with the lease.
          logGrant: issueLogGrant(keysOf("dispatcher"), { dispatchId, tenantId, executor: callerOf(ctx).principal }, expiresAt),
        };
      },
      watchCancellations: async function* (this: void, req, ctx) {
        const signal = callEndSignal(ctx);
        const sent = new Set<string>();
        while (!signal.aborted) {
          for (const lease of stub.leases.values()) {
            const id = lease.dispatch?.id ?? "";
            if (stub.cancelled.has(id) && !sent.has(lease.leaseId) && lease.dispatch?.executorId === req.executorId) {
              sent.add(lease.leaseId);
              yield { dispatchId: id, leaseId: lease.leaseId };
            }
          }
          await new Promise<void>((resolve) => {
            stub.cancelWatchers.push(resolve);
            signal.addEventListener("abort", () => resolve(), { once: true });
          });
        }
      },
      reportRunState: async (req) => {
        if (!this.leases.has(req.leaseId)) throw failedPrecondition("LEASE_LOST", "lease is not held");
        if (req.result && this.refusingResults.has(req.dispatchId)) throw resourceExhausted("message_size", "message size 5767144 is larger than configured readMaxBytes 4194304");
        this.reports.push(req);
        // The run's state as the real dispatcher keeps it, which ListExecutorLeases shows.
        const held = this.leases.get(req.leaseId);
        if (held?.dispatch) held.dispatch.state = req.state;
        if (TERMINAL.has(req.state)) this.leases.delete(req.leaseId);
        return {};
      },
      releaseLease: async (req) => {
        if (!this.contractC) throw unimplemented("outpost.executor.v1.LeaseService.ReleaseLease", "issue #5");
        if (!this.leases.has(req.leaseId)) throw failedPrecondition("LEASE_LOST", "lease is not held");
        this.releases.push(req);
        this.leases.delete(req.leaseId);
        return {};
      },
      listExecutorLeases: async (req, ctx) => {
        if (!this.contractC) throw unimplemented("outpost.executor.v1.LeaseService.ListExecutorLeases", "issue #5");
        const held = [...this.leases.values()].filter((l) => l.dispatch?.executorId === req.executorId && !this.queue.includes(l));
        // As the real dispatcher does: grants issued afresh, so a restarted executor can redact and write a run it takes up.
        for (const lease of held) {
          const { id: dispatchId = "", tenantId = "", secretNames: names = [] } = lease.dispatch ?? {};
          const expiresAt = lease.expireTime ? Number(lease.expireTime.seconds) * 1000 : Date.now();
          if (names.length > 0) lease.secretGrant = issueSecretGrant(keysOf("dispatcher"), { dispatchId, tenantId, names, executor: callerOf(ctx).principal });
          lease.logGrant = issueLogGrant(keysOf("dispatcher"), { dispatchId, tenantId, executor: callerOf(ctx).principal }, expiresAt);
        }
        return { leases: held };
      },
    });
  };
}

/** The telemetry side: stores chunks (ignoring duplicates) and acks the highest contiguous seq. */
export class StubTelemetry {
  readonly chunks = new Map<string, LogChunk[]>();
  readonly tenants = new Map<string, string>();
  /** Runs whose output is refused as the real telemetry refuses a bad grant. */
  readonly refusing = new Set<string>();
  /** IngestLogs requests per run, refused ones included. */
  readonly requests = new Map<string, number>();

  chunksFor(dispatchId: string) {
    return this.chunks.get(dispatchId) ?? [];
  }

  textsFor(dispatchId: string) {
    return this.chunksFor(dispatchId).map((c) => c.text);
  }

  routes = (router: Router) => {
    const { chunks, tenants, refusing, requests: counts } = this;
    router.service(LogIngestService, {
      async *ingestLogs(requests, ctx) {
        for await (const req of requests) {
          counts.set(req.dispatchId, (counts.get(req.dispatchId) ?? 0) + 1);
          if (refusing.has(req.dispatchId)) throw permissionDenied("LOG_GRANT_INVALID", "log grant refused: it has expired");
          // As the real telemetry does: only the executor the run was leased to may write it.
          checkLogGrant(keysOf("telemetry"), req.grant, { dispatchId: req.dispatchId, tenantId: req.tenantId, executor: callerOf(ctx).principal });
          const stored = chunks.get(req.dispatchId) ?? [];
          chunks.set(req.dispatchId, stored);
          tenants.set(req.dispatchId, req.tenantId);
          for (const chunk of req.chunks) {
            if (chunk.seq === BigInt(stored.length + 1)) stored.push(chunk);
          }
          yield { dispatchId: req.dispatchId, ackedSeq: BigInt(stored.length) };
        }
      },
      registerRun: async () => ({}),
      completeRun: async () => ({}),
    });
  };
}

/** The tenant side: ResolveSecrets from a fixed map per tenant. */
export class StubTenant {
  readonly secrets = new Map<string, Record<string, string>>();
  readonly callers: string[] = [];
  routes = (router: Router) => {
    router.service(TenantInternalService, {
      resolveSecrets: async (req, ctx) => {
        // The tenant service's own check of the grant the executor passes on.
        checkSecretGrant(keysOf("tenant"), req.grant, { tenantId: req.tenantId, names: req.names, executor: callerOf(ctx).principal });
        const known = this.secrets.get(req.tenantId) ?? {};
        const missing = req.names.find((n) => known[n] === undefined);
        if (missing) throw notFound("secret", missing);
        return { values: Object.fromEntries(req.names.map((n) => [n, known[n]!])) };
      },
    });
  };
}

export async function startStub(name: string, routes: (router: Router) => void): Promise<RunningServer> {
  return startServer({ name, host: "127.0.0.1", port: 0, logger: silentLogger, routes, signingKeys: keysOf("executor") });
}

export interface LeaseOptions {
  task: string;
  image?: string;
  timeoutMs?: number;
  agent?: Partial<Pick<Agent, "outputSchema" | "networkPolicy" | "name">> & { memoryBytes?: bigint; pidsLimit?: bigint };
  secretNames?: string[];
  repo?: { url: string; ref: string };
  executorId?: string;
  /** Overrides the image's command (Agent.command). */
  command?: string[];
}

export function demoLease(options: LeaseOptions): Lease {
  return create(LeaseSchema, {
    leaseId: ulid(),
    expireTime: timestampFromDate(new Date(Date.now() + LEASE_TTL_MS)),
    traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    dispatch: {
      id: ulid(),
      tenantId: "tenant-boundary",
      agent: options.agent?.name ?? "demo",
      task: options.task,
      model: "demo-model",
      state: Dispatch_State.STARTING,
      timeout: durationFromMs(options.timeoutMs ?? 60_000),
      secretNames: options.secretNames ?? [],
      executorId: options.executorId ?? "",
      ...(options.repo ? { repo: options.repo } : {}),
    },
    agent: {
      name: options.agent?.name ?? "demo",
      image: options.image ?? IMAGE,
      networkPolicy: options.agent?.networkPolicy ?? NetworkPolicy.NONE,
      command: options.command ?? [],
      outputSchema: options.agent?.outputSchema ?? "",
      resources: { memoryBytes: options.agent?.memoryBytes ?? 0n, pidsLimit: options.agent?.pidsLimit ?? 0n },
    },
  });
}

export async function until<T>(what: string | (() => string), probe: () => T | undefined | false, timeoutMs = 45_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = probe();
    if (value !== undefined && value !== false) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${typeof what === "string" ? what : what()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

export interface ExecutorProcess {
  child: ChildProcess;
  output: () => string;
  port: () => Promise<number>;
  dataDir: string;
  /** SIGTERM and wait for exit. */
  stop(): Promise<number | null>;
  /** SIGKILL, no clean-up. */
  kill9(): Promise<void>;
}

/** Spawns the executor as in production; `env` overrides the defaults. */
export function spawnExecutor(env: Record<string, string>, dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "outpost-executor-"))): ExecutorProcess {
  let output = "";
  const child = spawn(process.execPath, ["--disable-warning=ExperimentalWarning", path.join(ROOT, "services/executor/src/main.ts")], {
    cwd: ROOT,
    env: {
      ...process.env,
      ...signingEnv("executor"),
      OUTPOST_EXECUTOR_PORT: "0",
      OUTPOST_EXECUTOR_SLOTS: "2",
      OUTPOST_STOP_GRACE_MS: "3000",
      OUTPOST_EXECUTOR_LEASE_WAIT_MS: "2000",
      OUTPOST_EXECUTOR_SHUTDOWN_GRACE_MS: "2000",
      // No registry here: do not let the engine try one for images the tests leave out on purpose.
      OUTPOST_EXECUTOR_PULL_IMAGES: "false",
      OUTPOST_DATA_DIR: dataDir,
      ...env,
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  child.stdout!.on("data", (d: Buffer) => (output += d.toString()));
  child.stderr!.on("data", (d: Buffer) => (output += d.toString()));
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  return {
    child,
    dataDir,
    output: () => output,
    port: () => until(() => `executor to listen\n${output.slice(-2000)}`, () => Number(/"port":(\d+)[^\n]*executor listening/.exec(output)?.[1]) || false, 20_000),
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill("SIGTERM");
        await exited;
      }
      return child.exitCode;
    },
    async kill9() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill("SIGKILL");
        await exited;
      }
    },
  };
}

/** Removes containers a test's executor left (only on failure paths; tests assert there are none). */
export function removeContainersOf(executorId: string): void {
  const left = docker("ps", "-aq", "--filter", `label=dev.outpost.executor-id=${executorId}`);
  if (left) docker("rm", "-f", ...left.split("\n"));
}

/**
 * The executor's core on the real engine with host run directories under `runsDir` and a
 * workspace disk quota; only the dispatcher (queued leases) and telemetry (auto-acked, output
 * kept per run) are fakes. `run` leases one run and waits for its terminal report.
 */
export function realEngineExecutor(executorId: string, runsDir: string, quotaBytes: number) {
  const runtime = createDockerRuntime();
  const workspaces = createHostWorkspaces({ runsDir, uid: NOBODY.uid, gid: NOBODY.gid, repoSchemes: new Set(), checkoutTimeoutMs: 10_000, checkoutEgress: { allowedNetworks: [] } });
  const leases = new QueuedLeases();
  const sink = new RunSink();
  sink.autoAck = true;
  const executor = new Executor({
    executorId,
    containerUser: NOBODY,
    slots: 1,
    runtime,
    leases,
    logs: sink,
    workspaces,
    logger: silentLogger,
    stopGraceMs: 3000,
    leaseWaitMs: 500,
    minPollIntervalMs: 100,
    pullImages: false,
    workspaceQuota: { limitBytes: quotaBytes, checkIntervalMs: 200 },
  });
  return {
    runtime,
    workspaces,
    sink,
    start: () => executor.start(),
    /** Stops the executor and removes every container it labelled. */
    async stop() {
      await executor.shutdown(5000);
      removeContainersOf(executorId);
    },
    /** Leases a run of the demo agent; resolves with its terminal report, its output and how long it took. */
    async run(task: string, options: Pick<LeaseOptions, "image" | "command"> = {}) {
      const lease = demoLease({ task, executorId, timeoutMs: 60_000, ...options });
      const id = lease.dispatch!.id;
      const started = Date.now();
      leases.queue.push(lease);
      const end = await until(`terminal report of ${id}`, () => leases.reports.find((r) => r.dispatchId === id && TERMINAL.has(r.state)), 90_000);
      return { end, elapsedMs: Date.now() - started, texts: sink.textsOf(id), id };
    },
  };
}
