/**
 * One leased dispatch from container creation to its terminal report (SPEC D3, D7, E1, E2), or
 * from a container left running by a restarted executor (adoptRun, SPEC E5).
 * Attach before start so no output is lost; heartbeat at a third of the lease TTL and learn
 * of cancellation from it; enforce the timeout with SIGTERM, grace, SIGKILL; wait (bounded)
 * for telemetry to ack every line before reporting, so `last_log_seq` is exact; always remove
 * the container.
 */
import type { Logger } from "@outpost/platform";
import { Dispatch_State, NetworkPolicy, type Agent } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import type { Lease } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { Backoff, sleep } from "./backoff.ts";
import { DiskQuota } from "./disk-quota.ts";
import { LineSplitter } from "./line-splitter.ts";
import { LeaseKeeper } from "./lease-keeper.ts";
import { LogShipper } from "./log-shipper.ts";
import { Redactor } from "./redactor.ts";
import { terminalSafe } from "./terminal-safe.ts";
import { checkResult, MAX_RESULT_BYTES, type ResultCheck } from "./result.ts";
import type { Cancellations } from "./cancellations.ts";
import type { WarmPool } from "./warm-pool.ts";
import {
  CheckoutError,
  HostSetupError,
  ImageNotFoundError,
  LeaseLostError,
  ReportRefusedError,
  NotSupportedError,
  SecretsError,
  type CapacityReport,
  type ContainerRuntime,
  type RunFiles,
  type SecretResolver,
  type Workspaces,
  type ContainerSpec,
  type LeaseClient,
  type LogSink,
  type OutputFrame,
  type OutputStream,
  type RunStateReport,
} from "./ports.ts";

/** Where the agent finds its workspace and writes its result (the agent contract, README). */
export const WORKSPACE_DIR = "/workspace";
export const RESULT_RELATIVE_PATH = ".outpost/result.json";
export const RESULT_PATH = `${WORKSPACE_DIR}/${RESULT_RELATIVE_PATH}`;
/** Where a warm container sees its control directory (the start FIFO). */
export const CONTROL_DIR = "/run/outpost";
export const LABEL_PREFIX = "dev.outpost.";
/**
 * Who an agent runs as: never root. An executor that runs as root gives runs to nobody
 * (65534:65534) and chowns their workspaces to it. One that is not root (the Kubernetes
 * manifests run it as 1000) cannot chown, and could not delete what a 65534 agent made inside
 * directories of its own either (every run directory would be left behind): its agents run as
 * its own uid and gid instead, in their own containers, seeing only their own workspace.
 */
export interface ContainerUser {
  uid: number;
  gid: number;
}
export const NOBODY: ContainerUser = { uid: 65534, gid: 65534 };

/** The user an executor running as `uid`:`gid` gives its agents (ContainerUser). */
export function containerUserFor(uid: number | undefined, gid: number | undefined): ContainerUser {
  return uid === undefined || uid === 0 || gid === undefined ? NOBODY : { uid, gid };
}
/**
 * The network of runs whose agent's policy is EGRESS: an Outpost bridge network on which
 * containers cannot reach each other (made by the runtime, docker-runtime.ts), never Docker's
 * default `bridge`, where every container reaches every other — another tenant's agent too.
 */
export const EGRESS_NETWORK = "outpost-egress";

export const DEFAULT_RESOURCES = { pidsLimit: 256, memoryBytes: 512 * 1024 * 1024, cpuMillis: 1000 };
/** /tmp, and any VOLUME of the image: memory (charged to the container's limit), capped in size. */
const TMPFS_OPTIONS = "rw,size=64m";

export interface RunDeps {
  executorId: string;
  runtime: ContainerRuntime;
  leases: LeaseClient;
  logs: LogSink;
  workspaces: Workspaces;
  /** Absent when no tenant service is configured: runs that name secrets then fail. */
  secrets?: SecretResolver;
  /** Pre-created containers a run can take instead of creating one (SPEC E4). */
  warmPool?: WarmPool;
  logger: Logger;
  /** Between SIGTERM and SIGKILL when a run is stopped. */
  stopGraceMs: number;
  /** How long to wait for telemetry to ack the last lines before reporting. */
  logAckWaitMs?: number;
  /** Heartbeat period when the lease carries no expiry. */
  defaultHeartbeatMs?: number;
  /** Try `docker pull` when the image is missing (a registry may be reachable). */
  pullImages?: boolean;
  /** What the executor reports about itself with each heartbeat. */
  capacity?: () => CapacityReport;
  /** Cancellations streamed by the dispatcher (faster than heartbeats). */
  cancellations?: Cancellations;
  /** The workspace's disk quota (disk-quota.ts); no quota when absent. */
  workspaceQuota?: WorkspaceQuota;
  /** Who agents run as (containerUserFor); nobody (65534:65534) when absent. */
  containerUser?: ContainerUser;
  /** Output an attempt of a run may send to telemetry (log-shipper.ts outputCost); the rest is dropped. No cap when absent or 0. */
  maxOutputBytes?: number;
}

export interface WorkspaceQuota {
  limitBytes: number;
  /** Shortest pause between two measurements while the agent runs. */
  checkIntervalMs: number;
}

/** Why the executor stopped a container, if it did. */
type StopCause = { kind: "cancelled" } | { kind: "timed-out"; timeoutMs: number } | { kind: "lease-lost" } | { kind: "disk-quota"; reason: string };

/** How a run the executor stopped ends (a lost lease ends with no report at all). */
function stoppedOutcome(cause: Exclude<StopCause, { kind: "lease-lost" }>): { state: Dispatch_State; failureReason: string } {
  switch (cause.kind) {
    case "cancelled":
      return { state: Dispatch_State.CANCELLED, failureReason: "cancelled" };
    case "timed-out":
      return { state: Dispatch_State.TIMED_OUT, failureReason: `timed out after ${formatSeconds(cause.timeoutMs)}s` };
    case "disk-quota":
      return { state: Dispatch_State.FAILED, failureReason: cause.reason };
  }
}

/** The container's name for a run (also its run directory's name). */
export function runNameFor(lease: Lease): string {
  return `outpost-${lease.dispatch!.id.toLowerCase()}-${lease.leaseId.slice(-8).toLowerCase()}`;
}

/** The contract's environment for a run (README "Agent contract"); secrets are added by the caller. */
export function runEnvFor(lease: Lease): Record<string, string> {
  const dispatch = lease.dispatch!;
  const agent = lease.agent!;
  return {
    ...dispatch.env,
    OUTPOST_TASK: dispatch.task,
    OUTPOST_MODEL: dispatch.model,
    OUTPOST_DISPATCH_ID: dispatch.id,
    OUTPOST_AGENT: agent.name || dispatch.agent,
    OUTPOST_WORKSPACE: WORKSPACE_DIR,
    OUTPOST_RESULT_PATH: RESULT_PATH,
    ...(dispatch.repo?.url ? { OUTPOST_REPO_URL: dispatch.repo.url, OUTPOST_REPO_REF: dispatch.repo.ref } : {}),
    ...(lease.traceparent ? { TRACEPARENT: lease.traceparent } : {}),
  };
}

/** Image, command, limits and network of an agent: what a warm container must match to serve a run. */
export function agentShapeOf(agent: Agent, user: ContainerUser = NOBODY): Omit<ContainerSpec, "name" | "env" | "labels" | "binds"> {
  const resources = agent.resources;
  const positive = (value: bigint | undefined, fallback: number) => (value !== undefined && value > 0n ? Number(value) : fallback);
  return {
    image: agent.image,
    command: [...agent.command],
    platform: "linux/arm64",
    user: `${user.uid}:${user.gid}`,
    readonlyRootfs: true,
    tmpfs: { "/tmp": TMPFS_OPTIONS },
    imageVolumeTmpfs: TMPFS_OPTIONS,
    capDrop: ["ALL"],
    securityOpt: ["no-new-privileges"],
    pidsLimit: positive(resources?.pidsLimit, DEFAULT_RESOURCES.pidsLimit),
    memoryBytes: positive(resources?.memoryBytes, DEFAULT_RESOURCES.memoryBytes),
    nanoCpus: positive(resources?.cpuMillis, DEFAULT_RESOURCES.cpuMillis) * 1_000_000,
    networkMode: agent.networkPolicy === NetworkPolicy.EGRESS ? EGRESS_NETWORK : "none",
  };
}

/** The host directory mounts of a run: its workspace, and its control directory read-only. */
export function bindsFor(files: RunFiles): string[] {
  return [`${files.workspace}:${WORKSPACE_DIR}`, `${files.control}:${CONTROL_DIR}:ro`];
}

/** The container spec for a lease: image and command of the agent, the contract's env, lock-down. */
export function containerSpecFor(lease: Lease, executorId: string, files?: RunFiles, extraEnv: Record<string, string> = {}, user: ContainerUser = NOBODY): ContainerSpec {
  const dispatch = lease.dispatch!;
  const name = runNameFor(lease);
  return {
    ...agentShapeOf(lease.agent!, user),
    name,
    env: { ...runEnvFor(lease), ...extraEnv },
    labels: {
      [`${LABEL_PREFIX}managed`]: "true",
      [`${LABEL_PREFIX}dispatch-id`]: dispatch.id,
      [`${LABEL_PREFIX}tenant-id`]: dispatch.tenantId,
      [`${LABEL_PREFIX}executor-id`]: executorId,
      [`${LABEL_PREFIX}lease-id`]: lease.leaseId,
      ...(files ? { [`${LABEL_PREFIX}run-dir`]: name } : {}),
    },
    binds: files ? bindsFor(files) : [],
  };
}

/** What a restarted executor needs to settle a run it finds on disk (reconcile.ts). */
export interface RunClaim {
  dispatchId: string;
  leaseId: string;
}

/** Runs one lease to the end. Never throws: every failure becomes a report (or a log line). */
export async function executeRun(lease: Lease, deps: RunDeps): Promise<void> {
  const dispatch = lease.dispatch;
  if (!dispatch || !lease.agent) {
    deps.logger.error({ leaseId: lease.leaseId }, "lease without dispatch or agent; ignored");
    return;
  }
  const logger = deps.logger.child({ dispatchId: dispatch.id, leaseId: lease.leaseId });
  // Heartbeats from the lease on, through the run's preparation (lease-keeper.ts).
  const keeper = new LeaseKeeper(deps, lease, logger);
  // A cancel streamed by the dispatcher (WatchCancellations) acts as one a heartbeat brings, from
  // the lease on: during the preparation (a checkout, say) it ends the run before its container
  // exists; once the container runs, `keeper.onCancel` stops it.
  const unregisterCancel = deps.cancellations?.register(dispatch.id, lease.leaseId, () => {
    keeper.cancelled = true;
    keeper.onCancel?.();
  });
  try {
    const report = (r: Omit<RunStateReport, "dispatchId" | "leaseId">) =>
      reportWithRetry(deps.leases, { dispatchId: dispatch.id, leaseId: lease.leaseId, ...r }, logger);
    /**
     * The agent never started: an infrastructure problem goes back to the queue, others fail the
     * run. `runtimeFailure`: the agent's image or container failed (not the tenant's input).
     */
    const giveBack = async (reason: string, infrastructureFailure: boolean, runtimeFailure = false) => {
      if (infrastructureFailure) {
        try {
          await deps.leases.release(dispatch.id, lease.leaseId, reason, true, runtimeFailure);
          logger.warn({ reason }, "lease released for a retry (infrastructure failure)");
          return;
        } catch (err) {
          if (!(err instanceof NotSupportedError)) logger.warn({ err }, "releasing the lease failed; failing the run instead");
        }
      }
      await report({ state: Dispatch_State.FAILED, failureReason: reason, lastLogSeq: 0 });
    };
    /**
     * Whether the run ends before its container starts, after a step of its preparation: the
     * heartbeats found it cancelled (reported CANCELLED) or its lease lost (nothing to report).
     */
    const abandoned = async (cleanUp?: () => Promise<void>): Promise<boolean> => {
      if (!keeper.lost && !keeper.cancelled) return false;
      await cleanUp?.();
      if (keeper.lost) logger.warn("lease lost before the container started; the run is left to its new holder");
      else await report({ state: Dispatch_State.CANCELLED, failureReason: "cancelled before start", lastLogSeq: 0 });
      return true;
    };

    // Secrets first: nothing is created for a run whose secrets cannot be had.
    let secretEnv: Record<string, string> = {};
    if (dispatch.secretNames.length > 0) {
      if (!deps.secrets) {
        await giveBack("secrets requested but this executor has no tenant service configured (OUTPOST_TENANT_URL)", true);
        return;
      }
      try {
        secretEnv = await deps.secrets.resolve(dispatch.tenantId, [...dispatch.secretNames], lease.secretGrant);
      } catch (err) {
        const transient = err instanceof SecretsError ? err.transient : true;
        logger.warn({ transient, error: messageOf(err) }, "secrets not resolved");
        await giveBack(messageOf(err), transient);
        return;
      }
    }
    const redactor = new Redactor(secretEnv);
    if (await abandoned()) return;

    const warm = deps.warmPool?.claim(lease);
    const claim: RunClaim = { dispatchId: dispatch.id, leaseId: lease.leaseId };
    let files: RunFiles;
    try {
      files = warm ? warm.files : await deps.workspaces.create(runNameFor(lease));
      // A warm run records its claim only when its agent is about to start (below).
      if (!warm) await deps.workspaces.recordClaim(files, claim);
    } catch (err) {
      if (warm) await deps.runtime.remove(warm.id).catch(() => undefined);
      await giveBack(`run directory could not be created: ${messageOf(err)}`, true);
      return;
    }
    const newQuota = () => quotaFor(deps, files, logger);
    const quota = newQuota();
    /** The run's container, once there is one; emptied once it is removed. */
    const container = { id: warm?.id ?? "" };
    const cleanUp = cleanUpFor(deps, container, files, logger);

    if (dispatch.repo?.url) {
      // The checkout is watched as the agent will be: a repository (or a git server streaming a
      // pack without end) that fills the workspace past its quota ends it then, not when git is
      // done. A cancel or a lost lease ends it at once too.
      const checkout = new AbortController();
      const checkoutQuota = newQuota();
      let overQuota: string | undefined;
      checkoutQuota?.watch((reason) => {
        overQuota = reason;
        checkout.abort();
      });
      keeper.onCancel = keeper.onLost = () => checkout.abort();
      if (keeper.cancelled || keeper.lost) checkout.abort();
      try {
        await deps.workspaces.checkout(files, dispatch.repo.url, dispatch.repo.ref, checkout.signal);
        await checkoutQuota?.stop();
        // Measured once more: what git wrote after the last measurement counts as well.
        overQuota ??= await quota?.check();
        if (overQuota !== undefined) throw new Error(overQuota);
        logger.info({ ref: dispatch.repo.ref }, "repository checked out");
      } catch (err) {
        await checkoutQuota?.stop();
        if (await abandoned(cleanUp)) return;
        await cleanUp();
        // Only a CheckoutError's text is written for tenants (fixed kinds, the repository's own
        // words); anything else (a filesystem error handing the tree over, say) names the
        // executor's paths and goes to its log alone.
        const said = overQuota ?? (err instanceof CheckoutError ? err.message : "the checked-out tree could not be handed to the agent");
        const reason = `repository checkout failed: ${said}`;
        // git's own words, which the tenant is not shown (host-workspaces.ts gitFailure).
        const detail = err instanceof CheckoutError ? (err.cause instanceof Error ? err.cause.message : undefined) : messageOf(err);
        logger.warn({ reason, detail }, "checkout failed");
        await report({ state: Dispatch_State.FAILED, failureReason: reason, lastLogSeq: 0 });
        return;
      } finally {
        keeper.onCancel = keeper.onLost = undefined;
      }
      if (await abandoned(cleanUp)) return;
    }

    const spec = containerSpecFor(lease, deps.executorId, files, secretEnv, deps.containerUser);
    if (!warm) {
      try {
        container.id = await createWithPull(deps, spec, logger);
      } catch (err) {
        await cleanUp();
        if (err instanceof HostSetupError) {
          // The host's fault, not the agent's: retried (elsewhere, or once an operator fixed it)
          // without counting against the agent's circuit; the detail is for the operator alone.
          logger.error({ err }, "the executor's host could not be prepared for the run");
          await giveBack("the executor could not prepare the run's network", true, false);
          return;
        }
        const missing = err instanceof ImageNotFoundError;
        const reason = missing ? err.message : `container could not be created: ${messageOf(err)}`;
        logger.warn({ err: missing ? undefined : err, image: spec.image }, "create failed");
        // Another executor may have the image, and an engine error may pass: both are retried elsewhere/later.
        await giveBack(reason, true, true);
        return;
      }
    } else {
      await deps.runtime.rename(container.id, spec.name).catch((err: unknown) => logger.debug({ err }, "warm container keeps its name"));
    }
    if (await abandoned(cleanUp)) return;
    if (warm) {
      // Only now, right before its agent starts: a restarted executor that finds a warm container
      // without a claim knows its agent never ran, and the lease is given back for a retry as for a
      // cold run that never started (reconcile.ts); with a claim, it may have run.
      try {
        await deps.workspaces.recordClaim(files, claim);
      } catch (err) {
        await cleanUp();
        await giveBack(`run directory could not be written: ${messageOf(err)}`, true);
        return;
      }
    }
    const shipper = newShipper(deps, lease, keeper, logger, { continueStored: dispatch.attempt > 1 });
    let pumping: Promise<void>;
    try {
      const output = await deps.runtime.attach(container.id);
      pumping = pumpOutput(output, shipper, redactor, logger);
      if (warm) await deps.workspaces.writeStartFile(files, startScript(spec.env), 5000);
      else await deps.runtime.start(container.id);
    } catch (err) {
      // A warm container's start is a write to its FIFO, whose errors name the executor's paths.
      const reason =
        err instanceof ImageNotFoundError
          ? err.message
          : warm
            ? "the warm container did not take its run"
            : `container could not be started: ${messageOf(err)}`;
      logger.warn({ err, warm: Boolean(warm) }, "start failed");
      await quota?.stop();
      await cleanUp();
      await shipper.finish(1000);
      await giveBack(reason, true, true);
      return;
    }
    logger.info({ containerId: container.id, image: spec.image, warm: Boolean(warm) }, "container started");
    await superviseContainer({ deps, lease, logger, keeper, container, files, redactor, quota, shipper, pumping, timeoutMs: durationMs(dispatch.timeout), report, cleanUp });
  } finally {
    unregisterCancel?.();
    keeper.stop();
  }
}

/**
 * A run whose container outlived its executor (SPEC E5): the restarted executor finds it running
 * under a lease the dispatcher still holds for it, and takes it up where its predecessor left
 * it instead of stopping it, so an executor restart (a crash, an upgrade in place) within the
 * lease's life does not cost the runs it had. The lease comes from ListExecutorLeases, with
 * fresh grants; `redactor` holds the secret values the run was started with (reconcile.ts). Its
 * log continues after what telemetry holds, opened by a line saying that what the agent printed
 * while no executor watched is not in it (the engine keeps no copy:
 * `OUTPOST_EXECUTOR_ENGINE_LOGS=none`). The timeout counts from the run's start. Never throws.
 */
export async function adoptRun(lease: Lease, found: { containerId: string; files: RunFiles }, redactor: Redactor, deps: RunDeps): Promise<void> {
  const dispatch = lease.dispatch!;
  const logger = deps.logger.child({ dispatchId: dispatch.id, leaseId: lease.leaseId, adopted: true });
  const keeper = new LeaseKeeper(deps, lease, logger);
  const unregisterCancel = deps.cancellations?.register(dispatch.id, lease.leaseId, () => {
    keeper.cancelled = true;
    keeper.onCancel?.();
  });
  const container = { id: found.containerId };
  const cleanUp = cleanUpFor(deps, container, found.files, logger);
  const report = (r: Omit<RunStateReport, "dispatchId" | "leaseId">) =>
    reportWithRetry(deps.leases, { dispatchId: dispatch.id, leaseId: lease.leaseId, ...r }, logger);
  const shipper = newShipper(deps, lease, keeper, logger, { continueStored: true });
  try {
    shipper.add("stderr", adoptionNotice());
    let pumping: Promise<void>;
    try {
      pumping = pumpOutput(await deps.runtime.attach(container.id), shipper, redactor, logger);
    } catch (err) {
      // Not watched, it cannot be redacted, timed or stopped on a cancel: it ends here.
      logger.warn({ err }, "a left-over running container could not be attached; stopping it");
      shipper.close();
      await cleanUp();
      await report({ state: Dispatch_State.FAILED, failureReason: EXECUTOR_LOST, lastLogSeq: 0 });
      return;
    }
    // A start the dispatcher's clock puts ahead of this one's counts as now: never more than the whole timeout.
    const startedAt = Math.min(dispatch.startTime ? timestampMs(dispatch.startTime) : Date.now(), Date.now());
    logger.info({ containerId: container.id, runningForMs: Date.now() - startedAt }, "left-over running container adopted");
    const quota = quotaFor(deps, found.files, logger);
    await superviseContainer({
      deps,
      lease,
      logger,
      keeper,
      container,
      files: found.files,
      redactor,
      quota,
      shipper,
      pumping,
      timeoutMs: durationMs(dispatch.timeout) - (Date.now() - startedAt),
      report,
      cleanUp,
    });
  } catch (err) {
    // Nothing above should throw; if it does, the container goes and the run is left to its
    // lease's expiry ("executor lost") rather than take the executor down.
    logger.error({ err }, "taking up a left-over run failed");
    shipper.close();
    await cleanUp();
  } finally {
    unregisterCancel?.();
    keeper.stop();
  }
}

/** Why a run whose executor restarted while it ran failed (one that could not be taken up again). */
export const EXECUTOR_LOST = "executor lost: it restarted while the run was in progress";

/** The line an adopted run's log goes on with. */
export function adoptionNotice(now = new Date()): string {
  return `[outpost] the executor watching this run restarted; it took the run up again at ${now.toISOString()}, and what the run printed while no executor watched is not in this log`;
}

/** The run's workspace disk quota (disk-quota.ts), when the executor has one. */
function quotaFor(deps: RunDeps, files: RunFiles, logger: Logger): DiskQuota | undefined {
  if (!deps.workspaceQuota) return undefined;
  return new DiskQuota({
    limitBytes: deps.workspaceQuota.limitBytes,
    intervalMs: deps.workspaceQuota.checkIntervalMs,
    measure: (stopAboveBytes, signal) => deps.workspaces.diskUsage(files, stopAboveBytes, signal),
    logger,
  });
}

/** Removes the run's container if there still is one, then its run directory, unless the container could not be removed. */
function cleanUpFor(deps: RunDeps, container: { id: string }, files: RunFiles, logger: Logger): () => Promise<void> {
  return async () => {
    let containerGone = true;
    if (container.id) {
      await deps.runtime.remove(container.id).catch((err: unknown) => {
        containerGone = false;
        logger.warn({ err }, "remove failed");
      });
    }
    container.id = "";
    if (!containerGone) {
      // The agent may still run in it, and a recursive delete of a tree it can write would
      // follow a directory it swaps for a link mid-way (out of the workspace, as root). The
      // directory stays until reconciliation, which removes it once the container is gone.
      logger.error({ runDir: files.root }, "run directory kept: its container could not be removed and may still be running");
      return;
    }
    await deps.workspaces.remove(files).catch((err: unknown) => logger.warn({ err }, "run directory not removed"));
  };
}

/** The run's log shipper: under the lease's log grant (renewed with every heartbeat, run-grants.ts). */
function newShipper(deps: RunDeps, lease: Lease, keeper: LeaseKeeper, logger: Logger, options: { continueStored: boolean }): LogShipper {
  const dispatch = lease.dispatch!;
  return new LogShipper({
    dispatchId: dispatch.id,
    tenantId: dispatch.tenantId,
    grant: () => keeper.logGrant,
    sink: deps.logs,
    logger,
    // A retry's output, or an adopted run's, follows what telemetry already holds (log-shipper.ts).
    continueStored: options.continueStored,
    maxOutputBytes: deps.maxOutputBytes,
  });
}

/** A run whose container is running, attached and shipping its output: what supervising it needs. */
interface Supervised {
  deps: RunDeps;
  lease: Lease;
  logger: Logger;
  keeper: LeaseKeeper;
  container: { id: string };
  files: RunFiles;
  redactor: Redactor;
  quota: DiskQuota | undefined;
  shipper: LogShipper;
  /** The output pump, which ends when the container's output does. */
  pumping: Promise<void>;
  /** Time left before the run times out (at most 0: it is up); ignored when the dispatch has no timeout. */
  timeoutMs: number;
  report: (r: Omit<RunStateReport, "dispatchId" | "leaseId">) => Promise<void>;
  /** Removes what is left of the run: its container if still there, and its run directory. */
  cleanUp: () => Promise<void>;
}

/**
 * From a running container to the run's terminal report: reports RUNNING, enforces the timeout,
 * acts on cancels, a lost lease and the disk quota, waits for the exit, waits (bounded) for the
 * output to be acked, removes the container and reports how the run ended. Used for a run this
 * executor started (executeRun) and for one it took up again after a restart (adoptRun).
 */
async function superviseContainer(run: Supervised): Promise<void> {
  const { deps, lease, logger, keeper, container, files, redactor, quota, shipper, report } = run;
  const dispatch = lease.dispatch!;
  const timers: NodeJS.Timeout[] = [];
  let stopCause: StopCause | undefined;
  let stopping: Promise<void> | undefined;
  /** Set once the container has exited: late heartbeat answers must not act any more. */
  let exited = false;
  /** Aborted once the container exited: a stop still being retried gives up. */
  const exitedSignal = new AbortController();
  const stop = (cause: StopCause) => {
    if (stopCause || exited) return;
    stopCause = cause;
    logger.info({ cause: cause.kind }, "stopping container");
    // Over its disk quota, the agent gets no grace: it would go on writing.
    const graceMs = cause.kind === "disk-quota" ? 0 : deps.stopGraceMs;
    stopping = stopContainer(deps, container.id, graceMs, exitedSignal.signal, logger);
  };
  try {
    // Waited on from the start, before anything can stop the container: a container force-removed
    // by a stop that the engine kept refusing (stopContainer) still answers a wait in flight
    // (137), where a wait begun after the removal would find no container.
    const exiting = deps.runtime.wait(container.id);
    exiting.catch(() => undefined); // awaited below; not an unhandled rejection meanwhile
    quota?.watch((reason) => stop({ kind: "disk-quota", reason }));
    const timeoutMs = durationMs(dispatch.timeout);
    if (timeoutMs > 0) timers.push(setTimeout(() => stop({ kind: "timed-out", timeoutMs }), Math.max(0, run.timeoutMs)));
    // The heartbeats that kept the lease while the run was prepared now stop the container.
    keeper.onCancel = () => stop({ kind: "cancelled" });
    keeper.onLost = () => stop({ kind: "lease-lost" });
    if (keeper.lost) stop({ kind: "lease-lost" });
    else if (keeper.cancelled) stop({ kind: "cancelled" });

    try {
      // An adopted run's dispatcher may have it RUNNING already: the holder's repeated report is answered as it is.
      await deps.leases.report({ dispatchId: dispatch.id, leaseId: lease.leaseId, state: Dispatch_State.RUNNING, lastLogSeq: 0 });
    } catch (err) {
      if (err instanceof LeaseLostError) stop({ kind: "lease-lost" });
      else logger.warn({ err }, "reporting RUNNING failed; the run goes on");
    }

    const exit = await exiting;
    exited = true;
    exitedSignal.abort();
    keeper.stop();
    for (const timer of timers) clearTimeout(timer);
    await quota?.stop();
    await stopping;
    // The output stream ends when the container exits; bounded in case the engine keeps it open.
    const pumpWait = new AbortController();
    await Promise.race([run.pumping, sleep(5000, pumpWait.signal)]);
    pumpWait.abort();
    const lastLogSeq = await shipper.finish(deps.logAckWaitMs ?? 10_000);
    // Left set when the remove fails: cleanUp tries again and keeps the run directory if it fails too.
    await deps.runtime.remove(container.id).then(
      () => (container.id = ""),
      (err: unknown) => logger.warn({ err }, "remove failed"),
    );
    logger.info({ exitCode: exit.exitCode, oomKilled: exit.oomKilled, stopCause: stopCause?.kind, lastLogSeq }, "container exited");

    const cause = stopCause as StopCause | undefined;
    if (cause?.kind === "lease-lost") return;
    // Measured once more after the exit, so a run that wrote past its quota between two
    // measurements (or before the first) fails as surely as one that was caught.
    const overQuota = cause ? undefined : await quota?.check();
    if (cause) {
      await report({ ...stoppedOutcome(cause), exitCode: exit.exitCode, lastLogSeq });
    } else if (overQuota !== undefined) {
      await report({ state: Dispatch_State.FAILED, exitCode: exit.exitCode, failureReason: overQuota, lastLogSeq });
    } else if (exit.exitCode === 0 && !exit.oomKilled) {
      // The result file outlives the container in the bind-mounted workspace.
      let check: ResultCheck;
      try {
        check = checkResult(await deps.workspaces.readResult(files, MAX_RESULT_BYTES), lease.agent!.outputSchema, (text) => redactor.redact(text));
      } catch (err) {
        // The adapter's reasons name no host path (host-workspaces.ts); the cause is for the log.
        logger.warn({ err }, "result not read");
        check = { ok: false, reason: redactor.redact(`the result could not be read: ${messageOf(err)}`) };
      }
      if (check.ok) {
        await report({ state: Dispatch_State.SUCCEEDED, exitCode: 0, lastLogSeq, ...(check.result ? { result: redactor.redactJson(check.result) } : {}) });
      } else {
        await report({ state: Dispatch_State.FAILED, exitCode: 0, failureReason: check.reason, lastLogSeq });
      }
    } else {
      const failureReason = exit.oomKilled ? "out of memory" : `agent exited with code ${exit.exitCode}`;
      await report({ state: Dispatch_State.FAILED, exitCode: exit.exitCode, failureReason, lastLogSeq });
    }
  } catch (err) {
    // The engine failed us mid-run (e.g. wait broke): settle the run rather than leave it RUNNING.
    logger.error({ err }, "run failed in the executor");
    exited = true;
    exitedSignal.abort();
    keeper.stop();
    for (const timer of timers) clearTimeout(timer);
    const lastLogSeq = await shipper.finish(2000);
    // A run the executor was stopping ends as that stop says (the container is gone either way).
    const cause = stopCause as StopCause | undefined;
    if (cause?.kind === "lease-lost") return;
    await report({ ...(cause ? stoppedOutcome(cause) : { state: Dispatch_State.FAILED, failureReason: `executor error: ${messageOf(err)}` }), lastLogSeq });
  } finally {
    await quota?.stop();
    shipper.close();
    await run.cleanUp();
  }
}

/** Engine calls a stop makes before it force-removes the container, and force-removals before it gives up. */
export const STOP_ATTEMPTS = 3;
export const FORCE_REMOVE_ATTEMPTS = 5;

/**
 * Stops a container the executor means to end (timeout, cancel, lost lease, disk quota): the
 * stop is retried with backoff when the engine fails it; still refused, the container is
 * force-removed (SIGKILL, no grace), retried as well. Once the cause is set nothing else stops
 * the container, so a stop that failed once must not be the end of it: the agent would run past
 * its timeout. Ends early once the container exited (`exited`).
 */
async function stopContainer(deps: RunDeps, containerId: string, graceMs: number, exited: AbortSignal, logger: Logger): Promise<void> {
  const backoff = new Backoff({ baseMs: 250, maxMs: 4000 });
  for (let attempt = 1; attempt <= STOP_ATTEMPTS && !exited.aborted; attempt++) {
    try {
      await deps.runtime.stop(containerId, graceMs);
      return;
    } catch (err) {
      logger.warn({ err, attempt }, "stop failed");
    }
    if (attempt < STOP_ATTEMPTS) await sleep(backoff.next(), exited);
  }
  for (let attempt = 1; attempt <= FORCE_REMOVE_ATTEMPTS && !exited.aborted; attempt++) {
    await sleep(backoff.next(), exited);
    if (exited.aborted) return;
    try {
      await deps.runtime.remove(containerId);
      logger.warn("container force-removed: it could not be stopped");
      return;
    } catch (err) {
      logger.warn({ err, attempt }, "force-removing the container failed");
    }
  }
  if (!exited.aborted) logger.error("container could be neither stopped nor removed; it is left to the engine");
}

/** Creates the container; a missing image is pulled once (where a registry is reachable) and the create retried. */
async function createWithPull(deps: RunDeps, spec: ContainerSpec, logger: Logger): Promise<string> {
  try {
    return await deps.runtime.create(spec);
  } catch (err) {
    if (!(err instanceof ImageNotFoundError) || !deps.pullImages) throw err;
    try {
      await deps.runtime.pull(spec.image);
    } catch (pullErr) {
      logger.warn({ image: spec.image, error: messageOf(pullErr) }, "image pull failed");
      throw err;
    }
    return await deps.runtime.create(spec);
  }
}

/**
 * The shell script a warm container sources from its start FIFO: the run's environment as
 * exports. Values are single-quoted (no expansion); names that are not shell names are skipped.
 */
export function startScript(env: Record<string, string>): string {
  const lines = Object.entries(env)
    .filter(([name]) => /^[A-Za-z_][A-Za-z0-9_]*$/.test(name))
    .map(([name, value]) => `export ${name}='${value.replaceAll("'", `'\\''`)}'`);
  return lines.join("\n") + "\n";
}

/** Reads frames, splits lines per stream, ships them; flushes unterminated tails at the end. */
async function pumpOutput(output: AsyncIterable<OutputFrame>, shipper: LogShipper, redactor: Redactor, logger: Logger): Promise<void> {
  // Secrets first (a value is looked for in the text as printed), then control characters made visible.
  const options = redactor.empty
    ? { transform: terminalSafe }
    : { transform: (text: string) => terminalSafe(redactor.redact(text)), holdBack: redactor.maxValueLength - 1 };
  const splitters: Record<OutputStream, LineSplitter> = { stdout: new LineSplitter(options), stderr: new LineSplitter(options) };
  try {
    for await (const frame of output) {
      for (const line of splitters[frame.stream].push(frame.data)) shipper.add(frame.stream, line);
      if (shipper.full) await shipper.room();
    }
  } catch (err) {
    logger.warn({ err }, "output stream broke");
  }
  for (const stream of ["stdout", "stderr"] as const) {
    for (const line of splitters[stream].flush()) shipper.add(stream, line);
  }
}

/**
 * Reports with retries on transient failures; a lost lease ends it (someone else owns the run).
 * A report the dispatcher refuses as it is (its result too large to take) becomes a FAILED
 * report without the result, so the run ends with a reason rather than "executor lost".
 */
async function reportWithRetry(leases: LeaseClient, report: RunStateReport, logger: Logger): Promise<void> {
  const backoff = new Backoff({ baseMs: 200, maxMs: 5000 });
  for (let attempt = 1; ; attempt++) {
    try {
      await leases.report(report);
      logger.info({ state: Dispatch_State[report.state], exitCode: report.exitCode, lastLogSeq: report.lastLogSeq }, "run state reported");
      return;
    } catch (err) {
      if (err instanceof ReportRefusedError && report.result !== undefined) {
        logger.warn({ err: err.message }, "result refused by the dispatcher; reporting FAILED without it");
        const { result: _refused, ...rest } = report;
        report = { ...rest, state: Dispatch_State.FAILED, failureReason: `the result could not be reported: ${err.message}` };
        continue;
      }
      if (err instanceof LeaseLostError || err instanceof ReportRefusedError || attempt >= 6) {
        logger.warn({ err, state: Dispatch_State[report.state] }, "run state not reported");
        return;
      }
      await sleep(backoff.next());
    }
  }
}

function durationMs(duration: { seconds: bigint; nanos: number } | undefined): number {
  return duration ? Number(duration.seconds) * 1000 + Math.floor(duration.nanos / 1e6) : 0;
}

function timestampMs(time: { seconds: bigint; nanos: number }): number {
  return Number(time.seconds) * 1000 + Math.floor(time.nanos / 1e6);
}

function formatSeconds(ms: number): string {
  return ms % 1000 === 0 ? String(ms / 1000) : (ms / 1000).toFixed(1);
}

function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
