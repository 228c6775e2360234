import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Dispatch_State, NetworkPolicy, RepositorySchema } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { LeaseSchema, type Lease } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { describe, expect, it, vi } from "vitest";
import { Cancellations } from "../src/core/cancellations.ts";
import { Executor } from "../src/core/executor.ts";
import { HostSetupError, LeaseLostError } from "../src/core/ports.ts";
import { gitFailure } from "../src/adapters/host-workspaces.ts";
import { containerSpecFor, executeRun, FORCE_REMOVE_ATTEMPTS, NOBODY, STOP_ATTEMPTS } from "../src/core/run.ts";
import { FakeLeases, FakeRuntime, FakeSink, FakeWorkspaces, silentLogger, stderr, stdout } from "./fakes.ts";

function lease(extra: { task?: string; timeoutMs?: number; egress?: boolean } = {}): Lease {
  return create(LeaseSchema, {
    leaseId: "01JLEASE00000000000000000A",
    expireTime: timestampFromDate(new Date(Date.now() + 600)),
    logGrant: "log-grant-of-the-lease",
    traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    dispatch: {
      id: "01JDISPATCH000000000000000",
      tenantId: "tenant-a",
      agent: "demo",
      task: extra.task ?? "hello",
      model: "demo-model",
      env: { EXTRA: "1" },
      ...(extra.timeoutMs ? { timeout: durationFromMs(extra.timeoutMs) } : {}),
    },
    agent: {
      name: "demo",
      image: "outpost/demo-agent:latest",
      networkPolicy: extra.egress ? NetworkPolicy.EGRESS : NetworkPolicy.NONE,
      resources: { memoryBytes: 64n * 1024n * 1024n },
    },
  });
}

function deps(runtime: FakeRuntime, leases: FakeLeases, sink: FakeSink, workspaces = new FakeWorkspaces()) {
  return { executorId: "ex-1", runtime, leases, logs: sink, workspaces, logger: silentLogger, stopGraceMs: 1000, logAckWaitMs: 500 };
}

describe("containerSpecFor", () => {
  it("locks the container down and passes the agent contract", () => {
    const spec = containerSpecFor(lease(), "ex-1");
    expect(spec).toMatchObject({
      platform: "linux/arm64",
      user: "65534:65534",
      readonlyRootfs: true,
      capDrop: ["ALL"],
      securityOpt: ["no-new-privileges"],
      networkMode: "none",
      pidsLimit: 256,
      memoryBytes: 64 * 1024 * 1024,
      nanoCpus: 1_000_000_000,
      command: [],
    });
    expect(spec.env).toMatchObject({
      OUTPOST_TASK: "hello",
      OUTPOST_MODEL: "demo-model",
      OUTPOST_DISPATCH_ID: "01JDISPATCH000000000000000",
      OUTPOST_AGENT: "demo",
      OUTPOST_WORKSPACE: "/workspace",
      OUTPOST_RESULT_PATH: "/workspace/.outpost/result.json",
      TRACEPARENT: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
      EXTRA: "1",
    });
    expect(spec.tmpfs).toEqual({ "/tmp": "rw,size=64m" });
    expect(spec.labels).toEqual({
      "dev.outpost.managed": "true",
      "dev.outpost.dispatch-id": "01JDISPATCH000000000000000",
      "dev.outpost.tenant-id": "tenant-a",
      "dev.outpost.executor-id": "ex-1",
      "dev.outpost.lease-id": "01JLEASE00000000000000000A",
    });
    // EGRESS: Outpost's own bridge network, where containers cannot reach each other; never Docker's default "bridge".
    expect(containerSpecFor(lease({ egress: true }), "ex-1").networkMode).toBe("outpost-egress");
    // Under an executor that is not root, its own uid and gid (containerUserFor).
    expect(containerSpecFor(lease(), "ex-1", undefined, {}, { uid: 1000, gid: 1001 }).user).toBe("1000:1001");
  });
});

describe("executeRun", () => {
  it("attaches before start, streams lines in order, reports RUNNING then SUCCEEDED with the last acked seq", async () => {
    const runtime = new FakeRuntime();
    runtime.frames = [stdout("one\ntw"), stderr("warn\n"), stdout("o\ntail")];
    const leases = new FakeLeases();
    const sink = new FakeSink();
    sink.autoAck = true;
    await executeRun(lease(), deps(runtime, leases, sink));
    expect(runtime.events.slice(0, 3)).toEqual(["create", "attach", "start"]);
    expect(runtime.events).toContain("remove");
    expect(sink.allSent.map((l) => [l.seq, l.stream, l.text])).toEqual([
      [1, "stdout", "one"],
      [2, "stderr", "warn"],
      [3, "stdout", "two"],
      [4, "stdout", "tail"],
    ]);
    expect(leases.reports.map((r) => Dispatch_State[r.state])).toEqual(["RUNNING", "SUCCEEDED"]);
    expect(leases.reports[1]).toMatchObject({ exitCode: 0, lastLogSeq: 4 });
  });

  describe("a retried attempt continues the run's output after what telemetry holds", () => {
    const retried = () => {
      const l = lease();
      l.dispatch!.attempt = 2;
      return l;
    };

    it("asks first, numbers its lines after the earlier attempt's and reports the last of them", async () => {
      const runtime = new FakeRuntime();
      runtime.frames = [stdout("again\nmore\n")];
      const leases = new FakeLeases();
      const sink = new FakeSink();
      sink.autoAck = true;
      sink.stored.set("01JDISPATCH000000000000000", 3);
      await executeRun(retried(), deps(runtime, leases, sink));
      expect(sink.connections[0]!.batches[0]).toEqual([]);
      expect(sink.allSent.map((l) => [l.seq, l.text])).toEqual([
        [4, "again"],
        [5, "more"],
      ]);
      expect(leases.reports[1]).toMatchObject({ state: Dispatch_State.SUCCEEDED, lastLogSeq: 5 });
    });

    it("a first attempt does not ask; a retry that finds nothing stored numbers from 1", async () => {
      const sink = new FakeSink();
      sink.autoAck = true;
      const first = new FakeRuntime();
      first.frames = [stdout("first\n")];
      await executeRun(lease(), deps(first, new FakeLeases(), sink));
      expect(sink.connections.map((c) => c.probes)).toEqual([0]);
      const runtime = new FakeRuntime();
      runtime.frames = [stdout("first\n")];
      const fresh = new FakeSink();
      fresh.autoAck = true;
      await executeRun(retried(), deps(runtime, new FakeLeases(), fresh));
      expect(fresh.connections.map((c) => c.probes)).toEqual([1]);
      expect(fresh.allSent.map((l) => l.seq)).toEqual([1]);
    });
  });

  it("reports FAILED with the exit code, or out of memory", async () => {
    const runtime = new FakeRuntime();
    runtime.exitCode = 3;
    const leases = new FakeLeases();
    await executeRun(lease(), deps(runtime, leases, new FakeSink()));
    expect(leases.reports[1]).toMatchObject({ state: Dispatch_State.FAILED, exitCode: 3, failureReason: "agent exited with code 3" });

    const oom = new FakeRuntime();
    oom.exitCode = 137;
    oom.oomKilled = true;
    const leases2 = new FakeLeases();
    await executeRun(lease(), deps(oom, leases2, new FakeSink()));
    expect(leases2.reports[1]).toMatchObject({ state: Dispatch_State.FAILED, failureReason: "out of memory" });
  });

  it("gives a lease whose image is missing back as an infrastructure failure, after trying a pull", async () => {
    const runtime = new FakeRuntime();
    runtime.imageMissing = true;
    const leases = new FakeLeases();
    await executeRun(lease(), { ...deps(runtime, leases, new FakeSink()), pullImages: true });
    expect(runtime.events).toContain("pull:outpost/demo-agent:latest");
    expect(leases.reports).toEqual([]);
    expect(leases.released).toEqual([
      { dispatchId: "01JDISPATCH000000000000000", reason: "image outpost/demo-agent:latest not present on executor host", infrastructureFailure: true, runtimeFailure: true },
    ]);
  });

  it("runs after pulling a missing image when a registry serves it", async () => {
    const runtime = new FakeRuntime();
    runtime.imageMissing = true;
    runtime.pullable.add("outpost/demo-agent:latest");
    const leases = new FakeLeases();
    const sink = new FakeSink();
    sink.autoAck = true;
    await executeRun(lease(), { ...deps(runtime, leases, sink), pullImages: true });
    expect(runtime.events.slice(0, 3)).toEqual(["pull:outpost/demo-agent:latest", "create", "attach"]);
    expect(leases.reports.map((r) => Dispatch_State[r.state])).toEqual(["RUNNING", "SUCCEEDED"]);
  });

  it("reports FAILED naming a missing image when the dispatcher has no ReleaseLease, without RUNNING", async () => {
    const runtime = new FakeRuntime();
    runtime.imageMissing = true;
    const leases = new FakeLeases();
    leases.supportsRelease = false;
    await executeRun(lease(), deps(runtime, leases, new FakeSink()));
    expect(leases.reports).toHaveLength(1);
    expect(leases.reports[0]).toMatchObject({
      state: Dispatch_State.FAILED,
      failureReason: "image outpost/demo-agent:latest not present on executor host",
    });
  });

  it("stops the container and reports CANCELLED when the heartbeat says so", async () => {
    const runtime = new FakeRuntime();
    runtime.runForever = true;
    const leases = new FakeLeases();
    leases.heartbeatAnswer = () => ({ expireTime: new Date(Date.now() + 600), cancelRequested: leases.heartbeats >= 2, logGrant: "" });
    await executeRun(lease(), deps(runtime, leases, new FakeSink()));
    expect(runtime.events).toContain("stop:1000");
    expect(runtime.events[runtime.events.length - 1]).toBe("remove");
    expect(leases.reports.map((r) => Dispatch_State[r.state])).toEqual(["RUNNING", "CANCELLED"]);
  });

  it("writes the output under the lease's log grant, then under each one a heartbeat renews", async () => {
    const runtime = new FakeRuntime();
    runtime.runForever = true;
    runtime.frames = [stdout("first line\n")];
    const leases = new FakeLeases();
    const sink = new FakeSink();
    const seen: string[] = [];
    leases.heartbeatAnswer = () => {
      seen.push(sink.runs[0]?.grant() ?? "no log stream open");
      return { expireTime: new Date(Date.now() + 600), cancelRequested: leases.heartbeats >= 3, logGrant: `renewed-${leases.heartbeats}` };
    };
    await executeRun(lease(), deps(runtime, leases, sink));
    // What the sink would send at each heartbeat: the lease's grant, then the last renewal.
    expect(seen).toEqual(["log-grant-of-the-lease", "renewed-1", "renewed-2"]);
    expect(sink.runs[0]!.grant()).toBe("renewed-3");
  });

  describe("the lease is kept while the run is prepared (a checkout longer than the lease)", () => {
    const withRepo = () => {
      const l = lease();
      l.dispatch!.repo = create(RepositorySchema, { url: "https://example.com/big.git", ref: "main" });
      return l;
    };
    const slowCheckout = () => {
      const workspaces = new FakeWorkspaces();
      workspaces.checkoutDelayMs = 1000; // the lease lasts 600 ms
      return workspaces;
    };

    it("heartbeats through the checkout, so the container starts under a live lease", async () => {
      const runtime = new FakeRuntime();
      const leases = new FakeLeases();
      let heartbeatsBeforeCreate = -1;
      const create = runtime.create.bind(runtime);
      runtime.create = async (spec) => ((heartbeatsBeforeCreate = leases.heartbeats), create(spec));
      await executeRun(withRepo(), deps(runtime, leases, new FakeSink(), slowCheckout()));
      expect(heartbeatsBeforeCreate).toBeGreaterThanOrEqual(3);
      expect(leases.reports.map((r) => Dispatch_State[r.state])).toEqual(["RUNNING", "SUCCEEDED"]);
    });

    it("a cancel that a heartbeat reports during the checkout ends the run CANCELLED without a container", async () => {
      const runtime = new FakeRuntime();
      const leases = new FakeLeases();
      leases.heartbeatAnswer = () => ({ expireTime: new Date(Date.now() + 600), cancelRequested: true, logGrant: "" });
      const workspaces = slowCheckout();
      await executeRun(withRepo(), deps(runtime, leases, new FakeSink(), workspaces));
      expect(runtime.created).toEqual([]);
      expect(leases.reports).toEqual([expect.objectContaining({ state: Dispatch_State.CANCELLED, failureReason: "cancelled before start" })]);
      expect(workspaces.removed).toHaveLength(1);
    });

    it("a cancel stops a checkout that is still running at once, instead of when git is done", async () => {
      const runtime = new FakeRuntime();
      const leases = new FakeLeases();
      leases.heartbeatAnswer = () => ({ expireTime: new Date(Date.now() + 600), cancelRequested: true, logGrant: "" });
      const workspaces = new FakeWorkspaces();
      workspaces.checkoutDelayMs = 20_000; // a repository (or a git server) that takes its time
      const started = Date.now();
      await executeRun(withRepo(), deps(runtime, leases, new FakeSink(), workspaces));
      expect(Date.now() - started).toBeLessThan(5000);
      expect(workspaces.checkoutsStopped).toBe(1);
      expect(runtime.created).toEqual([]);
      expect(leases.reports).toEqual([expect.objectContaining({ state: Dispatch_State.CANCELLED, failureReason: "cancelled before start" })]);
      expect(workspaces.removed).toHaveLength(1);
    }, 10_000);

    it("a cancel streamed by the dispatcher (WatchCancellations) stops a running checkout too", async () => {
      const runtime = new FakeRuntime();
      const leases = new FakeLeases();
      const workspaces = new FakeWorkspaces();
      workspaces.checkoutDelayMs = 20_000;
      const cancellations = new Cancellations();
      const l = withRepo();
      setTimeout(() => cancellations.notify(l.dispatch!.id, l.leaseId), 100);
      const started = Date.now();
      await executeRun(l, { ...deps(runtime, leases, new FakeSink(), workspaces), cancellations });
      expect(Date.now() - started).toBeLessThan(5000);
      expect(workspaces.checkoutsStopped).toBe(1);
      expect(runtime.created).toEqual([]);
      expect(leases.reports).toEqual([expect.objectContaining({ state: Dispatch_State.CANCELLED, failureReason: "cancelled before start" })]);
    }, 10_000);

    it("a lost lease stops a running checkout at once, with no report (the run is its new holder's)", async () => {
      const runtime = new FakeRuntime();
      const leases = new FakeLeases();
      leases.heartbeatAnswer = () => Promise.reject(new LeaseLostError("lease 01J... is no longer held"));
      const workspaces = new FakeWorkspaces();
      workspaces.checkoutDelayMs = 20_000;
      const started = Date.now();
      await executeRun(withRepo(), deps(runtime, leases, new FakeSink(), workspaces));
      expect(Date.now() - started).toBeLessThan(5000);
      expect(workspaces.checkoutsStopped).toBe(1);
      expect(runtime.created).toEqual([]);
      expect(leases.reports).toEqual([]);
      expect(workspaces.removed).toHaveLength(1);
    }, 10_000);

    it("a checkout that fills the workspace past its disk quota is stopped then, FAILED with the quota", async () => {
      const runtime = new FakeRuntime();
      const leases = new FakeLeases();
      const workspaces = new FakeWorkspaces();
      workspaces.checkoutDelayMs = 20_000; // e.g. a server streaming a pack without end
      workspaces.usage = [10, 20, 5000];
      const started = Date.now();
      await executeRun(withRepo(), {
        ...deps(runtime, leases, new FakeSink(), workspaces),
        workspaceQuota: { limitBytes: 1000, checkIntervalMs: 50 },
      });
      expect(Date.now() - started).toBeLessThan(5000);
      expect(workspaces.checkoutsStopped).toBe(1);
      expect(workspaces.measurements.length).toBeGreaterThanOrEqual(3);
      expect(runtime.created).toEqual([]);
      expect(leases.reports).toEqual([
        expect.objectContaining({
          state: Dispatch_State.FAILED,
          failureReason: "repository checkout failed: workspace exceeded its disk quota of 1000 bytes (5000 bytes or more in use)",
        }),
      ]);
      expect(workspaces.removed).toHaveLength(1);
    }, 10_000);

    it("the tenant sees the checkout's fixed reason; git's own words (the cause) do not reach the dispatch", async () => {
      const runtime = new FakeRuntime();
      const leases = new FakeLeases();
      const workspaces = new FakeWorkspaces();
      workspaces.checkoutError = gitFailure(
        "fetch",
        "fatal: unable to access 'http://169.254.169.254/latest/meta-data/': Failed to connect to 169.254.169.254 port 80 after 3 ms: Couldn't connect to server\n",
      );
      await executeRun(withRepo(), deps(runtime, leases, new FakeSink(), workspaces));
      expect(leases.reports).toEqual([
        expect.objectContaining({ state: Dispatch_State.FAILED, failureReason: "repository checkout failed: could not connect to the repository's server" }),
      ]);
      expect(JSON.stringify(leases.reports)).not.toContain("169.254");
    });

    it("a failure handing the checked-out tree over (a filesystem error naming host paths) reaches the tenant as a fixed reason", async () => {
      const runtime = new FakeRuntime();
      const leases = new FakeLeases();
      const workspaces = new FakeWorkspaces();
      workspaces.checkoutError = Object.assign(new Error("ENAMETOOLONG: name too long, chmod '/var/lib/outpost/data/runs/outpost-01jd/workspace/aaaa'"), { code: "ENAMETOOLONG" });
      await executeRun(withRepo(), deps(runtime, leases, new FakeSink(), workspaces));
      expect(leases.reports).toEqual([
        expect.objectContaining({ state: Dispatch_State.FAILED, failureReason: "repository checkout failed: the checked-out tree could not be handed to the agent" }),
      ]);
      expect(JSON.stringify(leases.reports)).not.toContain("/var/lib");
    });

    it("a lease lost during the checkout ends the run here without a container or a report", async () => {
      const runtime = new FakeRuntime();
      const leases = new FakeLeases();
      leases.heartbeatAnswer = () => Promise.reject(new LeaseLostError("lease 01J... is no longer held"));
      const workspaces = slowCheckout();
      await executeRun(withRepo(), deps(runtime, leases, new FakeSink(), workspaces));
      expect(runtime.created).toEqual([]);
      expect(leases.reports).toEqual([]);
      expect(workspaces.removed).toHaveLength(1);
    });
  });

  it("a run whose EGRESS network the host cannot provide goes back to the queue, not counted against the agent, and the tenant is not shown the operator's detail", async () => {
    const runtime = new FakeRuntime();
    runtime.create = () => Promise.reject(new HostSetupError("network outpost-egress: exists but is not a bridge with enable_icc=false; remove it (docker network rm outpost-egress)"));
    const leases = new FakeLeases();
    await executeRun(lease(), deps(runtime, leases, new FakeSink()));
    expect(leases.released).toEqual([
      expect.objectContaining({ reason: "the executor could not prepare the run's network", infrastructureFailure: true, runtimeFailure: false }),
    ]);
    expect(leases.reports).toEqual([]);
  });

  it("a result the dispatcher refuses as too large is reported as a FAILED run without it, not retried into 'executor lost'", async () => {
    const runtime = new FakeRuntime();
    const leases = new FakeLeases();
    leases.refuseResults = true;
    const workspaces = new FakeWorkspaces();
    workspaces.result = JSON.stringify({ zeros: [0, 0, 0] });
    await executeRun(lease(), deps(runtime, leases, new FakeSink(), workspaces));
    expect(leases.reports.map((r) => [Dispatch_State[r.state], r.result === undefined])).toEqual([
      ["RUNNING", true],
      ["SUCCEEDED", false],
      ["FAILED", true],
    ]);
    expect(leases.reports[2]!.failureReason).toBe("the result could not be reported: message size 5767144 is larger than configured readMaxBytes 4194304");
  });

  it("stops the container at the timeout and reports TIMED_OUT", async () => {
    const runtime = new FakeRuntime();
    runtime.runForever = true;
    const leases = new FakeLeases();
    await executeRun(lease({ timeoutMs: 300 }), deps(runtime, leases, new FakeSink()));
    expect(leases.reports[1]).toMatchObject({ state: Dispatch_State.TIMED_OUT, failureReason: "timed out after 0.3s" });
  });

  describe("a container the engine will not stop", () => {
    /** Records when the run saw its container exit, among the runtime's events. */
    const watchExit = (runtime: FakeRuntime) => {
      const wait = runtime.wait.bind(runtime);
      runtime.wait = async (id) => {
        const exit = await wait(id);
        runtime.events.push("wait-returned");
        return exit;
      };
    };
    const count = (events: string[], event: string) => events.filter((e) => e === event).length;

    it("retries the stop, then force-removes the container, so a run past its timeout still ends TIMED_OUT", async () => {
      const runtime = new FakeRuntime();
      runtime.runForever = true;
      runtime.stopFailures = Infinity; // every stop answers 500
      watchExit(runtime);
      const leases = new FakeLeases();
      const started = Date.now();
      await executeRun(lease({ timeoutMs: 200 }), deps(runtime, leases, new FakeSink()));
      // Backoff 250 ms doubling up to 4 s, with jitter: three stops and one removal take under 2 s.
      expect(Date.now() - started).toBeLessThan(10_000);
      const untilExit = runtime.events.slice(0, runtime.events.indexOf("wait-returned"));
      expect(count(untilExit, "stop:1000")).toBe(STOP_ATTEMPTS);
      // The removal is what ended it (SIGKILL), after the last stop and before the run saw the exit.
      expect(untilExit.slice(-2)).toEqual(["remove", "exited:137"]);
      expect(untilExit.indexOf("remove")).toBeGreaterThan(untilExit.lastIndexOf("stop:1000"));
      expect(leases.reports.map((r) => Dispatch_State[r.state])).toEqual(["RUNNING", "TIMED_OUT"]);
      expect(leases.reports[1]).toMatchObject({ exitCode: 137, failureReason: "timed out after 0.2s" });
    }, 15_000);

    it("a container force-removed while its RUNNING report is slow still ends CANCELLED (its exit was waited on from the start)", async () => {
      const runtime = new FakeRuntime();
      runtime.runForever = true;
      runtime.stopFailures = Infinity;
      // The engine answers a wait begun after the container was removed with 404.
      const wait = runtime.wait.bind(runtime);
      runtime.wait = (id) => (runtime.events.includes("remove") ? Promise.reject(new Error("(HTTP code 404) no such container - No such container: c1")) : wait(id));
      const leases = new FakeLeases();
      const report = leases.report.bind(leases);
      leases.report = async (r) => {
        if (r.state === Dispatch_State.RUNNING) await new Promise((resolve) => setTimeout(resolve, 3000));
        return report(r);
      };
      const cancellations = new Cancellations();
      const l = lease();
      // Streamed once the container runs, while its RUNNING report is still on its way.
      setTimeout(() => cancellations.notify(l.dispatch!.id, l.leaseId), 200);
      await executeRun(l, { ...deps(runtime, leases, new FakeSink()), cancellations });
      expect(runtime.events).toContain("remove");
      expect(leases.reports.map((r) => Dispatch_State[r.state])).toEqual(["RUNNING", "CANCELLED"]);
      expect(leases.reports[1]).toMatchObject({ exitCode: 137, failureReason: "cancelled" });
    }, 15_000);

    it("retries a failed force-removal too", async () => {
      const runtime = new FakeRuntime();
      runtime.runForever = true;
      runtime.stopFailures = Infinity;
      runtime.removeFailures = 1;
      watchExit(runtime);
      const leases = new FakeLeases();
      leases.heartbeatAnswer = () => ({ expireTime: new Date(Date.now() + 600), cancelRequested: true, logGrant: "" });
      await executeRun(lease(), deps(runtime, leases, new FakeSink()));
      const untilExit = runtime.events.slice(0, runtime.events.indexOf("wait-returned"));
      expect(count(untilExit, "stop:1000")).toBe(STOP_ATTEMPTS);
      expect(count(untilExit, "remove")).toBe(2);
      expect(untilExit.at(-1)).toBe("exited:137");
      expect(leases.reports.map((r) => Dispatch_State[r.state])).toEqual(["RUNNING", "CANCELLED"]);
      expect(FORCE_REMOVE_ATTEMPTS).toBeGreaterThan(1);
    }, 15_000);

    it("a stop that fails once and then works ends the container with its grace, never force-removed", async () => {
      const runtime = new FakeRuntime();
      runtime.runForever = true;
      runtime.stopFailures = 1;
      watchExit(runtime);
      const leases = new FakeLeases();
      await executeRun(lease({ timeoutMs: 200 }), deps(runtime, leases, new FakeSink()));
      const untilExit = runtime.events.slice(0, runtime.events.indexOf("wait-returned"));
      expect(untilExit.filter((e) => e.startsWith("stop") || e === "remove" || e.startsWith("exited"))).toEqual(["stop:1000", "stop:1000", "exited:143"]);
      expect(leases.reports[1]).toMatchObject({ state: Dispatch_State.TIMED_OUT, exitCode: 143 });
    }, 15_000);

    it("gives up retrying once the container exited on its own", async () => {
      const runtime = new FakeRuntime();
      runtime.runForever = true;
      runtime.stopFailures = Infinity;
      watchExit(runtime);
      const stop = runtime.stop.bind(runtime);
      runtime.stop = async (id, graceMs) => {
        // The agent ends by itself while its first stop is refused.
        setTimeout(() => runtime.finish(0), 20);
        return stop(id, graceMs);
      };
      const leases = new FakeLeases();
      // executeRun waits for the stop it began, so a retry would be in the events by now.
      await executeRun(lease({ timeoutMs: 200 }), deps(runtime, leases, new FakeSink()));
      expect(count(runtime.events, "stop:1000")).toBe(1);
      // Removed once, after the exit, as every finished container is.
      expect(runtime.events.slice(runtime.events.indexOf("wait-returned"))).toContain("remove");
      expect(runtime.events.slice(0, runtime.events.indexOf("wait-returned"))).not.toContain("remove");
      expect(leases.reports[1]).toMatchObject({ state: Dispatch_State.TIMED_OUT, exitCode: 0 });
    }, 15_000);
  });

  it("stops without reporting when the lease is lost", async () => {
    const runtime = new FakeRuntime();
    runtime.runForever = true;
    const leases = new FakeLeases();
    leases.heartbeatAnswer = () => {
      throw new LeaseLostError("lease expired");
    };
    await executeRun(lease(), deps(runtime, leases, new FakeSink()));
    expect(runtime.events).toContain("stop:1000");
    expect(runtime.events).toContain("remove");
    expect(leases.reports.map((r) => Dispatch_State[r.state])).toEqual(["RUNNING"]);
  });
});

describe("Executor", () => {
  it("leases nothing and reports not ready while the engine is unreachable", async () => {
    const runtime = new FakeRuntime();
    runtime.pingError = new Error("connect ENOENT /var/run/docker.sock");
    const leases = new FakeLeases();
    const executor = new Executor({
      executorId: "ex-1",
      containerUser: NOBODY,
      slots: 2,
      runtime,
      leases,
      logs: new FakeSink(),
      workspaces: new FakeWorkspaces(),
      logger: silentLogger,
      stopGraceMs: 1000,
      leaseWaitMs: 50,
      minPollIntervalMs: 10,
    });
    void executor.start();
    await new Promise((r) => setTimeout(r, 100));
    expect(leases.acquired).toBe(0);
    expect(await executor.notReadyReason()).toMatch(/docker engine unreachable: connect ENOENT/);
    runtime.pingError = undefined;
    expect(await executor.notReadyReason()).toBeNull();
    await executor.shutdown(1000);
  });

  it("a run taken up after a restart holds its slot: nothing is leased on it until that run ends", async () => {
    const runtime = new FakeRuntime();
    runtime.runForever = true;
    await runtime.start(); // the left-over container, started before the restart
    runtime.list = async () => [
      {
        id: "c1",
        name: "outpost-left",
        running: true,
        started: true,
        labels: { "dev.outpost.dispatch-id": "01JDISPATCH000000000000000", "dev.outpost.lease-id": "01JLEASE00000000000000000A", "dev.outpost.run-dir": "outpost-left" },
      },
    ];
    const leases = new FakeLeases();
    const left = lease();
    left.dispatch!.state = Dispatch_State.RUNNING;
    leases.held = [left];
    leases.acquire = async () => {
      leases.acquired++;
      await new Promise((r) => setTimeout(r, 20));
      return undefined;
    };
    const sink = new FakeSink();
    sink.autoAck = true;
    const executor = new Executor({
      executorId: "ex-1", slots: 1, runtime, leases, logs: sink, workspaces: new FakeWorkspaces(), logger: silentLogger,
      containerUser: NOBODY,
      stopGraceMs: 1000, leaseWaitMs: 50, minPollIntervalMs: 10,
    });
    await executor.start();
    expect(executor.busySlots).toBe(1);
    await new Promise((r) => setTimeout(r, 300));
    expect(leases.acquired).toBe(0);
    expect(leases.reports.map((r) => Dispatch_State[r.state])).toEqual(["RUNNING"]);
    runtime.finish(0);
    await vi.waitFor(() => expect(leases.acquired).toBeGreaterThan(0));
    expect(leases.reports.map((r) => Dispatch_State[r.state])).toEqual(["RUNNING", "SUCCEEDED"]);
    await executor.shutdown(1000);
  });

  it("on shutdown stops leasing and gives a running container the grace period, then leaves it", async () => {
    const runtime = new FakeRuntime();
    runtime.runForever = true;
    const leases = new FakeLeases();
    let handedOut = false;
    leases.acquire = async () => {
      leases.acquired++;
      if (handedOut) return undefined;
      handedOut = true;
      return lease();
    };
    const executor = new Executor({
      executorId: "ex-1", slots: 1, runtime, leases, logs: new FakeSink(), workspaces: new FakeWorkspaces(), logger: silentLogger,
      containerUser: NOBODY,
      stopGraceMs: 1000, leaseWaitMs: 50, minPollIntervalMs: 10,
    });
    void executor.start();
    await vi.waitFor(() => expect(executor.busySlots).toBe(1));
    const started = Date.now();
    await executor.shutdown(200);
    expect(Date.now() - started).toBeGreaterThanOrEqual(150);
    expect(runtime.events).not.toContain("remove"); // left for reconciliation
    const acquiredAtShutdown = leases.acquired;
    await new Promise((r) => setTimeout(r, 50));
    expect(leases.acquired).toBe(acquiredAtShutdown);
  });
});
