/** Composition root of the tenant service. */
import { loadConfig, runProcess } from "@outpost/platform";
import { tenantConfigShape } from "./config.ts";
import { startTenant } from "./service.ts";

await runProcess("tenant", async (logger) => startTenant(loadConfig(tenantConfigShape), logger));
