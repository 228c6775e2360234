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
import { counter, failedPrecondition, notFound, type Logger } from "@outpost/platform";
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
  /**
   * First delay before the queue of never-stored candidates whose slot release failed is tried
   * again, doubling while none goes through, at most a minute. Default 1000 ms.
   */
  releaseRetryBaseMs?: number;
  /** At most this many such candidates wait for their release (the oldest is dropped, logged and counted). Default 10,000. */
  unstoredReleaseLimit?: number;
  /** At most this many of their releases are in flight at once. Default 8. */
  unstoredReleaseConcurrency?: number;
  /** A candidate's release is given up this long after it first failed. Default ten minutes. */
  unstoredReleaseGiveUpMs?: number;
  /**
   * How long past its timeout a run may still be RUNNING before the dispatcher ends it itself
   * (TIMED_OUT) at its executor's next heartbeat. The executor enforces timeouts; this is the
   * backstop for one that does not (a bug, an old version), so no run stays RUNNING for ever
   * while its executor heartbeats. Above the executor's stop grace and stop retries. Default five minutes.
   */
  timeoutOverrunMs?: number;
  now?: () => number;
}

/** Executor capacity as reported with AcquireLease/Heartbeat (contract C). */
export type CapacityReport = Omit<ExecutorReport, "executorId" | "seenAt">;

const DEFAULT_QUEUE_RECHECK_MS = 1000;

/** Defaults of the queue of never-stored candidates' releases (DispatcherOptions). */
const UNSTORED_RELEASE_LIMIT = 10_000;
const UNSTORED_RELEASE_CONCURRENCY = 8;
const UNSTORED_RELEASE_GIVE_UP_MS = 10 * 60_000;
const UNSTORED_RELEASE_MAX_DELAY_MS = 60_000;
/** How long one slot sweep goes on releasing, page after page, before it leaves the rest to the next. */
const OWED_SWEEP_BUDGET_MS = 2000;

/** A never-stored candidate whose release failed, waiting to be tried again. */
interface UnstoredRelease {
  tenantId: string;
  dispatchId: string;
  /** When its first release failed (monotonic ms): it is given up UNSTORED_RELEASE_GIVE_UP_MS later. */
  since: number;
  attempts: number;
}

/** Releases of never-stored candidates given up (the slot stays taken): the queue was full, or they kept failing. */
const unstoredReleasesDropped = () =>
  counter(
    "outpost_dispatch_unstored_releases_dropped_total",
    "Slot releases of never-stored dispatch ids given up: dropped from the full retry queue (reason=queue_full) or still failing after ten minutes (reason=gave_up).",
    ["reason"],
  );

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
  private readonly timeoutOverrunMs: number;
  /** Set while a lease sweep runs (expireLeases). */
  private sweeping = false;
  /** Set while the slot sweep runs (releaseOwedSlots). */
  private releasingOwed = false;
  private readonly maxTimeoutMs: number;
  private readonly now: () => number;
  private readonly queueRecheckMs: number;
  private readonly releaseRetryBaseMs: number;
  private readonly unstoredReleaseLimit: number;
  private readonly unstoredReleaseConcurrency: number;
  private readonly unstoredReleaseGiveUpMs: number;
  /**
   * Never-stored candidates whose release failed, by dispatch id, oldest first (a Map keeps
   * insertion order): one bounded queue drained by one loop, whatever the number of failures.
   */
  private readonly unstored = new Map<string, UnstoredRelease>();
  /** The drain loop's next run, while it waits. */
  private unstoredTimer: NodeJS.Timeout | undefined;
  /** Set while the drain loop runs a round. */
  private drainingUnstored = false;
  /** Queued releases being tried right now (out of `unstored` until they fail and are queued again). */
  private unstoredInFlight = 0;
  /** The drain loop's current delay: 0 after a round in which a release went through, doubling while none does. */
  private unstoredBackoffMs = 0;

  constructor(options: DispatcherOptions) {
    this.store = options.store;
    this.agents = options.agents;
    this.notifier = options.notifier;
    this.runEvents = options.runEvents;
    this.logger = options.logger;
    this.leaseTtlMs = options.leaseTtlMs;
    this.timeoutOverrunMs = options.timeoutOverrunMs ?? DEFAULT_TIMEOUT_OVERRUN_MS;
    this.maxTimeoutMs = options.maxTimeoutMs;
    this.admission = options.admission ?? new UnlimitedAdmission(options.maxTimeoutMs);
    this.circuits = options.circuits ?? new AgentCircuits();
    this.infraRetry = options.infraRetry ?? new InfraRetry();
    this.now = options.now ?? Date.now;
    this.queueRecheckMs = options.queueRecheckMs ?? DEFAULT_QUEUE_RECHECK_MS;
    this.releaseRetryBaseMs = options.releaseRetryBaseMs ?? 1000;
    this.unstoredReleaseLimit = Math.max(1, options.unstoredReleaseLimit ?? UNSTORED_RELEASE_LIMIT);
    this.unstoredReleaseConcurrency = Math.max(1, options.unstoredReleaseConcurrency ?? UNSTORED_RELEASE_CONCURRENCY);
    this.unstoredReleaseGiveUpMs = options.unstoredReleaseGiveUpMs ?? UNSTORED_RELEASE_GIVE_UP_MS;
    unstoredReleasesDropped(); // declared up front, so dashboards find it at zero
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
      // The write may have happened all the same (its answer was lost, a retried write reported
      // the first one's conflict): then the run exists and keeps its slot and day.
      const written = await this.store.get(id).catch(() => undefined);
      if (!written || written.tenantId !== tenantId) {
        await this.releaseUnstoredSlot(tenantId, id);
        throw err;
      }
      this.logger.warn({ err, dispatch_id: id }, "dispatch insert reported a failure but the dispatch was stored; going ahead with it");
      inserted = { record: written, created: true };
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

  /**
   * A page of the tenant's dispatches, newest first, each as `page.encode` makes it for sending:
   * at most `limit`, and ended early once they would pass `maxBytes` as encoded (the first always
   * comes), so a page of large dispatches (task, env, result) stays bounded in memory and on the
   * wire whatever its size. The store is read in chunks for the same reason. `more`: a next page
   * has dispatches.
   */
  async list<T>(tenantId: string, filter: ListFilter, page: ListPage<T>): Promise<{ items: T[]; lastId: string | undefined; more: boolean }> {
    const { limit, maxBytes, encode } = page;
    const items: T[] = [];
    let bytes = 0;
    let afterId = page.afterId;
    let lastId: string | undefined;
    for (;;) {
      const want = Math.min(limit + 1 - items.length, LIST_CHUNK);
      const chunk = await this.store.list(tenantId, filter, want, afterId);
      for (const record of chunk) {
        if (items.length === limit) return { items, lastId, more: true };
        const encoded = encode(record);
        if (items.length > 0 && bytes + encoded.bytes > maxBytes) return { items, lastId, more: true };
        items.push(encoded.item);
        bytes += encoded.bytes;
        lastId = record.id;
      }
      if (chunk.length < want) return { items, lastId, more: false };
      afterId = chunk.at(-1)!.id;
    }
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
    const now = this.now();
    const expiresAt = now + this.leaseTtlMs;
    const updated = await this.store.update(dispatchId, { states: ["STARTING", "RUNNING"], leaseId }, { leaseExpiresAt: expiresAt });
    if (!updated) throw leaseLost(dispatchId);
    if (this.overran(updated, now)) {
      // The executor should have stopped it long ago and is still running it: the run ends here,
      // and the lease's loss tells the executor to stop the container (without a report).
      const ended = await this.finish(updated, timedOutWithoutReport(updated, this.timeoutOverrunMs), leaseId);
      if (ended) this.logger.warn({ dispatch_id: dispatchId, executor_id: updated.executorId }, "run still RUNNING past its timeout at a heartbeat; ended TIMED_OUT by the dispatcher");
      throw leaseLost(dispatchId);
    }
    return { expiresAt, cancelRequested: updated.cancelRequested, dispatch: updated };
  }

  /** Whether a run is still RUNNING more than `timeoutOverrunMs` past its timeout. */
  private overran(record: DispatchRecord, now: number): boolean {
    return record.state === "RUNNING" && record.startTime !== null && record.timeoutMs > 0 && now > record.startTime + record.timeoutMs + this.timeoutOverrunMs;
  }

  /**
   * STARTING → RUNNING. The holder's second RUNNING report (its first answer lost) answers the
   * run as it stands: LEASE_LOST would have the executor stop a healthy run.
   */
  async reportRunning(dispatchId: string, leaseId: string): Promise<DispatchRecord> {
    const now = this.now();
    const updated = await this.store.update(dispatchId, { states: ["STARTING"], leaseId }, { state: "RUNNING", startTime: now, updateTime: now });
    if (!updated) {
      const current = await this.store.get(dispatchId);
      if (current && current.leaseId === leaseId && current.state === "RUNNING") return current;
      throw leaseLost(dispatchId);
    }
    this.notifier.dispatchChanged(dispatchId);
    return updated;
  }

  /**
   * Ends the run as its lease's holder reports. The same end reported again (a retry whose first
   * answer was lost) answers the ended run without ending it twice (no second slot release,
   * circuit outcome or run end); any other report on an ended run is LEASE_LOST.
   */
  async reportTerminal(dispatchId: string, leaseId: string, report: TerminalReport): Promise<DispatchRecord> {
    const record = await this.store.get(dispatchId);
    if (!record || record.leaseId !== leaseId) throw leaseLost(dispatchId);
    if (record.state === report.state) return record;
    const updated = await this.finish(record, report, leaseId);
    if (updated) return updated;
    // Ended meanwhile: by this same report arriving twice at once, or by anything else.
    const current = await this.store.get(dispatchId);
    if (current && current.leaseId === leaseId && current.state === report.state) return current;
    throw leaseLost(dispatchId);
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
    // The caller already hung up: nothing to stream (and an abort listener would never fire).
    if (signal.aborted) return;
    // Subscribe before reading what is already flagged, so nothing falls between the two.
    const live = this.notifier.cancellations(signal);
    try {
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
    } finally {
      // Left early (the consumer stopped, or the store threw): stop listening now, not at the abort.
      await live.return?.();
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
   * stored run's release keeps its day. Nothing durable remembers the candidate: a release that
   * fails (not a refusal) joins the in-memory queue of unstored releases, which one loop drains
   * (drainUnstored). Never rejects.
   */
  private async releaseUnstoredSlot(tenantId: string, dispatchId: string): Promise<void> {
    try {
      await this.admission.release(tenantId, dispatchId, { neverCreated: true });
    } catch (err) {
      if (isReleaseRefusal(err)) {
        this.logger.error({ err, dispatch_id: dispatchId, tenant_id: tenantId }, "tenant admission: release refused; not retried");
        return;
      }
      this.logger.warn({ err, dispatch_id: dispatchId, tenant_id: tenantId, queued: this.unstored.size + 1 }, "tenant admission: release failed; queued to try again");
      this.queueUnstored({ tenantId, dispatchId, since: performance.now(), attempts: 1 });
    }
  }

  /** Never-stored candidates whose release is waiting to be tried again. */
  get unstoredReleasesPending(): number {
    return this.unstored.size + this.unstoredInFlight;
  }

  /**
   * Adds a candidate to the queue of unstored releases (once per id), dropping the oldest past
   * the bound (its slot stays taken: logged as an error and counted), and makes sure the drain
   * loop will run.
   */
  private queueUnstored(entry: UnstoredRelease): void {
    if (!this.unstored.has(entry.dispatchId)) {
      // The bound counts the ones being tried too: they come back when they fail.
      while (this.unstored.size > 0 && this.unstored.size + this.unstoredInFlight >= this.unstoredReleaseLimit) {
        const [oldestId, oldest] = this.unstored.entries().next().value!;
        this.unstored.delete(oldestId);
        unstoredReleasesDropped().inc({ reason: "queue_full" });
        this.logger.error(
          { dispatch_id: oldest.dispatchId, tenant_id: oldest.tenantId, attempts: oldest.attempts, limit: this.unstoredReleaseLimit },
          "tenant admission: release queue full; dropped the oldest, its slot stays taken",
        );
      }
      this.unstored.set(entry.dispatchId, entry);
    }
    this.scheduleUnstoredDrain();
  }

  private scheduleUnstoredDrain(): void {
    if (this.unstoredTimer || this.drainingUnstored || this.unstored.size === 0) return;
    const delayMs = Math.max(this.releaseRetryBaseMs, this.unstoredBackoffMs);
    this.unstoredTimer = setTimeout(() => {
      this.unstoredTimer = undefined;
      void this.drainUnstored();
    }, delayMs);
    this.unstoredTimer.unref();
  }

  /**
   * The one loop that retries unstored releases: takes the oldest few (at most
   * `unstoredReleaseConcurrency` in flight), tries them, and goes on at once while releases go
   * through; a round in which none does (the tenant service is still away) doubles the wait
   * before the next, up to a minute, so an outage costs a bounded number of calls and recovery
   * drains the queue at a bounded rate. A failed id goes to the back of the queue until ten
   * minutes after its first failure, then is given up (logged as an error and counted).
   */
  private async drainUnstored(): Promise<void> {
    if (this.drainingUnstored) return;
    this.drainingUnstored = true;
    try {
      while (this.unstored.size > 0) {
        const batch: UnstoredRelease[] = [];
        for (const entry of this.unstored.values()) {
          batch.push(entry);
          if (batch.length >= this.unstoredReleaseConcurrency) break;
        }
        for (const entry of batch) this.unstored.delete(entry.dispatchId);
        this.unstoredInFlight += batch.length;
        const outcomes = await Promise.all(batch.map((entry) => this.retryUnstored(entry)));
        this.unstoredInFlight -= batch.length;
        // Failed ones go to the back of the queue (after the in-flight count is down, so they
        // take no room from each other).
        batch.forEach((entry, i) => outcomes[i] === "again" && this.queueUnstored(entry));
        if (outcomes.includes("answered")) {
          this.unstoredBackoffMs = 0;
          continue;
        }
        this.unstoredBackoffMs = Math.min(Math.max(this.unstoredBackoffMs * 2, this.releaseRetryBaseMs), UNSTORED_RELEASE_MAX_DELAY_MS);
        break;
      }
    } finally {
      this.drainingUnstored = false;
    }
    this.scheduleUnstoredDrain();
  }

  /**
   * One try of a queued release: "answered" when the tenant service took it or refused it for
   * good, "again" when it is to be tried again, "given up" past the give-up time.
   */
  private async retryUnstored(entry: UnstoredRelease): Promise<"answered" | "again" | "given up"> {
    const { tenantId, dispatchId } = entry;
    try {
      await this.admission.release(tenantId, dispatchId, { neverCreated: true });
      this.logger.info({ dispatch_id: dispatchId, tenant_id: tenantId, attempts: entry.attempts + 1 }, "tenant admission: queued release went through");
      return "answered";
    } catch (err) {
      entry.attempts++;
      if (isReleaseRefusal(err)) {
        this.logger.error({ err, dispatch_id: dispatchId, tenant_id: tenantId }, "tenant admission: release refused; not retried");
        return "answered";
      }
      if (performance.now() - entry.since >= this.unstoredReleaseGiveUpMs) {
        unstoredReleasesDropped().inc({ reason: "gave_up" });
        this.logger.error({ err, dispatch_id: dispatchId, tenant_id: tenantId, attempts: entry.attempts }, "tenant admission: release failed for good; the slot stays taken");
        return "given up";
      }
      this.logger.debug({ err, dispatch_id: dispatchId, attempts: entry.attempts }, "tenant admission: queued release failed; trying again later");
      return "again";
    }
  }

  /**
   * The sweep of slots owed: releases the slots of runs that ended more than `graceMs` ago and
   * still hold theirs (their release failed), oldest first, `pageSize` at a time, page after page
   * until none is left or `budgetMs` has been spent. The grace keeps it from racing a run's own
   * release (a second release is harmless, just waste). A release the tenant service refuses for
   * good (NOT_FOUND, INVALID_ARGUMENT: it holds nothing it could release for that id) is logged and marked as not held, so one such run cannot hold up every later one;
   * any other failure stops the sweep (the tenant service is likely still away) and the next one
   * tries again. Returns how many slots it settled (released or refused).
   */
  async releaseOwedSlots(pageSize: number, graceMs: number, budgetMs = OWED_SWEEP_BUDGET_MS): Promise<number> {
    if (this.releasingOwed) return 0;
    this.releasingOwed = true;
    try {
      const started = performance.now();
      const endedBefore = this.now() - graceMs;
      const seen = new Set<string>();
      let released = 0;
      let refused = 0;
      sweep: for (;;) {
        const page = await this.store.listSlotsOwed(endedBefore, pageSize);
        const fresh = page.filter((record) => !seen.has(record.id));
        // Only runs already handled (their mark did not stick): leave them to the next sweep.
        if (fresh.length === 0) break;
        for (const record of fresh) {
          seen.add(record.id);
          try {
            await this.releaseAndMark(record);
            released++;
          } catch (err) {
            if (!isReleaseRefusal(err)) {
              this.logger.warn({ err, dispatch_id: record.id, tenant_id: record.tenantId, released }, "slot sweep: release failed; trying again on the next sweep");
              break sweep;
            }
            this.logger.error({ err, dispatch_id: record.id, tenant_id: record.tenantId }, "slot sweep: the tenant service refused the release; marking the slot as not held");
            try {
              await this.store.update(record.id, { states: TERMINAL_STATES }, { slotHeld: false });
            } catch (markErr) {
              this.logger.warn({ err: markErr, dispatch_id: record.id }, "slot sweep: could not mark the slot as not held; trying again on the next sweep");
              break sweep;
            }
            refused++;
          }
          if (performance.now() - started >= budgetMs) break sweep;
        }
        if (page.length < pageSize) break;
      }
      if (released + refused > 0) this.logger.info({ released, refused }, "slot sweep: settled the slots of ended runs");
      return released + refused;
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

/** What `list` reads from the store at a time. */
const LIST_CHUNK = 100;

export interface ListPage<T> {
  limit: number;
  /** Continues after this id. */
  afterId?: string;
  /** The page ends before its dispatches pass this many bytes as encoded (the first always comes). */
  maxBytes: number;
  /** A dispatch as it will be sent, and its size so (a result's Struct can be several times its JSON). */
  encode: (record: DispatchRecord) => { item: T; bytes: number };
}

/** An end no executor reported (never started, lost, cancelled): no exit code, no result, no log lines counted. */
function endWithoutReport(state: "FAILED" | "CANCELLED", failureReason: string): TerminalReport {
  return { state, exitCode: null, failureReason, resultJson: null, lastLogSeq: 0n };
}

/** How long past its timeout a run may be RUNNING before the dispatcher ends it (DispatcherOptions.timeoutOverrunMs). */
export const DEFAULT_TIMEOUT_OVERRUN_MS = 5 * 60_000;

/** The dispatcher's own end of a run its executor kept running past its timeout. */
function timedOutWithoutReport(record: DispatchRecord, overrunMs: number): TerminalReport {
  const reason = `timed out after ${record.timeoutMs / 1000} s; ended by the dispatcher, the executor had not stopped it ${overrunMs / 1000} s later`;
  return { state: "TIMED_OUT", exitCode: null, failureReason: reason, resultJson: null, lastLogSeq: 0n };
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

/**
 * The tenant service answered a release and refused it for good (an id or tenant it cannot
 * take): asking again would get the same answer. PERMISSION_DENIED is not one: it refuses the
 * caller, not the release (a signing key being rotated, a trusted-signers list being fixed), and
 * dropping owed slots for it would leave them taken at the tenant service for good; it is retried
 * with the rest. (RESOURCE_EXHAUSTED and FAILED_PRECONDITION refuse an admission for good, but not
 * a release: those are retried too.)
 */
function isReleaseRefusal(err: unknown): boolean {
  return err instanceof ConnectError && RELEASE_REFUSALS.has(err.code);
}

const RELEASE_REFUSALS: ReadonlySet<Code> = new Set([Code.NotFound, Code.InvalidArgument]);

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
