/**
 * The dispatcher's queue, resilience and registry (issue #4) in the core and routes, against a
 * real in-memory store: fairness, parallel idempotency with admission, suspension,
 * infrastructure retries, the circuit breaker cycle, the agent registry, audit and fleet status.
 */
import { beforeEach, describe, expect, it } from "vitest";
import { Code } from "@connectrpc/connect";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { createLogger, errorInfoOf, metricsRegistry, resourceExhausted } from "@outpost/platform";
import { AgentService } from "@outpost/proto/outpost/dispatch/v1/agent_service_pb.js";
import { AuditInternalService, AuditService } from "@outpost/proto/outpost/dispatch/v1/audit_service_pb.js";
import { Agent_State, type AgentSchema, AgentSchema as AgentMessage, NetworkPolicy, RiskLevel, ModelTier } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { DispatchService } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { AgentStatus_CircuitState, FleetService } from "@outpost/proto/outpost/dispatch/v1/fleet_service_pb.js";
import { LeaseService } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { AgentRegistry, builtinAgents } from "../src/core/agents.ts";
import { AuditLog } from "../src/core/audit.ts";
import { ExecutorEnrollment } from "../src/core/enrollment.ts";
import { Dispatcher, type CreateDispatchInput, type RunEvents } from "../src/core/dispatcher.ts";
import { fleetStatus } from "../src/core/fleet.ts";
import { exportCircuitStates } from "../src/adapters/circuit-metrics.ts";
import { Notifier } from "../src/core/notifier.ts";
import type { TenantAdmission } from "../src/core/ports.ts";
import { AgentCircuits, InfraRetry } from "../src/core/resilience.ts";
import type { RouteDeps } from "../src/routes.ts";
import { SqliteDispatchStore } from "../src/store/sqlite-store.ts";
import { ADMIN, EXECUTOR, clientFor, expectError, tenantIdentity } from "./helpers.ts";
import { keysOf } from "../../../test/support/signing.ts";

const A = "tenant-a";
const B = "tenant-b";
const logger = createLogger("dispatcher-test", "silent");
const never = new AbortController().signal;

/** Records admission calls; can refuse, cap timeouts and suspend tenants. */
class RecordingAdmission implements TenantAdmission {
  admitted: string[] = [];
  released: string[] = [];
  maxTimeoutMs = 3_600_000;
  refuse: Error | undefined;
  suspended = new Set<string>();
  async admit(_tenantId: string, dispatchId: string) {
    if (this.refuse) throw this.refuse;
    this.admitted.push(dispatchId);
    return { maxTimeoutMs: this.maxTimeoutMs };
  }
  async release(_tenantId: string, dispatchId: string) {
    this.released.push(dispatchId);
  }
  async suspendedTenants() {
    return this.suspended;
  }
}

const runEvents: RunEvents = { async runCreated() {}, async runEnded() {} };

let store: SqliteDispatchStore;
let agents: AgentRegistry;
let admission: RecordingAdmission;
let circuits: AgentCircuits;
let dispatcher: Dispatcher;
let deps: RouteDeps;

function setup(options: { circuitMs?: number; retry?: InfraRetry } = {}) {
  store = new SqliteDispatchStore(":memory:");
  agents = new AgentRegistry(builtinAgents("outpost/demo-agent:test"), store);
  admission = new RecordingAdmission();
  const ms = options.circuitMs;
  circuits = new AgentCircuits(
    ms === undefined
      ? undefined
      : { failureThreshold: 5, windowMs: 20 * ms, halfOpenAfterMs: ms, successesToClose: 3 },
  );
  dispatcher = new Dispatcher({
    store,
    agents,
    notifier: new Notifier(),
    runEvents,
    logger,
    leaseTtlMs: 10_000,
    maxTimeoutMs: 3_600_000,
    admission,
    circuits,
    infraRetry: options.retry ?? new InfraRetry({ initialDelayMs: 1000, maxDelayMs: 60_000, maxAttempts: 3 }),
  });
  const dispatcherKeys = keysOf("dispatcher");
  deps = {
    audit: new AuditLog(store, logger),
    fleet: () => fleetStatus({ store, agents, circuits, logger, executorStaleMs: 30_000 }),
    signingKeys: dispatcherKeys,
    enrollment: new ExecutorEnrollment(store, dispatcherKeys),
  };
}

function input(overrides: Partial<CreateDispatchInput> = {}): CreateDispatchInput {
  return { agent: "demo", task: "t", repoUrl: "", repoRef: "", secretNames: [], env: {}, labels: {}, requestId: "", traceparent: "", ...overrides };
}

/** Leases one run and drives it to the given end, as an executor would. */
async function runToEnd(state: "SUCCEEDED" | "FAILED", exitCode: number) {
  const leased = await dispatcher.acquireLease("host-1", 0, never);
  if (!leased) throw new Error("nothing to lease");
  await dispatcher.reportRunning(leased.dispatch.id, leased.dispatch.leaseId);
  return dispatcher.reportTerminal(leased.dispatch.id, leased.dispatch.leaseId, { state, exitCode, failureReason: "", resultJson: null, lastLogSeq: 0n });
}

beforeEach(() => setup());

describe("fairness", () => {
  it("tenant B's 5 runs start among the first 10 starts although tenant A queued 100 before", async () => {
    for (let i = 0; i < 100; i++) await dispatcher.create(A, input({ task: `a${i}` }));
    for (let i = 0; i < 5; i++) await dispatcher.create(B, input({ task: `b${i}` }));
    const starts: string[] = [];
    for (let i = 0; i < 10; i++) starts.push((await dispatcher.acquireLease("host-1", 0, never))!.dispatch.tenantId);
    expect(starts.filter((t) => t === B)).toHaveLength(5);
    // Within a tenant, oldest first.
    const rest = await dispatcher.acquireLease("host-1", 0, never);
    expect(rest?.dispatch.task).toBe("a5");
  });

  it("runs of a suspended tenant are not leased until the suspension ends", async () => {
    await dispatcher.create(A, input());
    const b = await dispatcher.create(B, input());
    admission.suspended = new Set([A]);
    expect((await dispatcher.acquireLease("host-1", 0, never))?.dispatch.id).toBe(b.id);
    expect(await dispatcher.acquireLease("host-1", 0, never)).toBeUndefined();
    admission.suspended = new Set();
    expect((await dispatcher.acquireLease("host-1", 0, never))?.dispatch.tenantId).toBe(A);
  });
});

describe("admission", () => {
  it("the same request id sent 20 times in parallel makes one dispatch; the losers' slots are released", async () => {
    const results = await Promise.all(Array.from({ length: 20 }, () => dispatcher.create(A, input({ requestId: "same" }))));
    const ids = new Set(results.map((r) => r.id));
    expect(ids.size).toBe(1);
    const winner = [...ids][0]!;
    expect(admission.admitted).toContain(winner);
    expect(admission.released).not.toContain(winner);
    // Every admitted id but the winner was released; an existing dispatch found first admits nothing.
    expect(admission.admitted.filter((id) => id !== winner).sort()).toEqual([...admission.released].sort());
    expect(await store.queueDepth()).toBe(1);
    const again = await dispatcher.create(A, input({ requestId: "same" }));
    expect(again.id).toBe(winner);
    expect(admission.admitted.length).toBe(admission.released.length + 1);
  });

  it("the tenant tier caps the timeout; a refusal passes through and stores nothing", async () => {
    admission.maxTimeoutMs = 120_000;
    expect((await dispatcher.create(A, input({ timeoutMs: 600_000 }))).timeoutMs).toBe(120_000);
    expect((await dispatcher.create(A, input({ timeoutMs: 60_000 }))).timeoutMs).toBe(60_000);
    admission.refuse = resourceExhausted("concurrent_runs", "too many", { limit: "2" });
    await expectError(dispatcher.create(A, input()), Code.ResourceExhausted, "QUOTA_EXCEEDED");
    expect(await store.queueDepth()).toBe(2);
  });

  it("every terminal transition releases the slot: cancel, success, failure", async () => {
    const cancelled = await dispatcher.create(A, input());
    await dispatcher.cancel(A, cancelled.id);
    expect(admission.released).toEqual([cancelled.id]);
    await dispatcher.create(A, input());
    const done = await runToEnd("SUCCEEDED", 0);
    expect(admission.released).toEqual([cancelled.id, done.id]);
  });
});

describe("infrastructure retries (ReleaseLease)", () => {
  it("re-queues with a growing, jittered backoff and the attempt visible, then fails after the bound", async () => {
    const d = await dispatcher.create(A, input());
    const delays: number[] = [];
    for (let attempt = 1; attempt <= 2; attempt++) {
      const leased = (await dispatcher.acquireLease("host-1", 0, never))!;
      expect(leased.dispatch.attempt).toBe(attempt);
      const before = Date.now();
      const requeued = await dispatcher.releaseLease(d.id, leased.dispatch.leaseId, "engine unreachable", true);
      expect(requeued.state).toBe("QUEUED");
      expect(requeued.attempt).toBe(attempt);
      expect(requeued.failureReason).toContain("engine unreachable");
      delays.push(requeued.notBefore - before);
      // Not leasable during the backoff.
      expect(await dispatcher.acquireLease("host-1", 0, never)).toBeUndefined();
      await store.update(d.id, { states: ["QUEUED"] }, { notBefore: 0 }); // skip the wait
    }
    // Half jitter: attempt 1 waits 0.5–1 s, attempt 2 waits 1–2 s.
    expect(delays[0]).toBeGreaterThanOrEqual(490);
    expect(delays[0]).toBeLessThanOrEqual(1010);
    expect(delays[1]).toBeGreaterThanOrEqual(990);
    expect(delays[1]).toBeLessThanOrEqual(2010);
    const last = (await dispatcher.acquireLease("host-1", 0, never))!;
    const failed = await dispatcher.releaseLease(d.id, last.dispatch.leaseId, "engine unreachable", true);
    expect(failed.state).toBe("FAILED");
    expect(failed.attempt).toBe(3);
    expect(failed.failureReason).toBe("infrastructure failure after 3 attempts: engine unreachable");
    expect(admission.released).toEqual([d.id]);
  });

  it("a non-infrastructure release fails at once; a started run cannot be released", async () => {
    const d = await dispatcher.create(A, input());
    const leased = (await dispatcher.acquireLease("host-1", 0, never))!;
    const failed = await dispatcher.releaseLease(d.id, leased.dispatch.leaseId, "bad image", false);
    expect(failed.state).toBe("FAILED");
    expect(failed.failureReason).toBe("bad image");
    const e = await dispatcher.create(A, input());
    const l2 = (await dispatcher.acquireLease("host-1", 0, never))!;
    await dispatcher.reportRunning(e.id, l2.dispatch.leaseId);
    await expectError(dispatcher.releaseLease(e.id, l2.dispatch.leaseId, "x", true), Code.FailedPrecondition, "RUN_STARTED");
    await expectError(dispatcher.releaseLease(e.id, "01ARZ3NDEKTSV4RRFFQ69G5FAV", "x", true), Code.FailedPrecondition, "LEASE_LOST");
  });
});

describe("circuit breaker per agent (shortened clock: half-open after 300 ms)", () => {
  it("opens after 5 failures, refuses creates with UNAVAILABLE CIRCUIT_OPEN, half-opens, closes after 3 successes", async () => {
    setup({ circuitMs: 300 });
    exportCircuitStates(circuits, logger);
    const gauge = async () => /outpost_circuit_state\{[^}]*circuit="agent:demo"[^}]*\} (\d+)/.exec(await metricsRegistry.metrics())?.[1];
    // Two tenants' runs: one tenant's failures alone cannot open it (the next test).
    for (let i = 0; i < 5; i++) {
      await dispatcher.create(i % 2 === 0 ? A : B, input());
      await runToEnd("FAILED", 1);
    }
    expect(circuits.state("demo")).toBe("OPEN");
    expect(await gauge()).toBe("2");
    const err = await expectError(dispatcher.create(A, input()), Code.Unavailable, "CIRCUIT_OPEN");
    expect(err.rawMessage).toContain("demo");
    // Other agents are not affected.
    await dispatcher.create(A, input({ agent: "claude" }));
    await store.update((await dispatcher.acquireLease("host-1", 0, never))!.dispatch.id, { states: ["STARTING"] }, { state: "CANCELLED" });
    const status = await deps.fleet();
    expect(status.agents.find((a) => a.agent === "demo")?.circuit).toBe("OPEN");

    await new Promise((r) => setTimeout(r, 350));
    expect(circuits.state("demo")).toBe("HALF_OPEN");
    expect(await gauge()).toBe("1");
    for (let i = 0; i < 3; i++) await dispatcher.create(A, input());
    await runToEnd("SUCCEEDED", 0);
    await runToEnd("SUCCEEDED", 0);
    expect(circuits.state("demo")).toBe("HALF_OPEN");
    await runToEnd("SUCCEEDED", 0);
    expect(circuits.state("demo")).toBe("CLOSED");
    expect(await gauge()).toBe("0");
    await dispatcher.create(A, input());
  });

  it("counts runs whose agent's runtime failed before start (image, container), not the tenant's input or lost executors", async () => {
    setup({ circuitMs: 300 });
    const leaseNext = async () => (await dispatcher.acquireLease("host-1", 0, never))!.dispatch;
    // Not the agent's fault: a tenant's secret or repository, an executor lost under the run.
    for (let i = 0; i < 5; i++) {
      await dispatcher.create(A, input());
      const run = await leaseNext();
      await dispatcher.releaseLease(run.id, run.leaseId, "secret \"gh\" could not be read", false);
      await dispatcher.create(A, input());
      const lost = await leaseNext();
      await dispatcher.reportRunning(lost.id, lost.leaseId);
      await dispatcher.reportTerminal(lost.id, lost.leaseId, { state: "FAILED", exitCode: null, failureReason: "executor lost: it restarted while the run was in progress", resultJson: null, lastLogSeq: 0n });
    }
    expect(circuits.state("demo")).toBe("CLOSED");
    // The agent's image cannot be had: after its retries (or at once), each run counts once.
    // These four over the wire, as the executor reports them (the route passes the flag on).
    const leases = clientFor(dispatcher, agents, LeaseService, EXECUTOR, deps);
    for (let i = 0; i < 4; i++) {
      await dispatcher.create(A, input());
      const run = await leaseNext();
      await leases.releaseLease({ dispatchId: run.id, leaseId: run.leaseId, reason: "image outpost/x:1 not present on executor host", runtimeFailure: true });
    }
    expect(circuits.state("demo")).toBe("CLOSED");
    await dispatcher.create(A, input());
    let run = await leaseNext();
    // Retried (one outcome per run, not per attempt), then failed for good: the fifth failure.
    const retried = await dispatcher.releaseLease(run.id, run.leaseId, "pull: registry timeout", true, true);
    expect(retried.state).toBe("QUEUED");
    expect(circuits.state("demo")).toBe("CLOSED");
    await store.update(run.id, { states: ["QUEUED"] }, { notBefore: 0, attempt: 99 });
    run = await leaseNext();
    const failed = await dispatcher.releaseLease(run.id, run.leaseId, "pull: registry timeout", true, true);
    expect(failed.state).toBe("FAILED");
    expect(circuits.state("demo")).toBe("OPEN");
    await expectError(dispatcher.create(A, input()), Code.Unavailable, "CIRCUIT_OPEN");
  });

  it("one tenant's run failures and timeouts alone do not open it, for others or for itself", async () => {
    setup({ circuitMs: 300 });
    for (let i = 0; i < 10; i++) {
      await dispatcher.create(A, input());
      const leased = (await dispatcher.acquireLease("host-1", 0, never))!;
      await dispatcher.reportRunning(leased.dispatch.id, leased.dispatch.leaseId);
      // A task that exits 1, or a timeout the tenant chose too short: both in the tenant's hands.
      const state = i % 2 === 0 ? "FAILED" : "TIMED_OUT";
      await dispatcher.reportTerminal(leased.dispatch.id, leased.dispatch.leaseId, { state, exitCode: state === "FAILED" ? 1 : null, failureReason: "", resultJson: null, lastLogSeq: 0n });
    }
    expect(circuits.state("demo")).toBe("CLOSED");
    await dispatcher.create(B, input());
    await dispatcher.create(A, input());
    // Four of A's counted, and one failure of B's: five failures from two tenants open it.
    await runToEnd("FAILED", 1);
    expect(circuits.state("demo")).toBe("OPEN");
    await expectError(dispatcher.create(B, input()), Code.Unavailable, "CIRCUIT_OPEN");
  });

  it("a failure while half-open opens it again; 4 failures do not open it", async () => {
    setup({ circuitMs: 300 });
    for (let i = 0; i < 4; i++) {
      await dispatcher.create(i % 2 === 0 ? A : B, input());
      await runToEnd("FAILED", 2);
    }
    expect(circuits.state("demo")).toBe("CLOSED");
    await dispatcher.create(A, input());
    await runToEnd("FAILED", 2);
    expect(circuits.state("demo")).toBe("OPEN");
    await new Promise((r) => setTimeout(r, 350));
    await dispatcher.create(A, input());
    await runToEnd("FAILED", 2);
    expect(circuits.state("demo")).toBe("OPEN");
    await expectError(dispatcher.create(A, input()), Code.Unavailable, "CIRCUIT_OPEN");
  });
});

type AgentInit = MessageInitShape<typeof AgentSchema>;
const custom: AgentInit = {
  name: "reviewer",
  description: "reviews PRs",
  image: "registry.test/reviewer:1",
  models: [{ tier: ModelTier.BALANCED, modelId: "m-1" }],
  defaultTimeout: durationFromMs(600_000),
  outputSchema: JSON.stringify({ type: "object", required: ["verdict"], properties: { verdict: { type: "string" } } }),
  riskLevel: RiskLevel.APPROVAL_REQUIRED,
  networkPolicy: NetworkPolicy.NONE,
};

describe("agent registry", () => {
  const admin = () => clientFor(dispatcher, agents, AgentService, ADMIN, deps);

  it("registers, updates and disables an agent; it persists in the store; creates follow its state", async () => {
    const registered = (await admin().registerAgent({ agent: custom })).agent!;
    expect(registered.state).toBe(Agent_State.ENABLED);
    expect(registered.builtin).toBe(false);
    await expectError(admin().registerAgent({ agent: custom }), Code.AlreadyExists, "AGENT_EXISTS");
    await expectError(admin().registerAgent({ agent: { ...custom, name: "claude" } }), Code.AlreadyExists, "AGENT_EXISTS");
    // APPROVAL_REQUIRED: no run starts unapproved (approvals are not built), nothing is queued.
    const refused = await expectError(dispatcher.create(A, input({ agent: "reviewer" })), Code.FailedPrecondition, "APPROVAL_REQUIRED");
    expect(refused.rawMessage).toContain("reviewer");
    expect(await store.queueDepth()).toBe(0);

    // A schema with an $id, changed under the same $id: each one compiles on its own.
    const schemaV = (v: number) => JSON.stringify({ $id: "result", type: "object", properties: { v: { const: v } } });
    await admin().updateAgent({ agent: { ...custom, outputSchema: schemaV(1) } });
    expect((await admin().updateAgent({ agent: { ...custom, outputSchema: schemaV(2) } })).agent?.outputSchema).toBe(schemaV(2));
    const updated = (await admin().updateAgent({ agent: { ...custom, description: "v2", riskLevel: RiskLevel.AUTO } })).agent!;
    expect(updated.description).toBe("v2");
    const d = await dispatcher.create(A, input({ agent: "reviewer" }));
    expect(d.model).toBe("m-1");
    expect(d.timeoutMs).toBe(600_000);
    // A second registry on the same store (another replica) sees it.
    const peer = new AgentRegistry(builtinAgents("x"), store);
    await peer.refresh();
    expect(peer.get("reviewer")?.description).toBe("v2");
    expect(peer.get("reviewer")?.riskLevel).toBe(RiskLevel.AUTO);

    expect((await admin().disableAgent({ name: "reviewer" })).agent?.state).toBe(Agent_State.DISABLED);
    const err = await expectError(dispatcher.create(A, input({ agent: "reviewer" })), Code.InvalidArgument, "AGENT_UNKNOWN");
    expect(err.rawMessage).toContain("available: aider, claude, codex, demo, gemini, grok");
    // Built-ins can be disabled too.
    await admin().disableAgent({ name: "grok" });
    await expectError(dispatcher.create(A, input({ agent: "grok" })), Code.InvalidArgument, "AGENT_UNKNOWN");
    await expectError(admin().disableAgent({ name: "nope" }), Code.NotFound);
    // And taken back into service, by an admin only; the peer replica follows.
    const tenantErr = await expectError(clientFor(dispatcher, agents, AgentService, tenantIdentity(A), deps).enableAgent({ name: "grok" }), Code.PermissionDenied);
    expect(errorInfoOf(tenantErr)?.reason).toBe("ADMIN_REQUIRED");
    expect((await admin().enableAgent({ name: "grok" })).agent?.state).toBe(Agent_State.ENABLED);
    expect((await admin().enableAgent({ name: "grok" })).agent?.state).toBe(Agent_State.ENABLED);
    expect((await dispatcher.create(A, input({ agent: "grok" }))).agent).toBe("grok");
    await peer.refresh();
    expect(peer.get("grok")?.state).toBe(Agent_State.ENABLED);
    expect(peer.get("reviewer")?.state).toBe(Agent_State.DISABLED);
    await expectError(admin().enableAgent({ name: "nope" }), Code.NotFound);
    await expectError(admin().enableAgent({ name: "" }), Code.InvalidArgument);
  });

  it("refuses bad definitions naming the field, including an invalid JSON Schema", async () => {
    const bad = async (agent: AgentInit, field: string) => {
      const err = await expectError(admin().registerAgent({ agent }), Code.InvalidArgument);
      expect(errorInfoOf(err)?.metadata.field).toBe(field);
    };
    await bad({ ...custom, name: "Bad Name" }, "agent.name");
    await bad({ ...custom, image: "" }, "agent.image");
    await bad({ ...custom, models: [] }, "agent.models");
    await bad({ ...custom, outputSchema: "{not json" }, "agent.output_schema");
    await bad({ ...custom, outputSchema: JSON.stringify({ type: "nonsense" }) }, "agent.output_schema");
    // The executor runs patterns on RE2: one it could not run is refused here, not after a run.
    const lookahead = await expectError(
      admin().registerAgent({ agent: { ...custom, outputSchema: JSON.stringify({ type: "object", properties: { id: { type: "string", pattern: "^(?=x)x+$" } } }) } }),
      Code.InvalidArgument,
    );
    expect(errorInfoOf(lookahead)?.metadata.field).toBe("agent.output_schema");
    expect(lookahead.rawMessage).toMatch(/RE2.*no lookaround/);
    await bad({ ...custom, riskLevel: RiskLevel.UNSPECIFIED }, "agent.risk_level");
    await bad({ ...custom, networkPolicy: NetworkPolicy.UNSPECIFIED }, "agent.network_policy");
    await bad({ ...custom, defaultModelTier: ModelTier.FAST }, "agent.default_model_tier");
    // Bounded like the rest of the definition (every create and lease carries it).
    await bad({ ...custom, models: Array.from({ length: 10_000 }, (_, i) => ({ tier: ModelTier.FAST, modelId: `m${i}` })) }, "agent.models");
    // The model id reaches the container as OUTPOST_MODEL: the engine would refuse a NUL in it.
    await bad({ ...custom, models: [{ tier: ModelTier.BALANCED, modelId: "m\0" }] }, "agent.models[0].model_id");
    expect(agents.get("reviewer")).toBeUndefined();
    const tenantErr = await expectError(clientFor(dispatcher, agents, AgentService, tenantIdentity(A), deps).registerAgent({ agent: custom }), Code.PermissionDenied);
    expect(errorInfoOf(tenantErr)?.reason).toBe("ADMIN_REQUIRED");
    // Paging of ListAgents.
    const first = await admin().listAgents({ pageSize: 4 });
    const second = await admin().listAgents({ pageSize: 4, pageToken: first.nextPageToken });
    expect([...first.agents, ...second.agents].map((a) => a.name)).toEqual(["aider", "claude", "codex", "demo", "gemini", "grok"]);
    expect(second.nextPageToken).toBe("");
    expect(create(AgentMessage, custom).name).toBe("reviewer");
  });
});

describe("audit", () => {
  it("records creates, cancels (with outcome) and agent changes; tenants see their own, admins all, paged", async () => {
    const tenantA = clientFor(dispatcher, agents, DispatchService, tenantIdentity(A), deps);
    const tenantB = clientFor(dispatcher, agents, DispatchService, tenantIdentity(B), deps);
    const d = (await tenantA.createDispatch({ agent: "demo", task: "x" })).dispatch!;
    await tenantA.cancelDispatch({ dispatchId: d.id });
    await expectError(tenantA.cancelDispatch({ dispatchId: d.id }), Code.FailedPrecondition);
    await expectError(tenantB.createDispatch({ agent: "nope", task: "x" }), Code.InvalidArgument);
    await clientFor(dispatcher, agents, AgentService, ADMIN, deps).registerAgent({ agent: custom });
    // Refused privileged calls are recorded too: a tenant's (under that tenant), a malformed one.
    await expectError(clientFor(dispatcher, agents, AgentService, tenantIdentity(B), deps).disableAgent({ name: "claude" }), Code.PermissionDenied);
    await expectError(clientFor(dispatcher, agents, AgentService, ADMIN, deps).updateAgent({ agent: { ...custom, image: "" } }), Code.InvalidArgument);

    const auditA = await clientFor(dispatcher, agents, AuditService, tenantIdentity(A), deps).listAuditEvents({});
    expect(auditA.events.map((e) => [e.method.split("/")[1], e.target, e.outcome])).toEqual([
      ["CancelDispatch", `dispatch/${d.id}`, "FAILED_PRECONDITION"],
      ["CancelDispatch", `dispatch/${d.id}`, "OK"],
      ["CreateDispatch", `dispatch/${d.id}`, "OK"],
    ]);
    expect(auditA.events.every((e) => e.tenantId === A && e.principal === `key/${A}`)).toBe(true);
    await expectError(
      clientFor(dispatcher, agents, AuditService, tenantIdentity(A), deps).listAuditEvents({ tenantId: B }),
      Code.InvalidArgument,
    );

    const adminAudit = clientFor(dispatcher, agents, AuditService, ADMIN, deps);
    const all: string[] = [];
    let token = "";
    do {
      const page = await adminAudit.listAuditEvents({ pageSize: 2, pageToken: token });
      expect(page.events.length).toBeLessThanOrEqual(2);
      all.push(...page.events.map((e) => e.outcome + ":" + e.method.split("/")[1]));
      token = page.nextPageToken;
    } while (token);
    expect(all).toEqual([
      "INVALID_ARGUMENT:UpdateAgent",
      "PERMISSION_DENIED:DisableAgent",
      "OK:RegisterAgent",
      "INVALID_ARGUMENT:CreateDispatch",
      "FAILED_PRECONDITION:CancelDispatch",
      "OK:CancelDispatch",
      "OK:CreateDispatch",
    ]);
    expect((await adminAudit.listAuditEvents({ tenantId: B })).events.map((e) => [e.outcome, e.target])).toEqual([
      ["PERMISSION_DENIED", "agent/claude"],
      ["INVALID_ARGUMENT", "agent/nope"],
    ]);
  });

  it("RecordAuditEvent is for the tenant service only and lands in the trail", async () => {
    const call = { tenantId: A, principal: "admin", method: "outpost.tenant.v1.TenantService/SuspendTenant", target: `tenant/${A}`, outcome: "OK" };
    await expectError(clientFor(dispatcher, agents, AuditInternalService, EXECUTOR, deps).recordAuditEvent(call), Code.PermissionDenied);
    await expectError(clientFor(dispatcher, agents, AuditInternalService, ADMIN, deps).recordAuditEvent(call), Code.PermissionDenied);
    const tenantSvc = clientFor(dispatcher, agents, AuditInternalService, { kind: "service", principal: "tenant/1" }, deps);
    await expectError(tenantSvc.recordAuditEvent({ ...call, method: "" }), Code.InvalidArgument);
    await tenantSvc.recordAuditEvent(call);
    const listed = await clientFor(dispatcher, agents, AuditService, tenantIdentity(A), deps).listAuditEvents({});
    expect(listed.events.map((e) => e.method)).toEqual([call.method]);
  });
});

describe("fleet status and executor leases", () => {
  it("reports executors from their capacity, image presence, queue depth and runs by state; degraded without executors", async () => {
    const fleet = clientFor(dispatcher, agents, FleetService, ADMIN, deps);
    await dispatcher.create(A, input());
    const empty = await fleet.getFleetStatus({});
    expect(empty.degraded.join()).toContain("executors");
    expect(empty.degraded.join()).not.toContain("redis"); // none configured: nothing is missing
    const withRedis = (ready: boolean) => fleetStatus({ store, agents, circuits, logger, executorStaleMs: 30_000, redisReady: () => ready });
    expect((await withRedis(false)).degraded.filter((d) => d.startsWith("redis: unreachable"))).toHaveLength(1);
    expect((await withRedis(true)).degraded.join()).not.toContain("redis");
    expect(empty.queueDepth).toBe(1n);
    expect(empty.agents.find((a) => a.agent === "demo")?.available).toBe(false);

    const leases = clientFor(dispatcher, agents, LeaseService, EXECUTOR, deps);
    const got = await leases.acquireLease({
      executorId: "host-1",
      capacity: { slotsTotal: 4, slotsBusy: 1, warmContainers: 2, engineReady: true, imagesPresent: ["outpost/demo-agent:test"] },
    });
    expect(got.lease?.dispatch?.tenantId).toBe(A);
    const status = await fleet.getFleetStatus({});
    expect(status.degraded).toEqual([]);
    expect(status.executors.map((e) => [e.executorId, e.slotsTotal, e.slotsBusy, e.warmContainers, e.engineReady])).toEqual([["host-1", 4, 1, 2, true]]);
    expect(status.warmContainers).toBe(2n);
    expect(status.queueDepth).toBe(0n);
    const demo = status.agents.find((a) => a.agent === "demo")!;
    expect([demo.available, demo.imagePresent, demo.circuitState]).toEqual([true, true, AgentStatus_CircuitState.CLOSED]);
    expect(status.agents.find((a) => a.agent === "claude")?.available).toBe(false);
    expect(status.runsLast24h.map((s) => [s.state, s.count])).toEqual([[2, 1n]]);

    // ListExecutorLeases: what a restarted executor re-adopts.
    const mine = await leases.listExecutorLeases({ executorId: "host-1" });
    expect(mine.leases.map((l) => l.dispatch?.id)).toEqual([got.lease?.dispatch?.id]);
    expect(mine.leases[0]?.agent?.name).toBe("demo");
    // An executor may list only its own leases: naming another's id is refused.
    await expectError(leases.listExecutorLeases({ executorId: "host-2" }), Code.PermissionDenied, "EXECUTOR_ID_MISMATCH");
    await expectError(leases.listExecutorLeases({ executorId: "" }), Code.InvalidArgument);
    await expectError(
      leases.acquireLease({ executorId: "host-1", capacity: { slotsTotal: -1 } }),
      Code.InvalidArgument,
    );
    // ReleaseLease over the wire.
    const released = await leases.releaseLease({
      dispatchId: got.lease!.dispatch!.id,
      leaseId: got.lease!.leaseId,
      reason: "pull failed",
      infrastructureFailure: true,
    });
    expect(released.dispatch?.state).toBe(1);
    expect(released.dispatch?.attempt).toBe(1);
  });
});
