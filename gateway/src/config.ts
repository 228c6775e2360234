import { ConfigError, ENVELOPE_HEADER_BYTES, internalTlsShape, publicTlsShape, setting } from "@outpost/platform";
import { z } from "zod";
import { corsPolicyOf } from "./core/cors.ts";
import { METHOD_CLASSES } from "./core/method-class.ts";
import { DEFAULT_RATE_LIMITS, parseAllowList, type RateLimits } from "./core/rate-limit.ts";

/** "create=100,trigger=500,read=1000" (per minute); classes left out keep their default. */
const rateLimits = (fallback: RateLimits = DEFAULT_RATE_LIMITS) =>
  z
    .string()
    .optional()
    .transform((value, ctx): RateLimits => {
      const limits = { ...fallback };
      for (const part of (value ?? "").split(",").map((p) => p.trim()).filter(Boolean)) {
        const [name, count] = part.split("=").map((s) => s.trim()) as [string, string | undefined];
        const n = Number(count);
        if (!(METHOD_CLASSES as readonly string[]).includes(name) || !Number.isInteger(n) || n <= 0) {
          ctx.addIssue({ code: "custom", message: `expected create=N,trigger=N,read=N (N > 0), got "${part}"` });
          return z.NEVER;
        }
        limits[name as keyof RateLimits] = n;
      }
      return limits;
    });

/** Environment settings of the gateway, validated at start-up. */
export const gatewayConfigShape = {
  /** TLS of the calls to the services (docs/operations.md, "Internal TLS"); unset: h2c. */
  ...internalTlsShape,
  /** TLS on the public port (docs/edge.md, "TLS"); unset: plain HTTP, for a load balancer that terminates TLS. */
  ...publicTlsShape,
  /** The gateway signs the identities it authenticates; it verifies none, so it trusts no signer. */
  OUTPOST_SIGNING_KEY: setting.signingKey(),
  OUTPOST_GATEWAY_HOST: setting.host(),
  OUTPOST_GATEWAY_PORT: setting.port(7100),
  OUTPOST_TENANT_URL: setting.url(),
  OUTPOST_DISPATCHER_URL: setting.url(),
  OUTPOST_TELEMETRY_URL: setting.url(),
  /** The operator credential (SPEC T6); distinct from tenant keys, at least 32 characters. */
  OUTPOST_ADMIN_TOKEN: z.string({ error: "is required (the admin credential)" }).min(32, { message: "must be at least 32 characters" }),
  /** How long a verified API key is trusted before the tenant service is asked again. */
  OUTPOST_AUTH_CACHE_TTL_MS: setting.timerMs(2000),
  /**
   * How often the credential of every open server stream is checked again, so a stream ends when
   * its key is revoked or its tenant suspended even where no invalidation reaches the gateway
   * (no Redis, a lost message). With Redis they end at once (core/open-streams.ts).
   */
  OUTPOST_GATEWAY_STREAM_RECHECK_MS: setting.timerMs(30_000),
  /** Largest request message accepted at the edge. */
  OUTPOST_MAX_REQUEST_BYTES: setting.positiveInt(1024 * 1024),
  /** Concurrent HTTP/2 streams (calls, log subscriptions) one client connection may hold open. */
  OUTPOST_GATEWAY_MAX_STREAMS_PER_CONNECTION: setting.positiveInt(1000),
  /** Bytes of request bodies the gateway holds at once while receiving them, all clients together (docs/edge.md). */
  OUTPOST_GATEWAY_BODY_BUDGET_BYTES: setting.positiveInt(64 * 1024 * 1024),
  /** Of the body budget, what the calls of one client IP may hold; default a quarter of it (bodyBudgetOf). */
  OUTPOST_GATEWAY_BODY_BUDGET_PER_IP_BYTES: z.coerce.number().int().positive().optional(),
  /**
   * How long one request body may take to arrive whole, whatever the client's deadline: past it
   * the call fails DEADLINE_EXCEEDED REQUEST_BODY_TIMEOUT and its share of the body budget is free
   * again (docs/edge.md). Also bounds a reflection stream, whose body is its requests.
   */
  OUTPOST_GATEWAY_BODY_TIMEOUT_MS: setting.timerMs(60_000),
  /**
   * Keep-alive pings on the raw path's shared upstream sessions: every interval while a session
   * carries calls; one unanswered within the timeout drops the session and fails its calls
   * UNAVAILABLE (docs/edge.md). As connect-node's client on the Connect path.
   */
  OUTPOST_GATEWAY_UPSTREAM_PING_INTERVAL_MS: setting.timerMs(10_000),
  OUTPOST_GATEWAY_UPSTREAM_PING_TIMEOUT_MS: setting.timerMs(15_000),
  /** Shared rate-limit counters and auth-cache invalidation between replicas; absent = in-process only. */
  OUTPOST_REDIS_URL: z.string().url({ message: "must be a URL such as redis://127.0.0.1:6379" }).optional(),
  /** Where rate limits are counted: redis (default when OUTPOST_REDIS_URL is set), memory (default otherwise), or off. */
  OUTPOST_RATE_LIMIT: z.enum(["redis", "memory", "off"]).optional(),
  /** Per-tenant request rates per minute by method class, when the tier sets none. */
  OUTPOST_RATE_LIMITS: rateLimits(),
  /** Per-client-IP request rates per minute by method class (authenticated or not). */
  OUTPOST_RATE_LIMITS_PER_IP: rateLimits(),
  /** IPs and CIDRs never rate limited (internal callers), comma-separated. */
  OUTPOST_RATE_LIMIT_ALLOW: z
    .string()
    .default("")
    .transform((value, ctx) => {
      const entries = value.split(",").map((s) => s.trim()).filter(Boolean);
      try {
        parseAllowList(entries);
      } catch (err) {
        ctx.addIssue({ code: "custom", message: (err as Error).message });
        return z.NEVER;
      }
      return entries;
    }),
  /**
   * Serve Prometheus metrics on this port instead of the public one (production: set it, and
   * let only the scraper reach it). Unset: /metrics on the main port, as on every service.
   */
  OUTPOST_GATEWAY_METRICS_PORT: setting.port().optional(),
  /** Browser origins allowed to call the gateway (CORS), comma-separated, or `*`; empty = none. */
  OUTPOST_CORS_ORIGINS: z.string().default("").transform(corsPolicyOf),
};

export type GatewayConfig = z.infer<z.ZodObject<typeof gatewayConfigShape>>;

/**
 * The body budget in effect: the total, and each client IP's share (a quarter of the total by
 * default, so one client cannot take it all). Each must hold at least one largest request
 * (OUTPOST_MAX_REQUEST_BYTES and its 5-byte frame header), else such a request could never
 * pass; a share above the total is refused too. Throws ConfigError naming the setting.
 */
export function bodyBudgetOf(config: GatewayConfig): { limitBytes: number; perClientBytes: number; largestBodyBytes: number } {
  const largestBodyBytes = config.OUTPOST_MAX_REQUEST_BYTES + ENVELOPE_HEADER_BYTES;
  const limitBytes = config.OUTPOST_GATEWAY_BODY_BUDGET_BYTES;
  const perClientBytes = config.OUTPOST_GATEWAY_BODY_BUDGET_PER_IP_BYTES ?? Math.min(limitBytes, Math.max(largestBodyBytes, Math.floor(limitBytes / 4)));
  const largest = `at least one largest request (OUTPOST_MAX_REQUEST_BYTES + ${ENVELOPE_HEADER_BYTES} = ${largestBodyBytes} bytes)`;
  if (limitBytes < largestBodyBytes) throw new ConfigError(`OUTPOST_GATEWAY_BODY_BUDGET_BYTES: must hold ${largest}, got ${limitBytes}`);
  if (perClientBytes < largestBodyBytes) throw new ConfigError(`OUTPOST_GATEWAY_BODY_BUDGET_PER_IP_BYTES: must hold ${largest}, got ${perClientBytes}`);
  if (perClientBytes > limitBytes) {
    throw new ConfigError(`OUTPOST_GATEWAY_BODY_BUDGET_PER_IP_BYTES: must not exceed OUTPOST_GATEWAY_BODY_BUDGET_BYTES (${limitBytes}), got ${perClientBytes}`);
  }
  return { limitBytes, perClientBytes, largestBodyBytes };
}

/** The rate-limit backend in effect. */
export function rateLimitModeOf(config: GatewayConfig): "redis" | "memory" | "off" {
  return config.OUTPOST_RATE_LIMIT ?? (config.OUTPOST_REDIS_URL ? "redis" : "memory");
}
