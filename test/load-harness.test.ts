/**
 * The load harness (load/run.ts) on a short run, as CI runs it: the full mesh on loopback,
 * five clients for ten seconds with the realistic mix, two creates of the demo agent (one
 * cancelled). Asserts the harness reports what it promises and that the mesh served the mix
 * without errors, settled every run and reported each process's memory — not any figure; that
 * it leaves other executors' containers alone and removes its own; and that a run whose work
 * could not run exits 1. Then its parts without a mesh: what a request is, the measured
 * window, deadlines, settling and the verdict.
 */
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import Docker from "dockerode";
import { Code, ConnectError } from "@connectrpc/connect";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import type { OutpostClients } from "@outpost/cli";
import { READ_MIX } from "../load/profiles.ts";
import { formatSummary, MethodStats, type MethodSummary } from "../load/stats.ts";
import { runStatesByKind, verdict, type RunKindStates } from "../load/verdict.ts";
import { runWorkload, settle, type CreatedRun, type LoadTenant } from "../load/workload.ts";
import { REPO_ROOT, SERVICES } from "../scripts/lib/mesh.ts";

interface Report {
  profile: { name: string; clients: number; durationMs: number };
  executorId: string;
  warmupMs: number;
  measuredS: number;
  ratePerS: number;
  total: number;
  errors: number;
  methods: MethodSummary[];
  created: number;
  cancelled: number;
  cancelledBySettling: string[];
  openAfterSettling: string[];
  runs: RunKindStates[];
  passed: boolean;
  failures: string[];
  memoryStart: Record<string, number>;
  memoryEnd: Record<string, number>;
}

const DEMO_IMAGE = "outpost/demo-agent:latest";

function runLoad(args: string[], env: NodeJS.ProcessEnv = process.env) {
  return new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
    const child = spawn(process.execPath, ["--disable-warning=ExperimentalWarning", "load/run.ts", ...args], { cwd: REPO_ROOT, env });
    let out = "";
    let err = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr.on("data", (d: Buffer) => (err += d.toString()));
    child.on("exit", (c) => resolve({ code: c, stdout: out, stderr: err }));
  });
}

describe("npm run load (short smoke run)", () => {
  const docker = new Docker();
  let decoy: Docker.Container | undefined;
  afterEach(async () => {
    await decoy?.remove({ force: true }).catch(() => undefined);
    decoy = undefined;
  });

  it("drives the mix through the gateway and reports per-method figures, settled runs and memory", { timeout: 180_000 }, async () => {
    await docker.ping(); // CI runs the engine; created runs need it to finish
    // What a development mesh (`npm start`: executor id = host name) keeps on this machine: an
    // executor starting with that id would remove it as its own leftover.
    decoy = await docker.createContainer({
      Image: DEMO_IMAGE,
      name: `outpost-load-decoy-${process.pid}`,
      Labels: { "dev.outpost.managed": "true", "dev.outpost.executor-id": os.hostname() },
    });
    const dir = mkdtempSync(path.join(os.tmpdir(), "outpost-load-test-"));
    const json = path.join(dir, "load.json");
    const { code, stdout, stderr } = await runLoad(["--profile", "smoke", "--duration", "10s", "--clients", "5", "--creates-per-minute", "12", "--json", json]);
    expect(code, stderr).toBe(0);
    expect(stdout).toMatch(
      /^\| method +\| requests \| errors \| error rate \| ok p50 ms \| +ok p95 ms \| +ok p99 ms \| failed p50 ms \| failed max ms \| idle \| error codes \|$/m,
    );
    expect(stdout).toMatch(/^\| runs +\| created \| SUCCEEDED \| FAILED \| TIMED_OUT \| CANCELLED \| not terminal \| cancelled by settling \|$/m);
    expect(stdout).toMatch(/^\| process +\| +pid \| VmRSS start MiB \| VmRSS end MiB \|$/m);
    expect(stdout).toMatch(/^result: passed$/m);

    const report = JSON.parse(readFileSync(json, "utf8")) as Report;
    rmSync(dir, { recursive: true, force: true });
    expect(report.profile).toMatchObject({ name: "smoke", clients: 5, durationMs: 10_000 });
    const methods = new Map(report.methods.map((m) => [m.method, m]));
    for (const method of [...READ_MIX.map((m) => m.method), "CreateDispatch", "CancelDispatch"]) {
      expect(methods.get(method)?.requests, method).toBeGreaterThan(0);
    }
    // Five clients over three tenants stay well inside every limit: any error is a real fault.
    expect(report.methods.filter((m) => m.errors > 0)).toEqual([]);
    expect(report.errors).toBe(0);
    expect(report.passed).toBe(true);
    expect(report.total).toBe(report.methods.reduce((n, m) => n + m.requests, 0));
    // The rate is over the measured window (the run after its warm-up), not the run's overrun.
    expect(report.warmupMs).toBe(1000);
    expect(report.measuredS).toBeCloseTo(9, 0);
    expect(report.ratePerS).toBeCloseTo(report.total / report.measuredS, 5);
    for (const m of report.methods.filter((m) => m.okSamples > 0)) {
      expect(m.p50Ms).toBeGreaterThan(0);
      expect(m.p99Ms).toBeGreaterThanOrEqual(m.p95Ms);
      expect(m.p95Ms).toBeGreaterThanOrEqual(m.p50Ms);
    }
    expect(report.created).toBe(2);
    expect(report.cancelled).toBe(1);
    expect(report.openAfterSettling).toEqual([]);
    expect(report.cancelledBySettling).toEqual([]);
    expect(report.runs).toEqual([
      { kind: "run", created: 1, states: { SUCCEEDED: 1 }, cancelledBySettling: 0 },
      { kind: "cancel", created: 1, states: { CANCELLED: 1 }, cancelledBySettling: 0 },
    ]);
    for (const service of SERVICES) {
      expect(report.memoryStart[service], service).toBeGreaterThan(10 * 1024);
      expect(report.memoryEnd[service], service).toBeGreaterThan(10 * 1024);
    }
    // Its executor had an id of its own: the decoy is still there, and nothing of its own is.
    expect(report.executorId).toMatch(/^load-[0-9a-f]{12}$/);
    expect((await decoy.inspect()).Id).toBe(decoy.id);
    expect(await docker.listContainers({ all: true, filters: { label: [`dev.outpost.executor-id=${report.executorId}`] } })).toEqual([]);
  });

  it("exits 1 when the created runs could not run (no Docker engine) and had to be cancelled", { timeout: 120_000 }, async () => {
    const home = mkdtempSync(path.join(os.tmpdir(), "outpost-load-nodocker-"));
    const json = path.join(home, "load.json");
    const { code, stdout, stderr } = await runLoad(
      ["--duration", "2s", "--clients", "1", "--creates-per-minute", "30", "--settle", "4s", "--json", json],
      { ...process.env, DOCKER_HOST: `unix://${path.join(home, "no-docker.sock")}` },
    );
    const report = JSON.parse(readFileSync(json, "utf8")) as Report;
    rmSync(home, { recursive: true, force: true });
    expect(code, stderr).toBe(1);
    expect(stdout).toMatch(/^result: FAILED$/m);
    expect(stderr).toMatch(/1 run\(s\) had not ended when settling gave up waiting and were cancelled/);
    expect(report.passed).toBe(false);
    expect(report.cancelledBySettling).toHaveLength(1);
    expect(report.runs[0]).toEqual({ kind: "run", created: 1, states: { CANCELLED: 1 }, cancelledBySettling: 1 });
  });
});

/** A tenant whose clients are the given fakes (only what the workload calls). */
function fakeTenant(clients: { dispatches?: object; agents?: object; logs?: object }, ids = ["d1"]): LoadTenant {
  return { tenantId: "t1", ids, clients: clients as unknown as OutpostClients };
}

const never = () => new Promise<never>(() => undefined);

describe("load workload and statistics", () => {
  it("counts a subscription once: an error when it fails after its first message, idle ones as requests", async () => {
    let n = 0;
    const stats = new MethodStats();
    const tenant = fakeTenant({
      logs: {
        // Alternately: one message then a failure; nothing until the reader leaves.
        async *subscribeLogs(_req: unknown, opts: { signal: AbortSignal }) {
          if (n++ % 2 === 0) {
            yield { chunk: {} };
            await new Promise((resolve) => setTimeout(resolve, 30));
            throw new ConnectError("upstream went away", Code.Unavailable);
          }
          await new Promise((_, reject) => opts.signal.addEventListener("abort", () => reject(new ConnectError("left", Code.Canceled))));
        },
      },
    });
    const outcome = await runWorkload({ tenants: [tenant], clients: 1, durationMs: 400, thinkMs: 1, createsPerMinute: 0, stats, subscribeForMs: 50 });
    const calls = n;
    const [row] = stats.summary().filter((r) => r.method === "SubscribeLogs");
    expect(calls).toBeGreaterThan(2);
    // Every subscription is one request: failed ones once, idle ones too.
    expect(row!.requests).toBe(calls);
    expect(row!.errors).toBe(Math.ceil(calls / 2));
    expect(row!.idle).toBe(Math.floor(calls / 2));
    expect(outcome.idleSubscriptions).toBe(Math.floor(calls / 2));
    expect(row!.okSamples).toBe(0);
    expect(row!.errorCodes).toEqual({ Unavailable: Math.ceil(calls / 2) });
    // The failures' latency is reported: until the failure, after the first message.
    expect(row!.failedMaxMs).toBeGreaterThanOrEqual(25);
  }, 10_000);

  it("ends a call that never answers at its deadline, counted as DeadlineExceeded, and the run still ends", async () => {
    const stats = new MethodStats({ callTimeoutMs: 200 });
    const tenant = fakeTenant({
      dispatches: { getDispatch: never, listDispatches: never, createDispatch: never, cancelDispatch: never },
      agents: { listAgents: never },
      logs: { getLogs: never, subscribeLogs: () => ({ [Symbol.asyncIterator]: () => ({ next: never }) }) },
    });
    const started = Date.now();
    await runWorkload({ tenants: [tenant], clients: 2, durationMs: 300, thinkMs: 1, createsPerMinute: 60, stats, subscribeForMs: 50, callTimeoutMs: 200 });
    // A stream that ignores being left ends at its follow time plus the deadline.
    expect(Date.now() - started).toBeLessThan(3_000);
    const rows = stats.summary();
    expect(rows.length).toBeGreaterThan(1);
    for (const r of rows) {
      expect(r.errors, r.method).toBe(r.requests);
      expect(Object.keys(r.errorCodes), r.method).toEqual(["DeadlineExceeded"]);
      expect(r.failedMaxMs, r.method).toBeGreaterThanOrEqual(190);
    }
    expect(rows.find((r) => r.method === "CreateDispatch")?.requests).toBe(1);
  }, 10_000);

  it("measures only calls started after the warm-up and before the nominal end", () => {
    const stats = new MethodStats();
    const now = Date.now();
    stats.setMeasuredWindow(now, now + 1000);
    stats.record("GetDispatch", 5, now - 10); // warm-up
    stats.fail("GetDispatch", new ConnectError("x", Code.Unavailable), 5, now - 10); // warm-up
    stats.record("GetDispatch", 7, now + 10);
    stats.fail("GetDispatch", new ConnectError("x", Code.Internal), 40, now + 20);
    stats.recordIdle("SubscribeLogs", now + 30);
    stats.record("GetDispatch", 9, now + 1000); // after the end
    const rows = stats.summary();
    expect(rows.map((r) => [r.method, r.requests, r.errors])).toEqual([
      ["GetDispatch", 2, 1],
      ["SubscribeLogs", 1, 0],
    ]);
    expect(rows[0]).toMatchObject({ p50Ms: 7, failedP50Ms: 40, failedMaxMs: 40, errorCodes: { Internal: 1 } });
    expect(stats.unmeasured()).toEqual({ requests: 3, errors: 1, errorCodes: { Unavailable: 1 } });
  });

  it("labels a tail over too few samples as the maximum it is", () => {
    const stats = new MethodStats();
    for (const ms of [1, 2, 3]) stats.record("ListAgents", ms);
    for (let i = 1; i <= 100; i++) stats.record("GetDispatch", i);
    const rows = stats.summary();
    expect(rows.find((r) => r.method === "ListAgents")).toMatchObject({ p95Ms: 3, p95Label: "max of 3", p99Label: "max of 3" });
    expect(rows.find((r) => r.method === "GetDispatch")).toMatchObject({ p95Ms: 95, p99Ms: 99, p95Label: "p95", p99Label: "p99" });
    const text = formatSummary(rows);
    expect(text).toMatch(/\| ListAgents +\| +3 \| .*\| 3\.0 \(max of 3\) \| 3\.0 \(max of 3\) \|/);
    expect(text).toMatch(/\| GetDispatch +\| +100 \| .*\| +95\.0 \| +99\.0 \|/);
  });

  it("settles runs: cancels those still open halfway and says which, with a deadline on every call", async () => {
    const state = new Map<string, Dispatch_State>([
      ["queued", Dispatch_State.QUEUED],
      ["done", Dispatch_State.SUCCEEDED],
    ]);
    const tenant = fakeTenant({
      dispatches: {
        // The "stuck" run's reads never answer: each round still ends at the deadline.
        getDispatch: async ({ dispatchId }: { dispatchId: string }) => (dispatchId === "stuck" ? never() : { dispatch: { state: state.get(dispatchId) } }),
        cancelDispatch: async ({ dispatchId }: { dispatchId: string }) => {
          state.set(dispatchId, Dispatch_State.CANCELLED);
          return {};
        },
      },
    });
    const created: CreatedRun[] = [
      { tenant, id: "queued", kind: "run" },
      { tenant, id: "done", kind: "cancel" },
      { tenant, id: "stuck", kind: "run" },
    ];
    const started = Date.now();
    const settled = await settle(created, 2_000, 500, 100);
    expect(Date.now() - started).toBeLessThan(4_000);
    expect(settled.cancelledBySettling.sort()).toEqual(["queued", "stuck"]);
    expect(settled.open).toEqual(["stuck"]);
    expect(runStatesByKind(created, settled)).toEqual([
      { kind: "run", created: 2, states: { CANCELLED: 1, UNSPECIFIED: 1 }, cancelledBySettling: 2 },
      { kind: "cancel", created: 1, states: { SUCCEEDED: 1 }, cancelledBySettling: 0 },
    ]);
  }, 10_000);

  it("fails a run with too many errors, no run created, runs cancelled by settling or left-to-run runs that failed", () => {
    const good: RunKindStates[] = [
      { kind: "run", created: 2, states: { SUCCEEDED: 2 }, cancelledBySettling: 0 },
      { kind: "cancel", created: 2, states: { CANCELLED: 1, SUCCEEDED: 1 }, cancelledBySettling: 0 },
    ];
    const base = { calls: 1000, errors: 10, maxErrorRate: 0.01, createsExpected: true, created: 4, runs: good, open: 0 };
    expect(verdict(base)).toEqual([]);
    expect(verdict({ ...base, errors: 11 })).toEqual([expect.stringMatching(/^error rate 1\.10% \(11 of 1000 calls\) is above --max-error-rate 1\.00%/)]);
    expect(verdict({ ...base, errors: 1000 })).toHaveLength(1);
    expect(verdict({ ...base, calls: 0, errors: 0 })).toEqual(["no call was made"]);
    expect(verdict({ ...base, created: 0, runs: [] })).toEqual(["no run was created"]);
    expect(verdict({ ...base, createsExpected: false, created: 0, runs: [] })).toEqual([]);
    expect(verdict({ ...base, runs: [{ kind: "run", created: 2, states: { CANCELLED: 2 }, cancelledBySettling: 2 }] })).toEqual([
      expect.stringMatching(/^2 run\(s\) had not ended when settling gave up waiting and were cancelled/),
    ]);
    expect(verdict({ ...base, runs: [{ kind: "run", created: 2, states: { SUCCEEDED: 1, FAILED: 1 }, cancelledBySettling: 0 }] })).toEqual([
      "1 run(s) left to run did not succeed (SUCCEEDED=1 FAILED=1)",
    ]);
    expect(verdict({ ...base, open: 1 })).toEqual(["1 run(s) were not in a terminal state after settling"]);
  });
});
