/**
 * Start-up reconciliation (SPEC E5): an executor that crashed or was killed left containers
 * and run directories behind. Before leasing anything it finds its containers by label and
 * settles each run with the dispatcher, then removes them, so no run stays RUNNING forever and
 * no container is orphaned.
 *
 * - A container still running under the lease the dispatcher still holds for this executor, its
 *   run RUNNING: handed to `adopt` (run.ts adoptRun), which takes the run up again, when the
 *   secret values it was started with can be read back to redact what it prints from now on.
 * - Any other container still running (its lease gone, or unknown): stopped, and the run
 *   reported FAILED "executor lost".
 * - A container that already exited: settled by its real exit code (and result, checked
 *   against the agent's schema when the dispatcher's lease list provides the agent).
 * - A container created but never started (the crash came between create and start): its
 *   agent did not run, so it is removed and the lease given back to be retried, like a lease
 *   with no container at all.
 * - A lease the dispatcher holds for this executor with no container (the crash came between
 *   lease and start): given back as an infrastructure failure so it is retried.
 * A settled run's result and failure reason go through its secret redactor, as in a live run:
 * when the lease names secrets that cannot be resolved now, the result is withheld (FAILED).
 * So is it when the lease list could not be had (ListExecutorLeases unimplemented, timed out or
 * unavailable): without the lease the run's secrets and output schema are unknown, and a result
 * that cannot be redacted or checked is never reported.
 * The dispatcher's ListExecutorLeases (contract C) is optional: without it, the labels and the
 * run directory's claim file name the run, and a run this executor cannot settle is failed by
 * the dispatcher's lease expiry ("executor lost").
 */
import type { Logger } from "@outpost/platform";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import type { Lease } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { NotSupportedError, LeaseLostError, type ContainerRuntime, type ContainerSummary, type LeaseClient, type RunFiles, type RunStateReport, type SecretResolver, type Workspaces } from "./ports.ts";
import { Redactor } from "./redactor.ts";
import { checkResult, MAX_RESULT_BYTES } from "./result.ts";
import { EXECUTOR_LOST, LABEL_PREFIX } from "./run.ts";
import { WARM_LABEL } from "./warm-pool.ts";

export interface ReconcileDeps {
  executorId: string;
  runtime: ContainerRuntime;
  leases: LeaseClient;
  workspaces: Workspaces;
  /** Resolves the secrets of a left-over run so its result can be redacted. */
  secrets?: SecretResolver;
  logger: Logger;
  /**
   * Takes up a run whose container is still running under a lease the dispatcher still holds
   * for this executor (run.ts adoptRun). Without it such a run is stopped and failed.
   */
  adopt?: (lease: Lease, found: { containerId: string; files: RunFiles }, redactor: Redactor) => void;
}

export interface ReconcileOutcome {
  containersRemoved: number;
  runsSettled: number;
  leasesReleased: number;
  /** Running containers handed to `adopt`. */
  runsAdopted: number;
}

export { EXECUTOR_LOST } from "./run.ts";

export const RESULT_WITHHELD = "executor lost: the result was withheld (its secrets could not be resolved to redact it)";

export const RESULT_WITHHELD_NO_LEASE =
  "executor lost: the result was withheld (the run's lease could not be listed, so it could not be redacted or checked)";

/** The run's redactor; undefined when it names secrets that cannot be resolved now. */
async function redactorFor(deps: ReconcileDeps, lease: Lease | undefined): Promise<Redactor | undefined> {
  const names = lease?.dispatch?.secretNames ?? [];
  if (names.length === 0) return new Redactor({});
  if (!deps.secrets) return undefined;
  try {
    return new Redactor(await deps.secrets.resolve(lease!.dispatch!.tenantId, [...names], lease!.secretGrant));
  } catch (err) {
    deps.logger.warn({ dispatchId: lease!.dispatch!.id, error: err instanceof Error ? err.message : String(err) }, "secrets of a left-over run not resolved");
    return undefined;
  }
}

/**
 * The redactor of a run taken up again: the values its secrets had when its container was
 * created, read from the container's environment, not resolved anew (a secret rotated since would
 * leave the old value, which is what the agent prints, unredacted). Undefined for a warm
 * container (it got its run's environment through its start script, not as its own: a variable
 * of the image's by a secret's name would stand in for the secret), when a value is not there, or
 * when the environment cannot be read: such a run is stopped as before.
 */
async function startedWithRedactor(deps: ReconcileDeps, container: ContainerSummary, lease: Lease): Promise<Redactor | undefined> {
  const names = lease.dispatch?.secretNames ?? [];
  if (names.length === 0) return new Redactor({});
  if (container.labels[WARM_LABEL] !== undefined) return undefined;
  try {
    const env = await deps.runtime.environment(container.id);
    const values: Record<string, string> = {};
    for (const name of names) {
      const value = env[name];
      if (value === undefined) return undefined;
      values[name] = value;
    }
    return new Redactor(values);
  } catch (err) {
    deps.logger.warn({ dispatchId: lease.dispatch?.id, err }, "environment of a left-over running container not read");
    return undefined;
  }
}

export async function reconcile(deps: ReconcileDeps): Promise<ReconcileOutcome> {
  const { runtime, leases, workspaces, logger } = deps;
  const outcome: ReconcileOutcome = { containersRemoved: 0, runsSettled: 0, leasesReleased: 0, runsAdopted: 0 };
  let held: Lease[] | undefined;
  try {
    held = await leases.listLeases(deps.executorId);
  } catch (err) {
    logger.warn({ err: err instanceof NotSupportedError ? err.message : err }, "leases held by this executor unknown; settling from labels only");
  }
  const heldById = new Map((held ?? []).map((l) => [l.dispatch?.id ?? "", l]));
  const settled = new Set<string>();
  /**
   * Run directories whose container could not be removed: the agent may still run in it, and a
   * recursive delete of a tree it can write would follow a directory it swaps for a link.
   */
  const kept = new Set<string>();
  const containers = await runtime.list({ [`${LABEL_PREFIX}managed`]: "true", [`${LABEL_PREFIX}executor-id`]: deps.executorId });
  for (const container of containers) {
    const runDir = container.labels[`${LABEL_PREFIX}run-dir`];
    const files = runDir ? safeFilesOf(workspaces, runDir) : undefined;
    const claim =
      container.labels[`${LABEL_PREFIX}dispatch-id`] && container.labels[`${LABEL_PREFIX}lease-id`]
        ? { dispatchId: container.labels[`${LABEL_PREFIX}dispatch-id`]!, leaseId: container.labels[`${LABEL_PREFIX}lease-id`]! }
        : files
          ? await workspaces.readClaim(files)
          : undefined;
    let gone = false;
    try {
      if (claim && !container.started && (held === undefined || heldById.has(claim.dispatchId))) {
        await runtime.remove(container.id);
        gone = true;
        outcome.containersRemoved++;
        if (await giveBack(claim.dispatchId, claim.leaseId)) outcome.leasesReleased++;
        settled.add(claim.dispatchId);
      } else if (claim && (held === undefined || heldById.has(claim.dispatchId))) {
        const lease = heldById.get(claim.dispatchId);
        // Still running under the lease it was started with, and known to the dispatcher as
        // RUNNING (so its agent did start: a warm container claimed right before the crash may
        // still wait for its start script): taken up, not stopped, when the secret values it was
        // started with can be had to redact what it prints from now on.
        const adoptable =
          container.running && deps.adopt && files && runDir && lease?.leaseId === claim.leaseId && lease.agent && lease.dispatch?.state === Dispatch_State.RUNNING;
        const redactor = adoptable ? await startedWithRedactor(deps, container, lease) : undefined;
        if (adoptable && redactor) {
          deps.adopt!(lease, { containerId: container.id, files }, redactor);
          outcome.runsAdopted++;
          settled.add(claim.dispatchId);
          kept.add(runDir);
          logger.info({ dispatchId: claim.dispatchId, container: container.name }, "left-over running container taken up again");
          continue;
        }
        let report: Omit<RunStateReport, "dispatchId" | "leaseId">;
        if (container.running) {
          report = { state: Dispatch_State.FAILED, failureReason: EXECUTOR_LOST, lastLogSeq: 0 };
        } else {
          const exit = await runtime.wait(container.id);
          if (exit.exitCode === 0 && !exit.oomKilled && files) {
            let raw: string | undefined;
            try {
              raw = await workspaces.readResult(files, MAX_RESULT_BYTES);
            } catch {
              raw = undefined;
            }
            // No lease (the list failed): its secrets and schema are unknown, so nothing of the
            // agent's result is reported — not even whether it was there or valid.
            const redactor = lease ? await redactorFor(deps, lease) : undefined;
            if (!lease) {
              report = { state: Dispatch_State.FAILED, exitCode: 0, failureReason: RESULT_WITHHELD_NO_LEASE, lastLogSeq: 0 };
            } else if (!redactor) {
              report = { state: Dispatch_State.FAILED, exitCode: 0, failureReason: RESULT_WITHHELD, lastLogSeq: 0 };
            } else {
              const check = checkResult(raw, lease.agent?.outputSchema ?? "", (text) => redactor.redact(text));
              report = check.ok
                ? { state: Dispatch_State.SUCCEEDED, exitCode: 0, lastLogSeq: 0, ...(check.result ? { result: redactor.redactJson(check.result) } : {}) }
                : { state: Dispatch_State.FAILED, exitCode: 0, failureReason: check.reason, lastLogSeq: 0 };
            }
          } else {
            const failureReason = exit.oomKilled ? "out of memory" : `agent exited with code ${exit.exitCode}`;
            report = { state: Dispatch_State.FAILED, exitCode: exit.exitCode, failureReason, lastLogSeq: 0 };
          }
        }
        // The container goes before the report, so nothing is left running once the run is settled.
        await runtime.remove(container.id);
        gone = true;
        outcome.containersRemoved++;
        try {
          await leases.report({ dispatchId: claim.dispatchId, leaseId: claim.leaseId, ...report });
          outcome.runsSettled++;
          logger.info({ dispatchId: claim.dispatchId, state: Dispatch_State[report.state], reason: report.failureReason }, "left-over run settled");
        } catch (err) {
          logger.warn({ dispatchId: claim.dispatchId, err: err instanceof LeaseLostError ? err.message : err }, "left-over run not settled (lease gone)");
        }
        settled.add(claim.dispatchId);
      } else {
        await runtime.remove(container.id);
        gone = true;
        outcome.containersRemoved++;
        logger.info({ container: container.name }, "left-over container removed");
      }
    } catch (err) {
      logger.warn({ err, container: container.name }, "left-over container not settled");
    }
    if (files && gone) await workspaces.remove(files).catch(() => undefined);
    else if (runDir && !gone) {
      kept.add(runDir);
      logger.error({ container: container.name, runDir }, "run directory kept: its container could not be removed");
    }
  }
  for (const lease of held ?? []) {
    const dispatchId = lease.dispatch?.id;
    if (!dispatchId || settled.has(dispatchId)) continue;
    if (await giveBack(dispatchId, lease.leaseId)) outcome.leasesReleased++;
    else outcome.runsSettled++;
  }
  // Run directories whose container is gone (e.g. removed by hand while the executor was down).
  for (const name of await workspaces.listRuns()) {
    if (kept.has(name)) continue;
    await workspaces.remove(workspaces.filesOf(name)).catch(() => undefined);
  }
  return outcome;

  /**
   * A run whose agent never started goes back to the queue (an infrastructure failure, retried);
   * if the dispatcher cannot take it back, it fails. True when it was given back.
   */
  async function giveBack(dispatchId: string, leaseId: string): Promise<boolean> {
    try {
      await leases.release(dispatchId, leaseId, "executor restarted before the agent started", true);
      return true;
    } catch (err) {
      try {
        await leases.report({ dispatchId, leaseId, state: Dispatch_State.FAILED, failureReason: EXECUTOR_LOST, lastLogSeq: 0 });
      } catch {
        logger.warn({ dispatchId, err }, "run whose agent never started not settled");
      }
      return false;
    }
  }
}

function safeFilesOf(workspaces: Workspaces, name: string) {
  try {
    return workspaces.filesOf(name);
  } catch {
    return undefined;
  }
}
