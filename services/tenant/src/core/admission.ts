/**
 * Admission of dispatches (SPEC T3, T5; cross-team contract A): before the dispatcher queues a
 * run it asks here. A suspended tenant is refused, a missing secret is named, and then one
 * concurrent-run slot and one run of the UTC day are reserved atomically in the store,
 * idempotently per dispatch id. Releasing (on any terminal state) frees the slot only; releasing
 * an id the dispatcher never stored gives back the run of the day as well.
 */
import { notFound, resourceExhausted, unavailable } from "@outpost/platform";
import { AdmissionUndecidedError, type TenantStore, type TenantTier } from "../store/store.ts";
import { secretNotFound, type SecretsCore } from "./secrets.ts";
import { tenantSuspended, type TenantCore } from "./tenants.ts";

/** When a release of an admission still being decided is worth asking again. */
const UNDECIDED_RETRY_MS = 1000;

export interface Admitted {
  maxTimeoutMs: number;
  logRetentionMs: number;
  resourceCaps: { cpuMillis: number; memoryBytes: number; pidsLimit: number };
  tier: TenantTier;
}

/** "YYYY-MM-DD" of the UTC day: the daily quota's window. */
export function utcDay(at: Date): string {
  return at.toISOString().slice(0, 10);
}

/** When the daily quota of `at`'s day resets: the next UTC midnight. */
export function nextUtcMidnight(at: Date): Date {
  return new Date(Date.UTC(at.getUTCFullYear(), at.getUTCMonth(), at.getUTCDate() + 1));
}

export class AdmissionCore {
  private readonly store: TenantStore;
  private readonly tenants: TenantCore;
  private readonly secrets: SecretsCore;
  private readonly now: () => Date;

  constructor(options: { store: TenantStore; tenants: TenantCore; secrets: SecretsCore; now?: () => Date }) {
    this.store = options.store;
    this.tenants = options.tenants;
    this.secrets = options.secrets;
    this.now = options.now ?? (() => new Date());
  }

  async admit(tenantId: string, dispatchId: string, secretNames: readonly string[]): Promise<Admitted> {
    const tenant = await this.store.getTenant(tenantId);
    if (!tenant) throw notFound("tenant", tenantId);
    if (tenant.state === "suspended") throw tenantSuspended(tenant.suspendReason);
    // Secrets first: a dispatch that cannot run must not use up quota.
    const missing = await this.secrets.firstMissing(tenantId, secretNames);
    if (missing !== undefined) throw secretNotFound(missing);

    const limits = this.tenants.limitsOf(tenant.tier);
    const now = this.now();
    const outcome = await this.store.admitDispatch({
      tenantId,
      dispatchId,
      day: utcDay(now),
      admitTime: now,
      concurrentLimit: limits.concurrentRuns,
      dailyLimit: limits.runsPerDay,
    });
    if (outcome.kind === "over_quota") {
      if (outcome.quota === "concurrent_runs") {
        throw resourceExhausted(
          "concurrent_runs",
          `the ${tenant.tier} tier allows ${limits.concurrentRuns} concurrent runs; wait for a run to finish`,
          { limit: String(limits.concurrentRuns) },
        );
      }
      const reset = nextUtcMidnight(now).toISOString();
      throw resourceExhausted("runs_per_day", `the ${tenant.tier} tier allows ${limits.runsPerDay} runs per day; the count resets at ${reset}`, {
        limit: String(limits.runsPerDay),
        reset_time: reset,
      });
    }
    return {
      maxTimeoutMs: limits.maxTimeoutMs,
      logRetentionMs: limits.logRetentionMs,
      resourceCaps: { cpuMillis: limits.maxCpuMillis, memoryBytes: limits.maxMemoryBytes, pidsLimit: limits.maxPids },
      tier: tenant.tier,
    };
  }

  /**
   * Frees the dispatch's concurrent slot. `neverCreated` (the dispatcher never stored the id: its
   * insert failed, it lost its request id's race, or the admission's answer was lost) gives back
   * its run of the day too, once.
   */
  async release(tenantId: string, dispatchId: string, options: { neverCreated?: boolean } = {}): Promise<void> {
    try {
      await this.store.releaseDispatch(tenantId, dispatchId, this.now(), { refundDay: options.neverCreated === true });
    } catch (err) {
      // Recorded, but the admission it releases is still being decided: the dispatcher asks again
      // (a retryable code), until the decision has released it or it is taken over as abandoned.
      if (err instanceof AdmissionUndecidedError) throw unavailable("ADMISSION_UNDECIDED", err.message, UNDECIDED_RETRY_MS);
      throw err;
    }
  }

  async suspendedTenants(): Promise<string[]> {
    return this.tenants.suspendedTenantIds();
  }
}
