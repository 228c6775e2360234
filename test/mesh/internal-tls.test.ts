/**
 * Internal mutual TLS across the real mesh (docs/operations.md, "Internal TLS"): every process
 * serves and presents a certificate of one CA, internal URLs are https://, and the gateway's
 * public port serves TLS too. A dispatch whose secret travels from the tenant service to the
 * executor runs on the arm64 engine and streams its output back through it all; a caller holding
 * a valid signed identity but no certificate is refused by every service, and one speaking
 * cleartext gets nothing.
 */
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import https from "node:https";
import os from "node:os";
import path from "node:path";
import { Code, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import Docker from "dockerode";
import { followLogs } from "@outpost/cli";
import { errorInfoOf } from "@outpost/platform";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { AgentService } from "@outpost/proto/outpost/dispatch/v1/agent_service_pb.js";
import { DispatchService } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { LogIngestService } from "@outpost/proto/outpost/telemetry/v1/log_ingest_service_pb.js";
import { TenantInternalService } from "@outpost/proto/outpost/tenant/v1/tenant_internal_service_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { freePort, SERVICES } from "../../scripts/lib/mesh.ts";
import { makeTlsCerts, type TlsCertSet } from "../../scripts/lib/tls-certs.ts";
import { signAs } from "../support/signing.ts";
import { startTestMesh, type TestMesh } from "./harness.ts";
import { errorOf } from "../support/rpc.ts";

const MASTER_KEYS = `tls1:${Buffer.alloc(32, 7).toString("base64")}`;

let t: TestMesh;
let certs: TlsCertSet;
let certDir: string;
let dispatcherMetricsPort: number;

beforeAll(async () => {
  await new Docker().ping();
  certDir = mkdtempSync(path.join(os.tmpdir(), "outpost-mesh-tls-"));
  certs = makeTlsCerts(certDir, SERVICES);
  dispatcherMetricsPort = await freePort();
  t = await startTestMesh({
    tls: { certs, publicGateway: true },
    serviceEnv: { tenant: { OUTPOST_SECRETS_MASTER_KEYS: MASTER_KEYS }, dispatcher: { OUTPOST_DISPATCHER_METRICS_PORT: String(dispatcherMetricsPort) } },
  });
});

afterAll(async () => {
  await t?.mesh.stop();
  rmSync(certDir, { recursive: true, force: true });
});

describe("the mesh over mutual TLS", () => {
  it("runs a dispatch with a secret end to end: every hop is https", async () => {
    for (const name of SERVICES) expect(t.mesh.urls[name], name).toMatch(/^https:\/\//);
    const tenant = await t.newTenant("Over TLS");
    const value = `sk-tls-${Date.now().toString(36)}`;
    await tenant.clients.secrets.putSecret({ name: "TLS_SECRET", value });
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "print=TLS_SECRET exit=0", secretNames: ["TLS_SECRET"] });
    const lines: string[] = [];
    const end = await followLogs(tenant.clients.logs, dispatch!.id, (chunk) => lines.push(chunk.text));
    expect(end.state).toBe(Dispatch_State.SUCCEEDED);
    const all = lines.join("\n");
    expect(all).toContain("aarch64");
    expect(all).toContain("[REDACTED:TLS_SECRET]");
    expect(all).not.toContain(value);
  });

  it("the gateway serves gRPC and gRPC-Web over TLS too (HTTP/2 by ALPN), forwarding over the internal TLS hops", async () => {
    const tenant = await t.newTenant("gRPC over TLS");
    const auth: Interceptor = (next) => (req) => {
      req.header.set("authorization", `Bearer ${tenant.apiKey}`);
      return next(req);
    };
    const ca = readFileSync(certs.ca);
    for (const transport of [
      createGrpcTransport({ baseUrl: t.mesh.urls.gateway, nodeOptions: { ca }, interceptors: [auth] }),
      createGrpcWebTransport({ baseUrl: t.mesh.urls.gateway, httpVersion: "2", nodeOptions: { ca }, interceptors: [auth] }),
    ]) {
      const agents = await createClient(AgentService, transport).listAgents({});
      expect(agents.agents.map((a) => a.name)).toContain("demo");
      const dispatches = createClient(DispatchService, transport);
      const err = await errorOf(dispatches.getDispatch({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }));
      expect(err.code).toBe(Code.NotFound);
    }
  });

  // The executor serves no RPC (health only, which is open to probes); its port's TLS is checked below.
  it("every internal service refuses an RPC without a client certificate, though its identity is validly signed", async () => {
    const ca = readFileSync(certs.ca);
    const calls: Record<string, (baseUrl: string) => Promise<unknown>> = {
      tenant: (baseUrl) => {
        const client = createClient(TenantInternalService, createGrpcTransport({ baseUrl, nodeOptions: { ca }, interceptors: [signed("gateway")] }));
        return client.authenticateApiKey({ apiKey: `otp_${"0".repeat(64)}` });
      },
      dispatcher: (baseUrl) => {
        const client = createClient(DispatchService, createGrpcTransport({ baseUrl, nodeOptions: { ca }, interceptors: [signed("tenant")] }));
        return client.getDispatch({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" });
      },
      telemetry: (baseUrl) => {
        const client = createClient(LogIngestService, createGrpcTransport({ baseUrl, nodeOptions: { ca }, interceptors: [signed("dispatcher")] }));
        return client.registerRun({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV", tenantId: "t" });
      },
    };
    for (const [name, call] of Object.entries(calls)) {
      const err = await errorOf(call(t.mesh.urls[name as keyof typeof t.mesh.urls]));
      expect(err.code, name).toBe(Code.Unauthenticated);
      expect(errorInfoOf(err)?.reason, name).toBe("CLIENT_CERTIFICATE_REQUIRED");
    }
  });

  it("serves metrics in the clear on a port of their own, for a scraper without TLS set-up, and not on the TLS port", async () => {
    const scraped = await fetch(`http://127.0.0.1:${dispatcherMetricsPort}/metrics`);
    expect(scraped.status).toBe(200);
    expect(await scraped.text()).toContain("outpost_dispatch_queue_depth");
    const onRpcPort = await new Promise<number>((resolve, reject) => {
      https.get(`${t.mesh.urls.dispatcher}/metrics`, { ca: readFileSync(certs.ca) }, (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      }).once("error", reject);
    });
    expect(onRpcPort).toBe(404);
  });

  it("a cleartext client gets nothing from any port, the gateway's included", async () => {
    for (const name of SERVICES) {
      const url = t.mesh.urls[name].replace("https:", "http:");
      const res = await fetch(`${url}/healthz`, { signal: AbortSignal.timeout(5000) }).then(
        (r) => `answered ${r.status}`,
        (err: Error) => (err.name === "TimeoutError" ? "hung" : "refused"),
      );
      expect(res, name).toBe("refused");
    }
  });
});

/** Signs each call as the gateway or a service would, with the test key set the mesh trusts. */
function signed(as: "tenant" | "gateway" | "dispatcher"): Interceptor {
  const identity = as === "tenant" ? ({ kind: "tenant", tenantId: "t1", principal: "key/k1" } as const) : ({ kind: "service", principal: as } as const);
  return (next) => (req) => {
    signAs(req.header, identity, req.service);
    return next(req);
  };
}
