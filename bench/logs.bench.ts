/**
 * Log streaming (SPEC L1-L2, issue 6), on the real mesh and the real Docker engine:
 * 1. Throughput: lines per second from a container to a SubscribeLogs subscriber (through the
 *    gateway), against `docker logs -f` on the same container at the same time. Both clocks
 *    start at the first numbered line either of them received, so a consumer that attached
 *    late cannot look faster by catching up on a backlog. Goal: at least 0.8 of docker logs.
 * 2. End-to-end line latency at a paced rate: the executor stamps each line when it reads it
 *    from the container (LogChunk.time); the subscriber notes when it receives it (same
 *    machine, same clock). The demo agent paces itself with `interval=` and `burst=`; the rate
 *    it reached is reported (arm64 under qemu forks slowly). Goal: p99 under 10 ms.
 * 3. Memory: telemetry's resident set with 1,000 concurrent subscribers on one live run,
 *    against the same process idle (the baseline), and per subscriber.
 */
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import Docker from "dockerode";
import { createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { LogService } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { startBenchMesh, type BenchMesh } from "./lib/fixtures.ts";
import { requireTools } from "./lib/tools.ts";
import { median, percentile, type BenchResult, type Benchmark } from "./lib/types.ts";

const docker = new Docker();
const NUMBERED = /^line (\d+)$/;

async function containerOf(dispatchId: string, timeoutMs = 30_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const found = await docker.listContainers({ all: true, filters: { label: [`dev.outpost.dispatch-id=${dispatchId}`] } });
    if (found[0]) return found[0].Id;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  throw new Error(`no container for ${dispatchId}`);
}

/** `docker logs -f`: arrival time of every numbered line. */
function dockerLogsFollow(containerId: string, lines: number): Promise<number[]> {
  return new Promise((resolve, reject) => {
    const child = spawn("docker", ["logs", "-f", containerId], { stdio: ["ignore", "pipe", "pipe"] });
    const arrivals: number[] = [];
    let tail = "";
    child.stdout.on("data", (data: Buffer) => {
      const now = performance.now();
      const parts = (tail + data.toString("utf8")).split("\n");
      tail = parts.pop()!;
      for (const part of parts) if (NUMBERED.test(part)) arrivals.push(now);
      if (arrivals.length >= lines) child.kill();
    });
    child.once("error", reject);
    child.once("exit", () => resolve(arrivals));
  });
}

/** A subscriber through the gateway: arrival time (performance.now) and latency of every numbered line. */
async function subscribe(bench: BenchMesh, clients: Awaited<ReturnType<BenchMesh["newTenant"]>>["clients"], dispatchId: string) {
  void bench;
  const arrivals: number[] = [];
  const latencies: number[] = [];
  for await (const msg of clients.logs.subscribeLogs({ dispatchId })) {
    const now = performance.now();
    const wall = Date.now();
    for (const chunk of msg.chunks) {
      if (!NUMBERED.test(chunk.text)) continue;
      arrivals.push(now);
      if (chunk.time) latencies.push(wall - Number(timestampMs(chunk.time)));
    }
  }
  return { arrivals, latencies };
}

function rssBytes(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)![1]) * 1024;
}

const logs: Benchmark = async (ctx): Promise<BenchResult> => {
  const lines = ctx.quick ? 2_000 : 20_000;
  const pacedLines = ctx.quick ? 300 : 2_000;
  const subscribers = ctx.quick ? 100 : 1_000;
  requireTools("logs", "docker");
  await docker.ping();
  // Rate limits off: 1,000 subscriptions open at once by design here.
  const bench = await startBenchMesh(undefined, { OUTPOST_LEASE_TTL_MS: "10000", OUTPOST_RATE_LIMIT: "off" });
  try {
    const tenant = await bench.newTenant("bench-logs");
    const ratios: number[] = [];
    const outpostRates: number[] = [];
    const dockerRates: number[] = [];
    for (let run = 0; run < ctx.runs; run++) {
      const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: `lines=${lines}` });
      const id = dispatch!.id;
      const ours = subscribe(bench, tenant.clients, id);
      // The agent sleeps 0.6 s before printing: docker logs attaches before the first line.
      const theirs = dockerLogsFollow(await containerOf(id), lines);
      const [o, d] = await Promise.all([ours, theirs]);
      if (o.arrivals.length !== lines || d.length !== lines) throw new Error(`lines: outpost ${o.arrivals.length}, docker ${d.length}, want ${lines}`);
      const start = Math.min(o.arrivals[0]!, d[0]!);
      const outpostRate = lines / ((o.arrivals.at(-1)! - start) / 1000);
      const dockerRate = lines / ((d.at(-1)! - start) / 1000);
      outpostRates.push(outpostRate);
      dockerRates.push(dockerRate);
      ratios.push(outpostRate / dockerRate);
      ctx.log(`run ${run + 1}: outpost ${outpostRate.toFixed(0)} lines/s, docker logs -f ${dockerRate.toFixed(0)} lines/s`);
    }

    // Paced runs for latency at about 1,000 lines/s: a 10 ms pause after every `burst` lines (a
    // pause per line cannot go below ~50 ms under qemu, where every `sleep` is a slow fork, whose
    // cost varies by machine). A run that falls short of 900 lines/s is repeated with bursts
    // scaled up to the rate it missed by, at most twice; then runs at that burst size until there
    // are `ctx.runs` of them. A burst is read at once, so one run is only ~80 latency samples
    // that count: its p99 is one or two bursts, hence the median over runs.
    const pacedRun = async (burst: number) => {
      const { dispatch } = await tenant.clients.dispatches.createDispatch({
        agent: "demo",
        task: `lines=${pacedLines} interval=0.01 burst=${burst}`,
      });
      const result = await subscribe(bench, tenant.clients, dispatch!.id);
      const rate = pacedLines / ((result.arrivals.at(-1)! - result.arrivals[0]!) / 1000);
      return { rate, p50: percentile(result.latencies, 50), p99: percentile(result.latencies, 99) };
    };
    let burst = 20;
    const paced: Array<Awaited<ReturnType<typeof pacedRun>>> = [];
    for (let attempt = 0; attempt < 3; attempt++) {
      const run = await pacedRun(burst);
      ctx.log(`paced, bursts of ${burst}: ${run.rate.toFixed(0)} lines/s`);
      if (run.rate >= 900 || attempt === 2) {
        paced.push(run);
        break;
      }
      burst = Math.ceil((burst * 1000) / run.rate);
    }
    while (paced.length < ctx.runs) paced.push(await pacedRun(burst));
    const pacedRate = median(paced.map((r) => r.rate));
    const p50 = median(paced.map((r) => r.p50));
    const p99 = median(paced.map((r) => r.p99));
    const p99s = paced.map((r) => r.p99).join(", ");
    ctx.log(`paced: ${pacedRate.toFixed(0)} lines/s, latency p50 ${p50} ms p99 ${p99} ms (p99 per run: ${p99s})`);

    // Memory: many subscribers on one live run, through the gateway over 10 HTTP/2 connections.
    const telemetryPid = bench.mesh.processes.get("telemetry")!.pid!;
    const { dispatch: live } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "lines=100 sleep=30" });
    const liveId = live!.id;
    await containerOf(liveId);
    await new Promise((resolve) => setTimeout(resolve, 2000));
    globalThis.gc?.();
    const idle = rssBytes(telemetryPid);
    const controller = new AbortController();
    const auth: Interceptor = (next) => (req) => {
      req.header.set("authorization", `Bearer ${tenant.apiKey}`);
      return next(req);
    };
    // gRPC over h2c: each transport is one HTTP/2 connection carrying ~100 streams.
    const connections = Array.from({ length: 10 }, () =>
      createClient(LogService, createGrpcTransport({ baseUrl: bench.mesh.urls.gateway, interceptors: [auth] })),
    );
    let opened = 0;
    const streams = Array.from({ length: subscribers }, async (_, i) => {
      try {
        for await (const msg of connections[i % connections.length]!.subscribeLogs({ dispatchId: liveId }, { signal: controller.signal })) {
          if (msg.chunks.length > 0 && msg.chunks[0]!.seq === 1n) opened++;
        }
      } catch {
        // aborted at the end
      }
    });
    const deadline = Date.now() + 20_000;
    while (opened < subscribers && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 100));
    await new Promise((resolve) => setTimeout(resolve, 1000));
    const loaded = rssBytes(telemetryPid);
    controller.abort();
    await Promise.all(streams);
    await tenant.clients.dispatches.cancelDispatch({ dispatchId: liveId }).catch(() => undefined);
    ctx.log(`memory: idle ${(idle / 2 ** 20).toFixed(1)} MiB, ${opened} subscribers ${(loaded / 2 ** 20).toFixed(1)} MiB`);

    return {
      name: "logs",
      conditions:
        `demo agent (linux/arm64 under qemu) printing ${lines} lines; subscriber through the gateway vs docker logs -f on the same container; ` +
        `latency: median of ${paced.length} runs of ${pacedLines} lines paced in bursts of ${burst} every 10 ms (reached ${pacedRate.toFixed(0)} lines/s; p99 per run ${p99s} ms); ` +
        `memory: telemetry RSS with ${opened}/${subscribers} subscribers on one live run through the gateway over 10 HTTP/2 connections`,
      rows: [
        {
          metric: "lines/s container -> subscriber",
          value: median(outpostRates),
          unit: "lines/s",
          baseline: median(dockerRates),
          ratio: median(ratios),
          goal: ">= 0.8 of docker logs -f",
        },
        { metric: "line latency p50 (executor read -> subscriber)", value: p50, unit: "ms" },
        { metric: "line latency p99 (executor read -> subscriber)", value: p99, unit: "ms", goal: "< 10 ms at 1,000 lines/s" },
        {
          metric: `telemetry RSS with ${subscribers} subscribers (baseline: idle)`,
          value: loaded / 2 ** 20,
          unit: "MiB",
          baseline: idle / 2 ** 20,
          ratio: loaded / idle,
        },
        { metric: "memory per subscriber", value: (loaded - idle) / Math.max(1, opened) / 1024, unit: "KiB" },
      ],
    };
  } finally {
    await bench.stop();
  }
};

export default logs;
