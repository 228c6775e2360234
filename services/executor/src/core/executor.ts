/**
 * The executor's work loop (SPEC D7, E6): one long-poll per free slot, so it never runs more
 * containers than it has slots. The engine is pinged before every lease; while it does not
 * answer, nothing is leased, the executor reports itself not ready, and it retries with
 * backoff. On start it first settles what an earlier run of it left behind (reconcile.ts);
 * it keeps its agents' images checked (and pulled where a registry answers) and reports its
 * capacity on every lease call. On shutdown it stops leasing and gives running containers a
 * grace period.
 */
import { SpanKind, withSpan, type Logger } from "@outpost/platform";
import type { Lease } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { Backoff, sleep } from "./backoff.ts";
import type { CapacityReport, ContainerRuntime, LeaseClient, LogSink, SecretResolver, Workspaces } from "./ports.ts";
import { Cancellations } from "./cancellations.ts";
import { NotSupportedError } from "./ports.ts";
import { reconcile } from "./reconcile.ts";
import { adoptRun, executeRun, type ContainerUser, type RunDeps, type WorkspaceQuota } from "./run.ts";
import type { WarmPool } from "./warm-pool.ts";

export interface ExecutorOptions {
  executorId: string;
  slots: number;
  runtime: ContainerRuntime;
  leases: LeaseClient;
  logs: LogSink;
  workspaces: Workspaces;
  secrets?: SecretResolver;
  warmPool?: WarmPool;
  logger: Logger;
  stopGraceMs: number;
  /**
   * Who agents run as (run.ts containerUserFor): required, so the composition root cannot leave
   * agents as nobody in workspaces a non-root executor keeps private to itself.
   */
  containerUser: ContainerUser;
  /** Agent images to check (and pull) ahead of work; images seen in leases join them. */
  images?: string[];
  pullImages?: boolean;
  /** Period of the image check. */
  imageCheckMs?: number;
  /** How long one AcquireLease call may wait for work. */
  leaseWaitMs: number;
  logAckWaitMs?: number;
  /** Lower bound between two polls of one slot, so a dispatcher that answers at once is not hammered. */
  minPollIntervalMs?: number;
  /** Every run's workspace disk quota; none when absent. */
  workspaceQuota?: WorkspaceQuota;
  /** Output an attempt of a run may send to telemetry (RunDeps.maxOutputBytes); no cap when absent or 0. */
  maxOutputBytes?: number;
  backoff?: () => Backoff;
}

export class Executor {
  private readonly options: ExecutorOptions;
  private readonly stopping = new AbortController();
  private readonly loops: Promise<void>[] = [];
  private readonly running = new Set<Promise<void>>();
  /** Why the engine was last found unusable; null while it answers. */
  private engineProblem: string | null = null;
  private readonly images = new Set<string>();
  private imagesPresent: string[] = [];
  private imageTimer: NodeJS.Timeout | undefined;
  private starting: Promise<void> | undefined;
  private readonly cancellations = new Cancellations();
  private watching: Promise<void> | undefined;
  /** Slot loops waiting in AcquireLease: counted with the running runs against the slots. */
  private leasing = 0;

  constructor(options: ExecutorOptions) {
    this.options = options;
    for (const image of options.images ?? []) this.images.add(image);
  }

  /** What the dispatcher learns about this executor with every AcquireLease and Heartbeat (SPEC D5). */
  capacity(): CapacityReport {
    return {
      slotsTotal: this.options.slots,
      slotsBusy: this.running.size,
      warmContainers: this.options.warmPool?.size ?? 0,
      engineReady: this.engineProblem === null,
      imagesPresent: [...this.imagesPresent],
    };
  }

  /** Runs currently in progress. */
  get busySlots(): number {
    return this.running.size;
  }

  /** Settles left-overs (once the engine answers), then leases on every slot; resolves when leasing began. */
  start(): Promise<void> {
    this.starting ??= this.begin();
    return this.starting;
  }

  private async begin(): Promise<void> {
    const { logger } = this.options;
    const backoff = this.options.backoff?.() ?? new Backoff({ baseMs: 500, maxMs: 30_000 });
    // Reconciliation needs the engine; until it answers nothing is leased anyway.
    while (!this.stopping.signal.aborted) {
      const reason = await this.notReadyReason();
      if (reason === null) break;
      const delay = backoff.next();
      logger.warn({ reason, retryInMs: delay }, "not leasing: container engine unavailable");
      await sleep(delay, this.stopping.signal);
    }
    if (this.stopping.signal.aborted) return;
    // Runs still going under their leases are taken up again; each holds a slot until it ends.
    try {
      const outcome = await reconcile({
        ...this.options,
        adopt: (lease, found, redactor) => {
          this.track(lease, () => adoptRun(lease, found, redactor, this.runDeps())).catch((err: unknown) => logger.error({ err }, "a run taken up again failed"));
        },
      });
      logger.info(outcome, "reconciled left-overs of earlier runs");
    } catch (err) {
      logger.warn({ err }, "reconciliation failed; leasing anyway");
    }
    await this.checkImages();
    this.imageTimer = setInterval(() => void this.checkImages(), this.options.imageCheckMs ?? 60_000);
    this.imageTimer.unref();
    this.watching = this.watchCancellations();
    for (let slot = 0; slot < this.options.slots; slot++) this.loops.push(this.slotLoop(slot));
  }

  /** What a run needs of this executor (run.ts RunDeps). */
  private runDeps(): RunDeps {
    return {
      executorId: this.options.executorId,
      runtime: this.options.runtime,
      leases: this.options.leases,
      logs: this.options.logs,
      workspaces: this.options.workspaces,
      secrets: this.options.secrets,
      warmPool: this.options.warmPool,
      logger: this.options.logger,
      stopGraceMs: this.options.stopGraceMs,
      logAckWaitMs: this.options.logAckWaitMs,
      pullImages: this.options.pullImages,
      capacity: () => this.capacity(),
      cancellations: this.cancellations,
      workspaceQuota: this.options.workspaceQuota,
      containerUser: this.options.containerUser,
      maxOutputBytes: this.options.maxOutputBytes,
    };
  }

  /**
   * Runs `work` for `lease` as a busy slot (counted in capacity, waited for at shutdown), in a
   * span that is a child of the lease's traceparent (the creating call's trace), so the run's
   * calls to the dispatcher and telemetry join the dispatch's trace (SPEC L4).
   */
  private async track(lease: Lease, work: () => Promise<void>): Promise<void> {
    const run = withSpan(
      "executor.run",
      { traceparent: lease.traceparent || undefined, kind: SpanKind.CONSUMER, attributes: { "outpost.dispatch_id": lease.dispatch?.id ?? "" } },
      work,
    );
    this.running.add(run);
    try {
      await run;
    } finally {
      this.running.delete(run);
    }
  }

  /** Follows the dispatcher's cancellation stream while running; reconnects with backoff; gives up on UNIMPLEMENTED. */
  private async watchCancellations(): Promise<void> {
    const { logger } = this.options;
    const signal = this.stopping.signal;
    const backoff = this.options.backoff?.() ?? new Backoff({ baseMs: 500, maxMs: 30_000 });
    while (!signal.aborted) {
      try {
        for await (const cancel of this.options.leases.watchCancellations(this.options.executorId, signal)) {
          backoff.reset();
          this.cancellations.notify(cancel.dispatchId, cancel.leaseId);
        }
      } catch (err) {
        if (err instanceof NotSupportedError) {
          logger.info("dispatcher does not stream cancellations; heartbeats carry them");
          return;
        }
        if (signal.aborted) return;
        logger.warn({ err }, "cancellation stream broke; reconnecting");
      }
      await sleep(backoff.next(), signal);
    }
  }

  /** Checks every known image, pulling missing ones when allowed; failures only shrink the list. */
  async checkImages(): Promise<void> {
    const present: string[] = [];
    for (const image of this.images) {
      try {
        let here = await this.options.runtime.imagePresent(image);
        if (!here && this.options.pullImages) {
          try {
            await this.options.runtime.pull(image);
            here = await this.options.runtime.imagePresent(image);
          } catch (err) {
            this.options.logger.info({ image, error: err instanceof Error ? err.message : String(err) }, "image not pulled");
          }
        }
        if (here) present.push(image);
      } catch {
        // Engine trouble: readiness reports it; the list stays as the engine can tell.
      }
    }
    this.imagesPresent = present;
  }

  /** Readiness (SPEC D6, E6): the engine must answer a ping. */
  async notReadyReason(): Promise<string | null> {
    try {
      await this.options.runtime.ping();
      this.engineProblem = null;
      return null;
    } catch (err) {
      this.engineProblem = `docker engine unreachable: ${err instanceof Error ? err.message : String(err)}`;
      return this.engineProblem;
    }
  }

  /** Stops leasing; waits up to `graceMs` for running containers, then leaves them (reconciliation, SPEC E5). */
  async shutdown(graceMs: number): Promise<void> {
    this.stopping.abort();
    clearInterval(this.imageTimer);
    await this.starting;
    await this.options.warmPool?.close().catch((err: unknown) => this.options.logger.warn({ err }, "warm pool not cleared"));
    const all = Promise.all([...this.loops, ...this.running, this.watching]).then(() => true);
    const finished = await Promise.race([all, sleep(graceMs).then(() => false)]);
    if (!finished) {
      this.options.logger.warn({ running: this.running.size }, "shutdown grace over; leaving running containers behind");
    }
  }

  /**
   * Leases and runs one dispatch at a time while fewer than `slots` runs go on: runs taken up
   * after a restart hold slots too, and can be more than there are (the slots were lowered).
   */
  private async slotLoop(slot: number): Promise<void> {
    const { logger } = this.options;
    const signal = this.stopping.signal;
    const backoff = this.options.backoff?.() ?? new Backoff({ baseMs: 500, maxMs: 30_000 });
    while (!signal.aborted) {
      const reason = await this.notReadyReason();
      if (reason !== null) {
        const delay = backoff.next();
        logger.warn({ slot, reason, retryInMs: delay }, "not leasing: container engine unavailable");
        await sleep(delay, signal);
        continue;
      }
      if (this.running.size + this.leasing >= this.options.slots) {
        await Promise.race([...[...this.running].map((run) => run.catch(() => undefined)), sleep(1000, signal)]);
        continue;
      }
      const polledAt = Date.now();
      let lease;
      this.leasing++;
      try {
        lease = await this.options.leases.acquire(this.options.executorId, this.options.leaseWaitMs, signal, this.capacity());
      } catch (err) {
        if (signal.aborted) break;
        const delay = backoff.next();
        logger.warn({ slot, err, retryInMs: delay }, "acquiring a lease failed");
        await sleep(delay, signal);
        continue;
      } finally {
        // Given back before the run is tracked, with no await between: the count never doubles.
        this.leasing--;
      }
      backoff.reset();
      if (!lease) {
        const minInterval = this.options.minPollIntervalMs ?? 1000;
        const elapsed = Date.now() - polledAt;
        if (elapsed < minInterval) await sleep(minInterval - elapsed, signal);
        continue;
      }
      logger.info({ slot, dispatchId: lease.dispatch?.id, leaseId: lease.leaseId }, "lease acquired");
      if (lease.agent?.image && !this.images.has(lease.agent.image)) {
        this.images.add(lease.agent.image);
        void this.checkImages();
      }
      await this.track(lease, () => executeRun(lease, this.runDeps()));
    }
  }
}
