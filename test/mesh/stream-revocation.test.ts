/**
 * Open streams end when their key is revoked or their tenant suspended (SPEC G2, T2), over the
 * real mesh and every way a client can hold a stream at the edge: Connect JSON over HTTP/1.1 and
 * binary over HTTP/2 and gRPC (the gateway's raw path), gRPC-Web (its Connect path). This mesh
 * has no Redis, so no invalidation reaches the gateway: the periodic re-check
 * (OUTPOST_GATEWAY_STREAM_RECHECK_MS, here 300 ms) finds the key refused once its cached trust
 * (OUTPOST_AUTH_CACHE_TTL_MS, 2 s) has expired. With Redis they end at once:
 * test/mesh/edge-redis.test.ts. The logic: gateway/test/open-streams.test.ts.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { DescService } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import { errorInfoOf } from "@outpost/platform";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { DispatchService } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { LogService } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { sample, scrape } from "../support/metrics.ts";
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
function transportsFor(apiKey: string): [string, Transport][] {
  const baseUrl = t.mesh.urls.gateway;
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

async function waitFor(check: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const started = Date.now();
  while (!check()) {
    if (Date.now() - started > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
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
      // Every watch has its first message (the dispatch as it is): the streams are open.
      await waitFor(() => revokedStreams.filter((s) => s.name.startsWith("subscribe") === false).every((s) => s.stream.messages.length > 0) && kept.messages.length > 0, "the watches' first messages");

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
