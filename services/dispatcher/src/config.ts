import { internalTlsShape, setting } from "@outpost/platform";
import { z } from "zod";

/** Environment settings of the dispatcher, validated at start-up. */
export const dispatcherConfigShape = {
  /** Internal TLS (docs/operations.md, "Internal TLS"); unset: h2c. */
  ...internalTlsShape,
  OUTPOST_SIGNING_KEY: setting.signingKey(),
  OUTPOST_TRUSTED_SIGNERS: setting.trustedSigners(),
  OUTPOST_DISPATCHER_HOST: setting.host(),
  OUTPOST_DISPATCHER_PORT: setting.port(7102),
  /**
   * Serve Prometheus metrics on this port (plain HTTP) instead of the main one: so a scraper
   * needs no TLS set-up when the main port serves it (docs/operations.md). Unset: the main port.
   */
  OUTPOST_DISPATCHER_METRICS_PORT: setting.port().optional(),
  OUTPOST_DATA_DIR: setting.dataDir(),
  OUTPOST_TELEMETRY_URL: setting.url(),
  /**
   * Tenant service for admission (quotas, secrets, suspension; contract A). Absent: every
   * dispatch is admitted, capped only by OUTPOST_MAX_TIMEOUT_S (single-tenant development).
   */
  OUTPOST_TENANT_URL: setting.url().optional(),
  /** Redis for cross-replica long-poll wake-ups ("outpost:dispatch:queued"). Absent: in-process only. */
  OUTPOST_REDIS_URL: z.string().url({ message: "must be a URL such as redis://127.0.0.1:6379" }).optional(),
  /** MongoDB for the dispatcher store (production, several replicas). Absent: SQLite in OUTPOST_DATA_DIR. */
  OUTPOST_MONGO_URL: z.string().url({ message: "must be a URL such as mongodb://127.0.0.1:27017/outpost" }).optional(),
  /** Circuit breaker per agent (SPEC D6): failures within the window that open it, etc. Shortened only in tests. */
  OUTPOST_CIRCUIT_WINDOW_MS: setting.timerMs(120_000),
  OUTPOST_CIRCUIT_HALF_OPEN_AFTER_MS: setting.timerMs(60_000),
  /** Infrastructure-failure retries: first backoff and attempt bound. */
  OUTPOST_RETRY_INITIAL_DELAY_MS: setting.timerMs(1000),
  OUTPOST_RETRY_MAX_ATTEMPTS: setting.positiveInt(5),
  /**
   * How long past its timeout a run may still be RUNNING before the dispatcher ends it TIMED_OUT at
   * its executor's next heartbeat (the backstop for an executor that does not enforce timeouts).
   * Keep it above the executors' OUTPOST_STOP_GRACE_MS plus their stop retries.
   */
  OUTPOST_DISPATCHER_TIMEOUT_OVERRUN_MS: setting.timerMs(300_000),
  /** How long a lease lives without a heartbeat. */
  OUTPOST_LEASE_TTL_MS: setting.timerMs(30_000),
  /** How often long-polls and watches re-read the store when nothing woke them (lost cross-replica wake-ups). */
  OUTPOST_QUEUE_RECHECK_MS: setting.timerMs(1000),
  /**
   * How often the slot sweep releases the concurrent slots of ended runs whose own release failed
   * (tenant service away); a run's slot is left to its own release for this long after its end.
   */
  OUTPOST_SLOT_SWEEP_MS: setting.timerMs(15_000),
  /**
   * The operator's ceiling on any run's timeout, above the tiers' own maximums (enterprise: 2 h),
   * which are the real limit; without a tenant service (development) it is the only one.
   */
  OUTPOST_MAX_TIMEOUT_S: setting.positiveInt(86_400),
  /** Image of the built-in demo agent. */
  OUTPOST_DEMO_AGENT_IMAGE: z.string().min(1).default("outpost/demo-agent:latest"),
};

export type DispatcherConfig = z.infer<z.ZodObject<typeof dispatcherConfigShape>>;
