/**
 * Master-key rotation, step 2 (docs/tenancy.md): re-seals every secret that is not under the
 * current master key (the first of OUTPOST_SECRETS_MASTER_KEYS), then reports how many moved
 * and how many could not be read. Run it with the tenant service's own environment (the same
 * store: OUTPOST_MONGO_URL, or OUTPOST_DATA_DIR holding the service's tenant.db), while the
 * service runs or not (SQLite's busy timeout lets both write the same file; MongoDB's re-seals
 * are conditional updates). Exit codes: 0 all
 * values are under the current key; 1 some could not be re-sealed (their key is missing);
 * 78 a setting is wrong.
 *
 *   npm run reencrypt-secrets -w @outpost/tenant
 */
import { ConfigError, createLogger, loadConfig } from "@outpost/platform";
import { tenantConfigShape } from "./config.ts";
import { SecretBox } from "./core/secret-box.ts";
import { SecretsCore } from "./core/secrets.ts";
import { existsSync } from "node:fs";
import path from "node:path";
import { openTenantStore } from "./store/open-store.ts";

const logger = createLogger("tenant-reencrypt");
try {
  // Only the settings this command uses: it serves nothing, so it needs no internal secret.
  const config = loadConfig({
    OUTPOST_DATA_DIR: tenantConfigShape.OUTPOST_DATA_DIR,
    OUTPOST_MONGO_URL: tenantConfigShape.OUTPOST_MONGO_URL,
    OUTPOST_SECRETS_MASTER_KEYS: tenantConfigShape.OUTPOST_SECRETS_MASTER_KEYS,
  });
  if (!config.OUTPOST_SECRETS_MASTER_KEYS) throw new ConfigError("OUTPOST_SECRETS_MASTER_KEYS: is required to re-encrypt secrets");
  // A new, empty database would report "0 re-encrypted" and look like success: the operator would
  // then drop the old key while the real store's secrets still need it.
  if (!config.OUTPOST_MONGO_URL && !existsSync(path.join(config.OUTPOST_DATA_DIR, "tenant.db"))) {
    throw new ConfigError(
      `OUTPOST_DATA_DIR: no tenant.db in "${config.OUTPOST_DATA_DIR}"; give the tenant service's own data directory, or OUTPOST_MONGO_URL if it uses MongoDB`,
    );
  }
  const box = SecretBox.fromSetting(config.OUTPOST_SECRETS_MASTER_KEYS);
  const store = await openTenantStore(config);
  try {
    const { resealed, failed } = await new SecretsCore({ store, box, logger }).reencryptAll();
    process.stdout.write(`re-encrypted ${resealed} secret(s) under master key "${box.currentKeyId}"; ${failed} could not be read\n`);
    process.exitCode = failed > 0 ? 1 : 0;
  } finally {
    await store.close();
  }
} catch (err) {
  if (!(err instanceof ConfigError)) throw err;
  process.stderr.write(`tenant-reencrypt: ${err.message}\n`);
  process.exitCode = 78;
}
