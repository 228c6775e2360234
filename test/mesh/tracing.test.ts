/**
 * OpenTelemetry across the real mesh (SPEC L4): every process exports spans with the standard
 * OTEL_* variables to a tiny OTLP/HTTP JSON receiver run by this test; one dispatch created
 * with a known traceparent yields one trace that covers the gateway, dispatcher, executor and
 * telemetry, the container sees the trace in TRACEPARENT, and log lines carry the trace id.
 */
import { execFileSync } from "node:child_process";
import http from "node:http";
import { readFileSync } from "node:fs";
import type net from "node:net";
import path from "node:path";
import { randomBytes } from "node:crypto";
import Docker from "dockerode";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { REPO_ROOT } from "../../scripts/lib/mesh.ts";
import { startTestMesh, type TestMesh } from "./harness.ts";

interface ReceivedSpan {
  service: string;
  traceId: string;
  spanId: string;
  parentSpanId: string;
  name: string;
  kind: number;
}

interface OtlpJson {
  resourceSpans?: Array<{
    resource?: { attributes?: Array<{ key: string; value: { stringValue?: string } }> };
    scopeSpans?: Array<{ spans?: Array<{ traceId: string; spanId: string; parentSpanId?: string; name: string; kind: number }> }>;
  }>;
}

const spans: ReceivedSpan[] = [];
let receiver: http.Server;
let t: TestMesh;

/** OTLP/HTTP with JSON bodies (OTEL_EXPORTER_OTLP_PROTOCOL=http/json): POST /v1/traces. */
function startReceiver(): Promise<number> {
  receiver = http.createServer((req, res) => {
    const body: Buffer[] = [];
    req.on("data", (d: Buffer) => body.push(d));
    req.on("end", () => {
      if (req.url === "/v1/traces") {
        const payload = JSON.parse(Buffer.concat(body).toString("utf8")) as OtlpJson;
        for (const rs of payload.resourceSpans ?? []) {
          const service = rs.resource?.attributes?.find((a) => a.key === "service.name")?.value.stringValue ?? "";
          for (const ss of rs.scopeSpans ?? []) {
            for (const s of ss.spans ?? []) {
              spans.push({ service, traceId: s.traceId, spanId: s.spanId, parentSpanId: s.parentSpanId ?? "", name: s.name, kind: s.kind });
            }
          }
        }
      }
      res.writeHead(200, { "content-type": "application/json" });
      res.end("{}");
    });
  });
  return new Promise((resolve) => receiver.listen(0, "127.0.0.1", () => resolve((receiver.address() as net.AddressInfo).port)));
}

beforeAll(async () => {
  await new Docker().ping();
  execFileSync("bash", [path.join(REPO_ROOT, "test/fixtures/agents/build.sh")], { stdio: "inherit" });
  const port = await startReceiver();
  t = await startTestMesh({
    env: {
      OTEL_TRACES_EXPORTER: "otlp",
      OTEL_EXPORTER_OTLP_ENDPOINT: `http://127.0.0.1:${port}`,
      OTEL_EXPORTER_OTLP_PROTOCOL: "http/json",
    },
  });
});

afterAll(async () => {
  await t?.mesh.stop();
  receiver?.close();
});

describe("one trace across the mesh", () => {
  it("covers gateway, dispatcher, executor and telemetry for one dispatch, and reaches the container", async () => {
    const tenant = await t.newTenant("Tracing");
    const traceId = randomBytes(16).toString("hex");
    const traceparent = `00-${traceId}-${randomBytes(8).toString("hex")}-01`;
    const { dispatch } = await tenant.clients.dispatches.createDispatch(
      { agent: "demo", task: "lines=5 print=TRACEPARENT" },
      { headers: { traceparent } },
    );
    const id = dispatch!.id;
    const lines: string[] = [];
    let end;
    for await (const msg of tenant.clients.logs.subscribeLogs({ dispatchId: id })) {
      lines.push(...msg.chunks.map((c) => c.text));
      end = msg.runEnd;
    }
    expect(end?.state).toBe(Dispatch_State.SUCCEEDED);
    // The container's environment carries the same trace.
    expect(lines.find((l) => l.startsWith("TRACEPARENT="))).toMatch(new RegExp(`^TRACEPARENT=00-${traceId}-[0-9a-f]{16}-01$`));

    // Spans are batched (500 ms) by every process, and the run span ends after the run: wait
    // until all four services reported and the run span arrived.
    const want = ["outpost-gateway", "outpost-dispatcher", "outpost-executor", "outpost-telemetry"];
    const deadline = Date.now() + 20_000;
    const inTrace = () => spans.filter((s) => s.traceId === traceId);
    const complete = () => want.every((svc) => inTrace().some((s) => s.service === svc)) && inTrace().some((s) => s.name === "executor.run");
    while (Date.now() < deadline && !complete()) {
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    const trace = inTrace();
    for (const svc of want) expect(trace.some((s) => s.service === svc), svc).toBe(true);

    const names = (svc: string) => trace.filter((s) => s.service === svc).map((s) => s.name);
    expect(names("outpost-gateway")).toContain("outpost.dispatch.v1.DispatchService/CreateDispatch");
    expect(names("outpost-executor")).toContain("executor.run");
    expect(names("outpost-telemetry")).toContain("outpost.telemetry.v1.LogIngestService/IngestLogs");
    // Connected: every span's parent is in the trace, except the root's (the client's own span id).
    const ids = new Set(trace.map((s) => s.spanId));
    const orphans = trace.filter((s) => s.parentSpanId !== "" && !ids.has(s.parentSpanId));
    expect(new Set(orphans.map((s) => s.parentSpanId)).size).toBe(1);
    // The executor's run span is a child of the span that created the dispatch's traceparent.
    const runSpan = trace.find((s) => s.name === "executor.run")!;
    expect(ids.has(runSpan.parentSpanId)).toBe(true);

    // Logs are JSON and carry the trace id of the call they belong to.
    const gatewayLog = readFileSync(path.join(t.dir, "logs", "gateway.log"), "utf8").trim().split("\n");
    const parsed = gatewayLog.map((l) => JSON.parse(l) as { trace_id?: string });
    expect(parsed.some((l) => l.trace_id === traceId)).toBe(true);
  });
});
