/**
 * What every edge call goes through before it is forwarded: the caller's credential (SPEC G2)
 * and its request-rate budgets (G3), per client IP and per tenant. A refused call answers
 * RESOURCE_EXHAUSTED with ErrorInfo RATE_LIMITED, RetryInfo, and RateLimit-Limit /
 * RateLimit-Remaining / RateLimit-Reset / Retry-After metadata; an admitted one carries the
 * RateLimit-* headers too.
 */
import { create } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type Interceptor, createContextKey } from "@connectrpc/connect";
import type http from "node:http";
import type http2 from "node:http2";
import { BodyBudget, type Identity, type Logger, explainMalformed, identityKey, outpostError, rateLimitRejections } from "@outpost/platform";
import { RetryInfoSchema } from "@outpost/proto/google/rpc/error_details_pb.js";
import { bodyBudgetOf, type GatewayConfig } from "./config.ts";
import type { Authenticator } from "./core/authenticator.ts";
import { methodClassOf } from "./core/method-class.ts";
import { type RateDecision, type RateLimitPolicy, tightest } from "./core/rate-limit.ts";

/** The TCP peer address of the call (no proxy header is trusted). */
export const clientIpKey = createContextKey<string>("", { description: "client IP" });

export function clientIpOf(req: http.IncomingMessage | http2.Http2ServerRequest): string {
  return req.socket?.remoteAddress ?? "";
}

/**
 * The budget of request-body bytes the edge holds at once while receiving them (docs/edge.md,
 * "Request bodies"): every path that reads a body whole charges it, per client IP too.
 */
export function edgeBodyBudget(config: GatewayConfig, logger: Logger): BodyBudget {
  return new BodyBudget({
    ...bodyBudgetOf(config),
    settings: { total: "OUTPOST_GATEWAY_BODY_BUDGET_BYTES", per_client_ip: "OUTPOST_GATEWAY_BODY_BUDGET_PER_IP_BYTES" },
    holdLimitMs: config.OUTPOST_GATEWAY_BODY_TIMEOUT_MS,
    holdLimitSetting: "OUTPOST_GATEWAY_BODY_TIMEOUT_MS",
    clientOf: clientIpOf,
    logger,
  });
}

/** Services anyone may call without a key: health and reflection describe nothing private. */
const PUBLIC_WITHOUT_KEY = new Set(["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"]);

export function rateLimitHeaders(decision: RateDecision): Record<string, string> {
  const resetS = String(Math.max(0, Math.ceil(decision.msBeforeReset / 1000)));
  const headers: Record<string, string> = {
    "ratelimit-limit": String(decision.limit),
    "ratelimit-remaining": String(decision.remaining),
    "ratelimit-reset": resetS,
  };
  if (!decision.allowed) headers["retry-after"] = resetS;
  return headers;
}

export function rateLimited(decision: RateDecision) {
  rateLimitRejections().inc({ limit: `${decision.subject}_${decision.methodClass}` });
  const headers = rateLimitHeaders(decision);
  const err = outpostError(
    Code.ResourceExhausted,
    "RATE_LIMITED",
    `rate limit exceeded: ${decision.limit} ${decision.methodClass} requests per minute per ${decision.subject === "ip" ? "client IP" : "tenant"}; retry after ${headers["retry-after"]} s`,
    {
      limit: headers["ratelimit-limit"]!,
      remaining: headers["ratelimit-remaining"]!,
      retry_after: headers["retry-after"]!,
      method_class: decision.methodClass,
      subject: decision.subject,
    },
    [{ desc: RetryInfoSchema, value: create(RetryInfoSchema, { retryDelay: durationFromMs(Math.max(0, decision.msBeforeReset)) }) }],
  );
  for (const [name, value] of Object.entries(headers)) err.metadata.set(name, value);
  return err;
}

export interface EdgeOptions {
  authenticator: Authenticator;
  /** Undefined when rate limiting is off. */
  rateLimits: RateLimitPolicy | undefined;
  logger: Logger;
}

/** Who the caller is and what it has left, for a call the edge let through. */
export interface Admitted {
  /** Undefined only for keyless services (health, reflection). */
  identity: Identity | undefined;
  /** RateLimit-* headers for the response. */
  budget: [string, string][];
}

/**
 * The edge's decision for one call: credential (G2) and rate budgets (G3). Throws the
 * ConnectError the client gets (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED).
 * Shared by the Connect interceptor and the raw unary forwarder (http/raw-unary.ts).
 */
export async function admitCall(
  { authenticator, rateLimits }: Pick<EdgeOptions, "authenticator" | "rateLimits">,
  call: { ip: string; serviceTypeName: string; methodName: string; header: Headers },
): Promise<Admitted> {
  const { ip } = call;
  const methodClass = methodClassOf(call.methodName);
  const keyless = PUBLIC_WITHOUT_KEY.has(call.serviceTypeName);

  let identity: Identity | undefined = keyless ? undefined : authenticator.cachedIdentity(call.header);
  let ipDecision: RateDecision | undefined;
  let tenantDecision: RateDecision | undefined;
  if (identity !== undefined || keyless) {
    // Trusted credential already known: both budgets at once, one round trip to Redis.
    [ipDecision, tenantDecision] = await Promise.all([
      rateLimits?.checkIp(ip, methodClass),
      identity?.kind === "tenant" ? rateLimits?.checkTenant(ip, identity.tenantId, methodClass, authenticator.rateLimitsOf(identity.tenantId)) : undefined,
    ]);
  } else {
    // Unknown credential: the IP budget first, so floods of bad keys never reach the tenant service.
    ipDecision = await rateLimits?.checkIp(ip, methodClass);
    if (ipDecision && !ipDecision.allowed) throw rateLimited(ipDecision);
    identity = await authenticator.authenticate(call.header);
    if (identity.kind === "tenant") {
      tenantDecision = await rateLimits?.checkTenant(ip, identity.tenantId, methodClass, authenticator.rateLimitsOf(identity.tenantId));
    }
  }
  const decision = tightest(ipDecision, tenantDecision);
  if (decision && !decision.allowed) throw rateLimited(decision);
  return { identity, budget: decision ? Object.entries(rateLimitHeaders(decision)) : [] };
}

/** The edge decision already made on the call's headers, before its body was read (http/admit-first.ts). */
export const admittedKey = createContextKey<Admitted | undefined>(undefined, { description: "edge decision made before the body" });

export function edgeInterceptor(options: EdgeOptions): Interceptor {
  return (next) => async (req) => {
    const { identity, budget } =
      req.contextValues.get(admittedKey) ??
      (await admitCall(options, {
        ip: req.contextValues.get(clientIpKey),
        serviceTypeName: req.service.typeName,
        methodName: req.method.name,
        header: req.header,
      }));
    if (identity) req.contextValues.set(identityKey, identity);
    try {
      const res = await next(req.stream ? { ...req, message: decodeFailuresAsInvalid(req.message) } : req);
      for (const [name, value] of budget) res.header.set(name, value);
      return res;
    } catch (err) {
      // Refused calls count too; the client sees what it has left either way. A request the
      // Connect path could not read (a stream's framing, message or compression) says what was
      // wrong in an ErrorInfo; the upstream's own errors pass as they are.
      if (!(err instanceof ConnectError)) throw err;
      const error = err.isWireError ? err : explainMalformed(err);
      for (const [name, value] of budget) error.metadata.set(name, value);
      throw error;
    }
  };
}

/**
 * A streamed request message that cannot be decoded, or decompressed (cut short, not in its
 * encoding), is the client's mistake; connect-es calls it INTERNAL (it cannot tell a request
 * from a response). Unary requests are reclassified on the way out (http/decode-errors.ts);
 * streamed ones here, as the handler reads them.
 */
async function* decodeFailuresAsInvalid<T>(messages: AsyncIterable<T>): AsyncIterable<T> {
  try {
    yield* messages;
  } catch (err) {
    if (err instanceof ConnectError && err.code === Code.Internal && /^(parse binary: |decompression failed|received compressed envelope)/.test(err.rawMessage)) {
      throw explainMalformed(new ConnectError(`request message could not be decoded: ${err.rawMessage}`, Code.InvalidArgument));
    }
    throw err instanceof ConnectError ? explainMalformed(err) : err;
  }
}
