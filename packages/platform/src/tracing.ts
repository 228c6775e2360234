/**
 * OpenTelemetry tracing for every Outpost process (SPEC L4). One tracer provider per process,
 * registered globally with the AsyncLocalStorage context manager (so the active span follows
 * async work) and the W3C trace-context propagator (the `traceparent` header between services
 * and the `TRACEPARENT` variable into containers).
 *
 * Exporters come from the standard variables, read here because the bare SDK (unlike
 * @opentelemetry/sdk-node, which is not installed) does not:
 * - `OTEL_TRACES_EXPORTER`: comma list of `otlp`, `console`, `none`. Unset: `otlp` when an OTLP
 *   endpoint is set, otherwise `none` (spans are still created, so logs and propagation carry
 *   real trace ids, but nothing is sent to a collector that is not there).
 * - `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_HEADERS`:
 *   read by the OTLP/HTTP exporter itself (JSON over HTTP).
 * - `OTEL_SERVICE_NAME` overrides the service name; `OTEL_SDK_DISABLED=true` turns tracing off;
 *   `OTEL_TRACES_SAMPLER` and its argument are read by the SDK.
 */
import {
  context,
  propagation,
  trace,
  SpanKind,
  SpanStatusCode,
  TraceFlags,
  type Context,
  type Span,
  type SpanContext,
} from "@opentelemetry/api";
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { resourceFromAttributes } from "@opentelemetry/resources";
import {
  BatchSpanProcessor,
  ConsoleSpanExporter,
  NodeTracerProvider,
  SimpleSpanProcessor,
  type SpanProcessor,
} from "@opentelemetry/sdk-trace-node";
import { ATTR_SERVICE_NAME } from "@opentelemetry/semantic-conventions";
import { ConfigError } from "./config.ts";
import { observeCallEnd } from "./call-end.ts";

let provider: NodeTracerProvider | undefined;
let initializedFor: string | undefined;

/** Which exporters the environment asks for. Exported for tests. */
export function tracesExportersFromEnv(env: NodeJS.ProcessEnv = process.env): Array<"otlp" | "console"> {
  if ((env.OTEL_SDK_DISABLED ?? "").toLowerCase() === "true") return [];
  const raw = env.OTEL_TRACES_EXPORTER?.trim();
  const names = raw
    ? raw.split(",").map((s) => s.trim().toLowerCase())
    : env.OTEL_EXPORTER_OTLP_ENDPOINT || env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
      ? ["otlp"]
      : [];
  const out: Array<"otlp" | "console"> = [];
  for (const name of names) {
    if (name === "otlp" || name === "console") out.push(name);
    else if (name !== "none" && name !== "") throw new ConfigError(`OTEL_TRACES_EXPORTER: unknown exporter "${name}" (use otlp, console or none)`);
  }
  return out;
}

/**
 * Sets up tracing for this process as `serviceName`. Idempotent: the first call wins (several
 * in-process servers in a test share one provider). Called by `startServer`.
 */
export function initTracing(serviceName: string, env: NodeJS.ProcessEnv = process.env): void {
  if (provider || (env.OTEL_SDK_DISABLED ?? "").toLowerCase() === "true") return;
  const spanProcessors: SpanProcessor[] = tracesExportersFromEnv(env).map((name) =>
    // Batching keeps exporting off the request path; console output is for debugging, unbatched.
    name === "otlp" ? new BatchSpanProcessor(new OTLPTraceExporter(), { scheduledDelayMillis: 500 }) : new SimpleSpanProcessor(new ConsoleSpanExporter()),
  );
  provider = new NodeTracerProvider({
    resource: resourceFromAttributes({ [ATTR_SERVICE_NAME]: env.OTEL_SERVICE_NAME || `outpost-${serviceName}` }),
    spanProcessors,
  });
  provider.register();
  initializedFor = serviceName;
}

/** The service name tracing was set up for, if any. */
export function tracingServiceName(): string | undefined {
  return initializedFor;
}

/** Sends spans still buffered (on shutdown). */
export async function flushTracing(): Promise<void> {
  await provider?.forceFlush().catch(() => undefined);
}

/** Outpost's tracer (a no-op tracer until `initTracing` ran). */
export function tracer() {
  return trace.getTracer("outpost");
}

/** The W3C `traceparent` of the active span, or "" when there is none. */
export function currentTraceparent(): string {
  const carrier: Record<string, string> = {};
  propagation.inject(context.active(), carrier);
  return carrier.traceparent ?? "";
}

/** The context an incoming carrier (headers, or `{ traceparent }`) continues. */
export function contextFromCarrier(carrier: Record<string, string | undefined>, parent: Context = context.active()): Context {
  return propagation.extract(parent, carrier, {
    get: (c, key) => c[key] ?? undefined,
    keys: (c) => Object.keys(c),
  });
}

/** Writes the active trace context into headers (a client call's carrier). */
export function injectTraceHeaders(headers: Headers, ctx: Context = context.active()): void {
  propagation.inject(ctx, headers, { set: (h, key, value) => h.set(key, value) });
}

/** Reads the trace context from request headers. */
export function extractTraceHeaders(headers: Headers): Context {
  return propagation.extract(context.active(), headers, {
    get: (h, key) => h.get(key) ?? undefined,
    keys: (h) => [...h.keys()],
  });
}

export interface SpanOptions {
  kind?: SpanKind;
  attributes?: Record<string, string | number | boolean>;
  /** Parent: a `traceparent` string to continue (e.g. a lease's); default the active span. */
  traceparent?: string;
}

/**
 * Runs `fn` inside a new span (ended when `fn` settles; an error marks it failed). Used for
 * work that is not an RPC, e.g. the executor's span per run, child of the lease's traceparent.
 */
export async function withSpan<T>(name: string, options: SpanOptions, fn: (span: Span) => Promise<T>): Promise<T> {
  const parent = options.traceparent ? contextFromCarrier({ traceparent: options.traceparent }) : context.active();
  const span = tracer().startSpan(name, { kind: options.kind ?? SpanKind.INTERNAL, attributes: options.attributes }, parent);
  try {
    return await context.with(trace.setSpan(parent, span), () => fn(span));
  } catch (err) {
    span.recordException(err as Error);
    span.setStatus({ code: SpanStatusCode.ERROR, message: err instanceof Error ? err.message : String(err) });
    throw err;
  } finally {
    span.end();
  }
}

/** Runs `fn` with `spanContext` as the active (remote, non-recording) parent. */
export function withSpanContext<T>(spanContext: SpanContext, fn: () => T): T {
  return context.with(trace.setSpanContext(context.active(), spanContext), fn);
}

export { SpanKind, SpanStatusCode, TraceFlags, context as otelContext, trace as otelTrace };
export type { Span };

/** Keeps `ctx` active while an async iterable is consumed (generator bodies run in their caller's context otherwise). */
function bindIterable<T>(ctx: Context, source: AsyncIterable<T>): AsyncIterable<T> {
  return {
    [Symbol.asyncIterator]() {
      const it = context.with(ctx, () => source[Symbol.asyncIterator]());
      return {
        next: (...args: [] | [undefined]) => context.with(ctx, () => it.next(...args)),
        return: (value?: unknown) => context.with(ctx, () => it.return?.(value) ?? Promise.resolve({ done: true as const, value: value as T })),
        throw: (err?: unknown) => context.with(ctx, () => it.throw?.(err) ?? Promise.reject(err)),
      };
    },
  };
}

function endSpan(span: Span, err: unknown): void {
  const code = err === undefined ? 0 : err instanceof ConnectError ? err.code : Code.Internal;
  span.setAttribute("rpc.grpc.status_code", code);
  if (err !== undefined) {
    span.setStatus({ code: SpanStatusCode.ERROR, message: err instanceof Error ? err.message : String(err) });
  }
  span.end();
}


function rpcAttributes(service: string, method: string) {
  return { "rpc.system": "grpc", "rpc.service": service, "rpc.method": method };
}

/** The server span of one RPC, child of the caller's `traceparent` in `header` (or a new trace); with its context. */
export function startServerSpan(service: string, method: string, header: Headers): { span: Span; ctx: Context } {
  const parent = extractTraceHeaders(header);
  const span = tracer().startSpan(
    `${service}/${method}`,
    { kind: SpanKind.SERVER, attributes: rpcAttributes(service, method) },
    parent,
  );
  return { span, ctx: trace.setSpan(parent, span) };
}

/**
 * Server span per RPC, continuing the caller's `traceparent` (or starting a trace). The span is
 * active for the whole call, streams included, so logs and downstream calls share its trace.
 */
export function serverTraceInterceptor(): Interceptor {
  return (next) => async (req) => {
    const { span, ctx } = startServerSpan(req.service.typeName, req.method.name, req.header);
    return observeCallEnd(() => context.with(ctx, () => next(req)), {
      onEnd: (err) => endSpan(span, err),
      wrapStream: (messages) => bindIterable(ctx, messages),
    });
  };
}

/** Client span per outgoing call, its context written to the call's `traceparent` header. */
export function clientTraceInterceptor(): Interceptor {
  return (next) => async (req) => {
    const span = tracer().startSpan(`${req.service.typeName}/${req.method.name}`, {
      kind: SpanKind.CLIENT,
      attributes: rpcAttributes(req.service.typeName, req.method.name),
    });
    const ctx = trace.setSpan(context.active(), span);
    req.header.delete("traceparent");
    injectTraceHeaders(req.header, ctx);
    return observeCallEnd(() => context.with(ctx, () => next(req)), {
      onEnd: (err) => endSpan(span, err),
      wrapStream: (messages) => bindIterable(ctx, messages),
    });
  };
}
