/**
 * Configuration from the environment, validated once at start-up. A missing or malformed
 * setting stops the process with a message naming the variable, before anything listens.
 */
import { z } from "zod";

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

/** Reusable setting types, so every service reads ports, URLs and secrets the same way. */
export const setting = {
  port: (fallback?: number) => {
    const schema = z.coerce.number().int().min(0).max(65535);
    return fallback === undefined ? schema : schema.default(fallback);
  },
  host: (fallback = "127.0.0.1") => z.string().min(1).default(fallback),
  url: () =>
    z
      .string({ error: "is required" })
      .url({ message: "must be a URL such as http://127.0.0.1:7101" }),
  dataDir: (fallback = ".outpost/data") => z.string().min(1).default(fallback),
  /** HMAC key shared by the services to sign the caller identity; at least 32 characters. */
  internalSecret: () =>
    z.string({ error: "is required (shared by all services to sign caller identity)" }).min(32, {
      message: "must be at least 32 characters",
    }),
  logLevel: () => z.enum(["trace", "debug", "info", "warn", "error", "fatal", "silent"]).default("info"),
  durationMs: (fallback: number) => z.coerce.number().int().positive().default(fallback),
  positiveInt: (fallback: number) => z.coerce.number().int().positive().default(fallback),
};
