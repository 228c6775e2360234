/** Composition root of the telemetry service (SPEC L1-L3). */
import { runProcess } from "@outpost/platform";
import { loadTelemetryConfig } from "./config.ts";
import { startTelemetry } from "./service.ts";

await runProcess("telemetry", (logger) => startTelemetry(loadTelemetryConfig(), logger));
