import { loadConfig, runProcess } from "@outpost/platform";
import { gatewayConfigShape } from "./config.ts";
import { startGateway } from "./service.ts";

await runProcess("gateway", (logger) => startGateway(loadConfig(gatewayConfigShape), logger));
