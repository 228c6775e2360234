/**
 * The cost of the edge (issue #3): `GetDispatch` over gRPC (h2load) through the gateway with
 * its rate limiter on Redis, in memory, and off; the same call made directly to the
 * dispatcher (signed identity, no gateway); and a bare connect-node echo server answering the
 * same method from memory. Throughput saturated, p50/p99 at saturation, as ratios measured in
 * one run. Goal: the Redis limiter keeps >= 0.75 of the limiter-off throughput.
 *
 *   node --disable-warning=ExperimentalWarning bench/run.ts edge     (or: npm run bench)
 */
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { create, toBinary } from "@bufbuild/protobuf";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { outpostClients } from "@outpost/cli";
import { IDENTITY_HEADER, IDENTITY_SIGNATURE_HEADER, audienceOf, generateSigningKeySet, signingKeysOf } from "@outpost/platform";
import { DispatchService, GetDispatchRequestSchema } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { Tier } from "@outpost/proto/outpost/tenant/v1/tenant_pb.js";
import { freePort, startMesh, type Mesh } from "../scripts/lib/mesh.ts";
import { startEchoServer, type EchoServer } from "./lib/fixtures.ts";
import { grpcFrame, requireTools, runH2load, type LoadFigures } from "./lib/tools.ts";
import { median, type BenchContext, type BenchResult, type BenchRow, type Benchmark } from "./lib/types.ts";

const METHOD_PATH = "/outpost.dispatch.v1.DispatchService/GetDispatch";
const MODES = ["off", "memory", "redis"] as const;
type Target = `gateway-${(typeof MODES)[number]}` | "dispatcher" | "echo";

async function startRedis(port: number, dir: string): Promise<ChildProcess> {
  const child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir], { stdio: "ignore" });
  for (let i = 0; i < 100; i++) {
    const ok = await new Promise<boolean>((resolve) => {
      const probe = spawn("redis-cli", ["-p", String(port), "ping"], { stdio: ["ignore", "pipe", "ignore"] });
      let out = "";
      probe.stdout.on("data", (c) => (out += c));
      probe.on("exit", () => resolve(out.includes("PONG")));
    });
    if (ok) return child;
    await new Promise((r) => setTimeout(r, 50));
  }
  if (child.exitCode === null && child.signalCode === null) {
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill();
    await exited;
  }
  throw new Error("redis-server did not start");
}

const edge: Benchmark = async (ctx: BenchContext): Promise<BenchResult> => {
  requireTools("edge", "h2load", "redis-server", "redis-cli");
  const durationS = ctx.quick ? 1 : 5;
  const clients = 4;
  const streams = 8;
  const dir = mkdtempSync(path.join(os.tmpdir(), "outpost-edge-bench-"));
  // One key set for the core and the gateways (each mesh would otherwise make its own).
  const signingKeys = generateSigningKeySet();
  const adminToken = randomBytes(32).toString("hex");
  const huge = 1_000_000_000;
  // The limiter counts every call but never refuses one: its cost is measured, not its rejections.
  const tiersFile = path.join(dir, "tiers.json");
  writeFileSync(tiersFile, JSON.stringify({ enterprise: { create_per_minute: huge, trigger_per_minute: huge, read_per_minute: huge } }));
  const redisPort = await freePort();
  let redis: ChildProcess | undefined;
  let echo: EchoServer | undefined;
  let core: Mesh | undefined;
  const gateways = new Map<(typeof MODES)[number], Mesh>();
  try {
    redis = await startRedis(redisPort, dir);
    echo = await startEchoServer();
    core = await startMesh({
      dataDir: path.join(dir, "data"),
      logDir: path.join(dir, "logs"),
      signingKeys,
      adminToken,
      only: ["tenant", "telemetry", "dispatcher"],
      env: { OUTPOST_LOG_LEVEL: "warn", OUTPOST_TIERS_FILE: tiersFile },
    });
    const port = (name: "tenant" | "dispatcher" | "telemetry") => Number(new URL(core!.urls[name]).port);
    for (const mode of MODES) {
      gateways.set(
        mode,
        await startMesh({
          dataDir: path.join(dir, "data"),
          logDir: path.join(dir, `logs-${mode}`),
          signingKeys,
          adminToken,
          only: ["gateway"],
          ports: { tenant: port("tenant"), dispatcher: port("dispatcher"), telemetry: port("telemetry") },
          env: {
            OUTPOST_LOG_LEVEL: "warn",
            OUTPOST_RATE_LIMIT: mode,
            OUTPOST_REDIS_URL: `redis://127.0.0.1:${redisPort}`,
            OUTPOST_RATE_LIMIT_ALLOW: "",
            OUTPOST_RATE_LIMITS_PER_IP: `create=${huge},trigger=${huge},read=${huge}`,
          },
        }),
      );
    }
    const first = gateways.get("off")!.urls.gateway;
    const created = await outpostClients(first, adminToken).tenants.createTenant({ name: "Edge bench", contactEmail: "bench@example.com", tier: Tier.ENTERPRISE });
    const apiKey = created.apiKeyPlaintext;
    // No executor runs: the dispatch stays QUEUED, which is all GetDispatch needs.
    const { dispatch } = await outpostClients(first, apiKey).dispatches.createDispatch({ agent: "demo", task: "edge benchmark" });
    const dispatchId = dispatch!.id;
    const body = grpcFrame(toBinary(GetDispatchRequestSchema, create(GetDispatchRequestSchema, { dispatchId })));
    const grpcHeaders = { "content-type": "application/grpc+proto", te: "trailers" };

    const targets: Record<Target, { url: string; headers: () => Record<string, string> }> = {
      "gateway-off": { url: gateways.get("off")!.urls.gateway, headers: () => ({ ...grpcHeaders, authorization: `Bearer ${apiKey}` }) },
      "gateway-memory": { url: gateways.get("memory")!.urls.gateway, headers: () => ({ ...grpcHeaders, authorization: `Bearer ${apiKey}` }) },
      "gateway-redis": { url: gateways.get("redis")!.urls.gateway, headers: () => ({ ...grpcHeaders, authorization: `Bearer ${apiKey}` }) },
      dispatcher: {
        url: core.urls.dispatcher,
        // What the gateway sends: the tenant's identity, signed (valid 60 s, signed per run).
        headers: () => {
          const h = new Headers();
          signingKeysOf(signingKeys, "gateway").writeIdentity(h, { kind: "tenant", tenantId: created.tenant!.id, principal: "key/bench" }, audienceOf(DispatchService));
          return { ...grpcHeaders, [IDENTITY_HEADER]: h.get(IDENTITY_HEADER)!, [IDENTITY_SIGNATURE_HEADER]: h.get(IDENTITY_SIGNATURE_HEADER)! };
        },
      },
      echo: { url: echo.h2, headers: () => grpcHeaders },
    };
    // Every target answers the call OK before it is loaded (h2load sees HTTP statuses only).
    for (const [name, target] of Object.entries(targets)) {
      const res = await createClient(DispatchService, createGrpcTransport({ baseUrl: target.url })).getDispatch({ dispatchId }, { headers: target.headers() });
      if (res.dispatch?.id !== dispatchId) throw new Error(`${name} answered a different dispatch`);
    }

    const figures = new Map<Target, LoadFigures[]>();
    for (let run = 0; run < ctx.runs; run++) {
      // Interleaved, so drift of the machine over time hits every target alike.
      for (const [name, target] of Object.entries(targets) as [Target, (typeof targets)[Target]][]) {
        const f = await runH2load({ url: `${target.url}${METHOD_PATH}`, body, headers: target.headers(), clients, streams, durationS });
        ctx.log(`edge ${name} run ${run + 1}: ${Math.round(f.rps)} req/s, p50 ${f.p50Ms.toFixed(2)} ms, p99 ${f.p99Ms.toFixed(2)} ms, failed ${f.failed}`);
        // Streams cut by the end of the run count as failed; more than 1% means refusals or breakage.
        if (f.failed > f.requests / 100) throw new Error(`${name}: ${f.failed} of ${f.requests} requests failed (rate limited or broken)`);
        figures.set(name, [...(figures.get(name) ?? []), f]);
      }
    }
    // The calls really went through the limiter: the Redis gateway counted them in Redis.
    const counted = await new Promise<string>((resolve) => {
      const cli = spawn("redis-cli", ["-p", String(redisPort), "get", `outpost:rl:read:${huge}:tenant:${created.tenant!.id}`], { stdio: ["ignore", "pipe", "ignore"] });
      let out = "";
      cli.stdout.on("data", (c) => (out += c));
      cli.on("exit", () => resolve(out.trim()));
    });
    if (!(Number(counted) > 0)) throw new Error("the Redis limiter counted nothing: the benchmark did not measure it");
    ctx.log(`edge: calls counted in Redis this window: ${counted}`);
    const rps = (t: Target) => median(figures.get(t)!.map((f) => f.rps));
    const p = (t: Target, which: "p50Ms" | "p99Ms") => median(figures.get(t)!.map((f) => f[which]));
    const ratio = (a: number, b: number) => Math.round((a / b) * 1000) / 1000;
    const rows: BenchRow[] = [
      { metric: "throughput, gateway limiter=redis vs limiter=off", value: rps("gateway-redis"), baseline: rps("gateway-off"), ratio: ratio(rps("gateway-redis"), rps("gateway-off")), unit: "req/s", goal: ">= 0.75" },
      { metric: "throughput, gateway limiter=memory vs limiter=off", value: rps("gateway-memory"), baseline: rps("gateway-off"), ratio: ratio(rps("gateway-memory"), rps("gateway-off")), unit: "req/s" },
      { metric: "throughput, gateway (limiter off) vs direct to dispatcher", value: rps("gateway-off"), baseline: rps("dispatcher"), ratio: ratio(rps("gateway-off"), rps("dispatcher")), unit: "req/s" },
      { metric: "throughput, gateway limiter=redis vs bare echo server", value: rps("gateway-redis"), baseline: rps("echo"), ratio: ratio(rps("gateway-redis"), rps("echo")), unit: "req/s" },
      { metric: "throughput, direct to dispatcher vs bare echo server", value: rps("dispatcher"), baseline: rps("echo"), ratio: ratio(rps("dispatcher"), rps("echo")), unit: "req/s" },
    ];
    for (const which of ["p50Ms", "p99Ms"] as const) {
      const label = which === "p50Ms" ? "p50" : "p99";
      for (const t of ["gateway-redis", "gateway-memory", "gateway-off", "dispatcher"] as const) {
        rows.push({ metric: `${label} latency at saturation, ${t} vs bare echo (lower is better)`, value: p(t, which), baseline: p("echo", which), ratio: ratio(p(t, which), p("echo", which)), unit: "ms" });
      }
    }
    return {
      name: "edge",
      conditions: `GetDispatch over gRPC/h2c, h2load ${clients} connections x ${streams} streams, ${durationS} s per target per run, ${ctx.runs} run(s), median; every target its own process; Redis private on loopback`,
      rows,
    };
  } finally {
    for (const g of gateways.values()) await g.stop();
    await core?.stop();
    await echo?.stop();
    if (redis && redis.exitCode === null && redis.signalCode === null) {
      const exited = new Promise((resolve) => redis!.once("exit", resolve));
      redis.kill("SIGTERM");
      await exited;
    }
    rmSync(dir, { recursive: true, force: true });
  }
};

export default edge;
