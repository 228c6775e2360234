/**
 * Persistence of the tenant service behind an interface, so the embedded SQLite adapter and a
 * later MongoDB adapter pass one conformance suite (test/store-conformance.ts). Every method is
 * async (the Mongo driver is); every state change is a conditional update that compares the
 * expected current value, so two replicas sharing a database can never both win a transition.
 * The store knows nothing about protobuf: tiers and states are plain string unions.
 */

export type TenantTier = "free" | "pro" | "enterprise";
export type TenantState = "active" | "suspended";

export interface TenantRecord {
  /** ULID. */
  id: string;
  name: string;
  contactEmail: string;
  tier: TenantTier;
  state: TenantState;
  /** Why the tenant was suspended; "" while active. */
  suspendReason: string;
  createTime: Date;
  updateTime: Date;
}

export interface ApiKeyRecord {
  /** ULID. */
  id: string;
  tenantId: string;
  displayName: string;
  /** SHA-256 of the plaintext key, lowercase hex; unique. The plaintext is never stored. */
  keyHash: string;
  /** First characters of the key for display, e.g. "otp_3f9a". */
  prefix: string;
  lastFour: string;
  createTime: Date;
  lastUsedTime: Date | null;
  revokeTime: Date | null;
}

/** A secret as stored: sealed by core/secret-box.ts, never the plaintext. */
export interface SecretRecord {
  tenantId: string;
  /** ^[A-Z_][A-Z0-9_]{0,127}$, unique per tenant. */
  name: string;
  /** Id of the master key that sealed the value (rotation). */
  keyId: string;
  iv: Uint8Array;
  /** Ciphertext followed by the GCM tag. */
  ciphertext: Uint8Array;
  createTime: Date;
  updateTime: Date;
}

/** The two quotas counted at admission (SPEC T3). */
export type QuotaName = "concurrent_runs" | "runs_per_day";

/**
 * How long a released admission is kept, by every adapter: while it is, its dispatch id answers
 * "duplicate" to a retried admission. MongoDB deletes older ones by TTL, SQLite as it releases.
 */
export const ADMISSION_RETENTION_MS = 30 * 24 * 60 * 60 * 1000;

export interface AdmissionRequest {
  tenantId: string;
  dispatchId: string;
  /** UTC day of the admission, "YYYY-MM-DD": the window of the daily quota. */
  day: string;
  admitTime: Date;
  concurrentLimit: number;
  dailyLimit: number;
}

/**
 * "admitted": counted now; "duplicate": this dispatch id was admitted before (nothing counted);
 * "over_quota": nothing counted, `quota` says which limit was reached: the day's when both
 * are (no wait for a run to end would help then).
 */
export type AdmissionOutcome = { kind: "admitted" } | { kind: "duplicate" } | { kind: "over_quota"; quota: QuotaName };

export interface ReleaseOptions {
  /** The dispatch id was never stored: give back its run of the day as well as its slot. */
  refundDay?: boolean;
}

export interface TenantUsage {
  /** Admitted and not yet released. */
  activeRuns: number;
  /** Admitted on the given day. */
  runsToday: number;
}

/** Raised by a store when an insert collides with an existing id or key hash. */
export class DuplicateRecordError extends Error {
  override name = "DuplicateRecordError";
}

/**
 * Raised by `releaseDispatch` when the admission is still being decided by another call
 * (MongoDB only): the release is recorded and the decision carries it out, but the caller should
 * ask again, so that a decision that never finishes is taken over once it is stale.
 */
export class AdmissionUndecidedError extends Error {
  override name = "AdmissionUndecidedError";
}

export interface TenantStore {
  /** Inserts a tenant together with its first key, atomically: both or neither. */
  createTenantWithKey(tenant: TenantRecord, key: ApiKeyRecord): Promise<void>;
  getTenant(id: string): Promise<TenantRecord | null>;
  /**
   * Moves a tenant from `expected` to `next` state. Returns the updated tenant, or null when
   * the tenant does not exist or is not in the expected state (someone else moved it first).
   */
  transitionTenantState(
    id: string,
    expected: TenantState,
    next: TenantState,
    updateTime: Date,
    suspendReason?: string,
  ): Promise<TenantRecord | null>;
  /** Sets the tier; null when the tenant does not exist. */
  updateTenantTier(id: string, tier: TenantTier, updateTime: Date): Promise<TenantRecord | null>;
  /** Tenants in id order, starting after `afterId` (exclusive) when given. */
  listTenants(afterId: string | undefined, limit: number): Promise<TenantRecord[]>;
  listSuspendedTenantIds(): Promise<string[]>;

  /**
   * Inserts a key unless its tenant already has `activeLimit` keys not revoked (then false;
   * without a limit, always). Throws DuplicateRecordError on a duplicate id or hash. SQLite
   * counts and inserts in one write transaction; MongoDB counts, then inserts, so parallel
   * creates can pass the limit by a few (it bounds a leaked key's minting, not a quota to the unit).
   */
  createApiKey(key: ApiKeyRecord, activeLimit?: number): Promise<boolean>;
  getApiKey(id: string): Promise<ApiKeyRecord | null>;
  findApiKeyByHash(keyHash: string): Promise<ApiKeyRecord | null>;
  /** Sets revoke_time if the key is not revoked yet; returns the revoked key, or null when it was missing or already revoked. */
  revokeApiKey(id: string, revokeTime: Date): Promise<ApiKeyRecord | null>;
  /**
   * Records a use, but only when the key's last recorded use is older than `staleBefore` (or
   * absent): the write is throttled in the store itself, so concurrent replicas still write at
   * most once per window. Returns whether a write happened.
   */
  touchApiKey(id: string, usedTime: Date, staleBefore: Date): Promise<boolean>;
  /** A tenant's keys (revoked ones too) in id order, after `afterId` when given. */
  listApiKeys(tenantId: string, afterId: string | undefined, limit: number): Promise<ApiKeyRecord[]>;

  /**
   * Creates or replaces a tenant's secret (keeping the first create_time). A new name is
   * refused (null) when the tenant already has `maxSecrets` secrets; checked atomically.
   */
  putSecret(secret: SecretRecord, maxSecrets: number): Promise<SecretRecord | null>;
  /** The named secrets of a tenant that exist, in any order. */
  getSecrets(tenantId: string, names: readonly string[]): Promise<SecretRecord[]>;
  /** A tenant's secrets in name order, after `afterName` when given. */
  listSecrets(tenantId: string, afterName: string | undefined, limit: number): Promise<SecretRecord[]>;
  /** Returns whether a secret was deleted. */
  deleteSecret(tenantId: string, name: string): Promise<boolean>;
  /** Up to `limit` secrets (any tenant) sealed under a key other than `keyId`: rotation work. */
  listSecretsNotSealedWith(keyId: string, limit: number): Promise<SecretRecord[]>;
  /**
   * Replaces the sealed value of a secret only if it still holds the value that was read
   * (same key id and nonce), so a re-encryption never overwrites a newer put. Returns whether
   * it did.
   */
  resealSecret(tenantId: string, name: string, expected: { keyId: string; iv: Uint8Array }, next: { keyId: string; iv: Uint8Array; ciphertext: Uint8Array }): Promise<boolean>;

  /**
   * Admits a dispatch atomically (SPEC T3): if this (tenant, dispatch id) was admitted before,
   * "duplicate"; else if the tenant's unreleased admissions reach `concurrentLimit`, or its
   * admissions of `day` reach `dailyLimit`, "over_quota"; else records it and "admitted".
   * N parallel calls never admit more than the limits.
   *
   * SQLite does it in one write transaction; the MongoDB adapter with guarded single-document
   * updates (its design is described at the top of mongo-store.ts).
   */
  admitDispatch(request: AdmissionRequest): Promise<AdmissionOutcome>;
  /**
   * Marks an admission released (frees its concurrent slot). Returns false when it was missing or
   * already released. A release of an id never admitted leaves a released mark, so an admission
   * of that id arriving later (its request was delayed; the dispatcher gave up on the answer and
   * released it) answers "duplicate" and takes nothing.
   *
   * `refundDay`: the dispatch was never created (the dispatcher never stored it), so its run of
   * the day is given back too, to the day it was counted in. At most once per id: a repeated
   * refund, or one of an id never admitted (which leaves the mark, counting nothing), gives back
   * nothing more. Without it (a run that ended) the day stays counted.
   *
   * Throws AdmissionUndecidedError when the admission is being decided at that moment (only an
   * adapter without transactions has such a moment): ask again.
   */
  releaseDispatch(tenantId: string, dispatchId: string, releaseTime: Date, options?: ReleaseOptions): Promise<boolean>;
  usageOf(tenantId: string, day: string): Promise<TenantUsage>;

  close(): Promise<void>;
}
