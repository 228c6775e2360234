/**
 * Keeps a lease alive from the moment it is taken: heartbeats at a third of the time the lease
 * has left, each renewing the lease and its log grant (run-grants.ts) and saying whether the
 * run was cancelled. Preparing a run (secrets, repository checkout, an image pull) can take
 * longer than the lease; without heartbeats meanwhile the dispatcher would find the lease
 * expired and give the run to another executor while this one still started it.
 *
 * What a cancel or a lost lease does depends on where the run is: `onCancel` / `onLost` are set
 * by the run once its container started; before that they are remembered (`cancelled`, `lost`)
 * for the run to act on at its next step.
 */
import type { Logger } from "@outpost/platform";
import type { Lease } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { LeaseLostError, type CapacityReport, type LeaseClient } from "./ports.ts";

export interface LeaseKeeperDeps {
  leases: LeaseClient;
  capacity?: () => CapacityReport;
  /** Heartbeat period when the lease names no expiry (a third of the assumed lease). */
  defaultHeartbeatMs?: number;
}

export class LeaseKeeper {
  /** The run's current log grant. */
  logGrant: string;
  /** The dispatcher said the run was cancelled. */
  cancelled = false;
  /** The lease is gone: another executor (or the sweep) owns the run. */
  lost = false;
  /** Called on a cancel (each time a heartbeat reports one), once set. */
  onCancel: (() => void) | undefined;
  /** Called once when the lease is lost, once set. */
  onLost: (() => void) | undefined;

  private readonly deps: LeaseKeeperDeps;
  private readonly lease: Lease;
  private readonly logger: Logger;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;

  constructor(deps: LeaseKeeperDeps, lease: Lease, logger: Logger) {
    this.deps = deps;
    this.lease = lease;
    this.logger = logger;
    this.logGrant = lease.logGrant;
    const expiry = lease.expireTime ? new Date(Number(lease.expireTime.seconds) * 1000 + lease.expireTime.nanos / 1e6) : undefined;
    this.schedule(expiry);
  }

  /** No more heartbeats (the container exited, or the run ended before it started). */
  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  private schedule(expireTime: Date | undefined): void {
    if (this.stopped) return;
    const ttl = expireTime ? expireTime.getTime() - Date.now() : (this.deps.defaultHeartbeatMs ?? 10_000) * 3;
    this.timer = setTimeout(() => this.beat(expireTime), Math.max(200, Math.min(ttl / 3, 60_000)));
  }

  private beat(expireTime: Date | undefined): void {
    const dispatchId = this.lease.dispatch?.id ?? "";
    this.deps.leases.heartbeat(dispatchId, this.lease.leaseId, this.deps.capacity?.()).then(
      (answer) => {
        if (this.stopped) return;
        if (answer.logGrant) this.logGrant = answer.logGrant;
        if (answer.cancelRequested) {
          this.cancelled = true;
          this.onCancel?.();
        }
        this.schedule(answer.expireTime);
      },
      (err: unknown) => {
        if (this.stopped) return;
        if (err instanceof LeaseLostError) {
          this.logger.warn({ err }, "lease lost; stopping without reporting");
          this.lost = true;
          this.onLost?.();
          return;
        }
        this.logger.warn({ err }, "heartbeat failed; retrying");
        this.schedule(expireTime);
      },
    );
  }
}
