/**
 * What the benchmarks run against: the real Outpost processes (started through the same
 * scripts/lib/mesh.ts that `npm start` and the tests use, on free ports and a throw-away data
 * directory) and the bare baseline server, each its own process in this process tree.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import Docker from "dockerode";
import { outpostClients, type OutpostClients } from "@outpost/cli";
import { Tier } from "@outpost/proto/outpost/tenant/v1/tenant_pb.js";
import { REPO_ROOT, SERVICES, startMesh, type Mesh, type ServiceName } from "../../scripts/lib/mesh.ts";
import { makeTlsCerts } from "../../scripts/lib/tls-certs.ts";

export interface BenchMesh {
  mesh: Mesh;
  admin: OutpostClients;
  newTenant(name: string): Promise<{ tenantId: string; apiKey: string; clients: OutpostClients }>;
  stop(): Promise<void>;
}

/**
 * Names this run of the benchmarks. bench/run.ts sets OUTPOST_BENCH_RUN_ID (unless given) so
 * every process a benchmark starts inherits it; the executors' ids (hence their containers'
 * `dev.outpost.executor-id` labels) and the bare containers' BENCH_RUN_LABEL carry it too, so
 * whatever a run leaves behind can be found (test/bench-harness.test.ts looks).
 */
export function benchRunId(): string {
  return (process.env.OUTPOST_BENCH_RUN_ID ??= randomBytes(6).toString("hex"));
}

/** Label on containers a benchmark starts itself (bare baselines), valued with benchRunId(). */
export const BENCH_RUN_LABEL = "dev.outpost.bench-run";

let meshesStarted = 0;

/**
 * `options.tls`: "internal" runs the services over mutual TLS with a fresh CA; "all" serves the
 * gateway's public port over TLS as well (its clients here trust that CA).
 */
export async function startBenchMesh(only?: readonly ServiceName[], env: Record<string, string> = {}, options: { tls?: "internal" | "all" } = {}): Promise<BenchMesh> {
  const dir = mkdtempSync(path.join(os.tmpdir(), "outpost-bench-"));
  // Its own executor id: the executor reconciles (adopts or removes) containers labelled with
  // its id at start-up, which must not reach containers of anything else on this machine.
  const executorId = `bench-${benchRunId()}-${++meshesStarted}`;
  const withExecutor = !only || only.includes("executor");
  const adminToken = randomBytes(32).toString("hex");
  // Benchmarks measure the limiter's cost, not its rejections: bench tenants are enterprise
  // tier with request rates far above anything one machine produces, and the per-IP limit
  // (one load generator stands in for many clients) is raised the same way.
  const tiersFile = path.join(dir, "tiers.json");
  const huge = 1_000_000_000;
  writeFileSync(tiersFile, JSON.stringify({ enterprise: { create_per_minute: huge, trigger_per_minute: huge, read_per_minute: huge, runs_per_day: huge, concurrent_runs: 1000 } }));
  let mesh: Mesh;
  const tls = options.tls && { certs: makeTlsCerts(path.join(dir, "tls"), SERVICES), publicGateway: options.tls === "all" };
  try {
    mesh = await startMesh({
      tls,
      dataDir: path.join(dir, "data"),
      logDir: path.join(dir, "logs"),
      adminToken,
      only,
      // Benchmarks measure the request path, not log volume.
      env: {
        OUTPOST_LOG_LEVEL: "warn",
        OUTPOST_TIERS_FILE: tiersFile,
        OUTPOST_RATE_LIMITS_PER_IP: `create=${huge},trigger=${huge},read=${huge}`,
        OUTPOST_EXECUTOR_ID: executorId,
        // The logs benchmark's baseline is `docker logs -f` on the run's own container.
        OUTPOST_EXECUTOR_ENGINE_LOGS: "json-file",
        ...env,
      },
    });
  } catch (err) {
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
  const clientOptions = tls?.publicGateway ? { ca: readFileSync(tls.certs.ca) } : {};
  const admin = outpostClients(mesh.urls.gateway, adminToken, clientOptions);
  return {
    mesh,
    admin,
    async newTenant(name) {
      const res = await admin.tenants.createTenant({ name, contactEmail: "bench@example.com", tier: Tier.ENTERPRISE });
      return { tenantId: res.tenant!.id, apiKey: res.apiKeyPlaintext, clients: outpostClients(mesh.urls.gateway, res.apiKeyPlaintext, clientOptions) };
    },
    async stop() {
      try {
        await mesh.stop();
        // The executor removes its containers when it stops; one that outlived its shutdown
        // grace (or a run a failing benchmark abandoned) is removed here, and said.
        if (withExecutor) {
          const docker = new Docker();
          const left = await docker.listContainers({ all: true, filters: { label: [`dev.outpost.executor-id=${executorId}`] } });
          for (const c of left) await docker.getContainer(c.Id).remove({ force: true });
          if (left.length) process.stderr.write(`bench: removed ${left.length} container(s) executor ${executorId} left behind\n`);
        }
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    },
  };
}

export interface EchoServer {
  /** HTTP/1.1 base URL. */
  h1: string;
  /** h2c (prior knowledge) base URL. */
  h2: string;
  stop(): Promise<void>;
}

/** Starts bench/lib/echo-server.ts as its own process. */
export async function startEchoServer(): Promise<EchoServer> {
  const child: ChildProcess = spawn(process.execPath, ["--disable-warning=ExperimentalWarning", path.join(REPO_ROOT, "bench/lib/echo-server.ts")], {
    cwd: REPO_ROOT,
    stdio: ["ignore", "pipe", "inherit"],
  });
  const firstLine = await new Promise<string>((resolve, reject) => {
    const lines = createInterface({ input: child.stdout! });
    lines.once("line", resolve);
    child.once("exit", (code) => reject(new Error(`echo server exited with ${code}`)));
  });
  const ports = JSON.parse(firstLine) as { h1: number; h2: number };
  return {
    h1: `http://127.0.0.1:${ports.h1}`,
    h2: `http://127.0.0.1:${ports.h2}`,
    async stop() {
      if (child.exitCode !== null) return;
      const exited = new Promise((resolve) => child.once("exit", resolve));
      child.kill("SIGTERM");
      await exited;
    },
  };
}

/** A process's garbage collections so far, from its Prometheus metrics (prom-client's default GC histogram). */
export interface GcTotals {
  /** Full (mark-compact) collections. */
  full: number;
  /** Main-thread time spent in collections of every kind, ms. */
  pauseMs: number;
}

export async function gcTotals(serviceUrl: string): Promise<GcTotals> {
  const res = await fetch(`${serviceUrl}/metrics`);
  if (!res.ok) throw new Error(`${serviceUrl}/metrics answered ${res.status}`);
  const totals: GcTotals = { full: 0, pauseMs: 0 };
  for (const line of (await res.text()).split("\n")) {
    const sample = /^nodejs_gc_duration_seconds_(count|sum)\{([^}]*)\} (\S+)$/.exec(line);
    if (!sample) continue;
    const [, series, labels, value] = sample;
    if (series === "count" && /\bkind="major"/.test(labels!)) totals.full += Number(value);
    if (series === "sum") totals.pauseMs += Number(value) * 1000;
  }
  return totals;
}
