/**
 * Edge unary throughput and latency (issue #7): an authenticated `GetDispatch` through the
 * gateway (API key check, signed identity, forwarding over h2c to the dispatcher, its store)
 * against a bare @connectrpc/connect-node server answering the same method from memory.
 * Over gRPC (h2load) and over Connect JSON on HTTP/1.1 (autocannon). First each side is
 * saturated (throughput), then both are driven at half of Outpost's saturated rate, evenly
 * paced (h2load --rps; with --h1 for HTTP/1.1, since autocannon's rate limit is bursty), where
 * the p50/p99 latencies are compared once each side has run at that rate for a few seconds
 * (unmeasured), so the figure is the steady state at half load rather than the recovery from
 * the saturation run before it. Goals: >= 0.4 of the bare throughput; p99 <= 2x bare.
 * The garbage collections the gateway and the dispatcher ran during the Connect half-load runs
 * (from their /metrics) are reported per call too: they are what that p99 is made of.
 */
import { create, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { DispatchService, GetDispatchRequestSchema } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { gcTotals, startBenchMesh, startEchoServer, type GcTotals } from "./lib/fixtures.ts";
import { grpcFrame, hasH2load, runAutocannon, runH2load, type LoadFigures } from "./lib/tools.ts";
import { median, type BenchContext, type BenchResult, type BenchRow, type Benchmark } from "./lib/types.ts";

const METHOD_PATH = "/outpost.dispatch.v1.DispatchService/GetDispatch";

interface Side {
  saturated: LoadFigures;
  half: LoadFigures;
}

/** Garbage collection in one Outpost process during a half-load run, per call. */
interface GcPerCall {
  fullPer10k: number;
  pauseMsPer1k: number;
}

const edgeUnary: Benchmark = async (ctx: BenchContext): Promise<BenchResult> => {
  const durationS = ctx.quick ? 1 : 5;
  const warmUpS = ctx.quick ? 0 : 3;
  /** A half-load measurement after the same load, unmeasured, for warmUpS. */
  const steady = async (measure: (seconds: number) => Promise<LoadFigures>) => {
    if (warmUpS > 0) await measure(warmUpS);
    return measure(durationS);
  };
  const grpcClients = 4;
  const grpcStreams = 8;
  const h1Connections = 16;
  // Without an executor the dispatch stays QUEUED, which is all GetDispatch needs.
  const bench = await startBenchMesh(["tenant", "telemetry", "dispatcher", "gateway"]);
  const echo = await startEchoServer().catch(async (err: unknown) => {
    await bench.stop();
    throw err;
  });
  try {
    const tenant = await bench.newTenant("Edge bench");
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "edge benchmark" });
    const dispatchId = dispatch!.id;
    const gateway = bench.mesh.urls.gateway;
    const auth = { authorization: `Bearer ${tenant.apiKey}` };

    // h2load only sees HTTP statuses, and gRPC errors travel in trailers: prove both targets
    // answer OK through the same path first, and again after each run (a rate limit or a
    // failure during the run would show there).
    const probe = async (baseUrl: string, withAuth: boolean) => {
      const client = createClient(DispatchService, createGrpcTransport({ baseUrl }));
      const res = await client.getDispatch({ dispatchId }, { headers: withAuth ? auth : {} });
      if (res.dispatch?.id !== dispatchId) throw new Error(`${baseUrl} answered a different dispatch`);
    };
    await probe(gateway, true);
    await probe(echo.h2, false);

    const grpcBody = grpcFrame(toBinary(GetDispatchRequestSchema, create(GetDispatchRequestSchema, { dispatchId })));
    const grpcHeaders = { "content-type": "application/grpc", te: "trailers" };
    const grpc = hasH2load();
    const warnings: string[] = [];
    if (!grpc) {
      warnings.push(
        "h2load not found (Debian package nghttp2-client): the gRPC rows are MISSING, and the Connect JSON half-load runs use autocannon's bursty rate limit instead of an even pace",
      );
    }

    const outpostGrpc: Side[] = [];
    const bareGrpc: Side[] = [];
    const outpostJson: Side[] = [];
    const bareJson: Side[] = [];
    const gcDuringHalfLoad: Record<"gateway" | "dispatcher", GcPerCall[]> = { gateway: [], dispatcher: [] };
    let grpcRejected = 0;
    for (let run = 0; run < ctx.runs; run++) {
      if (grpc) {
        const h2 = async (baseUrl: string, headers: Record<string, string>, rpsPerClient?: number, seconds = durationS) =>
          runH2load({ url: baseUrl + METHOD_PATH, body: grpcBody, headers, clients: grpcClients, streams: grpcStreams, durationS: seconds, rpsPerClient });
        const checked = async (figures: Promise<LoadFigures>) => {
          const result = await figures;
          try {
            await probe(gateway, true);
          } catch (err) {
            if (ConnectError.from(err).code === Code.ResourceExhausted) grpcRejected++;
            else throw err;
          }
          return result;
        };
        const o = await checked(h2(gateway, { ...grpcHeaders, ...auth }));
        const b = await h2(echo.h2, grpcHeaders);
        const rate = Math.max(1, Math.floor(o.rps / 2 / grpcClients));
        outpostGrpc.push({ saturated: o, half: await checked(steady((seconds) => h2(gateway, { ...grpcHeaders, ...auth }, rate, seconds))) });
        bareGrpc.push({ saturated: b, half: await steady((seconds) => h2(echo.h2, grpcHeaders, rate, seconds)) });
        ctx.log(`run ${run + 1} gRPC: outpost ${o.rps.toFixed(0)} req/s, bare ${b.rps.toFixed(0)} req/s`);
      }
      const h1 = async (baseUrl: string, headers: Record<string, string>, overallRate?: number) =>
        runAutocannon({
          url: baseUrl + METHOD_PATH,
          method: "POST",
          headers: { "content-type": "application/json", ...headers },
          body: JSON.stringify({ dispatchId }),
          connections: h1Connections,
          durationS,
          overallRate,
        });
      // Half load must be evenly paced: autocannon's rate limit sends each second's quota as
      // fast as it can and then waits, i.e. saturation for part of every second. h2load paces
      // HTTP/1.1 too (--h1 --rps), so it drives the half-load runs when it is installed.
      const h1Half = async (baseUrl: string, headers: Record<string, string>, overallRate: number, seconds = durationS) =>
        grpc
          ? runH2load({
              url: baseUrl + METHOD_PATH,
              body: Buffer.from(JSON.stringify({ dispatchId })),
              headers: { "content-type": "application/json", ...headers },
              clients: h1Connections,
              streams: 1,
              durationS: seconds,
              rpsPerClient: Math.max(1, Math.floor(overallRate / h1Connections)),
              http1: true,
            })
          : h1(baseUrl, headers, overallRate);
      const o = await h1(gateway, auth);
      const b = await h1(echo.h1, {});
      const rate = Math.max(1, Math.floor(o.rps / 2));
      // What the tail at half load is made of (README, Benchmarks): the collections each process
      // of the edge call ran meanwhile, from their own metrics.
      const processes = ["gateway", "dispatcher"] as const;
      if (warmUpS > 0) await h1Half(gateway, auth, rate, warmUpS);
      const gcBefore = await Promise.all(processes.map((p) => gcTotals(bench.mesh.urls[p])));
      const half = await h1Half(gateway, auth, rate);
      const gcAfter = await Promise.all(processes.map((p) => gcTotals(bench.mesh.urls[p])));
      processes.forEach((p, i) => gcDuringHalfLoad[p].push(perCall(gcBefore[i]!, gcAfter[i]!, half.requests)));
      outpostJson.push({ saturated: o, half });
      bareJson.push({ saturated: b, half: await steady((seconds) => h1Half(echo.h1, {}, rate, seconds)) });
      ctx.log(`run ${run + 1} Connect JSON/HTTP 1.1: outpost ${o.rps.toFixed(0)} req/s, bare ${b.rps.toFixed(0)} req/s`);
    }

    const rows: BenchRow[] = [];
    if (grpc) rows.push(...rowsFor("gRPC (h2load)", outpostGrpc, bareGrpc));
    rows.push(...rowsFor(`Connect JSON HTTP/1.1 (autocannon; half load ${grpc ? "h2load --h1" : "autocannon, bursty"})`, outpostJson, bareJson));
    for (const [service, samples] of Object.entries(gcDuringHalfLoad)) {
      rows.push(
        { metric: `${service}: full collections per 10k calls (Connect JSON, half load)`, value: median(samples.map((s) => s.fullPer10k)), unit: "count" },
        { metric: `${service}: GC pause per 1k calls (Connect JSON, half load)`, value: median(samples.map((s) => s.pauseMsPer1k)), unit: "ms" },
      );
    }
    const failed = [...outpostGrpc, ...outpostJson].reduce((n, s) => n + s.saturated.failed + s.half.failed, 0);
    return {
      name: "edge-unary",
      conditions:
        `authenticated GetDispatch via gateway -> dispatcher (SQLite) vs bare connect-node server; ` +
        `${durationS}s per measurement; gRPC ${grpcClients} connections x ${grpcStreams} streams; HTTP/1.1 ${h1Connections} connections; ` +
        `half load = 50% of Outpost's saturated rate, evenly paced (${grpc ? "h2load --rps, --h1 for HTTP/1.1" : "autocannon: bursty, h2load missing"}), measured after ${warmUpS}s at that rate; Outpost failed requests ${failed}, rate-limited probes ${grpcRejected}`,
      rows,
      ...(warnings.length ? { warnings } : {}),
    };
  } finally {
    await echo.stop();
    await bench.stop();
  }
};

function perCall(before: GcTotals, after: GcTotals, calls: number): GcPerCall {
  return {
    fullPer10k: ((after.full - before.full) / Math.max(1, calls)) * 10_000,
    pauseMsPer1k: ((after.pauseMs - before.pauseMs) / Math.max(1, calls)) * 1000,
  };
}

function rowsFor(protocol: string, outpost: Side[], bare: Side[]): BenchRow[] {
  const pick = (sides: Side[], f: (s: Side) => number) => median(sides.map(f));
  const row = (metric: string, unit: string, f: (s: Side) => number, goal?: string): BenchRow => {
    const value = pick(outpost, f);
    const baseline = pick(bare, f);
    return { metric: `${protocol} ${metric}`, value, unit, baseline, ratio: value / baseline, ...(goal ? { goal } : {}) };
  };
  return [
    row("throughput", "req/s", (s) => s.saturated.rps, ">= 0.4 of bare"),
    row("p50 at saturation", "ms", (s) => s.saturated.p50Ms),
    row("p50 at half load", "ms", (s) => s.half.p50Ms),
    row("p99 at half load", "ms", (s) => s.half.p99Ms, "<= 2x bare"),
  ];
}

export default edgeUnary;
