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
 * Field names that can hold a key, a token, a grant or a secret value, at the top level and two
 * levels down, and inside `headers` two levels down (a request logged whole). Header names as
 * Node gives them (lower case) and as client libraries' configs spell them (title case); a
 * signed identity's signature is a credential too (it is accepted for its minute of life).
 * Grants by the names a Lease gives them (secretGrant, logGrant).
 */
const SENSITIVE = [
  "apiKey", "api_key", "apiKeyPlaintext", "api_key_plaintext", "plaintext", "adminToken", "authorization", "Authorization", "token", "password",
  "grant", "secretGrant", "secret_grant", "logGrant", "log_grant", "privateKey", "signingKey", "secret", "secrets", "value", "values",
];
const SENSITIVE_HEADERS = [
  "authorization", "Authorization", '["x-api-key"]', '["X-Api-Key"]', '["proxy-authorization"]', '["Proxy-Authorization"]', "cookie", "Cookie",
  '["outpost-identity-signature"]',
];
const REDACT_PATHS = [
  ...SENSITIVE.flatMap((name) => [name, `*.${name}`, `*.*.${name}`]),
  ...SENSITIVE_HEADERS.flatMap((name) => {
    const at = name.startsWith("[") ? name : `.${name}`;
    return [`headers${at}`, `*.headers${at}`, `*.*.headers${at}`];
  }),
];

/**
 * Credentials an error's message (and so its stack) can quote, which no field name catches: a
 * bearer token, an Outpost API key (tenant's api-keys.ts: "otp_" and hex), a URL's password.
 */
const IN_MESSAGE: readonly [RegExp, string][] = [
  [/\b(bearer\s+)[^\s,;"']+/gi, "$1[REDACTED]"],
  [/\botp_[0-9a-f]{8,}/gi, "otp_[REDACTED]"],
  [/(\b[a-z][a-z0-9+.-]*:\/\/[^\s/:@]*:)[^\s/@]+@/gi, "$1[REDACTED]@"],
];

function scrub(text: string): string {
  return IN_MESSAGE.reduce((out, [pattern, replacement]) => out.replace(pattern, replacement), text);
}

/**
 * What a logged error says: its type, message, stack, code and cause (three deep), credentials
 * quoted in the message scrubbed. A thrown value or cause that is an object but not an Error (a
 * client library's rejection, say) is logged the same way, never whole: it can hold the request
 * and its headers at any depth. Anything else (services log `err: err.message`) as it is.
 */
export function explainError(err: unknown, depth = 0): unknown {
  if (typeof err === "string") return scrub(err);
  if (typeof err !== "object" || err === null) return err;
  const fields = err as Record<string, unknown>;
  const out: Record<string, unknown> = { type: err.constructor?.name ?? "Object" };
  if (typeof fields.message === "string") out.message = scrub(fields.message);
  if (err instanceof Error && typeof err.stack === "string") out.stack = scrub(err.stack);
  for (const key of ["code", "statusCode", "errno", "syscall", "reason"] as const) {
    const value = fields[key];
    if (typeof value === "string" || typeof value === "number") out[key] = typeof value === "string" ? scrub(value) : value;
  }
  if (fields.cause !== undefined && depth < 3) out.cause = explainError(fields.cause, depth + 1);
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
