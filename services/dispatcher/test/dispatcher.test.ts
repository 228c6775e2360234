/** The dispatcher core against a real in-memory store, with a recording RunEvents and a controllable clock. */
import { beforeEach, describe, expect, it, vi } from "vitest";
import { Code, ConnectError } from "@connectrpc/connect";
import { ModelTier } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { createLogger, errorInfoOf, metricsRegistry, resourceExhausted } from "@outpost/platform";
import { AgentRegistry, builtinAgents } from "../src/core/agents.ts";
import { DEFAULT_TIMEOUT_OVERRUN_MS, Dispatcher, type CreateDispatchInput, type RunEvents } from "../src/core/dispatcher.ts";
import { Notifier, RESYNC } from "../src/core/notifier.ts";
import type { Admission, TenantAdmission } from "../src/core/ports.ts";
import { SqliteDispatchStore } from "../src/store/sqlite-store.ts";
import type { DispatchRecord } from "../src/store/store.ts";
import { expectError } from "./helpers.ts";

const LEASE_TTL_MS = 10_000;
const MAX_TIMEOUT_MS = 3_600_000;
const TENANT = "tenant-a";
const OTHER = "tenant-b";

class RecordingRunEvents implements RunEvents {
  created: DispatchRecord[] = [];
  retentions: (number | undefined)[] = [];
  ended: { dispatch: DispatchRecord; lastLogSeq: bigint }[] = [];
  failWith: Error | undefined;
  async runCreated(dispatch: DispatchRecord, logRetentionMs?: number) {
    this.created.push(dispatch);
    this.retentions.push(logRetentionMs);
    if (this.failWith) throw this.failWith;
  }
  async runEnded(dispatch: DispatchRecord, lastLogSeq: bigint) {
    this.ended.push({ dispatch, lastLogSeq });
    if (this.failWith) throw this.failWith;
  }
}

let store: SqliteDispatchStore;
let events: RecordingRunEvents;
let clock: { now: number } | undefined;
let dispatcher: Dispatcher;

function makeDispatcher(options: { fakeClock?: boolean; maxTimeoutMs?: number; queueRecheckMs?: number } = {}) {
  clock = options.fakeClock ? { now: Date.parse("2025-06-01T00:00:00Z") } : undefined;
  const c = clock;
  dispatcher = new Dispatcher({
    store,
    agents: new AgentRegistry(builtinAgents("outpost/demo-agent:test")),
    notifier: new Notifier(),
    runEvents: events,
    logger: createLogger("dispatcher-test", "silent"),
    leaseTtlMs: LEASE_TTL_MS,
    maxTimeoutMs: options.maxTimeoutMs ?? MAX_TIMEOUT_MS,
    now: c ? () => c.now : undefined,
    queueRecheckMs: options.queueRecheckMs,
  });
  return dispatcher;
}

/** A dispatcher over the same store with this admission (and options). */
function dispatcherWith(admission: Partial<TenantAdmission>, options: Partial<ConstructorParameters<typeof Dispatcher>[0]> = {}): Dispatcher {
  return new Dispatcher({
    store,
    agents: new AgentRegistry(builtinAgents("outpost/demo-agent:test")),
    notifier: new Notifier(),
    runEvents: events,
    logger: createLogger("dispatcher-test", "silent"),
    leaseTtlMs: LEASE_TTL_MS,
    maxTimeoutMs: MAX_TIMEOUT_MS,
    admission: {
      admit: async () => ({ maxTimeoutMs: MAX_TIMEOUT_MS }),
      release: async () => {},
      suspendedTenants: async () => new Set<string>(),
      ...admission,
    },
    ...options,
  });
}

/** A dispatcher over the same store whose admission grants `granted` to every dispatch. */
function withAdmission(granted: Admission): Dispatcher {
  return dispatcherWith({ admit: async () => granted });
}

function input(overrides: Partial<CreateDispatchInput> = {}): CreateDispatchInput {
  return {
    agent: "claude",
    task: "fix the flaky test",
    repoUrl: "",
    repoRef: "",
    secretNames: [],
    env: {},
    labels: {},
    requestId: "",
    traceparent: "",
    ...overrides,
  };
}

const never = new AbortController().signal;

beforeEach(() => {
  store = new SqliteDispatchStore(":memory:");
  events = new RecordingRunEvents();
  makeDispatcher();
});

/** The dispatcher's count of unstored releases given up, for one reason. */
async function droppedReleases(reason: "queue_full" | "gave_up"): Promise<number> {
  const metric = metricsRegistry.getSingleMetric("outpost_dispatch_unstored_releases_dropped_total");
  const values = metric ? (await metric.get()).values : [];
  return values.find((v) => v.labels.reason === reason)?.value ?? 0;
}

/** Creates and leases a dispatch; answers the leased record. */
async function leased(overrides: Partial<CreateDispatchInput> = {}) {
  const created = await dispatcher.create(TENANT, input(overrides));
  const got = await dispatcher.acquireLease("executor/host-1", 0, never);
  expect(got?.dispatch.id).toBe(created.id);
  return got!.dispatch;
}

describe("create", () => {
  it("queues a dispatch with the agent's default tier model and default timeout", async () => {
    const d = await dispatcher.create(TENANT, input());
    expect(d.id).toMatch(/^[0-9A-HJKMNP-TV-Z]{26}$/);
    expect(d.state).toBe("QUEUED");
    expect(d.attempt).toBe(0);
    expect(d.tenantId).toBe(TENANT);
    expect(d.model).toBe("claude-sonnet-4-5");
    expect(d.modelTier).toBe(ModelTier.BALANCED);
    expect(d.timeoutMs).toBe(1800_000);
    expect(await store.get(d.id)).toEqual(d);
    expect(events.created.map((r) => r.id)).toEqual([d.id]);
  });

  it("resolves the model by tier and by explicit id", async () => {
    const flagship = await dispatcher.create(TENANT, input({ modelTier: ModelTier.FLAGSHIP }));
    expect(flagship.model).toBe("claude-opus-4-5");
    expect(flagship.modelTier).toBe(ModelTier.FLAGSHIP);
    const fast = await dispatcher.create(TENANT, input({ modelTier: ModelTier.FAST }));
    expect(fast.model).toBe("claude-haiku-4-5");
    const explicit = await dispatcher.create(TENANT, input({ modelId: "claude-custom-1" }));
    expect(explicit.model).toBe("claude-custom-1");
    expect(explicit.modelTier).toBe(ModelTier.UNSPECIFIED);
    const codex = await dispatcher.create(TENANT, input({ agent: "codex" }));
    expect(codex.model).toBe("gpt-5.2-codex");
  });

  it("an unknown agent is INVALID_ARGUMENT listing the available agents", async () => {
    const err = await expectError(dispatcher.create(TENANT, input({ agent: "hal9000" })), Code.InvalidArgument, "AGENT_UNKNOWN");
    expect(errorInfoOf(err)?.metadata.field).toBe("agent");
    for (const name of ["claude", "codex", "gemini", "aider", "grok", "demo"]) expect(err.rawMessage).toContain(name);
    expect(events.created).toEqual([]);
    expect(await store.list(TENANT, {}, 10)).toEqual([]);
  });

  it("a tier the agent does not offer is INVALID_ARGUMENT on model_tier", async () => {
    const err = await expectError(dispatcher.create(TENANT, input({ agent: "codex", modelTier: ModelTier.FAST })), Code.InvalidArgument);
    expect(errorInfoOf(err)?.metadata.field).toBe("model_tier");
    expect(err.rawMessage).toContain("FLAGSHIP");
    expect(await store.list(TENANT, {}, 10)).toEqual([]);
  });

  it("takes the given timeout, capped at maxTimeoutMs; the default is capped too", async () => {
    expect((await dispatcher.create(TENANT, input({ timeoutMs: 120_000 }))).timeoutMs).toBe(120_000);
    expect((await dispatcher.create(TENANT, input({ timeoutMs: MAX_TIMEOUT_MS * 10 }))).timeoutMs).toBe(MAX_TIMEOUT_MS);
    expect((await dispatcher.create(TENANT, input({ agent: "demo" }))).timeoutMs).toBe(300_000);
    makeDispatcher({ maxTimeoutMs: 60_000 });
    expect((await dispatcher.create(TENANT, input())).timeoutMs).toBe(60_000);
  });

  it("the same request_id returns the same dispatch and announces it once", async () => {
    const first = await dispatcher.create(TENANT, input({ requestId: "req-1", task: "one" }));
    const second = await dispatcher.create(TENANT, input({ requestId: "req-1", task: "two" }));
    expect(second.id).toBe(first.id);
    expect(second.task).toBe("one");
    expect(events.created).toHaveLength(1);
    const parallel = await Promise.all(Array.from({ length: 5 }, () => dispatcher.create(TENANT, input({ requestId: "req-2" }))));
    expect(new Set(parallel.map((d) => d.id)).size).toBe(1);
    expect(events.created).toHaveLength(2);
    // Another tenant's request_id is its own.
    const other = await dispatcher.create(OTHER, input({ requestId: "req-1" }));
    expect(other.id).not.toBe(first.id);
  });

  it("a telemetry failure does not fail create, and the run is still leasable", async () => {
    events.failWith = new Error("telemetry unavailable");
    const d = await dispatcher.create(TENANT, input());
    expect(d.state).toBe("QUEUED");
    expect(events.created).toHaveLength(1);
    expect(await store.get(d.id)).toEqual(d);
    const got = await dispatcher.acquireLease("executor/1", 0, never);
    expect(got?.dispatch.id).toBe(d.id);
  });
});

describe("get", () => {
  it("another tenant's dispatch answers exactly like a missing one", async () => {
    const d = await dispatcher.create(TENANT, input());
    expect((await dispatcher.get(TENANT, d.id)).id).toBe(d.id);
    const foreign = await expectError(dispatcher.get(OTHER, d.id), Code.NotFound, "DISPATCH_NOT_FOUND");
    const missingId = d.id.slice(0, -1) + (d.id.endsWith("0") ? "1" : "0");
    const missing = await expectError(dispatcher.get(OTHER, missingId), Code.NotFound, "DISPATCH_NOT_FOUND");
    expect(foreign.rawMessage.replace(d.id, "ID")).toBe(missing.rawMessage.replace(missingId, "ID"));
    expect(Object.keys(errorInfoOf(foreign)!.metadata).sort()).toEqual(Object.keys(errorInfoOf(missing)!.metadata).sort());
    expect(JSON.stringify(errorInfoOf(foreign)!.metadata)).not.toContain(TENANT);
    // Nor can the other tenant cancel or watch it.
    await expectError(dispatcher.cancel(OTHER, d.id), Code.NotFound);
    await expectError(dispatcher.watch(OTHER, d.id, never).next(), Code.NotFound);
    expect((await store.get(d.id))?.state).toBe("QUEUED");
  });
});

describe("cancel", () => {
  it("a QUEUED dispatch is CANCELLED at once and its run ended", async () => {
    const d = await dispatcher.create(TENANT, input());
    const cancelled = await dispatcher.cancel(TENANT, d.id);
    expect(cancelled.state).toBe("CANCELLED");
    expect(cancelled.endTime).not.toBeNull();
    expect(events.ended.map((e) => e.dispatch.id)).toEqual([d.id]);
    expect(events.ended[0]!.dispatch.state).toBe("CANCELLED");
    // It is no longer in the queue.
    expect(await dispatcher.acquireLease("executor/1", 0, never)).toBeUndefined();
  });

  it("a RUNNING dispatch is flagged; the heartbeat tells the executor", async () => {
    const run = await leased();
    await dispatcher.reportRunning(run.id, run.leaseId);
    expect((await dispatcher.heartbeat(run.id, run.leaseId)).cancelRequested).toBe(false);
    const flagged = await dispatcher.cancel(TENANT, run.id);
    expect(flagged.state).toBe("RUNNING");
    expect(flagged.cancelRequested).toBe(true);
    expect(events.ended).toEqual([]);
    expect((await dispatcher.heartbeat(run.id, run.leaseId)).cancelRequested).toBe(true);
    const ended = await dispatcher.reportTerminal(run.id, run.leaseId, { state: "CANCELLED", exitCode: 137, failureReason: "cancelled", resultJson: null, lastLogSeq: 3n });
    expect(ended.state).toBe("CANCELLED");
    expect(events.ended.map((e) => e.lastLogSeq)).toEqual([3n]);
  });

  it("a finished dispatch is FAILED_PRECONDITION", async () => {
    const d = await dispatcher.create(TENANT, input());
    await dispatcher.cancel(TENANT, d.id);
    const err = await expectError(dispatcher.cancel(TENANT, d.id), Code.FailedPrecondition, "DISPATCH_FINISHED");
    expect(errorInfoOf(err)?.metadata.state).toBe("CANCELLED");
    expect(events.ended).toHaveLength(1);
  });
});

describe("acquireLease", () => {
  it("answers undefined after the wait when the queue stays empty", async () => {
    const started = Date.now();
    expect(await dispatcher.acquireLease("executor/1", 300, never)).toBeUndefined();
    const elapsed = Date.now() - started;
    expect(elapsed).toBeGreaterThanOrEqual(280);
    expect(elapsed).toBeLessThan(2000);
  });

  it("wakes promptly when a dispatch is created during the wait", async () => {
    // The store re-check is out of the picture (60 s): only the wake-up can end the wait early.
    makeDispatcher({ queueRecheckMs: 60_000 });
    const started = Date.now();
    const waiting = dispatcher.acquireLease("executor/1", 20_000, never);
    await new Promise((r) => setTimeout(r, 100));
    const d = await dispatcher.create(TENANT, input());
    const got = await waiting;
    expect(got?.dispatch.id).toBe(d.id);
    expect(got?.dispatch.state).toBe("STARTING");
    expect(got?.agent.name).toBe("claude");
    // Not woken, it would have waited its full 20 s.
    expect(Date.now() - started).toBeLessThan(10_000);
  });

  it("returns undefined when the signal aborts", async () => {
    const abort = new AbortController();
    const waiting = dispatcher.acquireLease("executor/1", 20_000, abort.signal);
    setTimeout(() => abort.abort(), 50);
    const started = Date.now();
    expect(await waiting).toBeUndefined();
    expect(Date.now() - started).toBeLessThan(1000);
  });

  it("leases oldest first, with lease fields set", async () => {
    makeDispatcher({ fakeClock: true });
    const a = await dispatcher.create(TENANT, input());
    clock!.now += 1;
    const b = await dispatcher.create(OTHER, input());
    const first = await dispatcher.acquireLease("executor/1", 0, never);
    expect(first?.dispatch.id).toBe(a.id);
    expect(first?.dispatch.executorId).toBe("executor/1");
    expect(first?.dispatch.leaseId).toMatch(/^[0-9A-HJKMNP-TV-Z]{26}$/);
    expect(first?.dispatch.leaseExpiresAt).toBe(clock!.now + LEASE_TTL_MS);
    expect(first?.dispatch.attempt).toBe(1);
    expect((await dispatcher.acquireLease("executor/2", 0, never))?.dispatch.id).toBe(b.id);
  });
});

describe("lease lifecycle", () => {
  it("heartbeat extends the lease; a wrong lease is FAILED_PRECONDITION LEASE_LOST", async () => {
    makeDispatcher({ fakeClock: true });
    const run = await leased();
    clock!.now += 5000;
    const hb = await dispatcher.heartbeat(run.id, run.leaseId);
    expect(hb.expiresAt).toBe(clock!.now + LEASE_TTL_MS);
    expect((await store.get(run.id))?.leaseExpiresAt).toBe(hb.expiresAt);
    const err = await expectError(dispatcher.heartbeat(run.id, "01ARZ3NDEKTSV4RRFFQ69G5FAV"), Code.FailedPrecondition, "LEASE_LOST");
    expect(errorInfoOf(err)?.metadata.dispatch_id).toBe(run.id);
    expect((await store.get(run.id))?.leaseExpiresAt).toBe(hb.expiresAt);
  });

  it("a run still RUNNING past its timeout plus the overrun at a heartbeat is ended TIMED_OUT by the dispatcher, and the heartbeat answers LEASE_LOST", async () => {
    makeDispatcher({ fakeClock: true });
    const run = await leased({ timeoutMs: 60_000 });
    clock!.now += 1000;
    const running = await dispatcher.reportRunning(run.id, run.leaseId);
    // Up to the timeout plus the overrun, heartbeats keep the run: the executor may be stopping it.
    clock!.now = running.startTime! + 60_000 + DEFAULT_TIMEOUT_OVERRUN_MS;
    expect((await dispatcher.heartbeat(run.id, run.leaseId)).dispatch.state).toBe("RUNNING");
    clock!.now += 1;
    await expectError(dispatcher.heartbeat(run.id, run.leaseId), Code.FailedPrecondition, "LEASE_LOST");
    const ended = (await store.get(run.id))!;
    expect(ended.state).toBe("TIMED_OUT");
    expect(ended.failureReason).toBe("timed out after 60 s; ended by the dispatcher, the executor had not stopped it 300 s later");
    expect(ended.endTime).toBe(clock!.now);
    expect(ended.leaseExpiresAt).toBeNull();
    expect(events.ended.map((e) => e.dispatch.state)).toEqual(["TIMED_OUT"]);
    // The executor's own late report changes nothing, and ends nothing twice.
    await expectError(dispatcher.reportTerminal(run.id, run.leaseId, { state: "SUCCEEDED", exitCode: 0, failureReason: "", resultJson: null, lastLogSeq: 3n }), Code.FailedPrecondition, "LEASE_LOST");
    expect(events.ended).toHaveLength(1);
  });

  it("a STARTING run is never ended for its timeout (its clock starts at RUNNING), nor a RUNNING one within it", async () => {
    makeDispatcher({ fakeClock: true });
    const run = await leased({ timeoutMs: 60_000 });
    clock!.now += 60_000 + DEFAULT_TIMEOUT_OVERRUN_MS + 1;
    expect((await dispatcher.heartbeat(run.id, run.leaseId)).dispatch.state).toBe("STARTING");
    await dispatcher.reportRunning(run.id, run.leaseId);
    clock!.now += 60_000;
    expect((await dispatcher.heartbeat(run.id, run.leaseId)).dispatch.state).toBe("RUNNING");
  });

  it("reportRunning then reportTerminal SUCCEEDED records exit code and passes lastLogSeq to runEnded", async () => {
    makeDispatcher({ fakeClock: true });
    const run = await leased();
    clock!.now += 1000;
    const running = await dispatcher.reportRunning(run.id, run.leaseId);
    expect(running.state).toBe("RUNNING");
    expect(running.startTime).toBe(clock!.now);
    clock!.now += 2000;
    const done = await dispatcher.reportTerminal(run.id, run.leaseId, {
      state: "SUCCEEDED",
      exitCode: 0,
      failureReason: "",
      resultJson: '{"summary":"done"}',
      lastLogSeq: 42n,
    });
    expect(done.state).toBe("SUCCEEDED");
    expect(done.exitCode).toBe(0);
    expect(done.endTime).toBe(clock!.now);
    expect(done.resultJson).toBe('{"summary":"done"}');
    expect(done.leaseExpiresAt).toBeNull();
    expect(events.ended).toHaveLength(1);
    expect(events.ended[0]!.lastLogSeq).toBe(42n);
    expect(events.ended[0]!.dispatch.exitCode).toBe(0);
    expect(events.ended[0]!.dispatch.state).toBe("SUCCEEDED");
    // Terminal is final: another report and a heartbeat are refused.
    await expectError(dispatcher.reportTerminal(run.id, run.leaseId, { state: "FAILED", exitCode: 1, failureReason: "x", resultJson: null, lastLogSeq: 0n }), Code.FailedPrecondition, "LEASE_LOST");
    await expectError(dispatcher.heartbeat(run.id, run.leaseId), Code.FailedPrecondition, "LEASE_LOST");
    expect((await store.get(run.id))?.state).toBe("SUCCEEDED");
    expect(events.ended).toHaveLength(1);
  });

  it("a duplicate report from the lease's holder (its first answer lost) answers the dispatch as it stands, and changes nothing", async () => {
    makeDispatcher({ fakeClock: true });
    const run = await leased();
    clock!.now += 1000;
    const running = await dispatcher.reportRunning(run.id, run.leaseId);
    clock!.now += 1000;
    // RUNNING again: a LEASE_LOST here would have the executor stop a healthy run.
    const again = await dispatcher.reportRunning(run.id, run.leaseId);
    expect(again.state).toBe("RUNNING");
    expect(again.startTime).toBe(running.startTime);
    const end = { state: "SUCCEEDED" as const, exitCode: 0, failureReason: "", resultJson: '{"ok":true}', lastLogSeq: 7n };
    const done = await dispatcher.reportTerminal(run.id, run.leaseId, end);
    clock!.now += 1000;
    const twice = await dispatcher.reportTerminal(run.id, run.leaseId, end);
    expect(twice).toEqual(await store.get(run.id));
    expect(twice.endTime).toBe(done.endTime);
    // Ended once: one run end announced (one slot release, one circuit outcome).
    expect(events.ended).toHaveLength(1);
    // A RUNNING report after the end, or another end, is still refused.
    await expectError(dispatcher.reportRunning(run.id, run.leaseId), Code.FailedPrecondition, "LEASE_LOST");
    await expectError(dispatcher.reportTerminal(run.id, run.leaseId, { ...end, state: "FAILED", exitCode: 1 }), Code.FailedPrecondition, "LEASE_LOST");
  });

  it("a stale lease cannot report after the run was re-queued and leased again", async () => {
    makeDispatcher({ fakeClock: true });
    const first = await leased();
    clock!.now += LEASE_TTL_MS + 1;
    expect(await dispatcher.expireLeases()).toBe(1);
    clock!.now = (await store.get(first.id))!.notBefore; // past the retry's backoff
    const second = await dispatcher.acquireLease("executor/host-2", 0, never);
    expect(second?.dispatch.id).toBe(first.id);
    expect(second?.dispatch.leaseId).not.toBe(first.leaseId);
    await expectError(dispatcher.reportRunning(first.id, first.leaseId), Code.FailedPrecondition, "LEASE_LOST");
    await expectError(
      dispatcher.reportTerminal(first.id, first.leaseId, { state: "FAILED", exitCode: 1, failureReason: "stale", resultJson: null, lastLogSeq: 0n }),
      Code.FailedPrecondition,
      "LEASE_LOST",
    );
    await expectError(dispatcher.heartbeat(first.id, first.leaseId), Code.FailedPrecondition, "LEASE_LOST");
    const now = await store.get(first.id);
    expect(now?.state).toBe("STARTING");
    expect(now?.executorId).toBe("executor/host-2");
    // The current holder can.
    expect((await dispatcher.reportRunning(first.id, second!.dispatch.leaseId)).state).toBe("RUNNING");
  });

  it("expireLeases re-queues an expired STARTING run; the next lease is attempt 2", async () => {
    makeDispatcher({ fakeClock: true });
    const run = await leased();
    expect(run.attempt).toBe(1);
    clock!.now += LEASE_TTL_MS - 1;
    expect(await dispatcher.expireLeases()).toBe(0);
    expect((await store.get(run.id))?.state).toBe("STARTING");
    clock!.now += 2;
    expect(await dispatcher.expireLeases()).toBe(1);
    const requeued = await store.get(run.id);
    expect(requeued?.state).toBe("QUEUED");
    expect(requeued?.leaseId).toBe("");
    expect(requeued?.executorId).toBe("");
    expect(requeued?.failureReason).toBe("attempt 1 failed (infrastructure): executor lost before the run started; retrying");
    expect(events.ended).toEqual([]);
    // After a backoff, as any infrastructure failure.
    expect(requeued!.notBefore).toBeGreaterThan(clock!.now);
    expect(await dispatcher.acquireLease("executor/2", 0, never)).toBeUndefined();
    clock!.now = requeued!.notBefore;
    const again = await dispatcher.acquireLease("executor/2", 0, never);
    expect(again?.dispatch.id).toBe(run.id);
    expect(again?.dispatch.attempt).toBe(2);
  });

  it("expireLeases fails a run whose executors keep being lost before it starts, once its attempts are used up", async () => {
    // A run that takes its executor down at start must not take down every executor in turn.
    makeDispatcher({ fakeClock: true });
    const created = await dispatcher.create(TENANT, input());
    for (let attempt = 1; attempt <= 5; attempt++) {
      const record = (await store.get(created.id))!;
      clock!.now = Math.max(clock!.now, record.notBefore);
      const got = await dispatcher.acquireLease(`executor/${attempt}`, 0, never);
      expect(got?.dispatch.attempt).toBe(attempt);
      clock!.now += LEASE_TTL_MS + 1;
      expect(await dispatcher.expireLeases()).toBe(1);
    }
    const failed = await store.get(created.id);
    expect(failed?.state).toBe("FAILED");
    expect(failed?.failureReason).toBe("infrastructure failure after 5 attempts: executor lost before the run started");
    expect(events.ended.map((e) => e.dispatch.state)).toEqual(["FAILED"]);
    clock!.now += 3_600_000;
    expect(await dispatcher.acquireLease("executor/6", 0, never)).toBeUndefined();
  });

  it("expireLeases fails an expired RUNNING run with reason \"executor lost\"", async () => {
    makeDispatcher({ fakeClock: true });
    const run = await leased();
    await dispatcher.reportRunning(run.id, run.leaseId);
    clock!.now += LEASE_TTL_MS + 1;
    expect(await dispatcher.expireLeases()).toBe(1);
    const failed = await store.get(run.id);
    expect(failed?.state).toBe("FAILED");
    expect(failed?.failureReason).toBe("executor lost");
    expect(failed?.endTime).toBe(clock!.now);
    expect(events.ended.map((e) => e.dispatch.failureReason)).toEqual(["executor lost"]);
    // Nothing is left to lease, and the lost executor cannot report.
    expect(await dispatcher.acquireLease("executor/2", 0, never)).toBeUndefined();
    await expectError(dispatcher.reportTerminal(run.id, run.leaseId, { state: "SUCCEEDED", exitCode: 0, failureReason: "", resultJson: null, lastLogSeq: 0n }), Code.FailedPrecondition);
  });

  it("an expired STARTING run that was cancelled ends CANCELLED instead of running again", async () => {
    makeDispatcher({ fakeClock: true });
    const run = await leased();
    expect((await dispatcher.cancel(TENANT, run.id)).cancelRequested).toBe(true);
    clock!.now += LEASE_TTL_MS + 1;
    expect(await dispatcher.expireLeases()).toBe(1);
    const ended = await store.get(run.id);
    expect(ended?.state).toBe("CANCELLED");
    expect(events.ended.map((e) => e.dispatch.state)).toEqual(["CANCELLED"]);
    expect(await dispatcher.acquireLease("executor/2", 0, never)).toBeUndefined();
  });

  it("a sweep settles each run only if its lease is still expired and not cancelled since it was read", async () => {
    // The sweep reads its expired leases once, then settles them one by one, each awaiting the
    // tenant service: here the first run's slot release is held while the others change.
    const now = { value: Date.parse("2025-06-01T00:00:00Z") };
    let holdRelease!: () => void;
    const released = new Promise<void>((resolve) => (holdRelease = resolve));
    let releases = 0;
    const slow = dispatcherWith(
      {
        release: async () => {
          if (releases++ === 0) await released;
        },
      },
      { now: () => now.value },
    );
    const lease = async () => {
      const created = await slow.create(TENANT, input());
      const got = await slow.acquireLease("executor/host-1", 0, never);
      expect(got?.dispatch.id).toBe(created.id);
      now.value += 10; // leases expire in this order
      return got!.dispatch;
    };
    const lost = await lease();
    await slow.reportRunning(lost.id, lost.leaseId);
    const renewed = await lease();
    await slow.reportRunning(renewed.id, renewed.leaseId);
    const cancelled = await lease();
    now.value += LEASE_TTL_MS + 1;
    const sweep = slow.expireLeases();
    await vi.waitFor(() => expect(releases).toBe(1));
    // Meanwhile: the second run's executor heartbeats, the third run's tenant cancels it.
    await slow.heartbeat(renewed.id, renewed.leaseId);
    expect((await slow.cancel(TENANT, cancelled.id)).cancelRequested).toBe(true);
    // A second sweep does not start while this one runs.
    expect(await slow.expireLeases()).toBe(0);
    holdRelease();
    expect(await sweep).toBe(3);
    expect((await store.get(lost.id))?.state).toBe("FAILED");
    // Renewed after the sweep read it: still running, under its lease.
    expect(await store.get(renewed.id)).toMatchObject({ state: "RUNNING", leaseId: renewed.leaseId });
    // Cancelled after the sweep read it: ended, never queued again with the cancel pending.
    expect((await store.get(cancelled.id))?.state).toBe("CANCELLED");
    now.value += 3_600_000;
    expect(await slow.acquireLease("executor/host-2", 0, never)).toBeUndefined();
  });

  it("a slot release that fails stays owed on the dispatch until a sweep gets it through, on a restarted dispatcher too", async () => {
    let calls = 0;
    let tenantServiceUp = false;
    const neverCreated: boolean[] = [];
    const release: TenantAdmission["release"] = async (_tenant, _id, options) => {
      calls++;
      neverCreated.push(options?.neverCreated === true);
      if (!tenantServiceUp) throw new Error("tenant service unavailable");
    };
    const first = dispatcherWith({ release });
    const cancelled = await first.cancel(TENANT, (await first.create(TENANT, input())).id);
    const failed = await first.create(TENANT, input());
    await first.acquireLease("executor/1", 0, never);
    await first.acquireLease("executor/1", 0, never);
    const leased = await store.get(failed.id);
    await first.reportTerminal(failed.id, leased!.leaseId, { state: "FAILED", exitCode: 1, failureReason: "", resultJson: null, lastLogSeq: 0n });
    expect(calls).toBe(2);
    expect((await store.get(cancelled.id))?.slotHeld).toBe(true);
    expect((await store.get(failed.id))?.slotHeld).toBe(true);
    // The sweep takes runs that ended strictly before its clock: let a millisecond pass, or a
    // fast machine sweeps in the millisecond the last run ended and skips it.
    await new Promise((resolve) => setTimeout(resolve, 5));
    // Still away: the sweep stops at the first failure rather than calling once per run.
    expect(await first.releaseOwedSlots(100, 0)).toBe(0);
    expect(calls).toBe(3);
    // Within the grace after the end, the sweep leaves a run to its own release.
    expect(await first.releaseOwedSlots(100, 60_000)).toBe(0);
    expect(calls).toBe(3);
    // The dispatcher restarts (nothing in memory survives); the tenant service is back.
    tenantServiceUp = true;
    const restarted = dispatcherWith({ release });
    expect(await restarted.releaseOwedSlots(100, 0)).toBe(2);
    expect(calls).toBe(5);
    expect((await store.get(cancelled.id))?.slotHeld).toBe(false);
    expect((await store.get(failed.id))?.slotHeld).toBe(false);
    expect(await restarted.releaseOwedSlots(100, 0)).toBe(0);
    expect(calls).toBe(5);
    // Stored runs that ended keep their run of the day, whoever releases them.
    expect(neverCreated).toEqual([false, false, false, false, false]);
  });

  describe("the slot sweep", () => {
    /** `n` runs that ended (cancelled) while the tenant service was away: each owes its slot. */
    const owing = async (n: number, release: TenantAdmission["release"], now: { value: number }) => {
      let away = true;
      const d = dispatcherWith({ release: async (...args) => (away ? Promise.reject(new Error("tenant service unavailable")) : release(...args)) }, { now: () => now.value });
      const ids: string[] = [];
      for (let i = 0; i < n; i++) {
        ids.push((await d.cancel(TENANT, (await d.create(TENANT, input())).id)).id);
        now.value += 10;
      }
      for (const id of ids) expect((await store.get(id))?.slotHeld).toBe(true);
      now.value += 1000;
      away = false;
      return { d, ids };
    };

    it("marks a release the tenant service refuses for good as not held, and goes on with the rest", async () => {
      const now = { value: Date.parse("2025-06-01T00:00:00Z") };
      const released: string[] = [];
      let refused = "";
      const { d, ids } = await owing(
        3,
        async (_tenant, id) => {
          if (id === refused) throw new ConnectError("tenant_id: must be a ULID", Code.InvalidArgument);
          released.push(id);
        },
        now,
      );
      refused = ids[0]!; // the oldest: the sweep meets it first
      expect(await d.releaseOwedSlots(100, 0)).toBe(3);
      expect(released).toEqual(ids.slice(1));
      for (const id of ids) expect((await store.get(id))?.slotHeld).toBe(false);
      expect(await d.releaseOwedSlots(100, 0)).toBe(0);
    });

    it("goes on page after page in one sweep", async () => {
      const now = { value: Date.parse("2025-06-01T00:00:00Z") };
      const released: string[] = [];
      const { d, ids } = await owing(5, async (_tenant, id) => void released.push(id), now);
      expect(await d.releaseOwedSlots(2, 0)).toBe(5);
      expect(released).toEqual(ids);
    });

    it("stops once its time budget is spent; the next sweep goes on from there", async () => {
      const now = { value: Date.parse("2025-06-01T00:00:00Z") };
      const released: string[] = [];
      const { d, ids } = await owing(
        4,
        async (_tenant, id) => {
          await new Promise((resolve) => setTimeout(resolve, 30));
          released.push(id);
        },
        now,
      );
      const first = await d.releaseOwedSlots(100, 0, 40);
      expect(first).toBeGreaterThanOrEqual(1);
      expect(first).toBeLessThan(4);
      let total = first;
      for (let sweeps = 0; sweeps < 10 && total < 4; sweeps++) total += await d.releaseOwedSlots(100, 0, 40);
      expect(total).toBe(4);
      expect(released).toEqual(ids);
    });
  });

  it("a run whose release goes through at its end owes nothing", async () => {
    const d = await dispatcher.create(TENANT, input());
    expect((await store.get(d.id))?.slotHeld).toBe(true);
    await dispatcher.cancel(TENANT, d.id);
    expect((await store.get(d.id))?.slotHeld).toBe(false);
  });

  it("the slot of a candidate whose insert failed is released, retried in the background until taken", async () => {
    let calls = 0;
    const neverCreated: boolean[] = [];
    const failingInsert = Object.create(store, {
      insert: { value: async () => Promise.reject(new Error("disk full")) },
    }) as typeof store;
    const d = dispatcherWith(
      {
        release: async (_tenant, _id, options) => {
          neverCreated.push(options?.neverCreated === true);
          if (++calls <= 2) throw new Error("tenant service unavailable");
        },
      },
      { store: failingInsert, releaseRetryBaseMs: 10 },
    );
    await expect(d.create(TENANT, input())).rejects.toThrow("disk full");
    await vi.waitFor(() => expect(calls).toBe(3));
    await new Promise((resolve) => setTimeout(resolve, 100));
    expect(calls).toBe(3); // taken on the third try: no more after it
    // Never stored: every try gives back the run of the day as well as the slot.
    expect(neverCreated).toEqual([true, true, true]);
  });

  it("the releases of never-stored candidates wait in one bounded queue while the tenant service is away, drained a few at a time when it is back", async () => {
    const droppedFull = () => droppedReleases("queue_full");
    let up = false;
    let inFlight = 0;
    let maxInFlight = 0;
    let calls = 0;
    const taken = new Set<string>();
    const failingInsert = Object.create(store, {
      insert: { value: async () => Promise.reject(new Error("disk full")) },
    }) as typeof store;
    const d = dispatcherWith(
      {
        release: async (_tenant, id) => {
          calls++;
          maxInFlight = Math.max(maxInFlight, ++inFlight);
          await new Promise((resolve) => setTimeout(resolve, 2));
          inFlight--;
          if (!up) throw new ConnectError("connect ECONNREFUSED", Code.Unavailable);
          taken.add(id);
        },
      },
      { store: failingInsert, releaseRetryBaseMs: 20, unstoredReleaseLimit: 30, unstoredReleaseConcurrency: 4 },
    );
    const droppedBefore = await droppedFull();
    for (let i = 0; i < 50; i++) await expect(d.create(TENANT, input())).rejects.toThrow("disk full");
    // At most the bound wait, once each; the oldest 20 were dropped (logged and counted).
    expect(d.unstoredReleasesPending).toBe(30);
    expect((await droppedFull()) - droppedBefore).toBe(20);
    const inline = calls;
    maxInFlight = 0;
    await new Promise((resolve) => setTimeout(resolve, 300));
    // One loop retried them, a few at a time, waiting longer after each round that failed
    // (20, 40, 80, 160 ms): a handful of calls, not one chain of timers per candidate.
    expect(calls - inline).toBeGreaterThan(0);
    expect(calls - inline).toBeLessThanOrEqual(4 * 5);
    expect(d.unstoredReleasesPending).toBe(30);
    up = true;
    await vi.waitFor(() => expect(d.unstoredReleasesPending).toBe(0), { timeout: 5000, interval: 20 });
    expect(taken.size).toBe(30);
    expect(maxInFlight).toBeLessThanOrEqual(4);
  });

  it("a queued release is given up once it has failed for the give-up time", async () => {
    const gaveUp = () => droppedReleases("gave_up");
    let calls = 0;
    const failingInsert = Object.create(store, {
      insert: { value: async () => Promise.reject(new Error("disk full")) },
    }) as typeof store;
    const d = dispatcherWith(
      {
        release: async () => {
          calls++;
          throw new ConnectError("connect ECONNREFUSED", Code.Unavailable);
        },
      },
      { store: failingInsert, releaseRetryBaseMs: 10, unstoredReleaseGiveUpMs: 50 },
    );
    const before = await gaveUp();
    await expect(d.create(TENANT, input())).rejects.toThrow("disk full");
    await vi.waitFor(() => expect(d.unstoredReleasesPending).toBe(0), { timeout: 5000, interval: 10 });
    expect((await gaveUp()) - before).toBe(1);
    const settled = calls;
    await new Promise((resolve) => setTimeout(resolve, 100));
    expect(calls).toBe(settled);
  });

  it("a create whose insert reported a failure after the dispatch was written goes ahead with it, releasing nothing", async () => {
    const released: string[] = [];
    const lostAnswer = Object.create(store, {
      insert: {
        value: async (candidate: DispatchRecord) => {
          await store.insert(candidate);
          throw new Error("connection reset"); // written, but the answer was lost
        },
      },
    }) as typeof store;
    const d = dispatcherWith({ release: async (_tenant, id) => void released.push(id) }, { store: lostAnswer });
    const created = await d.create(TENANT, input());
    expect(created.state).toBe("QUEUED");
    expect((await store.get(created.id))?.slotHeld).toBe(true);
    expect(released).toEqual([]);
    expect(events.created.map((r) => r.id)).toEqual([created.id]);
    expect((await d.acquireLease("executor/1", 0, never))?.dispatch.id).toBe(created.id);
  });

  it("a create whose admission failed without a definite answer releases the id; a refusal releases nothing", async () => {
    const released: { id: string; neverCreated: boolean }[] = [];
    let admitted = "";
    let answer: Error = resourceExhausted("concurrent_runs", "concurrent runs: 1 of 1 in use");
    const d = dispatcherWith({
      admit: async (_tenant, id) => {
        admitted = id;
        throw answer;
      },
      release: async (_tenant, id, options) => void released.push({ id, neverCreated: options?.neverCreated === true }),
    });
    await expect(d.create(TENANT, input())).rejects.toThrow("concurrent runs");
    answer = new Error("socket hang up"); // the call may have been recorded before it failed
    await expect(d.create(TENANT, input())).rejects.toThrow("socket hang up");
    // Released as never created: if the tenant service counted it, the run of the day comes back too.
    await vi.waitFor(() => expect(released).toEqual([{ id: admitted, neverCreated: true }]));
  });

  it("a create refused admission answers the dispatch a parallel request with the same id made", async () => {
    let admits = 0;
    const racing = dispatcherWith({
      admit: async () => {
        if (++admits === 1) return { maxTimeoutMs: MAX_TIMEOUT_MS };
        // The second took no slot: the first has it (and inserts meanwhile).
        await vi.waitFor(async () => expect(await store.findByRequestId(TENANT, "retry-1")).toBeDefined());
        throw resourceExhausted("concurrent_runs", "concurrent runs: 1 of 1 in use");
      },
    });
    const [first, second] = await Promise.all([racing.create(TENANT, input({ requestId: "retry-1" })), racing.create(TENANT, input({ requestId: "retry-1" }))]);
    expect(admits).toBe(2);
    expect(second.id).toBe(first.id);
  });

  it("a heartbeat keeps a run from expiring", async () => {
    makeDispatcher({ fakeClock: true });
    const run = await leased();
    await dispatcher.reportRunning(run.id, run.leaseId);
    clock!.now += LEASE_TTL_MS - 100;
    await dispatcher.heartbeat(run.id, run.leaseId);
    clock!.now += LEASE_TTL_MS - 100;
    expect(await dispatcher.expireLeases()).toBe(0);
    expect((await store.get(run.id))?.state).toBe("RUNNING");
  });
});

describe("watch", () => {
  it("yields the states in order and ends at a terminal state", async () => {
    const d = await dispatcher.create(TENANT, input());
    const watch = dispatcher.watch(TENANT, d.id, never);
    const states: string[] = [];
    const step = async () => {
      const r = await watch.next();
      if (!r.done) states.push(r.value.state);
      return r;
    };
    await step(); // QUEUED
    const pending = step();
    const got = await dispatcher.acquireLease("executor/1", 0, never);
    await pending; // STARTING
    const lease = got!.dispatch.leaseId;
    const pending2 = step();
    await dispatcher.reportRunning(d.id, lease);
    await pending2; // RUNNING
    const pending3 = step();
    await dispatcher.reportTerminal(d.id, lease, { state: "SUCCEEDED", exitCode: 0, failureReason: "", resultJson: null, lastLogSeq: 0n });
    await pending3; // SUCCEEDED
    expect((await watch.next()).done).toBe(true);
    expect(states).toEqual(["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]);
  });

  it("ends at once for a dispatch that already ended", async () => {
    const d = await dispatcher.create(TENANT, input());
    await dispatcher.cancel(TENANT, d.id);
    const seen: string[] = [];
    for await (const r of dispatcher.watch(TENANT, d.id, never)) seen.push(r.state);
    expect(seen).toEqual(["CANCELLED"]);
  });

  it("ends when the signal aborts", async () => {
    const d = await dispatcher.create(TENANT, input());
    const abort = new AbortController();
    const seen: string[] = [];
    setTimeout(() => abort.abort(), 100);
    for await (const r of dispatcher.watch(TENANT, d.id, abort.signal)) seen.push(r.state);
    expect(seen).toEqual(["QUEUED"]);
  });
});

describe("cancellation fast path", () => {
  it("streams a cancel of a leased run to its executor at once, and flagged runs when it connects", async () => {
    const first = await leased();
    await dispatcher.cancel(TENANT, first.id); // flagged before the executor watches
    const stop = new AbortController();
    const seen: { dispatchId: string; leaseId: string }[] = [];
    const watching = (async () => {
      for await (const c of dispatcher.cancellationsFor("executor/host-1", stop.signal)) {
        seen.push(c);
        if (seen.length === 2) stop.abort();
      }
    })();
    await new Promise((r) => setTimeout(r, 20));
    expect(seen).toEqual([{ dispatchId: first.id, leaseId: first.leaseId }]);

    const second = await leased();
    const other = await dispatcher.create(TENANT, input());
    await dispatcher.acquireLease("executor/host-2", 0, never);
    await dispatcher.cancel(TENANT, other.id); // another executor's run: not sent here
    await dispatcher.cancel(TENANT, second.id);
    await watching; // ends only once the second cancel arrived: no heartbeat is involved
    expect(seen[1]).toEqual({ dispatchId: second.id, leaseId: second.leaseId });
  });
});

describe("a cancellation stream that stops reading", () => {
  it("holds at most its buffer; when it reads again it re-reads what is flagged and misses nothing", async () => {
    const notifier = new Notifier();
    const d = dispatcherWith({}, { notifier });
    const stop = new AbortController();
    const stream = d.cancellationsFor("executor/host-1", stop.signal)[Symbol.asyncIterator]();
    const first = stream.next(); // starts it: subscribed, nothing flagged yet
    await new Promise((r) => setTimeout(r, 20));
    const run = await d.create(TENANT, input());
    const { dispatch } = (await d.acquireLease("executor/host-1", 0, never))!;
    // Its executor stops reading: cancels of other runs pile up past the buffer, and the
    // announcement of its own run's cancel is among those dropped (flagged in the store only).
    await store.update(run.id, { states: ["STARTING"] }, { cancelRequested: true });
    for (let i = 0; i < 1500; i++) notifier.cancelRequested(`01OTHERRUN${String(i).padStart(16, "0")}`);
    const got = await first;
    expect(got.value).toEqual({ dispatchId: run.id, leaseId: dispatch.leaseId });
    stop.abort();
    expect((await stream.next()).done).toBe(true);
  });
});

describe("Notifier.cancellations", () => {
  it("buffers up to its bound, then yields one RESYNC in place of what it dropped", async () => {
    const notifier = new Notifier();
    const stop = new AbortController();
    const stream = notifier.cancellations(stop.signal, 3)[Symbol.asyncIterator]();
    for (const id of ["a", "b", "c"]) notifier.cancelRequested(id);
    expect((await stream.next()).value).toBe("a");
    for (const id of ["d", "e", "f"]) notifier.cancelRequested(id); // b, c, d fit; e, f do not
    expect((await stream.next()).value).toBe(RESYNC);
    notifier.cancelRequested("g");
    expect((await stream.next()).value).toBe("g");
    stop.abort();
    expect((await stream.next()).done).toBe(true);
  });

  it("stops listening when its signal aborts, also if it was never read", () => {
    const notifier = new Notifier();
    const stop = new AbortController();
    notifier.cancellations(stop.signal);
    const emitter = (notifier as unknown as { events: import("node:events").EventEmitter }).events;
    expect(emitter.listenerCount("cancel")).toBe(1);
    stop.abort();
    expect(emitter.listenerCount("cancel")).toBe(0);
  });

  it("subscribes nothing when its signal is already aborted, and stops listening on return() even if never read", async () => {
    const notifier = new Notifier();
    const emitter = (notifier as unknown as { events: import("node:events").EventEmitter }).events;
    const aborted = new AbortController();
    aborted.abort();
    const none = notifier.cancellations(aborted.signal);
    expect(emitter.listenerCount("cancel")).toBe(0);
    expect((await none.next()).done).toBe(true);

    const open = new AbortController();
    const unread = notifier.cancellations(open.signal);
    expect(emitter.listenerCount("cancel")).toBe(1);
    await unread.return?.(undefined);
    expect(emitter.listenerCount("cancel")).toBe(0);
    notifier.cancelRequested("late"); // nothing buffers it any more
    expect((await unread.next()).done).toBe(true);
  });
});

describe("cancellationsFor stops listening", () => {
  const listeners = (notifier: Notifier) => (notifier as unknown as { events: import("node:events").EventEmitter }).events.listenerCount("cancel");

  it("when its consumer stops early, before the signal aborts", async () => {
    const notifier = new Notifier();
    const d = dispatcherWith({}, { notifier });
    const run = await d.create(TENANT, input());
    await d.acquireLease("executor/host-1", 0, never);
    await d.cancel(TENANT, run.id); // flagged: the stream's first item
    const stop = new AbortController();
    for await (const c of d.cancellationsFor("executor/host-1", stop.signal)) {
      expect(c.dispatchId).toBe(run.id);
      break; // the consumer leaves after the first item; the signal stays live
    }
    expect(listeners(notifier)).toBe(0);
    stop.abort();
    expect(listeners(notifier)).toBe(0);
  });

  it("when the signal was aborted before the stream started (the abort listener would never fire)", async () => {
    const notifier = new Notifier();
    const d = dispatcherWith({}, { notifier });
    const run = await d.create(TENANT, input());
    await d.acquireLease("executor/host-1", 0, never);
    await d.cancel(TENANT, run.id); // flagged, so a stream that read it would stop there
    const stop = new AbortController();
    stop.abort();
    const stream = d.cancellationsFor("executor/host-1", stop.signal);
    const first = await stream.next();
    await stream.return(undefined);
    expect(first.done).toBe(true); // the caller is gone: nothing is streamed
    expect(listeners(notifier)).toBe(0);
  });
});

describe("log retention", () => {
  it("hands the tier's log retention from admission to telemetry's run registration", async () => {
    const retaining = withAdmission({ maxTimeoutMs: MAX_TIMEOUT_MS, logRetentionMs: 30 * 86_400_000 });
    await retaining.create(TENANT, input());
    await dispatcher.create(TENANT, input()); // unlimited admission: telemetry's default
    expect(events.retentions).toEqual([30 * 86_400_000, undefined]);
  });
});

describe("resource caps", () => {
  it("bounds the leased agent's resources by the tier's caps recorded at creation", async () => {
    const capped = withAdmission({ maxTimeoutMs: MAX_TIMEOUT_MS, resourceCaps: { cpuMillis: 1000, memoryBytes: 1024 ** 3, pidsLimit: 512 } });
    const created = await capped.create(TENANT, input({ agent: "claude" })); // claude: 2 CPUs, 4 GiB, 256 pids
    expect(created.resourceCaps).toEqual({ cpuMillis: 1000, memoryBytes: 1024 ** 3, pidsLimit: 512 });
    const leasedRun = await capped.acquireLease("executor/host-1", 0, never);
    expect(leasedRun?.agent.resources).toMatchObject({ cpuMillis: 1000n, memoryBytes: BigInt(1024 ** 3), pidsLimit: 256n });
    const [held] = await capped.leasesOf("executor/host-1");
    expect(held?.agent?.resources?.memoryBytes).toBe(BigInt(1024 ** 3));

    // Without caps (no tenant service), the agent's own defaults stand.
    await dispatcher.create(TENANT, input({ agent: "claude" }));
    const uncapped = await dispatcher.acquireLease("executor/host-2", 0, never);
    expect(uncapped?.agent.resources?.memoryBytes).toBe(4096n * 1024n * 1024n);
  });
});
