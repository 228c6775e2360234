/**
 * The dispatcher's core: creating and reading dispatches, the leased queue, and the run
 * lifecycle QUEUED → STARTING → RUNNING → SUCCEEDED | FAILED | TIMED_OUT | CANCELLED
 * (SPEC D1–D3, D7). Every transition is a conditional update on the expected state and lease,
 * so a stale executor or a racing replica changes nothing. Knows nothing of transport.
 */
import { monotonicFactory, ulid } from "ulid";

/** Dispatch ids increase strictly within a process, so "oldest first" holds inside one millisecond too. */
const dispatchId = monotonicFactory();
import { type Agent, type ModelTier, ResourcesSchema, RiskLevel } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { failedPrecondition, notFound, type Logger } from "@outpost/platform";
import type { DispatchRecord, DispatchState, DispatchStore, Expectation, ExecutorReport, ExecutorStore, ListFilter, ResourceCaps } from "../store/store.ts";
import { isTerminal, queuedDispatch, TERMINAL_STATES } from "../store/store.ts";
import type { AgentRegistry } from "./agents.ts";
import { RESYNC, type Notifier } from "./notifier.ts";
import { UnlimitedAdmission, type TenantAdmission } from "./ports.ts";
import { AgentCircuits, InfraRetry, type RunOutcome } from "./resilience.ts";

/** Where run starts and ends are announced, so log subscriptions can begin and end (telemetry). */
export interface RunEvents {
  /** `logRetentionMs`: how long the tenant's tier keeps the run's logs, when known. */
  runCreated(dispatch: DispatchRecord, logRetentionMs?: number): Promise<void>;
  runEnded(dispatch: DispatchRecord, lastLogSeq: bigint): Promise<void>;
}

export interface CreateDispatchInput {
  agent: string;
  task: string;
  repoUrl: string;
  repoRef: string;
  modelId?: string;
  modelTier?: ModelTier;
  timeoutMs?: number;
  secretNames: string[];
  env: Record<string, string>;
  labels: Record<string, string>;
  requestId: string;
  traceparent: string;
}

export interface TerminalReport {
  state: Extract<DispatchState, "SUCCEEDED" | "FAILED" | "TIMED_OUT" | "CANCELLED">;
  exitCode: number | null;
  failureReason: string;
  resultJson: string | null;
  lastLogSeq: bigint;
}

export interface DispatcherOptions {
  store: DispatchStore & ExecutorStore;
  agents: AgentRegistry;
  notifier: Notifier;
  runEvents: RunEvents;
  logger: Logger;
  leaseTtlMs: number;
  /** The platform's upper bound of any run's timeout; the tenant's tier may cap it lower. */
  maxTimeoutMs: number;
  /** Tenant quotas, secrets and suspension; everything is admitted when unset. */
  admission?: TenantAdmission;
  circuits?: AgentCircuits;
  infraRetry?: InfraRetry;
  /**
   * How often a long-poll (or a watch) re-reads the store without being woken: the safety net
   * for work or changes made on another replica whose wake-up was lost. Default 1000 ms.
   */
  queueRecheckMs?: number;
  /** First delay before a failed slot release of a never-stored candidate is tried again (doubling, at most a minute). */
  releaseRetryBaseMs?: number;
  now?: () => number;
}

/** Executor capacity as reported with AcquireLease/Heartbeat (contract C). */
export type CapacityReport = Omit<ExecutorReport, "executorId" | "seenAt">;

const DEFAULT_QUEUE_RECHECK_MS = 1000;

/** Tries of an unstored candidate's slot release: delays of 1, 2, 4, … s (at most a minute), about ten minutes in all. */
const RELEASE_ATTEMPTS = 15;

export class Dispatcher {
  private readonly store: DispatchStore & ExecutorStore;
  readonly agents: AgentRegistry;
  readonly admission: TenantAdmission;
  readonly circuits: AgentCircuits;
  readonly infraRetry: InfraRetry;
  private readonly notifier: Notifier;
  private readonly runEvents: RunEvents;
  private readonly logger: Logger;
  private readonly leaseTtlMs: number;
  /** Set while a lease sweep runs (expireLeases). */
  private sweeping = false;
  /** Set while the slot sweep runs (releaseOwedSlots). */
  private releasingOwed = false;
  private readonly maxTimeoutMs: number;
  private readonly now: () => number;
  private readonly queueRecheckMs: number;
  private readonly releaseRetryBaseMs: number;

  constructor(options: DispatcherOptions) {
    this.store = options.store;
    this.agents = options.agents;
    this.notifier = options.notifier;
    this.runEvents = options.runEvents;
    this.logger = options.logger;
    this.leaseTtlMs = options.leaseTtlMs;
    this.maxTimeoutMs = options.maxTimeoutMs;
    this.admission = options.admission ?? new UnlimitedAdmission(options.maxTimeoutMs);
    this.circuits = options.circuits ?? new AgentCircuits();
    this.infraRetry = options.infraRetry ?? new InfraRetry();
    this.now = options.now ?? Date.now;
    this.queueRecheckMs = options.queueRecheckMs ?? DEFAULT_QUEUE_RECHECK_MS;
    this.releaseRetryBaseMs = options.releaseRetryBaseMs ?? 1000;
    // Every replica's breakers count every run's outcome, whichever replica its end was reported to.
    // (record settles the outcome itself and never rejects.)
    this.notifier.onPeerOutcome((agent, outcome) => void this.circuits.record(agent, outcome, "peer"));
  }

  /**
   * Creates and queues a dispatch. Order matters: an existing dispatch with the same request id
   * answers without admitting anything; then the agent, model and circuit are checked; then the
   * tenant service admits the run (quota slot, secrets, tier timeout) before the insert; when the
   * insert loses a race to a parallel request with the same id, the new id's slot and run of the
   * day are given back (releaseUnstoredSlot), so N parallel creates with one request id count one run.
   */
  async create(tenantId: string, input: CreateDispatchInput): Promise<DispatchRecord> {
    if (input.requestId) {
      const existing = await this.store.findByRequestId(tenantId, input.requestId);
      if (existing) return existing;
    }
    await this.agents.refreshIfStale();
    const agent = this.agents.requireEnabled("agent", input.agent);
    // An operator who marked the agent so wants a person to approve each run; approvals are not
    // built (SPEC W3), so its runs are refused rather than started unapproved.
    if (agent.riskLevel === RiskLevel.APPROVAL_REQUIRED) {
      throw failedPrecondition(
        "APPROVAL_REQUIRED",
        `agent "${agent.name}" has risk level APPROVAL_REQUIRED: each run needs an approval, and approvals are not available yet; an operator can set its risk level to AUTO (UpdateAgent)`,
        { agent: agent.name },
      );
    }
    const { model, tier } = this.agents.resolveModel(agent, input.modelId, input.modelTier);
    this.circuits.assertAccepting(agent.name);
    const defaultTimeoutMs = agent.defaultTimeout ? Number(agent.defaultTimeout.seconds) * 1000 : this.maxTimeoutMs;
    const now = this.now();
    const id = dispatchId(now);
    let admitted: Awaited<ReturnType<TenantAdmission["admit"]>>;
    try {
      admitted = await this.admission.admit(tenantId, id, input.secretNames, input.timeoutMs);
    } catch (err) {
      // Without a definite answer the tenant service may have admitted the id all the same (the
      // answer was lost or late): release it, or its slot would be held for good. A release that
      // arrives before the admission leaves a mark there, so the late admission takes nothing.
      if (!isDefiniteRefusal(err)) void this.releaseUnstoredSlot(tenantId, id);
      // A parallel request with the same id may have taken the last slot itself: it answers.
      const existing = input.requestId ? await this.store.findByRequestId(tenantId, input.requestId) : undefined;
      if (existing) return existing;
      throw err;
    }
    const { maxTimeoutMs, logRetentionMs, resourceCaps } = admitted;
    const timeoutMs = Math.min(input.timeoutMs ?? defaultTimeoutMs, maxTimeoutMs, this.maxTimeoutMs);
    const candidate = queuedDispatch({
      id,
      tenantId,
      agent: agent.name,
      task: input.task,
      repoUrl: input.repoUrl,
      repoRef: input.repoRef,
      model,
      modelTier: tier,
      timeoutMs,
      secretNames: input.secretNames,
      env: input.env,
      labels: input.labels,
      requestId: input.requestId,
      traceparent: input.traceparent,
      createTime: now,
      resourceCaps: resourceCaps ?? null,
    });
    let inserted: { record: DispatchRecord; created: boolean };
    try {
      inserted = await this.store.insert(candidate);
    } catch (err) {
      await this.releaseUnstoredSlot(tenantId, id);
      throw err;
    }
    const { record, created } = inserted;
    if (!created) await this.releaseUnstoredSlot(tenantId, id);
    if (created) {
      // Telemetry must know the run's owner before a client subscribes to its logs.
      await this.announce(() => this.runEvents.runCreated(record, logRetentionMs), record, "register run");
      this.notifier.workQueued();
      this.logger.info({ dispatch_id: record.id, agent: record.agent }, "dispatch queued");
    }
    return record;
  }

  /** The tenant's dispatch; another tenant's answers exactly like a missing one (SPEC T4). */
  async get(tenantId: string, id: string): Promise<DispatchRecord> {
    const record = await this.store.get(id);
    if (!record || record.tenantId !== tenantId) throw notFound("dispatch", id);
    return record;
  }

  list(tenantId: string, filter: ListFilter, limit: number, afterId?: string): Promise<DispatchRecord[]> {
    return this.store.list(tenantId, filter, limit, afterId);
  }

  /** QUEUED ends at once; STARTING/RUNNING are flagged and the executor stops the container. */
  async cancel(tenantId: string, id: string): Promise<DispatchRecord> {
    for (;;) {
      const record = await this.get(tenantId, id);
      if (isTerminal(record.state)) {
        throw failedPrecondition("DISPATCH_FINISHED", `dispatch "${id}" already ended in state ${record.state}`, {
          state: record.state,
        });
      }
      const now = this.now();
      const updated =
        record.state === "QUEUED"
          ? await this.store.update(id, { states: ["QUEUED"] }, { state: "CANCELLED", failureReason: "cancelled before start", endTime: now, updateTime: now })
          : await this.store.update(id, { states: ["STARTING", "RUNNING"] }, { cancelRequested: true, updateTime: now });
      if (!updated) continue; // the state moved under us: look again
      this.notifier.dispatchChanged(id);
      if (updated.cancelRequested && updated.state !== "CANCELLED") this.notifier.cancelRequested(id);
      if (updated.state === "CANCELLED") {
        await this.releaseSlot(updated);
        await this.announce(() => this.runEvents.runEnded(updated, 0n), updated, "complete run");
      }
      return updated;
    }
  }

  /** Yields the dispatch now and on every change, until it is terminal or `signal` fires. */
  async *watch(tenantId: string, id: string, signal: AbortSignal): AsyncGenerator<DispatchRecord> {
    let last = await this.get(tenantId, id);
    yield last;
    while (!isTerminal(last.state) && !signal.aborted) {
      await this.notifier.waitForChange(id, this.queueRecheckMs, signal);
      const current = await this.get(tenantId, id);
      if (current.updateTime !== last.updateTime || current.state !== last.state) {
        last = current;
        yield current;
      }
    }
  }

  /** Long-poll: leases the oldest queued run to the executor, waiting up to `waitMs` for one. */
  async acquireLease(
    executorId: string,
    waitMs: number,
    signal: AbortSignal,
    capacity?: CapacityReport,
  ): Promise<{ dispatch: DispatchRecord; agent: Agent } | undefined> {
    if (capacity) await this.recordCapacity(executorId, capacity);
    const deadline = this.now() + waitMs;
    while (!signal.aborted) {
      const now = this.now();
      const suspended = await this.suspendedTenants();
      const leased = await this.store.leaseNext({
        executorId,
        leaseId: ulid(now),
        expiresAt: now + this.leaseTtlMs,
        now,
        excludeTenants: [...suspended],
      });
      if (leased) {
        this.notifier.dispatchChanged(leased.id);
        this.logger.info({ dispatch_id: leased.id, executor_id: executorId, attempt: leased.attempt }, "dispatch leased");
        let agent = this.agents.get(leased.agent);
        if (!agent) {
          await this.agents.refresh();
          agent = this.agents.get(leased.agent);
        }
        if (agent) return { dispatch: leased, agent: withinCaps(agent, leased.resourceCaps) };
        await this.finish(leased, endWithoutReport("FAILED", `agent "${leased.agent}" is no longer registered`));
        continue;
      }
      const remaining = deadline - this.now();
      if (remaining <= 0) return undefined;
      await this.notifier.waitForWork(Math.min(remaining, this.queueRecheckMs), signal);
    }
    return undefined;
  }

  /** Extends the lease; tells the executor whether the run was cancelled. */
  async heartbeat(
    dispatchId: string,
    leaseId: string,
    executor?: { executorId: string; capacity: CapacityReport },
  ): Promise<{ expiresAt: number; cancelRequested: boolean; dispatch: DispatchRecord }> {
    if (executor) await this.recordCapacity(executor.executorId, executor.capacity);
    const expiresAt = this.now() + this.leaseTtlMs;
    const updated = await this.store.update(dispatchId, { states: ["STARTING", "RUNNING"], leaseId }, { leaseExpiresAt: expiresAt });
    if (!updated) throw leaseLost(dispatchId);
    return { expiresAt, cancelRequested: updated.cancelRequested, dispatch: updated };
  }

  async reportRunning(dispatchId: string, leaseId: string): Promise<DispatchRecord> {
    const now = this.now();
    const updated = await this.store.update(dispatchId, { states: ["STARTING"], leaseId }, { state: "RUNNING", startTime: now, updateTime: now });
    if (!updated) throw leaseLost(dispatchId);
    this.notifier.dispatchChanged(dispatchId);
    return updated;
  }

  async reportTerminal(dispatchId: string, leaseId: string, report: TerminalReport): Promise<DispatchRecord> {
    const record = await this.store.get(dispatchId);
    if (!record || record.leaseId !== leaseId) throw leaseLost(dispatchId);
    const updated = await this.finish(record, report, leaseId);
    if (!updated) throw leaseLost(dispatchId);
    return updated;
  }

  /**
   * The executor gives back a lease whose agent never started. An infrastructure failure (engine
   * unreachable, transient pull/create error) re-queues the run after an exponential backoff with
   * jitter, up to the attempt bound, then fails it with the reason; anything else fails it now.
   * A cancelled run ends CANCELLED. A run failed by its agent's runtime (image, container) counts
   * against the agent's circuit breaker when it ends.
   */
  async releaseLease(dispatchId: string, leaseId: string, reason: string, infrastructureFailure: boolean, runtimeFailure = false): Promise<DispatchRecord> {
    const record = await this.store.get(dispatchId);
    if (!record || record.leaseId !== leaseId || (record.state !== "STARTING" && record.state !== "RUNNING")) throw leaseLost(dispatchId);
    if (record.state === "RUNNING") {
      throw failedPrecondition("RUN_STARTED", `dispatch "${dispatchId}" already started its agent; report its terminal state instead`, {
        dispatch_id: dispatchId,
      });
    }
    const end = async (report: TerminalReport, countsAgainstAgent = false) => {
      const ended = await this.finish(record, report, leaseId, countsAgainstAgent);
      if (!ended) throw leaseLost(dispatchId);
      return ended;
    };
    if (record.cancelRequested) return end(endWithoutReport("CANCELLED", "cancelled before start"));
    if (!infrastructureFailure) return end(endWithoutReport("FAILED", reason || "the executor could not start the run"), runtimeFailure);
    const retried = await this.retryOrFail(record, { states: ["STARTING"], leaseId }, reason || "unknown", runtimeFailure);
    if (!retried) throw leaseLost(dispatchId);
    return retried;
  }

  /**
   * A run whose lease failed before its agent started, for an infrastructure reason (the
   * executor released it so, or was lost): queued again after an exponential backoff with
   * jitter, or, once its attempts are used up, FAILED with the reason. Undefined when the record
   * no longer meets `expected` (another replica settled it first, or a heartbeat renewed the
   * lease). A cancel that arrives meanwhile is never queued again: the run ends CANCELLED.
   * `runtimeFailure`: the agent's image or container failed, which counts against the agent if
   * it ends the run.
   */
  private async retryOrFail(record: DispatchRecord, expected: Expectation, reason: string, runtimeFailure = false): Promise<DispatchRecord | undefined> {
    const delayMs = this.infraRetry.delayAfter(record.attempt);
    if (delayMs === undefined) {
      return this.finish(record, endWithoutReport("FAILED", `infrastructure failure after ${record.attempt} attempts: ${reason}`), expected, runtimeFailure);
    }
    const now = this.now();
    const requeued = await this.store.update(
      record.id,
      { ...expected, cancelRequested: false },
      {
        state: "QUEUED",
        executorId: "",
        leaseId: "",
        leaseExpiresAt: null,
        notBefore: now + delayMs,
        failureReason: `attempt ${record.attempt} failed (infrastructure): ${reason}; retrying`,
        updateTime: now,
      },
    );
    if (!requeued) {
      // Cancelled since it was read: end it rather than queue it (leases never check the flag).
      return this.finish(record, endWithoutReport("CANCELLED", "cancelled before start"), { ...expected, cancelRequested: true });
    }
    this.logger.warn({ dispatch_id: record.id, executor_id: record.executorId, attempt: record.attempt, delay_ms: delayMs, reason }, "run failed before start; re-queued with backoff");
    this.notifier.dispatchChanged(record.id);
    // Wake long-pollers once the backoff has passed (their 1 s re-check would find it too).
    setTimeout(() => this.notifier.workQueued(), delayMs + 5).unref();
    return requeued;
  }

  /**
   * Cancellations of runs leased to the executor: those already flagged, then each new one as
   * it is requested on any replica, until `signal` fires.
   */
  async *cancellationsFor(executorId: string, signal: AbortSignal): AsyncGenerator<{ dispatchId: string; leaseId: string }> {
    // Subscribe before reading what is already flagged, so nothing falls between the two.
    const live = this.notifier.cancellations(signal)[Symbol.asyncIterator]();
    const flagged = async () => (await this.store.listLeasedTo(executorId, 1000)).filter((record) => record.cancelRequested);
    for (const record of await flagged()) yield { dispatchId: record.id, leaseId: record.leaseId };
    for (;;) {
      const next = await live.next();
      if (next.done) return;
      if (next.value === RESYNC) {
        // This stream fell behind and requests were dropped: what is flagged now covers them.
        for (const record of await flagged()) yield { dispatchId: record.id, leaseId: record.leaseId };
        continue;
      }
      const record = await this.store.get(next.value);
      if (record && record.executorId === executorId && record.cancelRequested && (record.state === "STARTING" || record.state === "RUNNING")) {
        yield { dispatchId: record.id, leaseId: record.leaseId };
      }
    }
  }

  /** The runs leased to an executor (STARTING/RUNNING), for its reconciliation after a restart. */
  async leasesOf(executorId: string): Promise<{ dispatch: DispatchRecord; agent: Agent | undefined }[]> {
    const records = await this.store.listLeasedTo(executorId, 1000);
    await this.agents.refreshIfStale();
    return records.map((dispatch) => {
      const agent = this.agents.get(dispatch.agent);
      return { dispatch, agent: agent && withinCaps(agent, dispatch.resourceCaps) };
    });
  }

  /**
   * Settles expired leases: a run that had not started goes back to the queue, as an
   * infrastructure failure (with backoff, and FAILED once its attempts are used up, so a run
   * that takes its executors down at start cannot do so for ever); one that was running fails
   * with "executor lost" (its container's fate is unknown).
   */
  async expireLeases(): Promise<number> {
    // One sweep at a time: a slow one (each settled run calls the tenant and telemetry services)
    // would otherwise overlap the next.
    if (this.sweeping) return 0;
    this.sweeping = true;
    try {
      const now = this.now();
      const expired = await this.store.listExpiredLeases(now, 100);
      for (const record of expired) {
        // Each settlement is conditional on the lease still being expired: records are handled one
        // after another, and a heartbeat that renewed one meanwhile keeps it running.
        const expected: Expectation = { states: [record.state], leaseId: record.leaseId, leaseExpiredBefore: now };
        if (record.cancelRequested) {
          // The tenant cancelled and the executor is gone: end it, never run it again.
          await this.finish(record, endWithoutReport("CANCELLED", "cancelled; executor lost"), expected);
        } else if (record.state === "STARTING") {
          await this.retryOrFail(record, expected, EXECUTOR_LOST_BEFORE_START);
        } else {
          const failed = await this.finish(record, endWithoutReport("FAILED", "executor lost"), expected);
          if (failed) this.logger.warn({ dispatch_id: record.id, executor_id: record.executorId }, "lease expired while running; failed");
        }
      }
      return expired.length;
    } finally {
      this.sweeping = false;
    }
  }

  /**
   * Ends the run if it is still STARTING or RUNNING (with the lease id, or everything, `expected`
   * asks for). `runtimeFailure`: the run ends because its agent's image or container failed
   * (counts against the agent).
   */
  private async finish(record: DispatchRecord, report: TerminalReport, expected?: string | Expectation, runtimeFailure = false): Promise<DispatchRecord | undefined> {
    const now = this.now();
    const condition: Expectation = typeof expected === "string" ? { states: ["STARTING", "RUNNING"], leaseId: expected } : (expected ?? { states: ["STARTING", "RUNNING"] });
    const updated = await this.store.update(
      record.id,
      condition,
      {
        state: report.state,
        exitCode: report.exitCode,
        failureReason: report.failureReason,
        resultJson: report.resultJson,
        leaseExpiresAt: null,
        endTime: now,
        updateTime: now,
      },
    );
    if (!updated) return undefined;
    this.notifier.dispatchChanged(record.id);
    this.logger.info({ dispatch_id: record.id, state: updated.state, exit_code: updated.exitCode }, "dispatch ended");
    await this.releaseSlot(updated);
    const runtime = runtimeFailure && updated.state === "FAILED";
    const succeeded = runtime ? false : agentOutcome(updated);
    if (succeeded !== undefined) {
      const outcome: RunOutcome = { succeeded, tenantId: updated.tenantId, runtimeFailure: runtime };
      await this.circuits.record(updated.agent, outcome);
      this.notifier.runOutcome(updated.agent, outcome);
    }
    await this.announce(() => this.runEvents.runEnded(updated, report.lastLogSeq), updated, "complete run");
    return updated;
  }

  private async suspendedTenants(): Promise<ReadonlySet<string>> {
    try {
      return await this.admission.suspendedTenants();
    } catch (err) {
      // The tenant service being down must not stop the queue; suspension applies again once it answers.
      this.logger.warn({ err }, "suspended tenants unknown; leasing without that filter");
      return new Set();
    }
  }

  /**
   * Frees the slot of a stored run that ended, and marks it freed. One that fails (the tenant
   * service away; the adapter retried briefly) stays marked as held, and `releaseOwedSlots`
   * tries it again from the sweep for as long as it takes, on any replica, after restarts too.
   */
  private async releaseSlot(record: DispatchRecord): Promise<void> {
    try {
      await this.releaseAndMark(record);
    } catch (err) {
      this.logger.warn({ err, dispatch_id: record.id, tenant_id: record.tenantId }, "tenant admission: release failed; the slot sweep will try again");
    }
  }

  /** Releases are idempotent: if marking fails after the release, the sweep's second release does no harm. */
  private async releaseAndMark(record: DispatchRecord): Promise<void> {
    await this.admission.release(record.tenantId, record.id);
    await this.store.update(record.id, { states: TERMINAL_STATES }, { slotHeld: false });
  }

  /**
   * Frees the slot of a candidate that was never stored (its admission's answer was lost, its
   * insert failed, or lost to a parallel request with the same id), and gives back the run of the
   * day it was counted (`neverCreated`: no run of it will ever exist). Only such ids come here; a
   * stored run's release keeps its day. Nothing durable remembers the candidate, so a failed
   * release is tried again in the background, with backoff, for about ten minutes, then logged as
   * an error.
   */
  private async releaseUnstoredSlot(tenantId: string, dispatchId: string, attempt = 1): Promise<void> {
    try {
      await this.admission.release(tenantId, dispatchId, { neverCreated: true });
    } catch (err) {
      if (attempt >= RELEASE_ATTEMPTS) {
        this.logger.error({ err, dispatch_id: dispatchId, tenant_id: tenantId, attempts: attempt }, "tenant admission: release failed for good; the slot stays taken");
        return;
      }
      const delayMs = Math.min(this.releaseRetryBaseMs * 2 ** (attempt - 1), 60_000);
      this.logger.warn({ err, dispatch_id: dispatchId, attempt, delay_ms: delayMs }, "tenant admission: release failed; retrying");
      setTimeout(() => void this.releaseUnstoredSlot(tenantId, dispatchId, attempt + 1), delayMs).unref();
    }
  }

  /**
   * The sweep of slots owed: releases the slots of runs that ended more than `graceMs` ago and
   * still hold theirs (their release failed), oldest first, up to `limit`. The grace keeps it
   * from racing a run's own release (a second release is harmless, just waste). Stops at the first
   * failure: the tenant service is likely still away, and the next sweep tries again. Returns
   * how many were released.
   */
  async releaseOwedSlots(limit: number, graceMs: number): Promise<number> {
    if (this.releasingOwed) return 0;
    this.releasingOwed = true;
    try {
      let released = 0;
      for (const record of await this.store.listSlotsOwed(this.now() - graceMs, limit)) {
        try {
          await this.releaseAndMark(record);
        } catch (err) {
          this.logger.warn({ err, dispatch_id: record.id, tenant_id: record.tenantId, released }, "slot sweep: release failed; trying again on the next sweep");
          break;
        }
        released++;
      }
      if (released > 0) this.logger.info({ released }, "slot sweep: released the slots of ended runs");
      return released;
    } finally {
      this.releasingOwed = false;
    }
  }

  private async recordCapacity(executorId: string, capacity: CapacityReport): Promise<void> {
    try {
      await this.store.recordExecutor({ executorId, ...capacity, seenAt: this.now() });
    } catch (err) {
      this.logger.warn({ err, executor_id: executorId }, "could not record executor capacity");
    }
  }

  /** Telemetry being down must not lose the dispatch: the failure is logged, the state stands. */
  private async announce(fn: () => Promise<void>, record: DispatchRecord, what: string): Promise<void> {
    try {
      await fn();
    } catch (err) {
      this.logger.warn({ err, dispatch_id: record.id }, `telemetry: ${what} failed`);
    }
  }
}

/** An end no executor reported (never started, lost, cancelled): no exit code, no result, no log lines counted. */
function endWithoutReport(state: "FAILED" | "CANCELLED", failureReason: string): TerminalReport {
  return { state, exitCode: null, failureReason, resultJson: null, lastLogSeq: 0n };
}

/** Why a run is retried when the executor holding its lease was lost before the run started. */
const EXECUTOR_LOST_BEFORE_START = "executor lost before the run started";

/**
 * What a run's end says about its agent, for the circuit breaker: success; a failure when it
 * ran and failed or timed out; or nothing (cancelled, executor lost, never started). A run
 * that never started because its agent's runtime failed (image, container) is counted by the
 * caller instead (`finish`), once per run, when that failure ends it.
 */
function agentOutcome(record: DispatchRecord): boolean | undefined {
  if (record.state === "SUCCEEDED") return true;
  if (record.state === "TIMED_OUT") return false;
  // Started, then failed: the agent's failure, unless its executor was lost under it.
  if (record.state === "FAILED" && record.startTime !== null && (record.exitCode !== null || !record.failureReason.startsWith("executor lost"))) return false;
  return undefined;
}

/**
 * The tenant service answered and refused (quota, missing secret, suspended tenant, a malformed
 * request): nothing was admitted. Anything else (unreachable, timed out, an internal error)
 * leaves it unknown whether the admission was recorded.
 */
function isDefiniteRefusal(err: unknown): boolean {
  return err instanceof ConnectError && DEFINITE_REFUSALS.has(err.code);
}

const DEFINITE_REFUSALS: ReadonlySet<Code> = new Set([Code.ResourceExhausted, Code.NotFound, Code.PermissionDenied, Code.InvalidArgument, Code.FailedPrecondition]);

function leaseLost(dispatchId: string) {
  return failedPrecondition("LEASE_LOST", `the lease on dispatch "${dispatchId}" is no longer held by this executor`, {
    dispatch_id: dispatchId,
  });
}

/**
 * The agent as a run of this dispatch gets it: its default resources bounded by the tenant
 * tier's caps recorded at creation (SPEC E2). A zero default means "unset" and takes the cap.
 */
export function withinCaps(agent: Agent, caps: ResourceCaps | null | undefined): Agent {
  if (!caps) return agent;
  const bound = (value: bigint | undefined, cap: number) => {
    const limit = BigInt(cap);
    return value === undefined || value === 0n || value > limit ? limit : value;
  };
  const resources = agent.resources;
  return {
    ...agent,
    resources: create(ResourcesSchema, {
      cpuMillis: bound(resources?.cpuMillis, caps.cpuMillis),
      memoryBytes: bound(resources?.memoryBytes, caps.memoryBytes),
      pidsLimit: bound(resources?.pidsLimit, caps.pidsLimit),
    }),
  };
}
