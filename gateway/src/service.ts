/** Wires the gateway: authenticator, rate limits, upstream transports, forwarding and reflection routes, CORS, server. */
import type http from "node:http";
import type http2 from "node:http2";
import { connectRedis, internalClient, internalTlsOf, internalTransport, publicTlsOf, SigningKeys, startServer, subscriberOf, type Logger, type Redis } from "@outpost/platform";
import { Health } from "@outpost/proto/grpc/health/v1/health_pb.js";
import { ServerReflection } from "@outpost/proto/grpc/reflection/v1/reflection_pb.js";
import { ServerReflection as ServerReflectionV1Alpha } from "@outpost/proto/grpc/reflection/v1alpha/reflection_pb.js";
import { TenantInternalService } from "@outpost/proto/outpost/tenant/v1/tenant_internal_service_pb.js";
import { type GatewayConfig, rateLimitModeOf } from "./config.ts";
import { AUTH_INVALIDATE_CHANNEL, Authenticator } from "./core/authenticator.ts";
import { type CorsPolicy, corsAnswer } from "./core/cors.ts";
import { OpenStreams } from "./core/open-streams.ts";
import { type RateCounter, RateLimitPolicy } from "./core/rate-limit.ts";
import { ReflectionIndex } from "./core/reflection.ts";
import { PUBLIC_SERVICES, type Upstream } from "./core/routing.ts";
import { admittedKey, clientIpKey, clientIpOf, edgeBodyBudget, edgeInterceptor } from "./edge.ts";
import { admitFirst } from "./http/admit-first.ts";
import { reclassifyDecodeErrors } from "./http/decode-errors.ts";
import { boundQuotedHeaders } from "./http/header-bounds.ts";
import { rawUnaryForwarder } from "./http/raw-unary.ts";
import { registerForwarding, registerReflection } from "./routes.ts";
import { MemoryRateCounter, RedisRateCounter } from "./store/rate-counter.ts";

const AUTH_CALL_TIMEOUT_MS = 2000;

export async function startGateway(config: GatewayConfig, logger: Logger) {
  const signingKeys = SigningKeys.fromSettings("gateway", config.OUTPOST_SIGNING_KEY);
  const tls = internalTlsOf(config, {
    OUTPOST_TENANT_URL: config.OUTPOST_TENANT_URL,
    OUTPOST_DISPATCHER_URL: config.OUTPOST_DISPATCHER_URL,
    OUTPOST_TELEMETRY_URL: config.OUTPOST_TELEMETRY_URL,
  });
  const publicTls = publicTlsOf(config);
  const tenantInternal = internalClient(TenantInternalService, {
    baseUrl: config.OUTPOST_TENANT_URL,
    signingKeys,
    tls,
    identity: { kind: "service", principal: "gateway" },
  });
  let lastLookupWarnAt = -Infinity;
  const authenticator = new Authenticator({
    adminToken: config.OUTPOST_ADMIN_TOKEN,
    cacheTtlMs: config.OUTPOST_AUTH_CACHE_TTL_MS,
    // The tenant service unreachable, or refusing the gateway itself (clock skew, a signing key
    // it does not trust): callers get UNAVAILABLE; the operator needs to know why.
    onLookupFailure(err) {
      const now = performance.now();
      if (now - lastLookupWarnAt < 60_000) return;
      lastLookupWarnAt = now;
      logger.warn({ err: err instanceof Error ? err.message : String(err) }, "API key lookups are failing: calls get UNAVAILABLE AUTH_UNAVAILABLE (logged at most once a minute)");
    },
    async lookup(apiKey) {
      const res = await tenantInternal.authenticateApiKey({ apiKey }, { timeoutMs: AUTH_CALL_TIMEOUT_MS });
      const limits = res.limits;
      return {
        tenantId: res.tenant?.id ?? "",
        apiKeyId: res.apiKeyId,
        rateLimits: limits && { create: limits.createPerMinute, trigger: limits.triggerPerMinute, read: limits.readPerMinute },
      };
    },
  });

  const openStreams = new OpenStreams({ authenticator, recheckMs: config.OUTPOST_GATEWAY_STREAM_RECHECK_MS, logger });

  const redis = config.OUTPOST_REDIS_URL ? connectRedis(config.OUTPOST_REDIS_URL, logger) : undefined;
  const subscriber = redis && subscribeToInvalidations(redis, authenticator, logger);

  const mode = rateLimitModeOf(config);
  let counter: RateCounter | undefined;
  if (mode === "redis") {
    if (!redis) throw new Error("OUTPOST_RATE_LIMIT=redis needs OUTPOST_REDIS_URL");
    counter = new RedisRateCounter(redis, logger);
  } else if (mode === "memory") counter = new MemoryRateCounter();
  const rateLimits =
    counter &&
    new RateLimitPolicy({
      counter,
      defaults: config.OUTPOST_RATE_LIMITS,
      perIp: config.OUTPOST_RATE_LIMITS_PER_IP,
      allow: config.OUTPOST_RATE_LIMIT_ALLOW,
    });
  logger.info({ rateLimit: mode, allow: config.OUTPOST_RATE_LIMIT_ALLOW }, "rate limits");

  // Forwarded calls are signed per call with the caller's identity, so the transports carry none.
  const upstreamUrls: Record<Upstream, string> = {
    tenant: config.OUTPOST_TENANT_URL,
    dispatcher: config.OUTPOST_DISPATCHER_URL,
    telemetry: config.OUTPOST_TELEMETRY_URL,
  };
  const transports = Object.fromEntries(
    Object.entries(upstreamUrls).map(([name, baseUrl]) => [name, internalTransport({ baseUrl, signingKeys, tls })]),
  ) as Record<Upstream, ReturnType<typeof internalTransport>>;

  const servedServices = [...PUBLIC_SERVICES.map((p) => p.service), Health, ServerReflection, ServerReflectionV1Alpha];
  const reflection = new ReflectionIndex(servedServices);

  const cors = corsHandler(config.OUTPOST_CORS_ORIGINS);
  // One budget for the bodies every path reads: the raw path's and the platform server's.
  const bodyBudget = edgeBodyBudget(config, logger);
  const rawUnary = rawUnaryForwarder({
    authenticator,
    rateLimits,
    upstreamUrls,
    signingKeys,
    tls,
    readMaxBytes: config.OUTPOST_MAX_REQUEST_BYTES,
    bodyBudget,
    openStreams,
    logger,
    upstreamPing: { intervalMs: config.OUTPOST_GATEWAY_UPSTREAM_PING_INTERVAL_MS, timeoutMs: config.OUTPOST_GATEWAY_UPSTREAM_PING_TIMEOUT_MS },
  });
  const edgeFirst = admitFirst({ authenticator, rateLimits, logger }, servedServices);
  const server = await startServer({
    name: "gateway",
    host: config.OUTPOST_GATEWAY_HOST,
    port: config.OUTPOST_GATEWAY_PORT,
    logger,
    signingKeys: undefined,
    tls: publicTls,
    interceptors: [edgeInterceptor({ authenticator, rateLimits, logger })],
    readMaxBytes: config.OUTPOST_MAX_REQUEST_BYTES,
    bodyBudget,
    maxStreamsPerConnection: config.OUTPOST_GATEWAY_MAX_STREAMS_PER_CONNECTION,
    metricsPort: config.OUTPOST_GATEWAY_METRICS_PORT,
    contextValues(req, values) {
      values.set(clientIpKey, clientIpOf(req));
      values.set(admittedKey, edgeFirst.admissionOf(req));
    },
    httpHandler(req, res, calls) {
      boundQuotedHeaders(req);
      if (cors(req, res)) return true;
      if (rawUnary.handle(req, res, calls)) return true;
      closeIfBodyUnread(req, res);
      reclassifyDecodeErrors(req, res);
      // What Connect takes: the edge decision first, on the headers (a refused body is never read).
      return edgeFirst.admit(req, res);
    },
    routes(router) {
      for (const { service, upstream } of PUBLIC_SERVICES) registerForwarding(router, service, transports[upstream], signingKeys, openStreams);
      registerReflection(router, reflection);
    },
  });
  return {
    url: server.url,
    port: server.port,
    async close() {
      await server.close();
      rawUnary.close();
      openStreams.close();
      bodyBudget.close();
      await rateLimits?.close();
      subscriber?.disconnect();
      redis?.disconnect();
    },
  };
}

/**
 * Revocations and suspensions published by the tenant service drop the matching cached keys
 * at once on every replica (contract E). Messages sent while this connection was down are
 * lost, so after a reconnect the whole cache is dropped.
 */
function subscribeToInvalidations(redis: Redis, authenticator: Authenticator, logger: Logger): Redis {
  const subscriber = subscriberOf(redis);
  let subscribedOnce = false;
  subscriber.on("message", (channel: string, message: string) => {
    if (channel === AUTH_INVALIDATE_CHANNEL) authenticator.invalidate(message);
  });
  subscriber.on("ready", () => {
    if (subscribedOnce) {
      authenticator.invalidateAll();
      logger.info("auth invalidation channel reconnected; cached keys dropped");
    }
  });
  subscriber.on("error", () => {
    // connectRedis' main connection logs Redis outages; this one only reconnects.
  });
  subscriber.subscribe(AUTH_INVALIDATE_CHANNEL).then(
    () => (subscribedOnce = true),
    (err: Error) => logger.warn({ err: err.message }, "cannot subscribe to auth invalidations yet; will retry on reconnect"),
  );
  return subscriber;
}

/** CORS (SPEC G1): answers preflights before Connect and adds the headers to cross-origin calls. */
function corsHandler(policy: CorsPolicy) {
  return (req: http.IncomingMessage | http2.Http2ServerRequest, res: http.ServerResponse | http2.Http2ServerResponse): boolean => {
    const origin = req.headers["origin"];
    const requestMethod = req.headers["access-control-request-method"];
    const answer = corsAnswer(policy, req.method ?? "", typeof origin === "string" ? origin : undefined, typeof requestMethod === "string" ? requestMethod : undefined);
    if (answer.kind === "none") return false;
    if (answer.kind === "preflight") {
      (res as http.ServerResponse).writeHead(answer.status, answer.headers);
      res.end();
      return true;
    }
    for (const [name, value] of Object.entries(answer.headers)) res.setHeader(name, value);
    return false;
  };
}

/**
 * An HTTP/1.1 request refused before its body was read to the end (over the size limit) leaves
 * the connection unusable for another request: tell the client not to reuse it, otherwise its
 * next call on that socket fails with ECONNRESET.
 */
function closeIfBodyUnread(req: http.IncomingMessage | http2.Http2ServerRequest, res: http.ServerResponse | http2.Http2ServerResponse): void {
  if (req.httpVersionMajor !== 1) return;
  const h1 = res as http.ServerResponse;
  const writeHead = h1.writeHead;
  h1.writeHead = function (this: http.ServerResponse, ...args: unknown[]) {
    if (!(req as http.IncomingMessage).complete) this.setHeader("connection", "close");
    return (writeHead as (...a: unknown[]) => http.ServerResponse).apply(this, args);
  } as typeof h1.writeHead;
}
