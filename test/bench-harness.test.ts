/**
 * The benchmark harness (bench/run.ts) in quick mode, as CI runs it: it must keep importing,
 * running and tabulating benchmarks. Figures are printed, never asserted (they depend on the
 * machine); what is asserted is the table's shape and the bookkeeping around it.
 */
import { spawn } from "node:child_process";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { gcTotals } from "../bench/lib/fixtures.ts";
import { REPO_ROOT } from "../scripts/lib/mesh.ts";

interface Outcome {
  code: number | null;
  stdout: string;
  stderr: string;
}

function runBench(args: string[]): Promise<Outcome> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ["--disable-warning=ExperimentalWarning", "bench/run.ts", ...args], { cwd: REPO_ROOT });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.on("exit", (code) => resolve({ code, stdout, stderr }));
  });
}

const TABLE_ROW = /^\| (.+?) +\| +([\d.]+|-) \| +([\d.]+|-) \| +([\d.]+|-) \| (.+?) +\| (\S+) +\|$/;

describe("bench/run.ts --quick", () => {
  it("runs the liveness benchmark against the real gateway and its bare baseline and prints a table of ratios", async () => {
    const json = path.join(mkdtempSync(path.join(os.tmpdir(), "outpost-bench-test-")), "results.json");
    const out = await runBench(["--quick", "--only", "liveness", "--json", json]);
    expect(out.code, out.stderr).toBe(0);
    expect(out.stdout).toMatch(/^machine: \d+ cores .*node v\d+/m);
    expect(out.stdout).toContain("## liveness");
    expect(out.stdout).toMatch(/^\| metric +\| outpost \| baseline \| ratio \| goal +\| unit \|$/m);
    const rows = out.stdout.split("\n").map((l) => TABLE_ROW.exec(l)).filter((m) => m && m[1] !== "metric");
    expect(rows.map((m) => m![1])).toEqual(["liveness p50", "liveness p99"]);
    for (const m of rows) {
      const [value, baseline, ratio] = [Number(m![2]), Number(m![3]), Number(m![4])];
      expect(value).toBeGreaterThan(0);
      expect(baseline).toBeGreaterThan(0);
      // The ratio is the two printed figures divided (within their printed precision).
      expect(Math.abs(ratio - value / baseline) / (value / baseline)).toBeLessThan(0.05);
    }
    expect(out.stdout).toContain("benchmarks: 1 ran, 0 skipped, 0 failed");

    const saved = JSON.parse(readFileSync(json, "utf8")) as { quick: boolean; runs: number; results: { name: string; rows: { metric: string; value: number; baseline: number }[] }[] };
    expect(saved.quick).toBe(true);
    expect(saved.runs).toBe(1);
    expect(saved.results.map((r) => r.name)).toEqual(["liveness"]);
    expect(saved.results[0]!.rows.find((r) => r.metric === "liveness p99")!.value).toBeGreaterThanOrEqual(saved.results[0]!.rows.find((r) => r.metric === "liveness p50")!.value);
  });

  it("skips a benchmark that fails to import, reports one that throws, and exits non-zero only for the latter", async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "outpost-bench-dir-"));
    writeFileSync(
      path.join(dir, "a-fine.bench.ts"),
      `export default async (ctx) => ({ name: "fine", conditions: "runs=" + ctx.runs + " quick=" + ctx.quick, rows: [{ metric: "m", value: 3, unit: "x", baseline: 2, ratio: 1.5, goal: "g" }] });\n`,
    );
    writeFileSync(path.join(dir, "b-broken.bench.ts"), `import "./does-not-exist.ts";\nexport default async () => ({});\n`);
    writeFileSync(path.join(dir, "c-throws.bench.ts"), `export default async () => { throw new Error("boom on purpose"); };\n`);

    const out = await runBench(["--quick", "--dir", dir]);
    expect(out.code).toBe(1);
    expect(out.stdout).toContain("conditions: runs=1 quick=true");
    expect(out.stdout).toMatch(/^\| m +\| +3\.000 \| +2\.000 \| +1\.50 \| g +\| x +\|$/m);
    expect(out.stdout).toMatch(/^skipped: b-broken \(import failed: .+\)$/m);
    expect(out.stdout).toContain("failed: c-throws (boom on purpose)");
    expect(out.stdout).toContain("benchmarks: 1 ran, 1 skipped, 1 failed");

    const unknown = await runBench(["--quick", "--only", "nope"]);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toContain("unknown benchmark(s) nope");
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
