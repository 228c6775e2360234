/**
 * Prometheus metrics for every Outpost process (SPEC L4), through prom-client's default
 * registry: one registry per process, scraped at GET /metrics (served by `startServer` before
 * Connect, like /healthz). The platform records RPCs by method and code with latency; services
 * register their domain metrics with the helpers below. Helpers are idempotent by name, because
 * in-process tests start several servers (and services) in one process.
 *
 * Labels stay low-cardinality: never a tenant id, dispatch id or key.
 */
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import client from "prom-client";
import { observeCallEnd } from "./call-end.ts";

/** Path of the Prometheus text exposition. */
export const METRICS_PATH = "/metrics";

export const metricsRegistry = client.register;

let defaultsCollected = false;

/** Process metrics (CPU, memory, event-loop lag, GC) once per process, labelled with the service. */
export function initMetrics(serviceName: string): void {
  if (defaultsCollected) return;
  defaultsCollected = true;
  metricsRegistry.setDefaultLabels({ service: serviceName });
  client.collectDefaultMetrics({ register: metricsRegistry });
  // Declared up front so dashboards find them (at zero) before the first rejection.
  rpcMetrics.requests();
  rpcMetrics.duration();
  rateLimitRejections();
}

/** The exposition text and its content type. */
export async function metricsText(): Promise<{ contentType: string; body: string }> {
  return { contentType: metricsRegistry.contentType, body: await metricsRegistry.metrics() };
}

function existing<T>(name: string): T | undefined {
  return metricsRegistry.getSingleMetric(name) as T | undefined;
}

export function counter<L extends string>(name: string, help: string, labelNames: readonly L[] = []): client.Counter<L> {
  return existing<client.Counter<L>>(name) ?? new client.Counter({ name, help, labelNames, registers: [metricsRegistry] });
}

/**
 * A gauge; with `collect`, its value is read at scrape time (e.g. queue depth from the store),
 * so nothing has to keep it in step. `collect` may be async.
 */
export function gauge<L extends string>(
  name: string,
  help: string,
  labelNames: readonly L[] = [],
  collect?: (g: client.Gauge<L>) => void | Promise<void>,
): client.Gauge<L> {
  const found = existing<client.Gauge<L>>(name);
  if (found) return found;
  return new client.Gauge({
    name,
    help,
    labelNames,
    registers: [metricsRegistry],
    ...(collect ? { async collect(this: client.Gauge<L>) { await collect(this); } } : {}),
  });
}

export function histogram<L extends string>(name: string, help: string, labelNames: readonly L[], buckets: number[]): client.Histogram<L> {
  return existing<client.Histogram<L>>(name) ?? new client.Histogram({ name, help, labelNames, buckets, registers: [metricsRegistry] });
}

/** RPC latency buckets in seconds: from sub-millisecond loopback calls to minute-long streams. */
const RPC_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300];

export const rpcMetrics = {
  requests: () => counter("outpost_rpc_requests_total", "RPCs served, by method and status code.", ["method", "code"]),
  duration: () =>
    histogram("outpost_rpc_duration_seconds", "Time to serve an RPC (streams: until their last message), by method and code.", ["method", "code"], RPC_BUCKETS),
};

/** Requests refused by a rate limit (the gateway increments it; `limit` names the limit, e.g. "tenant_rps"). */
export function rateLimitRejections(): client.Counter<"limit"> {
  return counter("outpost_rate_limit_rejections_total", "Requests refused with RESOURCE_EXHAUSTED by a rate limit, by limit.", ["limit"]);
}

/** Circuit breaker states as a gauge: 0 closed, 1 half-open, 2 open, by circuit name. */
export const CIRCUIT_STATE = { closed: 0, halfOpen: 1, open: 2 } as const;
export type CircuitStateName = keyof typeof CIRCUIT_STATE;

/** gRPC-style code name in snake case, as Prometheus labels usually spell them ("ok", "not_found"). */
function codeLabel(err: unknown): string {
  if (err === undefined) return "ok";
  return rpcCodeLabel(err instanceof ConnectError ? err.code : Code.Internal);
}

/** The `code` label of the RPC metrics for a status code (0 is "ok"). */
export function rpcCodeLabel(code: Code | 0): string {
  if (code === 0) return "ok";
  return (Code[code] ?? "unknown").replace(/([a-z])([A-Z])/g, "$1_$2").toLowerCase();
}

/**
 * Counts every RPC by method and code and observes its duration. Runs outside the error
 * masking, so a crash counts as `internal`. Health checks are counted too (they are RPCs).
 */
export function metricsInterceptor(): Interceptor {
  const requests = rpcMetrics.requests();
  const duration = rpcMetrics.duration();
  return (next) => async (req) => {
    const method = `${req.service.typeName}/${req.method.name}`;
    const end = duration.startTimer({ method });
    const finish = (err?: unknown) => {
      const code = codeLabel(err);
      requests.inc({ method, code });
      end({ code });
    };
    return observeCallEnd(() => next(req), { onEnd: finish });
  };
}
