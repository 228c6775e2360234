/**
 * TenantAdmission over gRPC (cross-team contract A): the dispatcher asks the tenant service
 * to admit a dispatch before queueing it, releases its concurrent slot when it ends (and its
 * run of the day too when it was never stored: `never_created`), and learns which tenants are
 * suspended. Errors from the tenant service (RESOURCE_EXHAUSTED QUOTA_EXCEEDED, NOT_FOUND
 * SECRET_NOT_FOUND, PERMISSION_DENIED TENANT_SUSPENDED, …) are passed through unchanged so the
 * tenant sees them as they were raised.
 */
import { durationFromMs, durationMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type Client } from "@connectrpc/connect";
import { ExponentialBackoff, handleWhen, retry } from "cockatiel";
import { internalClient, unavailable, type SigningKeys, type TlsFiles } from "@outpost/platform";
import { TenantInternalService } from "@outpost/proto/outpost/tenant/v1/tenant_internal_service_pb.js";
import type { ReleaseOptions, TenantAdmission } from "../core/ports.ts";

export interface GrpcTenantAdmissionOptions {
  baseUrl: string;
  signingKeys: SigningKeys;
  tls?: TlsFiles | undefined;
  /** How long the suspended-tenant list is reused before asking again. */
  suspendedCacheMs?: number;
  /** Bound on each call, so a stuck tenant service cannot stall dispatch creation or leasing. */
  callTimeoutMs?: number;
  now?: () => number;
}

/** Codes worth a retry for the idempotent release: the call may not have reached the service. */
const TRANSIENT = new Set([Code.Unavailable, Code.DeadlineExceeded, Code.Aborted, Code.ResourceExhausted]);

export class GrpcTenantAdmission implements TenantAdmission {
  private readonly client: Client<typeof TenantInternalService>;
  private readonly suspendedCacheMs: number;
  private readonly callTimeoutMs: number;
  private readonly now: () => number;
  private cached: { ids: ReadonlySet<string>; fetchedAt: number } | undefined;
  private inflight: Promise<ReadonlySet<string>> | undefined;
  // Release is idempotent on the tenant side, so retrying it is safe; a lost release would
  // hold a concurrent slot until the run is released again.
  private readonly releaseRetry = retry(
    handleWhen((err) => err instanceof ConnectError && TRANSIENT.has(err.code)),
    { maxAttempts: 3, backoff: new ExponentialBackoff({ initialDelay: 100, maxDelay: 1000 }) },
  );

  constructor(options: GrpcTenantAdmissionOptions) {
    this.client = internalClient(TenantInternalService, {
      baseUrl: options.baseUrl,
      signingKeys: options.signingKeys,
      tls: options.tls,
      identity: { kind: "service", principal: "dispatcher" },
    });
    this.suspendedCacheMs = options.suspendedCacheMs ?? 3000;
    this.callTimeoutMs = options.callTimeoutMs ?? 5000;
    this.now = options.now ?? Date.now;
  }

  async admit(tenantId: string, dispatchId: string, secretNames: string[], requestedTimeoutMs: number | undefined) {
    try {
      const res = await this.client.admitDispatch(
        {
          tenantId,
          dispatchId,
          secretNames,
          // A request past any tier's maximum is capped by it all the same; clamped first, as
          // a Duration of { seconds: 2^63 - 1 } in ms has seconds that no longer fit an int64.
          requestedTimeout: requestedTimeoutMs === undefined ? undefined : durationFromMs(Math.min(requestedTimeoutMs, Number.MAX_SAFE_INTEGER)),
        },
        { timeoutMs: this.callTimeoutMs },
      );
      const max = res.maxTimeout;
      if (!max) throw unavailable("TENANT_ADMISSION_INVALID", "the tenant service answered without a maximum timeout");
      return {
        maxTimeoutMs: durationMs(max),
        logRetentionMs: res.logRetention ? durationMs(res.logRetention) : undefined,
        // All three or none: a tenant service that predates them answers zeros.
        resourceCaps:
          res.maxCpuMillis > 0n && res.maxMemoryBytes > 0n && res.maxPidsLimit > 0n
            ? { cpuMillis: Number(res.maxCpuMillis), memoryBytes: Number(res.maxMemoryBytes), pidsLimit: Number(res.maxPidsLimit) }
            : undefined,
      };
    } catch (err) {
      throw passThrough(err);
    }
  }

  async release(tenantId: string, dispatchId: string, options: ReleaseOptions = {}): Promise<void> {
    const neverCreated = options.neverCreated === true;
    await this.releaseRetry.execute(() => this.client.releaseDispatch({ tenantId, dispatchId, neverCreated }, { timeoutMs: this.callTimeoutMs }));
  }

  /**
   * Cached for a few seconds: leasing asks on every poll, and a suspension taking effect a few
   * seconds late is fine. Concurrent askers share one call. On failure the caller decides
   * (the dispatcher leases without the filter); the last good answer is not reused past its age.
   */
  async suspendedTenants(): Promise<ReadonlySet<string>> {
    if (this.cached && this.now() - this.cached.fetchedAt < this.suspendedCacheMs) return this.cached.ids;
    this.inflight ??= this.client
      .listSuspendedTenants({}, { timeoutMs: this.callTimeoutMs })
      .then((res) => {
        const ids: ReadonlySet<string> = new Set(res.tenantIds);
        this.cached = { ids, fetchedAt: this.now() };
        return ids;
      })
      .finally(() => {
        this.inflight = undefined;
      });
    return this.inflight;
  }
}

/**
 * The tenant service's answers reach the tenant as raised; a tenant service that cannot be
 * reached becomes UNAVAILABLE (retryable) rather than a masked INTERNAL.
 */
function passThrough(err: unknown): unknown {
  if (!(err instanceof ConnectError)) return err;
  if (err.code === Code.Unavailable || err.code === Code.DeadlineExceeded) {
    return unavailable("TENANT_SERVICE_UNAVAILABLE", "cannot check the tenant's quota right now; retry shortly", 1000);
  }
  return err;
}
