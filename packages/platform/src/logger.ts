/**
 * JSON logs (pino) that carry the trace id of the call being served. Keys and secrets must
 * never reach a log line: the redact paths below catch the field names that could hold them.
 */
import { pino, type Logger } from "pino";
import { currentTrace } from "./call-context.ts";
import { ConfigError } from "./config.ts";

export type { Logger };

export const LOG_LEVELS = ["fatal", "error", "warn", "info", "debug", "trace", "silent"] as const;

/**
 * Field names that can hold a key, a token, a grant or a secret value, at the top level, one
 * level down, and inside `headers` two levels down (a request logged whole). Header names as
 * Node gives them (lower case).
 */
const SENSITIVE = ["apiKey", "api_key", "apiKeyPlaintext", "api_key_plaintext", "adminToken", "authorization", "token", "password", "grant", "secret", "secrets", "value", "values"];
const SENSITIVE_HEADERS = ["authorization", '["x-api-key"]', '["proxy-authorization"]', "cookie"];
const REDACT_PATHS = [
  ...SENSITIVE.flatMap((name) => [name, `*.${name}`]),
  ...SENSITIVE_HEADERS.flatMap((name) => {
    const at = name.startsWith("[") ? name : `.${name}`;
    return [`headers${at}`, `*.headers${at}`, `*.*.headers${at}`];
  }),
];

/** What a logged error says: its type, message, stack, code and cause (three deep). */
export function explainError(err: unknown, depth = 0): unknown {
  if (!(err instanceof Error)) return err;
  const out: Record<string, unknown> = { type: err.constructor.name, message: err.message, stack: err.stack };
  for (const key of ["code", "statusCode", "errno", "syscall", "reason"] as const) {
    const value = (err as unknown as Record<string, unknown>)[key];
    if (typeof value === "string" || typeof value === "number") out[key] = value;
  }
  if (err.cause !== undefined && depth < 3) out.cause = explainError(err.cause, depth + 1);
  return out;
}

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
    redact: { paths: REDACT_PATHS, censor: "[REDACTED]" },
    // An error is logged as what explains it (type, message, stack, code, cause), not with every
    // property it carries: a client library's error can hold the request, its headers and its
    // credentials, which no path list can foresee.
    serializers: { err: explainError },
    mixin() {
      const trace = currentTrace();
      return trace ? { trace_id: trace.traceId } : {};
    },
  });
}
