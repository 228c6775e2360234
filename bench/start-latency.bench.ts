/**
 * Start latency (issue #5, SPEC E4): time from CreateDispatch (through the gateway, on the real
 * mesh) to the first log line at the client, against a bare `docker run` of the same image
 * (the demo agent, linux/arm64) measured to its first output line in the same run.
 * - cold: the executor creates and starts a container per run;
 * - warm: OUTPOST_WARM_POOL=demo=2, so a run takes a pre-started container and only feeds it
 *   its environment (core/warm-pool.ts).
 * Goals: cold <= 1.25x bare, warm <= 1.0x bare. Samples are sequential so each sees an idle
 * executor; the warm pool gets time to refill between samples. Each run takes a batch of every
 * series in turn (bare, cold on a fresh mesh, warm on a fresh mesh), its p50 and p95 per
 * series; the table shows their medians over the runs. 20 samples per series per run in full
 * mode, so p95 is not just the maximum; quick mode's rows say "max of N" instead.
 */
import { spawn } from "node:child_process";
import { followLogs, type OutpostClients } from "@outpost/cli";
import { BENCH_RUN_LABEL, benchRunId, startBenchMesh } from "./lib/fixtures.ts";
import { requireTools } from "./lib/tools.ts";
import { median, percentile, tailLabel, type BenchResult, type Benchmark } from "./lib/types.ts";

const IMAGE = "outpost/demo-agent:latest";

/** `docker run` (same image, same lock-down flags as Outpost) until its first stdout line. */
function bareDockerRun(): Promise<number> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const child = spawn(
      "docker",
      [
        "run", "--rm", "--platform", "linux/arm64", "--user", "65534:65534", "--read-only", "--tmpfs", "/tmp:rw,size=64m",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--network", "none", "--pids-limit", "256",
        "--memory", "512m", "--cpus", "1", "-e", "OUTPOST_TASK=bench", "--label", `${BENCH_RUN_LABEL}=${benchRunId()}`, IMAGE,
      ],
      { stdio: ["ignore", "pipe", "ignore"] },
    );
    let firstLine: number | undefined;
    child.stdout!.on("data", (data: Buffer) => {
      if (firstLine === undefined && data.includes(10)) firstLine = performance.now() - started;
    });
    child.once("error", reject);
    child.once("exit", (code) => (firstLine !== undefined ? resolve(firstLine) : reject(new Error(`docker run exited ${code} without output`))));
  });
}

/** CreateDispatch to the first chunk at the client; resolves once the run has ended. */
async function outpostRun(clients: OutpostClients): Promise<number> {
  const started = performance.now();
  const { dispatch } = await clients.dispatches.createDispatch({ agent: "demo", task: "bench" });
  let firstLine: number | undefined;
  await followLogs(clients.logs, dispatch!.id, () => {
    firstLine ??= performance.now() - started;
  });
  if (firstLine === undefined) throw new Error(`dispatch ${dispatch!.id} printed nothing`);
  return firstLine;
}

async function warmContainers(): Promise<number> {
  return new Promise((resolve) => {
    const child = spawn("docker", ["ps", "-q", "--filter", "label=dev.outpost.warm-agent=demo"], { stdio: ["ignore", "pipe", "ignore"] });
    let out = "";
    child.stdout!.on("data", (d: Buffer) => (out += d.toString()));
    child.once("exit", () => resolve(out.trim() ? out.trim().split("\n").length : 0));
  });
}

async function samples(count: number, fn: () => Promise<number>, between?: () => Promise<void>): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < count; i++) {
    if (between) await between();
    out.push(await fn());
  }
  return out;
}

const startLatencyBench: Benchmark = async (ctx) => {
  requireTools("start-latency", "docker");
  const count = ctx.quick ? 2 : 20;
  const rows: BenchResult["rows"] = [];
  await bareDockerRun(); // the image's layers into the page cache, for every series alike

  const series = async (label: string, env: Record<string, string>) => {
    const bench = await startBenchMesh(undefined, env);
    try {
      const { clients } = await bench.newTenant(`bench-start-${label}`);
      await outpostRun(clients); // the executor learns the agent (and the warm pool its shape)
      const waitForWarm = async () => {
        if (!env.OUTPOST_WARM_POOL) return;
        const deadline = Date.now() + 30_000;
        while ((await warmContainers()) < 1 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
      };
      return await samples(count, () => outpostRun(clients), waitForWarm);
    } finally {
      await bench.stop();
    }
  };
  const perRun: Record<"bare" | "cold" | "warm", { p50: number; p95: number }[]> = { bare: [], cold: [], warm: [] };
  for (let run = 0; run < ctx.runs; run++) {
    const batch = {
      bare: await samples(count, bareDockerRun),
      cold: await series("cold", {}),
      warm: await series("warm", { OUTPOST_WARM_POOL: "demo=2" }),
    };
    for (const [name, values] of Object.entries(batch) as [keyof typeof batch, number[]][]) {
      perRun[name].push({ p50: percentile(values, 50), p95: percentile(values, 95) });
      ctx.log(`run ${run + 1}: ${name === "bare" ? "bare docker run" : `outpost ${name}`} first line (ms): ${values.map((v) => v.toFixed(0)).join(", ")}`);
    }
  }

  for (const [label, goal] of [["cold", "<= 1.25x bare"], ["warm", "<= 1.0x bare"]] as const) {
    for (const p of [50, 95] as const) {
      const pick = (runs: { p50: number; p95: number }[]) => median(runs.map((r) => (p === 50 ? r.p50 : r.p95)));
      const value = pick(perRun[label]);
      const baseline = pick(perRun.bare);
      const name = p === 50 ? "p50" : tailLabel(95, count);
      rows.push({ metric: `CreateDispatch -> first log line, ${label}, ${name} (lower is better)`, value, unit: "ms", baseline, ratio: value / baseline, goal });
    }
  }
  return {
    name: "start-latency",
    conditions:
      `${count} sequential runs per series per run (bare, cold, warm in turn; ${count * ctx.runs} per series in all), percentiles per run, median of ${ctx.runs} run${ctx.runs > 1 ? "s" : ""}; ` +
      `a p95 over fewer than 20 samples is their maximum and named so; ` +
      `demo agent (busybox, linux/arm64 under qemu on this amd64 host); bare = docker CLI 'docker run' with the same lock-down flags, to its first stdout line; Outpost through gateway -> dispatcher -> executor -> telemetry -> SubscribeLogs`,
    rows,
  };
};

export default startLatencyBench;
