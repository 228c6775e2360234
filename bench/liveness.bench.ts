/**
 * Liveness path latency (SPEC D6, issue #7): `GET /healthz` on the gateway, which the platform
 * answers before any middleware, against a bare node:http server answering the same path,
 * both at the same fixed request rate over HTTP/1.1 keep-alive. Goal: p99 under 2 ms.
 */
import { startBenchMesh, startEchoServer } from "./lib/fixtures.ts";
import { runAutocannon, type LoadFigures } from "./lib/tools.ts";
import { median, type BenchResult, type BenchRow, type Benchmark } from "./lib/types.ts";

const liveness: Benchmark = async (ctx): Promise<BenchResult> => {
  const durationS = ctx.quick ? 1 : 5;
  const rate = ctx.quick ? 200 : 1000;
  const connections = 4;
  // The gateway alone: liveness must not depend on any peer being up.
  const bench = await startBenchMesh(["gateway"]);
  const echo = await startEchoServer().catch(async (err: unknown) => {
    await bench.stop();
    throw err;
  });
  try {
    // Warm both up first (JIT, connection set-up), unmeasured.
    await runAutocannon({ url: `${bench.mesh.urls.gateway}/healthz`, connections, durationS: 1, overallRate: rate });
    await runAutocannon({ url: `${echo.h1}/healthz`, connections, durationS: 1, overallRate: rate });
    const outpost: LoadFigures[] = [];
    const bare: LoadFigures[] = [];
    for (let run = 0; run < ctx.runs; run++) {
      outpost.push(await runAutocannon({ url: `${bench.mesh.urls.gateway}/healthz`, connections, durationS, overallRate: rate }));
      bare.push(await runAutocannon({ url: `${echo.h1}/healthz`, connections, durationS, overallRate: rate }));
      ctx.log(`run ${run + 1}: outpost p99 ${outpost.at(-1)!.p99Ms.toFixed(3)} ms, bare p99 ${bare.at(-1)!.p99Ms.toFixed(3)} ms`);
    }
    const row = (metric: string, f: (l: LoadFigures) => number, goal?: string): BenchRow => {
      const value = median(outpost.map(f));
      const baseline = median(bare.map(f));
      return { metric, value, unit: "ms", baseline, ratio: value / baseline, ...(goal ? { goal } : {}) };
    };
    const failed = outpost.reduce((n, l) => n + l.failed, 0);
    return {
      name: "liveness",
      conditions: `GET /healthz, gateway process alone vs bare node:http; ${rate} req/s over ${connections} keep-alive connections for ${durationS}s; failed ${failed}`,
      rows: [row("liveness p50", (l) => l.p50Ms), row("liveness p99", (l) => l.p99Ms, "< 2 ms")],
    };
  } finally {
    await echo.stop();
    await bench.stop();
  }
};

export default liveness;
