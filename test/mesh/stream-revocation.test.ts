/**
 * Open streams end when their key is revoked or their tenant suspended (SPEC G2, T2), over the
 * real mesh and every way a client can hold a stream at the edge: Connect JSON over HTTP/1.1 and
 * binary over HTTP/2 and gRPC (the gateway's raw path), gRPC-Web (its Connect path). This mesh
 * has no Redis, so no invalidation reaches the gateway: the periodic re-check
 * (OUTPOST_GATEWAY_STREAM_RECHECK_MS, here 300 ms) finds the key refused once its cached trust
 * (OUTPOST_AUTH_CACHE_TTL_MS, 2 s) has expired. With Redis they end at once:
 * test/mesh/edge-redis.test.ts. The logic: gateway/test/open-streams.test.ts.
 *
 * The second part puts a gateway process in front of a stand-in for the services whose streams
 * send nothing, so streams end before their answer began, and whose key lookups the test turns
 * from valid to "refusing the gateway" (not the key: streams stay) to revoked.
 */
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import type { DescService } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import { errorInfoOf, unauthenticated } from "@outpost/platform";
import { TenantInternalService } from "@outpost/proto/outpost/tenant/v1/tenant_internal_service_pb.js";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { DispatchService } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { LogService } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { sample, scrape } from "../support/metrics.ts";
import { startStandInGateway, type StandInGateway } from "../support/stand-in-gateway.ts";
import { startTestMesh, type TestMesh } from "./harness.ts";

let t: TestMesh;

beforeAll(async () => {
  t = await startTestMesh({ serviceEnv: { gateway: { OUTPOST_GATEWAY_STREAM_RECHECK_MS: "300" } } });
});

afterAll(async () => {
  await t?.mesh.stop();
});

const withKey = (apiKey: string): Interceptor[] => [(next) => (req) => (req.header.set("authorization", `Bearer ${apiKey}`), next(req))];

/** Every protocol a client can hold a stream open with at the edge. */
function transportsFor(apiKey: string, baseUrl = t.mesh.urls.gateway): [string, Transport][] {
  const interceptors = withKey(apiKey);
  return [
    ["connect json h1 (raw path)", createConnectTransport({ baseUrl, httpVersion: "1.1", interceptors })],
    ["connect binary h2 (raw path)", createConnectTransport({ baseUrl, httpVersion: "2", useBinaryFormat: true, interceptors })],
    ["grpc (raw path)", createGrpcTransport({ baseUrl, interceptors })],
    ["grpc-web (connect path)", createGrpcWebTransport({ baseUrl, httpVersion: "1.1", interceptors })],
  ];
}

/** A stream read in the background: its messages as they come, and how it ended. */
function follow(stream: AsyncIterable<unknown>) {
  const messages: unknown[] = [];
  const ended = (async () => {
    try {
      for await (const message of stream) messages.push(message);
      return { error: undefined, at: Date.now() };
    } catch (err) {
      return { error: ConnectError.from(err), at: Date.now() };
    }
  })();
  return { messages, ended };
}

const client = <T extends DescService>(service: T, transport: Transport): Client<T> => createClient(service, transport);

/** A sample of the gateway's /metrics (0 when absent). */
async function gatewayMetric(name: string, ...labels: string[]): Promise<number> {
  return sample(await scrape(t.mesh.urls.gateway), name, ...labels) ?? 0;
}

describe("open streams and revocation, without Redis (periodic re-check)", () => {
  it("a revoked key's streams end with UNAUTHENTICATED API_KEY_REVOKED on every protocol; another key's stay open until the tenant is suspended", async () => {
    const owner = await t.newTenant("Stream revocation");
    const second = await owner.clients.apiKeys.createApiKey({ displayName: "watcher" });
    const run = await owner.clients.dispatches.createDispatch({ agent: "demo", task: "sleep=60" });
    const dispatchId = run.dispatch!.id;
    try {
      // Streams of the second key: a dispatch watch on each protocol and a log subscription.
      const revokedStreams = transportsFor(second.apiKeyPlaintext).map(([name, transport]) => ({
        name,
        stream: follow(client(DispatchService, transport).watchDispatch({ dispatchId }, { timeoutMs: 60_000 })),
      }));
      const [, h1] = transportsFor(second.apiKeyPlaintext)[0]!;
      revokedStreams.push({ name: "subscribe logs, connect json h1", stream: follow(client(LogService, h1).subscribeLogs({ dispatchId }, { timeoutMs: 60_000 })) });
      // A stream of the tenant's first key, which is not revoked.
      const [, ownerH1] = transportsFor(owner.apiKey)[0]!;
      const kept = follow(client(DispatchService, ownerH1).watchDispatch({ dispatchId }, { timeoutMs: 60_000 }));
      // Every watch has its first message (the dispatch as it is), and the gateway watches all
      // six streams (the log subscription has nothing to send yet): the streams are open.
      const watches = [...revokedStreams.filter((s) => !s.name.startsWith("subscribe")).map((s) => s.stream), kept];
      await vi.waitFor(() => expect(watches.every((w) => w.messages.length > 0), "the watches' first messages").toBe(true), { timeout: 10_000, interval: 20 });
      const watchedBefore = await gatewayMetric("outpost_gateway_watched_streams");
      expect(watchedBefore).toBe(revokedStreams.length + 1);

      const revokedAt = Date.now();
      await owner.clients.apiKeys.revokeApiKey({ apiKeyId: second.apiKey!.id });
      for (const { name, stream } of revokedStreams) {
        const end = await stream.ended;
        expect([name, end.error?.code, end.error && errorInfoOf(end.error)?.reason]).toEqual([name, Code.Unauthenticated, "API_KEY_REVOKED"]);
        // Cache TTL (2 s) + re-check interval (300 ms) + slack; well before the 60 s deadline.
        expect(end.at - revokedAt, name).toBeLessThan(8_000);
      }
      // The first key's stream is still open (the revocation was of one key, not the tenant).
      const stillOpen = await Promise.race([kept.ended.then(() => false), new Promise((r) => setTimeout(() => r(true), 500))]);
      expect(stillOpen).toBe(true);
      expect(await gatewayMetric("outpost_gateway_streams_revoked_total", 'code="unauthenticated"')).toBe(revokedStreams.length);
      expect(await gatewayMetric("outpost_gateway_watched_streams")).toBe(1);

      // Suspending the tenant ends the first key's stream too, with the suspension.
      const suspendedAt = Date.now();
      await t.admin.tenants.suspendTenant({ tenantId: owner.tenantId, reason: "stream test" });
      const end = await kept.ended;
      expect([end.error?.code, end.error && errorInfoOf(end.error)?.reason]).toEqual([Code.PermissionDenied, "TENANT_SUSPENDED"]);
      expect(end.at - suspendedAt).toBeLessThan(8_000);
      expect(await gatewayMetric("outpost_gateway_streams_revoked_total", 'code="permission_denied"')).toBe(1);
      expect(await gatewayMetric("outpost_gateway_watched_streams")).toBe(0);
      await t.admin.tenants.reactivateTenant({ tenantId: owner.tenantId });
      // Ending the watchers' streams did nothing to the run they watched: it is still going.
      const state = (await owner.clients.dispatches.getDispatch({ dispatchId })).dispatch?.state;
      expect([Dispatch_State.QUEUED, Dispatch_State.STARTING, Dispatch_State.RUNNING]).toContain(state);
    } finally {
      await owner.clients.dispatches.cancelDispatch({ dispatchId }).catch(() => {});
    }
  });
});

describe("open streams and revocation, before their answer began (stand-in services)", () => {
  const KEY = `otp_${"5e".repeat(32)}`;
  let lookups: "valid" | "gateway refused" | "revoked" = "valid";
  let edge: StandInGateway;

  beforeAll(async () => {
    const never = (signal: AbortSignal) => new Promise<void>((resolve) => signal.addEventListener("abort", () => resolve(), { once: true }));
    edge = await startStandInGateway({
      adminToken: "admin-token-for-the-stand-in-0123456789",
      env: { OUTPOST_AUTH_CACHE_TTL_MS: "100", OUTPOST_GATEWAY_STREAM_RECHECK_MS: "150" },
      routes(router) {
        router.service(TenantInternalService, {
          authenticateApiKey() {
            if (lookups === "revoked") throw unauthenticated("API_KEY_REVOKED", "the API key has been revoked");
            // The tenant service refusing the gateway's own call (its signed identity expired).
            if (lookups === "gateway refused") throw unauthenticated("IDENTITY_EXPIRED", "the signed identity has expired");
            return { tenant: { id: "01JTENANTSTANDIN0000000000" }, apiKeyId: "stand-in" };
          },
        } as never);
        // Streams that send nothing until the call ends: no answer has begun when the key goes.
        router.service(DispatchService, { async *watchDispatch(_req: unknown, ctx: { signal: AbortSignal }) { await never(ctx.signal); yield* []; } } as never);
        router.service(LogService, { async *subscribeLogs(_req: unknown, ctx: { signal: AbortSignal }) { await never(ctx.signal); yield* []; } } as never);
      },
    });
  });

  afterAll(() => edge?.stop());

  it("keeps streams open while the lookups fail for the gateway's own sake, and ends them, with no message sent, once the key is refused", async () => {
    const dispatchId = "01JDISPATCHSTANDIN00000000";
    const streams = transportsFor(KEY, edge.url).map(([name, transport]) => ({
      name,
      stream: follow(client(DispatchService, transport).watchDispatch({ dispatchId }, { timeoutMs: 30_000 })),
    }));
    const [, h1] = transportsFor(KEY, edge.url)[0]!;
    streams.push({ name: "subscribe logs, connect json h1", stream: follow(client(LogService, h1).subscribeLogs({ dispatchId }, { timeoutMs: 30_000 })) });
    let endedCount = 0;
    for (const { stream } of streams) void stream.ended.then(() => endedCount++);
    const watched = async () => sample(await scrape(edge.url), "outpost_gateway_watched_streams") ?? 0;
    await vi.waitFor(async () => expect(await watched()).toBe(streams.length), { timeout: 5000, interval: 20 });

    // Several re-checks while the tenant service refuses the gateway itself: nothing ends.
    lookups = "gateway refused";
    await new Promise((r) => setTimeout(r, 800));
    expect(endedCount).toBe(0);
    expect(await watched()).toBe(streams.length);

    lookups = "revoked";
    for (const { name, stream } of streams) {
      const end = await stream.ended;
      expect([name, end.error?.code, end.error && errorInfoOf(end.error)?.reason, stream.messages.length]).toEqual([name, Code.Unauthenticated, "API_KEY_REVOKED", 0]);
    }
    expect(await watched()).toBe(0);
  });
});
