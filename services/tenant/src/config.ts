/** Settings of the tenant service, validated at start-up (the process stops naming a bad one). */
import { internalTlsShape, setting } from "@outpost/platform";
import { z } from "zod";

export const tenantConfigShape = {
  OUTPOST_SIGNING_KEY: setting.signingKey(),
  OUTPOST_TRUSTED_SIGNERS: setting.trustedSigners(),
  OUTPOST_TENANT_HOST: setting.host(),
  OUTPOST_TENANT_PORT: setting.port(7101),
  /**
   * Serve Prometheus metrics on this port (plain HTTP) instead of the main one: so a scraper
   * needs no TLS set-up when the main port serves it (docs/operations.md). Unset: the main port.
   */
  OUTPOST_TENANT_METRICS_PORT: setting.port().optional(),
  OUTPOST_DATA_DIR: setting.dataDir(),
  OUTPOST_LOG_LEVEL: setting.logLevel(),
  /** JSON or YAML overriding the default tier limits (docs/tenancy.md); validated at start-up. */
  OUTPOST_TIERS_FILE: z.string().min(1).optional(),
  /**
   * "k2:<base64 32 bytes>,k1:<base64 32 bytes>": AES-256-GCM master keys, the first current.
   * Absent: secret methods answer FAILED_PRECONDITION SECRETS_NOT_CONFIGURED.
   */
  OUTPOST_SECRETS_MASTER_KEYS: z.string().min(1).optional(),
  /** Redis for publishing auth invalidations to gateway replicas; absent = none (cache TTL applies). */
  OUTPOST_REDIS_URL: z.string().url({ message: "must be a URL such as redis://127.0.0.1:6379" }).optional(),
  /** MongoDB for the tenant store (production, several replicas). Absent: SQLite in OUTPOST_DATA_DIR. */
  OUTPOST_MONGO_URL: z.string().url({ message: "must be a URL such as mongodb://127.0.0.1:27017/outpost" }).optional(),
  /** The dispatcher, which keeps the audit trail these mutations are reported to; absent = not audited. */
  OUTPOST_DISPATCHER_URL: z.string().url({ message: "must be a URL such as http://127.0.0.1:7102" }).optional(),
  /** Internal TLS (docs/operations.md, "Internal TLS"); unset: h2c. */
  ...internalTlsShape,
};

export interface TenantConfig {
  OUTPOST_SIGNING_KEY: string;
  OUTPOST_TRUSTED_SIGNERS: string;
  OUTPOST_TENANT_HOST: string;
  OUTPOST_TENANT_PORT: number;
  OUTPOST_TENANT_METRICS_PORT?: number | undefined;
  /** ":memory:" keeps the store in memory (tests). */
  OUTPOST_DATA_DIR: string;
  OUTPOST_TIERS_FILE?: string | undefined;
  OUTPOST_SECRETS_MASTER_KEYS?: string | undefined;
  OUTPOST_REDIS_URL?: string | undefined;
  OUTPOST_MONGO_URL?: string | undefined;
  OUTPOST_DISPATCHER_URL?: string | undefined;
  OUTPOST_TLS_CERT_FILE?: string | undefined;
  OUTPOST_TLS_KEY_FILE?: string | undefined;
  OUTPOST_TLS_CA_FILE?: string | undefined;
}
