/**
 * The edge's Redis-backed parts over real processes and a real, private redis-server that the
 * test stops and starts (never the shared one): rate limits per tenant, per tier, per client IP
 * and per method class with RateLimit-* metadata (SPEC G3); the in-memory fallback while Redis
 * is down and the return to Redis; revocations reaching every gateway replica within a second
 * through "outpost:auth:invalidate" (SPEC G2).
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import { Redis } from "ioredis";
import { errorInfoOf } from "@outpost/platform";
import { TEST_SIGNING_KEY_SET } from "../support/signing.ts";
import { outpostClients, type OutpostClients } from "@outpost/cli";
import { RetryInfoSchema } from "@outpost/proto/google/rpc/error_details_pb.js";
import { DispatchService } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { Tier } from "@outpost/proto/outpost/tenant/v1/tenant_pb.js";
import { freePort, startMesh, type Mesh } from "../../scripts/lib/mesh.ts";
import { startTestMesh, type TestMesh } from "./harness.ts";

/** A redis-server of this test's own on a free loopback port, stoppable and restartable. */
class PrivateRedis {
  readonly port: number;
  private readonly dir = mkdtempSync(path.join(os.tmpdir(), "outpost-redis-"));
  private child: ChildProcess | undefined;
  constructor(port: number) {
    this.port = port;
  }
  get url() {
    return `redis://127.0.0.1:${this.port}`;
  }
  async start() {
    this.child = spawn("redis-server", ["--port", String(this.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", this.dir], {
      stdio: "ignore",
    });
    const probe = new Redis(this.url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
    probe.on("error", () => {}); // refused until the server listens
    try {
      for (let i = 0; i < 100; i++) {
        try {
          if (probe.status !== "ready") await probe.connect();
          if ((await probe.ping()) === "PONG") return;
        } catch {
          await new Promise((r) => setTimeout(r, 50));
        }
      }
      throw new Error("private redis-server did not start");
    } finally {
      probe.disconnect();
    }
  }
  async stop() {
    const child = this.child;
    if (!child || child.exitCode !== null) return;
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill("SIGTERM");
    await exited;
  }
}

const RATES = "create=5,trigger=5,read=20";
let redis: PrivateRedis;
let t: TestMesh;
let redisClient: Redis;
let tiersFile: string;

beforeAll(async () => {
  redis = new PrivateRedis(await freePort());
  await redis.start();
  redisClient = new Redis(redis.url, { maxRetriesPerRequest: 1 });
  redisClient.on("error", () => {}); // down on purpose during the outage test
  const dir = mkdtempSync(path.join(os.tmpdir(), "outpost-tiers-"));
  tiersFile = path.join(dir, "tiers.yaml");
  // Small per-tier request rates so the limits are reached in a few calls.
  writeFileSync(
    tiersFile,
    "free:\n  create_per_minute: 5\n  trigger_per_minute: 5\n  read_per_minute: 20\nenterprise:\n  create_per_minute: 50\n  trigger_per_minute: 50\n  read_per_minute: 30\n",
  );
  t = await startTestMesh({
    env: { OUTPOST_REDIS_URL: redis.url },
    serviceEnv: {
      tenant: { OUTPOST_TIERS_FILE: tiersFile },
      gateway: {
        OUTPOST_RATE_LIMIT_ALLOW: "",
        OUTPOST_RATE_LIMITS: RATES,
        OUTPOST_RATE_LIMITS_PER_IP: "create=1000,trigger=1000,read=200",
        // Long enough that only an invalidation, not expiry, can explain a refusal within 1 s.
        OUTPOST_AUTH_CACHE_TTL_MS: "60000",
      },
    },
  });
});

afterAll(async () => {
  await t?.mesh.stop();
  redisClient?.disconnect();
  await redis?.stop();
});

async function failure(call: Promise<unknown>): Promise<ConnectError> {
  try {
    await call;
  } catch (err) {
    return ConnectError.from(err);
  }
  throw new Error("expected the call to fail");
}

async function newTenant(name: string, tier = Tier.FREE, gatewayUrl = t.mesh.urls.gateway) {
  const res = await t.admin.tenants.createTenant({ name, contactEmail: "ops@example.com", tier });
  return { tenantId: res.tenant!.id, apiKey: res.apiKeyPlaintext, clients: outpostClients(gatewayUrl, res.apiKeyPlaintext) };
}

const MISSING = "01ARZ3NDEKTSV4RRFFQ69G5FAV";

/** Reads until refused; returns how many calls were admitted and the refusal. */
async function readUntilLimited(clients: OutpostClients, max: number) {
  for (let i = 0; i < max; i++) {
    const err = await failure(clients.dispatches.getDispatch({ dispatchId: MISSING }));
    if (err.code === Code.ResourceExhausted) return { admitted: i, err };
    expect(err.code).toBe(Code.NotFound);
  }
  throw new Error(`no refusal within ${max} calls`);
}

describe("rate limits on Redis (G3)", () => {
  it("refuses a tenant over its tier's read rate with RESOURCE_EXHAUSTED, RateLimit-* metadata and RetryInfo", async () => {
    const a = await newTenant("Limited A");
    const headers: Headers[] = [];
    const transport = createConnectTransport({ baseUrl: t.mesh.urls.gateway, httpVersion: "1.1" });
    const client = createClient(DispatchService, transport);
    // The admitted calls carry the budget too, counting down.
    for (let i = 0; i < 3; i++) {
      await client.listDispatches({}, { headers: { authorization: `Bearer ${a.apiKey}` }, onHeader: (h) => headers.push(h) });
    }
    expect(headers.map((h) => h.get("ratelimit-limit"))).toEqual(["20", "20", "20"]);
    expect(headers.map((h) => Number(h.get("ratelimit-remaining")))).toEqual([19, 18, 17]);

    const { admitted, err } = await readUntilLimited(a.clients, 40);
    expect(admitted).toBe(17);
    expect(errorInfoOf(err)?.reason).toBe("RATE_LIMITED");
    expect(errorInfoOf(err)?.metadata).toMatchObject({ limit: "20", remaining: "0", method_class: "read", subject: "tenant" });
    expect(err.metadata.get("ratelimit-limit")).toBe("20");
    expect(err.metadata.get("ratelimit-remaining")).toBe("0");
    const retryAfter = Number(err.metadata.get("retry-after"));
    expect(retryAfter).toBeGreaterThan(0);
    expect(retryAfter).toBeLessThanOrEqual(60);
    expect(Number(err.metadata.get("ratelimit-reset"))).toBe(retryAfter);
    const retry = err.findDetails(RetryInfoSchema)[0];
    expect(Number(retry?.retryDelay?.seconds ?? 0n)).toBeGreaterThan(0);
    // The refusal is counted in the gateway's metrics.
    const metrics = await (await fetch(`${t.mesh.urls.gateway}/metrics`)).text();
    expect(metrics).toMatch(/outpost_rate_limit_rejections_total\{[^}]*limit="tenant_read"[^}]*\} [1-9]/);

    // Over gRPC the same refusal arrives in trailers.
    const grpcErr = await failure(
      createClient(DispatchService, createGrpcTransport({ baseUrl: t.mesh.urls.gateway })).getDispatch(
        { dispatchId: MISSING },
        { headers: { authorization: `Bearer ${a.apiKey}` } },
      ),
    );
    expect(grpcErr.code).toBe(Code.ResourceExhausted);
    expect(grpcErr.metadata.get("retry-after")).toBe(String(retryAfter));

    // The count lives in Redis, shared by every replica.
    const keys = await redisClient.keys(`outpost:rl:read:20:tenant:${a.tenantId}`);
    expect(keys).toHaveLength(1);
    expect(Number(await redisClient.get(keys[0]!))).toBeGreaterThanOrEqual(21);

    // Another tenant is not affected, and another class of the same tenant neither.
    const b = await newTenant("Limited B");
    expect((await failure(b.clients.dispatches.getDispatch({ dispatchId: MISSING }))).code).toBe(Code.NotFound);
    expect((await failure(a.clients.dispatches.cancelDispatch({ dispatchId: MISSING }))).code).toBe(Code.NotFound);
  });

  it("applies the tier's own limits (enterprise: 30 reads) and the create class separately", async () => {
    const e = await newTenant("Enterprise", Tier.ENTERPRISE);
    const { admitted, err } = await readUntilLimited(e.clients, 60);
    expect(admitted).toBe(30);
    expect(errorInfoOf(err)?.metadata["limit"]).toBe("30");

    const f = await newTenant("Creator");
    const codes: Code[] = [];
    for (let i = 0; i < 7; i++) {
      // An invalid create is still a create: it counts.
      codes.push((await failure(f.clients.dispatches.createDispatch({ agent: "", task: "" }))).code);
    }
    expect(codes.slice(0, 5).every((c) => c === Code.InvalidArgument)).toBe(true);
    expect(codes.slice(5)).toEqual([Code.ResourceExhausted, Code.ResourceExhausted]);
  });

  it("limits a client IP across tenants and without a key, before the key is looked up", async () => {
    // 200 reads per minute per IP; the tests above spent some of them already.
    const noKey = createClient(DispatchService, createConnectTransport({ baseUrl: t.mesh.urls.gateway, httpVersion: "1.1" }));
    let refusal: ConnectError | undefined;
    for (let i = 0; i < 250 && !refusal; i++) {
      const err = await failure(noKey.getDispatch({ dispatchId: MISSING }));
      if (err.code === Code.ResourceExhausted) refusal = err;
      else expect(err.code).toBe(Code.Unauthenticated);
    }
    expect(refusal).toBeDefined();
    expect(errorInfoOf(refusal!)?.metadata).toMatchObject({ subject: "ip", limit: "200" });
    // A tenant calling from the same IP is now refused as well.
    const g = await newTenant("Same IP");
    const err = await failure(g.clients.dispatches.getDispatch({ dispatchId: MISSING }));
    expect(err.code).toBe(Code.ResourceExhausted);
    expect(errorInfoOf(err)?.metadata["subject"]).toBe("ip");
    // Clear this IP's budget in Redis for the tests that follow.
    const ipKeys = await redisClient.keys("outpost:rl:read:200:ip:*");
    expect(ipKeys.length).toBeGreaterThan(0);
    await redisClient.del(...ipKeys);
  });

  it("keeps serving on an in-memory limiter while Redis is down, logs it, and goes back when Redis returns", async () => {
    const gatewayLog = path.join(t.dir, "logs", "gateway.log");
    const c = await newTenant("During outage");
    await redis.stop();
    try {
      // Served, and still limited (in memory): 20 reads, then refused.
      const { admitted, err } = await readUntilLimited(c.clients, 40);
      expect(admitted).toBe(20);
      expect(errorInfoOf(err)?.reason).toBe("RATE_LIMITED");
      expect(readFileSync(gatewayLog, "utf8")).toContain("Redis unreachable; counting in memory");
    } finally {
      await redis.start();
    }
    // Back on Redis within the reconnect backoff (at most 5 s), counting there again.
    const deadline = Date.now() + 15_000;
    while (!readFileSync(gatewayLog, "utf8").includes("Redis is back") && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    expect(readFileSync(gatewayLog, "utf8")).toContain("Redis is back");
    const d = await newTenant("After outage");
    await failure(d.clients.dispatches.getDispatch({ dispatchId: MISSING }));
    const reconnected = new Redis(redis.url, { maxRetriesPerRequest: 1 });
    try {
      expect(await reconnected.get(`outpost:rl:read:20:tenant:${d.tenantId}`)).toBe("1");
    } finally {
      reconnected.disconnect();
    }
  });
});

describe("auth cache invalidation across gateway replicas (G2)", () => {
  let second: Mesh;

  beforeAll(async () => {
    // A second gateway process in front of the same services and Redis.
    const port = (name: "tenant" | "dispatcher" | "telemetry") => Number(new URL(t.mesh.urls[name]).port);
    second = await startMesh({
      dataDir: path.join(t.dir, "data-gw2"),
      logDir: path.join(t.dir, "logs-gw2"),
      signingKeys: TEST_SIGNING_KEY_SET,
      adminToken: t.adminToken,
      only: ["gateway"],
      ports: { tenant: port("tenant"), dispatcher: port("dispatcher"), telemetry: port("telemetry") },
      env: { OUTPOST_REDIS_URL: redis.url, OUTPOST_AUTH_CACHE_TTL_MS: "60000", OUTPOST_RATE_LIMIT: "off" },
    });
  });

  afterAll(async () => {
    await second?.stop();
  });

  /** Polls the key on a gateway until it is refused; returns how long that took. */
  async function msUntilRefused(clients: OutpostClients, limitMs: number): Promise<number> {
    const started = Date.now();
    while (Date.now() - started < limitMs) {
      const err = await failure(clients.dispatches.getDispatch({ dispatchId: MISSING }));
      if (err.code === Code.Unauthenticated || err.code === Code.PermissionDenied) return Date.now() - started;
      expect(err.code).toBe(Code.NotFound);
      await new Promise((r) => setTimeout(r, 20));
    }
    return Infinity;
  }

  it("drops a key cached on a replica when its hash (or its tenant) is published", async () => {
    const tenantLog = path.join(t.dir, "logs", "tenant.log");
    const lookups = () => readFileSync(tenantLog, "utf8").split("\n").filter((l) => l.includes("AuthenticateApiKey")).length;
    const k = await newTenant("Published", Tier.ENTERPRISE, second.urls.gateway);
    await failure(k.clients.dispatches.getDispatch({ dispatchId: MISSING })); // looked up, cached for 60 s
    const afterFirst = lookups();
    await failure(k.clients.dispatches.getDispatch({ dispatchId: MISSING }));
    expect(lookups(), "a cached key is not looked up again").toBe(afterFirst);

    const hash = createHash("sha256").update(k.apiKey).digest("hex");
    expect(await redisClient.publish("outpost:auth:invalidate", hash)).toBeGreaterThanOrEqual(2); // both gateways listen
    await new Promise((r) => setTimeout(r, 200));
    await failure(k.clients.dispatches.getDispatch({ dispatchId: MISSING }));
    expect(lookups(), "after the hash was published the key is asked for again").toBe(afterFirst + 1);

    await redisClient.publish("outpost:auth:invalidate", `tenant:${k.tenantId}`);
    await new Promise((r) => setTimeout(r, 200));
    await failure(k.clients.dispatches.getDispatch({ dispatchId: MISSING }));
    expect(lookups(), "after the tenant was published its keys are asked for again").toBe(afterFirst + 2);
  });

  it("a key revoked through gateway 1 stops working on gateway 2 within one second", async () => {
    const owner = await newTenant("Revoker", Tier.ENTERPRISE);
    const created = await owner.clients.apiKeys.createApiKey({ displayName: "short-lived" });
    const onSecond = outpostClients(second.urls.gateway, created.apiKeyPlaintext);
    // Cached on gateway 2 (TTL 60 s).
    expect((await failure(onSecond.dispatches.getDispatch({ dispatchId: MISSING }))).code).toBe(Code.NotFound);
    await owner.clients.apiKeys.revokeApiKey({ apiKeyId: created.apiKey!.id });
    const ms = await msUntilRefused(onSecond, 3000);
    expect(ms).toBeLessThan(1000);
    const err = await failure(onSecond.dispatches.getDispatch({ dispatchId: MISSING }));
    expect(err.code).toBe(Code.Unauthenticated);
  });

  it("a key revoked through gateway 1 ends its open streams on gateway 2 within one second (raw and Connect paths)", async () => {
    const owner = await newTenant("Stream revoker", Tier.ENTERPRISE);
    const watcher = await owner.clients.apiKeys.createApiKey({ displayName: "watcher" });
    const run = await owner.clients.dispatches.createDispatch({ agent: "demo", task: "sleep=60" });
    const dispatchId = run.dispatch!.id;
    const auth: Interceptor[] = [(next) => (req) => (req.header.set("authorization", `Bearer ${watcher.apiKeyPlaintext}`), next(req))];
    const watch = (transport: Parameters<typeof createClient>[1]) => {
      let first!: () => void;
      const opened = new Promise<void>((resolve) => (first = resolve));
      const ended = (async () => {
        try {
          for await (const _ of createClient(DispatchService, transport).watchDispatch({ dispatchId }, { timeoutMs: 60_000 })) first();
          return { at: Date.now(), error: undefined };
        } catch (err) {
          return { at: Date.now(), error: ConnectError.from(err) };
        }
      })();
      return { opened, ended };
    };
    try {
      // Gateway 2 trusts the key for 60 s and re-checks open streams every 30 s (the default):
      // only the published revocation can end these streams within a second.
      const streams = [
        watch(createConnectTransport({ baseUrl: second.urls.gateway, httpVersion: "1.1", interceptors: auth })),
        watch(createGrpcWebTransport({ baseUrl: second.urls.gateway, httpVersion: "1.1", interceptors: auth })),
      ];
      await Promise.all(streams.map((s) => s.opened));
      const revokedAt = Date.now();
      await owner.clients.apiKeys.revokeApiKey({ apiKeyId: watcher.apiKey!.id });
      for (const stream of streams) {
        const end = await stream.ended;
        expect([end.error?.code, end.error && errorInfoOf(end.error)?.reason]).toEqual([Code.Unauthenticated, "API_KEY_REVOKED"]);
        expect(end.at - revokedAt).toBeLessThan(1000);
      }
    } finally {
      await owner.clients.dispatches.cancelDispatch({ dispatchId }).catch(() => {});
    }
  });

  it("a suspended tenant's cached keys stop working on every replica within one second", async () => {
    const s = await newTenant("Suspended", Tier.ENTERPRISE, second.urls.gateway);
    expect((await failure(s.clients.dispatches.getDispatch({ dispatchId: MISSING }))).code).toBe(Code.NotFound);
    await t.admin.tenants.suspendTenant({ tenantId: s.tenantId, reason: "unpaid invoice" });
    const ms = await msUntilRefused(s.clients, 3000);
    expect(ms).toBeLessThan(1000);
    expect((await failure(s.clients.dispatches.getDispatch({ dispatchId: MISSING }))).code).toBe(Code.PermissionDenied);
  });
});
