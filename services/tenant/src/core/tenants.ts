/**
 * The tenant service's logic: tenants (create, read, list, tier, suspension), their API keys,
 * and resolving a presented API key to its tenant and tier limits for the gateway. It knows
 * nothing about transport; failures are raised through @outpost/platform's error helpers so
 * they reach callers with a reason.
 */
import { failedPrecondition, notFound, outpostError, resourceExhausted, unauthenticated } from "@outpost/platform";
import { Code } from "@connectrpc/connect";
import { monotonicFactory } from "ulid";
import type { ApiKeyRecord, TenantRecord, TenantStore, TenantTier } from "../store/store.ts";
import { generateApiKey, hashApiKey, isWellFormedApiKey } from "./api-keys.ts";
import { NO_INVALIDATION, type AuthInvalidation } from "./invalidation.ts";
import { DEFAULT_TIERS, type TierLimits, type TierTable } from "./tiers.ts";

/** Ids made in the same millisecond still sort in creation order (lists page by id). */
const ulid = monotonicFactory();

/** last_used_time is written at most once per key per this window (SPEC T2 "last-used time"). */
export const LAST_USED_WRITE_INTERVAL_MS = 60_000;

export const FIRST_KEY_DISPLAY_NAME = "default";

export interface CreatedKey {
  apiKey: ApiKeyRecord;
  /** Shown to the caller once. */
  plaintext: string;
}

export interface NewTenant {
  name: string;
  contactEmail: string;
  tier: TenantTier;
}

export interface Authenticated {
  tenant: TenantRecord;
  apiKeyId: string;
  limits: TierLimits;
}

export interface Page<T> {
  items: T[];
  /** The cursor of the next page, or undefined on the last one. */
  nextAfter: string | undefined;
}

export interface TenantCoreOptions {
  store: TenantStore;
  /** Injected so tests can move time (last-used throttling). */
  now?: () => Date;
  /** Tier limits (defaults overridden by OUTPOST_TIERS_FILE). */
  tiers?: TierTable;
  /** Tells gateway replicas to drop cached credentials (revocation, suspension). */
  invalidation?: AuthInvalidation;
  /** Where a failed last-used write is reported (it never fails the authentication). */
  logger?: { warn(obj: object, msg: string): void };
}

/** A suspended tenant's callers get this, with the operator's reason (SPEC T1). */
export function tenantSuspended(reason: string) {
  const why = reason ? `: ${reason}` : "";
  return outpostError(Code.PermissionDenied, "TENANT_SUSPENDED", `the tenant is suspended${why}`, { suspend_reason: reason });
}

/** Active (not revoked) API keys one tenant may hold. */
export const MAX_ACTIVE_API_KEYS = 100;

export class TenantCore {
  private readonly store: TenantStore;
  private readonly now: () => Date;
  readonly tiers: TierTable;
  private readonly invalidation: AuthInvalidation;
  private readonly logger: TenantCoreOptions["logger"];

  constructor(options: TenantCoreOptions) {
    this.store = options.store;
    this.now = options.now ?? (() => new Date());
    this.tiers = options.tiers ?? DEFAULT_TIERS;
    this.invalidation = options.invalidation ?? NO_INVALIDATION;
    this.logger = options.logger;
  }

  limitsOf(tier: TenantTier): TierLimits {
    return this.tiers[tier];
  }

  /** Creates an ACTIVE tenant and its first key ("default") in one atomic write. */
  async createTenant(input: NewTenant): Promise<{ tenant: TenantRecord } & CreatedKey> {
    const now = this.now();
    const tenant: TenantRecord = {
      id: ulid(now.getTime()),
      name: input.name,
      contactEmail: input.contactEmail,
      tier: input.tier,
      state: "active",
      suspendReason: "",
      createTime: now,
      updateTime: now,
    };
    const { apiKey, plaintext } = this.newKey(tenant.id, FIRST_KEY_DISPLAY_NAME, now);
    await this.store.createTenantWithKey(tenant, apiKey);
    return { tenant, apiKey, plaintext };
  }

  async getTenant(tenantId: string): Promise<TenantRecord> {
    const tenant = await this.store.getTenant(tenantId);
    if (!tenant) throw notFound("tenant", tenantId);
    return tenant;
  }

  async listTenants(pageSize: number, after: string | undefined): Promise<Page<TenantRecord>> {
    return pageOf(await this.store.listTenants(after, pageSize + 1), pageSize, (t) => t.id);
  }

  async updateTier(tenantId: string, tier: TenantTier): Promise<TenantRecord> {
    const updated = await this.store.updateTenantTier(tenantId, tier, this.now());
    if (!updated) throw notFound("tenant", tenantId);
    return updated;
  }

  /**
   * ACTIVE → SUSPENDED with a reason. Its keys then answer PERMISSION_DENIED, its queued runs
   * are not leased (ListSuspendedTenants) and gateway replicas drop their cached identities.
   */
  async suspend(tenantId: string, reason: string): Promise<TenantRecord> {
    const updated = await this.store.transitionTenantState(tenantId, "active", "suspended", this.now(), reason);
    if (!updated) {
      await this.getTenant(tenantId);
      throw failedPrecondition("TENANT_ALREADY_SUSPENDED", `tenant "${tenantId}" is already suspended`, { tenant_id: tenantId });
    }
    await this.invalidation.tenantSuspended(tenantId);
    return updated;
  }

  async reactivate(tenantId: string): Promise<TenantRecord> {
    const updated = await this.store.transitionTenantState(tenantId, "suspended", "active", this.now(), "");
    if (!updated) {
      await this.getTenant(tenantId);
      throw failedPrecondition("TENANT_NOT_SUSPENDED", `tenant "${tenantId}" is not suspended`, { tenant_id: tenantId });
    }
    return updated;
  }

  async suspendedTenantIds(): Promise<string[]> {
    return this.store.listSuspendedTenantIds();
  }

  /** A tenant's keys, masked (the store holds no plaintext to leak). NOT_FOUND for a missing tenant. */
  async listApiKeys(tenantId: string, pageSize: number, after: string | undefined): Promise<Page<ApiKeyRecord>> {
    await this.getTenant(tenantId);
    return pageOf(await this.store.listApiKeys(tenantId, after, pageSize + 1), pageSize, (k) => k.id);
  }

  /**
   * Revokes a key. `ownerTenantId` set (a tenant caller): another tenant's key answers NOT_FOUND
   * exactly like a missing one (SPEC T4). Revoking a revoked key returns it unchanged.
   */
  async revokeApiKey(keyId: string, ownerTenantId: string | undefined): Promise<ApiKeyRecord> {
    const key = await this.store.getApiKey(keyId);
    if (!key || (ownerTenantId !== undefined && key.tenantId !== ownerTenantId)) throw notFound("api_key", keyId);
    if (key.revokeTime !== null) return key;
    const revoked = (await this.store.revokeApiKey(keyId, this.now())) ?? (await this.store.getApiKey(keyId))!;
    await this.invalidation.keyRevoked(key.keyHash);
    return revoked;
  }

  /**
   * Mints a new key for an existing tenant; NOT_FOUND when the tenant does not exist;
   * RESOURCE_EXHAUSTED once it has MAX_ACTIVE_API_KEYS keys not revoked (any key may mint keys,
   * so a leaked one could otherwise mint without end keys that outlive its own revocation).
   */
  async createApiKey(tenantId: string, displayName: string): Promise<CreatedKey> {
    await this.getTenant(tenantId);
    const created = this.newKey(tenantId, displayName, this.now());
    if (!(await this.store.createApiKey(created.apiKey, MAX_ACTIVE_API_KEYS))) {
      throw resourceExhausted(
        "active_api_keys",
        `a tenant can hold at most ${MAX_ACTIVE_API_KEYS} active API keys; revoke one it no longer uses (RevokeApiKey) first`,
        { limit: String(MAX_ACTIVE_API_KEYS) },
      );
    }
    return created;
  }

  /**
   * Resolves a presented key. Failure messages say what is wrong with the key and never which
   * tenant it belongs to. The lookup is by hash, so no constant-time comparison is involved.
   */
  async authenticateApiKey(presented: string): Promise<Authenticated> {
    if (presented.length === 0) throw unauthenticated("API_KEY_MISSING", "no API key was presented");
    if (!isWellFormedApiKey(presented)) {
      throw unauthenticated("API_KEY_MALFORMED", 'the API key is malformed: expected "otp_" followed by 64 lowercase hex characters');
    }
    const key = await this.store.findApiKeyByHash(hashApiKey(presented));
    if (!key) throw unauthenticated("API_KEY_UNKNOWN", "the API key is not recognised");
    if (key.revokeTime !== null) throw unauthenticated("API_KEY_REVOKED", "the API key has been revoked");
    const tenant = await this.store.getTenant(key.tenantId);
    // A key whose tenant vanished is as good as unknown; say nothing more.
    if (!tenant) throw unauthenticated("API_KEY_UNKNOWN", "the API key is not recognised");
    if (tenant.state === "suspended") throw tenantSuspended(tenant.suspendReason);
    await this.recordUse(key);
    return { tenant, apiKeyId: key.id, limits: this.limitsOf(tenant.tier) };
  }

  /**
   * Throttled: skips the write when the key was used within the window (checked again in the
   * store). Bookkeeping, so best effort: every gateway cache miss comes through here, and a write
   * that fails under load (the SQLite file locked past its busy timeout by another replica, a
   * MongoDB step-down) must not turn a valid key into an INTERNAL error; the next use writes it.
   */
  private async recordUse(key: ApiKeyRecord): Promise<void> {
    const now = this.now();
    const staleBefore = new Date(now.getTime() - LAST_USED_WRITE_INTERVAL_MS);
    if (key.lastUsedTime !== null && key.lastUsedTime >= staleBefore) return;
    try {
      await this.store.touchApiKey(key.id, now, staleBefore);
    } catch (err) {
      this.logger?.warn({ err: (err as Error).message, api_key_id: key.id }, "last-used time of an API key not recorded; the key still authenticates");
    }
  }

  private newKey(tenantId: string, displayName: string, now: Date): CreatedKey {
    const generated = generateApiKey();
    const apiKey: ApiKeyRecord = {
      id: ulid(now.getTime()),
      tenantId,
      displayName,
      keyHash: generated.hash,
      prefix: generated.prefix,
      lastFour: generated.lastFour,
      createTime: now,
      lastUsedTime: null,
      revokeTime: null,
    };
    return { apiKey, plaintext: generated.plaintext };
  }
}

/** Cuts a page out of `limit + 1` rows: the extra row only says that another page exists. */
export function pageOf<T>(rows: T[], pageSize: number, cursorOf: (row: T) => string): Page<T> {
  if (rows.length <= pageSize) return { items: rows, nextAfter: undefined };
  const items = rows.slice(0, pageSize);
  return { items, nextAfter: cursorOf(items[items.length - 1]!) };
}
