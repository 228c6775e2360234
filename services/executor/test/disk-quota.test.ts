/**
 * The workspace disk quota: the core (DiskQuota, and executeRun with it) against fakes, and
 * the host adapter's measurement (diskUsageOf) against real directories — no Docker.
 * The real-engine test is disk-quota.boundary.test.ts.
 */
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { LeaseSchema, type Lease } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { afterAll, describe, expect, it } from "vitest";
import { diskUsageOf, MIN_ENTRY_BYTES } from "../src/adapters/disk-usage.ts";
import { createHostWorkspaces } from "../src/adapters/host-workspaces.ts";
import { executorConfigShape } from "../src/config.ts";
import { DiskQuota, PAUSE_PER_MEASURING_TIME, quotaReason } from "../src/core/disk-quota.ts";
import { WorkspaceUnmeasurableError } from "../src/core/ports.ts";
import { executeRun, type WorkspaceQuota } from "../src/core/run.ts";
import { FakeLeases, FakeRuntime, FakeSink, FakeWorkspaces, silentLogger } from "./fakes.ts";

const MiB = 1024 * 1024;

describe("DiskQuota", () => {
  const quotaOver = (usage: Array<number | Error>, intervalMs = 10) => {
    const seen: number[] = [];
    const quota = new DiskQuota({
      limitBytes: 1000,
      intervalMs,
      measure: async (stopAboveBytes) => {
        seen.push(stopAboveBytes);
        const next = usage.length > 1 ? usage.shift()! : usage[0]!;
        if (next instanceof Error) throw next;
        return next;
      },
      logger: silentLogger,
    });
    return { quota, seen };
  };

  it("checks one measurement against the limit, asking the measure to stop past it", async () => {
    const { quota, seen } = quotaOver([1000, 1001]);
    expect(await quota.check()).toBeUndefined();
    expect(await quota.check()).toBe("workspace exceeded its disk quota of 1000 bytes (1001 bytes or more in use)");
    expect(seen).toEqual([1000, 1000]);
  });

  it("fails closed on an unmeasurable workspace, open (until the next measurement) on other errors", async () => {
    const unmeasurable = quotaOver([new WorkspaceUnmeasurableError("a part of it is not readable by the executor (EACCES)")]);
    expect(await unmeasurable.quota.check()).toBe(
      "workspace could not be measured for its disk quota of 1000 bytes: a part of it is not readable by the executor (EACCES)",
    );
    const flaky = quotaOver([new Error("EMFILE"), 5000]);
    expect(await flaky.quota.check()).toBeUndefined();
    expect(await flaky.quota.check()).toBe(quotaReason(1000, 5000));
  });

  it("watches until the workspace goes over, says so once, and measures no more", async () => {
    const { quota, seen } = quotaOver([10, 20, new Error("transient"), 2000]);
    const reasons: string[] = [];
    quota.watch((reason) => reasons.push(reason));
    await until(() => reasons.length > 0);
    await new Promise((r) => setTimeout(r, 100));
    expect(reasons).toEqual([quotaReason(1000, 2000)]);
    expect(seen).toHaveLength(4);
    await quota.stop();
  });

  it("stops measuring on stop, and pauses longer after a slow measurement", async () => {
    const times: number[] = [];
    const quota = new DiskQuota({
      limitBytes: 1000,
      intervalMs: 5,
      measure: async () => {
        times.push(performance.now());
        await new Promise((r) => setTimeout(r, 40));
        return 0;
      },
      logger: silentLogger,
    });
    quota.watch(() => expect.fail("not over"));
    await until(() => times.length >= 3);
    await quota.stop();
    const measured = times.length;
    // The measurement took >= 40 ms, so the next one starts >= 40 + 4 × 40 ms later, not 5.
    expect(times[2]! - times[1]!).toBeGreaterThanOrEqual(40 * (1 + PAUSE_PER_MEASURING_TIME) - 5);
    await new Promise((r) => setTimeout(r, 300));
    expect(times).toHaveLength(measured);
  });
});

function lease(repo = false): Lease {
  return create(LeaseSchema, {
    leaseId: "01JLEASE00000000000000000Q",
    expireTime: timestampFromDate(new Date(Date.now() + 60_000)),
    dispatch: { id: "01JDISPATCH00000000000000Q", tenantId: "tenant-a", agent: "demo", task: "fill", ...(repo ? { repo: { url: "https://example.test/r.git", ref: "" } } : {}) },
    agent: { name: "demo", image: "outpost/demo-agent:latest" },
  });
}

async function runWithQuota(options: { usage: Array<number | Error>; quota?: WorkspaceQuota; runForever?: boolean; repo?: boolean }) {
  const runtime = new FakeRuntime();
  runtime.runForever = options.runForever ?? false;
  const leases = new FakeLeases();
  const workspaces = new FakeWorkspaces();
  workspaces.usage = options.usage;
  const sink = new FakeSink();
  sink.autoAck = true;
  await executeRun(lease(options.repo), {
    executorId: "ex-1",
    runtime,
    leases,
    logs: sink,
    workspaces,
    logger: silentLogger,
    stopGraceMs: 5000,
    logAckWaitMs: 200,
    workspaceQuota: "quota" in options ? options.quota : { limitBytes: 1000, checkIntervalMs: 10 },
  });
  const end = leases.reports.at(-1)!;
  return { runtime, workspaces, end, states: leases.reports.map((r) => Dispatch_State[r.state]) };
}

describe("executeRun with a workspace quota", () => {
  it("kills a running agent at once when its workspace goes over, and reports FAILED with the quota", async () => {
    const { runtime, end, states } = await runWithQuota({ usage: [100, 400, 5000], runForever: true });
    expect(runtime.events).toContain("stop:0");
    expect(states).toEqual(["RUNNING", "FAILED"]);
    expect(end).toMatchObject({ failureReason: quotaReason(1000, 5000), exitCode: 143 });
    expect(runtime.events.at(-1)).toBe("remove");
  });

  it("fails a run that went over after its last measurement, measured once more after the exit", async () => {
    const { runtime, workspaces, end } = await runWithQuota({ usage: [5000], quota: { limitBytes: 1000, checkIntervalMs: 60_000 } });
    expect(runtime.events.some((e) => e.startsWith("stop"))).toBe(false);
    expect(workspaces.measurements).toEqual([1000]);
    expect(end).toMatchObject({ state: Dispatch_State.FAILED, failureReason: quotaReason(1000, 5000), exitCode: 0 });
  });

  it("lets a run under its quota succeed", async () => {
    const { workspaces, end } = await runWithQuota({ usage: [1000], quota: { limitBytes: 1000, checkIntervalMs: 60_000 } });
    expect(workspaces.measurements).toHaveLength(1);
    expect(end).toMatchObject({ state: Dispatch_State.SUCCEEDED, exitCode: 0 });
  });

  it("fails a run whose workspace cannot be measured", async () => {
    const { end } = await runWithQuota({ usage: [new WorkspaceUnmeasurableError("a path in it is too long to measure (ENAMETOOLONG)")], runForever: true });
    expect(end).toMatchObject({
      state: Dispatch_State.FAILED,
      failureReason: "workspace could not be measured for its disk quota of 1000 bytes: a path in it is too long to measure (ENAMETOOLONG)",
    });
  });

  it("fails a run whose repository checkout is over the quota before any container exists", async () => {
    const { runtime, workspaces, end, states } = await runWithQuota({ usage: [5000], repo: true });
    expect(runtime.created).toHaveLength(0);
    expect(states).toEqual(["FAILED"]);
    expect(end.failureReason).toBe(`repository checkout failed: ${quotaReason(1000, 5000)}`);
    expect(workspaces.removed).toHaveLength(1);
  });

  it("measures nothing without a quota", async () => {
    const { workspaces, end } = await runWithQuota({ usage: [5000], quota: undefined });
    expect(workspaces.measurements).toEqual([]);
    expect(end.state).toBe(Dispatch_State.SUCCEEDED);
  });
});

describe("OUTPOST_EXECUTOR_WORKSPACE_MAX_BYTES", () => {
  const parse = (value: string | undefined) => executorConfigShape.OUTPOST_EXECUTOR_WORKSPACE_MAX_BYTES.safeParse(value);
  it("defaults to 10 GiB, takes whole bytes (0: no quota) and refuses anything else", () => {
    expect(parse(undefined).data).toBe(10 * 1024 * MiB);
    expect(parse("0").data).toBe(0);
    expect(parse("1048576").data).toBe(MiB);
    for (const bad of ["", "10GiB", "-1", "1e9", "1.5", "99999999999999999999"]) expect(parse(bad).success, bad).toBe(false);
  });
});

describe("diskUsageOf (the host adapter's measurement)", () => {
  const base = fs.mkdtempSync(path.join(os.tmpdir(), "outpost-disk-usage-"));
  let n = 0;
  const tree = () => {
    const dir = path.join(base, `t${n++}`);
    fs.mkdirSync(dir);
    return dir;
  };
  // `rm -rf` (not fs.rm) also removes trees deeper than a path can name.
  afterAll(() => execFileSync("rm", ["-rf", base]));

  it("counts allocated blocks of files and directories", async () => {
    const dir = tree();
    fs.mkdirSync(path.join(dir, "sub"));
    fs.writeFileSync(path.join(dir, "sub", "a.bin"), Buffer.alloc(3 * MiB, 1));
    const used = await diskUsageOf(dir, Infinity);
    expect(used).toBeGreaterThanOrEqual(3 * MiB + 2 * MIN_ENTRY_BYTES);
    expect(used).toBeLessThan(3 * MiB + 64 * 1024);
  });

  it("counts what a sparse file uses, not its apparent size", async () => {
    const dir = tree();
    const handle = fs.openSync(path.join(dir, "sparse"), "w");
    fs.ftruncateSync(handle, 1024 * MiB);
    fs.closeSync(handle);
    expect(await diskUsageOf(dir, Infinity)).toBeLessThan(MiB);
  });

  it("never follows a symbolic link, and counts hard links once", async () => {
    const outside = tree();
    fs.writeFileSync(path.join(outside, "big"), Buffer.alloc(4 * MiB, 1));
    const dir = tree();
    fs.symlinkSync(path.join(outside, "big"), path.join(dir, "link-to-file"));
    fs.symlinkSync(outside, path.join(dir, "link-to-dir"));
    fs.writeFileSync(path.join(dir, "data"), Buffer.alloc(MiB, 1));
    for (let i = 0; i < 5; i++) fs.linkSync(path.join(dir, "data"), path.join(dir, `hard-${i}`));
    const used = await diskUsageOf(dir, Infinity);
    expect(used).toBeGreaterThanOrEqual(MiB);
    expect(used).toBeLessThan(MiB + 64 * 1024);
  });

  it("counts every entry at least one block, so many empty files count", async () => {
    const dir = tree();
    for (let i = 0; i < 300; i++) fs.writeFileSync(path.join(dir, `empty-${i}`), "");
    expect(await diskUsageOf(dir, Infinity)).toBeGreaterThanOrEqual(301 * MIN_ENTRY_BYTES);
  });

  it("stops counting once past the limit", async () => {
    const dir = tree();
    for (let d = 0; d < 20; d++) {
      fs.mkdirSync(path.join(dir, `d${d}`));
      for (let f = 0; f < 100; f++) fs.writeFileSync(path.join(dir, `d${d}`, `f${f}`), "x");
    }
    const all = await diskUsageOf(dir, Infinity);
    expect(all).toBeGreaterThan(2000 * MIN_ENTRY_BYTES);
    const partial = await diskUsageOf(dir, 10 * MIN_ENTRY_BYTES);
    expect(partial).toBeGreaterThan(10 * MIN_ENTRY_BYTES);
    expect(partial).toBeLessThan(all / 4);
  });

  it("answers 0 for a workspace that is gone, and stops when aborted", async () => {
    expect(await diskUsageOf(path.join(base, "missing"), Infinity)).toBe(0);
    const dir = tree();
    fs.mkdirSync(path.join(dir, "sub"));
    await expect(diskUsageOf(dir, Infinity, AbortSignal.abort())).rejects.toThrow(/abort/i);
  });

  it("refuses to vouch for a tree deeper than a path can name (an agent hiding data from the walk)", async () => {
    const dir = tree();
    // Built inside out, every step naming only a short path (an agent gets there with relative mkdirs).
    const script = `cd "$1" && mkdir c && head -c 1048576 /dev/zero > c/hidden && for i in $(seq 25); do mkdir p && mv c "p/$2" && mv p c; done`;
    execFileSync("sh", ["-c", script, "sh", dir, "d".repeat(200)]);
    await expect(diskUsageOf(dir, Infinity)).rejects.toThrow(WorkspaceUnmeasurableError);
    await expect(diskUsageOf(dir, Infinity)).rejects.toThrow("a path in it is too long to measure (ENAMETOOLONG)");
    // Nor does such a tree outlive its run: the run directory is removed all the same.
    const workspaces = createHostWorkspaces({ runsDir: dir, uid: 65534, gid: 65534, repoSchemes: new Set(), checkoutTimeoutMs: 1000, checkoutEgress: { allowedNetworks: [] } });
    await workspaces.remove(workspaces.filesOf("c"));
    expect(fs.readdirSync(dir)).toEqual([]);
  });

  it.skipIf(process.getuid?.() === 0)("refuses to vouch for a directory it may not read (not as root)", async () => {
    const dir = tree();
    fs.mkdirSync(path.join(dir, "closed"));
    fs.chmodSync(path.join(dir, "closed"), 0);
    try {
      await expect(diskUsageOf(dir, Infinity)).rejects.toThrow("a part of it is not readable by the executor (EACCES)");
    } finally {
      fs.chmodSync(path.join(dir, "closed"), 0o700);
    }
  });
});

async function until(probe: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!probe()) {
    if (Date.now() > deadline) throw new Error("timed out");
    await new Promise((r) => setTimeout(r, 5));
  }
}
