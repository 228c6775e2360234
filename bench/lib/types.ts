/**
 * The shape every benchmark follows, so `npm run bench` (bench/run.ts) can run them all and
 * print one table. A benchmark measures Outpost AND its baseline in the same process tree
 * (a bare connect-node echo server, a bare `docker run`, `docker logs -f`, a bare store loop)
 * and reports the ratio; figures are never asserted by tests.
 */
export interface BenchContext {
  /** Quick mode: small counts, for CI to keep the harness working. */
  quick: boolean;
  /** Repetitions to take the median over (several in full mode, 1–2 in quick mode). */
  runs: number;
  log(message: string): void;
}

export interface BenchRow {
  metric: string;
  /** Outpost's figure (median over runs). */
  value: number;
  unit: string;
  /** The baseline measured in the same run, when there is one. */
  baseline?: number;
  /** value / baseline (or the inverse where lower is better, said in `metric`). */
  ratio?: number;
  /** The goal from the issue, e.g. ">= 0.4 of bare". */
  goal?: string;
}

export interface BenchResult {
  name: string;
  /** Conditions: counts, concurrency, protocol, machine notes. */
  conditions: string;
  rows: BenchRow[];
  /**
   * What the benchmark could not measure as designed (a missing tool, a row left out), printed
   * under its table and in the run's summary: never a silent gap.
   */
  warnings?: string[];
}

export type Benchmark = (ctx: BenchContext) => Promise<BenchResult>;

/** Median of a list of numbers (NaN for an empty list). */
export function median(values: number[]): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

/** The p-th percentile (0–100) by nearest rank. */
export function percentile(values: number[], p: number): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank]!;
}

/**
 * The name a tail percentile deserves over `n` samples: by nearest rank, p99 differs from the
 * maximum only from 100 samples on (p95 from 20); below that the figure is the maximum and is
 * called so, e.g. "max of 5".
 */
export function tailLabel(p: number, n: number): string {
  return Math.ceil((p / 100) * n) < n ? `p${p}` : `max of ${n}`;
}
