/**
 * The walking skeleton across real sockets between real processes (issue #2): a tenant and
 * key, the gateway's authentication and forwarding, a dispatch leased by the executor and run
 * as a linux/arm64 container on the real Docker engine, its output streamed live through
 * telemetry, the exit code reported, and the guarantees around them.
 */
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import http2 from "node:http2";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport, createGrpcWebTransport, createConnectTransport } from "@connectrpc/connect-node";
import Docker from "dockerode";
import { followLogs } from "@outpost/cli";
import { generateSigningKeySet, internalClient, errorInfoOf, SigningKeys, parseSigningKey, signingKeysOf } from "@outpost/platform";
import { keysOf, signAs, TEST_SIGNING_KEY_SET } from "../support/signing.ts";
import { Dispatch_State, type ModelTier } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { DispatchService, GetDispatchRequestSchema } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { Health, HealthCheckResponse_ServingStatus } from "@outpost/proto/grpc/health/v1/health_pb.js";
import { LogService } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { LogIngestService } from "@outpost/proto/outpost/telemetry/v1/log_ingest_service_pb.js";
import { LeaseService } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { ApiKeyService, TenantService } from "@outpost/proto/outpost/tenant/v1/tenant_service_pb.js";
import { startTestMesh, type TestMesh } from "./harness.ts";
import { envelope, envelopesOf } from "../support/envelopes.ts";
import { REPO_ROOT, SERVICE_NODE_OPTIONS, SERVICES } from "../../scripts/lib/mesh.ts";

const docker = new Docker();
let t: TestMesh;
let tenant: Awaited<ReturnType<TestMesh["newTenant"]>>;

beforeAll(async () => {
  await docker.ping(); // CI installs and starts the engine; without it these tests must fail, not pass
  t = await startTestMesh();
  tenant = await t.newTenant("Skeleton");
});

afterAll(async () => {
  await t?.mesh.stop();
});

async function runToEnd(task: string, clients = tenant.clients) {
  const { dispatch } = await clients.dispatches.createDispatch({ agent: "demo", task });
  const lines: string[] = [];
  const end = await followLogs(clients.logs, dispatch!.id, (chunk) => lines.push(chunk.text));
  const { dispatch: final } = await clients.dispatches.getDispatch({ dispatchId: dispatch!.id });
  return { id: dispatch!.id, lines, end, final: final! };
}

describe("one arm64 dispatch end to end", () => {
  it("runs the demo agent as linux/arm64, streams its output and reports success", async () => {
    const run = await runToEnd("hello from the test");
    expect(run.id).toMatch(/^[0-9A-HJKMNP-TV-Z]{26}$/);
    // The demo agent's lines, in the order it printed them.
    const starting = run.lines.indexOf("outpost demo agent starting");
    const arch = run.lines.indexOf("aarch64");
    const done = run.lines.indexOf("done, exit code 0");
    expect(starting).toBeGreaterThanOrEqual(0);
    expect(arch).toBeGreaterThan(starting);
    expect(done).toBeGreaterThan(arch);
    expect(run.end.state).toBe(Dispatch_State.SUCCEEDED);
    expect(run.final.state).toBe(Dispatch_State.SUCCEEDED);
    expect(run.final.exitCode).toBe(0);
    expect(run.final.attempt).toBe(1);
    expect(run.final.startTime).toBeDefined();
    expect(run.final.endTime).toBeDefined();
  });

  it("reports the agent's exit code and fails the run", async () => {
    const run = await runToEnd("fail on purpose exit=3");
    expect(run.end.state).toBe(Dispatch_State.FAILED);
    expect(run.final.state).toBe(Dispatch_State.FAILED);
    expect(run.final.exitCode).toBe(3);
    expect(run.final.failureReason).toContain("3");
  });

  it("labels the running container with the dispatch id and removes it afterwards", async () => {
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "linger sleep=3" });
    const filters = { label: [`dev.outpost.dispatch-id=${dispatch!.id}`] };
    let seen: Docker.ContainerInfo[] = [];
    for (let i = 0; i < 100 && seen.length === 0; i++) {
      seen = await docker.listContainers({ all: true, filters });
      if (seen.length === 0) await new Promise((r) => setTimeout(r, 100));
    }
    expect(seen).toHaveLength(1);
    const inspected = await docker.getContainer(seen[0]!.Id).inspect();
    expect(inspected.Config.Labels["dev.outpost.dispatch-id"]).toBe(dispatch!.id);
    const image = await docker.getImage(inspected.Image).inspect();
    expect(image.Architecture).toBe("arm64");
    await followLogs(tenant.clients.logs, dispatch!.id, () => {});
    for (let i = 0; i < 50 && (await docker.listContainers({ all: true, filters })).length > 0; i++) {
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(await docker.listContainers({ all: true, filters })).toHaveLength(0);
  });

  it("walks QUEUED → STARTING → RUNNING → SUCCEEDED, seen by WatchDispatch", async () => {
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "watch me sleep=1" });
    const states: Dispatch_State[] = [];
    for await (const { dispatch: d } of tenant.clients.dispatches.watchDispatch({ dispatchId: dispatch!.id })) {
      if (states.at(-1) !== d!.state) states.push(d!.state);
    }
    // An idle executor may lease the run before the watch begins, so the first state seen varies.
    const order = [Dispatch_State.QUEUED, Dispatch_State.STARTING, Dispatch_State.RUNNING, Dispatch_State.SUCCEEDED];
    expect(order).toContain(states[0]);
    expect(states).toContain(Dispatch_State.RUNNING);
    expect(states.at(-1)).toBe(Dispatch_State.SUCCEEDED);
    expect(states.every((s, i) => i === 0 || order.indexOf(s) > order.indexOf(states[i - 1]!))).toBe(true);
  });

  it("a subscriber that joins late replays from the start, and a resumed one from its sequence", async () => {
    const run = await runToEnd("lines=20");
    const numbered = run.lines.filter((l) => /^line \d+$/.test(l));
    expect(numbered).toEqual(Array.from({ length: 20 }, (_, i) => `line ${i + 1}`));
    const replay: bigint[] = [];
    await followLogs(tenant.clients.logs, run.id, (c) => replay.push(c.seq), { afterSeq: 5n });
    expect(replay[0]).toBe(6n);
    expect(replay).toEqual(replay.map((_, i) => BigInt(i + 6)));
  });
});

describe("the CLI", () => {
  function cli(args: string[], env: Record<string, string>) {
    return new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
      const child = spawn(process.execPath, [path.join(REPO_ROOT, "packages/cli/src/main.ts"), ...args], {
        env: { ...process.env, OUTPOST_HOME: path.join(t.dir, "cli-home"), ...env },
      });
      let stdout = "";
      let stderr = "";
      child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
      child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
      child.on("exit", (code) => resolve({ code, stdout, stderr }));
    });
  }

  it("dispatch --follow streams the output and exits 0 on success", async () => {
    const res = await cli(["dispatch", "--agent", "demo", "--task", "cli run", "--follow", "--gateway", t.mesh.urls.gateway], {
      OUTPOST_API_KEY: tenant.apiKey,
    });
    expect(res.stderr).toContain("SUCCEEDED");
    expect(res.stdout).toContain("aarch64");
    expect(res.code).toBe(0);
  });

  it("exits non-zero with the agent's exit code when the run fails", async () => {
    const res = await cli(["dispatch", "--agent", "demo", "--task", "exit=4", "--follow", "--gateway", t.mesh.urls.gateway], {
      OUTPOST_API_KEY: tenant.apiKey,
    });
    expect(res.stderr).toContain("FAILED");
    expect(res.code).toBe(4);
  });

  it("passes --secret names on the dispatch: a missing one is refused before anything is queued", async () => {
    const res = await cli(["dispatch", "--agent", "demo", "--task", "x", "--secret", "NOT_STORED", "--gateway", t.mesh.urls.gateway], {
      OUTPOST_API_KEY: tenant.apiKey,
    });
    expect(res.code).toBe(1);
    expect(res.stderr).toContain('secret "NOT_STORED" not found');
  });

  it("says which key problem it is, and names the agents on an unknown agent", async () => {
    const noKey = await cli(["dispatch", "--agent", "demo", "--task", "x", "--gateway", t.mesh.urls.gateway], { OUTPOST_API_KEY: "otp_nope" });
    expect(noKey.code).toBe(1);
    expect(noKey.stderr).toMatch(/Unauthenticated: malformed API key/);
    const unknown = await cli(["dispatch", "--agent", "nosuch", "--task", "x", "--gateway", t.mesh.urls.gateway], { OUTPOST_API_KEY: tenant.apiKey });
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toMatch(/InvalidArgument: agent: .*available: .*demo/);
  });
});

describe("the edge", () => {
  const getReq = () => create(GetDispatchRequestSchema, { dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" });

  it("speaks Connect (HTTP/1.1 and HTTP/2), gRPC and gRPC-Web on one port", async () => {
    const auth = { authorization: `Bearer ${tenant.apiKey}` };
    const transports = {
      "connect-h1": createConnectTransport({ baseUrl: t.mesh.urls.gateway, httpVersion: "1.1" }),
      "connect-h2-binary": createConnectTransport({ baseUrl: t.mesh.urls.gateway, httpVersion: "2", useBinaryFormat: true }),
      grpc: createGrpcTransport({ baseUrl: t.mesh.urls.gateway }),
      "grpc-web": createGrpcWebTransport({ baseUrl: t.mesh.urls.gateway, httpVersion: "1.1" }),
    };
    for (const [name, transport] of Object.entries(transports)) {
      const client = createClient(DispatchService, transport);
      const err = await client.getDispatch(getReq(), { headers: auth }).catch((e: unknown) => e);
      // A well-formed id that does not exist: proves auth, forwarding and error details all crossed.
      expect(err, name).toBeInstanceOf(ConnectError);
      expect((err as ConnectError).code, name).toBe(Code.NotFound);
      expect(errorInfoOf(err as ConnectError)?.reason, name).toBe("DISPATCH_NOT_FOUND");
    }
  });

  it("refuses missing, malformed and unknown keys with UNAUTHENTICATED saying which", async () => {
    const client = createClient(DispatchService, createGrpcTransport({ baseUrl: t.mesh.urls.gateway }));
    const cases: [Record<string, string>, string][] = [
      [{}, "API_KEY_MISSING"],
      [{ authorization: "Bearer not-a-key" }, "API_KEY_MALFORMED"],
      [{ "x-api-key": `otp_${"0".repeat(64)}` }, "API_KEY_UNKNOWN"],
    ];
    for (const [headers, reason] of cases) {
      const err = (await client.getDispatch(getReq(), { headers }).catch((e: unknown) => e)) as ConnectError;
      expect(err.code, reason).toBe(Code.Unauthenticated);
      expect(errorInfoOf(err)?.reason).toBe(reason);
      expect(err.rawMessage).not.toContain(tenant.tenantId);
    }
  });

  it("keeps tenants apart: another tenant's dispatch answers exactly like a missing one", async () => {
    const other = await t.newTenant("Other");
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "mine" });
    const theirs = (await other.clients.dispatches.getDispatch({ dispatchId: dispatch!.id }).catch((e: unknown) => e)) as ConnectError;
    const missing = (await other.clients.dispatches.getDispatch({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }).catch((e: unknown) => e)) as ConnectError;
    expect(theirs.code).toBe(Code.NotFound);
    expect(errorInfoOf(theirs)?.reason).toBe(errorInfoOf(missing)?.reason);
    const logs = (await other.clients.logs.subscribeLogs({ dispatchId: dispatch!.id })[Symbol.asyncIterator]().next().catch((e: unknown) => e)) as ConnectError;
    expect(logs.code).toBe(Code.NotFound);
    const { dispatches } = await other.clients.dispatches.listDispatches({});
    expect(dispatches.map((d) => d.id)).not.toContain(dispatch!.id);
    await followLogs(tenant.clients.logs, dispatch!.id, () => {});
  });

  it("answers INVALID_ARGUMENT naming the field for bad input", async () => {
    const cases: [Parameters<typeof tenant.clients.dispatches.createDispatch>[0], string][] = [
      [{ agent: "", task: "x" }, "agent"],
      [{ agent: "demo", task: "" }, "task"],
      [{ agent: "demo", task: "x", labels: { "Bad Key": "v" } }, 'labels["Bad Key"]'],
      [{ agent: "demo", task: "x", env: { OUTPOST_TASK: "spoof" } }, "env[OUTPOST_TASK]"],
      [{ agent: "demo", task: "x", model: { case: "modelTier", value: 99 as ModelTier } }, "model_tier"],
      [{ agent: "demo", task: "x", repo: { url: "not a url", ref: "" } }, "repo.url"],
    ];
    for (const [req, field] of cases) {
      const err = (await tenant.clients.dispatches.createDispatch(req).catch((e: unknown) => e)) as ConnectError;
      expect(err.code, field).toBe(Code.InvalidArgument);
      expect(errorInfoOf(err)?.metadata.field, field).toBe(field);
    }
    const badId = (await tenant.clients.dispatches.getDispatch({ dispatchId: "nope" }).catch((e: unknown) => e)) as ConnectError;
    expect(badId.code).toBe(Code.InvalidArgument);
    expect(errorInfoOf(badId)?.metadata.field).toBe("dispatch_id");
  });
});

/** The end-of-stream message of a Connect server stream called over plain HTTP, which holds no deadline of its own. */
async function connectStreamEnd(url: string, headers: Record<string, string>, message: object): Promise<{ error?: { code: string } }> {
  const body = envelope(0, JSON.stringify(message));
  const res = await fetch(url, { method: "POST", headers: { "content-type": "application/connect+json", ...headers }, body });
  const end = envelopesOf(Buffer.from(await res.arrayBuffer())).find((e) => e.flags === 2);
  if (!end) throw new Error(`${url}: no end-of-stream message`);
  return JSON.parse(end.message.toString()) as { error?: { code: string } };
}

/**
 * The grpc-status of a gRPC call over HTTP/2 whose request stream is left open (a client stream
 * that never ends), with its deadline in grpc-timeout only: the client holds none of its own.
 */
async function openGrpcStreamStatus(baseUrl: string, methodPath: string, headers: Record<string, string>): Promise<string | undefined> {
  const session = http2.connect(baseUrl);
  try {
    return await new Promise<string | undefined>((resolve, reject) => {
      const call = session.request({ ":method": "POST", ":path": methodPath, "content-type": "application/grpc", te: "trailers", ...headers });
      // A server that never answers fails the test here rather than at the test's own timeout.
      call.setTimeout(10_000, () => reject(new Error(`${methodPath}: no status within 10 s`)));
      // The status comes in the trailers, or in the headers of a trailers-only answer; either
      // ends the call for the client, which then closes its side as a gRPC client does.
      const settle = (h: http2.IncomingHttpHeaders) => {
        const status = h["grpc-status"] as string | undefined;
        if (status === undefined) return;
        resolve(status);
        call.close();
      };
      call.on("response", settle);
      call.on("trailers", settle);
      call.on("close", () => resolve(undefined));
      call.on("error", reject);
      call.resume();
    });
  } finally {
    session.close();
  }
}

describe("deadlines", () => {
  it("a watch or log stream cut by its deadline ends DEADLINE_EXCEEDED, not OK, at the service and through the gateway", async () => {
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "long sleep=10" });
    /** The tenant's identity as the gateway signs it for `service` (each service takes only its own). */
    const direct = (service: { typeName: string }) => {
      const signed = new Headers();
      signAs(signed, { kind: "tenant", tenantId: tenant.tenantId, principal: "test" }, service);
      return Object.fromEntries(signed);
    };
    const viaGateway = { authorization: `Bearer ${tenant.apiKey}` };
    const watch = `/${DispatchService.typeName}/WatchDispatch`;
    const subscribe = `/${LogService.typeName}/SubscribeLogs`;
    const cases: [string, Record<string, string>][] = [
      [t.mesh.urls.dispatcher + watch, direct(DispatchService)],
      [t.mesh.urls.telemetry + subscribe, direct(LogService)],
      [t.mesh.urls.gateway + watch, viaGateway],
      [t.mesh.urls.gateway + subscribe, viaGateway],
    ];
    try {
      for (const [url, headers] of cases) {
        const end = await connectStreamEnd(url, { ...headers, "connect-timeout-ms": "300" }, { dispatchId: dispatch!.id });
        expect(end.error?.code, url).toBe("deadline_exceeded");
      }
      // The executor-facing streams likewise: its cancellation watch, and a log ingest stream
      // whose client keeps it open without sending.
      const executor = (service: { typeName: string }) => {
        const signed = new Headers();
        signAs(signed, { kind: "service", principal: "executor/deadline-test" }, service);
        return Object.fromEntries(signed);
      };
      const cancellations = await connectStreamEnd(
        `${t.mesh.urls.dispatcher}/${LeaseService.typeName}/WatchCancellations`,
        { ...executor(LeaseService), "connect-timeout-ms": "300" },
        { executorId: "deadline-test" },
      );
      expect(cancellations.error?.code).toBe("deadline_exceeded");
      const ingest = await openGrpcStreamStatus(t.mesh.urls.telemetry, `/${LogIngestService.typeName}/IngestLogs`, { ...executor(LogIngestService), "grpc-timeout": "300m" });
      expect(ingest).toBe(String(Code.DeadlineExceeded));
      // And the health watch every service serves.
      const healthWatch = await connectStreamEnd(`${t.mesh.urls.dispatcher}/${Health.typeName}/Watch`, { "connect-timeout-ms": "300" }, { service: "" });
      expect(healthWatch.error?.code).toBe("deadline_exceeded");
    } finally {
      await tenant.clients.dispatches.cancelDispatch({ dispatchId: dispatch!.id });
    }
  });
});

describe("trust between services", () => {
  it("a service refuses a direct call with forged or missing identity metadata", async () => {
    const asTenant = { kind: "tenant", tenantId: tenant.tenantId, principal: "forged" } as const;
    // Signed with a gateway key the mesh does not trust.
    const forgedWithWrongKey = internalClient(DispatchService, {
      baseUrl: t.mesh.urls.dispatcher,
      signingKeys: signingKeysOf(generateSigningKeySet(), "gateway"),
      identity: asTenant,
    });
    const forged = (await forgedWithWrongKey.listDispatches({}).catch((e: unknown) => e)) as ConnectError;
    expect(forged.code).toBe(Code.Unauthenticated);
    expect(errorInfoOf(forged)?.reason).toBe("IDENTITY_FORGED");
    // Signed with the mesh's real executor key: an executor may speak only as an executor, so
    // one that was broken into cannot call as a tenant (or an admin, or another service).
    for (const [role, identity] of [
      ["executor", asTenant],
      ["executor", { kind: "admin", principal: "admin" }],
      ["executor", { kind: "service", principal: "dispatcher" }],
      ["telemetry", asTenant],
    ] as const) {
      const keys = new SigningKeys(role, parseSigningKey(TEST_SIGNING_KEY_SET.signingKeys[role]));
      const overreaching = internalClient(DispatchService, { baseUrl: t.mesh.urls.dispatcher, signingKeys: keys, identity });
      const refused = (await overreaching.listDispatches({}).catch((e: unknown) => e)) as ConnectError;
      expect(refused.code, `${role} as ${identity.kind}`).toBe(Code.Unauthenticated);
      expect(errorInfoOf(refused)?.reason).toBe("IDENTITY_FORGED");
    }

    const bare = createClient(DispatchService, createGrpcTransport({ baseUrl: t.mesh.urls.dispatcher }));
    const headers = new Headers({ "outpost-identity": Buffer.from(JSON.stringify({ id: { kind: "tenant", tenantId: tenant.tenantId, principal: "x" }, exp: Date.now() + 60_000 })).toString("base64url") });
    const unsigned = (await bare.listDispatches({}, { headers }).catch((e: unknown) => e)) as ConnectError;
    expect(unsigned.code).toBe(Code.Unauthenticated);

    const apiKeyDirect = (await bare.listDispatches({}, { headers: { authorization: `Bearer ${tenant.apiKey}` } }).catch((e: unknown) => e)) as ConnectError;
    expect(apiKeyDirect.code).toBe(Code.Unauthenticated);

    // The same call signed with the gateway's real key is accepted: the refusals above are about trust.
    const signed = new Headers();
    signAs(signed, { kind: "tenant", tenantId: tenant.tenantId, principal: "test" }, DispatchService);
    await expect(bare.listDispatches({}, { headers: signed })).resolves.toBeDefined();

    // Replayed to another service: what the gateway signed for the dispatcher (and the
    // dispatcher receives with every call) is refused by the tenant service, for a tenant and
    // for the admin, so a broken-into service cannot pass on what it was sent.
    const tenantTransport = createGrpcTransport({ baseUrl: t.mesh.urls.tenant });
    const apiKeys = createClient(ApiKeyService, tenantTransport);
    const reasonOf = (err: unknown) => [ConnectError.from(err).code, errorInfoOf(ConnectError.from(err))?.reason];
    const replayed = await apiKeys.createApiKey({ displayName: "stolen" }, { headers: signed }).catch((e: unknown) => e);
    expect(reasonOf(replayed)).toEqual([Code.Unauthenticated, "IDENTITY_WRONG_AUDIENCE"]);
    const adminForDispatcher = new Headers();
    signAs(adminForDispatcher, { kind: "admin", principal: "admin" }, DispatchService);
    const adminReplayed = await createClient(TenantService, tenantTransport).createTenant({ name: "Stolen", contactEmail: "x@example.com" }, { headers: adminForDispatcher }).catch((e: unknown) => e);
    expect(reasonOf(adminReplayed)).toEqual([Code.Unauthenticated, "IDENTITY_WRONG_AUDIENCE"]);
    // Signed for the tenant service's own service, the same caller is accepted.
    const forKeys = new Headers();
    signAs(forKeys, { kind: "tenant", tenantId: tenant.tenantId, principal: "test" }, ApiKeyService);
    expect((await apiKeys.listApiKeys({}, { headers: forKeys })).apiKeys.length).toBeGreaterThan(0);
  });

  it("every process serves grpc.health.v1 and the liveness path", async () => {
    for (const name of SERVICES) {
      const health = createClient(Health, createGrpcTransport({ baseUrl: t.mesh.urls[name] }));
      const { status } = await health.check({});
      expect(status, name).toBe(HealthCheckResponse_ServingStatus.SERVING);
      expect((await fetch(`${t.mesh.urls[name]}/healthz`)).status, name).toBe(200);
    }
  });
});

describe("service processes", () => {
  it("starts every service process with the runtime's V8 flags (the young-generation cap)", () => {
    for (const name of SERVICES) {
      const pid = t.mesh.processes.get(name)?.pid;
      expect(pid, name).toBeTypeOf("number");
      const environ = readFileSync(`/proc/${pid}/environ`, "utf8").split("\0");
      expect(environ.find((e) => e.startsWith("NODE_OPTIONS=")), name).toContain(SERVICE_NODE_OPTIONS);
    }
  });
});

describe("graceful shutdown", () => {
  it("SIGTERM ends open streams cleanly and every process exits 0", async () => {
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "long sleep=20" });
    const logs = createClient(LogService, createGrpcTransport({ baseUrl: t.mesh.urls.gateway }));
    const stream = logs.subscribeLogs({ dispatchId: dispatch!.id }, { headers: { authorization: `Bearer ${tenant.apiKey}` } });
    const consumed = (async () => {
      let messages = 0;
      for await (const _ of stream) messages++;
      return messages;
    })();
    await new Promise((r) => setTimeout(r, 1500));
    expect(await t.mesh.kill("gateway")).toBe(0);
    await expect(consumed).resolves.toBeGreaterThanOrEqual(0); // ended without an error
    // With the edge gone, cancel through the dispatcher directly (as the gateway would) so the
    // executor stops the container before it is asked to stop.
    const direct = internalClient(DispatchService, {
      baseUrl: t.mesh.urls.dispatcher,
      signingKeys: keysOf("gateway"),
      identity: { kind: "tenant", tenantId: tenant.tenantId, principal: "test" },
    });
    await direct.cancelDispatch({ dispatchId: dispatch!.id });
    for await (const { dispatch: d } of direct.watchDispatch({ dispatchId: dispatch!.id })) {
      if (d!.state === Dispatch_State.CANCELLED) break;
    }
    for (const name of SERVICES.filter((n) => n !== "gateway")) {
      expect(await t.mesh.kill(name), name).toBe(0);
    }
    const gatewayLog = readFileSync(path.join(t.dir, "logs", "gateway.log"), "utf8");
    expect(gatewayLog).toContain('"msg":"closed"');
    expect(gatewayLog).not.toContain(tenant.apiKey);
  });
});
