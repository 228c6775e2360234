/**
 * Tracing and metrics in the platform (SPEC L4), over a real loopback port: server spans
 * continue the caller's trace (streams included), internal clients propagate a child span's
 * context, GET /metrics counts RPCs by method and code with latency histograms, and the OTEL_*
 * exporter selection is parsed strictly.
 */
import { create } from "@bufbuild/protobuf";
import { createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import {
  counter,
  currentTrace,
  currentTraceparent,
  gauge,
  internalClient,
  notFound,
  startServer,
  tracesExportersFromEnv,
  withSpan,
  type RunningServer,
} from "@outpost/platform";
import { GetLogsResponseSchema, LogService, SubscribeLogsResponseSchema } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { silentLogger } from "./helpers.ts";
import { keysOf } from "../../../test/support/signing.ts";


/** A downstream server that answers the trace id and parent span it saw. */
let downstream: RunningServer;
/** An upstream server whose GetLogs calls downstream with the platform client. */
let upstream: RunningServer;

beforeAll(async () => {
  downstream = await startServer({
    name: "obs-down",
    host: "127.0.0.1",
    port: 0,
    logger: silentLogger,
    signingKeys: keysOf("dispatcher"),
    routes(router) {
      router.service(LogService, {
        async getLogs(_req, ctx) {
          return create(GetLogsResponseSchema, { nextPageToken: `${currentTrace()?.traceId}/${ctx.requestHeader.get("traceparent")}` });
        },
        async *subscribeLogs() {
          await new Promise((resolve) => setTimeout(resolve, 5));
          yield create(SubscribeLogsResponseSchema, { chunks: [{ seq: 1n, text: currentTrace()?.traceId ?? "none" }] });
        },
      });
    },
  });
  const down = internalClient(LogService, { baseUrl: downstream.url, signingKeys: keysOf("dispatcher"), identity: { kind: "service", principal: "dispatcher/obs" } });
  upstream = await startServer({
    name: "obs-up",
    host: "127.0.0.1",
    port: 0,
    logger: silentLogger,
    signingKeys: undefined,
    routes(router) {
      router.service(LogService, {
        async getLogs(req) {
          if (req.dispatchId === "missing") throw notFound("dispatch", "missing");
          const res = await down.getLogs({});
          return create(GetLogsResponseSchema, { nextPageToken: `${currentTrace()?.spanId}|${res.nextPageToken}` });
        },
        async *subscribeLogs() {
          yield* [];
        },
      });
    },
  });
});

afterAll(async () => {
  await upstream?.close();
  await downstream?.close();
});

describe("traces", () => {
  it("continues the caller's trace and propagates a client span to the next service", async () => {
    const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";
    const client = createClient(LogService, createConnectTransport({ baseUrl: upstream.url, httpVersion: "1.1" }));
    const res = await client.getLogs({ dispatchId: "x" }, { headers: { traceparent: `00-${traceId}-00f067aa0ba902b7-01` } });
    const [upSpan, rest] = res.nextPageToken.split("|") as [string, string];
    const [downTrace, downTraceparent] = rest.split("/") as [string, string];
    expect(downTrace).toBe(traceId);
    const m = /^00-([0-9a-f]{32})-([0-9a-f]{16})-01$/.exec(downTraceparent);
    expect(m?.[1]).toBe(traceId);
    // The downstream call's parent is the client span: neither the caller's span nor the upstream server span.
    expect(m?.[2]).not.toBe("00f067aa0ba902b7");
    expect(m?.[2]).not.toBe(upSpan);
  });

  it("keeps the span active inside a server stream", async () => {
    const traceId = "0af7651916cd43dd8448eb211c80319c";
    // The stream's handler body runs after the interceptor returned: the span must still be active there.
    const internal = internalClient(LogService, { baseUrl: downstream.url, signingKeys: keysOf("tenant"), identity: { kind: "service", principal: "tenant/1" } });
    const texts: string[] = [];
    await withSpan("test-parent", { traceparent: `00-${traceId}-b7ad6b7169203331-01` }, async () => {
      for await (const msg of internal.subscribeLogs({ dispatchId: "s" })) texts.push(...msg.chunks.map((c) => c.text));
    });
    expect(texts).toEqual([traceId]);
  });

  it("withSpan makes a child of a given traceparent the active span", async () => {
    const traceId = "11112222333344445555666677778888";
    const seen = await withSpan("work", { traceparent: `00-${traceId}-aaaabbbbccccdddd-01` }, async () => currentTraceparent());
    expect(seen).toMatch(new RegExp(`^00-${traceId}-[0-9a-f]{16}-01$`));
    expect(seen).not.toContain("aaaabbbbccccdddd");
  });

  it("reads the exporters from OTEL_* variables and rejects unknown ones", () => {
    expect(tracesExportersFromEnv({})).toEqual([]);
    expect(tracesExportersFromEnv({ OTEL_EXPORTER_OTLP_ENDPOINT: "http://127.0.0.1:4318" })).toEqual(["otlp"]);
    expect(tracesExportersFromEnv({ OTEL_TRACES_EXPORTER: "console, otlp" })).toEqual(["console", "otlp"]);
    expect(tracesExportersFromEnv({ OTEL_TRACES_EXPORTER: "none", OTEL_EXPORTER_OTLP_ENDPOINT: "http://x" })).toEqual([]);
    expect(tracesExportersFromEnv({ OTEL_TRACES_EXPORTER: "otlp", OTEL_SDK_DISABLED: "true" })).toEqual([]);
    expect(() => tracesExportersFromEnv({ OTEL_TRACES_EXPORTER: "zipkin" })).toThrow(/zipkin/);
  });
});

describe("metrics", () => {
  it("answers GET /metrics with RPC counts by method and code and latency histograms", async () => {
    const client = createClient(LogService, createConnectTransport({ baseUrl: upstream.url, httpVersion: "1.1" }));
    const count = (text: string, code: string) => {
      const line = text.split("\n").find((l) => l.startsWith("outpost_rpc_requests_total{") && l.includes('method="outpost.telemetry.v1.LogService/GetLogs"') && l.includes(`code="${code}"`));
      return line ? Number(line.split(" ").at(-1)) : 0;
    };
    const before = await (await fetch(`${upstream.url}/metrics`)).text();
    await client.getLogs({ dispatchId: "a" });
    await client.getLogs({ dispatchId: "b" });
    await expect(client.getLogs({ dispatchId: "missing" })).rejects.toThrow();
    const res = await fetch(`${upstream.url}/metrics`);
    expect(res.status).toBe(200);
    const text = await res.text();
    // Both servers share this process's registry: upstream's two ok calls plus downstream's two.
    expect(count(text, "ok") - count(before, "ok")).toBe(4);
    expect(count(text, "not_found") - count(before, "not_found")).toBe(1);
    expect(text).toMatch(/outpost_rpc_duration_seconds_bucket\{[^}]*le="0\.005"[^}]*method="outpost\.telemetry\.v1\.LogService\/GetLogs"/);
    expect(text).toContain("# TYPE outpost_rate_limit_rejections_total counter");
  });

  it("serves metrics on a separate port when asked, and then not on the main one", async () => {
    const server = await startServer({
      name: "obs-metrics-port",
      host: "127.0.0.1",
      port: 0,
      metricsPort: 0,
      logger: silentLogger,
      signingKeys: undefined,
      routes() {},
    });
    try {
      expect(server.metricsUrl).not.toBe(server.url);
      const separate = await fetch(`${server.metricsUrl}/metrics`);
      expect(separate.status).toBe(200);
      expect(await separate.text()).toContain("outpost_rpc_requests_total");
      const main = await fetch(`${server.url}/metrics`);
      expect(await main.text()).not.toContain("outpost_rpc_requests_total");
    } finally {
      await server.close();
    }
  });

  it("registers domain metrics idempotently, with values read at scrape time", async () => {
    let depth = 3;
    gauge("obs_test_depth", "test gauge", [], (g) => g.set(depth));
    gauge("obs_test_depth", "test gauge", [], (g) => g.set(-1)); // same name: the first stays
    counter("obs_test_total", "test counter").inc(2);
    counter("obs_test_total", "test counter").inc();
    depth = 7;
    const text = await (await fetch(`${upstream.url}/metrics`)).text();
    expect(text).toMatch(/^obs_test_depth\{service="[^"]+"\} 7$/m);
    expect(text).toMatch(/^obs_test_total\{service="[^"]+"\} 3$/m);
  });
});
