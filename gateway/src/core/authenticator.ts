/**
 * Resolves the credential of an edge call to a caller identity (SPEC G2, T2, T6): the admin
 * token, or an API key checked by the tenant service and then trusted for a short interval.
 * The cache is keyed by the key's SHA-256, so no plaintext key stays in it (an open stream's
 * key is kept while the stream is open, to check it again: open-streams.ts).
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { Code, ConnectError } from "@connectrpc/connect";
import { errorInfoOf, type Identity, unauthenticated, unavailable } from "@outpost/platform";
import type { RateLimits } from "./rate-limit.ts";

export const API_KEY_PATTERN = /^otp_[0-9a-f]{64}$/;

/** The tenant service's answer for a well-formed key; `rateLimits` are the tier's request rates, if sent. */
export type KeyLookup = (apiKey: string) => Promise<{ tenantId: string; apiKeyId: string; rateLimits?: Partial<RateLimits> }>;

/**
 * The tenant service's refusals of a key itself (AuthenticateApiKey). Any other UNAUTHENTICATED
 * or PERMISSION_DENIED from that call is about the gateway's own call, not the key (its signed
 * identity expired under clock skew or is not trusted after a botched key rotation, a proxy in
 * between refused it), so it must neither refuse the caller's key nor end its open streams: the
 * call is UNAVAILABLE instead, and the operator is told (`onLookupFailure`).
 */
export const KEY_REFUSALS: ReadonlySet<string> = new Set(["API_KEY_MISSING", "API_KEY_MALFORMED", "API_KEY_UNKNOWN", "API_KEY_REVOKED", "TENANT_SUSPENDED"]);

/** Channel on which the tenant service announces revocations and suspensions (contract E). */
export const AUTH_INVALIDATE_CHANNEL = "outpost:auth:invalidate";

/** What an invalidation dropped: one key (by its SHA-256 hex), a tenant's keys, or everything. */
export type Invalidation = { kind: "key"; keyHash: string } | { kind: "tenant"; tenantId: string } | { kind: "all" };

export interface AuthenticatorOptions {
  adminToken: string;
  lookup: KeyLookup;
  cacheTtlMs: number;
  now?: () => number;
  /** Told of a lookup that failed for a reason other than the key's own (the call gets UNAVAILABLE). */
  onLookupFailure?: (err: unknown) => void;
}

function sha256(value: string): Buffer {
  return createHash("sha256").update(value).digest();
}

/** The SHA-256 hex of the credential in `headers` (what the cache and invalidations name it by), if any. */
export function credentialHashOf(headers: Headers): string | undefined {
  const credential = credentialOf(headers);
  return credential === undefined ? undefined : sha256(credential).toString("hex");
}

/** Extracts the credential from `authorization: Bearer …` or `x-api-key`. */
export function credentialOf(headers: Headers): string | undefined {
  const authorization = headers.get("authorization");
  if (authorization !== null) {
    const match = /^Bearer\s+(\S+)\s*$/i.exec(authorization);
    return match ? match[1] : "";
  }
  return headers.get("x-api-key") ?? undefined;
}

export class Authenticator {
  private readonly adminTokenHash: Buffer;
  private readonly lookup: KeyLookup;
  private readonly cacheTtlMs: number;
  private readonly now: () => number;
  private readonly onLookupFailure: (err: unknown) => void;
  private readonly cache = new Map<string, { identity: Identity; expiresAt: number }>();
  /** Tier request rates by tenant, as last sent by the tenant service. */
  private readonly tenantRates = new Map<string, Partial<RateLimits>>();
  /**
   * One tenant-service lookup per key at a time; concurrent calls with the same key share it,
   * unless an invalidation came since it began (its answer may predate a revocation).
   */
  private readonly inFlight = new Map<string, { generation: number; identity: Promise<Identity> }>();
  /** Bumped by every invalidation, so a lookup that raced one is neither cached nor shared. */
  private generation = 0;
  private readonly invalidationListeners: ((what: Invalidation) => void)[] = [];

  constructor(options: AuthenticatorOptions) {
    this.adminTokenHash = sha256(options.adminToken);
    this.lookup = options.lookup;
    this.cacheTtlMs = options.cacheTtlMs;
    this.now = options.now ?? Date.now;
    this.onLookupFailure = options.onLookupFailure ?? (() => {});
  }

  async authenticate(headers: Headers): Promise<Identity> {
    const credential = credentialOf(headers);
    if (credential === undefined) {
      throw unauthenticated("API_KEY_MISSING", "missing API key: send `authorization: Bearer otp_…` or `x-api-key: otp_…`");
    }
    const hash = sha256(credential);
    if (timingSafeEqual(hash, this.adminTokenHash)) return { kind: "admin", principal: "admin" };
    if (!API_KEY_PATTERN.test(credential)) {
      // Said for the admin token too: an operator with a stale one otherwise reads only about keys.
      throw unauthenticated("API_KEY_MALFORMED", "malformed API key: expected otp_ followed by 64 hex characters (nor is it the admin token)");
    }
    const cacheKey = hash.toString("hex");
    const cached = this.cache.get(cacheKey);
    if (cached && cached.expiresAt > this.now()) return cached.identity;
    const pending = this.inFlight.get(cacheKey);
    if (pending?.generation === this.generation) return pending.identity;
    const entry = { generation: this.generation, identity: this.verify(credential, cacheKey) };
    entry.identity
      .finally(() => {
        if (this.inFlight.get(cacheKey) === entry) this.inFlight.delete(cacheKey);
      })
      .catch(() => {}); // the caller handles the failure; this chain only tidies up
    this.inFlight.set(cacheKey, entry);
    return entry.identity;
  }

  /** The identity of a credential if it is the admin token or a key trusted right now, without asking anyone. */
  cachedIdentity(headers: Headers): Identity | undefined {
    const credential = credentialOf(headers);
    if (credential === undefined) return undefined;
    const hash = sha256(credential);
    if (timingSafeEqual(hash, this.adminTokenHash)) return { kind: "admin", principal: "admin" };
    const cached = this.cache.get(hash.toString("hex"));
    return cached && cached.expiresAt > this.now() ? cached.identity : undefined;
  }

  /** The tier request rates the tenant service sent with the tenant's key, if any. */
  rateLimitsOf(tenantId: string): Partial<RateLimits> | undefined {
    return this.tenantRates.get(tenantId);
  }

  /**
   * Drops cached trust after a message on AUTH_INVALIDATE_CHANNEL: the SHA-256 hex of a
   * revoked key, or `tenant:<id>` when a tenant was suspended (all its keys).
   */
  invalidate(message: string): void {
    this.generation++;
    if (message.startsWith("tenant:")) {
      const tenantId = message.slice("tenant:".length);
      for (const [key, entry] of this.cache) {
        if (entry.identity.kind === "tenant" && entry.identity.tenantId === tenantId) this.cache.delete(key);
      }
      this.tenantRates.delete(tenantId);
      this.announce({ kind: "tenant", tenantId });
    } else {
      const keyHash = message.trim().toLowerCase();
      this.cache.delete(keyHash);
      this.announce({ kind: "key", keyHash });
    }
  }

  /** Forgets every cached key, e.g. after the invalidation channel was down and messages may be lost. */
  invalidateAll(): void {
    this.generation++;
    this.cache.clear();
    this.tenantRates.clear();
    this.announce({ kind: "all" });
  }

  /** Calls `listener` after each invalidation, once the cache no longer trusts what it dropped. */
  onInvalidation(listener: (what: Invalidation) => void): void {
    this.invalidationListeners.push(listener);
  }

  private announce(what: Invalidation): void {
    for (const listener of this.invalidationListeners) listener(what);
  }

  private async verify(credential: string, cacheKey: string): Promise<Identity> {
    const generation = this.generation;
    let found: Awaited<ReturnType<KeyLookup>>;
    try {
      found = await this.lookup(credential);
    } catch (err) {
      if (isKeyRefusal(err)) throw err;
      this.onLookupFailure(err);
      throw unavailable("AUTH_UNAVAILABLE", "cannot verify the API key right now; retry shortly", 1000);
    }
    const identity: Identity = { kind: "tenant", tenantId: found.tenantId, principal: `key/${found.apiKeyId}` };
    if (found.rateLimits) this.tenantRates.set(found.tenantId, found.rateLimits);
    // A revocation that arrived while the tenant service was answering wins over that answer.
    if (generation === this.generation) {
      this.cache.set(cacheKey, { identity, expiresAt: this.now() + this.cacheTtlMs });
      this.evictExpired();
    }
    return identity;
  }

  /** Keeps the cache bounded by dropping expired entries once it grows. */
  private evictExpired(): void {
    if (this.cache.size < 10_000) return;
    const now = this.now();
    for (const [key, entry] of this.cache) if (entry.expiresAt <= now) this.cache.delete(key);
  }
}

/** True when `err` is the tenant service's refusal of the key itself (KEY_REFUSALS). */
export function isKeyRefusal(err: unknown): err is ConnectError {
  return (
    err instanceof ConnectError &&
    (err.code === Code.Unauthenticated || err.code === Code.PermissionDenied) &&
    KEY_REFUSALS.has(errorInfoOf(err)?.reason ?? "")
  );
}
