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

function wholeNumber(): z.ZodNumber {
  return z.number({ error: (issue) => (issue.input === undefined ? "is required" : "must be a whole number (digits only)") }).int();
}

/** `schema` read with fromEnvNumber, with `fallback` when unset. */
function envNumber(schema: z.ZodNumber, fallback?: number) {
  return z.preprocess(fromEnvNumber, fallback === undefined ? schema : schema.default(fallback));
}

/** Reusable setting types, so every service reads ports, URLs and secrets the same way. */
export const setting = {
  port: (fallback?: number) => envNumber(wholeNumber().min(0).max(65535), fallback),
  host: (fallback = "127.0.0.1") => z.string().min(1).default(fallback),
  /** An http(s) URL of another service ("localhost:7101" would parse as a URL of scheme "localhost:"). */
  url: () =>
    z
      .string({ error: "is required" })
      .url({ message: "must be a URL such as http://127.0.0.1:7101" })
      .refine((value) => !URL.canParse(value) || /^https?:$/.test(new URL(value).protocol), { message: "must be an http:// or https:// URL such as http://127.0.0.1:7101" }),
  dataDir: (fallback = ".outpost/data") => z.string().min(1).default(fallback),
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
  durationMs: (fallback: number) => envNumber(wholeNumber().positive(), fallback),
  /**
   * A duration a timer waits (setTimeout, setInterval): at most 2^31 - 1 ms (about 24.8 days),
   * because Node fires a longer one after 1 ms, which would turn a grace into none and a period
   * into a busy loop.
   */
  timerMs: (fallback: number) =>
    envNumber(wholeNumber().positive().max(MAX_TIMER_MS, { message: `must be at most ${MAX_TIMER_MS} (about 24.8 days)` }), fallback),
  positiveInt: (fallback: number) => envNumber(wholeNumber().positive(), fallback),
};
