/**
 * The workspace disk quota on the real engine (linux/arm64 under qemu here): the executor's
 * core with the real Docker runtime and host run directories (only the dispatcher and
 * telemetry are fakes), the demo agent writing into its bind-mounted workspace with `write=MB`.
 */
import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { executeRun } from "../src/core/run.ts";
import { buildDemoAgent, demoLease, docker, dockerUp, IMAGE, realEngineExecutor, removeContainersOf, until } from "./boundary-harness.ts";
import { FakeLeases, silentLogger } from "./fakes.ts";

const EXECUTOR_ID = `test-disk-quota-${process.pid}`;
/** The demo agent with a VOLUME any user may write: the engine would make it a host directory. */
const VOLUME_IMAGE = `outpost/demo-agent-volume:test-${process.pid}`;
const QUOTA = 2 * 1024 * 1024;
const engineAvailable = dockerUp();

describe.skipIf(!engineAvailable)("workspace disk quota, on the real engine", () => {
  const runsDir = fs.mkdtempSync(path.join(os.tmpdir(), "outpost-disk-quota-"));
  const engine = realEngineExecutor(EXECUTOR_ID, runsDir, QUOTA);
  const { runtime, workspaces, sink, run } = engine;

  beforeAll(async () => {
    buildDemoAgent();
    const context = fs.mkdtempSync(path.join(os.tmpdir(), "outpost-volume-image-"));
    fs.writeFileSync(
      path.join(context, "Dockerfile"),
      `FROM ${IMAGE}\nUSER 0\nRUN mkdir /data && chmod 0777 /data\nUSER 65534:65534\nVOLUME /data\n`,
    );
    // The classic builder when this client has no buildx (as test/fixtures/agents/build.sh does).
    const buildkit = spawnSync("docker", ["buildx", "version"], { stdio: "ignore" }).status === 0;
    execFileSync("docker", ["build", "-q", "--platform", "linux/arm64", "-t", VOLUME_IMAGE, context], {
      env: { ...process.env, ...(buildkit ? {} : { DOCKER_BUILDKIT: "0" }) },
      stdio: "ignore",
      timeout: 120_000,
    });
    fs.rmSync(context, { recursive: true, force: true });
    await engine.start();
  });

  afterAll(async () => {
    await engine.stop();
    fs.rmSync(runsDir, { recursive: true, force: true });
    spawnSync("docker", ["rmi", "-f", VOLUME_IMAGE], { stdio: "ignore" });
  });

  it("ends a run that writes past its quota FAILED with the quota, long before the agent would have ended", async () => {
    const { end, elapsedMs, texts, id } = await run("write=8 sleep=40");
    expect(texts).toContain("wrote 8 MiB");
    expect(end.state).toBe(Dispatch_State.FAILED);
    const used = Number(/^workspace exceeded its disk quota of 2097152 bytes \((\d+) bytes or more in use\)$/.exec(end.failureReason ?? "")?.[1]);
    expect(used).toBeGreaterThan(QUOTA);
    // Killed at once (no grace): SIGKILL, or SIGTERM if the agent's trap was quicker.
    expect([137, 143]).toContain(end.exitCode);
    expect(texts).not.toContain("done, exit code 0");
    expect(elapsedMs).toBeLessThan(30_000);
    // Nothing is left of it: neither its container nor its workspace.
    expect(docker("ps", "-aq", "--filter", `label=dev.outpost.dispatch-id=${id}`)).toBe("");
    await until("its run directory to be removed", () => fs.readdirSync(runsDir).length === 0, 10_000);
  });

  it("lets a run under its quota succeed, with its result", async () => {
    const { end, texts } = await run("write=1");
    expect(texts).toContain("wrote 1 MiB");
    expect(end).toMatchObject({ state: Dispatch_State.SUCCEEDED, exitCode: 0 });
    expect(end.result).toBeDefined();
  });

  it("an image's VOLUME is no way around the quota: it is a size-limited tmpfs, not a host directory", async () => {
    const { end, texts } = await run("", {
      image: VOLUME_IMAGE,
      command: ["/bin/sh", "-c", "dd if=/dev/zero of=/data/fill bs=1048576 count=100 2>&1; grep ' /data ' /proc/mounts"],
    });
    expect(texts).toContainEqual(expect.stringMatching(/No space left on device/));
    const written = Number(texts.map((t) => /^(\d+)\+\d+ records out$/.exec(t)?.[1]).find(Boolean));
    expect(written).toBeGreaterThan(0);
    expect(written).toBeLessThanOrEqual(64);
    expect(texts.some((t) => /^tmpfs \/data tmpfs .*size=65536k/.test(t))).toBe(true);
    expect(end.state).toBe(Dispatch_State.SUCCEEDED);
  });

  it("fails a run that wrote past its quota and exited before any measurement while it ran", async () => {
    // executeRun directly, measuring once a minute: only the measurement after the exit sees it.
    const lease = demoLease({ task: "write=4", executorId: `${EXECUTOR_ID}-direct`, timeoutMs: 60_000 });
    const direct = new FakeLeases();
    await executeRun(lease, {
      executorId: `${EXECUTOR_ID}-direct`,
      runtime,
      leases: direct,
      logs: sink,
      workspaces,
      logger: silentLogger,
      stopGraceMs: 3000,
      logAckWaitMs: 2000,
      workspaceQuota: { limitBytes: QUOTA, checkIntervalMs: 60_000 },
    });
    const end = direct.reports.at(-1)!;
    expect(end.state).toBe(Dispatch_State.FAILED);
    expect(end.exitCode).toBe(0);
    expect(end.failureReason).toMatch(/^workspace exceeded its disk quota of 2097152 bytes \(\d+ bytes or more in use\)$/);
    removeContainersOf(`${EXECUTOR_ID}-direct`);
  });
});
