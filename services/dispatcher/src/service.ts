/** Wires the dispatcher: store, registry, core, telemetry client, lease sweeper, server. */
import { create } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { connectRedis, gauge, internalClient, internalTlsOf, SigningKeys, startServer, subscriberOf, type Logger } from "@outpost/platform";
import { LogIngestService } from "@outpost/proto/outpost/telemetry/v1/log_ingest_service_pb.js";
import { GrpcTenantAdmission } from "./adapters/tenant-admission.ts";
import { AgentRegistry, builtinAgents } from "./core/agents.ts";
import { Dispatcher, type RunEvents } from "./core/dispatcher.ts";
import { AuditLog } from "./core/audit.ts";
import { ExecutorEnrollment } from "./core/enrollment.ts";
import { fleetStatus } from "./core/fleet.ts";
import { Notifier, redisWakeupBus } from "./core/notifier.ts";
import { exportCircuitStates } from "./adapters/circuit-metrics.ts";
import { AgentCircuits, DEFAULT_CIRCUIT, InfraRetry, DEFAULT_INFRA_RETRY, type CircuitStateStore } from "./core/resilience.ts";
import { redisCircuitStates } from "./adapters/circuit-states.ts";
import type { DispatcherConfig } from "./config.ts";
import { stateToProto } from "./mapping.ts";
import { registerRoutes } from "./routes.ts";
import { MongoDispatchStore } from "./store/mongo-store.ts";
import { SqliteDispatchStore } from "./store/sqlite-store.ts";
import type { DispatcherStore } from "./store/store.ts";
import { RunEndSchema } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";

/** Bounds each call to telemetry so a slow telemetry cannot stall dispatch creation. */
const TELEMETRY_CALL_TIMEOUT_MS = 2000;
/** How often a replica that could not read the saved circuit states tries again. */
const CIRCUIT_RESTORE_RETRY_MS = 5000;

export async function startDispatcher(config: DispatcherConfig, logger: Logger) {
  const signingKeys = SigningKeys.fromSettings("dispatcher", config.OUTPOST_SIGNING_KEY, config.OUTPOST_TRUSTED_SIGNERS);
  const tls = internalTlsOf(config, { OUTPOST_TELEMETRY_URL: config.OUTPOST_TELEMETRY_URL, OUTPOST_TENANT_URL: config.OUTPOST_TENANT_URL });
  // MongoDB when configured (several replicas in production); the embedded SQLite file otherwise.
  const store: DispatcherStore = config.OUTPOST_MONGO_URL
    ? await MongoDispatchStore.connect(config.OUTPOST_MONGO_URL)
    : new SqliteDispatchStore(config.OUTPOST_DATA_DIR);
  const agents = new AgentRegistry(builtinAgents(config.OUTPOST_DEMO_AGENT_IMAGE), store);
  await agents.refresh();
  // Cross-replica wake-ups over Redis when configured; in-process (plus the periodic re-check) otherwise.
  let notifier: Notifier;
  let redisReady: (() => boolean) | undefined;
  let circuitStates: CircuitStateStore | undefined;
  if (config.OUTPOST_REDIS_URL) {
    const publisher = connectRedis(config.OUTPOST_REDIS_URL, logger);
    redisReady = () => publisher.status === "ready";
    circuitStates = redisCircuitStates(publisher, logger);
    notifier = new Notifier(redisWakeupBus(publisher, subscriberOf(publisher), logger));
    // Do not block start-up on Redis: it is optional, wake-ups work in-process until it answers.
    // The bus retries failed subscribes until Redis answers or the bus closes; this catch is a
    // safety net for anything else.
    notifier.start().catch((err: unknown) => logger.warn({ err }, "redis subscribe stopped; peers' work is found by the periodic re-check"));
  } else {
    notifier = new Notifier();
  }
  const circuits = new AgentCircuits(
    { ...DEFAULT_CIRCUIT, windowMs: config.OUTPOST_CIRCUIT_WINDOW_MS, halfOpenAfterMs: config.OUTPOST_CIRCUIT_HALF_OPEN_AFTER_MS },
    circuitStates,
  );
  exportCircuitStates(circuits, logger);
  // Restored before serving; when Redis does not answer yet, again every few seconds until it does.
  let restoreRetry: NodeJS.Timeout | undefined;
  if (circuitStates && !(await restoreCircuits(circuits, circuitStates, logger))) {
    const states = circuitStates;
    restoreRetry = setInterval(() => {
      void restoreCircuits(circuits, states, logger, "debug").then((done) => done && clearInterval(restoreRetry));
    }, CIRCUIT_RESTORE_RETRY_MS);
  }
  const infraRetry = new InfraRetry({
    ...DEFAULT_INFRA_RETRY,
    initialDelayMs: config.OUTPOST_RETRY_INITIAL_DELAY_MS,
    maxAttempts: config.OUTPOST_RETRY_MAX_ATTEMPTS,
  });
  const audit = new AuditLog(store, logger);
  const telemetry = internalClient(LogIngestService, {
    baseUrl: config.OUTPOST_TELEMETRY_URL,
    signingKeys,
    tls,
    identity: { kind: "service", principal: "dispatcher" },
  });
  const runEvents: RunEvents = {
    async runCreated(d, logRetentionMs) {
      const retention = logRetentionMs === undefined ? undefined : durationFromMs(logRetentionMs);
      await telemetry.registerRun({ dispatchId: d.id, tenantId: d.tenantId, retention }, { timeoutMs: TELEMETRY_CALL_TIMEOUT_MS });
    },
    async runEnded(d, lastLogSeq) {
      const runEnd = create(RunEndSchema, {
        state: stateToProto(d.state),
        exitCode: d.exitCode ?? undefined,
        failureReason: d.failureReason,
        lastSeq: lastLogSeq,
      });
      await telemetry.completeRun({ dispatchId: d.id, tenantId: d.tenantId, runEnd }, { timeoutMs: TELEMETRY_CALL_TIMEOUT_MS });
    },
  };
  // Quotas, secrets and suspension are the tenant service's (contract A).
  const admission = config.OUTPOST_TENANT_URL
    ? new GrpcTenantAdmission({ baseUrl: config.OUTPOST_TENANT_URL, signingKeys, tls })
    : undefined;
  if (!admission) logger.warn("OUTPOST_TENANT_URL is not set: dispatches are admitted without tenant quotas or secret checks");
  const dispatcher = new Dispatcher({
    admission,
    store,
    agents,
    notifier,
    circuits,
    infraRetry,
    runEvents,
    logger,
    leaseTtlMs: config.OUTPOST_LEASE_TTL_MS,
    timeoutOverrunMs: config.OUTPOST_DISPATCHER_TIMEOUT_OVERRUN_MS,
    maxTimeoutMs: config.OUTPOST_MAX_TIMEOUT_S * 1000,
    queueRecheckMs: config.OUTPOST_QUEUE_RECHECK_MS,
  });

  const fleet = () =>
    fleetStatus({ store, agents, circuits, logger, executorStaleMs: 3 * config.OUTPOST_LEASE_TTL_MS, redisReady });
  // Read at scrape time from the store, so every replica reports the shared queue.
  gauge("outpost_dispatch_queue_depth", "Dispatches waiting in the queue (QUEUED).", [], async (g) => {
    g.set(await store.queueDepth());
  });
  // Both are counted on the state index: autoscalers scrape them often, and the history grows.
  gauge("outpost_dispatch_active_leases", "Dispatches leased to executors (STARTING or RUNNING).", [], async (g) => {
    g.set(await store.activeLeases());
  });

  // Never-stored dispatch ids whose slot release waits in this replica's memory (bounded).
  gauge("outpost_dispatch_unstored_releases_pending", "Slot releases of never-stored dispatch ids waiting to be tried again (this replica, in memory).", [], (g) => {
    g.set(dispatcher.unstoredReleasesPending);
  });

  const sweeper = setInterval(
    () => void dispatcher.expireLeases().catch((err: unknown) => logger.error({ err }, "lease sweep failed")),
    Math.max(250, Math.floor(config.OUTPOST_LEASE_TTL_MS / 4)),
  );

  // Pages of 100, for up to 2 s a sweep (releaseOwedSlots' default budget).
  const slotSweeper = setInterval(
    () => void dispatcher.releaseOwedSlots(100, config.OUTPOST_SLOT_SWEEP_MS).catch((err: unknown) => logger.error({ err }, "slot sweep failed")),
    config.OUTPOST_SLOT_SWEEP_MS,
  );

  const server = await startServer({
    name: "dispatcher",
    host: config.OUTPOST_DISPATCHER_HOST,
    port: config.OUTPOST_DISPATCHER_PORT,
    metricsPort: config.OUTPOST_DISPATCHER_METRICS_PORT,
    logger,
    signingKeys,
    tls,
    routes: (router) => registerRoutes(router, dispatcher, agents, { audit, fleet, signingKeys, enrollment: new ExecutorEnrollment(store, signingKeys) }),
    readiness: async () => {
      await store.get("0"); // the store answers
      return null;
    },
  });

  return {
    url: server.url,
    port: server.port,
    dispatcher,
    async close() {
      clearInterval(sweeper);
      clearInterval(slotSweeper);
      clearInterval(restoreRetry);
      await server.close();
      await notifier.close();
      await store.close();
    },
  };
}

/**
 * Takes up the circuit states peers saved (those of agents this replica has no circuit for yet).
 * Resolves false when Redis did not answer: until then every circuit starts closed.
 */
async function restoreCircuits(circuits: AgentCircuits, states: CircuitStateStore, logger: Logger, failureLevel: "warn" | "debug" = "warn"): Promise<boolean> {
  try {
    const restored = circuits.restore(await states.load());
    const open = restored.filter((agent) => circuits.state(agent) !== "CLOSED");
    logger.info({ restored: restored.length, not_closed: open }, "circuit states restored from redis");
    return true;
  } catch (err) {
    logger[failureLevel]({ err: err instanceof Error ? err.message : String(err) }, "circuit states could not be read from redis; circuits start closed until it answers");
    return false;
  }
}
