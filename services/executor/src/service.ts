/**
 * Wires the executor: Docker runtime, host run directories, dispatcher lease client, telemetry
 * log sink, tenant secrets, the warm pool, the work loop, and a health-only server whose
 * readiness is the engine's ping.
 */
import path from "node:path";
import { gauge, internalTlsOf, parseTrustedSigners, SigningKeys, startServer, type Logger } from "@outpost/platform";
import { createDockerRuntime } from "./adapters/docker-runtime.ts";
import { startEnrollment } from "./adapters/enrollment.ts";
import { createHostWorkspaces } from "./adapters/host-workspaces.ts";
import { createLeaseClient } from "./adapters/lease-client.ts";
import { createSecretResolver } from "./adapters/secret-resolver.ts";
import { createTelemetryLogSink } from "./adapters/telemetry-log-sink.ts";
import type { ExecutorConfig } from "./config.ts";
import { Executor } from "./core/executor.ts";
import { containerUserFor } from "./core/run.ts";
import { parseWarmPool, WarmPool } from "./core/warm-pool.ts";
import { executorRoutes } from "./routes.ts";

const list = (text: string) => text.split(",").map((s) => s.trim()).filter(Boolean);

export async function startExecutor(config: ExecutorConfig, logger: Logger) {
  const executorId = config.OUTPOST_EXECUTOR_ID;
  // Signs as "executor/<id>", which a key listed for this executor alone verifies (identity.ts).
  const signingKeys = SigningKeys.fromSettings("executor", config.OUTPOST_SIGNING_KEY, config.OUTPOST_TRUSTED_SIGNERS, executorId);
  const tls = internalTlsOf(config, {
    OUTPOST_DISPATCHER_URL: config.OUTPOST_DISPATCHER_URL,
    OUTPOST_TELEMETRY_URL: config.OUTPOST_TELEMETRY_URL,
    OUTPOST_TENANT_URL: config.OUTPOST_TENANT_URL,
  });
  // Enrolled: the setting's key is only for enrolling; every other call is signed with the
  // executor's own key once the dispatcher certified it (adapters/enrollment.ts).
  if (config.OUTPOST_EXECUTOR_ENROLL === "on" && parseTrustedSigners(config.OUTPOST_TRUSTED_SIGNERS).has("executor")) {
    logger.warn("OUTPOST_EXECUTOR_ENROLL=on but an executor: key is trusted as well: any executor's key still speaks for every executor until that entry is removed");
  }
  const enrollment =
    config.OUTPOST_EXECUTOR_ENROLL === "on"
      ? startEnrollment({
          dispatcherUrl: config.OUTPOST_DISPATCHER_URL,
          executorId,
          enrollmentKeys: SigningKeys.fromSettings("executor", config.OUTPOST_SIGNING_KEY, config.OUTPOST_TRUSTED_SIGNERS, executorId),
          signingKeys,
          tls,
          keyFile: path.resolve(config.OUTPOST_DATA_DIR, "executor", executorId, "enrolled-key.pem"),
          logger,
        })
      : undefined;
  const runtime = createDockerRuntime({
    dockerHost: config.DOCKER_HOST,
    socketPath: config.OUTPOST_DOCKER_SOCKET,
    engineLogs: config.OUTPOST_EXECUTOR_ENGINE_LOGS,
  });
  const containerUser = containerUserFor(process.getuid?.(), process.getgid?.());
  // Per executor id, so executors sharing a data directory never touch each other's runs.
  const workspaces = createHostWorkspaces({
    runsDir: path.resolve(config.OUTPOST_DATA_DIR, "executor", executorId, "runs"),
    uid: containerUser.uid,
    gid: containerUser.gid,
    repoSchemes: new Set(list(config.OUTPOST_EXECUTOR_REPO_SCHEMES)),
    checkoutTimeoutMs: config.OUTPOST_EXECUTOR_CHECKOUT_TIMEOUT_MS,
    checkoutEgress: config.OUTPOST_EXECUTOR_CHECKOUT_GUARD === "on" ? { allowedNetworks: config.OUTPOST_EXECUTOR_CHECKOUT_ALLOWED_NETWORKS } : "open",
  });
  const warmTargets = parseWarmPool(config.OUTPOST_WARM_POOL);
  const warmPool = warmTargets.size > 0 ? new WarmPool({ targets: warmTargets, runtime, workspaces, executorId, logger, containerUser }) : undefined;
  const executor = new Executor({
    executorId,
    slots: config.OUTPOST_EXECUTOR_SLOTS,
    runtime,
    workspaces,
    warmPool,
    containerUser,
    leases: createLeaseClient({
      dispatcherUrl: config.OUTPOST_DISPATCHER_URL,
      signingKeys,
      tls,
      executorId,
    }),
    logs: createTelemetryLogSink({
      telemetryUrl: config.OUTPOST_TELEMETRY_URL,
      signingKeys,
      tls,
      executorId,
    }),
    secrets: config.OUTPOST_TENANT_URL
      ? createSecretResolver({ tenantUrl: config.OUTPOST_TENANT_URL, signingKeys, tls, executorId })
      : undefined,
    logger,
    stopGraceMs: config.OUTPOST_STOP_GRACE_MS,
    leaseWaitMs: config.OUTPOST_EXECUTOR_LEASE_WAIT_MS,
    images: list(config.OUTPOST_EXECUTOR_IMAGES),
    pullImages: config.OUTPOST_EXECUTOR_PULL_IMAGES,
    workspaceQuota:
      config.OUTPOST_EXECUTOR_WORKSPACE_MAX_BYTES > 0
        ? { limitBytes: config.OUTPOST_EXECUTOR_WORKSPACE_MAX_BYTES, checkIntervalMs: config.OUTPOST_EXECUTOR_WORKSPACE_CHECK_MS }
        : undefined,
    maxOutputBytes: config.OUTPOST_EXECUTOR_RUN_OUTPUT_MAX_BYTES,
  });
  // Read at scrape time (SPEC L4): running containers, free slots, warm containers.
  gauge("outpost_executor_running_containers", "Runs (containers) in progress on this executor.", [], (g) => g.set(executor.busySlots));
  gauge("outpost_executor_slots", "Run slots of this executor.", [], (g) => g.set(executor.capacity().slotsTotal));
  gauge("outpost_executor_warm_containers", "Pre-created containers waiting for a run.", [], (g) => g.set(executor.capacity().warmContainers));
  const server = await startServer({
    name: "executor",
    host: config.OUTPOST_EXECUTOR_HOST,
    port: config.OUTPOST_EXECUTOR_PORT,
    metricsPort: config.OUTPOST_EXECUTOR_METRICS_PORT,
    logger,
    routes: executorRoutes(),
    signingKeys,
    tls,
    readiness: async () => (enrollment && !enrollment.certified ? "not enrolled at the dispatcher yet" : executor.notReadyReason()),
  });
  // Nothing is leased (nor any container reconciled) before the executor can sign its calls.
  void (enrollment ? enrollment.enrolled.then(() => executor.start()) : executor.start());
  logger.info({ executorId, slots: config.OUTPOST_EXECUTOR_SLOTS, warmPool: Object.fromEntries(warmTargets) }, "executor leasing work");
  return {
    url: server.url,
    port: server.port,
    async close() {
      await executor.shutdown(config.OUTPOST_EXECUTOR_SHUTDOWN_GRACE_MS);
      enrollment?.stop();
      await server.close();
    },
  };
}
