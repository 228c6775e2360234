/**
 * The tenant store the settings select: MongoDB when OUTPOST_MONGO_URL is set (several replicas
 * in production), else the embedded SQLite file in OUTPOST_DATA_DIR. The service and the
 * re-encrypt command both open it here, so the command works on the store the service uses.
 */
import { MongoTenantStore } from "./mongo-store.ts";
import { SqliteTenantStore } from "./sqlite-store.ts";
import type { TenantStore } from "./store.ts";

export async function openTenantStore(settings: { OUTPOST_MONGO_URL?: string | undefined; OUTPOST_DATA_DIR: string }): Promise<TenantStore> {
  return settings.OUTPOST_MONGO_URL ? MongoTenantStore.connect(settings.OUTPOST_MONGO_URL) : new SqliteTenantStore(settings.OUTPOST_DATA_DIR);
}
