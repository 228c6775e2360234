/**
 * Configuration from the environment, validated once at start-up. A missing or malformed
 * setting stops the process with a message naming the variable, before anything listens.
 */
import { z } from "zod";
import { parseSigningKey, parseTrustedSigners } from "./identity.ts";

export class ConfigError extends Error {
  override name = "ConfigError";
}

/** Parses `env` against a shape of zod schemas keyed by variable name. */
export function loadConfig<T extends z.ZodRawShape>(shape: T, env: NodeJS.ProcessEnv = process.env): z.infer<z.ZodObject<T>> {
  const result = z.object(shape).safeParse(env);
  if (!result.success) {
    const problems = result.error.issues.map((issue) => `${issue.path.join(".") || "(environment)"}: ${issue.message}`);
    throw new ConfigError(`invalid configuration: ${problems.join("; ")}`);
  }
  return result.data;
}

/** A zod refinement that runs `parse` and reports the message of the Error it throws. */
export function reportErrorOf(parse: (value: string) => unknown) {
  return (value: string, ctx: z.RefinementCtx): void => {
    try {
      parse(value);
    } catch (err) {
      ctx.addIssue({ code: "custom", message: (err as Error).message });
    }
  };
}

/** The longest delay Node's timers honour (2^31 - 1 ms); a longer one fires after 1 ms. */
export const MAX_TIMER_MS = 2_147_483_647;

/**
 * A whole number as the environment gives it: digits only (so "0x1F", "1e3", "1.5" and "-1"
 * are refused rather than read as something else), and an empty or blank value counts as unset
 * (the default, or "is required"), not as 0. A number passes as it is (in-process configs).
 */
function fromEnvNumber(value: unknown): unknown {
  if (typeof value !== "string") return value;
  const trimmed = value.trim();
  if (trimmed === "") return undefined;
  return /^\d+$/.test(trimmed) ? Number(trimmed) : value;
}

/**
 * A whole number from `min` to `max`, each refusal worded for itself: the schema's `error`
 * words only a value that is no number (it also worded the range checks' issues, which said
 * "must be a whole number" of 0 or 70000), and a value out of range is refused for that alone
 * (past 2^53 it is no exact integer either; one message is enough).
 */
function wholeNumber(min: number, max: number, maxMessage = `must be at most ${max}`): z.ZodNumber {
  return z
    .number({ error: (issue) => (issue.code !== "invalid_type" ? undefined : issue.input === undefined ? "is required" : "must be a whole number (digits only)") })
    .min(min, { message: `must be at least ${min}`, abort: true })
    .max(max, { message: maxMessage, abort: true })
    .int({ message: "must be a whole number" });
}

/**
 * The longest duration compared with clocks: 100 years. Now plus it must stay a date (Date and
 * BSON hold up to 8.64e15 ms, a protobuf Timestamp up to the year 9999); a larger value made an
 * Invalid Date of an expiry (telemetry's retention on MongoDB).
 */
export const MAX_DURATION_MS = 3_155_760_000_000;

/** A string setting as the environment gives it: trimmed, and blank counts as unset (its default). */
function fromEnvString(value: unknown): unknown {
  if (typeof value !== "string") return value;
  const trimmed = value.trim();
  return trimmed === "" ? undefined : trimmed;
}

/** `schema` read with fromEnvNumber, with `fallback` when unset. */
function envNumber(schema: z.ZodNumber, fallback?: number) {
  return z.preprocess(fromEnvNumber, fallback === undefined ? schema : schema.default(fallback));
}

/** Reusable setting types, so every service reads ports, URLs and secrets the same way. */
export const setting = {
  port: (fallback?: number) => envNumber(wholeNumber(0, 65535), fallback),
  /**
   * Where to listen: trimmed, blank is the default; a host name or an IP address, so a typo (a
   * space, a URL) stops start-up naming the variable instead of failing the listen.
   */
  host: (fallback = "127.0.0.1") =>
    z.preprocess(fromEnvString, z.string().regex(/^[A-Za-z0-9._:%-]+$/, { message: "must be a host name or IP address (such as 0.0.0.0 or ::)" }).default(fallback)),
  /** An http(s) URL of another service ("localhost:7101" would parse as a URL of scheme "localhost:"). */
  url: () =>
    z
      .string({ error: "is required" })
      .url({ message: "must be a URL such as http://127.0.0.1:7101" })
      .refine((value) => !URL.canParse(value) || /^https?:$/.test(new URL(value).protocol), { message: "must be an http:// or https:// URL such as http://127.0.0.1:7101" }),
  /** An optional file path: trimmed, blank is unset. */
  file: () => z.preprocess(fromEnvString, z.string().optional()),
  /** Trimmed, blank is the default: "/data " named another directory than "/data", silently. */
  dataDir: (fallback = ".outpost/data") => z.preprocess(fromEnvString, z.string().default(fallback)),
  /** This process's Ed25519 private key for signing caller identities (identity.ts). */
  signingKey: () =>
    z
      .string({ error: "is required (this process's Ed25519 key for signing caller identities; `npm run signing-keys` makes a set)" })
      .superRefine(reportErrorOf(parseSigningKey)),
  /** The public keys of the roles whose calls this process accepts, "gateway:<key>,…" (identity.ts). */
  trustedSigners: () =>
    z
      .string({ error: "is required (public keys of the roles this process accepts calls from, role:<base64>,…)" })
      .superRefine(
        reportErrorOf((value) => {
          if (parseTrustedSigners(value).size === 0) throw new Error("names no signer");
        }),
      ),
  logLevel: () => z.enum(["trace", "debug", "info", "warn", "error", "fatal", "silent"]).default("info"),
  /** A duration compared with clocks, never waited for by a timer (retention, say); see timerMs. */
  durationMs: (fallback: number) =>
    envNumber(wholeNumber(1, MAX_DURATION_MS, `must be at most ${MAX_DURATION_MS} (100 years)`), fallback),
  /**
   * A duration a timer waits (setTimeout, setInterval): at most 2^31 - 1 ms (about 24.8 days),
   * because Node fires a longer one after 1 ms, which would turn a grace into none and a period
   * into a busy loop.
   */
  timerMs: (fallback: number) =>
    envNumber(wholeNumber(1, MAX_TIMER_MS, `must be at most ${MAX_TIMER_MS} (about 24.8 days)`), fallback),
  positiveInt: (fallback: number) => envNumber(wholeNumber(1, Number.MAX_SAFE_INTEGER), fallback),
};
