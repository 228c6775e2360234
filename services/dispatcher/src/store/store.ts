/**
 * Persistence of dispatches: the queue's system of record (SPEC D7). Every state change is a
 * conditional update that names the states (and lease) it expects, so two dispatcher
 * replicas sharing a store can never both win a lease or a transition. The interface is
 * asynchronous so a MongoDB adapter (findOneAndUpdate) can implement it as it stands.
 */

export type DispatchState = "QUEUED" | "STARTING" | "RUNNING" | "SUCCEEDED" | "FAILED" | "TIMED_OUT" | "CANCELLED";

export const TERMINAL_STATES: readonly DispatchState[] = ["SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED"];

export function isTerminal(state: DispatchState): boolean {
  return TERMINAL_STATES.includes(state);
}

/** A dispatch as stored. Times are epoch milliseconds; absent values are null. */
/** Upper bounds on a run's container resources, from the tenant's tier (SPEC E2). */
export interface ResourceCaps {
  cpuMillis: number;
  memoryBytes: number;
  pidsLimit: number;
}

export interface DispatchRecord {
  id: string;
  tenantId: string;
  agent: string;
  task: string;
  repoUrl: string;
  repoRef: string;
  model: string;
  modelTier: number;
  timeoutMs: number;
  secretNames: string[];
  env: Record<string, string>;
  labels: Record<string, string>;
  requestId: string;
  state: DispatchState;
  attempt: number;
  exitCode: number | null;
  failureReason: string;
  /** The agent's JSON result, serialized. */
  resultJson: string | null;
  executorId: string;
  leaseId: string;
  leaseExpiresAt: number | null;
  cancelRequested: boolean;
  /** A re-queued run (infrastructure failure backoff) is not leased before this time; 0 = at once. */
  notBefore: number;
  traceparent: string;
  /** The tenant tier's container limits at creation; the lease caps the agent's resources by them (null: none). */
  resourceCaps: ResourceCaps | null;
  /**
   * The run holds one of its tenant's concurrent slots (taken at admission, before insert).
   * Cleared once the tenant service has taken the release; a terminal run still holding it
   * is owed a release, which the sweep keeps trying (`listSlotsOwed`), across restarts too.
   */
  slotHeld: boolean;
  createTime: number;
  startTime: number | null;
  endTime: number | null;
  updateTime: number;
}

export interface ListFilter {
  state?: DispatchState;
  agent?: string;
  labels?: Record<string, string>;
}

/** What a conditional update requires of the stored dispatch. */
export interface Expectation {
  states: readonly DispatchState[];
  /** When set, the stored lease id must equal it. */
  leaseId?: string;
  /** When set, the lease must have expired before this time (ms): no heartbeat renewed it since. */
  leaseExpiredBefore?: number;
  /** When set, the cancel flag must be as given (no cancel arrived since the record was read). */
  cancelRequested?: boolean;
}

export type DispatchPatch = Partial<Omit<DispatchRecord, "id" | "tenantId" | "createTime">>;

export interface DispatchStore {
  /**
   * Inserts a new dispatch. With a non-empty requestId, an existing dispatch of the same
   * tenant and requestId is returned instead (`created: false`), also under concurrency.
   */
  insert(record: DispatchRecord): Promise<{ record: DispatchRecord; created: boolean }>;
  get(id: string): Promise<DispatchRecord | undefined>;
  /** The tenant's dispatch created with that (non-empty) request id. */
  findByRequestId(tenantId: string, requestId: string): Promise<DispatchRecord | undefined>;
  /** Newest first; `afterId` continues after that id. */
  list(tenantId: string, filter: ListFilter, limit: number, afterId?: string): Promise<DispatchRecord[]>;
  /** Applies `patch` only if the stored dispatch meets `expected`; returns the updated record or undefined. */
  update(id: string, expected: Expectation, patch: DispatchPatch): Promise<DispatchRecord | undefined>;
  /**
   * Atomically moves one QUEUED dispatch (notBefore <= now, tenant not excluded) to STARTING
   * under a new lease and increments its attempt. Fair across tenants: the tenant served least
   * recently goes first (round-robin), and within a tenant the oldest run. Two replicas never
   * both win the same run. Returns undefined when nothing is leasable.
   */
  leaseNext(lease: LeaseRequest): Promise<DispatchRecord | undefined>;
  /** Dispatches in STARTING or RUNNING whose lease expired before `now`. */
  listExpiredLeases(now: number, limit: number): Promise<DispatchRecord[]>;
  /** Terminal dispatches that still hold their slot and ended before `endedBefore`, oldest end first. */
  listSlotsOwed(endedBefore: number, limit: number): Promise<DispatchRecord[]>;
  /** Dispatches in STARTING or RUNNING leased to that executor, oldest first. */
  listLeasedTo(executorId: string, limit: number): Promise<DispatchRecord[]>;
  /** Number of QUEUED dispatches. */
  queueDepth(): Promise<number>;
  /** Number of leased dispatches (STARTING or RUNNING); reads the state index, not the history. */
  activeLeases(): Promise<number>;
  /** Dispatches created at or after `since`, counted by their current state. */
  countByStateSince(since: number): Promise<Partial<Record<DispatchState, number>>>;
  close(): Promise<void>;
}

export interface LeaseRequest {
  executorId: string;
  leaseId: string;
  expiresAt: number;
  now: number;
  /** Tenants whose runs must not be leased (suspended). */
  excludeTenants?: readonly string[];
}

/** An operator-registered agent (or an operator's override of a built-in), as protobuf JSON. */
export interface StoredAgent {
  name: string;
  /** The Agent message in protobuf JSON form. */
  agentJson: string;
  /** Starts at 1; every update increments it (optimistic concurrency). */
  version: number;
  updateTime: number;
}

export interface AgentStore {
  listAgents(): Promise<StoredAgent[]>;
  /**
   * Writes the agent only if its stored version equals `expectedVersion` (0: it must not exist
   * yet). Returns the stored agent, or undefined when the expectation failed.
   */
  putAgent(name: string, agentJson: string, expectedVersion: number, now: number): Promise<StoredAgent | undefined>;
}

/** One mutating call (SPEC D9). */
export interface AuditRecord {
  /** ULID: time-ordered, so pages follow time. */
  id: string;
  /** Empty for calls that belong to no tenant (e.g. an operator registering an agent). */
  tenantId: string;
  principal: string;
  method: string;
  target: string;
  /** "OK" or the error code's name. */
  outcome: string;
  time: number;
}

export interface AuditStore {
  appendAudit(event: AuditRecord): Promise<void>;
  /** Newest first; `tenantId` undefined lists every tenant's; `afterId` continues after that id. */
  listAudit(tenantId: string | undefined, limit: number, afterId?: string): Promise<AuditRecord[]>;
}

/** The last capacity report of one executor (cross-team contract C). */
export interface ExecutorReport {
  executorId: string;
  slotsTotal: number;
  slotsBusy: number;
  warmContainers: number;
  engineReady: boolean;
  imagesPresent: string[];
  seenAt: number;
}

export interface ExecutorStore {
  /** Replaces the executor's last report. */
  recordExecutor(report: ExecutorReport): Promise<void>;
  /** Executors whose last report is at or after `seenSince`. */
  listExecutors(seenSince: number): Promise<ExecutorReport[]>;
  /**
   * Binds an executor id to a public key (base64 SPKI) until `expiresAt`: a new binding, the same
   * key again (a renewal), or a binding that ended before `now`. An id bound to another key until
   * after `now` is left as it is; the answer says until when.
   */
  bindExecutorKey(executorId: string, publicKey: string, expiresAt: number, now: number): Promise<KeyBinding>;
}

/**
 * What bindExecutorKey did. `renewed`: the id was bound to this same key and that binding had not
 * ended (a renewal, which the audit trail leaves out); otherwise the binding is new.
 */
export type KeyBinding = { bound: true; renewed: boolean } | { bound: false; boundUntil: number };

/** How long audit events are kept (SPEC D9): MongoDB deletes older ones by TTL, SQLite as it appends. */
export const AUDIT_RETENTION_MS = 365 * 24 * 60 * 60 * 1000;
/**
 * How long an executor's report, and its key binding after it ended, are kept. They drop out of
 * fleet status (and the binding stops counting) far sooner; executors that come and go (one id
 * per pod) would otherwise leave a row each for ever.
 */
export const EXECUTOR_RETENTION_MS = 24 * 60 * 60 * 1000;

/** Everything the dispatcher persists; one adapter implements it all (SQLite, MongoDB). */
export type DispatcherStore = DispatchStore & AgentStore & AuditStore & ExecutorStore;

/** What a new dispatch is given by its creator; everything else starts empty. */
export type NewDispatch = Pick<
  DispatchRecord,
  "id" | "tenantId" | "agent" | "task" | "repoUrl" | "repoRef" | "model" | "modelTier" | "timeoutMs" | "secretNames" | "env" | "labels" | "requestId" | "traceparent" | "createTime"
>;

/** A dispatch as it enters the queue: QUEUED, never leased, no outcome yet. */
export function queuedDispatch(init: NewDispatch & { resourceCaps?: ResourceCaps | null }): DispatchRecord {
  return {
    resourceCaps: null,
    ...init,
    state: "QUEUED",
    attempt: 0,
    exitCode: null,
    failureReason: "",
    resultJson: null,
    executorId: "",
    leaseId: "",
    leaseExpiresAt: null,
    cancelRequested: false,
    notBefore: 0,
    slotHeld: true,
    startTime: null,
    endTime: null,
    updateTime: init.createTime,
  };
}
