/** Executor settings, validated at start-up (fails fast naming the variable). */
import os from "node:os";
import { z } from "zod";
import { loadConfig, reportErrorOf, internalTlsShape, setting } from "@outpost/platform";
import { parseAllowedNetworks } from "./adapters/checkout-egress.ts";

/** A size in whole bytes, 0 meaning `zeroMeans`. */
function wholeBytes(defaultBytes: number, zeroMeans: string) {
  return z
    .string()
    .regex(/^\d+$/, `must be a whole number of bytes (0: ${zeroMeans})`)
    .default(String(defaultBytes))
    .transform(Number)
    .refine(Number.isSafeInteger, "is too large");
}

export const executorConfigShape = {
  /** Internal TLS (docs/operations.md, "Internal TLS"); unset: h2c. */
  ...internalTlsShape,
  OUTPOST_SIGNING_KEY: setting.signingKey(),
  OUTPOST_TRUSTED_SIGNERS: setting.trustedSigners(),
  OUTPOST_EXECUTOR_HOST: setting.host(),
  OUTPOST_EXECUTOR_PORT: setting.port(7103),
  /**
   * Serve Prometheus metrics on this port (plain HTTP) instead of the main one: so a scraper
   * needs no TLS set-up when the main port serves it (docs/operations.md). Unset: the main port.
   */
  OUTPOST_EXECUTOR_METRICS_PORT: setting.port().optional(),
  /** Names this executor to the dispatcher and in container labels; `<hostname>-<pid>` by default. */
  OUTPOST_EXECUTOR_ID: z.string().min(1).max(128).regex(/^[A-Za-z0-9._-]+$/, "letters, digits, '.', '_' and '-' only").optional(),
  /**
   * `on`: OUTPOST_SIGNING_KEY is the executors' shared enrollment key; the executor enrolls a key
   * of its own at the dispatcher and signs everything else with it (docs/operations.md,
   * "Enrolled executor keys"). `off` (default): it signs with OUTPOST_SIGNING_KEY.
   */
  OUTPOST_EXECUTOR_ENROLL: z.enum(["on", "off"]).default("off"),
  /** Containers run at most at once. */
  OUTPOST_EXECUTOR_SLOTS: setting.positiveInt(2),
  OUTPOST_DISPATCHER_URL: setting.url(),
  OUTPOST_TELEMETRY_URL: setting.url(),
  /** Secrets come from the tenant service (SPEC T5); without it, runs that name secrets fail. */
  OUTPOST_TENANT_URL: setting.url().optional(),
  /** Run directories (workspace bind mounts) live under <data dir>/executor/<executor id>/runs. */
  OUTPOST_DATA_DIR: setting.dataDir(),
  /** Warm containers per agent, e.g. "demo=2,claude=1" (SPEC E4). */
  OUTPOST_WARM_POOL: z.string().default(""),
  /** Agent images to check (and pull) ahead of work, comma-separated; images seen in leases are added. */
  OUTPOST_EXECUTOR_IMAGES: z.string().default(""),
  /** Try `docker pull` for missing images (failures are tolerated). */
  OUTPOST_EXECUTOR_PULL_IMAGES: z.enum(["true", "false"]).default("true").transform((v) => v === "true"),
  /** URL schemes a dispatch's repository may use; add "file" only where the host's disk holds nothing tenants may not read. */
  OUTPOST_EXECUTOR_REPO_SCHEMES: z.string().default("https,http,ssh,git"),
  /**
   * `on` (default): a checkout connects only to public addresses and the allowed networks, through
   * a proxy of its own; `off`: git reaches whatever the host reaches, through the operator's
   * proxy variables if set. See docs/executor.md, "The checkout's egress guard".
   */
  OUTPOST_EXECUTOR_CHECKOUT_GUARD: z.enum(["on", "off"]).default("on"),
  /** Networks (CIDRs, comma-separated) a guarded checkout may reach although they are not public: an internal git server's. */
  OUTPOST_EXECUTOR_CHECKOUT_ALLOWED_NETWORKS: z
    .string()
    .default("")
    .superRefine(reportErrorOf(parseAllowedNetworks))
    .transform(parseAllowedNetworks),
  /** Longest repository checkout. */
  OUTPOST_EXECUTOR_CHECKOUT_TIMEOUT_MS: setting.timerMs(300_000),
  /** Disk a run's workspace may take on the host, in bytes (10 GiB; 0: no quota); see docs/executor.md. */
  OUTPOST_EXECUTOR_WORKSPACE_MAX_BYTES: wholeBytes(10 * 1024 ** 3, "no quota"),
  /** Output an attempt of a run may send to telemetry, counted as log-shipper.ts outputCost does (100 MiB; 0: no cap); the rest is dropped. See docs/executor.md. */
  OUTPOST_EXECUTOR_RUN_OUTPUT_MAX_BYTES: wholeBytes(100 * 1024 ** 2, "no cap"),
  /** Shortest pause between two measurements of a running workspace (longer when measuring takes long). */
  OUTPOST_EXECUTOR_WORKSPACE_CHECK_MS: setting.timerMs(2000),
  /** Engine address (unix:// or tcp://); the local socket when unset. */
  /**
   * What the engine keeps of a container's output: `none` (default; the executor gets it through
   * attach, redacts it and ships it to telemetry) or `json-file` (also kept by the engine,
   * unredacted, at most 10 MB per container, so `docker logs` works: for debugging and for the
   * `docker logs -f` baseline of the logs benchmark). See docs/executor.md.
   */
  OUTPOST_EXECUTOR_ENGINE_LOGS: z.enum(["none", "json-file"]).default("none"),
  DOCKER_HOST: z.string().min(1).optional(),
  OUTPOST_DOCKER_SOCKET: z.string().min(1).default("/var/run/docker.sock"),
  /** SIGTERM-to-SIGKILL grace when a run is cancelled or times out (SPEC E2). */
  OUTPOST_STOP_GRACE_MS: setting.timerMs(10_000),
  /** How long SIGTERM waits for running containers to finish before the executor leaves them. */
  OUTPOST_EXECUTOR_SHUTDOWN_GRACE_MS: setting.timerMs(30_000),
  /** Longest wait of one AcquireLease long poll. */
  OUTPOST_EXECUTOR_LEASE_WAIT_MS: setting.timerMs(20_000),
  OUTPOST_LOG_LEVEL: setting.logLevel(),
};

export type ExecutorConfig = ReturnType<typeof loadExecutorConfig>;

export function loadExecutorConfig(env: NodeJS.ProcessEnv = process.env) {
  const config = loadConfig(executorConfigShape, env);
  // The host name by default: stable across restarts, so a restarted executor finds and settles
  // the containers it left behind (reconciliation matches on this id). Several executors on one
  // host must each set their own id.
  return { ...config, OUTPOST_EXECUTOR_ID: config.OUTPOST_EXECUTOR_ID ?? os.hostname() };
}
