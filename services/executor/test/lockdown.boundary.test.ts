/**
 * SPEC E2 by behaviour, on the real engine (linux/arm64 under qemu here): the demo agent's
 * directives attempt what the lock-down must prevent, and each test checks both the
 * container's configuration (engine inspect) and what happened.
 */
import fs from "node:fs";
import type { RunningServer } from "@outpost/platform";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
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
  TERMINAL,
  until,
  type ExecutorProcess,
  type LeaseOptions,
} from "./boundary-harness.ts";

const EXECUTOR_ID = `test-lockdown-${process.pid}`;
const engineAvailable = dockerUp();

describe.skipIf(!engineAvailable)("lock-down of every run, by behaviour", () => {
  const dispatcher = new StubDispatcher();
  const telemetry = new StubTelemetry();
  const servers: RunningServer[] = [];
  let executor: ExecutorProcess;

  /** Runs one lease; returns its terminal report, output, and the engine's view of its container while it ran. */
  async function run(options: LeaseOptions) {
    const lease = demoLease(options);
    dispatcher.enqueue(lease);
    const id = lease.dispatch!.id;
    let inspect: { HostConfig: Record<string, unknown>; Config: Record<string, unknown> } | undefined;
    const end = await until(
      () => `terminal report of ${id}\n${executor.output().slice(-2000)}`,
      () => {
        if (!inspect) {
          const cid = docker("ps", "-aq", "--filter", `label=dev.outpost.dispatch-id=${id}`);
          if (cid) {
            try {
              inspect = JSON.parse(docker("inspect", cid.split("\n")[0]!))[0];
            } catch {
              // gone between ps and inspect
            }
          }
        }
        return dispatcher.reportsFor(id).find((r) => TERMINAL.has(r.state));
      },
      90_000,
    );
    expect(docker("ps", "-aq", "--filter", `label=dev.outpost.dispatch-id=${id}`)).toBe("");
    return { end, texts: telemetry.textsFor(id), inspect };
  }

  beforeAll(async () => {
    buildDemoAgent();
    servers.push(await startStub("stub-dispatcher", dispatcher.routes), await startStub("stub-telemetry", telemetry.routes));
    executor = spawnExecutor({
      OUTPOST_EXECUTOR_ID: EXECUTOR_ID,
      OUTPOST_DISPATCHER_URL: servers[0]!.url,
      OUTPOST_TELEMETRY_URL: servers[1]!.url,
      OUTPOST_EXECUTOR_SLOTS: "1",
    });
    await executor.port();
  });

  afterAll(async () => {
    if (executor) expect(await executor.stop()).toBe(0);
    for (const server of servers) await server.close();
    removeContainersOf(EXECUTOR_ID);
    if (executor) fs.rmSync(executor.dataDir, { recursive: true, force: true });
  });

  it("writing to / fails: the root filesystem is read-only", async () => {
    const { end, texts, inspect } = await run({ task: "write-root" });
    expect(inspect?.HostConfig.ReadonlyRootfs).toBe(true);
    expect(texts).toContain("write to / failed");
    expect(texts).not.toContain("write to / succeeded");
    expect(end.state).toBe(Dispatch_State.SUCCEEDED);
  });

  it("a fork bomb is contained by the pids limit", async () => {
    const { end, texts, inspect } = await run({ task: "fork-bomb", agent: { pidsLimit: 32n } });
    expect(inspect?.HostConfig.PidsLimit).toBe(32);
    const line = texts.find((t) => t.startsWith("fork bomb started"));
    expect(line).toBeDefined();
    const started = Number(/started (\d+) processes/.exec(line!)?.[1]);
    // Each busybox process is a qemu process with threads here, so usually fewer than 32 fit.
    // A child whose qemu cannot start its threads dies at once and frees its slot, so the count
    // of starts can pass 32 a little (35 was seen); never anywhere near the 1000 tried.
    expect(started).toBeGreaterThan(0);
    expect(started).toBeLessThan(64);
    expect(TERMINAL.has(end.state)).toBe(true);
  });

  it("allocating past the memory limit ends FAILED with reason out of memory", async () => {
    const { end, texts, inspect } = await run({ task: "alloc=400", agent: { memoryBytes: 96n * 1024n * 1024n } });
    expect(inspect?.HostConfig.Memory).toBe(96 * 1024 * 1024);
    expect(inspect?.HostConfig.MemorySwap).toBe(96 * 1024 * 1024);
    expect(texts).toContain("allocating 400 MiB");
    expect(texts.some((t) => t.startsWith("allocated "))).toBe(false);
    expect(end).toMatchObject({ state: Dispatch_State.FAILED, failureReason: "out of memory", exitCode: 137 });
  });

  it("reaching the network fails when the agent's policy says none", async () => {
    // The docker bridge gateway is the host itself; with network "none" there is no route to it
    // (or anywhere), so the attempt fails at once without a packet leaving the container.
    const gateway = docker("network", "inspect", "bridge", "-f", "{{(index .IPAM.Config 0).Gateway}}") || "172.17.0.1";
    const { end, texts, inspect } = await run({ task: `net=${gateway}:9` });
    expect(inspect?.HostConfig.NetworkMode).toBe("none");
    const line = texts.find((t) => t.startsWith("network"));
    expect(line).toMatch(/^network unreachable: .*Network is unreachable/);
    expect(end.state).toBe(Dispatch_State.SUCCEEDED);
  });
});
