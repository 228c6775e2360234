/**
 * Thin handlers: check the caller, validate the request, call the core, map records to
 * messages. Every field is checked here, so bad input answers INVALID_ARGUMENT naming it.
 */
import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromDate, type Duration } from "@bufbuild/protobuf/wkt";
import type { ConnectRouter, HandlerContext } from "@connectrpc/connect";
import {
  callerOf,
  checkLength,
  checkSecretGrant,
  decodePageToken,
  encodePageToken,
  invalidArgument,
  notFound,
  pageSizeOf,
  permissionDenied,
  requireAdmin,
  requireEnum,
  requireNonEmpty,
  requireService,
  requireTenant,
  requireUlid,
  type SigningKeys,
} from "@outpost/platform";
import { TenantInternalService } from "@outpost/proto/outpost/tenant/v1/tenant_internal_service_pb.js";
import {
  ApiKeySchema,
  SecretSchema,
  Tenant_State,
  TenantSchema,
  TierLimitsSchema,
  Tier,
  type ApiKey,
  type Secret,
  type Tenant,
  type TierLimits as TierLimitsMessage,
} from "@outpost/proto/outpost/tenant/v1/tenant_pb.js";
import { ApiKeyService, SecretService, TenantService } from "@outpost/proto/outpost/tenant/v1/tenant_service_pb.js";
import type { AdmissionCore } from "./core/admission.ts";
import { MAX_SECRETS_PER_TENANT, SECRET_NAME_PATTERN, SECRET_VALUE_MAX_BYTES, type SecretsCore } from "./core/secrets.ts";
import type { Page, TenantCore } from "./core/tenants.ts";
import type { TierLimits } from "./core/tiers.ts";
import type { ApiKeyRecord, SecretRecord, TenantRecord, TenantState, TenantTier } from "./store/store.ts";

export const NAME_MAX = 200;
export const EMAIL_MAX = 320;
export const DISPLAY_NAME_MAX = 100;
export const REASON_MAX = 500;
const PAGE_DEFAULT = 50;
const PAGE_MAX = 500;

export interface TenantCores {
  tenants: TenantCore;
  secrets: SecretsCore;
  admission: AdmissionCore;
  /** Checks the dispatcher's secret grants (ResolveSecrets). */
  signingKeys: SigningKeys;
}

export function tenantRoutes(cores: TenantCores) {
  const { tenants: core, secrets, admission, signingKeys } = cores;
  return (router: ConnectRouter) => {
    router.service(TenantService, {
      async createTenant(req, ctx) {
        requireAdmin(ctx);
        const name = textField("name", req.name, NAME_MAX, true);
        const contactEmail = emailField("contact_email", req.contactEmail);
        const tier = tierField("tier", req.tier);
        const created = await core.createTenant({ name, contactEmail, tier });
        return {
          tenant: tenantMessage(created.tenant),
          apiKey: apiKeyMessage(created.apiKey),
          apiKeyPlaintext: created.plaintext,
        };
      },
      async getTenant(req, ctx) {
        requireAdmin(ctx);
        const tenantId = requireUlid("tenant_id", req.tenantId);
        return { tenant: tenantMessage(await core.getTenant(tenantId)) };
      },
      async listTenants(req, ctx) {
        requireAdmin(ctx);
        const pageSize = pageSizeOf("page_size", req.pageSize, PAGE_DEFAULT, PAGE_MAX);
        const page = await core.listTenants(pageSize, cursorOf(req.pageToken));
        return { tenants: page.items.map(tenantMessage), nextPageToken: tokenOf(page) };
      },
      async updateTenant(req, ctx) {
        requireAdmin(ctx);
        const tenantId = requireUlid("tenant_id", req.tenantId);
        requireEnum("tier", req.tier, Tier);
        return { tenant: tenantMessage(await core.updateTier(tenantId, tierField("tier", req.tier))) };
      },
      async suspendTenant(req, ctx) {
        requireAdmin(ctx);
        const tenantId = requireUlid("tenant_id", req.tenantId);
        const reason = textField("reason", req.reason, REASON_MAX, true);
        return { tenant: tenantMessage(await core.suspend(tenantId, reason)) };
      },
      async reactivateTenant(req, ctx) {
        requireAdmin(ctx);
        const tenantId = requireUlid("tenant_id", req.tenantId);
        return { tenant: tenantMessage(await core.reactivate(tenantId)) };
      },
    });

    router.service(ApiKeyService, {
      async createApiKey(req, ctx) {
        const tenantId = ownOrAdminTenant(ctx, req.tenantId);
        const displayName = textField("display_name", req.displayName, DISPLAY_NAME_MAX, false);
        const created = await core.createApiKey(tenantId, displayName);
        return { apiKey: apiKeyMessage(created.apiKey), apiKeyPlaintext: created.plaintext };
      },
      async listApiKeys(req, ctx) {
        const tenantId = ownOrAdminTenant(ctx, req.tenantId);
        const pageSize = pageSizeOf("page_size", req.pageSize, PAGE_DEFAULT, PAGE_MAX);
        const page = await core.listApiKeys(tenantId, pageSize, cursorOf(req.pageToken));
        return { apiKeys: page.items.map(apiKeyMessage), nextPageToken: tokenOf(page) };
      },
      async revokeApiKey(req, ctx) {
        const caller = callerOf(ctx);
        if (caller.kind !== "tenant" && caller.kind !== "admin") throw tenantOrAdminRequired();
        const keyId = requireUlid("api_key_id", req.apiKeyId);
        const revoked = await core.revokeApiKey(keyId, caller.kind === "tenant" ? caller.tenantId : undefined);
        return { apiKey: apiKeyMessage(revoked) };
      },
    });

    router.service(SecretService, {
      async putSecret(req, ctx) {
        const { tenantId } = requireTenant(ctx);
        const name = secretName("name", req.name);
        const value = secretValue("value", req.value);
        return { secret: secretMessage(await secrets.put(tenantId, name, value)) };
      },
      async listSecrets(req, ctx) {
        const { tenantId } = requireTenant(ctx);
        const pageSize = pageSizeOf("page_size", req.pageSize, PAGE_DEFAULT, PAGE_MAX);
        const page = await secrets.list(tenantId, pageSize, cursorOf(req.pageToken));
        return { secrets: page.items.map(secretMessage), nextPageToken: tokenOf(page) };
      },
      async deleteSecret(req, ctx) {
        const { tenantId } = requireTenant(ctx);
        await secrets.delete(tenantId, secretName("name", req.name));
        return {};
      },
    });

    router.service(TenantInternalService, {
      async authenticateApiKey(req, ctx) {
        requireService(ctx, "gateway");
        const { tenant, apiKeyId, limits } = await core.authenticateApiKey(req.apiKey);
        return { tenant: tenantMessage(tenant), apiKeyId, limits: tierLimitsMessage(limits) };
      },
      async resolveSecrets(req, ctx) {
        const executor = requireService(ctx, "executor");
        const tenantId = requireUlid("tenant_id", req.tenantId);
        const names = secretNames("names", req.names);
        checkSecretGrant(signingKeys, req.grant, { tenantId, names, executor: executor.principal });
        return { values: await secrets.resolve(tenantId, names) };
      },
      async admitDispatch(req, ctx) {
        requireService(ctx, "dispatcher");
        const tenantId = requireUlid("tenant_id", req.tenantId);
        const dispatchId = requireUlid("dispatch_id", req.dispatchId);
        const names = secretNames("secret_names", req.secretNames);
        if (req.requestedTimeout) durationField("requested_timeout", req.requestedTimeout);
        const admitted = await admission.admit(tenantId, dispatchId, names);
        return {
          maxTimeout: durationFromMs(admitted.maxTimeoutMs),
          tier: TIER_MESSAGES[admitted.tier],
          logRetention: durationFromMs(admitted.logRetentionMs),
          maxCpuMillis: BigInt(admitted.resourceCaps.cpuMillis),
          maxMemoryBytes: BigInt(admitted.resourceCaps.memoryBytes),
          maxPidsLimit: BigInt(admitted.resourceCaps.pidsLimit),
        };
      },
      async releaseDispatch(req, ctx) {
        requireService(ctx, "dispatcher");
        const tenantId = requireUlid("tenant_id", req.tenantId);
        const dispatchId = requireUlid("dispatch_id", req.dispatchId);
        await admission.release(tenantId, dispatchId, { neverCreated: req.neverCreated });
        return {};
      },
      async listSuspendedTenants(_req, ctx) {
        requireService(ctx, "dispatcher");
        return { tenantIds: await admission.suspendedTenants() };
      },
    });
  };
}

function cursorOf(pageToken: string): string | undefined {
  const cursor = decodePageToken<{ after: string }>(pageToken, { after: "string" });
  if (cursor !== undefined && typeof cursor.after !== "string") {
    throw invalidArgument("page_token", "is not a token this service issued", "PAGE_TOKEN_INVALID");
  }
  return cursor?.after;
}

function tokenOf(page: Page<unknown>): string {
  return page.nextAfter === undefined ? "" : encodePageToken({ after: page.nextAfter });
}

function tenantOrAdminRequired() {
  return permissionDenied("TENANT_OR_ADMIN_REQUIRED", "this method is called with a tenant API key or the admin credential");
}

function secretName(field: string, value: string): string {
  if (value.length === 0) throw invalidArgument(field, "is required", "FIELD_REQUIRED");
  if (!SECRET_NAME_PATTERN.test(value)) {
    throw invalidArgument(field, "must match ^[A-Z_][A-Z0-9_]{0,127}$ (an environment variable name such as GITHUB_TOKEN)", "FIELD_MALFORMED");
  }
  return value;
}

function secretNames(field: string, values: string[]): string[] {
  if (values.length > MAX_SECRETS_PER_TENANT) {
    throw invalidArgument(field, `must name at most ${MAX_SECRETS_PER_TENANT} secrets`, "FIELD_OUT_OF_RANGE");
  }
  return values.map((v, i) => secretName(`${field}[${i}]`, v));
}

/** Values become environment variables: non-empty, no NUL, bounded, well-formed text. */
function secretValue(field: string, value: string): string {
  if (value.length === 0) throw invalidArgument(field, "is required", "FIELD_REQUIRED");
  if (!value.isWellFormed()) throw invalidArgument(field, "must be valid Unicode text", "FIELD_MALFORMED");
  if (value.includes("\0")) throw invalidArgument(field, "must not contain NUL characters (it becomes an environment variable)", "FIELD_MALFORMED");
  if (Buffer.byteLength(value, "utf8") > SECRET_VALUE_MAX_BYTES) {
    throw invalidArgument(field, `must be at most ${SECRET_VALUE_MAX_BYTES} bytes`, "FIELD_TOO_LONG");
  }
  return value;
}

function durationField(field: string, d: Duration): number {
  const ms = Number(d.seconds) * 1000 + d.nanos / 1e6;
  const mixedSigns = (d.seconds > 0n && d.nanos < 0) || (d.seconds < 0n && d.nanos > 0);
  if (!Number.isFinite(ms) || ms < 0 || mixedSigns || Math.abs(d.nanos) > 999_999_999) {
    throw invalidArgument(field, "must be a non-negative duration", "FIELD_OUT_OF_RANGE");
  }
  return ms;
}

/**
 * The tenant a key is created for: a tenant always its own (another tenant's id answers
 * NOT_FOUND, as if it did not exist, SPEC T4); the admin names it; services may not.
 */
function ownOrAdminTenant(ctx: HandlerContext, requested: string): string {
  const caller = callerOf(ctx);
  if (caller.kind === "tenant") {
    // Checked as for the admin first, so a malformed or huge id is INVALID_ARGUMENT, never
    // echoed back in a NOT_FOUND.
    if (requested !== "" && requireUlid("tenant_id", requested) !== caller.tenantId) {
      throw notFound("tenant", requested);
    }
    return caller.tenantId;
  }
  if (caller.kind === "admin") return requireUlid("tenant_id", requested);
  throw tenantOrAdminRequired();
}

// Control characters (C0, DEL, C1) and the Unicode line/paragraph separators.
const CONTROL = /[\p{Cc}\u2028\u2029]/u;
// Characters that change how text around them is shown, or take no visible space, without
// showing themselves: every format character (\p{Cf}: direction marks, overrides and isolates,
// zero-width space and non-joiner, word joiner, soft hyphen, byte-order mark, the Mongolian vowel
// separator, tag characters U+E0000–E007F, …) and the Hangul fillers, which render blank. In a
// name they can make one tenant look like another in an admin's list. The zero-width joiner
// (U+200D) stays, since emoji sequences use it; it is removed before this test.
const INVISIBLE = /[\p{Cf}\u115F\u1160\u3164\uFFA0]/u;
const ZERO_WIDTH_JOINER = /\u200D/gu;

/** Free text: trimmed, well-formed Unicode, no control characters, at most `max` UTF-16 units. */
function textField(field: string, raw: string, max: number, required: boolean): string {
  if (!raw.isWellFormed()) throw invalidArgument(field, "must be valid Unicode text", "FIELD_MALFORMED");
  const value = raw.trim();
  if (required) requireNonEmpty(field, value, max);
  else checkLength(field, value, max);
  if (CONTROL.test(value)) throw invalidArgument(field, "must not contain control characters", "FIELD_MALFORMED");
  const visible = value.replace(ZERO_WIDTH_JOINER, "");
  if (INVISIBLE.test(visible)) throw invalidArgument(field, "must not contain invisible or text-direction characters", "FIELD_MALFORMED");
  // Nothing but joiners (and spaces between them) would show as a blank name.
  if (value !== "" && visible.trim() === "") throw invalidArgument(field, "must contain visible characters", "FIELD_MALFORMED");
  return value;
}

// Deliberately modest: one "@", a non-empty local part, a dotted domain of DNS-like labels.
const EMAIL = /^[^\s@"<>()[\]\\,;:]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$/;

function emailField(field: string, raw: string): string {
  const value = textField(field, raw, EMAIL_MAX, true);
  const local = value.slice(0, value.lastIndexOf("@"));
  if (!EMAIL.test(value) || local.length > 64) {
    throw invalidArgument(field, "must be an email address such as ops@example.com", "FIELD_MALFORMED");
  }
  return value;
}

const TIERS: Record<number, TenantTier> = {
  [Tier.FREE]: "free",
  [Tier.PRO]: "pro",
  [Tier.ENTERPRISE]: "enterprise",
};

/** TIER_UNSPECIFIED means the default (free); numbers outside the enum are refused. */
function tierField(field: string, value: number): TenantTier {
  if (value === Tier.UNSPECIFIED) return "free";
  const tier = TIERS[value];
  if (!tier) throw invalidArgument(field, `unknown value ${value}`, "FIELD_OUT_OF_RANGE");
  return tier;
}

const TIER_MESSAGES: Record<TenantTier, Tier> = { free: Tier.FREE, pro: Tier.PRO, enterprise: Tier.ENTERPRISE };
const STATE_MESSAGES: Record<TenantState, Tenant_State> = {
  active: Tenant_State.ACTIVE,
  suspended: Tenant_State.SUSPENDED,
};

export function tenantMessage(t: TenantRecord): Tenant {
  return create(TenantSchema, {
    id: t.id,
    name: t.name,
    contactEmail: t.contactEmail,
    tier: TIER_MESSAGES[t.tier],
    state: STATE_MESSAGES[t.state],
    suspendReason: t.suspendReason,
    createTime: timestampFromDate(t.createTime),
    updateTime: timestampFromDate(t.updateTime),
  });
}

/** Masked: prefix and last four only, never the hash. */
export function apiKeyMessage(k: ApiKeyRecord): ApiKey {
  return create(ApiKeySchema, {
    id: k.id,
    tenantId: k.tenantId,
    displayName: k.displayName,
    prefix: k.prefix,
    lastFour: k.lastFour,
    createTime: timestampFromDate(k.createTime),
    lastUsedTime: k.lastUsedTime ? timestampFromDate(k.lastUsedTime) : undefined,
    revokeTime: k.revokeTime ? timestampFromDate(k.revokeTime) : undefined,
  });
}

export function secretMessage(s: SecretRecord): Secret {
  return create(SecretSchema, {
    name: s.name,
    createTime: timestampFromDate(s.createTime),
    updateTime: timestampFromDate(s.updateTime),
  });
}

export function tierLimitsMessage(l: TierLimits): TierLimitsMessage {
  return create(TierLimitsSchema, {
    concurrentRuns: l.concurrentRuns,
    runsPerDay: l.runsPerDay,
    maxTimeout: durationFromMs(l.maxTimeoutMs),
    createPerMinute: l.createPerMinute,
    triggerPerMinute: l.triggerPerMinute,
    readPerMinute: l.readPerMinute,
  });
}
