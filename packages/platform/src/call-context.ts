/**
 * Per-call context that follows async work: the trace context of the call being served, so
 * logs carry its trace id and outgoing calls continue the same trace. Backed by OpenTelemetry
 * (tracing.ts): the active span in the AsyncLocalStorage context manager is the source of
 * truth; these helpers keep the small W3C-shaped API the services already use.
 */
import { context, trace, TraceFlags, isSpanContextValid } from "@opentelemetry/api";
import { randomBytes } from "node:crypto";

export interface TraceContext {
  traceId: string;
  spanId: string;
}

const TRACEPARENT = /^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$/;

/** Continues the trace of an incoming `traceparent` header, or starts a new one. */
export function traceFromHeader(traceparent: string | null | undefined): TraceContext {
  const match = traceparent ? TRACEPARENT.exec(traceparent) : null;
  const traceId = match && !/^0+$/.test(match[1]!) ? match[1]! : randomBytes(16).toString("hex");
  return { traceId, spanId: randomBytes(8).toString("hex") };
}

export function formatTraceparent(trace: TraceContext): string {
  return `00-${trace.traceId}-${trace.spanId}-01`;
}

/** The active span's ids (the server span of the call being served), if any. */
export function currentTrace(): TraceContext | undefined {
  const span = trace.getSpan(context.active());
  const ctx = span?.spanContext();
  return ctx && isSpanContextValid(ctx) ? { traceId: ctx.traceId, spanId: ctx.spanId } : undefined;
}

/** Runs `fn` with `trace` as the active (remote) span context. */
export function runWithTrace<T>(traceContext: TraceContext, fn: () => T): T {
  const spanContext = { traceId: traceContext.traceId, spanId: traceContext.spanId, traceFlags: TraceFlags.SAMPLED, isRemote: true };
  return context.with(trace.setSpanContext(context.active(), spanContext), fn);
}
