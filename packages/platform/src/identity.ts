/**
 * Caller identity between services (SPEC G2). The gateway authenticates API keys and the
 * services trust it to say who is calling; services also call each other. Every internal call
 * carries the identity in `outpost-identity` and an HMAC-SHA256 of it, under a secret only
 * the services share, in `outpost-identity-signature`. A service refuses a call whose identity
 * is missing, unsigned, forged or expired, so a client that reaches a service port directly
 * cannot claim to be a tenant.
 */
import { createHmac, timingSafeEqual } from "node:crypto";
import { createContextKey, type HandlerContext } from "@connectrpc/connect";
import { permissionDenied, unauthenticated } from "./errors.ts";

export type Identity =
  /** A tenant, authenticated by the gateway from one of its API keys. */
  | { kind: "tenant"; tenantId: string; principal: string }
  /** An operator holding the admin credential. */
  | { kind: "admin"; principal: string }
  /** Another Outpost service, e.g. "executor/host-1". */
  | { kind: "service"; principal: string };

export const IDENTITY_HEADER = "outpost-identity";
export const IDENTITY_SIGNATURE_HEADER = "outpost-identity-signature";

/** How long a signed identity stays valid; calls are signed as they are made. */
const IDENTITY_TTL_MS = 60_000;

interface SignedPayload {
  id: Identity;
  exp: number;
}

function sign(secret: string, payload: string): string {
  return createHmac("sha256", secret).update(payload).digest("base64url");
}

/**
 * Signing and checking cost an HMAC each per call on the hot path, so both are remembered
 * briefly: a signed identity is reused for up to a second (its expiry is then 59 s to 60 s
 * away, never more), and a payload and signature that verified are trusted again until their
 * expiry. Both caches are keyed by the secret too (in-process tests run servers with different
 * secrets) and bounded: when full they are emptied and refilled.
 */
const SIGNATURE_REUSE_MS = 1_000;
const MAX_CACHED = 10_000;
const signedCache = new Map<string, { payload: string; signature: string; signedAt: number }>();
const verifiedCache = new Map<string, { identity: Identity; exp: number }>();

function remember<V>(cache: Map<string, V>, key: string, value: V): void {
  if (cache.size >= MAX_CACHED) cache.clear();
  cache.set(key, value);
}

/** Writes the signed identity into outgoing request headers. */
export function writeIdentity(headers: Headers, secret: string, identity: Identity, now = Date.now()): void {
  const id = JSON.stringify(identity);
  const key = `${secret}\n${id}`;
  let signed = signedCache.get(key);
  if (signed === undefined || now < signed.signedAt || now - signed.signedAt >= SIGNATURE_REUSE_MS) {
    // The same bytes as JSON.stringify({ id, exp } satisfies SignedPayload).
    const payload = Buffer.from(`{"id":${id},"exp":${now + IDENTITY_TTL_MS}}`).toString("base64url");
    signed = { payload, signature: sign(secret, payload), signedAt: now };
    remember(signedCache, key, signed);
  }
  headers.set(IDENTITY_HEADER, signed.payload);
  headers.set(IDENTITY_SIGNATURE_HEADER, signed.signature);
}

/** Verifies the identity in incoming headers; throws UNAUTHENTICATED when it cannot be trusted. */
export function readIdentity(headers: Headers, secret: string, now = Date.now()): Identity {
  const payload = headers.get(IDENTITY_HEADER);
  const signature = headers.get(IDENTITY_SIGNATURE_HEADER);
  if (!payload || !signature) {
    throw unauthenticated("IDENTITY_MISSING", "no caller identity: tenant calls must come through the gateway");
  }
  const key = `${secret}\n${payload}\n${signature}`;
  const verified = verifiedCache.get(key);
  if (verified !== undefined) {
    if (verified.exp < now) throw unauthenticated("IDENTITY_EXPIRED", "caller identity has expired");
    return verified.identity;
  }
  const expected = Buffer.from(sign(secret, payload));
  const given = Buffer.from(signature);
  if (expected.length !== given.length || !timingSafeEqual(expected, given)) {
    throw unauthenticated("IDENTITY_FORGED", "caller identity is not signed by an Outpost service");
  }
  let parsed: SignedPayload;
  try {
    parsed = JSON.parse(Buffer.from(payload, "base64url").toString("utf8")) as SignedPayload;
  } catch {
    throw unauthenticated("IDENTITY_MALFORMED", "caller identity is malformed");
  }
  if (!isSignedPayload(parsed)) throw unauthenticated("IDENTITY_MALFORMED", "caller identity is malformed");
  if (typeof parsed.exp !== "number" || parsed.exp < now) {
    throw unauthenticated("IDENTITY_EXPIRED", "caller identity has expired");
  }
  const identity = Object.freeze(parsed.id);
  remember(verifiedCache, key, { identity, exp: parsed.exp });
  return identity;
}

/** Shape check of a decoded payload (`exp` is checked separately, as expiry). */
function isSignedPayload(value: unknown): value is SignedPayload {
  if (typeof value !== "object" || value === null) return false;
  const id = (value as { id?: unknown }).id as Partial<Record<string, unknown>> | null | undefined;
  if (typeof id !== "object" || id === null || typeof id.principal !== "string") return false;
  if (id.kind === "tenant") return typeof id.tenantId === "string";
  return id.kind === "admin" || id.kind === "service";
}

export const identityKey = createContextKey<Identity | undefined>(undefined, { description: "caller identity" });

export function callerOf(ctx: HandlerContext): Identity {
  const identity = ctx.values.get(identityKey);
  if (!identity) throw unauthenticated("IDENTITY_MISSING", "no caller identity");
  return identity;
}

/** The calling tenant's id; admins and services are refused. */
export function requireTenant(ctx: HandlerContext): Extract<Identity, { kind: "tenant" }> {
  const identity = callerOf(ctx);
  if (identity.kind !== "tenant") {
    throw permissionDenied("TENANT_REQUIRED", "this method is called with a tenant API key");
  }
  return identity;
}

export function requireAdmin(ctx: HandlerContext): Extract<Identity, { kind: "admin" }> {
  const identity = callerOf(ctx);
  if (identity.kind !== "admin") {
    throw permissionDenied("ADMIN_REQUIRED", "this method needs the admin credential");
  }
  return identity;
}

/** Internal methods: only other Outpost services, optionally only some of them. */
export function requireService(ctx: HandlerContext, ...allowed: string[]): Extract<Identity, { kind: "service" }> {
  const identity = callerOf(ctx);
  const role = identity.kind === "service" ? identity.principal.split("/")[0]! : "";
  if (identity.kind !== "service" || (allowed.length > 0 && !allowed.includes(role))) {
    throw permissionDenied("SERVICE_REQUIRED", "this method is internal to Outpost");
  }
  return identity;
}
