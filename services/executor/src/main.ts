/** Composition root of the executor service. */
import { runProcess } from "@outpost/platform";
import { loadExecutorConfig } from "./config.ts";
import { startExecutor } from "./service.ts";

await runProcess("executor", (logger) => startExecutor(loadExecutorConfig(), logger));
