/**
 * Per-method request counts, error codes and latencies; process memory from /proc.
 *
 * A request is one call: a unary call, or one log subscription (however many messages it
 * brought, and whether or not it then failed). Calls count in the table when they started in
 * the measured window (after the warm-up, before the nominal end); the others are counted apart
 * (`unmeasured()`), so they still show in the error totals.
 */
import { readFileSync } from "node:fs";
import { Code, ConnectError } from "@connectrpc/connect";
import { percentile, tailLabel } from "../bench/lib/types.ts";

export interface MethodSummary {
  method: string;
  /** Calls started in the measured window. */
  requests: number;
  errors: number;
  errorRate: number;
  /** Error count by gRPC code name (DeadlineExceeded for calls that hit the harness's deadline). */
  errorCodes: Record<string, number>;
  /** Successful calls with a latency (SubscribeLogs: those that received a first message). */
  okSamples: number;
  /** Successful calls' latency by nearest rank (SubscribeLogs: time to the first message); NaN without samples. */
  p50Ms: number;
  p95Ms: number;
  p99Ms: number;
  /** What p95Ms / p99Ms are over okSamples samples: "p95", or "max of 7" when too few for that percentile (tailLabel). */
  p95Label: string;
  p99Label: string;
  /** Failed calls' latency (until the error, or the deadline): median and maximum; NaN without failures. */
  failedP50Ms: number;
  failedMaxMs: number;
  /** Successful calls without a latency: log subscriptions that received nothing before the reader left (queued runs). */
  idle: number;
}

/** Client calls during one window (e.g. one failover), with the errors' gRPC code names. */
export interface FailureWindow {
  requests: number;
  errors: number;
  errorCodes: Record<string, number>;
}

export interface MethodStatsOptions {
  /** Deadline of every call made through time(); one that has not settled by then fails DeadlineExceeded. */
  callTimeoutMs?: number;
}

interface MethodRecord {
  ok: number[];
  failed: number[];
  /** Failures recorded without a latency (fail() without ms). */
  failedUntimed: number;
  codes: Map<string, number>;
  idle: number;
}

/** The error a call gets when it outlives its deadline. */
export function deadlineError(ms: number): ConnectError {
  return new ConnectError(`no answer within ${ms} ms (load harness deadline)`, Code.DeadlineExceeded);
}

export class MethodStats {
  private readonly methods = new Map<string, MethodRecord>();
  private readonly outside: FailureWindow = { requests: 0, errors: 0, errorCodes: {} };
  /** Epoch ms bounds of the measured window: calls starting before `from` or from `until` on are counted apart. */
  private from = Number.NEGATIVE_INFINITY;
  private until = Number.POSITIVE_INFINITY;
  /** Set while a window is open (e.g. one failover), for client-visible error rates. */
  private window: FailureWindow | undefined;
  readonly callTimeoutMs: number | undefined;

  constructor(options: MethodStatsOptions = {}) {
    this.callTimeoutMs = options.callTimeoutMs;
  }

  /** Calls that start in [fromMs, untilMs) (epoch ms) are measured; the others are counted in unmeasured(). */
  setMeasuredWindow(fromMs: number, untilMs: number): void {
    this.from = fromMs;
    this.until = untilMs;
  }

  /**
   * Times one call. `call` gets a signal that fires at the deadline (callTimeoutMs); a call that
   * has not settled by then counts as failed (DeadlineExceeded) even if it ignores the signal.
   */
  async time<T>(method: string, call: (signal: AbortSignal) => Promise<T>): Promise<T | undefined> {
    const startedAt = Date.now();
    const started = performance.now();
    const controller = new AbortController();
    let timer: NodeJS.Timeout | undefined;
    try {
      const pending = call(controller.signal);
      const result =
        this.callTimeoutMs === undefined
          ? await pending
          : await Promise.race([
              pending,
              new Promise<never>((_, reject) => {
                const ms = this.callTimeoutMs!;
                timer = setTimeout(() => {
                  const err = deadlineError(ms);
                  controller.abort(err);
                  reject(err);
                }, ms);
              }),
            ]);
      this.record(method, performance.now() - started, startedAt);
      return result;
    } catch (err) {
      this.fail(method, controller.signal.aborted ? controller.signal.reason : err, performance.now() - started, startedAt);
      return undefined;
    } finally {
      clearTimeout(timer);
    }
  }

  /** A successful call that took `ms` and started at `startedAt` (epoch ms; default: `ms` ago). */
  record(method: string, ms: number, startedAt = Date.now() - ms): void {
    if (this.window) this.window.requests++;
    if (!this.measured(startedAt)) return void this.outside.requests++;
    this.of(method).ok.push(ms);
  }

  /** A successful call without a latency to report (a subscription that received nothing). */
  recordIdle(method: string, startedAt: number): void {
    if (this.window) this.window.requests++;
    if (!this.measured(startedAt)) return void this.outside.requests++;
    this.of(method).idle++;
  }

  /** A failed call; `ms` (until the failure) when known, `startedAt` in epoch ms (default: `ms` ago, or now). */
  fail(method: string, err: unknown, ms?: number, startedAt = Date.now() - (ms ?? 0)): void {
    const code = Code[ConnectError.from(err).code] ?? "Unknown";
    if (this.window) {
      this.window.requests++;
      this.window.errors++;
      this.window.errorCodes[code] = (this.window.errorCodes[code] ?? 0) + 1;
    }
    if (!this.measured(startedAt)) {
      this.outside.requests++;
      this.outside.errors++;
      this.outside.errorCodes[code] = (this.outside.errorCodes[code] ?? 0) + 1;
      return;
    }
    const record = this.of(method);
    record.codes.set(code, (record.codes.get(code) ?? 0) + 1);
    if (ms === undefined) record.failedUntimed++;
    else record.failed.push(ms);
  }

  /** Calls started outside the measured window (warm-up, after the nominal end). */
  unmeasured(): FailureWindow {
    return { ...this.outside, errorCodes: { ...this.outside.errorCodes } };
  }

  openWindow(): void {
    this.window = { requests: 0, errors: 0, errorCodes: {} };
  }

  closeWindow(): FailureWindow & { errorRate: number } {
    const w = this.window ?? { requests: 0, errors: 0, errorCodes: {} };
    this.window = undefined;
    return { ...w, errorRate: w.requests ? w.errors / w.requests : 0 };
  }

  summary(): MethodSummary[] {
    return [...this.methods.keys()].sort().map((method) => {
      const r = this.methods.get(method)!;
      const errorCodes = Object.fromEntries(r.codes);
      const errors = r.failed.length + r.failedUntimed;
      const requests = r.ok.length + r.idle + errors;
      return {
        method,
        requests,
        errors,
        errorRate: requests ? errors / requests : 0,
        errorCodes,
        okSamples: r.ok.length,
        p50Ms: percentile(r.ok, 50),
        p95Ms: percentile(r.ok, 95),
        p99Ms: percentile(r.ok, 99),
        p95Label: tailLabel(95, r.ok.length),
        p99Label: tailLabel(99, r.ok.length),
        failedP50Ms: percentile(r.failed, 50),
        failedMaxMs: r.failed.length ? Math.max(...r.failed) : NaN,
        idle: r.idle,
      };
    });
  }

  private measured(startedAt: number): boolean {
    return startedAt >= this.from && startedAt < this.until;
  }

  private of(method: string): MethodRecord {
    let record = this.methods.get(method);
    if (!record) this.methods.set(method, (record = { ok: [], failed: [], failedUntimed: 0, codes: new Map(), idle: 0 }));
    return record;
  }
}

/** Resident set size of a process in KiB (Linux /proc), undefined when it is gone. */
export function rssKiB(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

/** What formatSummary's columns mean; printed under the table. */
export const SUMMARY_NOTE =
  "ok p50/p95/p99: latency of successful calls by nearest rank (SubscribeLogs: time to its first message); " +
  'a tail figure marked "(max of n)" is the maximum, as n samples are too few for that percentile (p95 needs 20, p99 100). ' +
  "failed p50/max: time until failed calls failed (a call the harness's deadline ended included). " +
  "idle: subscriptions that received nothing before the reader left (counted as requests, without a latency).";

export function formatSummary(rows: MethodSummary[]): string {
  const header = ["method", "requests", "errors", "error rate", "ok p50 ms", "ok p95 ms", "ok p99 ms", "failed p50 ms", "failed max ms", "idle", "error codes"];
  const fmt = (n: number) => (Number.isNaN(n) ? "-" : n.toFixed(1));
  const tail = (value: number, label: string, p: number) => (Number.isNaN(value) || label === `p${p}` ? fmt(value) : `${fmt(value)} (${label})`);
  const cells = rows.map((r) => [
    r.method,
    String(r.requests),
    String(r.errors),
    `${(r.errorRate * 100).toFixed(2)}%`,
    fmt(r.p50Ms),
    tail(r.p95Ms, r.p95Label, 95),
    tail(r.p99Ms, r.p99Label, 99),
    fmt(r.failedP50Ms),
    fmt(r.failedMaxMs),
    String(r.idle),
    Object.entries(r.errorCodes).map(([c, n]) => `${c}=${n}`).join(" ") || "-",
  ]);
  return table(header, cells);
}

export function table(header: string[], rows: string[][]): string {
  const all = [header, ...rows];
  const widths = header.map((_, i) => Math.max(...all.map((r) => r[i]!.length)));
  const line = (r: string[]) => `| ${r.map((c, i) => (i === 0 || i === r.length - 1 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join(" | ")} |`;
  return [line(header), `|${widths.map((w) => "-".repeat(w + 2)).join("|")}|`, ...rows.map(line)].join("\n");
}
