/**
 * A hostile agent against the executor's host (no Docker): what it leaves in its bind-mounted
 * workspace (the result file, links, hard links), what it prints, and what happens when its
 * container cannot be removed. The agent controls the workspace's content and its output, not
 * the run directory around the workspace.
 */
import { execFileSync } from "node:child_process";
import { constants as fsConstants } from "node:fs";
import fs from "node:fs";
import fsp from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { create } from "@bufbuild/protobuf";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { LeaseSchema, type Lease } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { afterAll, afterEach, describe, expect, it, vi } from "vitest";
import { createHostWorkspaces } from "../src/adapters/host-workspaces.ts";
import { diskUsageOf, MIN_ENTRY_BYTES } from "../src/adapters/disk-usage.ts";
import { LineSplitter } from "../src/core/line-splitter.ts";
import { terminalSafe } from "../src/core/terminal-safe.ts";
import { reconcile } from "../src/core/reconcile.ts";
import { executeRun } from "../src/core/run.ts";
import type { ContainerExit, ContainerSummary, RunFiles } from "../src/core/ports.ts";
import { FakeLeases, FakeRuntime, FakeSink, FakeWorkspaces, silentLogger, stdout } from "./fakes.ts";

const base = fs.mkdtempSync(path.join(os.tmpdir(), "outpost-hostile-"));
afterAll(() => execFileSync("rm", ["-rf", base]));
afterEach(() => vi.restoreAllMocks());

const MAX = 1024 * 1024;
let n = 0;
const workspaces = () =>
  createHostWorkspaces({ runsDir: path.join(base, "runs"), uid: 65534, gid: 65534, repoSchemes: new Set(), checkoutTimeoutMs: 1000, checkoutEgress: { allowedNetworks: [] } });

/** A run directory whose workspace holds `.outpost/` (made by the "agent"). */
async function run(): Promise<{ ws: ReturnType<typeof workspaces>; files: RunFiles; dir: string; file: string }> {
  const ws = workspaces();
  const files = await ws.create(`run-${n++}`);
  const dir = path.join(files.workspace, ".outpost");
  fs.mkdirSync(dir);
  return { ws, files, dir, file: path.join(dir, "result.json") };
}

/** A host file the agent must never get the executor to read (a stand-in for /etc/shadow or a key file). */
function hostSecret(): string {
  const dir = fs.mkdtempSync(path.join(base, "host-"));
  fs.writeFileSync(path.join(dir, "result.json"), JSON.stringify({ stolen: "host-secret-value" }));
  return dir;
}

/** Settles within `ms` or says it hung (a blocked open would otherwise hang the test, and a libuv thread). */
function within<T>(promise: Promise<T>, ms: number): Promise<T | "hung"> {
  return Promise.race([promise, new Promise<"hung">((resolve) => setTimeout(() => resolve("hung"), ms))]);
}

describe("the result file (readResult) against a hostile workspace", () => {
  it("reads a plain result", async () => {
    const { ws, files, file } = await run();
    fs.writeFileSync(file, '{"ok":true}');
    expect(await ws.readResult(files, MAX)).toBe('{"ok":true}');
  });

  it("refuses a symbolic link as the result, or as its directory, to a host file", async () => {
    const secret = hostSecret();
    const a = await run();
    fs.symlinkSync(path.join(secret, "result.json"), a.file);
    await expect(a.ws.readResult(a.files, MAX)).rejects.toThrow(/symbolic link/);
    const b = await run();
    fs.rmdirSync(b.dir);
    fs.symlinkSync(secret, b.dir);
    await expect(b.ws.readResult(b.files, MAX)).rejects.toThrow(/symbolic link/);
  });

  it("refuses a FIFO, a directory and a huge sparse file without blocking or reading them", async () => {
    const fifo = await run();
    execFileSync("mkfifo", [fifo.file]);
    expect(await within(fifo.ws.readResult(fifo.files, MAX).catch((e: Error) => e.message), 2000)).toMatch(/not a regular file/);
    const dir = await run();
    fs.mkdirSync(dir.file);
    await expect(dir.ws.readResult(dir.files, MAX)).rejects.toThrow(/not a regular file/);
    const sparse = await run();
    const handle = fs.openSync(sparse.file, "w");
    fs.ftruncateSync(handle, 64 * 1024 * MAX);
    fs.closeSync(handle);
    await expect(sparse.ws.readResult(sparse.files, MAX)).rejects.toThrow(/more than the 1048576/);
  });

  it("does not block on a result swapped for a FIFO between its check and its open", async () => {
    const { ws, files, file } = await run();
    fs.writeFileSync(file, "{}");
    swapAfterLastLstat(file, () => {
      fs.rmSync(file);
      execFileSync("mkfifo", [file]);
    });
    const outcome = await within(ws.readResult(files, MAX).catch((e: Error) => e.message), 2000);
    // Unblock a reader the old code left hanging in a libuv thread before asserting.
    if (outcome === "hung") fs.closeSync(fs.openSync(file, fsConstants.O_WRONLY | fsConstants.O_NONBLOCK));
    expect(outcome).toMatch(/not a regular file/);
  });

  it("never reads through a directory swapped for a link between its check and the open", async () => {
    const secret = hostSecret();
    const { ws, files, dir, file } = await run();
    fs.writeFileSync(file, "{}");
    swapAfterLastLstat(file, () => {
      fs.rmSync(dir, { recursive: true });
      fs.symlinkSync(secret, dir);
    });
    const outcome = await ws.readResult(files, MAX).catch((e: Error) => e);
    expect(outcome).toBeInstanceOf(Error);
    expect(String((outcome as Error).message)).not.toContain("host-secret-value");
  });

  it("says what is wrong without naming the executor's paths (the reason reaches the tenant)", async () => {
    const { ws, files, file } = await run();
    fs.writeFileSync(file, "{}");
    swapAfterLastLstat(file, () => {
      fs.rmSync(file);
      fs.symlinkSync("/etc/hostname", file);
    });
    const err = (await ws.readResult(files, MAX).catch((e: Error) => e)) as Error;
    expect(err).toBeInstanceOf(Error);
    expect(err.message).not.toContain(base);
    expect(err.message).toMatch(/result\.json/);
  });
});

/** Runs `swap` right after the executor's last lstat of `file` (the agent winning the race). */
function swapAfterLastLstat(file: string, swap: () => void): void {
  const lstat = fsp.lstat.bind(fsp);
  let done = false;
  vi.spyOn(fsp, "lstat").mockImplementation(async (p, opts?) => {
    const stat = await lstat(p, opts as never);
    if (!done && String(p) === file) {
      done = true;
      swap();
    }
    return stat;
  });
}

describe("the disk quota's measurement against hard links", () => {
  it("counts every name at least one block, so a million hard links to one file are not free", async () => {
    const dir = fs.mkdtempSync(path.join(base, "links-"));
    fs.writeFileSync(path.join(dir, "one"), "x");
    for (let i = 0; i < 2000; i++) fs.linkSync(path.join(dir, "one"), path.join(dir, `l${i}`));
    expect(await diskUsageOf(dir, Infinity)).toBeGreaterThanOrEqual(2002 * MIN_ENTRY_BYTES);
  });
});

describe("removing a run directory", () => {
  it("removes the workspace's links, never what they point to", async () => {
    const secret = hostSecret();
    const { ws, files } = await run();
    fs.symlinkSync(secret, path.join(files.workspace, "to-dir"));
    fs.symlinkSync(path.join(secret, "result.json"), path.join(files.workspace, "to-file"));
    await ws.remove(files);
    expect(fs.existsSync(files.root)).toBe(false);
    expect(fs.readFileSync(path.join(secret, "result.json"), "utf8")).toContain("host-secret-value");
  });
});

function lease(): Lease {
  return create(LeaseSchema, {
    leaseId: "01JLEASE00000000000000000A",
    expireTime: { seconds: BigInt(Math.floor(Date.now() / 1000) + 60), nanos: 0 },
    logGrant: "grant",
    dispatch: { id: "01JDISPATCH000000000000000", tenantId: "tenant-a", agent: "demo", task: "t", model: "m" },
    agent: { name: "demo", image: "outpost/demo-agent:latest" },
  });
}

/** A container the engine can neither wait on nor remove: it may still be running. */
class UnremovableRuntime extends FakeRuntime {
  override runForever = true;
  override removeFailures = Number.POSITIVE_INFINITY;
  override wait(): Promise<ContainerExit> {
    return Promise.reject(new Error("wait broke"));
  }
}

describe("a container the engine cannot remove", () => {
  it("keeps its run directory: deleting a tree a live agent can swap links into would follow them", async () => {
    const runtime = new UnremovableRuntime();
    const leases = new FakeLeases();
    const sink = new FakeSink();
    sink.autoAck = true;
    const ws = new FakeWorkspaces();
    await executeRun(lease(), { executorId: "ex-1", runtime, leases, logs: sink, workspaces: ws, logger: silentLogger, stopGraceMs: 10, logAckWaitMs: 100 });
    expect(leases.reports.at(-1)?.state).toBe(Dispatch_State.FAILED);
    expect(runtime.events).toContain("remove");
    expect(ws.removed).toEqual([]);
  });

  it("is not followed by the removal of its run directory at reconciliation either", async () => {
    const runtime = new (class extends FakeRuntime {
      override async list(): Promise<ContainerSummary[]> {
        return [{ id: "c9", name: "outpost-x", labels: { "dev.outpost.run-dir": "outpost-x" }, running: true, started: true } as ContainerSummary];
      }
      override async remove(): Promise<void> {
        throw new Error("(HTTP code 500) could not kill running container");
      }
    })();
    const ws = new (class extends FakeWorkspaces {
      override async listRuns() {
        return ["outpost-x", "outpost-gone"];
      }
    })();
    await reconcile({ executorId: "ex-1", runtime, leases: new FakeLeases(), workspaces: ws, logger: silentLogger });
    expect(ws.removed).toEqual(["/runs/outpost-gone"]);
  });
});

describe("output a terminal would act on", () => {
  it("shows control characters and escape sequences as text, keeping tabs and colours", () => {
    expect(terminalSafe("a\tb \x1b[31mred\x1b[0m")).toBe("a\tb \x1b[31mred\x1b[0m");
    // OSC 52 (write the viewer's clipboard), a title, cursor moves, a bare CR hiding what came before, NUL, C1 CSI.
    const hostile = "\x1b]52;c;ZWNobyBwd25lZA==\x07\x1b]0;title\x07\x1b[2K\x1b[1Aok\rfake\x00\u009b2J\x7f";
    const safe = terminalSafe(hostile);
    // eslint-disable-next-line no-control-regex -- the point
    expect(safe).not.toMatch(/[\x00-\x08\x0a-\x1f\x7f\u0080-\u009f]/);
    expect(safe).toContain("␛]52;c;ZWNobyBwd25lZA==␇");
    expect(terminalSafe(safe)).toBe(safe);
  });

  it("never cuts a character in two when a long line is cut (a lone surrogate is not UTF-8)", () => {
    const s = new LineSplitter();
    const line = "a" + "😀".repeat(20_000);
    const pieces = [...s.push(line + "\n")];
    for (const piece of pieces) expect(piece.isWellFormed(), `piece of ${piece.length}`).toBe(true);
    expect(pieces.join("")).toBe(line);
    const t = new LineSplitter();
    const unterminated = [...t.push(line), ...t.flush()];
    for (const piece of unterminated) expect(piece.isWellFormed()).toBe(true);
    expect(unterminated.join("")).toBe(line);
  });

  it("ships an agent's escape sequences as text", async () => {
    const runtime = new FakeRuntime();
    runtime.frames = [stdout("\x1b]52;c;cHduZWQ=\x07hi\x1b[32m!\x1b[0m\n")];
    const leases = new FakeLeases();
    const sink = new FakeSink();
    sink.autoAck = true;
    await executeRun(lease(), { executorId: "ex-1", runtime, leases, logs: sink, workspaces: new FakeWorkspaces(), logger: silentLogger, stopGraceMs: 10, logAckWaitMs: 500 });
    expect(sink.allSent.map((l) => l.text)).toEqual(["␛]52;c;cHduZWQ=␇hi\x1b[32m!\x1b[0m"]);
  });
});
