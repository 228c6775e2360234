/** Per-method request counts, error codes and latency percentiles; process memory from /proc. */
import { readFileSync } from "node:fs";
import { Code, ConnectError } from "@connectrpc/connect";
import { percentile } from "../bench/lib/types.ts";

export interface MethodSummary {
  method: string;
  requests: number;
  errors: number;
  errorRate: number;
  /** Error count by gRPC code name. */
  errorCodes: Record<string, number>;
  p50Ms: number;
  p95Ms: number;
  p99Ms: number;
}

/** Client calls during one window (e.g. one failover), with the errors' gRPC code names. */
export interface FailureWindow {
  requests: number;
  errors: number;
  errorCodes: Record<string, number>;
}

export class MethodStats {
  private readonly latencies = new Map<string, number[]>();
  private readonly errors = new Map<string, Map<string, number>>();
  /** Set while a window is open (e.g. one failover), for client-visible error rates. */
  private window: FailureWindow | undefined;

  async time<T>(method: string, call: () => Promise<T>): Promise<T | undefined> {
    const started = performance.now();
    try {
      const result = await call();
      this.record(method, performance.now() - started);
      return result;
    } catch (err) {
      this.fail(method, err);
      return undefined;
    }
  }

  record(method: string, ms: number): void {
    let list = this.latencies.get(method);
    if (!list) this.latencies.set(method, (list = []));
    list.push(ms);
    if (this.window) this.window.requests++;
  }

  fail(method: string, err: unknown): void {
    const code = Code[ConnectError.from(err).code] ?? "Unknown";
    let codes = this.errors.get(method);
    if (!codes) this.errors.set(method, (codes = new Map()));
    codes.set(code, (codes.get(code) ?? 0) + 1);
    if (!this.latencies.has(method)) this.latencies.set(method, []);
    if (this.window) {
      this.window.requests++;
      this.window.errors++;
      this.window.errorCodes[code] = (this.window.errorCodes[code] ?? 0) + 1;
    }
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
    return [...this.latencies.keys()].sort().map((method) => {
      const ok = this.latencies.get(method)!;
      const codes = Object.fromEntries(this.errors.get(method) ?? []);
      const errors = Object.values(codes).reduce((a, b) => a + b, 0);
      const requests = ok.length + errors;
      return { method, requests, errors, errorRate: requests ? errors / requests : 0, errorCodes: codes, p50Ms: percentile(ok, 50), p95Ms: percentile(ok, 95), p99Ms: percentile(ok, 99) };
    });
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

export function formatSummary(rows: MethodSummary[]): string {
  const header = ["method", "requests", "errors", "error rate", "p50 ms", "p95 ms", "p99 ms", "error codes"];
  const fmt = (n: number) => (Number.isNaN(n) ? "-" : n.toFixed(1));
  const cells = rows.map((r) => [
    r.method,
    String(r.requests),
    String(r.errors),
    `${(r.errorRate * 100).toFixed(2)}%`,
    fmt(r.p50Ms),
    fmt(r.p95Ms),
    fmt(r.p99Ms),
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
