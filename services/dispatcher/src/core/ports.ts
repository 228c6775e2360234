/**
 * What the dispatcher's core needs from other services, as interfaces, so the core stays free
 * of transport and tests can plug in-process implementations.
 */
import type { ResourceCaps } from "../store/store.ts";

/**
 * Tenant admission (cross-team contract A, TenantInternalService). `admit` reserves one
 * concurrent-run slot and one daily run for the tenant, idempotently per dispatch id, checks
 * that the named secrets exist and answers the tenant tier's maximum run timeout. It throws
 * the platform's ConnectErrors (RESOURCE_EXHAUSTED QUOTA_EXCEEDED, NOT_FOUND SECRET_NOT_FOUND,
 * PERMISSION_DENIED TENANT_SUSPENDED), which the dispatcher passes on unchanged.
 */
/** What admission grants a dispatch: caps from the tenant's tier. */
export interface Admission {
  maxTimeoutMs: number;
  /** How long telemetry keeps the run's logs; telemetry's default when absent. */
  logRetentionMs?: number;
  /** The tier's container limits; the agent's resources are capped by them. */
  resourceCaps?: ResourceCaps;
}

export interface ReleaseOptions {
  /**
   * The dispatch id was never stored (its insert failed or lost the request-id race, or its
   * admission got no definite answer): the tenant service gives back its run of the day too.
   */
  neverCreated?: boolean;
}

export interface TenantAdmission {
  admit(tenantId: string, dispatchId: string, secretNames: string[], requestedTimeoutMs: number | undefined): Promise<Admission>;
  /**
   * Frees the concurrent slot of a dispatch (idempotent). The daily count stays, unless
   * `neverCreated`: then the run of the day is given back too (once, however often repeated).
   */
  release(tenantId: string, dispatchId: string, options?: ReleaseOptions): Promise<void>;
  /** Tenants whose queued runs must not be leased. */
  suspendedTenants(): Promise<ReadonlySet<string>>;
}

/**
 * Admits everything, capped only by the dispatcher's own maximum timeout: used when no tenant
 * service is configured (tests, single-tenant development).
 */
export class UnlimitedAdmission implements TenantAdmission {
  private readonly maxTimeoutMs: number;

  constructor(maxTimeoutMs: number) {
    this.maxTimeoutMs = maxTimeoutMs;
  }

  admit(): Promise<Admission> {
    return Promise.resolve({ maxTimeoutMs: this.maxTimeoutMs });
  }

  release(): Promise<void> {
    return Promise.resolve();
  }

  suspendedTenants(): Promise<ReadonlySet<string>> {
    return Promise.resolve(new Set());
  }
}
