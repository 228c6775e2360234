import { loadConfig, runProcess } from "@outpost/platform";
import { dispatcherConfigShape } from "./config.ts";
import { startDispatcher } from "./service.ts";

await runProcess("dispatcher", (logger) => startDispatcher(loadConfig(dispatcherConfigShape), logger));
