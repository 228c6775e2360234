/** The handlers in-process: real routes behind the platform's identity check, no ports. */
import { beforeEach, describe, expect, it } from "vitest";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { durationFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import {
  checkLogGrant,
  checkSecretGrant,
  createLogger,
  errorInfoOf,
  identityInterceptor,
  LOG_GRANT_GRACE_MS,
  newExecutorKeyPair,
  signEnrollmentProof,
  type Identity,
} from "@outpost/platform";
import { AgentService } from "@outpost/proto/outpost/dispatch/v1/agent_service_pb.js";
import { Dispatch_State, ModelTier } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { DispatchService, ListDispatchesResponseSchema, type CreateDispatchRequest } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { FleetService } from "@outpost/proto/outpost/dispatch/v1/fleet_service_pb.js";
import { LeaseService } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { EnrollmentService } from "@outpost/proto/outpost/executor/v1/enrollment_service_pb.js";
import { toBinary, type MessageInitShape } from "@bufbuild/protobuf";
import type { CreateDispatchRequestSchema } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { AgentRegistry, builtinAgents } from "../src/core/agents.ts";
import { Dispatcher, type RunEvents } from "../src/core/dispatcher.ts";
import { Notifier } from "../src/core/notifier.ts";
import { registerRoutes } from "../src/routes.ts";
import { SqliteDispatchStore } from "../src/store/sqlite-store.ts";
import { ADMIN, EXECUTOR, GATEWAY, clientFor, defaultRouteDeps, expectError, tenantIdentity } from "./helpers.ts";
import { keysOf } from "../../../test/support/signing.ts";

const TENANT = "01JTENANTAAAAAAAAAAAAAAAAA";
const OTHER = "01JTENANTBBBBBBBBBBBBBBBBB";

let agents: AgentRegistry;
let dispatcher: Dispatcher;

beforeEach(() => {
  agents = new AgentRegistry(builtinAgents("outpost/demo-agent:test"));
  const runEvents: RunEvents = { async runCreated() {}, async runEnded() {} };
  dispatcher = new Dispatcher({
    store: new SqliteDispatchStore(":memory:"),
    agents,
    notifier: new Notifier(),
    runEvents,
    logger: createLogger("dispatcher-test", "silent"),
    leaseTtlMs: 30_000,
    maxTimeoutMs: 3_600_000,
  });
});

const dispatches = (identity: Identity = tenantIdentity(TENANT)) => clientFor(dispatcher, agents, DispatchService, identity);
const leases = (identity: Identity = EXECUTOR) => clientFor(dispatcher, agents, LeaseService, identity);

type CreateInit = MessageInitShape<typeof CreateDispatchRequestSchema>;
const ok: CreateInit = { agent: "claude", task: "fix it" };

async function expectInvalid(call: Promise<unknown>, field: string) {
  const err = await expectError(call, Code.InvalidArgument);
  expect(errorInfoOf(err)?.metadata.field).toBe(field);
  expect(err.rawMessage).toContain(field);
  return err;
}

describe("identity", () => {
  it("tenant-only methods refuse admin and service identities", async () => {
    const created = await dispatches().createDispatch(ok);
    const id = created.dispatch!.id;
    for (const identity of [ADMIN, EXECUTOR, GATEWAY]) {
      const c = dispatches(identity);
      await expectError(c.createDispatch(ok), Code.PermissionDenied, "TENANT_REQUIRED");
      await expectError(c.getDispatch({ dispatchId: id }), Code.PermissionDenied, "TENANT_REQUIRED");
      await expectError(c.listDispatches({}), Code.PermissionDenied, "TENANT_REQUIRED");
      await expectError(c.cancelDispatch({ dispatchId: id }), Code.PermissionDenied, "TENANT_REQUIRED");
      await expectError(
        (async () => {
          for await (const _ of c.watchDispatch({ dispatchId: id })) break;
        })(),
        Code.PermissionDenied,
        "TENANT_REQUIRED",
      );
    }
    // Nothing was created or cancelled by the refused calls.
    const listed = await dispatches().listDispatches({});
    expect(listed.dispatches.map((d) => [d.id, d.state])).toEqual([[id, Dispatch_State.QUEUED]]);
  });

  it("LeaseService refuses tenants, admins and non-executor services", async () => {
    await dispatches().createDispatch(ok);
    for (const identity of [tenantIdentity(TENANT), ADMIN, GATEWAY]) {
      const c = leases(identity);
      await expectError(c.acquireLease({ executorId: "x" }), Code.PermissionDenied, "SERVICE_REQUIRED");
      await expectError(c.heartbeat({ dispatchId: TENANT, leaseId: TENANT }), Code.PermissionDenied, "SERVICE_REQUIRED");
      await expectError(c.reportRunState({ dispatchId: TENANT, leaseId: TENANT, state: Dispatch_State.RUNNING }), Code.PermissionDenied, "SERVICE_REQUIRED");
    }
    // The run is still there for a real executor.
    const got = await leases().acquireLease({ executorId: "host-1" });
    expect(got.lease?.dispatch?.state).toBe(Dispatch_State.STARTING);
  });

  it("a lease of a run that names secrets carries the dispatcher's grant of them to the executor that took it", async () => {
    const withSecrets = await dispatches().createDispatch({ ...ok, secretNames: ["GH_TOKEN", "NPM_TOKEN"] });
    const { lease } = await leases().acquireLease({ executorId: "host-1" });
    expect(lease?.dispatch?.id).toBe(withSecrets.dispatch!.id);
    // What the tenant service checks (run-grants.ts), with its own keys.
    const tenantKeys = keysOf("tenant");
    const grant = lease!.secretGrant;
    const covers = { tenantId: TENANT, names: ["GH_TOKEN", "NPM_TOKEN"], executor: EXECUTOR.principal };
    expect(() => checkSecretGrant(tenantKeys, grant, covers)).not.toThrow();
    const refusal = (request: typeof covers) => {
      try {
        checkSecretGrant(tenantKeys, grant, request);
      } catch (err) {
        return errorInfoOf(err as ConnectError)?.reason;
      }
      return "accepted";
    };
    expect(refusal({ ...covers, executor: "executor/host-2" })).toBe("SECRET_GRANT_INVALID");
    expect(refusal({ ...covers, tenantId: OTHER })).toBe("SECRET_GRANT_INVALID");
    expect(refusal({ ...covers, names: ["GH_TOKEN", "AWS_KEY"] })).toBe("SECRET_GRANT_INVALID");
    // A restarted executor listing its leases gets a fresh grant too (to redact a re-adopted run).
    const listed = await leases().listExecutorLeases({ executorId: "host-1" });
    expect(() => checkSecretGrant(tenantKeys, listed.leases[0]!.secretGrant, covers)).not.toThrow();
    // A run without secrets gets no grant.
    await dispatches().createDispatch(ok);
    expect((await leases().acquireLease({ executorId: "host-1" })).lease?.secretGrant).toBe("");
  });

  it("every lease carries a log grant to the executor that took it, lasting the lease and a minute, and each heartbeat renews it", async () => {
    const created = await dispatches().createDispatch(ok);
    const { lease } = await leases().acquireLease({ executorId: "host-1" });
    const leaseEnd = Number(timestampMs(lease!.expireTime!));
    const run = { dispatchId: created.dispatch!.id, tenantId: TENANT, executor: EXECUTOR.principal };
    // What telemetry checks (run-grants.ts), with its own keys.
    const telemetryKeys = keysOf("telemetry");
    const refusal = (token: string, request = run, now = Date.now()) => {
      try {
        checkLogGrant(telemetryKeys, token, request, now);
      } catch (err) {
        return errorInfoOf(err as ConnectError)?.reason;
      }
      return "accepted";
    };
    expect(refusal(lease!.logGrant)).toBe("accepted");
    expect(refusal(lease!.logGrant, run, leaseEnd + LOG_GRANT_GRACE_MS - 1_000)).toBe("accepted");
    expect(refusal(lease!.logGrant, run, leaseEnd + LOG_GRANT_GRACE_MS + 1_000)).toBe("LOG_GRANT_INVALID");
    expect(refusal(lease!.logGrant, { ...run, executor: "executor/host-2" })).toBe("LOG_GRANT_INVALID");
    // A heartbeat renews the lease and with it the grant, which then outlasts the first one.
    await new Promise((resolve) => setTimeout(resolve, 20));
    const beat = await leases().heartbeat({ dispatchId: run.dispatchId, leaseId: lease!.leaseId });
    const renewedEnd = Number(timestampMs(beat.expireTime!));
    expect(renewedEnd).toBeGreaterThan(leaseEnd);
    expect(refusal(beat.logGrant, run, leaseEnd + LOG_GRANT_GRACE_MS + 1)).toBe("accepted");
    expect(refusal(beat.logGrant, run, renewedEnd + LOG_GRANT_GRACE_MS + 1_000)).toBe("LOG_GRANT_INVALID");
    // Listed again after a restart, the lease comes with a fresh one.
    const listed = await leases().listExecutorLeases({ executorId: "host-1" });
    expect(refusal(listed.leases[0]!.logGrant)).toBe("accepted");
  });

  it("an executor acts only as itself: naming another executor's id is PERMISSION_DENIED on every lease call that names one", async () => {
    const created = await dispatches().createDispatch({ ...ok, secretNames: ["GH_TOKEN"] });
    const { lease } = await leases().acquireLease({ executorId: "host-1" });
    const other = leases({ kind: "service", principal: "executor/host-2" });
    const refused = (call: Promise<unknown>) => expectError(call, Code.PermissionDenied, "EXECUTOR_ID_MISMATCH");
    // host-2 cannot list host-1's leases (and with them their secret grants and lease ids)...
    await refused(other.listExecutorLeases({ executorId: "host-1" }));
    // ...nor take work, watch cancellations or report capacity in host-1's name.
    await dispatches().createDispatch(ok);
    await refused(other.acquireLease({ executorId: "host-1" }));
    await refused(
      (async () => {
        for await (const _ of other.watchCancellations({ executorId: "host-1" })) break;
      })(),
    );
    await refused(other.heartbeat({ dispatchId: created.dispatch!.id, leaseId: lease!.leaseId, executorId: "host-1", capacity: { slotsTotal: 99 } }));
    // A prefix or a look-alike is not the same id either.
    await refused(leases().listExecutorLeases({ executorId: "host-" }));
    await refused(leases().listExecutorLeases({ executorId: "executor/host-1" }));
    // The refused calls changed nothing: host-1 still holds its lease and the second run is queued.
    expect((await leases().listExecutorLeases({ executorId: "host-1" })).leases.map((l) => l.dispatch?.id)).toEqual([created.dispatch!.id]);
    expect((await leases().acquireLease({ executorId: "host-1" })).lease?.dispatch?.state).toBe(Dispatch_State.STARTING);
  });

  it("a call without a signed identity is UNAUTHENTICATED; another tenant's dispatch is NOT_FOUND", async () => {
    const unsigned = createClient(
      DispatchService,
      createRouterTransport((router) => registerRoutes(router, dispatcher, agents, defaultRouteDeps()), {
        router: { interceptors: [identityInterceptor(keysOf("dispatcher"))] },
      }),
    );
    await expectError(unsigned.createDispatch(ok), Code.Unauthenticated, "IDENTITY_MISSING");
    const created = await dispatches().createDispatch(ok);
    await expectError(dispatches(tenantIdentity(OTHER)).getDispatch({ dispatchId: created.dispatch!.id }), Code.NotFound, "DISPATCH_NOT_FOUND");
    await expectError(dispatches(tenantIdentity(OTHER)).cancelDispatch({ dispatchId: created.dispatch!.id }), Code.NotFound, "DISPATCH_NOT_FOUND");
    expect((await dispatches(tenantIdentity(OTHER)).listDispatches({})).dispatches).toEqual([]);
  });
});

describe("CreateDispatch validation", () => {
  const create = (overrides: Partial<CreateDispatchRequest> | CreateInit) => dispatches().createDispatch({ ...ok, ...overrides } as CreateInit);

  it("refuses bad inputs naming the field", async () => {
    await expectInvalid(create({ agent: "" }), "agent");
    await expectInvalid(create({ task: "" }), "task");
    await expectInvalid(create({ task: "x".repeat(64 * 1024 + 1) }), "task");
    await expectInvalid(create({ model: { case: "modelTier", value: 99 as ModelTier } }), "model_tier");
    await expectInvalid(create({ labels: { "Bad Key": "v" } }), 'labels["Bad Key"]');
    await expectInvalid(create({ env: { OUTPOST_X: "1" } }), "env[OUTPOST_X]");
    await expectInvalid(create({ env: { "1BAD": "1" } }), 'env["1BAD"]');
    await expectInvalid(create({ repo: { url: "ftp://x", ref: "" } }), "repo.url");
    await expectInvalid(create({ repo: { url: "not a url", ref: "" } }), "repo.url");
    await expectInvalid(create({ timeout: durationFromMs(-1000) }), "timeout");
    await expectInvalid(create({ agent: "nope" }), "agent");
    // None of them created anything.
    expect((await dispatches().listDispatches({})).dispatches).toEqual([]);
  });

  it("refuses NUL in every string that becomes a container's environment or argument", async () => {
    // The engine refuses such a container ("environment variable value can't contain null"): the caller's error, not the runtime's.
    await expectInvalid(create({ task: "fix\0it" }), "task");
    await expectInvalid(create({ env: { GOOD: "a\0b" } }), "env[GOOD]");
    await expectInvalid(create({ labels: { team: "core\0" } }), "labels[team]");
    await expectInvalid(create({ model: { case: "modelId", value: "claude\0" } }), "model_id");
    await expectInvalid(create({ repo: { url: "https://example.com/r\0.git", ref: "" } }), "repo.url");
    // Tabs and newlines the URL parser would drop but git keeps (an ssh host with a newline in it).
    for (const url of ["ssh://x\ntouch\tPWNED\n/p.git", "https://example.com/r .git", "https://example.com/r.git\r", "https://exa\x7fmple.com/r.git"]) {
      await expectInvalid(create({ repo: { url, ref: "" } }), "repo.url");
    }
    await expectInvalid(create({ repo: { url: "https://example.com/r.git", ref: "main\0" } }), "repo.ref");
    await expectInvalid(create({ requestId: "req\0" }), "request_id");
    expect((await dispatches().listDispatches({})).dispatches).toEqual([]);
    const admin = clientFor(dispatcher, agents, AgentService, ADMIN);
    await expectInvalid(admin.registerAgent({ agent: { name: "nul-agent", image: "x/y:1", command: ["/bin/sh", "-c\0"] } }), "agent.command[1]");
  });

  it("refuses repository refs git would take for an option or refuse as a name, and file: URLs", async () => {
    const url = "https://example.com/r.git";
    for (const ref of ["-f", "--force", "--upload-pack=touch /tmp/x", "a..b", "main~1", "v1^{commit}", "a b", "x:y", "*", "[a", "a\\b", "@", "a@{1}", "/a", "a/", "a//b", ".hidden", "a/.b", "x.lock", "a.", "tab\tref", "del\x7f"]) {
      await expectInvalid(create({ repo: { url, ref } }), "repo.ref");
    }
    await expectInvalid(create({ repo: { url: "file:///srv/outpost/data/runs/other/workspace", ref: "" } }), "repo.url");
    expect((await dispatches().listDispatches({})).dispatches).toEqual([]);
    for (const ref of ["main", "release/1.2", "v1.0.0", "feature/x-y_z", "0123456789abcdef0123456789abcdef01234567", "a-b", "a.b/c@d"]) {
      expect((await create({ repo: { url, ref } })).dispatch?.repo?.ref).toBe(ref);
    }
  });

  it("accepts boundary values", async () => {
    const res = await create({
      task: "x".repeat(64 * 1024),
      labels: { "team.core-1_x": "v" },
      env: { _OK: "1", lower_case: "2" },
      repo: { url: "https://github.com/acme/repo.git", ref: "main" },
      model: { case: "modelTier", value: ModelTier.FLAGSHIP },
      timeout: durationFromMs(90_000),
      requestId: "req-1",
    });
    const d = res.dispatch!;
    expect(d.state).toBe(Dispatch_State.QUEUED);
    expect(d.model).toBe("claude-opus-4-5");
    expect(d.repo?.url).toBe("https://github.com/acme/repo.git");
    expect(d.labels).toEqual({ "team.core-1_x": "v" });
    expect(Number(d.timeout?.seconds)).toBe(90);
    expect(d.tenantId).toBe(TENANT);
    const again = await create({ requestId: "req-1" });
    expect(again.dispatch?.id).toBe(d.id);
  });

  it("secret_names are checked for syntax and repeats, then kept on the dispatch", async () => {
    await expectInvalid(create({ secretNames: ["gh_token"] }), "secret_names[0]");
    await expectInvalid(create({ secretNames: ["OK", "1BAD"] }), "secret_names[1]");
    await expectInvalid(create({ secretNames: ["A", "A"] }), "secret_names");
    expect((await dispatches().listDispatches({})).dispatches).toEqual([]);
    const res = await create({ secretNames: ["GH_TOKEN", "_X1"] });
    expect(res.dispatch?.secretNames).toEqual(["GH_TOKEN", "_X1"]);
  });
});

describe("other request validation", () => {
  it("GetDispatch/CancelDispatch need a ULID dispatch_id", async () => {
    await expectInvalid(dispatches().getDispatch({ dispatchId: "" }), "dispatch_id");
    await expectInvalid(dispatches().getDispatch({ dispatchId: "not-a-ulid" }), "dispatch_id");
    await expectInvalid(dispatches().cancelDispatch({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FA!" }), "dispatch_id");
    await expectError(dispatches().getDispatch({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }), Code.NotFound, "DISPATCH_NOT_FOUND");
  });

  it("ListDispatches checks page_size, page_token and label filters", async () => {
    await expectInvalid(dispatches().listDispatches({ pageSize: -1 }), "page_size");
    await expectInvalid(dispatches().listDispatches({ pageSize: 1001 }), "page_size");
    await expectInvalid(dispatches().listDispatches({ pageToken: "garbage!!" }), "page_token");
    await expectInvalid(dispatches().listDispatches({ pageToken: Buffer.from('{"x":1}').toString("base64url") }), "page_token");
    await expectInvalid(dispatches().listDispatches({ labels: { "Bad Key": "v" } }), 'labels["Bad Key"]');
    await expectInvalid(dispatches().listDispatches({ state: 99 as Dispatch_State }), "state");
    await dispatches().listDispatches({ pageSize: 1000 });
  });

  it("LeaseService checks its inputs", async () => {
    await expectInvalid(leases().acquireLease({ executorId: "" }), "executor_id");
    await expectInvalid(leases().heartbeat({ dispatchId: "x", leaseId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }), "dispatch_id");
    await expectInvalid(leases().heartbeat({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV", leaseId: "" }), "lease_id");
    await dispatches().createDispatch(ok);
    const lease = (await leases().acquireLease({ executorId: "host-1" })).lease!;
    await expectInvalid(
      leases().reportRunState({ dispatchId: lease.dispatch!.id, leaseId: lease.leaseId, state: Dispatch_State.QUEUED }),
      "state",
    );
    await expectError(
      leases().heartbeat({ dispatchId: lease.dispatch!.id, leaseId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }),
      Code.FailedPrecondition,
      "LEASE_LOST",
    );
  });
});

describe("operator methods", () => {
  it("RegisterAgent and GetFleetStatus need the admin credential; an empty agent is INVALID_ARGUMENT", async () => {
    await expectError(clientFor(dispatcher, agents, AgentService, tenantIdentity(TENANT)).registerAgent({}), Code.PermissionDenied, "ADMIN_REQUIRED");
    await expectError(clientFor(dispatcher, agents, FleetService, tenantIdentity(TENANT)).getFleetStatus({}), Code.PermissionDenied, "ADMIN_REQUIRED");
    const a = await expectError(clientFor(dispatcher, agents, AgentService, ADMIN).registerAgent({}), Code.InvalidArgument);
    expect(errorInfoOf(a)?.metadata.field).toBe("agent");
  });
});

describe("ListDispatches paging", () => {
  it("pages 7 dispatches by 3 as 3, 3, 1, newest first, no duplicates, empty final token", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 7; i++) ids.push((await dispatches().createDispatch({ ...ok, task: `t${i}` })).dispatch!.id);
    await dispatches(tenantIdentity(OTHER)).createDispatch(ok);
    const sizes: number[] = [];
    const seen: string[] = [];
    let token = "";
    let pages = 0;
    do {
      const res = await dispatches().listDispatches({ pageSize: 3, pageToken: token });
      sizes.push(res.dispatches.length);
      seen.push(...res.dispatches.map((d) => d.id));
      token = res.nextPageToken;
      pages++;
    } while (token !== "" && pages < 10);
    expect(sizes).toEqual([3, 3, 1]);
    expect(token).toBe("");
    expect(new Set(seen).size).toBe(7);
    expect(seen).toEqual([...ids].sort().reverse());
  });

  it("filters by state and agent", async () => {
    const a = (await dispatches().createDispatch(ok)).dispatch!;
    const b = (await dispatches().createDispatch({ ...ok, agent: "codex" })).dispatch!;
    await dispatches().cancelDispatch({ dispatchId: a.id });
    const cancelled = await dispatches().listDispatches({ state: Dispatch_State.CANCELLED });
    expect(cancelled.dispatches.map((d) => d.id)).toEqual([a.id]);
    const codex = await dispatches().listDispatches({ agent: "codex" });
    expect(codex.dispatches.map((d) => d.id)).toEqual([b.id]);
  });
});

describe("hardening: what reaches a container's environment", () => {
  const create = (overrides: CreateInit) => dispatches().createDispatch({ ...ok, ...overrides } as CreateInit);

  it("refuses a task or env too large for one container's environment (Linux: 128 KiB a variable, 2 MiB in all)", async () => {
    // 64 Ki characters, but 192 KiB as UTF-8: OUTPOST_TASK would be over the kernel's limit of
    // one environment string (MAX_ARG_STRLEN), and the container's exec would fail (E2BIG).
    await expectInvalid(create({ task: "中".repeat(64 * 1024) }), "task");
    // 100 variables of 32 Ki characters each: 3.2 MiB of environment, over ARG_MAX.
    const env = Object.fromEntries(Array.from({ length: 100 }, (_, i) => [`V${i}`, "x".repeat(32 * 1024)]));
    await expectInvalid(create({ env }), "env");
    expect((await dispatches().listDispatches({})).dispatches).toEqual([]);
    // Under both limits: accepted.
    await create({ task: "中".repeat(40_000), env: { A: "x".repeat(32 * 1024), B: "y".repeat(32 * 1024) } });
  });

  it("refuses secret names that would override the contract's variables (OUTPOST_*, TRACEPARENT), as env does", async () => {
    // Secrets are injected after the contract's variables: a secret named so would replace them.
    await expectInvalid(create({ secretNames: ["OUTPOST_RESULT_PATH"] }), "secret_names[0]");
    await expectInvalid(create({ secretNames: ["GH_TOKEN", "TRACEPARENT"] }), "secret_names[1]");
    await expectInvalid(create({ env: { TRACEPARENT: "00-x" } }), "env[TRACEPARENT]");
    expect((await dispatches().listDispatches({})).dispatches).toEqual([]);
  });

  it("an admin or service calling CreateDispatch is refused, and the refusal is audited", async () => {
    const deps = defaultRouteDeps();
    await expectError(clientFor(dispatcher, agents, DispatchService, ADMIN, deps).createDispatch(ok), Code.PermissionDenied);
    await expectError(clientFor(dispatcher, agents, DispatchService, ADMIN, deps).cancelDispatch({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" }), Code.PermissionDenied);
    const events = await deps.audit.list(undefined, 10);
    expect(events.map((e) => [e.method.split("/")[1], e.principal, e.outcome])).toEqual([
      ["CancelDispatch", "admin", "PERMISSION_DENIED"],
      ["CreateDispatch", "admin", "PERMISSION_DENIED"],
    ]);
  });
});

describe("EnrollExecutor in the audit trail", () => {
  it("records a new binding and a refusal, not a renewal of the same key", async () => {
    const deps = defaultRouteDeps();
    const enroll = (id: string) => clientFor(dispatcher, agents, EnrollmentService, { kind: "service", principal: `executor/${id}` }, deps);
    const { privateKey, publicKey } = newExecutorKeyPair();
    const request = { executorId: "host-1", publicKey, proof: signEnrollmentProof(privateKey, "host-1", publicKey) };
    await enroll("host-1").enrollExecutor(request);
    await enroll("host-1").enrollExecutor(request); // renewal
    const other = newExecutorKeyPair();
    await expectError(
      enroll("host-1").enrollExecutor({ executorId: "host-1", publicKey: other.publicKey, proof: signEnrollmentProof(other.privateKey, "host-1", other.publicKey) }),
      Code.FailedPrecondition,
      "EXECUTOR_KEY_BOUND",
    );
    const events = await deps.audit.list(undefined, 10);
    expect(events.map((e) => [e.method, e.principal, e.target, e.outcome, e.tenantId])).toEqual([
      ["outpost.executor.v1.EnrollmentService/EnrollExecutor", "executor/host-1", "executor/host-1", "FAILED_PRECONDITION", ""],
      ["outpost.executor.v1.EnrollmentService/EnrollExecutor", "executor/host-1", "executor/host-1", "OK", ""],
    ]);
  });
});

describe("hardening: sizes of what the dispatcher stores and answers", () => {
  it("refuses a reported result larger than the executor's own bound (1 MiB) as INVALID_ARGUMENT; a FAILED report without it ends the run", async () => {
    await dispatches().createDispatch(ok);
    const lease = (await leases().acquireLease({ executorId: "host-1" })).lease!;
    const at = { dispatchId: lease.dispatch!.id, leaseId: lease.leaseId };
    await leases().reportRunState({ ...at, state: Dispatch_State.RUNNING });
    await expectInvalid(leases().reportRunState({ ...at, state: Dispatch_State.SUCCEEDED, exitCode: 0, result: { blob: "x".repeat(1024 * 1024) } }), "result");
    // 400 KB of JSON, but over 2 MiB as the Struct every read of the dispatch would send.
    await expectInvalid(leases().reportRunState({ ...at, state: Dispatch_State.SUCCEEDED, exitCode: 0, result: { zeros: new Array<number>(200_000).fill(0) } }), "result");
    const failed = await leases().reportRunState({ ...at, state: Dispatch_State.FAILED, failureReason: "the result could not be reported" });
    expect(failed.dispatch?.state).toBe(Dispatch_State.FAILED);
  });

  it("a ListDispatches page stays under 3 MiB however large its dispatches, and the pages still hold every one", async () => {
    const big = { task: "t".repeat(60 * 1024), env: { A: "x".repeat(32 * 1024), B: "x".repeat(32 * 1024), C: "x".repeat(32 * 1024) } };
    const ids: string[] = [];
    for (let i = 0; i < 25; i++) ids.push((await dispatches().createDispatch({ ...ok, ...big })).dispatch!.id);
    const seen: string[] = [];
    let token = "";
    let pages = 0;
    do {
      const res = await dispatches().listDispatches({ pageSize: 1000, pageToken: token });
      expect(toBinary(ListDispatchesResponseSchema, res).length).toBeLessThanOrEqual(3 * 1024 * 1024);
      expect(res.dispatches.length).toBeGreaterThan(0);
      seen.push(...res.dispatches.map((d) => d.id));
      token = res.nextPageToken;
      pages++;
    } while (token !== "" && pages < 20);
    expect(pages).toBeGreaterThan(1);
    expect(seen).toEqual([...ids].reverse());
  });
});
