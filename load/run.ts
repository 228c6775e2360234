/**
 * `npm run load -- --profile smoke [--duration 20s] [--clients N] [--creates-per-minute N] [--json out.json]`
 * `  [--warmup 5s] [--call-timeout 10s] [--max-error-rate 1] [--settle 120s] [--executor-slots 2] [--keep-data]`
 *
 * Starts the full mesh on loopback (its own data directory, its own executor id, executor slots
 * bounded), provisions tenants (one per two clients, so per-tenant rate limits model real
 * tenants), runs the profile's mix through the gateway, then settles every created run and
 * prints, per method, requests, error rate and latencies, the final states of the runs, and each
 * process's memory (VmRSS) at start and end. The load generator is one IP standing in for many
 * users, so the per-IP limit is raised. Exits 1 when the run failed (verdict.ts): an error rate
 * above --max-error-rate, no run created, runs that had to be cancelled or did not succeed.
 */
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import Docker from "dockerode";
import { outpostClients } from "@outpost/cli";
import { Tier } from "@outpost/proto/outpost/tenant/v1/tenant_pb.js";
import { exitWithMesh, SERVICES, startMesh, type Mesh, type ServiceName } from "../scripts/lib/mesh.ts";
import { parseDuration, PROFILES } from "./profiles.ts";
import { formatSummary, MethodStats, rssKiB, SUMMARY_NOTE, table } from "./stats.ts";
import { DEFAULT_MAX_ERROR_RATE, RUN_KIND_LABEL, runStatesByKind, verdict } from "./verdict.ts";
import { DEFAULT_CALL_TIMEOUT_MS, runWorkload, settle, type LoadTenant } from "./workload.ts";

/** The executor labels every container it creates with its id (services/executor/src/core/run.ts). */
const EXECUTOR_ID_LABEL = "dev.outpost.executor-id";

const say = (line: string) => process.stderr.write(`load: ${line}\n`);
const usage = (message: string): never => {
  say(message);
  process.exit(2);
};

const { values } = parseArgs({
  options: {
    profile: { type: "string", default: "smoke" },
    duration: { type: "string" },
    clients: { type: "string" },
    "creates-per-minute": { type: "string" },
    "executor-slots": { type: "string", default: "2" },
    warmup: { type: "string" },
    "call-timeout": { type: "string" },
    "max-error-rate": { type: "string" },
    settle: { type: "string" },
    json: { type: "string" },
    "keep-data": { type: "boolean", default: false },
  },
});

const base = PROFILES[values.profile ?? "smoke"] ?? usage(`unknown profile "${values.profile}"; known: ${Object.keys(PROFILES).join(", ")}`);
const positive = (name: string, text: string | undefined, fallback: number) => {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isFinite(n) || n < 0) usage(`--${name} must be a non-negative number`);
  return n;
};
const duration = (name: string, text: string | undefined, fallback: number) => {
  if (text === undefined) return fallback;
  try {
    return parseDuration(text);
  } catch (err) {
    return usage(`--${name}: ${(err as Error).message}`);
  }
};
const durationMs = duration("duration", values.duration, base.durationMs);
if (durationMs <= 0) usage("--duration must be above zero");
// Calls of the first part of the run are made but not measured: 10 % of the run, at most 10 s.
const warmupMs = duration("warmup", values.warmup, Math.min(10_000, Math.round(durationMs / 10)));
if (warmupMs >= durationMs) usage(`--warmup (${warmupMs} ms) must be shorter than the run (${durationMs} ms)`);
const callTimeoutMs = duration("call-timeout", values["call-timeout"], DEFAULT_CALL_TIMEOUT_MS);
if (callTimeoutMs <= 0) usage("--call-timeout must be above zero");
// After the load, created runs get this long to end; those still open at half of it are cancelled.
const settleMs = duration("settle", values.settle, 120_000);
/** --max-error-rate is a percentage ("1" or "1%"). */
const maxErrorRate = (() => {
  const text = values["max-error-rate"];
  if (text === undefined) return DEFAULT_MAX_ERROR_RATE;
  const n = Number(text.trim().replace(/%$/, ""));
  if (!Number.isFinite(n) || n < 0 || n > 100) usage("--max-error-rate must be a percentage from 0 to 100 (e.g. 1 or 0.5%)");
  return n / 100;
})();
const profile = {
  ...base,
  durationMs,
  clients: Math.max(1, Math.floor(positive("clients", values.clients, base.clients))),
  createsPerMinute: positive("creates-per-minute", values["creates-per-minute"], base.createsPerMinute),
};

// Its own executor id: an executor at start-up settles and removes the containers labelled with
// its id, so the default (the host name, as `npm start` uses) would take a development mesh's
// running and warm containers on this machine with it. Containers left with this id are removed
// at the end.
const executorId = `load-${randomBytes(6).toString("hex")}`;
let mesh: Mesh | undefined = undefined;
let dir: string | undefined = undefined;

async function removeLeftContainers(): Promise<void> {
  try {
    const docker = new Docker();
    const left = await docker.listContainers({ all: true, filters: { label: [`${EXECUTOR_ID_LABEL}=${executorId}`] } });
    await Promise.all(left.map((c) => docker.getContainer(c.Id).remove({ force: true }).catch(() => undefined)));
    if (left.length) say(`removed ${left.length} container(s) executor ${executorId} left behind`);
  } catch {
    // no engine: nothing was started
  }
}

// Before anything can fail: Ctrl-C, SIGTERM or an error anywhere stops the mesh, removes the
// containers this run started and its data directory, then exits (1 on an error).
const shutdown = exitWithMesh(
  async () => {
    try {
      // The executor stops its runs within its shutdown grace (5 s here) and removes them.
      await mesh?.stop({ timeoutMs: 30_000 });
      await removeLeftContainers();
    } finally {
      if (dir && values["keep-data"]) say(`data and logs kept in ${dir}`);
      else if (dir) rmSync(dir, { recursive: true, force: true });
    }
  },
  { say },
);

try {
  await new Docker().ping();
} catch {
  say("warning: the Docker engine is not reachable; created runs will stay queued (see scripts/setup-docker.sh)");
}

dir = mkdtempSync(path.join(os.tmpdir(), "outpost-load-"));
const adminToken = randomBytes(32).toString("hex");
mesh = await startMesh({
  dataDir: path.join(dir, "data"),
  logDir: path.join(dir, "logs"),
  adminToken,
  env: {
    OUTPOST_LOG_LEVEL: "warn",
    OUTPOST_EXECUTOR_ID: executorId,
    OUTPOST_EXECUTOR_SLOTS: values["executor-slots"] ?? "2",
    OUTPOST_EXECUTOR_SHUTDOWN_GRACE_MS: "5000",
    OUTPOST_RATE_LIMITS_PER_IP: "create=100000,trigger=100000,read=10000000",
  },
  // The executor starts after the seed dispatches are cancelled, so seeding runs no container.
  only: SERVICES.filter((s) => s !== "executor"),
});

let exitCode = 0;
try {
  const running = mesh;
  const admin = outpostClients(running.urls.gateway, adminToken);
  const tenants: LoadTenant[] = [];
  const tenantCount = Math.ceil(profile.clients / 2);
  for (let i = 0; i < tenantCount; i++) {
    const res = await admin.tenants.createTenant({ name: `Load tenant ${i + 1}`, contactEmail: `load${i + 1}@example.com`, tier: Tier.PRO });
    const clients = outpostClients(running.urls.gateway, res.apiKeyPlaintext);
    // Every tenant has something to read from the first call on: one dispatch, cancelled while queued.
    const { dispatch } = await clients.dispatches.createDispatch({ agent: "demo", task: "load seed", labels: { source: "load-seed" } });
    await clients.dispatches.cancelDispatch({ dispatchId: dispatch!.id });
    tenants.push({ tenantId: res.tenant!.id, clients, ids: [dispatch!.id] });
  }
  await running.start("executor");

  const memory = (): Record<ServiceName, number | undefined> =>
    Object.fromEntries(SERVICES.map((s) => [s, rssKiB(running.processes.get(s)?.pid)])) as Record<ServiceName, number | undefined>;
  const memoryStart = memory();
  // Resident memory alone cannot tell a leak from a heap that has not been collected yet: the
  // V8 heap in use (from each process's /metrics) is sampled along the run as well.
  const heapMiB = async (s: ServiceName): Promise<number | undefined> => {
    try {
      const text = await (await fetch(`${running.urls[s]}/metrics`, { signal: AbortSignal.timeout(5000) })).text();
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
    `profile ${profile.name}: ${profile.clients} clients, ${tenantCount} tenants, ${(profile.durationMs / 1000).toFixed(0)} s ` +
      `(the first ${(warmupMs / 1000).toFixed(1)} s not measured), ${profile.createsPerMinute} creates/min, think ${profile.thinkMs} ms, ` +
      `call deadline ${callTimeoutMs} ms, executor ${executorId}`,
  );
  const stats = new MethodStats({ callTimeoutMs });
  const started = Date.now();
  await sample();
  const sampler = setInterval(() => void sample(), Math.max(5_000, profile.durationMs / 6));
  const outcome = await runWorkload({ ...profile, tenants, stats, warmupMs, callTimeoutMs });
  clearInterval(sampler);
  const elapsedS = (Date.now() - started) / 1000;
  const memoryEnd = memory();
  await sample();
  say(`load done in ${elapsedS.toFixed(1)} s; settling ${outcome.created.length} created runs`);
  const settled = await settle(outcome.created, settleMs, settleMs / 2, callTimeoutMs);
  const open = settled.open;
  const runs = runStatesByKind(outcome.created, settled);

  const summary = stats.summary();
  const total = summary.reduce((n, r) => n + r.requests, 0);
  const errors = summary.reduce((n, r) => n + r.errors, 0);
  const unmeasured = stats.unmeasured();
  // Requests per second over the measured window only: calls started in it, divided by its length
  // (not by the run's whole time, which includes the warm-up and the last calls' overrun).
  const measuredS = (outcome.measuredUntil - outcome.measuredFrom) / 1000;
  const ratePerS = measuredS > 0 ? total / measuredS : 0;
  const failures = verdict({
    calls: total + unmeasured.requests,
    errors: errors + unmeasured.errors,
    maxErrorRate,
    createsExpected: profile.createsPerMinute > 0,
    created: outcome.created.length,
    runs,
    open: open.length,
  });
  const stateColumns = ["SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED"];
  const out = [
    `# load profile ${profile.name}: ${profile.clients} clients over ${tenantCount} tenants for ${(profile.durationMs / 1000).toFixed(1)} s ` +
      `(measured: ${measuredS.toFixed(1)} s after a ${(warmupMs / 1000).toFixed(1)} s warm-up; the last calls ended at ${elapsedS.toFixed(1)} s)`,
    `requests ${total}, errors ${errors} (${total ? ((errors / total) * 100).toFixed(2) : "0.00"}%), ${ratePerS.toFixed(1)} req/s ` +
      `(calls started in the measured window)`,
    `not measured (warm-up, after the end): ${unmeasured.requests} calls, ${unmeasured.errors} errors` +
      (unmeasured.errors ? ` (${Object.entries(unmeasured.errorCodes).map(([c, n]) => `${c}=${n}`).join(" ")})` : ""),
    "",
    formatSummary(summary),
    "",
    SUMMARY_NOTE,
    "",
    `dispatches: created ${outcome.created.length} of ${outcome.createAttempts} attempted, cancelled by the creator ${outcome.cancelled}, ` +
      `cancelled by settling ${settled.cancelledBySettling.length}, not terminal after settling ${open.length}; log subscriptions idle ${outcome.idleSubscriptions}`,
    "",
    table(
      ["runs", "created", ...stateColumns, "not terminal", "cancelled by settling"],
      runs.map((r) => [
        RUN_KIND_LABEL[r.kind],
        String(r.created),
        ...stateColumns.map((s) => String(r.states[s] ?? 0)),
        String(Object.entries(r.states).filter(([s]) => !stateColumns.includes(s)).reduce((n, [, c]) => n + c, 0)),
        String(r.cancelledBySettling),
      ]),
    ),
    "",
    table(
      ["process", "pid", "VmRSS start MiB", "VmRSS end MiB"],
      SERVICES.map((s) => [s, String(running.processes.get(s)?.pid ?? "-"), mib(memoryStart[s]), mib(memoryEnd[s])]),
    ),
    "",
    "VmRSS / V8 heap in use, MiB, along the run:",
    "",
    table(
      ["process", ...samples.map((m) => `t=${m.atS}s`)],
      SERVICES.map((s) => [s, ...samples.map((m) => `${mib(m.rss[s])} / ${m.heap[s] === undefined ? "-" : m.heap[s].toFixed(1)}`)]),
    ),
    "",
    failures.length ? `result: FAILED\n${failures.map((f) => `- ${f}`).join("\n")}` : "result: passed",
  ];
  process.stdout.write(`${out.join("\n")}\n`);
  if (values.json) {
    writeFileSync(
      values.json,
      `${JSON.stringify(
        {
          profile,
          tenants: tenantCount,
          executorId,
          warmupMs,
          callTimeoutMs,
          maxErrorRate,
          elapsedS,
          measuredS,
          ratePerS,
          total,
          errors,
          unmeasured,
          methods: summary,
          createAttempts: outcome.createAttempts,
          created: outcome.created.length,
          cancelled: outcome.cancelled,
          cancelledBySettling: settled.cancelledBySettling,
          openAfterSettling: open,
          runs,
          passed: failures.length === 0,
          failures,
          memoryStart,
          memoryEnd,
          memorySamples: samples,
        },
        null,
        2,
      )}\n`,
    );
  }
  if (failures.length) {
    for (const f of failures) say(`failed: ${f}`);
    exitCode = 1;
  }
} catch (err) {
  say(`failed: ${(err as Error).stack ?? String(err)}`);
  exitCode = 1;
}
await shutdown(exitCode);

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
