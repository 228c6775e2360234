/**
 * `npm run load -- --profile smoke [--duration 20s] [--clients N] [--creates-per-minute N] [--json out.json]`
 *
 * Starts the full mesh on loopback (its own data directory, executor slots bounded), provisions
 * tenants (one per two clients, so per-tenant rate limits model real tenants), runs the
 * profile's mix through the gateway, then settles every created run and prints, per method,
 * requests, error rate and p50/p95/p99, and each process's memory (VmRSS) at start and end.
 * The load generator is one IP standing in for many users, so the per-IP limit is raised.
 */
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import Docker from "dockerode";
import { outpostClients } from "@outpost/cli";
import { Tier } from "@outpost/proto/outpost/tenant/v1/tenant_pb.js";
import { SERVICES, startMesh, type ServiceName } from "../scripts/lib/mesh.ts";
import { parseDuration, PROFILES } from "./profiles.ts";
import { formatSummary, MethodStats, rssKiB, table } from "./stats.ts";
import { runWorkload, settle, type LoadTenant } from "./workload.ts";

const { values } = parseArgs({
  options: {
    profile: { type: "string", default: "smoke" },
    duration: { type: "string" },
    clients: { type: "string" },
    "creates-per-minute": { type: "string" },
    "executor-slots": { type: "string", default: "2" },
    json: { type: "string" },
    "keep-data": { type: "boolean", default: false },
  },
});

const base = PROFILES[values.profile ?? "smoke"];
if (!base) {
  process.stderr.write(`load: unknown profile "${values.profile}"; known: ${Object.keys(PROFILES).join(", ")}\n`);
  process.exit(2);
}
const positive = (name: string, text: string | undefined, fallback: number) => {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isFinite(n) || n < 0) {
    process.stderr.write(`load: --${name} must be a non-negative number\n`);
    process.exit(2);
  }
  return n;
};
let durationMs = base.durationMs;
try {
  if (values.duration) durationMs = parseDuration(values.duration);
} catch (err) {
  process.stderr.write(`load: --duration: ${(err as Error).message}\n`);
  process.exit(2);
}
const profile = {
  ...base,
  durationMs,
  clients: Math.max(1, Math.floor(positive("clients", values.clients, base.clients))),
  createsPerMinute: positive("creates-per-minute", values["creates-per-minute"], base.createsPerMinute),
};
const say = (line: string) => process.stderr.write(`load: ${line}\n`);

try {
  await new Docker().ping();
} catch {
  say("warning: the Docker engine is not reachable; created runs will stay queued (see scripts/setup-docker.sh)");
}

const dir = mkdtempSync(path.join(os.tmpdir(), "outpost-load-"));
const adminToken = randomBytes(32).toString("hex");
const mesh = await startMesh({
  dataDir: path.join(dir, "data"),
  logDir: path.join(dir, "logs"),
  adminToken,
  env: {
    OUTPOST_LOG_LEVEL: "warn",
    OUTPOST_EXECUTOR_SLOTS: values["executor-slots"] ?? "2",
    OUTPOST_EXECUTOR_SHUTDOWN_GRACE_MS: "5000",
    OUTPOST_RATE_LIMITS_PER_IP: "create=100000,trigger=100000,read=10000000",
  },
  // The executor starts after the seed dispatches are cancelled, so seeding runs no container.
  only: SERVICES.filter((s) => s !== "executor"),
});

let exitCode = 0;
try {
  const admin = outpostClients(mesh.urls.gateway, adminToken);
  const tenants: LoadTenant[] = [];
  const tenantCount = Math.ceil(profile.clients / 2);
  for (let i = 0; i < tenantCount; i++) {
    const res = await admin.tenants.createTenant({ name: `Load tenant ${i + 1}`, contactEmail: `load${i + 1}@example.com`, tier: Tier.PRO });
    const clients = outpostClients(mesh.urls.gateway, res.apiKeyPlaintext);
    // Every tenant has something to read from the first call on: one dispatch, cancelled while queued.
    const { dispatch } = await clients.dispatches.createDispatch({ agent: "demo", task: "load seed", labels: { source: "load-seed" } });
    await clients.dispatches.cancelDispatch({ dispatchId: dispatch!.id });
    tenants.push({ tenantId: res.tenant!.id, clients, ids: [dispatch!.id] });
  }
  await mesh.start("executor");

  const memory = (): Record<ServiceName, number | undefined> =>
    Object.fromEntries(SERVICES.map((s) => [s, rssKiB(mesh.processes.get(s)?.pid)])) as Record<ServiceName, number | undefined>;
  const memoryStart = memory();
  // Resident memory alone cannot tell a leak from a heap that has not been collected yet: the
  // V8 heap in use (from each process's /metrics) is sampled along the run as well.
  const heapMiB = async (s: ServiceName): Promise<number | undefined> => {
    try {
      const text = await (await fetch(`${mesh.urls[s]}/metrics`, { signal: AbortSignal.timeout(5000) })).text();
      const m = /^nodejs_heap_size_used_bytes(?:\{[^}]*\})? (\S+)/m.exec(text);
      return m ? Number(m[1]) / 1048576 : undefined;
    } catch {
      return undefined;
    }
  };
  const samples: MemorySample[] = [];
  const sample = async () => {
    const rss = memory();
    const heap = Object.fromEntries(await Promise.all(SERVICES.map(async (s) => [s, await heapMiB(s)]))) as Record<ServiceName, number | undefined>;
    const atS = Math.round((Date.now() - started) / 1000);
    if (samples.at(-1)?.atS === atS) samples.pop(); // the last periodic one coincides with the end
    samples.push({ atS, rss, heap });
  };
  say(
    `profile ${profile.name}: ${profile.clients} clients, ${tenantCount} tenants, ${(profile.durationMs / 1000).toFixed(0)} s, ` +
      `${profile.createsPerMinute} creates/min, think ${profile.thinkMs} ms`,
  );
  const stats = new MethodStats();
  const started = Date.now();
  await sample();
  const sampler = setInterval(() => void sample(), Math.max(5_000, profile.durationMs / 6));
  const outcome = await runWorkload({ ...profile, tenants, stats });
  clearInterval(sampler);
  const elapsedS = (Date.now() - started) / 1000;
  const memoryEnd = memory();
  await sample();
  say(`load done in ${elapsedS.toFixed(1)} s; settling ${outcome.created.length} created runs`);
  const open = await settle(outcome.created, 120_000, 60_000);

  const summary = stats.summary();
  const total = summary.reduce((n, r) => n + r.requests, 0);
  const errors = summary.reduce((n, r) => n + r.errors, 0);
  const out = [
    `# load profile ${profile.name}: ${profile.clients} clients over ${tenantCount} tenants for ${elapsedS.toFixed(1)} s`,
    `requests ${total}, errors ${errors} (${total ? ((errors / total) * 100).toFixed(2) : "0.00"}%), ${(total / elapsedS).toFixed(1)} req/s`,
    "",
    formatSummary(summary),
    "",
    `dispatches: created ${outcome.created.length}, cancelled ${outcome.cancelled}, not terminal after settling ${open.length}; ` +
      `log subscriptions idle ${outcome.idleSubscriptions}`,
    "",
    table(
      ["process", "pid", "VmRSS start MiB", "VmRSS end MiB"],
      SERVICES.map((s) => [s, String(mesh.processes.get(s)?.pid ?? "-"), mib(memoryStart[s]), mib(memoryEnd[s])]),
    ),
    "",
    "VmRSS / V8 heap in use, MiB, along the run:",
    "",
    table(
      ["process", ...samples.map((m) => `t=${m.atS}s`)],
      SERVICES.map((s) => [s, ...samples.map((m) => `${mib(m.rss[s])} / ${m.heap[s] === undefined ? "-" : m.heap[s].toFixed(1)}`)]),
    ),
  ];
  process.stdout.write(`${out.join("\n")}\n`);
  if (values.json) {
    writeFileSync(
      values.json,
      `${JSON.stringify({ profile, tenants: tenantCount, elapsedS, total, errors, methods: summary, created: outcome.created.length, cancelled: outcome.cancelled, openAfterSettling: open, memoryStart, memoryEnd, memorySamples: samples }, null, 2)}\n`,
    );
  }
  if (open.length) exitCode = 1;
} catch (err) {
  say(`failed: ${(err as Error).stack ?? String(err)}`);
  exitCode = 1;
} finally {
  await mesh.stop();
  if (values["keep-data"]) say(`data and logs kept in ${dir}`);
  else rmSync(dir, { recursive: true, force: true });
}
process.exit(exitCode);

interface MemorySample {
  atS: number;
  /** VmRSS in KiB. */
  rss: Record<ServiceName, number | undefined>;
  /** V8 heap in use in MiB. */
  heap: Record<ServiceName, number | undefined>;
}

function mib(kib: number | undefined): string {
  return kib === undefined ? "-" : (kib / 1024).toFixed(1);
}
