/** Secrets, results, checkout, warm containers and reconciliation in the executor core, with fakes. */
import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Dispatch_State, NetworkPolicy } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { LeaseSchema, type Lease } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { describe, expect, it, vi } from "vitest";
import { CheckoutError, NotSupportedError, SecretsError, type ContainerSummary, type SecretResolver } from "../src/core/ports.ts";
import { EXECUTOR_LOST, reconcile, RESULT_WITHHELD, RESULT_WITHHELD_NO_LEASE } from "../src/core/reconcile.ts";
import { adoptionNotice, adoptRun, executeRun, startScript } from "../src/core/run.ts";
import { Redactor } from "../src/core/redactor.ts";
import { parseWarmPool, WarmPool } from "../src/core/warm-pool.ts";
import { FakeLeases, FakeRuntime, FakeSink, FakeWorkspaces, silentLogger, stdout } from "./fakes.ts";

function lease(extra: { secretNames?: string[]; schema?: string; repo?: { url: string; ref: string }; id?: string } = {}): Lease {
  return create(LeaseSchema, {
    leaseId: "01JLEASE00000000000000000A",
    expireTime: timestampFromDate(new Date(Date.now() + 600)),
    dispatch: {
      id: extra.id ?? "01JDISPATCH000000000000000",
      tenantId: "tenant-a",
      agent: "demo",
      task: "hello",
      model: "demo-model",
      secretNames: extra.secretNames ?? [],
      ...(extra.repo ? { repo: extra.repo } : {}),
    },
    secretGrant: extra.secretNames ? "grant-of-the-lease" : "",
    agent: { name: "demo", image: "outpost/demo-agent:latest", networkPolicy: NetworkPolicy.NONE, outputSchema: extra.schema ?? "" },
  });
}

function setup() {
  const runtime = new FakeRuntime();
  const leases = new FakeLeases();
  const sink = new FakeSink();
  sink.autoAck = true;
  const workspaces = new FakeWorkspaces();
  const deps = { executorId: "ex-1", runtime, leases, logs: sink, workspaces, logger: silentLogger, stopGraceMs: 1000, logAckWaitMs: 500 };
  return { runtime, leases, sink, workspaces, deps };
}

const resolver = (values: Record<string, string> | Error): SecretResolver & { calls: string[][]; grants: string[] } => {
  const calls: string[][] = [];
  const grants: string[] = [];
  return {
    calls,
    grants,
    async resolve(_tenant, names, grant) {
      calls.push(names);
      grants.push(grant);
      if (values instanceof Error) throw values;
      return Object.fromEntries(names.map((n) => [n, values[n]!]));
    },
  };
};

describe("secrets", () => {
  it("injects resolved secrets as env vars and redacts their values from shipped lines", async () => {
    const { runtime, sink, deps } = setup();
    runtime.frames = [stdout("token is tok-4242-xyz\nand the other: pa"), stdout("ssw0rd!\n")];
    const secrets = resolver({ API_TOKEN: "tok-4242-xyz", DB_PASS: "passw0rd!" });
    await executeRun(lease({ secretNames: ["API_TOKEN", "DB_PASS"] }), { ...deps, secrets });
    expect(secrets.calls).toEqual([["API_TOKEN", "DB_PASS"]]);
    // With the lease's grant, which the tenant service checks.
    expect(secrets.grants).toEqual(["grant-of-the-lease"]);
    expect(runtime.created[0]!.env).toMatchObject({ API_TOKEN: "tok-4242-xyz", DB_PASS: "passw0rd!" });
    expect(sink.allSent.map((l) => l.text)).toEqual(["token is [REDACTED:API_TOKEN]", "and the other: [REDACTED:DB_PASS]"]);
  });

  it("fails the run naming a missing secret, and gives it back when the tenant service is unreachable", async () => {
    const a = setup();
    await executeRun(lease({ secretNames: ["NOPE"] }), { ...a.deps, secrets: resolver(new SecretsError("secret NOPE not found", false)) });
    expect(a.leases.reports).toEqual([expect.objectContaining({ state: Dispatch_State.FAILED, failureReason: "secret NOPE not found" })]);
    expect(a.runtime.created).toEqual([]);

    const b = setup();
    await executeRun(lease({ secretNames: ["X_KEY"] }), { ...b.deps, secrets: resolver(new SecretsError("tenant service answered UNAVAILABLE", true)) });
    expect(b.leases.reports).toEqual([]);
    expect(b.leases.released).toEqual([expect.objectContaining({ infrastructureFailure: true, runtimeFailure: false, reason: "tenant service answered UNAVAILABLE" })]);
  });
});

describe("result", () => {
  const schema = JSON.stringify({ type: "object", required: ["summary"], properties: { summary: { type: "string" } } });

  it("returns a valid result on the SUCCEEDED report", async () => {
    const { leases, workspaces, deps } = setup();
    workspaces.result = '{"summary":"fixed it"}';
    await executeRun(lease({ schema }), deps);
    expect(leases.reports[1]).toMatchObject({ state: Dispatch_State.SUCCEEDED, result: { summary: "fixed it" } });
    expect(workspaces.removed).toEqual(["/runs/outpost-01jdispatch000000000000000-0000000a"]);
  });

  it("fails an exit-0 run whose result does not match, naming what did not", async () => {
    const { leases, workspaces, deps } = setup();
    workspaces.result = '{"summary":42}';
    await executeRun(lease({ schema }), deps);
    expect(leases.reports[1]).toMatchObject({
      state: Dispatch_State.FAILED,
      exitCode: 0,
      failureReason: "the result does not match the output schema: /summary must be string",
    });
  });

  it("succeeds without a result when the agent has no schema; fails without one when it has", async () => {
    const a = setup();
    await executeRun(lease(), a.deps);
    expect(a.leases.reports[1]).toMatchObject({ state: Dispatch_State.SUCCEEDED });
    expect(a.leases.reports[1]!.result).toBeUndefined();
    const b = setup();
    await executeRun(lease({ schema }), b.deps);
    expect(b.leases.reports[1]).toMatchObject({ state: Dispatch_State.FAILED, failureReason: "the agent wrote no result (its output schema requires one)" });
  });

  it("redacts secret values inside the result", async () => {
    const { leases, workspaces, deps } = setup();
    workspaces.result = '{"note":"used key-9999-abc","n":1}';
    await executeRun(lease({ secretNames: ["K"] }), { ...deps, secrets: resolver({ K: "key-9999-abc" }) });
    expect(leases.reports[1]!.result).toEqual({ note: "used [REDACTED:K]", n: 1 });
  });

  it("never shows a secret value in a failure reason or a result key", async () => {
    const secrets = resolver({ K: "key-9999-abc" });
    const strict = JSON.stringify({ type: "object", additionalProperties: { type: "string" } });
    const cases = [
      { result: "key-9999-abc", schema: "" }, // not JSON: V8's message quotes it
      { result: '{"key-9999-abc":1}', schema: strict }, // a key in ajv's instancePath
      { result: '{"key-9999-abc":"v","x":{"pre-key-9999-abc":["key-9999-abc"]}}', schema: "" }, // valid: keys too
    ];
    const reports = [];
    for (const { result, schema } of cases) {
      const { leases, workspaces, deps } = setup();
      workspaces.result = result;
      await executeRun(lease({ secretNames: ["K"], schema }), { ...deps, secrets });
      reports.push(leases.reports[1]!);
    }
    for (const report of reports) expect(JSON.stringify(report)).not.toContain("9999");
    expect(reports[0]).toMatchObject({ state: Dispatch_State.FAILED, failureReason: expect.stringContaining("the result is not valid JSON") });
    expect(reports[1]).toMatchObject({ state: Dispatch_State.FAILED, failureReason: "the result does not match the output schema: /[REDACTED:K] must be string" });
    expect(reports[2]).toMatchObject({ state: Dispatch_State.SUCCEEDED, result: { "[REDACTED:K]": "v", x: { "pre-[REDACTED:K]": ["[REDACTED:K]"] } } });
  });
});

describe("repository checkout", () => {
  it("checks out before the container is created; a failed checkout fails the run without a container", async () => {
    const a = setup();
    await executeRun(lease({ repo: { url: "https://example.invalid/r.git", ref: "v1" } }), a.deps);
    expect(a.workspaces.checkouts).toEqual([{ url: "https://example.invalid/r.git", ref: "v1" }]);
    expect(a.runtime.created[0]!.env).toMatchObject({ OUTPOST_REPO_URL: "https://example.invalid/r.git", OUTPOST_REPO_REF: "v1" });
    expect(a.runtime.created[0]!.binds).toEqual([
      "/runs/outpost-01jdispatch000000000000000-0000000a/workspace:/workspace",
      "/runs/outpost-01jdispatch000000000000000-0000000a/control:/run/outpost:ro",
    ]);

    const b = setup();
    b.workspaces.checkoutError = new CheckoutError("fatal: couldn't find remote ref v9");
    await executeRun(lease({ repo: { url: "https://example.invalid/r.git", ref: "v9" } }), b.deps);
    expect(b.runtime.created).toEqual([]);
    expect(b.leases.reports).toEqual([
      expect.objectContaining({ state: Dispatch_State.FAILED, failureReason: "repository checkout failed: fatal: couldn't find remote ref v9" }),
    ]);
    expect(b.workspaces.removed).toHaveLength(1);
  });
});

describe("warm pool", () => {
  it("parses OUTPOST_WARM_POOL and refuses nonsense", () => {
    expect(parseWarmPool("demo=2, claude=1")).toEqual(new Map([["demo", 2], ["claude", 1]]));
    expect(parseWarmPool("")).toEqual(new Map());
    expect(() => parseWarmPool("demo")).toThrow(/not <agent>=<count>/);
  });

  it("learns the agent from its first lease, keeps N warm, and hands one to a matching run started through the FIFO", async () => {
    const { runtime, leases, workspaces, deps } = setup();
    // A warm container only waits until its start file arrives; then the "agent" runs.
    const runAgent = runtime.start.bind(runtime);
    runtime.start = async () => void runtime.events.push("start-warm");
    workspaces.writeStartFile = async (_files, content) => {
      workspaces.startFiles.push(content);
      await runAgent();
    };
    const pool = new WarmPool({ targets: new Map([["demo", 2]]), runtime, workspaces, executorId: "ex-1", logger: silentLogger });
    expect(pool.claim(lease())).toBeUndefined(); // first sight: learn, fill
    await pool.settled();
    expect(pool.size).toBe(2);
    const warmSpec = runtime.created[0]!;
    expect(warmSpec.launcher).toEqual(["/bin/sh", "-c", '. /run/outpost/start && exec "$@"', "outpost-warm"]);
    // The agent sets no command: the runtime launches the image's ENTRYPOINT and CMD, as a cold container would.
    expect(warmSpec.command).toEqual([]);
    expect(warmSpec.labels["dev.outpost.warm-agent"]).toBe("demo");
    expect(warmSpec).toMatchObject({ readonlyRootfs: true, capDrop: ["ALL"], networkMode: "none", user: "65534:65534" });
    runtime.events.length = 0;

    await executeRun(lease(), { ...deps, warmPool: pool });
    // No create/start for the run: the warm container is renamed, attached, then fed its env.
    // (create/start-warm events are the pool refilling behind the claim)
    const runEvents = runtime.events.filter((e) => e !== "create" && e !== "start-warm");
    expect(runEvents.slice(0, 3)).toEqual(["rename:outpost-01jdispatch000000000000000-0000000a", "attach", "start"]);
    expect(runtime.created.every((spec) => spec.launcher !== undefined)).toBe(true); // only warm containers were created
    expect(workspaces.startFiles[0]).toContain("export OUTPOST_TASK='hello'\n");
    expect(workspaces.startFiles[0]).toContain("export OUTPOST_DISPATCH_ID='01JDISPATCH000000000000000'\n");
    expect(leases.reports.map((r) => Dispatch_State[r.state])).toEqual(["RUNNING", "SUCCEEDED"]);
    await pool.settled();
    expect(pool.size).toBe(2); // refilled
    await pool.close();
    expect(pool.size).toBe(0);
  });

  it("a warm run records its claim only right before its agent starts; a cancel before that leaves none", async () => {
    const { runtime, leases, workspaces, deps } = setup();
    runtime.start = async () => void runtime.events.push("start-warm");
    workspaces.recordClaim = async (_files, claim) => void runtime.events.push(`claim:${claim.dispatchId}`);
    workspaces.writeStartFile = async () => void runtime.events.push("start-file");
    const pool = new WarmPool({ targets: new Map([["demo", 1]]), runtime, workspaces, executorId: "ex-1", logger: silentLogger });
    pool.claim(lease());
    await pool.settled();
    runtime.events.length = 0;
    runtime.runForever = true;
    leases.heartbeatAnswer = () => ({ expireTime: new Date(Date.now() + 600), cancelRequested: true, logGrant: "" });
    await executeRun(lease(), { ...deps, warmPool: pool });
    const runEvents = runtime.events.filter((e) => e !== "create" && e !== "start-warm");
    // After it took the container, named it and checked the run was still wanted; before the FIFO.
    expect(runEvents.slice(0, 4)).toEqual(["rename:outpost-01jdispatch000000000000000-0000000a", "claim:01JDISPATCH000000000000000", "attach", "start-file"]);
    await pool.close();

    // Cancelled while it was being prepared (a checkout): no claim, so a restarted executor would
    // know its agent never ran.
    const second = setup();
    second.runtime.start = async () => void second.runtime.events.push("start-warm");
    second.workspaces.recordClaim = async (_files, claim) => void second.runtime.events.push(`claim:${claim.dispatchId}`);
    second.workspaces.checkoutDelayMs = 1000;
    second.leases.heartbeatAnswer = () => ({ expireTime: new Date(Date.now() + 600), cancelRequested: true, logGrant: "" });
    const pool2 = new WarmPool({ targets: new Map([["demo", 1]]), runtime: second.runtime, workspaces: second.workspaces, executorId: "ex-1", logger: silentLogger });
    pool2.claim(lease());
    await pool2.settled();
    await executeRun(lease({ repo: { url: "https://example.com/r.git", ref: "" } }), { ...second.deps, warmPool: pool2 });
    expect(second.runtime.events.filter((e) => e.startsWith("claim:"))).toEqual([]);
    expect(second.leases.reports).toEqual([expect.objectContaining({ state: Dispatch_State.CANCELLED, failureReason: "cancelled before start" })]);
    await pool2.close();
  });

  it("quotes values so the start script cannot be escaped", () => {
    expect(startScript({ A: "it's $(rm -rf /)", "bad-name": "x" })).toBe("export A='it'\\''s $(rm -rf /)'\n");
  });
});

describe("reconcile", () => {
  const summary = (labels: Record<string, string>, running: boolean): ContainerSummary => ({ id: "c-left", name: "left", labels, running, started: true });

  it("stops and removes a running left-over container and fails its run as executor lost", async () => {
    const { runtime, leases, workspaces } = setup();
    runtime.list = vi.fn(async () => [
      summary({ "dev.outpost.dispatch-id": "01JDISPATCH000000000000000", "dev.outpost.lease-id": "01JLEASE00000000000000000A", "dev.outpost.run-dir": "outpost-x" }, true),
    ]);
    leases.held = [lease()];
    const outcome = await reconcile({ executorId: "ex-1", runtime, leases, workspaces, logger: silentLogger });
    expect(outcome).toEqual({ containersRemoved: 1, runsSettled: 1, leasesReleased: 0, runsAdopted: 0 });
    expect(runtime.events).toContain("remove");
    expect(leases.reports).toEqual([expect.objectContaining({ state: Dispatch_State.FAILED, failureReason: EXECUTOR_LOST })]);
    expect(workspaces.removed).toContain("/runs/outpost-x");
  });

  const runningLease = (extra: Parameters<typeof lease>[0] = {}) => {
    const l = lease(extra);
    l.dispatch!.state = Dispatch_State.RUNNING;
    return l;
  };

  it("takes up a running left-over container whose lease the dispatcher still holds: neither stopped nor reported, its run directory kept", async () => {
    const { runtime, leases, workspaces } = setup();
    runtime.list = vi.fn(async () => [
      summary({ "dev.outpost.dispatch-id": "01JDISPATCH000000000000000", "dev.outpost.lease-id": "01JLEASE00000000000000000A", "dev.outpost.run-dir": "outpost-x" }, true),
    ]);
    leases.held = [runningLease()];
    const adopt = vi.fn();
    const outcome = await reconcile({ executorId: "ex-1", runtime, leases, workspaces, logger: silentLogger, adopt });
    expect(outcome).toEqual({ containersRemoved: 0, runsSettled: 0, leasesReleased: 0, runsAdopted: 1 });
    expect(adopt).toHaveBeenCalledTimes(1);
    expect(adopt).toHaveBeenCalledWith(leases.held[0], { containerId: "c-left", files: workspaces.filesOf("outpost-x") }, expect.any(Redactor));
    expect(runtime.events).not.toContain("remove");
    expect(leases.reports).toEqual([]);
    expect(workspaces.removed).toEqual([]);
  });

  it("redacts a run taken up with the secret values its container was started with, not the ones resolved now", async () => {
    const { runtime, leases, workspaces } = setup();
    runtime.list = vi.fn(async () => [
      summary({ "dev.outpost.dispatch-id": "01JDISPATCH000000000000000", "dev.outpost.lease-id": "01JLEASE00000000000000000A", "dev.outpost.run-dir": "outpost-x" }, true),
    ]);
    runtime.env = { TOKEN: "value-it-started-with", OUTPOST_TASK: "hello" };
    leases.held = [runningLease({ secretNames: ["TOKEN"] })];
    const adopt = vi.fn();
    const secrets = resolver({ TOKEN: "value-rotated-since" });
    await reconcile({ executorId: "ex-1", runtime, leases, workspaces, secrets, logger: silentLogger, adopt });
    expect(adopt).toHaveBeenCalledTimes(1);
    const redactor = adopt.mock.calls[0]![2] as Redactor;
    expect(redactor.redact("key value-it-started-with")).toBe("key [REDACTED:TOKEN]");
    expect(secrets.calls).toEqual([]);
  });

  it("does not take up a warm container's run that names secrets, even when the image has a variable by that name", async () => {
    const { runtime, leases, workspaces } = setup();
    runtime.list = vi.fn(async () => [
      summary({ "dev.outpost.warm-agent": "demo", "dev.outpost.run-dir": "outpost-warm" }, true),
    ]);
    workspaces.claims.set("/runs/outpost-warm", { dispatchId: "01JDISPATCH000000000000000", leaseId: "01JLEASE00000000000000000A" });
    runtime.env = { HOME: "/home/agent" };
    leases.held = [runningLease({ secretNames: ["HOME"] })];
    const adopt = vi.fn();
    const outcome = await reconcile({ executorId: "ex-1", runtime, leases, workspaces, logger: silentLogger, adopt });
    expect(adopt).not.toHaveBeenCalled();
    expect(outcome.runsAdopted).toBe(0);
    expect(runtime.events).toContain("remove");
  });

  it("still stops and fails a running left-over whose held lease is another, whose run is not RUNNING yet (a warm container claimed before its start), or whose secret values its container does not hold (a warm one)", async () => {
    const startingLease = lease();
    for (const [held, leaseId] of [
      [runningLease(), "01JLEASE00000000000000000B"],
      [startingLease, "01JLEASE00000000000000000A"],
      [runningLease({ secretNames: ["TOKEN"] }), "01JLEASE00000000000000000A"],
    ] as const) {
      const { runtime, leases, workspaces } = setup();
      runtime.list = vi.fn(async () => [summary({ "dev.outpost.dispatch-id": "01JDISPATCH000000000000000", "dev.outpost.lease-id": leaseId, "dev.outpost.run-dir": "outpost-x" }, true)]);
      leases.held = [held];
      const adopt = vi.fn();
      const outcome = await reconcile({ executorId: "ex-1", runtime, leases, workspaces, logger: silentLogger, adopt, secrets: resolver({ TOKEN: "t" }) });
      expect(adopt).not.toHaveBeenCalled();
      expect(outcome.runsAdopted).toBe(0);
      expect(runtime.events).toContain("remove");
    }
  });

  it("gives back (never reports SUCCEEDED) a run whose container was created but never started", async () => {
    const { runtime, leases, workspaces } = setup();
    runtime.list = vi.fn(async () => [
      {
        ...summary({ "dev.outpost.dispatch-id": "01JDISPATCH000000000000000", "dev.outpost.lease-id": "01JLEASE00000000000000000A" }, false),
        started: false,
      },
    ]);
    leases.held = [lease()];
    const outcome = await reconcile({ executorId: "ex-1", runtime, leases, workspaces, logger: silentLogger });
    expect(outcome).toEqual({ containersRemoved: 1, runsSettled: 0, leasesReleased: 1, runsAdopted: 0 });
    expect(leases.reports).toEqual([]);
    expect(leases.released).toEqual([expect.objectContaining({ dispatchId: "01JDISPATCH000000000000000", infrastructureFailure: true, runtimeFailure: false })]);
  });

  it("redacts a left-over run's result with its secrets, and withholds it when they cannot be resolved", async () => {
    const labels = { "dev.outpost.dispatch-id": "01JDISPATCH000000000000000", "dev.outpost.lease-id": "01JLEASE00000000000000000A", "dev.outpost.run-dir": "outpost-x" };
    const settle = async (secrets: SecretResolver | undefined) => {
      const { runtime, leases, workspaces } = setup();
      runtime.list = vi.fn(async () => [summary(labels, false)]);
      runtime.wait = async () => ({ exitCode: 0, oomKilled: false });
      workspaces.result = '{"key-9999-abc":"used key-9999-abc"}';
      leases.held = [lease({ secretNames: ["K"] })];
      await reconcile({ executorId: "ex-1", runtime, leases, workspaces, logger: silentLogger, ...(secrets ? { secrets } : {}) });
      return leases.reports[0]!;
    };
    const redacted = await settle(resolver({ K: "key-9999-abc" }));
    expect(redacted).toMatchObject({ state: Dispatch_State.SUCCEEDED, result: { "[REDACTED:K]": "used [REDACTED:K]" } });
    const withheld = await settle(resolver(new SecretsError("tenant service answered UNAVAILABLE", true)));
    expect(withheld).toMatchObject({ state: Dispatch_State.FAILED, failureReason: RESULT_WITHHELD });
    expect(JSON.stringify(withheld)).not.toContain("9999");
  });

  it("withholds a left-over run's result (FAILED) when the lease list could not be had, never reporting it unredacted", async () => {
    const labels = { "dev.outpost.dispatch-id": "01JDISPATCH000000000000000", "dev.outpost.lease-id": "01JLEASE00000000000000000A", "dev.outpost.run-dir": "outpost-x" };
    const failures = [
      new NotSupportedError("no ListExecutorLeases"),
      new Error("deadline_exceeded: the operation timed out"),
      new Error("unavailable: dispatcher unreachable"),
    ];
    for (const failure of failures) {
      const { runtime, leases, workspaces } = setup();
      runtime.list = vi.fn(async () => [summary(labels, false)]);
      runtime.wait = async () => ({ exitCode: 0, oomKilled: false });
      // A valid result carrying the run's secret: without its lease the executor knows neither
      // the secret's value nor the agent's schema.
      workspaces.result = '{"token":"sk-live-4242-secret","sk-live-4242-secret":1}';
      leases.listLeases = async () => {
        throw failure;
      };
      const resolve = vi.fn(async () => ({ K: "sk-live-4242-secret" }));
      const outcome = await reconcile({ executorId: "ex-1", runtime, leases, workspaces, logger: silentLogger, secrets: { resolve } });
      expect(outcome).toEqual({ containersRemoved: 1, runsSettled: 1, leasesReleased: 0, runsAdopted: 0 });
      expect(leases.reports).toHaveLength(1);
      const report = leases.reports[0]!;
      expect(report).toMatchObject({ dispatchId: "01JDISPATCH000000000000000", state: Dispatch_State.FAILED, exitCode: 0, failureReason: RESULT_WITHHELD_NO_LEASE });
      expect(report.result).toBeUndefined();
      expect(JSON.stringify(report)).not.toContain("4242");
      expect(JSON.stringify(report)).not.toContain("token");
      expect(runtime.events).toContain("remove");
      expect(workspaces.removed).toContain("/runs/outpost-x");
    }
  });

  it("releases a held lease that has no container, and works without ListExecutorLeases", async () => {
    const a = setup();
    a.leases.held = [lease({ id: "01JDISPATCH00000000000000B" })];
    expect(await reconcile({ executorId: "ex-1", runtime: a.runtime, leases: a.leases, workspaces: a.workspaces, logger: silentLogger })).toEqual({
      containersRemoved: 0, runsSettled: 0, leasesReleased: 1, runsAdopted: 0,
    });
    expect(a.leases.released[0]).toMatchObject({ dispatchId: "01JDISPATCH00000000000000B", infrastructureFailure: true });

    const b = setup();
    b.leases.held = undefined; // UNIMPLEMENTED
    b.runtime.list = vi.fn(async () => [
      summary({ "dev.outpost.dispatch-id": "01JDISPATCH000000000000000", "dev.outpost.lease-id": "01JLEASE00000000000000000A" }, true),
      summary({ "dev.outpost.warm-agent": "demo" }, true),
    ]);
    const outcome = await reconcile({ executorId: "ex-1", runtime: b.runtime, leases: b.leases, workspaces: b.workspaces, logger: silentLogger });
    expect(outcome).toEqual({ containersRemoved: 2, runsSettled: 1, leasesReleased: 0, runsAdopted: 0 });
  });
});

describe("Cancellations", () => {
  it("routes a streamed cancel to its run, and keeps one that came before the run registered", async () => {
    const { Cancellations } = await import("../src/core/cancellations.ts");
    const hub = new Cancellations();
    const seen: string[] = [];
    const off = hub.register("d1", "l1", () => seen.push("d1"));
    hub.notify("d1", "l1");
    hub.notify("d1", "other-lease"); // another attempt's lease: not this run
    expect(seen).toEqual(["d1"]);
    off();
    hub.notify("d2", "l2");
    hub.register("d2", "l2", () => seen.push("d2"));
    await Promise.resolve();
    expect(seen).toEqual(["d1", "d2"]);
  });
});

describe("adoptRun (a run taken up after the executor restarted)", () => {
  const adoptedLease = (timeoutMs: number, startedMsAgo: number) => {
    const l = lease({ schema: '{"type":"object","required":["ok"]}' });
    l.dispatch!.timeout = durationFromMs(timeoutMs);
    l.dispatch!.startTime = timestampFromDate(new Date(Date.now() - startedMsAgo));
    return l;
  };

  it("continues the log after what telemetry holds with a line saying so, reports RUNNING and the real outcome with its result", async () => {
    const { runtime, leases, sink, workspaces, deps } = setup();
    sink.stored.set("01JDISPATCH000000000000000", 4);
    workspaces.result = '{"ok":true}';
    runtime.frames = [stdout("after the restart\n")];
    await runtime.start(); // the container was started by the executor before this one
    const files = workspaces.filesOf("outpost-x");
    await adoptRun(adoptedLease(60_000, 1000), { containerId: "c-left", files }, new Redactor({}), deps);
    expect(sink.allSent.map((l) => [l.seq, l.stream, l.text.replace(/at \S+Z/, "at <time>")])).toEqual([
      [5, "stderr", adoptionNotice(new Date(0)).replace(/at \S+Z/, "at <time>")],
      [6, "stdout", "after the restart"],
    ]);
    expect(runtime.events).not.toContain("create");
    expect(leases.reports.map((r) => Dispatch_State[r.state])).toEqual(["RUNNING", "SUCCEEDED"]);
    expect(leases.reports[1]).toMatchObject({ exitCode: 0, lastLogSeq: 6, result: { ok: true } });
    expect(workspaces.removed).toEqual([files.root]);
  });

  it("times out counting from the run's start, not from the adoption", async () => {
    const { runtime, leases, deps, workspaces } = setup();
    runtime.runForever = true;
    await runtime.start();
    await adoptRun(adoptedLease(2000, 1900), { containerId: "c-left", files: workspaces.filesOf("outpost-x") }, new Redactor({}), deps);
    expect(runtime.events).toContain("stop:1000");
    expect(leases.reports.at(-1)).toMatchObject({ state: Dispatch_State.TIMED_OUT, failureReason: "timed out after 2s" });
  });

  it("a container it cannot attach to is removed and its run failed as executor lost", async () => {
    const { runtime, leases, deps, workspaces } = setup();
    runtime.attach = vi.fn(async () => {
      throw new Error("(HTTP code 409) container is not running");
    });
    await adoptRun(adoptedLease(60_000, 0), { containerId: "c-left", files: workspaces.filesOf("outpost-x") }, new Redactor({}), deps);
    expect(runtime.events).toContain("remove");
    expect(leases.reports).toEqual([expect.objectContaining({ state: Dispatch_State.FAILED, failureReason: EXECUTOR_LOST })]);
  });
});
