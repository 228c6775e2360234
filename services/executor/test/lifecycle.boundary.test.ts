/**
 * The executor's life around its runs, on the real engine: reconciliation after kill -9
 * (SPEC E5), an unreachable engine (E6), the slot limit (D7) and warm containers (E4).
 */
import fs from "node:fs";
import type { RunningServer } from "@outpost/platform";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import {
  buildDemoAgent,
  demoLease,
  docker,
  dockerUp,
  removeContainersOf,
  spawnExecutor,
  startStub,
  StubDispatcher,
  StubTelemetry,
  StubTenant,
  TERMINAL,
  until,
  type ExecutorProcess,
} from "./boundary-harness.ts";

const engineAvailable = dockerUp();
const PREFIX = `test-life-${process.pid}`;

describe.skipIf(!engineAvailable)("executor lifecycle against Docker", () => {
  const dispatcher = new StubDispatcher();
  const telemetry = new StubTelemetry();
  const tenant = new StubTenant();
  const servers: RunningServer[] = [];
  const executors: ExecutorProcess[] = [];
  const ids: string[] = [];

  const start = (id: string, env: Record<string, string> = {}, dataDir?: string) => {
    ids.push(id);
    const executor = spawnExecutor(
      { OUTPOST_EXECUTOR_ID: id, OUTPOST_DISPATCHER_URL: servers[0]!.url, OUTPOST_TELEMETRY_URL: servers[1]!.url, OUTPOST_TENANT_URL: servers[2]!.url, ...env },
      dataDir,
    );
    executors.push(executor);
    return executor;
  };
  const labelled = (id: string) => docker("ps", "-aq", "--filter", `label=dev.outpost.executor-id=${id}`);
  const terminal = (dispatchId: string, executor: ExecutorProcess, timeoutMs = 45_000) =>
    until(
      () => `terminal report of ${dispatchId}\n${executor.output().slice(-3000)}`,
      () => dispatcher.reportsFor(dispatchId).find((r) => TERMINAL.has(r.state)),
      timeoutMs,
    );

  beforeAll(async () => {
    buildDemoAgent();
    servers.push(await startStub("stub-dispatcher", dispatcher.routes), await startStub("stub-telemetry", telemetry.routes), await startStub("stub-tenant", tenant.routes));
  });

  // A test that failed part-way must not leave its executor leasing the next test's work.
  afterEach(async () => {
    for (const executor of executors) await executor.kill9();
  });

  afterAll(async () => {
    for (const executor of executors) await executor.kill9();
    for (const server of servers) await server.close();
    for (const id of ids) removeContainersOf(id);
    for (const executor of executors) fs.rmSync(executor.dataDir, { recursive: true, force: true });
  });

  it("after kill -9 mid-run, the restarted executor takes up the run still going, settles the one that ended, and leaves no labelled container", async () => {
    const id = `${PREFIX}-crash`;
    const first = start(id);
    await first.port();
    // It names a secret: taken up, it is redacted with the value its container holds, which the
    // executor reads back from the engine (the tenant's value is rotated meanwhile).
    tenant.secrets.set("tenant-boundary", { ADOPT_TOKEN: "adopt-token-first-value" });
    const running = demoLease({ task: "long lines=2 print=ADOPT_TOKEN sleep=4", executorId: id, secretNames: ["ADOPT_TOKEN"] });
    const finishing = demoLease({ task: "short sleep=1", executorId: id });
    dispatcher.enqueue(running);
    dispatcher.enqueue(finishing);
    for (const l of [running, finishing]) {
      await until("RUNNING", () => dispatcher.reportsFor(l.dispatch!.id).some((r) => r.state === Dispatch_State.RUNNING));
    }
    await until("the long run's first lines", () => telemetry.textsFor(running.dispatch!.id).includes("line 2"));
    await first.kill9();
    tenant.secrets.set("tenant-boundary", { ADOPT_TOKEN: "adopt-token-rotated-since" });
    // The agent carries on without its executor; the short one exits meanwhile.
    expect(labelled(id).split("\n")).toHaveLength(2);
    await until("the short run's container to exit", () =>
      docker("ps", "-q", "--filter", `label=dev.outpost.dispatch-id=${finishing.dispatch!.id}`) === "",
    );

    // Restarted within the lease's life (the stub's leases do not expire): the long run is taken
    // up again and ends by its own exit and result, its log going on after a line that says so.
    const second = start(id, {}, first.dataDir);
    const adopted = await terminal(running.dispatch!.id, second);
    expect(adopted).toMatchObject({ state: Dispatch_State.SUCCEEDED, exitCode: 0, result: { agent: "demo", exit_code: 0, lines: 2 } });
    const chunks = telemetry.chunksFor(running.dispatch!.id);
    expect(chunks.map((c) => Number(c.seq))).toEqual(chunks.map((_, i) => i + 1));
    const texts = chunks.map((c) => c.text);
    expect(texts).toContain("ADOPT_TOKEN=[REDACTED:ADOPT_TOKEN]");
    expect(texts.join("\n")).not.toContain("adopt-token-");
    const notice = texts.findIndex((text) => text.startsWith("[outpost] the executor watching this run restarted"));
    expect(notice).toBeGreaterThan(texts.indexOf("line 2"));
    expect(texts.indexOf("done, exit code 0")).toBeGreaterThan(notice);
    expect(Number(adopted.lastLogSeq)).toBe(chunks.length);
    expect(dispatcher.reportsFor(running.dispatch!.id).map((r) => Dispatch_State[r.state])).toEqual(["RUNNING", "RUNNING", "SUCCEEDED"]);
    // The one that exited while nobody watched is settled by its real exit and result.
    const done = await terminal(finishing.dispatch!.id, second);
    expect(done).toMatchObject({ state: Dispatch_State.SUCCEEDED, exitCode: 0, result: { agent: "demo", exit_code: 0, lines: 0 } });
    expect(labelled(id)).toBe("");
    // The summary is logged after the settling reports, so wait for it (bounded).
    await until("the reconciliation summary", () => /reconciled left-overs of earlier runs/.test(second.output()));
    expect(second.output()).toMatch(/"runsAdopted":1/);
    await until("run directories removed", () => fs.readdirSync(`${first.dataDir}/executor/${id}/runs`).length === 0);
    expect(await second.stop()).toBe(0);
  });

  /** An executor `id` that is killed (-9) while a long run of it is RUNNING. */
  async function killedMidRun(id: string) {
    const first = start(id);
    await first.port();
    const lease = demoLease({ task: "long sleep=60", executorId: id });
    dispatcher.enqueue(lease);
    await until("RUNNING", () => dispatcher.reportsFor(lease.dispatch!.id).some((r) => r.state === Dispatch_State.RUNNING));
    await first.kill9();
    return { first, lease };
  }

  it("a run whose lease the dispatcher gave up meanwhile is stopped on restart, not taken up", async () => {
    const id = `${PREFIX}-gone`;
    const { first, lease: running } = await killedMidRun(id);
    dispatcher.leases.delete(running.leaseId); // its lease expired while no executor heartbeated
    const second = start(id, {}, first.dataDir);
    await until("the container to go", () => labelled(id) === "");
    await until("the reconciliation summary", () => /reconciled left-overs of earlier runs/.test(second.output()));
    expect(second.output()).toMatch(/"runsAdopted":0/);
    expect(await second.stop()).toBe(0);
  });

  it("settles from labels alone when the dispatcher has no ListExecutorLeases", async () => {
    const id = `${PREFIX}-nolist`;
    const { first, lease } = await killedMidRun(id);
    dispatcher.contractC = false;
    try {
      const second = start(id, {}, first.dataDir);
      const end = await terminal(lease.dispatch!.id, second);
      expect(end.failureReason).toBe("executor lost: it restarted while the run was in progress");
      expect(labelled(id)).toBe("");
      expect(await second.stop()).toBe(0);
    } finally {
      dispatcher.contractC = true;
    }
  });

  it("with the engine unreachable it leases nothing, is not ready, and says why in its logs", async () => {
    const id = `${PREFIX}-noengine`;
    const executor = start(id, { DOCKER_HOST: "unix:///nonexistent/outpost-docker.sock" });
    const port = await executor.port();
    const ready = await fetch(`http://127.0.0.1:${port}/readyz`);
    expect(ready.status).toBe(503);
    expect(await ready.text()).toMatch(/docker engine unreachable/);
    const live = await fetch(`http://127.0.0.1:${port}/healthz`);
    expect(live.status).toBe(200);
    await until("the log line", () => /not leasing: container engine unavailable/.test(executor.output()), 10_000);
    expect(executor.output()).toMatch(/outpost-docker\.sock/);
    await new Promise((r) => setTimeout(r, 1500));
    expect(dispatcher.callers).not.toContain(id);
    expect(await executor.stop()).toBe(0);
  });

  it("never runs more containers than its slots (2 slots, 5 queued runs)", async () => {
    const id = `${PREFIX}-slots`;
    const leases = Array.from({ length: 5 }, (_, i) => demoLease({ task: `run ${i} sleep=3`, executorId: id }));
    for (const l of leases) dispatcher.enqueue(l);
    const executor = start(id, { OUTPOST_EXECUTOR_SLOTS: "2" });
    let most = 0;
    const samples: number[] = [];
    await until(
      () => `all five to finish\n${executor.output().slice(-2000)}`,
      () => {
        const running = docker("ps", "-q", "--filter", `label=dev.outpost.executor-id=${id}`);
        const count = running ? running.split("\n").length : 0;
        samples.push(count);
        most = Math.max(most, count);
        return leases.every((l) => dispatcher.reportsFor(l.dispatch!.id).some((r) => TERMINAL.has(r.state)));
      },
      120_000,
    );
    expect(most).toBe(2);
    expect(samples.every((n) => n <= 2)).toBe(true);
    for (const l of leases) expect(dispatcher.reportsFor(l.dispatch!.id).at(-1)!.state).toBe(Dispatch_State.SUCCEEDED);
    const busy = dispatcher.capacities.filter((c) => c.slotsTotal === 2).map((c) => c.slotsBusy);
    expect(Math.max(...busy)).toBeLessThanOrEqual(2);
    expect(await executor.stop()).toBe(0);
  });

  it("keeps warm containers and starts a run in one, with the run's own environment", async () => {
    const id = `${PREFIX}-warm`;
    const executor = start(id, { OUTPOST_WARM_POOL: "demo=1" });
    await executor.port();
    const first = demoLease({ task: "first lines=1", executorId: id });
    dispatcher.enqueue(first);
    await terminal(first.dispatch!.id, executor);
    const warmId = await until("a warm container", () => docker("ps", "-q", "--filter", `label=dev.outpost.warm-agent=demo`, "--filter", `label=dev.outpost.executor-id=${id}`) || false);
    const warmInfo = JSON.parse(docker("inspect", warmId))[0];
    expect(warmInfo.HostConfig).toMatchObject({ ReadonlyRootfs: true, CapDrop: ["ALL"], NetworkMode: "none", PidsLimit: 256 });
    expect(warmInfo.Config.User).toBe("65534:65534");

    const second = demoLease({ task: "second print=OUTPOST_DISPATCH_ID lines=2", executorId: id });
    dispatcher.enqueue(second);
    const end = await terminal(second.dispatch!.id, executor);
    expect(end).toMatchObject({ state: Dispatch_State.SUCCEEDED, result: { agent: "demo", exit_code: 0, lines: 2 } });
    const texts = telemetry.textsFor(second.dispatch!.id);
    expect(texts).toContain(`OUTPOST_DISPATCH_ID=${second.dispatch!.id}`);
    expect(texts).toContain("task: second print=OUTPOST_DISPATCH_ID lines=2");
    expect(texts).toContain("aarch64");
    expect(executor.output()).toMatch(new RegExp(`"dispatchId":"${second.dispatch!.id}"[^\\n]*"warm":true[^\\n]*container started`));
    // The pool refills, and shutting down removes the idle ones.
    await until("the pool to refill", () => docker("ps", "-q", "--filter", `label=dev.outpost.warm-agent=demo`, "--filter", `label=dev.outpost.executor-id=${id}`) !== warmId && docker("ps", "-q", "--filter", `label=dev.outpost.warm-agent=demo`, "--filter", `label=dev.outpost.executor-id=${id}`) !== "");
    expect(await executor.stop()).toBe(0);
    expect(labelled(id)).toBe("");
  });
});
