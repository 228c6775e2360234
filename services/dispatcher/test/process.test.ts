/**
 * Crosses the real boundary: the dispatcher as its own process on a real port, called over gRPC
 * (h2c) as a tenant and as an executor, with telemetry unreachable.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { errorInfoOf, internalClient } from "@outpost/platform";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { DispatchService } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { LeaseService } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { FleetService } from "@outpost/proto/outpost/dispatch/v1/fleet_service_pb.js";
import { ADMIN, EXECUTOR, tenantIdentity } from "./helpers.ts";

import { freePort, startDispatcherProcess, startProcess, stop, type Proc } from "./process-helpers.ts";
import { signerFor, signingEnv } from "../../../test/support/signing.ts";
const TENANT = "01JTENANTAAAAAAAAAAAAAAAAA";

describe("dispatcher process", () => {
  let dataDir: string;
  let baseUrl: string;
  let proc: Proc;

  beforeAll(async () => {
    dataDir = mkdtempSync(path.join(tmpdir(), "outpost-dispatcher-proc-"));
    // A short overrun, so the timeout backstop is seen within the test (runs here time out after 1 s).
    ({ baseUrl, proc } = await startDispatcherProcess(dataDir, { OUTPOST_DISPATCHER_TIMEOUT_OVERRUN_MS: "300" }));
  });

  afterAll(async () => {
    await stop(proc);
    if (dataDir) rmSync(dataDir, { recursive: true, force: true });
  });

  it("runs a dispatch end to end over gRPC with telemetry down", async () => {
    const tenant = internalClient(DispatchService, { baseUrl, signingKeys: signerFor(tenantIdentity(TENANT)), identity: tenantIdentity(TENANT) });
    const executor = internalClient(LeaseService, { baseUrl, signingKeys: signerFor(EXECUTOR), identity: EXECUTOR });

    const created = (await tenant.createDispatch({ agent: "demo", task: "exit=3", requestId: "proc-1" })).dispatch!;
    expect(created.state).toBe(Dispatch_State.QUEUED);
    expect(created.model).toBe("demo-1");
    const fetched = (await tenant.getDispatch({ dispatchId: created.id })).dispatch!;
    expect(fetched.id).toBe(created.id);
    expect(fetched.task).toBe("exit=3");

    const { lease } = await executor.acquireLease({ executorId: "host-1", wait: durationFromMs(2000) });
    expect(lease?.dispatch?.id).toBe(created.id);
    expect(lease?.agent?.name).toBe("demo");
    expect(lease?.dispatch?.attempt).toBe(1);
    const hb = await executor.heartbeat({ dispatchId: created.id, leaseId: lease!.leaseId });
    expect(hb.cancelRequested).toBe(false);
    expect(hb.expireTime).toBeDefined();

    const running = await executor.reportRunState({ dispatchId: created.id, leaseId: lease!.leaseId, state: Dispatch_State.RUNNING });
    expect(running.dispatch?.state).toBe(Dispatch_State.RUNNING);
    const done = await executor.reportRunState({
      dispatchId: created.id,
      leaseId: lease!.leaseId,
      state: Dispatch_State.SUCCEEDED,
      exitCode: 3,
      lastLogSeq: 5n,
    });
    expect(done.dispatch?.state).toBe(Dispatch_State.SUCCEEDED);

    const final = (await tenant.getDispatch({ dispatchId: created.id })).dispatch!;
    expect(final.state).toBe(Dispatch_State.SUCCEEDED);
    expect(final.attempt).toBe(1);
    expect(final.exitCode).toBe(3);
    expect(final.startTime).toBeDefined();
    expect(final.endTime).toBeDefined();
    // The queue is empty now.
    expect((await executor.acquireLease({ executorId: "host-1" })).lease).toBeUndefined();
  });

  it("ends a run its executor keeps RUNNING past its timeout: TIMED_OUT, and the executor's heartbeat answers LEASE_LOST", async () => {
    const tenant = internalClient(DispatchService, { baseUrl, signingKeys: signerFor(tenantIdentity(TENANT)), identity: tenantIdentity(TENANT) });
    const executor = internalClient(LeaseService, { baseUrl, signingKeys: signerFor(EXECUTOR), identity: EXECUTOR });
    const created = (await tenant.createDispatch({ agent: "demo", task: "sleep=60", timeout: durationFromMs(1000) })).dispatch!;
    const { lease } = await executor.acquireLease({ executorId: "host-1", wait: durationFromMs(2000) });
    expect(lease?.dispatch?.id).toBe(created.id);
    await executor.reportRunState({ dispatchId: created.id, leaseId: lease!.leaseId, state: Dispatch_State.RUNNING });
    // An executor that never stops the run but goes on heartbeating.
    const beat = () => executor.heartbeat({ dispatchId: created.id, leaseId: lease!.leaseId });
    expect((await beat()).cancelRequested).toBe(false);
    await new Promise((resolve) => setTimeout(resolve, 1500));
    const refused = await beat().then(() => undefined, (err: unknown) => ConnectError.from(err));
    expect(refused?.code).toBe(Code.FailedPrecondition);
    expect(errorInfoOf(refused!)?.reason).toBe("LEASE_LOST");
    const ended = (await tenant.getDispatch({ dispatchId: created.id })).dispatch!;
    expect(ended.state).toBe(Dispatch_State.TIMED_OUT);
    expect(ended.failureReason).toBe("timed out after 1 s; ended by the dispatcher, the executor had not stopped it 0.3 s later");
  });
});

describe("dispatcher process lifecycle", () => {
  it("exits 78 naming OUTPOST_TELEMETRY_URL when it is missing", async () => {
    const dataDir = mkdtempSync(path.join(tmpdir(), "outpost-dispatcher-cfg-"));
    try {
      const proc = startProcess({
        ...signingEnv("dispatcher"),
        OUTPOST_DISPATCHER_PORT: String(await freePort()),
        OUTPOST_DATA_DIR: dataDir,
      });
      expect(await proc.exited).toBe(78);
      expect(proc.output()).toContain("OUTPOST_TELEMETRY_URL");
    } finally {
      rmSync(dataDir, { recursive: true, force: true });
    }
  });

  it("exits 78 naming OUTPOST_LOG_LEVEL when the level is not one pino knows", async () => {
    const proc = startProcess({ ...signingEnv("dispatcher"), OUTPOST_LOG_LEVEL: "loud" });
    expect(await proc.exited).toBe(78);
    expect(proc.output()).toContain("OUTPOST_LOG_LEVEL");
    expect(proc.output()).toContain("loud");
  });

  it("serves with its Redis unreachable, and fleet status says so instead of failing", async () => {
    const dataDir = mkdtempSync(path.join(tmpdir(), "outpost-dispatcher-redis-"));
    let proc: Proc | undefined;
    try {
      const started = await startDispatcherProcess(dataDir, { OUTPOST_REDIS_URL: `redis://127.0.0.1:${await freePort()}` });
      proc = started.proc;
      const fleet = internalClient(FleetService, { baseUrl: started.baseUrl, signingKeys: signerFor(ADMIN), identity: ADMIN });
      const status = await fleet.getFleetStatus({});
      expect(status.degraded.some((d) => d.startsWith("redis: unreachable"))).toBe(true);
      expect(status.agents.map((a) => a.agent)).toContain("demo");
    } finally {
      await stop(proc);
      rmSync(dataDir, { recursive: true, force: true });
    }
  });

  it("on SIGTERM an open AcquireLease long-poll returns empty and the process exits 0", async () => {
    const dataDir = mkdtempSync(path.join(tmpdir(), "outpost-dispatcher-term-"));
    let proc: Proc | undefined;
    try {
      const started = await startDispatcherProcess(dataDir);
      proc = started.proc;
      const executor = internalClient(LeaseService, { baseUrl: started.baseUrl, signingKeys: signerFor(EXECUTOR), identity: EXECUTOR });
      const t0 = Date.now();
      const polling = executor.acquireLease({ executorId: "host-1", wait: durationFromMs(25_000) });
      await new Promise((r) => setTimeout(r, 500));
      proc.child.kill("SIGTERM");
      const res = await polling;
      expect(res.lease).toBeUndefined();
      expect(await proc.exited).toBe(0);
      expect(Date.now() - t0).toBeLessThan(15_000);
    } finally {
      await stop(proc);
      rmSync(dataDir, { recursive: true, force: true });
    }
  });
});
