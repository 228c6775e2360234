/**
 * The executor core's view of the outside world: the container engine, the dispatcher's lease
 * API and the telemetry log sink. Adapters (Docker, gRPC) implement these; tests use fakes.
 */
import type { JsonObject } from "@bufbuild/protobuf";
import type { Lease } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import type { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";

export type OutputStream = "stdout" | "stderr";

/** A piece of a container's output, as read from the engine. */
export interface OutputFrame {
  stream: OutputStream;
  data: Buffer;
}

/** Everything needed to create a locked-down run container (SPEC E1, E2). */
export interface ContainerSpec {
  name: string;
  image: string;
  /** Overrides the image's command when not empty. */
  command: string[];
  /**
   * Runs first, given as its arguments what a container of this spec without it would run: the
   * image's ENTRYPOINT followed by `command` (or by the image's CMD when `command` is empty).
   * Warm containers wait for their run this way (warm-pool.ts) and then run exactly what a cold
   * container runs.
   */
  launcher?: string[];
  env: Record<string, string>;
  labels: Record<string, string>;
  platform: string;
  user: string;
  readonlyRootfs: boolean;
  tmpfs: Record<string, string>;
  /**
   * Mount options of a tmpfs put over each VOLUME the image declares: the engine would make
   * each a writable host directory, outside the read-only root and the workspace's disk quota.
   */
  imageVolumeTmpfs?: string;
  /** Host directories mounted into the container, `host:container[:ro]`. */
  binds: string[];
  capDrop: string[];
  securityOpt: string[];
  pidsLimit: number;
  memoryBytes: number;
  nanoCpus: number;
  networkMode: string;
}

/** A container the engine knows, as found by label (reconciliation, warm pool). */
export interface ContainerSummary {
  id: string;
  name: string;
  labels: Record<string, string>;
  running: boolean;
  /** False while the container was created but never started: its agent did not run. */
  started: boolean;
}

export interface ContainerExit {
  exitCode: number;
  oomKilled: boolean;
}

/**
 * Raised by `create` when the executor's host could not be made ready for the run (the EGRESS
 * network): the operator's to fix, not the agent's. Its message is for the executor's log; the
 * tenant is told only that the executor could not prepare the run.
 */
export class HostSetupError extends Error {
  override name = "HostSetupError";
}

/** Raised by `create` when the image is not on this host (no registry pulls here). */
export class ImageNotFoundError extends Error {
  override name = "ImageNotFoundError";
  readonly image: string;
  constructor(image: string, options?: ErrorOptions) {
    super(`image ${image} not present on executor host`, options);
    this.image = image;
  }
}

export interface ContainerRuntime {
  /** Resolves when the engine answers; rejects with the reason otherwise. */
  ping(): Promise<void>;
  /** Containers (running or not) carrying every one of `labels`. */
  list(labels: Record<string, string>): Promise<ContainerSummary[]>;
  /** Whether the image is in the engine (for linux/arm64). */
  imagePresent(image: string): Promise<boolean>;
  /** Pulls the image for linux/arm64; rejects when no registry serves it. */
  pull(image: string): Promise<void>;
  /**
   * The environment the container was created with (its `Config.Env`): where a run taken up
   * after a restart finds the secret values it was started with, to redact them (reconcile.ts).
   */
  environment(id: string): Promise<Record<string, string>>;
  /** Renames a container (warm containers take their run's name when claimed). */
  rename(id: string, name: string): Promise<void>;
  /** Creates the container; returns its id. */
  create(spec: ContainerSpec): Promise<string>;
  /** Attaches to stdout and stderr; call before `start` so no output is lost. Ends when the container exits. */
  attach(id: string): Promise<AsyncIterable<OutputFrame>>;
  start(id: string): Promise<void>;
  /** Resolves when the container has exited. */
  wait(id: string): Promise<ContainerExit>;
  /** SIGTERM, then SIGKILL after `graceMs`. */
  stop(id: string, graceMs: number): Promise<void>;
  /** Removes the container, running or not; a missing one is not an error. */
  remove(id: string): Promise<void>;
}

/** The dispatcher no longer recognises this lease (expired, re-leased, run settled elsewhere). */
export class LeaseLostError extends Error {
  override name = "LeaseLostError";
}

/** The dispatcher refused a report as it was (its result too large or too deep to take): sending it again is refused again. */
export class ReportRefusedError extends Error {
  override name = "ReportRefusedError";
}

export interface HeartbeatAnswer {
  expireTime: Date | undefined;
  cancelRequested: boolean;
  /** A fresh log grant for the run, lasting as long as the renewed lease (empty: keep the last). */
  logGrant: string;
}

export interface RunStateReport {
  dispatchId: string;
  leaseId: string;
  state: Dispatch_State;
  exitCode?: number;
  failureReason?: string;
  /** The agent's validated JSON result (terminal SUCCEEDED reports). */
  result?: JsonObject;
  lastLogSeq: number;
}

/** What the executor tells the dispatcher about itself on every AcquireLease and Heartbeat (SPEC D5). */
export interface CapacityReport {
  slotsTotal: number;
  slotsBusy: number;
  warmContainers: number;
  engineReady: boolean;
  imagesPresent: string[];
}

/** The dispatcher does not offer this call yet (contract C lands separately); callers carry on without it. */
export class NotSupportedError extends Error {
  override name = "NotSupportedError";
}

export interface LeaseClient {
  /** Long-polls for work; undefined when none arrived within `waitMs`. */
  acquire(executorId: string, waitMs: number, signal: AbortSignal, capacity?: CapacityReport): Promise<Lease | undefined>;
  /** Throws LeaseLostError when the lease is gone. */
  heartbeat(dispatchId: string, leaseId: string, capacity?: CapacityReport): Promise<HeartbeatAnswer>;
  /** Throws LeaseLostError when the lease is gone. */
  report(report: RunStateReport): Promise<void>;
  /**
   * Gives back a lease whose agent never started; `infrastructureFailure` asks the dispatcher
   * to re-queue it with backoff; `runtimeFailure` says the agent's image or container failed
   * (it counts against the agent's circuit breaker when it ends the run). Throws
   * NotSupportedError when the dispatcher lacks the call.
   */
  release(dispatchId: string, leaseId: string, reason: string, infrastructureFailure: boolean, runtimeFailure?: boolean): Promise<void>;
  /** The runs the dispatcher holds leased to `executorId`; throws NotSupportedError when it lacks the call. */
  listLeases(executorId: string): Promise<Lease[]>;
  /**
   * Cancellations of runs leased to `executorId`, as they happen (heartbeats carry them too,
   * later). Ends when `signal` aborts; throws NotSupportedError when the dispatcher lacks the call.
   */
  watchCancellations(executorId: string, signal: AbortSignal): AsyncIterable<{ dispatchId: string; leaseId: string }>;
}

/** Resolves a tenant's secrets by name (SPEC T5, contract B). */
export interface SecretResolver {
  /**
   * `grant` is the lease's secret grant (the dispatcher's signed consent for this executor to
   * read these secrets). Throws SecretsError; never logs values.
   */
  resolve(tenantId: string, names: string[], grant: string): Promise<Record<string, string>>;
}

export class SecretsError extends Error {
  override name = "SecretsError";
  /** Whether retrying elsewhere/later may help (tenant service unreachable) or not (a secret is missing). */
  readonly transient: boolean;
  constructor(message: string, transient: boolean, options?: ErrorOptions) {
    super(message, options);
    this.transient = transient;
  }
}

/** Host directories of one run: the workspace (bind-mounted at /workspace) and a control directory. */
export interface RunFiles {
  /** Parent of both; removed with the run. */
  root: string;
  workspace: string;
  control: string;
}

export interface Workspaces {
  /** Creates the run's directories, owned by the container user. */
  create(name: string): Promise<RunFiles>;
  /** Clones `url` at `ref` into the workspace; throws CheckoutError saying why. */
  checkout(files: RunFiles, url: string, ref: string, signal?: AbortSignal): Promise<void>;
  /** The result document the agent wrote (at most `maxBytes`), undefined when absent; throws when unsafe or too big. */
  readResult(files: RunFiles, maxBytes: number): Promise<string | undefined>;
  /** Notes on the host which dispatch and lease a run directory serves (reconciliation after a crash). */
  recordClaim(files: RunFiles, claim: { dispatchId: string; leaseId: string }): Promise<void>;
  readClaim(files: RunFiles): Promise<{ dispatchId: string; leaseId: string } | undefined>;
  /** Creates the FIFO a warm container waits on (see warm-pool.ts). */
  makeStartFifo(files: RunFiles): Promise<void>;
  /** Writes the run's start script into that FIFO; fails at once when nobody reads it. */
  writeStartFile(files: RunFiles, content: string, timeoutMs: number): Promise<void>;
  remove(files: RunFiles): Promise<void>;
  /** Run directories on disk (names), for removing leftovers. */
  listRuns(): Promise<string[]>;
  /** Files of an existing run by name. */
  filesOf(name: string): RunFiles;
  /**
   * Bytes the run's workspace takes on the host's disk (see disk-quota.ts): every file,
   * directory and link counted once, never following links; may stop counting once past
   * `stopAboveBytes`. Throws WorkspaceUnmeasurableError when part of it cannot be read.
   */
  diskUsage(files: RunFiles, stopAboveBytes: number, signal?: AbortSignal): Promise<number>;
}

/** Part of a workspace cannot be measured (not readable, path too long): its quota cannot be vouched for. */
export class WorkspaceUnmeasurableError extends Error {
  override name = "WorkspaceUnmeasurableError";
}

export class CheckoutError extends Error {
  override name = "CheckoutError";
}

/** One line of output with its per-run sequence number (SPEC L1). */
export interface LogLine {
  seq: number;
  stream: OutputStream;
  text: string;
  time: Date;
}

export interface LogConnectionHandlers {
  /** Telemetry stored everything up to `seq`. */
  onAck(seq: number): void;
  /**
   * The connection ended (error or not); unacked lines must be resent on a new one, unless
   * `err` is a LogRefusedError.
   */
  onClose(err?: unknown): void;
}

/**
 * Telemetry refused the run's output for good (its log grant refused, the request invalid):
 * sending it again would be refused again.
 */
export class LogRefusedError extends Error {
  override name = "LogRefusedError";
}

export interface LogConnection {
  /** One batch; telemetry acks each with the highest sequence it holds, so an empty one asks just that. */
  send(lines: LogLine[]): void;
  close(): void;
}

/** Opens log ingestion streams to telemetry, one per run. */
export interface LogSink {
  /** `grant`: the run's current log grant, which telemetry checks (run-grants.ts); read per request. */
  open(run: { dispatchId: string; tenantId: string; grant: () => string }, handlers: LogConnectionHandlers): LogConnection;
}
