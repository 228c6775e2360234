/**
 * JSON logs (pino) that carry the trace id of the call being served. Keys and secrets must
 * never reach a log line: the redact paths below catch the field names that could hold them.
 */
import { pino, type Logger } from "pino";
import { currentTrace } from "./call-context.ts";
import { ConfigError } from "./config.ts";

export type { Logger };

export const LOG_LEVELS = ["fatal", "error", "warn", "info", "debug", "trace", "silent"] as const;

/** Throws ConfigError naming OUTPOST_LOG_LEVEL when the level is not one of LOG_LEVELS. */
export function createLogger(service: string, level = process.env.OUTPOST_LOG_LEVEL ?? "info"): Logger {
  if (!(LOG_LEVELS as readonly string[]).includes(level)) {
    throw new ConfigError(`OUTPOST_LOG_LEVEL: must be one of ${LOG_LEVELS.join(", ")} (got "${level}")`);
  }
  return pino({
    level,
    base: { service, pid: process.pid },
    timestamp: pino.stdTimeFunctions.isoTime,
    formatters: { level: (label) => ({ level: label }) },
    redact: {
      paths: [
        "apiKey", "*.apiKey", "api_key", "*.api_key",
        "apiKeyPlaintext", "*.apiKeyPlaintext", "api_key_plaintext", "*.api_key_plaintext",
        "adminToken", "*.adminToken", "authorization", "*.authorization",
        "secret", "*.secret", "secrets", "*.secrets", "value", "*.value", "values", "*.values",
      ],
      censor: "[REDACTED]",
    },
    mixin() {
      const trace = currentTrace();
      return trace ? { trace_id: trace.traceId } : {};
    },
  });
}
