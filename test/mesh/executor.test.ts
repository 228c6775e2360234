/**
 * The executor inside the real mesh (issue #5): results validated and returned on the
 * dispatch, timeout and cancellation by signal, and reconciliation after the executor process
 * is killed with SIGKILL mid-run and started again (the run is taken up again), or not started
 * again: then the dispatcher's own lease expiry ends the run (leases live 10 s here; heartbeats
 * renew them every 3.3 s).
 */
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { followLogs } from "@outpost/cli";
import { internalClient, type Identity } from "@outpost/platform";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { LeaseService } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { LogIngestService } from "@outpost/proto/outpost/telemetry/v1/log_ingest_service_pb.js";
import { LogStream, type LogChunk } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";
import Docker from "dockerode";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startTestMesh, type TestMesh } from "./harness.ts";
import { signerFor } from "../support/signing.ts";

const docker = new Docker();
const EXECUTOR_LABEL = `dev.outpost.executor-id=test-${process.pid}`;
const TERMINAL = new Set([Dispatch_State.SUCCEEDED, Dispatch_State.FAILED, Dispatch_State.TIMED_OUT, Dispatch_State.CANCELLED]);
/** Per-run output cap of this mesh's executor: far above what the other tests' runs print. */
const OUTPUT_CAP = 16 * 1024;
let t: TestMesh;
let tenant: Awaited<ReturnType<TestMesh["newTenant"]>>;

beforeAll(async () => {
  await docker.ping();
  t = await startTestMesh({ env: { OUTPOST_STOP_GRACE_MS: "2000", OUTPOST_LEASE_TTL_MS: "10000", OUTPOST_EXECUTOR_RUN_OUTPUT_MAX_BYTES: String(OUTPUT_CAP) } });
  tenant = await t.newTenant("Executor");
});

afterAll(async () => {
  await t?.mesh.stop();
});

async function labelledContainers(): Promise<number> {
  return (await docker.listContainers({ all: true, filters: { label: [EXECUTOR_LABEL] } })).length;
}

async function waitFor(dispatchId: string, states: Set<Dispatch_State>, timeoutMs = 60_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const { dispatch } = await tenant.clients.dispatches.getDispatch({ dispatchId });
    if (states.has(dispatch!.state)) return dispatch!;
    if (Date.now() > deadline) throw new Error(`dispatch ${dispatchId} stayed ${Dispatch_State[dispatch!.state]}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

describe("executor in the mesh", () => {
  it("returns the agent's result on the dispatch", async () => {
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: 'result={"summary":"mesh-ok","n":3}' });
    const lines: string[] = [];
    const end = await followLogs(tenant.clients.logs, dispatch!.id, (chunk) => lines.push(chunk.text));
    expect(end.state).toBe(Dispatch_State.SUCCEEDED);
    const { dispatch: final } = await tenant.clients.dispatches.getDispatch({ dispatchId: dispatch!.id });
    expect(final!.result).toEqual({ summary: "mesh-ok", n: 3 });
  });

  it("times out an agent that ignores SIGTERM (TIMED_OUT) and cancels a running one (CANCELLED)", async () => {
    const stubborn = await tenant.clients.dispatches.createDispatch({
      agent: "demo",
      task: "ignore-term sleep=60",
      timeout: durationFromMs(3000),
    });
    const cancelled = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "sleep=60" });
    await waitFor(cancelled.dispatch!.id, new Set([Dispatch_State.RUNNING]));
    await tenant.clients.dispatches.cancelDispatch({ dispatchId: cancelled.dispatch!.id });
    const [timedOut, stopped] = await Promise.all([
      waitFor(stubborn.dispatch!.id, TERMINAL),
      waitFor(cancelled.dispatch!.id, TERMINAL),
    ]);
    expect(timedOut.state).toBe(Dispatch_State.TIMED_OUT);
    expect(timedOut.failureReason).toBe("timed out after 3s");
    expect(timedOut.exitCode).toBe(137);
    expect(stopped.state).toBe(Dispatch_State.CANCELLED);
    expect(await labelledContainers()).toBe(0);
  });

  it("after kill -9 of the executor mid-run and a restart within the lease's life, the run is taken up again and ends by its own exit, with no container left", async () => {
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "lines=2 sleep=5" });
    const id = dispatch!.id;
    await waitFor(id, new Set([Dispatch_State.RUNNING]));
    expect(await labelledContainers()).toBe(1);
    await t.mesh.kill("executor", "SIGKILL");
    expect(await labelledContainers()).toBe(1); // the agent outlives its executor
    await t.mesh.start("executor");
    const chunks: LogChunk[] = [];
    const end = await followLogs(tenant.clients.logs, id, (chunk) => chunks.push(chunk));
    expect(end.state).toBe(Dispatch_State.SUCCEEDED);
    const final = await waitFor(id, TERMINAL);
    expect(final).toMatchObject({ state: Dispatch_State.SUCCEEDED, attempt: 1, exitCode: 0, result: { lines: 2 } });
    // One log, numbered without a gap: the line saying the executor restarted, then the rest.
    expect(chunks.map((c) => Number(c.seq))).toEqual(chunks.map((_, i) => i + 1));
    const texts = chunks.map((c) => c.text);
    const notice = texts.findIndex((text) => text.startsWith("[outpost] the executor watching this run restarted"));
    expect(notice).toBeGreaterThan(0);
    expect(chunks[notice]!.stream).toBe(LogStream.STDERR);
    expect(texts.indexOf("done, exit code 0")).toBeGreaterThan(notice);
    expect(await labelledContainers()).toBe(0);
  });

  it("a run retried after its first attempt printed and its executor vanished before RUNNING keeps that output, and the retry's follows it", async () => {
    // The first attempt is a stand-in executor that takes the lease, writes two lines through
    // the real telemetry under the lease's grant and then goes silent, as one whose process died
    // between starting the container and reporting RUNNING: the lease expires with the run
    // STARTING, so the dispatcher retries it as one that never started.
    await t.mesh.kill("executor", "SIGTERM");
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "lines=3" });
    const id = dispatch!.id;
    const identity: Identity = { kind: "service", principal: "executor/vanishing" };
    const signingKeys = signerFor(identity);
    const leases = internalClient(LeaseService, { baseUrl: t.mesh.urls.dispatcher, signingKeys, identity });
    const ingest = internalClient(LogIngestService, { baseUrl: t.mesh.urls.telemetry, signingKeys, identity });
    const { lease } = await leases.acquireLease({ executorId: "vanishing", wait: durationFromMs(5000) });
    expect(lease?.dispatch?.id).toBe(id);
    async function* firstAttemptOutput() {
      yield {
        dispatchId: id,
        tenantId: tenant.tenantId,
        grant: lease!.logGrant,
        chunks: [1, 2].map((n) => ({ seq: BigInt(n), stream: LogStream.STDOUT, text: `first attempt ${n}` })),
      };
    }
    const acks: bigint[] = [];
    for await (const answer of ingest.ingestLogs(firstAttemptOutput())) acks.push(answer.ackedSeq);
    expect(acks).toEqual([2n]);

    await t.mesh.start("executor");
    const chunks: LogChunk[] = [];
    const end = await followLogs(tenant.clients.logs, id, (chunk) => chunks.push(chunk));
    expect(end.state).toBe(Dispatch_State.SUCCEEDED);
    const final = await waitFor(id, TERMINAL);
    expect(final.attempt).toBe(2);
    // Every line once, numbered without a gap: the first attempt's two, then the retry's own
    // (the demo agent's "line 1".."line 3" among them), none of them dropped as a duplicate.
    expect(chunks.map((c) => Number(c.seq))).toEqual(chunks.map((_, i) => i + 1));
    expect(chunks.slice(0, 2).map((c) => c.text)).toEqual(["first attempt 1", "first attempt 2"]);
    const retried = chunks.slice(2).map((c) => c.text);
    expect(retried.slice(0, 2)).toEqual(["outpost demo agent starting", `dispatch ${id} model ${final.model}`]);
    expect(retried.filter((text) => /^line \d$/.test(text))).toEqual(["line 1", "line 2", "line 3"]);
    expect(Number(end.lastSeq)).toBe(chunks.length);
  });

  it("a run printing past the output cap ends its log with the truncation notice and still finishes with its result", async () => {
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "lines=5000" });
    const chunks: LogChunk[] = [];
    const end = await followLogs(tenant.clients.logs, dispatch!.id, (chunk) => chunks.push(chunk));
    expect(end.state).toBe(Dispatch_State.SUCCEEDED);
    expect(chunks.map((c) => Number(c.seq))).toEqual(chunks.map((_, i) => i + 1));
    expect(Number(end.lastSeq)).toBe(chunks.length);
    const notice = chunks.at(-1)!;
    expect(notice.stream).toBe(LogStream.STDERR);
    expect(notice.text).toBe("[outpost] output truncated: this run printed more than 16 KiB of output; the rest of it is not kept");
    const kept = chunks.slice(0, -1);
    // Each line counts its bytes plus 64 (log-shipper.ts outputCost): kept up to the cap, and no further.
    const keptCost = kept.reduce((sum, c) => sum + Buffer.byteLength(c.text) + 64, 0);
    expect(keptCost).toBeLessThanOrEqual(OUTPUT_CAP);
    expect(keptCost).toBeGreaterThan(OUTPUT_CAP - 200);
    expect(kept.map((c) => c.text)).not.toContain("line 5000");
    // The agent was not held up: it printed everything, wrote its result and exited 0.
    const done = await waitFor(dispatch!.id, TERMINAL);
    expect(done.exitCode).toBe(0);
    expect(done.result).toMatchObject({ lines: 5000 });
  });

  it("with its executor gone for good, the lease expires and the dispatcher fails the run \"executor lost\"", async () => {
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "sleep=60" });
    await waitFor(dispatch!.id, new Set([Dispatch_State.RUNNING]));
    await t.mesh.kill("executor", "SIGKILL");
    // No executor reports or reconciles: only the dispatcher's sweep can end it.
    const final = await waitFor(dispatch!.id, TERMINAL, 30_000);
    expect(final.state).toBe(Dispatch_State.FAILED);
    expect(final.failureReason).toBe("executor lost");
    // An executor that comes back removes the container its predecessor left.
    await t.mesh.start("executor");
    const deadline = Date.now() + 30_000;
    while ((await labelledContainers()) > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 250));
    expect(await labelledContainers()).toBe(0);
  });
});
