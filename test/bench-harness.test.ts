/**
 * The benchmark harness as CI runs it: `npm run bench:quick`, i.e. every bench/*.bench.ts in
 * quick mode, so no benchmark can rot unnoticed. Figures are printed, never asserted (they
 * depend on the machine); what is asserted is the output's structure — a table per benchmark
 * with its conditions, every expected row present with a numeric Outpost figure, a baseline
 * and a ratio where the benchmark defines one — that the tools the benchmarks drive are
 * installed (.ci/run installs h2load), that nothing was left out with a warning, and that the
 * run leaves no process, container or temporary file behind. Also the harness's bookkeeping
 * (skipped, failed, warnings) on a throw-away directory of benchmarks.
 */
import { spawn } from "node:child_process";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import Docker from "dockerode";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { BENCH_RUN_LABEL, gcTotals } from "../bench/lib/fixtures.ts";
import { hasTool, TOOL_PACKAGES } from "../bench/lib/tools.ts";
import type { BenchResult } from "../bench/lib/types.ts";
import { REPO_ROOT } from "../scripts/lib/mesh.ts";

interface Outcome {
  code: number | null;
  stdout: string;
  stderr: string;
  seconds: number;
}

function runNode(args: string[], env: Record<string, string> = {}): Promise<Outcome> {
  return new Promise((resolve) => {
    const started = Date.now();
    const child = spawn(process.execPath, args, { cwd: REPO_ROOT, env: { ...process.env, ...env } });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.on("exit", (code) => resolve({ code, stdout, stderr, seconds: (Date.now() - started) / 1000 }));
  });
}

const runBench = (args: string[]) => runNode(["--disable-warning=ExperimentalWarning", "bench/run.ts", ...args]);

const TABLE_ROW = /^\| (.+?) +\| +([\d.]+|-) \| +([\d.]+|-) \| +([\d.]+|-) \| (.+?) +\| (\S+) +\|$/;

const BENCHES = readdirSync(path.join(REPO_ROOT, "bench"))
  .filter((f) => f.endsWith(".bench.ts"))
  .map((f) => f.replace(/\.bench\.ts$/, ""))
  .sort();

/**
 * Every row each benchmark prints in quick mode, in order: "ratio" rows carry a baseline and a
 * ratio, "figure" rows only Outpost's figure. A row a benchmark drops (as edge-unary once
 * dropped its gRPC rows without h2load) fails here; a new benchmark lists its rows here.
 */
const ROWS: Record<string, [RegExp, "ratio" | "figure"][]> = {
  checkout: ["git://", "http"].flatMap((transport) =>
    ["guarded", "guard off"].map((mode): [RegExp, "ratio"] => [new RegExp(`^checkout over ${transport}, ${mode} vs bare git clone \\(lower is better\\)$`), "ratio"]),
  ),
  dispatch: [
    [/^dispatch creates\/s through the gateway \(vs bare store inserts\/s\)$/, "ratio"],
    [/^enqueue-to-lease p50$/, "figure"],
    [/^enqueue-to-lease (p99|max of \d+)$/, "figure"],
    [/^cancel-to-container-stopped (p95|max of \d+)$/, "figure"],
  ],
  edge: [
    ...["gateway limiter=redis vs limiter=off", "gateway limiter=memory vs limiter=off", "gateway \\(limiter off\\) vs direct to dispatcher", "gateway limiter=redis vs bare echo server", "direct to dispatcher vs bare echo server"].map(
      (m): [RegExp, "ratio"] => [new RegExp(`^throughput, ${m}$`), "ratio"],
    ),
    ...["p50", "p99"].flatMap((p) =>
      ["gateway-redis", "gateway-memory", "gateway-off", "dispatcher"].map((t): [RegExp, "ratio"] => [new RegExp(`^${p} latency at saturation, ${t} vs bare echo \\(lower is better\\)$`), "ratio"]),
    ),
  ],
  "edge-unary": [
    ...["gRPC \\(h2load\\)", "Connect JSON HTTP/1\\.1 \\(autocannon; half load h2load --h1\\)"].flatMap((protocol) =>
      ["throughput", "p50 at saturation", "p50 at half load", "p99 at half load"].map((m): [RegExp, "ratio"] => [new RegExp(`^${protocol} ${m}$`), "ratio"]),
    ),
    ...["gateway", "dispatcher"].flatMap((service): [RegExp, "figure"][] => [
      [new RegExp(`^${service}: full collections per 10k calls \\(Connect JSON, half load\\)$`), "figure"],
      [new RegExp(`^${service}: GC pause per 1k calls \\(Connect JSON, half load\\)$`), "figure"],
    ]),
  ],
  liveness: [
    [/^liveness p50$/, "ratio"],
    [/^liveness p99$/, "ratio"],
  ],
  logs: [
    [/^lines\/s container -> subscriber$/, "ratio"],
    [/^line latency p50 \(executor read -> subscriber\)$/, "figure"],
    [/^line latency p99 \(executor read -> subscriber\)$/, "figure"],
    [/^telemetry RSS with \d+ subscribers \(baseline: idle\)$/, "ratio"],
    [/^memory per subscriber$/, "figure"],
  ],
  tls: [
    ...["internal-tls", "all-tls"].map((v): [RegExp, "ratio"] => [new RegExp(`^throughput, ${v} vs all h2c$`), "ratio"]),
    ...["p50", "p99"].flatMap((p) => ["internal-tls", "all-tls"].map((v): [RegExp, "ratio"] => [new RegExp(`^${p} latency at saturation, ${v} vs all h2c \\(lower is better\\)$`), "ratio"])),
  ],
  "start-latency": ["cold", "warm"].flatMap((series) =>
    ["p50", "(p95|max of \\d+)"].map((p): [RegExp, "ratio"] => [new RegExp(`^CreateDispatch -> first log line, ${series}, ${p} \\(lower is better\\)$`), "ratio"]),
  ),
};

/** Processes still running with this bench run's id in their environment (every process a benchmark starts inherits it). */
function processesOfRun(runId: string): string[] {
  const needle = `\0OUTPOST_BENCH_RUN_ID=${runId}\0`;
  const found: string[] = [];
  for (const pid of readdirSync("/proc").filter((d) => /^\d+$/.test(d))) {
    try {
      if (`\0${readFileSync(`/proc/${pid}/environ`, "latin1")}\0`.includes(needle)) {
        found.push(`${pid}: ${readFileSync(`/proc/${pid}/cmdline`, "latin1").replaceAll("\0", " ").trim()}`);
      }
    } catch {
      // gone meanwhile, or not ours to read
    }
  }
  return found;
}

/** Containers of this bench run: its executors' (ids bench-<run>-<n>) and its bare baselines' (labelled). */
async function containersOfRun(runId: string): Promise<string[]> {
  const all = await new Docker().listContainers({ all: true });
  return all
    .filter((c) => c.Labels[BENCH_RUN_LABEL] === runId || c.Labels["dev.outpost.executor-id"]?.startsWith(`bench-${runId}-`))
    .map((c) => `${c.Id.slice(0, 12)} ${c.Image} ${c.State}`);
}

describe("npm run bench:quick: every benchmark in quick mode", () => {
  const runId = `t${Date.now().toString(36)}`;
  const work = mkdtempSync(path.join(os.tmpdir(), "outpost-bench-test-"));
  // The benchmarks' temporary directories go here (os.tmpdir() follows TMPDIR), to be found if left behind.
  const tmp = path.join(work, "tmp");
  const json = path.join(work, "results.json");
  let out: Outcome;
  let saved: { quick: boolean; runs: number; results: BenchResult[] };

  beforeAll(async () => {
    mkdirSync(tmp);
    // Exactly the npm script (with Node 24 from this process).
    const script = (JSON.parse(readFileSync(path.join(REPO_ROOT, "package.json"), "utf8")) as { scripts: Record<string, string> }).scripts["bench:quick"]!;
    const [node, ...args] = script.split(" ");
    expect(node).toBe("node");
    out = await runNode([...args, "--json", json], { OUTPOST_BENCH_RUN_ID: runId, TMPDIR: tmp });
    // The figures, for whoever reads CI's output (never asserted).
    process.stdout.write(`npm run bench:quick took ${out.seconds.toFixed(0)} s:\n${out.stdout}\n`);
    // Absent when the harness itself crashed: the tests below then fail with its stderr.
    saved = existsSync(json) ? (JSON.parse(readFileSync(json, "utf8")) as typeof saved) : { quick: false, runs: 0, results: [] };
  }, 15 * 60_000);

  afterAll(() => rmSync(work, { recursive: true, force: true }));

  it("finds the tools the benchmarks drive (.ci/run installs them)", () => {
    for (const tool of Object.keys(TOOL_PACKAGES) as (keyof typeof TOOL_PACKAGES)[]) {
      expect(hasTool(tool), `${tool} (Debian package ${TOOL_PACKAGES[tool]}) is not installed`).toBe(true);
    }
  });

  it("runs every bench/*.bench.ts: none skipped, none failed, none with a warning", () => {
    expect(Object.keys(ROWS).sort(), "every benchmark lists its rows in this test").toEqual(BENCHES);
    expect(out.code, out.stderr).toBe(0);
    expect(out.stdout).toMatch(/^# Outpost benchmarks \(quick mode, median of 1 run\)$/m);
    expect(out.stdout).toMatch(/^machine: \d+ cores .*node v\d+.*load average [\d.]+$/m);
    expect(out.stdout).not.toMatch(/^(skipped|failed|warning): /m);
    expect(out.stdout).toContain(`benchmarks: ${BENCHES.length} ran, 0 skipped, 0 failed`);
    expect(saved.quick).toBe(true);
    expect(saved.runs).toBe(1);
    expect(saved.results.map((r) => r.name).sort()).toEqual(BENCHES);
  });

  it.each(BENCHES)("%s: a table with its conditions; a figure in every row, a baseline and a ratio where it defines one", (name) => {
    const section = out.stdout.split(/^(?=## )/m).find((s) => s.startsWith(`## ${name}\n`));
    expect(section, `no table for ${name}`).toBeDefined();
    // The section ends at the blank line after its timing (the last one's summary follows).
    const lines = section!.split("\n\n")[0]!.split("\n");
    expect(lines[1]).toMatch(/^conditions: \S.{20,}/);
    expect(lines[2]).toMatch(/^\| metric +\| outpost \| baseline \| ratio \| goal +\| unit +\|$/);
    expect(lines[3]).toMatch(/^\|(:?-+:?\|)+$/);
    expect(lines.at(-1)).toMatch(/^\([\d.]+ s\)$/);
    const printed = lines.slice(4, -1);
    const expected = ROWS[name]!;
    expect(printed.length, printed.join("\n")).toBe(expected.length);
    const result = saved.results.find((r) => r.name === name);
    expect(result, `${name} missing from the JSON results`).toBeDefined();
    expect(result!.rows.length).toBe(expected.length);
    expect(result!.warnings ?? []).toEqual([]);
    expected.forEach(([metric, kind], i) => {
      const m = TABLE_ROW.exec(printed[i]!);
      expect(m, `not a table row: ${printed[i]}`).not.toBeNull();
      expect(m![1]).toMatch(metric);
      const row = result!.rows[i]!;
      expect(row.metric).toBe(m![1]);
      // Outpost's figure: a number in the table and in the JSON (NaN would be "-" and null).
      expect(m![2], row.metric).not.toBe("-");
      expect(Number.isFinite(row.value) && row.value >= 0, `${row.metric}: ${row.value}`).toBe(true);
      if (kind === "ratio") {
        expect([m![3], m![4]], row.metric).not.toContain("-");
        expect(Number.isFinite(row.baseline) && row.baseline! > 0, `${row.metric}: baseline ${row.baseline}`).toBe(true);
        expect(Number.isFinite(row.ratio) && row.ratio! > 0, `${row.metric}: ratio ${row.ratio}`).toBe(true);
        // With one run, the ratio is the two figures divided (or inverted; edge rounds it).
        const direct = row.value / row.baseline!;
        const closest = Math.min(Math.abs(row.ratio! - direct) / direct, Math.abs(row.ratio! - 1 / direct) * direct);
        expect(closest, `${row.metric}: ratio ${row.ratio} of ${row.value} / ${row.baseline}`).toBeLessThan(0.02);
      } else {
        expect([m![3], m![4]], row.metric).toEqual(["-", "-"]);
        expect(row.baseline).toBeUndefined();
      }
    });
  });

  it("leaves no process, container or temporary file behind", async () => {
    expect(out.stderr).not.toMatch(/left behind/);
    expect(processesOfRun(runId)).toEqual([]);
    expect(await containersOfRun(runId)).toEqual([]);
    expect(readdirSync(tmp)).toEqual([]);
  });
});

describe("bench/run.ts bookkeeping", () => {
  it("skips a benchmark that fails to import, reports one that throws and a warning, and exits non-zero only for a failure", async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "outpost-bench-dir-"));
    try {
      writeFileSync(
        path.join(dir, "a-fine.bench.ts"),
        `export default async (ctx) => ({ name: "fine", conditions: "runs=" + ctx.runs + " quick=" + ctx.quick, rows: [{ metric: "m", value: 3, unit: "x", baseline: 2, ratio: 1.5, goal: "g" }] });\n`,
      );
      writeFileSync(path.join(dir, "b-broken.bench.ts"), `import "./does-not-exist.ts";\nexport default async () => ({});\n`);
      writeFileSync(path.join(dir, "c-throws.bench.ts"), `export default async () => { throw new Error("boom on purpose"); };\n`);
      writeFileSync(
        path.join(dir, "d-warns.bench.ts"),
        `export default async () => ({ name: "warns", conditions: "c", rows: [{ metric: "n", value: 1, unit: "x" }], warnings: ["tool missing"] });\n`,
      );

      const out = await runBench(["--quick", "--dir", dir]);
      expect(out.code).toBe(1);
      expect(out.stdout).toContain("conditions: runs=1 quick=true");
      expect(out.stdout).toMatch(/^\| m +\| +3\.000 \| +2\.000 \| +1\.50 \| g +\| x +\|$/m);
      expect(out.stdout).toMatch(/^skipped: b-broken \(import failed: .+\)$/m);
      expect(out.stdout).toContain("failed: c-throws (boom on purpose)");
      // A warning under its table and again in the summary.
      expect(out.stdout).toMatch(/^\| n +\| +1\.000 \| +- \| +- \| - +\| x +\|\nwarning: tool missing$/m);
      expect(out.stdout).toContain("warning: warns (tool missing)");
      expect(out.stdout).toContain("benchmarks: 2 ran, 1 skipped, 1 failed");

      const unknown = await runBench(["--quick", "--only", "nope"]);
      expect(unknown.code).toBe(2);
      expect(unknown.stderr).toContain("unknown benchmark(s) nope");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("gcTotals (the edge benchmark's GC rows)", () => {
  it("reads a service's /metrics: full collections by count, pauses of every kind summed", async () => {
    // prom-client's default GC histogram, as every service exports it.
    const text = [
      "# TYPE nodejs_gc_duration_seconds histogram",
      'nodejs_gc_duration_seconds_bucket{le="0.001",kind="minor"} 5',
      'nodejs_gc_duration_seconds_sum{kind="minor"} 0.012',
      'nodejs_gc_duration_seconds_count{kind="minor"} 7',
      'nodejs_gc_duration_seconds_sum{kind="major"} 0.03',
      'nodejs_gc_duration_seconds_count{kind="major"} 2',
      'nodejs_gc_duration_seconds_sum{kind="incremental"} 0.005',
      'nodejs_gc_duration_seconds_count{kind="incremental"} 4',
      'outpost_rpc_requests_total{method="x",code="ok",kind="major"} 99',
    ].join("\n");
    const server = http.createServer((req, res) => (req.url === "/metrics" ? res.end(text) : res.writeHead(404).end()));
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    try {
      const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
      const totals = await gcTotals(url);
      expect(totals.full).toBe(2);
      expect(totals.pauseMs).toBeCloseTo(47, 6);
      await expect(gcTotals(`${url}/elsewhere`)).rejects.toThrow(/answered 404/);
    } finally {
      server.close();
    }
  });
});
