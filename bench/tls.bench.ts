/**
 * The cost of TLS (docs/operations.md, "Internal TLS"): authenticated `GetDispatch` over gRPC
 * (h2load) through the gateway of three meshes run side by side: all h2c; the services talking
 * mutual TLS to each other (the gateway's hop to the dispatcher and its key lookups encrypted);
 * and that plus TLS on the gateway's public port. Throughput at saturation and p50/p99, as
 * ratios to the all-h2c mesh measured in the same run, interleaved.
 *
 *   node --disable-warning=ExperimentalWarning bench/run.ts --only tls     (or: npm run bench)
 */
import { create, toBinary } from "@bufbuild/protobuf";
import { GetDispatchRequestSchema } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { startBenchMesh, type BenchMesh } from "./lib/fixtures.ts";
import { grpcFrame, requireTools, runH2load, type LoadFigures } from "./lib/tools.ts";
import { median, type BenchResult, type BenchRow, type Benchmark } from "./lib/types.ts";

const METHOD_PATH = "/outpost.dispatch.v1.DispatchService/GetDispatch";
const VARIANTS = ["h2c", "internal-tls", "all-tls"] as const;
type Variant = (typeof VARIANTS)[number];

const tlsBench: Benchmark = async (ctx): Promise<BenchResult> => {
  requireTools("tls", "h2load");
  const durationS = ctx.quick ? 1 : 5;
  const clients = 4;
  const streams = 8;
  const meshes = new Map<Variant, BenchMesh>();
  try {
    // No executor: the dispatch stays QUEUED, which is all GetDispatch needs.
    const only = ["tenant", "telemetry", "dispatcher", "gateway"] as const;
    meshes.set("h2c", await startBenchMesh(only));
    meshes.set("internal-tls", await startBenchMesh(only, {}, { tls: "internal" }));
    meshes.set("all-tls", await startBenchMesh(only, {}, { tls: "all" }));
    const targets = new Map<Variant, { url: string; headers: Record<string, string>; body: Buffer }>();
    for (const [variant, bench] of meshes) {
      const tenant = await bench.newTenant(`TLS bench ${variant}`);
      const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "tls benchmark" });
      const dispatchId = dispatch!.id;
      // It answers through the whole path before it is loaded (h2load sees HTTP statuses only).
      const check = await tenant.clients.dispatches.getDispatch({ dispatchId });
      if (check.dispatch?.id !== dispatchId) throw new Error(`${variant}: the gateway answered another dispatch`);
      targets.set(variant, {
        url: bench.mesh.urls.gateway,
        headers: { "content-type": "application/grpc+proto", te: "trailers", authorization: `Bearer ${tenant.apiKey}` },
        body: grpcFrame(toBinary(GetDispatchRequestSchema, create(GetDispatchRequestSchema, { dispatchId }))),
      });
    }
    // Warm each up first (JIT, connections, TLS sessions), unmeasured.
    for (const variant of VARIANTS) {
      const target = targets.get(variant)!;
      await runH2load({ url: `${target.url}${METHOD_PATH}`, body: target.body, headers: target.headers, clients, streams, durationS: 1 });
    }
    const figures = new Map<Variant, LoadFigures[]>();
    for (let run = 0; run < ctx.runs; run++) {
      // Interleaved, so drift of the machine over time hits every variant alike.
      for (const variant of VARIANTS) {
        const target = targets.get(variant)!;
        const f = await runH2load({ url: `${target.url}${METHOD_PATH}`, body: target.body, headers: target.headers, clients, streams, durationS });
        ctx.log(`tls ${variant} run ${run + 1}: ${Math.round(f.rps)} req/s, p50 ${f.p50Ms.toFixed(2)} ms, p99 ${f.p99Ms.toFixed(2)} ms, failed ${f.failed}`);
        if (f.failed > f.requests / 100) throw new Error(`${variant}: ${f.failed} of ${f.requests} requests failed`);
        figures.set(variant, [...(figures.get(variant) ?? []), f]);
      }
    }
    const of = (v: Variant, which: "rps" | "p50Ms" | "p99Ms") => median(figures.get(v)!.map((f) => f[which]));
    const ratio = (a: number, b: number) => Math.round((a / b) * 1000) / 1000;
    const rows: BenchRow[] = [];
    for (const v of ["internal-tls", "all-tls"] as const) {
      rows.push({ metric: `throughput, ${v} vs all h2c`, value: of(v, "rps"), baseline: of("h2c", "rps"), ratio: ratio(of(v, "rps"), of("h2c", "rps")), unit: "req/s" });
    }
    for (const which of ["p50Ms", "p99Ms"] as const) {
      for (const v of ["internal-tls", "all-tls"] as const) {
        rows.push({
          metric: `${which === "p50Ms" ? "p50" : "p99"} latency at saturation, ${v} vs all h2c (lower is better)`,
          value: of(v, which),
          baseline: of("h2c", which),
          ratio: ratio(of(v, which), of("h2c", which)),
          unit: "ms",
        });
      }
    }
    return {
      name: "tls",
      conditions: `GetDispatch over gRPC through the gateway (limiter in memory), h2load ${clients} connections x ${streams} streams, ${durationS} s per mesh per run, ${ctx.runs} run(s), median; three meshes side by side, ECDSA P-256 certificates`,
      rows,
    };
  } finally {
    for (const bench of meshes.values()) await bench.stop();
  }
};

export default tlsBench;
