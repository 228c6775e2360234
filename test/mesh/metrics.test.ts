/**
 * Prometheus metrics and logs of the real processes (SPEC L4): after one dispatch through the
 * gateway, GET /metrics on every service answers the exposition format with RPC counts and
 * latency histograms by method and code, plus each service's domain metrics; every log line
 * is JSON, and no log line holds the tenant's API key.
 */
import { execFileSync } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import path from "node:path";
import Docker from "dockerode";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { REPO_ROOT, SERVICES } from "../../scripts/lib/mesh.ts";
import { sample, scrape } from "../support/metrics.ts";
import { startTestMesh, type TestMesh } from "./harness.ts";

let t: TestMesh;

beforeAll(async () => {
  await new Docker().ping();
  execFileSync("bash", [path.join(REPO_ROOT, "test/fixtures/agents/build.sh")], { stdio: "inherit" });
  t = await startTestMesh();
});

afterAll(async () => {
  await t?.mesh.stop();
});

describe("metrics and logs of the real processes", () => {
  it("scrapes RPC and domain metrics from every service after a dispatch, and no log holds the API key", async () => {
    const tenant = await t.newTenant("Metrics");
    const lines = 40;
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: `lines=${lines}` });
    let end;
    for await (const msg of tenant.clients.logs.subscribeLogs({ dispatchId: dispatch!.id })) end = msg.runEnd;
    expect(end?.state).toBe(Dispatch_State.SUCCEEDED);
    // A call that fails with NOT_FOUND, to see a non-ok code counted.
    await expect(tenant.clients.dispatches.getDispatch({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" })).rejects.toThrow();
    // The executor reports the end before it has finished tidying up the run: wait (bounded)
    // until its gauge has come back down, then scrape everything.
    for (let i = 0; i < 50 && sample(await scrape(t.mesh.urls.executor), "outpost_executor_running_containers") !== 0; i++) {
      await new Promise((resolve) => setTimeout(resolve, 100));
    }

    const text = Object.fromEntries(await Promise.all(SERVICES.map(async (s) => [s, await scrape(t.mesh.urls[s])] as const)));
    for (const s of SERVICES) {
      expect(text[s], s).toContain("# TYPE outpost_rpc_requests_total counter");
      expect(text[s], s).toContain("# TYPE outpost_rpc_duration_seconds histogram");
      expect(text[s], s).toContain(`service="${s}"`);
      expect(text[s], s).toContain("# TYPE process_resident_memory_bytes gauge");
    }
    const created = 'method="outpost.dispatch.v1.DispatchService/CreateDispatch"';
    expect(sample(text.gateway!, "outpost_rpc_requests_total", created, 'code="ok"')).toBeGreaterThanOrEqual(1);
    expect(sample(text.dispatcher!, "outpost_rpc_requests_total", created, 'code="ok"')).toBeGreaterThanOrEqual(1);
    expect(sample(text.gateway!, "outpost_rpc_requests_total", "DispatchService/GetDispatch", 'code="not_found"')).toBeGreaterThanOrEqual(1);
    expect(sample(text.gateway!, "outpost_rpc_duration_seconds_count", created, 'code="ok"')).toBeGreaterThanOrEqual(1);
    expect(sample(text.gateway!, "outpost_rpc_duration_seconds_bucket", created, 'le="+Inf"')).toBeGreaterThanOrEqual(1);
    expect(text.gateway).toContain("# TYPE outpost_rate_limit_rejections_total counter");
    expect(sample(text.telemetry!, "outpost_rpc_requests_total", "LogIngestService/IngestLogs", 'code="ok"')).toBeGreaterThanOrEqual(1);

    // Domain metrics.
    expect(sample(text.telemetry!, "outpost_log_lines_ingested_total", 'stream="stdout"')).toBeGreaterThanOrEqual(lines);
    expect(sample(text.telemetry!, "outpost_log_bytes_ingested_total", 'stream="stdout"')).toBeGreaterThanOrEqual(lines * "line 1".length);
    expect(sample(text.telemetry!, "outpost_log_subscribers")).toBe(0);
    expect(sample(text.dispatcher!, "outpost_dispatch_queue_depth")).toBe(0);
    expect(sample(text.dispatcher!, "outpost_dispatch_active_leases")).toBe(0);
    expect(sample(text.executor!, "outpost_executor_running_containers")).toBe(0);
    expect(sample(text.executor!, "outpost_executor_slots")).toBeGreaterThanOrEqual(1);

    // Logs: JSON on every line, RPC lines with trace ids, and never the key.
    const files = readdirSync(path.join(t.dir, "logs"));
    expect(files.length).toBeGreaterThanOrEqual(5);
    let rpcLines = 0;
    for (const file of files) {
      const content = readFileSync(path.join(t.dir, "logs", file), "utf8");
      expect(content.includes(tenant.apiKey), `${file} holds the API key`).toBe(false);
      expect(content.includes(t.adminToken), `${file} holds the admin token`).toBe(false);
      for (const line of content.split("\n").filter((l) => l.trim() !== "")) {
        const entry = JSON.parse(line) as { msg?: string; trace_id?: string };
        if (entry.msg === "rpc") {
          rpcLines++;
          expect(entry.trace_id).toMatch(/^[0-9a-f]{32}$/);
        }
      }
    }
    expect(rpcLines).toBeGreaterThan(0);
  });
});
