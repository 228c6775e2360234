/** Wires the tenant service: store, tiers, secret box, cores, Redis publisher, server. */
import { connectRedis, internalTlsOf, SigningKeys, startServer, type Logger, type Redis } from "@outpost/platform";
import { AdmissionCore } from "./core/admission.ts";
import { NO_INVALIDATION, publishingInvalidation } from "./core/invalidation.ts";
import { SecretBox } from "./core/secret-box.ts";
import { SecretsCore } from "./core/secrets.ts";
import { TenantCore } from "./core/tenants.ts";
import { loadTiers } from "./core/tiers.ts";
import type { TenantConfig } from "./config.ts";
import { tenantRoutes } from "./routes.ts";
import { auditReporter } from "./adapters/audit-reporter.ts";
import { openTenantStore } from "./store/open-store.ts";
import type { TenantStore } from "./store/store.ts";

export interface RunningTenant {
  url: string;
  port: number;
  close(): Promise<void>;
}

export async function startTenant(config: TenantConfig, logger: Logger, store?: TenantStore): Promise<RunningTenant> {
  // Settings that can be wrong are read before anything is opened, so a bad one fails fast.
  const tiers = loadTiers(config.OUTPOST_TIERS_FILE);
  const box = config.OUTPOST_SECRETS_MASTER_KEYS ? SecretBox.fromSetting(config.OUTPOST_SECRETS_MASTER_KEYS) : undefined;
  if (!box) logger.warn("OUTPOST_SECRETS_MASTER_KEYS is not set: secret methods answer FAILED_PRECONDITION");
  else logger.info({ current_key_id: box.currentKeyId }, "secrets sealed under the current master key");
  const signingKeys = SigningKeys.fromSettings("tenant", config.OUTPOST_SIGNING_KEY, config.OUTPOST_TRUSTED_SIGNERS);
  const tls = internalTlsOf(config, { OUTPOST_DISPATCHER_URL: config.OUTPOST_DISPATCHER_URL });
  if (!config.OUTPOST_DISPATCHER_URL) logger.warn("OUTPOST_DISPATCHER_URL is not set: tenant mutations are not written to the audit trail");

  const tenantStore = store ?? (await openTenantStore(config));
  let redis: Redis | undefined;
  if (config.OUTPOST_REDIS_URL) redis = connectRedis(config.OUTPOST_REDIS_URL, logger);
  const invalidation = redis ? publishingInvalidation(redis, logger) : NO_INVALIDATION;
  const tenants = new TenantCore({ store: tenantStore, tiers, invalidation, logger });
  const secrets = new SecretsCore({ store: tenantStore, box, logger });
  const admission = new AdmissionCore({ store: tenantStore, tenants, secrets });
  let server;
  try {
    server = await startServer({
      name: "tenant",
      host: config.OUTPOST_TENANT_HOST,
      port: config.OUTPOST_TENANT_PORT,
      metricsPort: config.OUTPOST_TENANT_METRICS_PORT,
      logger,
      routes: tenantRoutes({ tenants, secrets, admission, signingKeys }),
      signingKeys,
      tls,
      interceptors: config.OUTPOST_DISPATCHER_URL
        ? [auditReporter({ dispatcherUrl: config.OUTPOST_DISPATCHER_URL, signingKeys, tls, logger })]
        : [],
    });
  } catch (err) {
    redis?.disconnect();
    await tenantStore.close();
    throw err;
  }
  const running = server;
  return {
    url: running.url,
    port: running.port,
    async close() {
      await running.close();
      redis?.disconnect();
      await tenantStore.close();
    },
  };
}
