/**
 * Start latency (issue #5, SPEC E4): time from CreateDispatch (through the gateway, on the real
 * mesh) to the first log line at the client, against a bare `docker run` of the same image
 * (the demo agent, linux/arm64) measured to its first output line in the same run.
 * - cold: the executor creates and starts a container per run;
 * - warm: OUTPOST_WARM_POOL=demo=2, so a run takes a pre-started container and only feeds it
 *   its environment (core/warm-pool.ts).
 * Goals: cold <= 1.25x bare, warm <= 1.0x bare. Runs are sequential so each sample sees an idle
 * executor; the warm pool gets time to refill between samples.
 */
import { spawn } from "node:child_process";
import { followLogs, type OutpostClients } from "@outpost/cli";
import { startBenchMesh } from "./lib/fixtures.ts";
import { percentile, type BenchResult, type Benchmark } from "./lib/types.ts";

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
        "--memory", "512m", "--cpus", "1", "-e", "OUTPOST_TASK=bench", IMAGE,
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
  const count = ctx.quick ? 2 : 10;
  const rows: BenchResult["rows"] = [];
  await bareDockerRun(); // the image's layers into the page cache, for every series alike
  const bare = await samples(count, bareDockerRun);
  ctx.log(`bare docker run first line (ms): ${bare.map((s) => s.toFixed(0)).join(", ")}`);

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
      const values = await samples(count, () => outpostRun(clients), waitForWarm);
      ctx.log(`outpost ${label} first line (ms): ${values.map((s) => s.toFixed(0)).join(", ")}`);
      return values;
    } finally {
      await bench.stop();
    }
  };
  const cold = await series("cold", {});
  const warm = await series("warm", { OUTPOST_WARM_POOL: "demo=2" });

  for (const [label, values, goal] of [["cold", cold, "<= 1.25x bare"], ["warm", warm, "<= 1.0x bare"]] as const) {
    for (const p of [50, 95]) {
      const value = percentile(values, p);
      const baseline = percentile(bare, p);
      rows.push({ metric: `CreateDispatch -> first log line, ${label}, p${p} (lower is better)`, value, unit: "ms", baseline, ratio: value / baseline, goal });
    }
  }
  return {
    name: "start-latency",
    conditions: `${count} sequential runs per series; demo agent (busybox, linux/arm64 under qemu on this amd64 host); bare = docker CLI 'docker run' with the same lock-down flags, to its first stdout line; Outpost through gateway -> dispatcher -> executor -> telemetry -> SubscribeLogs`,
    rows,
  };
};

export default startLatencyBench;
