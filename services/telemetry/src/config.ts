/** Settings of the telemetry service, validated at start-up (a bad one stops the process, naming it). */
import { loadConfig, internalTlsShape, setting } from "@outpost/platform";
import { z } from "zod";
import { DEFAULT_RETENTION_MS } from "./core/model.ts";
import { DEFAULT_MAX_SUBSCRIPTIONS_PER_TENANT } from "./core/telemetry-core.ts";

export const telemetryConfigShape = {
  /** Internal TLS (docs/operations.md, "Internal TLS"); unset: h2c. */
  ...internalTlsShape,
  OUTPOST_SIGNING_KEY: setting.signingKey(),
  OUTPOST_TRUSTED_SIGNERS: setting.trustedSigners(),
  OUTPOST_TELEMETRY_HOST: setting.host(),
  OUTPOST_TELEMETRY_PORT: setting.port(7104),
  /**
   * Serve Prometheus metrics on this port (plain HTTP) instead of the main one: so a scraper
   * needs no TLS set-up when the main port serves it (docs/operations.md). Unset: the main port.
   */
  OUTPOST_TELEMETRY_METRICS_PORT: setting.port().optional(),
  /** Directory of telemetry.db, or ":memory:". */
  OUTPOST_DATA_DIR: setting.dataDir(),
  OUTPOST_LOG_LEVEL: setting.logLevel(),
  /** Live chunks one subscription may hold before it falls back to reading storage. */
  OUTPOST_TELEMETRY_SUBSCRIBER_BUFFER: setting.positiveInt(2000),
  /** Open SubscribeLogs streams one tenant may hold on a replica (RESOURCE_EXHAUSTED beyond). */
  OUTPOST_TELEMETRY_MAX_SUBSCRIPTIONS_PER_TENANT: setting.positiveInt(DEFAULT_MAX_SUBSCRIPTIONS_PER_TENANT),
  /** How long a subscription to an ended run waits for chunks that never came. */
  OUTPOST_TELEMETRY_END_GRACE_MS: setting.timerMs(30_000),
  /** Redis for the live fan-out between replicas (channel outpost:logs:<dispatch_id>); unset: one replica, in-process. */
  OUTPOST_REDIS_URL: z.string().url({ message: "must be a URL such as redis://127.0.0.1:6379" }).optional(),
  /** Retention of runs registered without one (RegisterRun.retention unset): 7 days, the free tier's. */
  OUTPOST_TELEMETRY_DEFAULT_RETENTION_MS: setting.durationMs(DEFAULT_RETENTION_MS),
  /**
   * MongoDB for the telemetry store (production, several replicas; retention by TTL index, no
   * sweep). Absent: SQLite in OUTPOST_DATA_DIR.
   */
  OUTPOST_MONGO_URL: z.string().url({ message: "must be a URL such as mongodb://127.0.0.1:27017/outpost" }).optional(),
  /** How often expired runs are deleted from the embedded store. */
  OUTPOST_TELEMETRY_RETENTION_SWEEP_MS: setting.timerMs(60 * 60 * 1000),
  /** How long a live subscription waits without a wake-up before it checks storage anyway. */
  OUTPOST_TELEMETRY_IDLE_POLL_MS: setting.timerMs(5_000),
};

export type TelemetryConfig = ReturnType<typeof loadTelemetryConfig>;

export function loadTelemetryConfig(env: NodeJS.ProcessEnv = process.env) {
  return loadConfig(telemetryConfigShape, env);
}
