/**
 * Thin handlers: validate the request, call the core, map the answer. Tenant-facing
 * services take the tenant from the signed caller identity; LeaseService is for executors.
 */
import { create, fromJson, toBinary, type JsonObject } from "@bufbuild/protobuf";
import { durationMs, StructSchema, timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import type { ConnectRouter, HandlerContext } from "@connectrpc/connect";
import {
  callEndSignal,
  throwIfCallAborted,
  callerOf,
  outcomeOf,
  requireAdmin,
  checkLength,
  decodePageToken,
  encodePageToken,
  invalidArgument,
  notFound,
  pageSizeOf,
  requireEnum,
  requireNonEmpty,
  permissionDenied,
  requireService,
  requireTenant,
  requireUlid,
  formatTraceparent,
  currentTrace,
  issueLogGrant,
  issueSecretGrant,
  type Identity,
  type SigningKeys,
} from "@outpost/platform";
import { AgentService } from "@outpost/proto/outpost/dispatch/v1/agent_service_pb.js";
import {
  AuditInternalService,
  AuditService,
  type AuditEvent,
  AuditEventSchema,
} from "@outpost/proto/outpost/dispatch/v1/audit_service_pb.js";
import { type Agent, Dispatch_State, DispatchSchema, ModelTier } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import {
  type CreateDispatchRequest,
  CreateDispatchResponseSchema,
  DispatchService,
  GetDispatchResponseSchema,
  ListDispatchesResponseSchema,
  CancelDispatchResponseSchema,
  WatchDispatchResponseSchema,
} from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { AgentStatus_CircuitState, FleetService, GetFleetStatusResponseSchema } from "@outpost/proto/outpost/dispatch/v1/fleet_service_pb.js";
import {
  AcquireLeaseResponseSchema,
  type ExecutorCapacity,
  HeartbeatResponseSchema,
  LeaseService,
  ListExecutorLeasesResponseSchema,
  ReleaseLeaseResponseSchema,
  WatchCancellationsResponseSchema,
  ReportRunStateResponseSchema,
} from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { EnrollExecutorResponseSchema, EnrollmentService } from "@outpost/proto/outpost/executor/v1/enrollment_service_pb.js";
import type { AgentRegistry } from "./core/agents.ts";
import type { ExecutorEnrollment } from "./core/enrollment.ts";
import type { AuditLog } from "./core/audit.ts";
import type { CapacityReport, CreateDispatchInput, Dispatcher } from "./core/dispatcher.ts";
import type { FleetStatus } from "./core/fleet.ts";
import { dispatchToProto, stateFromProto, stateToProto } from "./mapping.ts";
import type { AuditRecord, DispatchRecord, DispatchState } from "./store/store.ts";

const MAX_TASK_CHARS = 64 * 1024;
/**
 * A run's task, env and secrets become its container's environment, which the kernel bounds: one
 * "NAME=value" string at most 128 KiB (MAX_ARG_STRLEN, 4 KiB pages), all of them with the
 * arguments at most a quarter of the stack limit (ARG_MAX, 2 MiB by default). Past either the
 * container's exec fails (E2BIG): the run could never start, yet its failure would fall on the
 * agent. 64 Ki characters of task can be 192 KiB as UTF-8, and 100 variables of 32 Ki characters
 * 3 MiB, so both are bounded in bytes too; 128 KiB of env leaves room for the contract's
 * variables and up to 50 secrets of 32 KiB.
 */
const MAX_ENV_STRING_BYTES = 128 * 1024;
const MAX_ENV_BYTES = 128 * 1024;
/** The most a run's result may be, as JSON: the executor reads at most this much (result.ts). */
const MAX_RESULT_BYTES = 1024 * 1024;
/**
 * A ListDispatches page ends before its dispatches pass this many bytes, whatever its page_size:
 * a thousand dispatches with their task, env and result could be a gigabyte held in memory, and
 * gRPC clients refuse answers over 4 MiB by default.
 */
const MAX_LIST_PAGE_BYTES = 3 * 1024 * 1024;
const MAX_ENV_ENTRIES = 100;
const MAX_LABELS = 64;
const MAX_LEASE_WAIT_MS = 30_000;
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]{0,127}$/;
/** Secret names (contract A): upper-case environment variable names. */
const SECRET_NAME = /^[A-Z_][A-Z0-9_]{0,127}$/;
/**
 * Names the contract sets in every run's environment (README "Agent contract"). Neither env nor
 * a secret may take them: the executor adds secrets after the contract's variables, so a secret
 * named OUTPOST_RESULT_PATH or TRACEPARENT would replace them as surely as env would.
 */
const isReservedEnvName = (name: string) => name.startsWith("OUTPOST_") || name === "TRACEPARENT";
const MAX_SECRETS = 50;
const MAX_IMAGES_REPORTED = 500;
const LABEL_KEY = /^[a-z][a-z0-9_.-]{0,62}$/;
/**
 * Repository URL schemes a tenant may name. Not file: it would have the executor clone from its
 * own disk (other runs' workspaces, anything readable); executors refuse it by default too
 * (OUTPOST_EXECUTOR_REPO_SCHEMES), and no tenant-facing setting turns it back on.
 */
const REPO_PROTOCOLS = new Set(["https:", "http:", "ssh:", "git:"]);
/** Characters git refuses in a ref name (check-ref-format): controls, space, ~ ^ : ? * [ and backslash. */
// eslint-disable-next-line no-control-regex -- matching control characters is the point
const REF_FORBIDDEN = /[\x00-\x20\x7f~^:?*[\\]/;

/** What the routes call besides the dispatcher core. */
export interface RouteDeps {
  audit: AuditLog;
  fleet: () => Promise<FleetStatus>;
  /** Signs the grants that come with a lease (run-grants.ts). */
  signingKeys: SigningKeys;
  enrollment: ExecutorEnrollment;
}

export function registerRoutes(router: ConnectRouter, dispatcher: Dispatcher, agents: AgentRegistry, deps: RouteDeps): void {
  const { audit } = deps;
  // A leased run's secrets and output are granted to the executor holding the lease, and only
  // to it (run-grants.ts). The lease calls already refuse an executor naming another's id
  // (ownExecutorId); this check keeps the grants bound to their holder even if a route forgets to.
  const holds = (executor: Identity, d: DispatchRecord) => executor.principal === `executor/${d.executorId}`;
  const runOf = (executor: Identity, d: DispatchRecord) => ({ dispatchId: d.id, tenantId: d.tenantId, executor: executor.principal });
  /** Lasts as long as the lease (and a minute): renewed by every heartbeat. */
  const logGrantTo = (executor: Identity, d: DispatchRecord) =>
    holds(executor, d) ? issueLogGrant(deps.signingKeys, runOf(executor, d), d.leaseExpiresAt ?? 0) : "";
  const grantsTo =
    (executor: Identity) =>
    (d: DispatchRecord): RunGrants => ({
      secretGrant: holds(executor, d) && d.secretNames.length > 0 ? issueSecretGrant(deps.signingKeys, { ...runOf(executor, d), names: d.secretNames }) : "",
      logGrant: logGrantTo(executor, d),
    });
  const DS = "outpost.dispatch.v1.DispatchService";
  const AS = "outpost.dispatch.v1.AgentService";
  router.service(DispatchService, {
    // The tenant check runs inside `audited`: another caller's refused attempt is recorded too.
    async createDispatch(req, ctx) {
      return audited(audit, ctx, callingTenantOf(ctx), `${DS}/CreateDispatch`, `agent/${req.agent.slice(0, 64)}`, async (setTarget) => {
        const { tenantId } = requireTenant(ctx);
        const input = validateCreate(req);
        const record = await dispatcher.create(tenantId, input);
        setTarget(`dispatch/${record.id}`);
        return create(CreateDispatchResponseSchema, { dispatch: dispatchToProto(record) });
      });
    },
    async getDispatch(req, ctx) {
      const { tenantId } = requireTenant(ctx);
      const record = await dispatcher.get(tenantId, requireUlid("dispatch_id", req.dispatchId));
      return create(GetDispatchResponseSchema, { dispatch: dispatchToProto(record) });
    },
    async listDispatches(req, ctx) {
      const { tenantId } = requireTenant(ctx);
      const limit = pageSizeOf("page_size", req.pageSize);
      const cursor = decodePageToken<{ after: string }>(req.pageToken, { after: "string" });
      if (req.state !== Dispatch_State.UNSPECIFIED) requireEnum("state", req.state, Dispatch_State);
      const labels = validateLabels("labels", req.labels);
      const { items, lastId, more } = await dispatcher.list(
        tenantId,
        { state: stateFromProto(req.state), agent: req.agent ? checkLength("agent", req.agent, 64) : undefined, labels },
        {
          limit,
          afterId: cursor?.after,
          maxBytes: MAX_LIST_PAGE_BYTES,
          encode: (record) => {
            const dispatch = dispatchToProto(record);
            return { item: dispatch, bytes: toBinary(DispatchSchema, dispatch).byteLength };
          },
        },
      );
      return create(ListDispatchesResponseSchema, {
        dispatches: items,
        nextPageToken: more && lastId ? encodePageToken({ after: lastId }) : "",
      });
    },
    async cancelDispatch(req, ctx) {
      return audited(audit, ctx, callingTenantOf(ctx), `${DS}/CancelDispatch`, `dispatch/${req.dispatchId.slice(0, 64)}`, async () => {
        const { tenantId } = requireTenant(ctx);
        const record = await dispatcher.cancel(tenantId, requireUlid("dispatch_id", req.dispatchId));
        return create(CancelDispatchResponseSchema, { dispatch: dispatchToProto(record) });
      });
    },
    async *watchDispatch(req, ctx) {
      const { tenantId } = requireTenant(ctx);
      const id = requireUlid("dispatch_id", req.dispatchId);
      for await (const record of dispatcher.watch(tenantId, id, callEndSignal(ctx))) {
        yield create(WatchDispatchResponseSchema, { dispatch: dispatchToProto(record) });
      }
      throwIfCallAborted(ctx);
    },
  });

  router.service(AgentService, {
    async listAgents(req) {
      const limit = pageSizeOf("page_size", req.pageSize);
      const cursor = decodePageToken<{ after: string }>(req.pageToken, { after: "string" });
      await agents.refreshIfStale();
      const all = agents.list().filter((a) => cursor === undefined || a.name > cursor.after);
      const page = all.slice(0, limit);
      const last = page.at(-1);
      return { agents: page, nextPageToken: all.length > limit && last ? encodePageToken({ after: last.name }) : "" };
    },
    async getAgent(req) {
      const name = requireNonEmpty("name", req.name, 64);
      await agents.refreshIfStale();
      const agent = agents.get(name);
      if (!agent) throw notFound("agent", name);
      return { agent };
    },
    // Refused calls are recorded too (a tenant key trying an admin method, a malformed agent):
    // under the calling tenant, so it sees its own attempts, and admins see every one.
    async registerAgent(req, ctx) {
      return audited(audit, ctx, callingTenantOf(ctx), `${AS}/RegisterAgent`, `agent/${(req.agent?.name ?? "").slice(0, 64)}`, async () => {
        requireAdmin(ctx);
        return { agent: await agents.register(requireAgent(req.agent)) };
      });
    },
    async updateAgent(req, ctx) {
      return audited(audit, ctx, callingTenantOf(ctx), `${AS}/UpdateAgent`, `agent/${(req.agent?.name ?? "").slice(0, 64)}`, async () => {
        requireAdmin(ctx);
        return { agent: await agents.update(requireAgent(req.agent)) };
      });
    },
    async disableAgent(req, ctx) {
      return audited(audit, ctx, callingTenantOf(ctx), `${AS}/DisableAgent`, `agent/${req.name.slice(0, 64)}`, async () => {
        requireAdmin(ctx);
        return { agent: await agents.disable(requireNonEmpty("name", req.name, 64)) };
      });
    },
    async enableAgent(req, ctx) {
      return audited(audit, ctx, callingTenantOf(ctx), `${AS}/EnableAgent`, `agent/${req.name.slice(0, 64)}`, async () => {
        requireAdmin(ctx);
        return { agent: await agents.enable(requireNonEmpty("name", req.name, 64)) };
      });
    },
  });

  router.service(FleetService, {
    async getFleetStatus(_req, ctx) {
      requireAdmin(ctx);
      return fleetToProto(await deps.fleet());
    },
  });

  router.service(AuditService, {
    async listAuditEvents(req, ctx) {
      const caller = callerOf(ctx);
      let tenantId: string | undefined;
      if (caller.kind === "tenant") {
        if (req.tenantId && req.tenantId !== caller.tenantId) throw invalidArgument("tenant_id", "only admins may choose the tenant");
        tenantId = caller.tenantId;
      } else {
        requireAdmin(ctx);
        tenantId = req.tenantId ? checkLength("tenant_id", req.tenantId, 128) : undefined;
      }
      const limit = pageSizeOf("page_size", req.pageSize);
      const cursor = decodePageToken<{ after: string }>(req.pageToken, { after: "string" });
      const events = await audit.list(tenantId, limit + 1, cursor?.after);
      const page = events.slice(0, limit);
      const last = page.at(-1);
      return {
        events: page.map(auditToProto),
        nextPageToken: events.length > limit && last ? encodePageToken({ after: last.id }) : "",
      };
    },
  });

  router.service(AuditInternalService, {
    async recordAuditEvent(req, ctx) {
      requireService(ctx, "tenant");
      const event = await audit.record({
        tenantId: checkLength("tenant_id", req.tenantId, 128),
        principal: requireNonEmpty("principal", req.principal, 256),
        method: requireNonEmpty("method", req.method, 256),
        target: checkLength("target", req.target, 256),
        outcome: requireNonEmpty("outcome", req.outcome, 64),
        time: req.time ? timestampMs(req.time) : undefined,
      });
      return { event: auditToProto(event) };
    },
  });

  router.service(EnrollmentService, {
    async enrollExecutor(req, ctx) {
      // New bindings and refusals (another key asking for a bound id, say) are recorded; a
      // renewal, every few minutes per executor, is machine traffic like the lease calls.
      return audited(audit, ctx, callingTenantOf(ctx), "outpost.executor.v1.EnrollmentService/EnrollExecutor", `executor/${req.executorId.slice(0, 64)}`, async (_setTarget, leaveOut) => {
        const executorId = ownExecutorId(requireService(ctx, "executor"), req.executorId);
        const { certificate, expiresAt, renewed } = await deps.enrollment.enroll(executorId, req.publicKey, req.proof);
        if (renewed) leaveOut();
        return create(EnrollExecutorResponseSchema, { certificate, expireTime: timestampFromMs(expiresAt) });
      });
    },
  });

  router.service(LeaseService, {
    async acquireLease(req, ctx) {
      const executor = requireService(ctx, "executor");
      const executorId = ownExecutorId(executor, req.executorId);
      const waitMs = req.wait ? durationMs(req.wait) : 0;
      if (!(waitMs >= 0)) throw invalidArgument("wait", "must not be negative");
      const capacity = req.capacity ? capacityOf("capacity", req.capacity) : undefined;
      const leased = await dispatcher.acquireLease(executorId, Math.min(waitMs, MAX_LEASE_WAIT_MS), callEndSignal(ctx), capacity);
      if (!leased) return create(AcquireLeaseResponseSchema, {});
      return create(AcquireLeaseResponseSchema, { lease: leaseToProto(leased.dispatch, leased.agent, grantsTo(executor)) });
    },
    async heartbeat(req, ctx) {
      const caller = requireService(ctx, "executor");
      const id = requireUlid("dispatch_id", req.dispatchId);
      const lease = requireUlid("lease_id", req.leaseId);
      const executor =
        req.capacity && req.executorId
          ? { executorId: ownExecutorId(caller, req.executorId), capacity: capacityOf("capacity", req.capacity) }
          : undefined;
      const { expiresAt, cancelRequested, dispatch } = await dispatcher.heartbeat(id, lease, executor);
      // The log grant is renewed with the lease (run-grants.ts).
      return create(HeartbeatResponseSchema, { expireTime: timestampFromMs(expiresAt), cancelRequested, logGrant: logGrantTo(caller, dispatch) });
    },
    async releaseLease(req, ctx) {
      requireService(ctx, "executor");
      const id = requireUlid("dispatch_id", req.dispatchId);
      const lease = requireUlid("lease_id", req.leaseId);
      const reason = checkLength("reason", req.reason, 4096);
      const record = await dispatcher.releaseLease(id, lease, reason, req.infrastructureFailure, req.runtimeFailure);
      return create(ReleaseLeaseResponseSchema, { dispatch: dispatchToProto(record) });
    },
    async *watchCancellations(req, ctx) {
      const executorId = ownExecutorId(requireService(ctx, "executor"), req.executorId);
      for await (const c of dispatcher.cancellationsFor(executorId, callEndSignal(ctx))) {
        yield create(WatchCancellationsResponseSchema, c);
      }
      throwIfCallAborted(ctx);
    },
    async listExecutorLeases(req, ctx) {
      const executor = requireService(ctx, "executor");
      const executorId = ownExecutorId(executor, req.executorId);
      const leases = await dispatcher.leasesOf(executorId);
      return create(ListExecutorLeasesResponseSchema, { leases: leases.map((l) => leaseToProto(l.dispatch, l.agent, grantsTo(executor))) });
    },
    async reportRunState(req, ctx) {
      requireService(ctx, "executor");
      const id = requireUlid("dispatch_id", req.dispatchId);
      const lease = requireUlid("lease_id", req.leaseId);
      const state = stateFromProto(req.state);
      if (state === "RUNNING") {
        return create(ReportRunStateResponseSchema, { dispatch: dispatchToProto(await dispatcher.reportRunning(id, lease)) });
      }
      if (state !== "SUCCEEDED" && state !== "FAILED" && state !== "TIMED_OUT" && state !== "CANCELLED") {
        throw invalidArgument("state", "must be STATE_RUNNING or a terminal state");
      }
      const record = await dispatcher.reportTerminal(id, lease, {
        state,
        exitCode: req.exitCode ?? null,
        failureReason: checkLength("failure_reason", req.failureReason, 4096),
        resultJson: req.result ? resultJsonOf("result", req.result) : null,
        lastLogSeq: req.lastLogSeq,
      });
      return create(ReportRunStateResponseSchema, { dispatch: dispatchToProto(record) });
    },
  });
}

/**
 * Strings that become a container's environment variables or arguments must not hold NUL: the
 * engine refuses such a container ("environment variable value can't contain null"), which would
 * count as the runtime's failure instead of the caller's bad input.
 */
function requireNoNul(field: string, value: string): string {
  if (value.includes("\0")) throw invalidArgument(field, "must not contain NUL characters", "FIELD_MALFORMED");
  return value;
}

/**
 * A repository ref: a branch, tag or commit id ("" for the default branch), checked loosely by
 * git's ref-name rules (check-ref-format). Above all it never starts with "-", where git would
 * take it for an option; revision syntax (~, ^, ranges, @{…}) is refused with the rest.
 */
function requireRef(field: string, ref: string): string {
  if (ref === "") return ref;
  if (ref.startsWith("-")) throw invalidArgument(field, "must not start with '-'", "FIELD_MALFORMED");
  if (REF_FORBIDDEN.test(ref)) throw invalidArgument(field, "must not contain spaces, control characters or any of ~ ^ : ? * [ \\", "FIELD_MALFORMED");
  const components = ref.split("/");
  if (
    ref === "@" ||
    ref.includes("..") ||
    ref.includes("@{") ||
    ref.endsWith(".") ||
    components.some((c) => c === "" || c.startsWith(".") || c.endsWith(".lock"))
  ) {
    throw invalidArgument(field, "is not a valid branch, tag or commit name (git check-ref-format)", "FIELD_MALFORMED");
  }
  return ref;
}

function validateCreate(req: CreateDispatchRequest): CreateDispatchInput {
  const agent = requireNonEmpty("agent", req.agent, 64);
  const task = requireNoNul("task", requireNonEmpty("task", req.task, MAX_TASK_CHARS));
  if (envStringBytes("OUTPOST_TASK", task) > MAX_ENV_STRING_BYTES) {
    throw invalidArgument("task", `must be at most ${MAX_ENV_STRING_BYTES - envStringBytes("OUTPOST_TASK", "")} bytes as UTF-8 (it reaches the agent as one environment variable)`, "FIELD_TOO_LONG");
  }
  let repoUrl = "";
  let repoRef = "";
  if (req.repo) {
    repoUrl = requireNoNul("repo.url", requireNonEmpty("repo.url", req.repo.url, 2048));
    // The URL parser drops tabs and newlines that git keeps (ssh would get them in the host).
    // eslint-disable-next-line no-control-regex -- matching control characters is the point
    if (/[\x00-\x20\x7f]/.test(repoUrl)) throw invalidArgument("repo.url", "must not contain whitespace or control characters", "FIELD_MALFORMED");
    let protocol: string;
    try {
      protocol = new URL(repoUrl).protocol;
    } catch {
      throw invalidArgument("repo.url", "is not a URL");
    }
    if (!REPO_PROTOCOLS.has(protocol)) throw invalidArgument("repo.url", `protocol ${protocol} is not supported (https, http, ssh, git)`);
    repoRef = requireRef("repo.ref", requireNoNul("repo.ref", checkLength("repo.ref", req.repo.ref, 256)));
  }
  let modelId: string | undefined;
  let modelTier: ModelTier | undefined;
  if (req.model.case === "modelId") modelId = requireNoNul("model_id", requireNonEmpty("model_id", req.model.value, 200));
  if (req.model.case === "modelTier") modelTier = requireEnum("model_tier", req.model.value, ModelTier);
  let timeoutMs: number | undefined;
  if (req.timeout) {
    if (req.timeout.nanos < 0 || req.timeout.nanos > 999_999_999) throw invalidArgument("timeout", "nanos out of range");
    timeoutMs = durationMs(req.timeout);
    if (!(timeoutMs > 0)) throw invalidArgument("timeout", "must be positive");
  }
  if (req.secretNames.length > MAX_SECRETS) throw invalidArgument("secret_names", `at most ${MAX_SECRETS} secrets`);
  req.secretNames.forEach((name, i) => {
    if (!SECRET_NAME.test(name)) throw invalidArgument(`secret_names[${i}]`, "must match ^[A-Z_][A-Z0-9_]{0,127}$");
    if (isReservedEnvName(name)) throw invalidArgument(`secret_names[${i}]`, "is reserved for the platform (OUTPOST_*, TRACEPARENT): the secret would replace the contract's variable");
  });
  if (new Set(req.secretNames).size !== req.secretNames.length) throw invalidArgument("secret_names", "must not repeat a name");
  const envEntries = Object.entries(req.env);
  if (envEntries.length > MAX_ENV_ENTRIES) throw invalidArgument("env", `at most ${MAX_ENV_ENTRIES} entries`);
  let envBytes = 0;
  for (const [key, value] of envEntries) {
    if (!ENV_NAME.test(key)) throw invalidArgument(`env[${JSON.stringify(key.slice(0, 64))}]`, "must be an environment variable name");
    if (isReservedEnvName(key)) throw invalidArgument(`env[${key}]`, "is reserved for the platform");
    requireNoNul(`env[${key}]`, checkLength(`env[${key}]`, value, 32 * 1024));
    envBytes += envStringBytes(key, value);
  }
  if (envBytes > MAX_ENV_BYTES) throw invalidArgument("env", `must be at most ${MAX_ENV_BYTES} bytes in all (NAME=value as UTF-8)`, "FIELD_TOO_LONG");
  return {
    agent,
    task,
    repoUrl,
    repoRef,
    modelId,
    modelTier,
    timeoutMs,
    secretNames: [...req.secretNames],
    env: { ...req.env },
    labels: validateLabels("labels", req.labels),
    requestId: requireNoNul("request_id", checkLength("request_id", req.requestId, 128)),
    traceparent: traceparentOfCall(),
  };
}

/** Bytes "NAME=value" takes in a process's environment (UTF-8, with its terminating NUL). */
function envStringBytes(name: string, value: string): number {
  return Buffer.byteLength(name) + 1 + Buffer.byteLength(value) + 1;
}

/**
 * A reported result, serialized for the store, at most MAX_RESULT_BYTES: it is kept on the
 * dispatch and sent with every read of it. Too large is INVALID_ARGUMENT, on which the executor
 * reports the run FAILED without it.
 */
function resultJsonOf(field: string, result: JsonObject): string {
  const json = JSON.stringify(result);
  // As sent back (a Struct), a result can be over five times its JSON ([0,0,…]): both are bounded.
  if (Buffer.byteLength(json) > MAX_RESULT_BYTES || toBinary(StructSchema, fromJson(StructSchema, result)).byteLength > MAX_RESULT_BYTES) throw invalidArgument(field, `must be at most ${MAX_RESULT_BYTES} bytes as JSON`, "FIELD_TOO_LONG");
  return json;
}

/** The trace of the creating call continues into the container (TRACEPARENT). */
function traceparentOfCall(): string {
  const trace = currentTrace();
  return trace ? formatTraceparent(trace) : "";
}

function validateLabels(field: string, labels: Record<string, string>): Record<string, string> {
  const entries = Object.entries(labels);
  if (entries.length > MAX_LABELS) throw invalidArgument(field, `at most ${MAX_LABELS} labels`);
  for (const [key, value] of entries) {
    if (!LABEL_KEY.test(key)) throw invalidArgument(`${field}[${JSON.stringify(key.slice(0, 64))}]`, "key must match [a-z][a-z0-9_.-]{0,62}");
    requireNoNul(`${field}[${key}]`, checkLength(`${field}[${key}]`, value, 256));
  }
  return { ...labels };
}

interface RunGrants {
  secretGrant: string;
  logGrant: string;
}

/** `grants` signs the run's grants to the calling executor (run-grants.ts). */
function leaseToProto(dispatch: DispatchRecord, agent: Agent | undefined, grants: (dispatch: DispatchRecord) => RunGrants) {
  return {
    leaseId: dispatch.leaseId,
    expireTime: timestampFromMs(dispatch.leaseExpiresAt ?? 0),
    dispatch: dispatchToProto(dispatch),
    agent,
    traceparent: dispatch.traceparent,
    ...grants(dispatch),
  };
}

function capacityOf(field: string, c: ExecutorCapacity): CapacityReport {
  if (c.slotsTotal < 0 || c.slotsBusy < 0 || c.warmContainers < 0) throw invalidArgument(field, "counts must not be negative");
  if (c.imagesPresent.length > MAX_IMAGES_REPORTED) throw invalidArgument(`${field}.images_present`, `at most ${MAX_IMAGES_REPORTED} images`);
  c.imagesPresent.forEach((image, i) => checkLength(`${field}.images_present[${i}]`, image, 512));
  return {
    slotsTotal: c.slotsTotal,
    slotsBusy: c.slotsBusy,
    warmContainers: c.warmContainers,
    engineReady: c.engineReady,
    imagesPresent: [...c.imagesPresent],
  };
}

function requireAgent(agent: Agent | undefined): Agent {
  if (!agent) throw invalidArgument("agent", "is required", "FIELD_REQUIRED");
  requireNoNul("agent.image", agent.image);
  agent.command.forEach((arg, i) => requireNoNul(`agent.command[${i}]`, arg));
  // A run's model id reaches its container as OUTPOST_MODEL.
  agent.models.forEach((m, i) => requireNoNul(`agent.models[${i}].model_id`, m.modelId));
  return agent;
}

/**
 * The executor id a lease call names, which must be the caller's own signed "executor/<id>": an
 * executor misconfigured or buggy enough to name another's id (two hosts given one
 * OUTPOST_EXECUTOR_ID, say) cannot take, list or watch that one's leases, nor report capacity in
 * its name. It does not stop a broken-into executor: executors share one signing key, which
 * signs any "executor/<id>" (README, Known issues).
 */
function ownExecutorId(caller: Identity, executorId: string): string {
  const id = requireNonEmpty("executor_id", executorId, 128);
  if (caller.principal !== `executor/${id}`) {
    throw permissionDenied("EXECUTOR_ID_MISMATCH", `executor_id "${id.slice(0, 128)}" is not the caller's own (${caller.principal.slice(0, 140)})`);
  }
  return id;
}

/** The caller's tenant when a tenant calls, else "" (admins, services). */
function callingTenantOf(ctx: HandlerContext): string {
  const caller = callerOf(ctx);
  return caller.kind === "tenant" ? caller.tenantId : "";
}

/**
 * Runs a mutating call and records it in the audit trail with its outcome (SPEC D9). `fn` may
 * name the target it made (`setTarget`) or leave a successful call out (`leaveOut`: a renewal that
 * changed nothing anyone reads the trail for); a refusal is always recorded.
 */
async function audited<T>(
  audit: AuditLog,
  ctx: HandlerContext,
  tenantId: string,
  method: string,
  target: string,
  fn: (setTarget: (target: string) => void, leaveOut: () => void) => Promise<T>,
): Promise<T> {
  const principal = callerOf(ctx).principal;
  let finalTarget = target;
  let recorded = true;
  try {
    const result = await fn(
      (t) => {
        finalTarget = t;
      },
      () => {
        recorded = false;
      },
    );
    if (recorded) await audit.record({ tenantId, principal, method, target: finalTarget, outcome: "OK" });
    return result;
  } catch (err) {
    await audit.record({ tenantId, principal, method, target: finalTarget, outcome: outcomeOf(err) });
    throw err;
  }
}

function auditToProto(event: AuditRecord): AuditEvent {
  return create(AuditEventSchema, {
    id: event.id,
    tenantId: event.tenantId,
    principal: event.principal,
    method: event.method,
    target: event.target,
    outcome: event.outcome,
    time: timestampFromMs(event.time),
  });
}

const CIRCUIT_TO_PROTO = {
  CLOSED: AgentStatus_CircuitState.CLOSED,
  OPEN: AgentStatus_CircuitState.OPEN,
  HALF_OPEN: AgentStatus_CircuitState.HALF_OPEN,
} as const;

function fleetToProto(status: FleetStatus) {
  return create(GetFleetStatusResponseSchema, {
    agents: status.agents.map((a) => ({
      agent: a.agent,
      available: a.available,
      imagePresent: a.imagePresent,
      circuitState: CIRCUIT_TO_PROTO[a.circuit],
    })),
    executors: status.executors.map((e) => ({
      executorId: e.executorId,
      slotsTotal: e.slotsTotal,
      slotsBusy: e.slotsBusy,
      warmContainers: e.warmContainers,
      engineReady: e.engineReady,
      lastSeenTime: timestampFromMs(e.seenAt),
      imagesPresent: e.imagesPresent,
    })),
    queueDepth: BigInt(status.queueDepth),
    runsLast24h: (Object.entries(status.runsLast24h) as [DispatchState, number][]).map(([state, count]) => ({
      state: stateToProto(state),
      count: BigInt(count),
    })),
    degraded: status.degraded,
    warmContainers: BigInt(status.warmContainers),
  });
}
