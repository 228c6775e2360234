/**
 * `npm run bench` / `npm run bench:quick`: runs every bench/*.bench.ts (each measures Outpost
 * and its baseline in the same run) and prints one table of ratios per benchmark, with the
 * medians over several runs and the machine's conditions.
 *
 *   node bench/run.ts [--quick] [--runs N] [--only name,name] [--json results.json] [--dir other/benches]
 *
 * A benchmark file that fails to import is skipped and named; one that throws is reported
 * as failed and makes the exit code 1; what a benchmark could not measure as designed (e.g. a
 * missing tool) is printed as a warning under its table and again in the summary.
 */
import { randomBytes } from "node:crypto";
import { readdirSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { formatMachine, formatTable, machineConditions } from "./lib/report.ts";
import type { BenchResult, Benchmark } from "./lib/types.ts";

const { values } = parseArgs({
  options: {
    /** Another directory of *.bench.ts files (the harness test uses it). */
    dir: { type: "string" },
    quick: { type: "boolean", default: false },
    runs: { type: "string" },
    only: { type: "string" },
    json: { type: "string" },
  },
});
const BENCH_DIR = path.resolve(values.dir ?? path.dirname(fileURLToPath(import.meta.url)));
const quick = values.quick ?? false;
const runs = values.runs ? Number(values.runs) : quick ? 1 : 3;
if (!Number.isInteger(runs) || runs < 1) {
  process.stderr.write("bench: --runs must be a positive integer\n");
  process.exit(2);
}
const only = values.only ? new Set(values.only.split(",").map((s) => s.trim()).filter(Boolean)) : undefined;

const files = readdirSync(BENCH_DIR)
  .filter((f) => f.endsWith(".bench.ts"))
  .sort();
const names = files.map((f) => f.replace(/\.bench\.ts$/, ""));
if (only) {
  const unknown = [...only].filter((n) => !names.includes(n));
  if (unknown.length) {
    process.stderr.write(`bench: unknown benchmark(s) ${unknown.join(", ")}; known: ${names.join(", ")}\n`);
    process.exit(2);
  }
}

// Inherited by every process the benchmarks start and carried by their containers' labels
// (bench/lib/fixtures.ts, benchRunId), so anything a run leaves behind can be traced to it.
process.env.OUTPOST_BENCH_RUN_ID ||= randomBytes(6).toString("hex");
process.stderr.write(`bench: run id ${process.env.OUTPOST_BENCH_RUN_ID}\n`);

const machine = machineConditions();
process.stdout.write(`# Outpost benchmarks (${quick ? "quick" : "full"} mode, median of ${runs} run${runs > 1 ? "s" : ""})\n`);
process.stdout.write(`${formatMachine(machine)}\n\n`);

const results: BenchResult[] = [];
const skipped: { name: string; reason: string }[] = [];
const failed: { name: string; reason: string }[] = [];
for (const [i, file] of files.entries()) {
  const name = names[i]!;
  if (only && !only.has(name)) continue;
  let bench: Benchmark;
  try {
    const mod = (await import(pathToFileURL(path.join(BENCH_DIR, file)).href)) as { default?: unknown };
    if (typeof mod.default !== "function") throw new Error("has no default export of type Benchmark");
    bench = mod.default as Benchmark;
  } catch (err) {
    skipped.push({ name, reason: `import failed: ${(err as Error).message.split("\n")[0]}` });
    process.stderr.write(`bench: skipping ${file}: ${(err as Error).message}\n`);
    continue;
  }
  const started = Date.now();
  process.stderr.write(`bench: running ${name}…\n`);
  try {
    const result = await bench({ quick, runs, log: (m) => process.stderr.write(`  [${name}] ${m}\n`) });
    results.push(result);
    for (const w of result.warnings ?? []) process.stderr.write(`bench: ${name}: warning: ${w}\n`);
    process.stdout.write(`${formatTable(result)}\n(${((Date.now() - started) / 1000).toFixed(1)} s)\n\n`);
  } catch (err) {
    failed.push({ name, reason: (err as Error).message.split("\n")[0] ?? String(err) });
    process.stderr.write(`bench: ${name} failed: ${(err as Error).stack ?? String(err)}\n`);
  }
}

for (const s of skipped) process.stdout.write(`skipped: ${s.name} (${s.reason})\n`);
for (const f of failed) process.stdout.write(`failed: ${f.name} (${f.reason})\n`);
for (const r of results) for (const w of r.warnings ?? []) process.stdout.write(`warning: ${r.name} (${w})\n`);
process.stdout.write(`benchmarks: ${results.length} ran, ${skipped.length} skipped, ${failed.length} failed\n`);
if (values.json) writeFileSync(values.json, `${JSON.stringify({ quick, runs, machine, results, skipped, failed }, null, 2)}\n`);
process.exit(failed.length ? 1 : 0);
