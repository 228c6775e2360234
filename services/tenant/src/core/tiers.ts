/**
 * Tiers and their limits (SPEC T3, G3). The defaults below are what a tenant gets unless the
 * operator overrides them with a JSON or YAML file named by OUTPOST_TIERS_FILE; the file is
 * validated at start-up (a bad one stops the process naming the problem), so limits change
 * without a code change or a rebuild. Overrides are partial: name only what differs.
 */
import { readFileSync } from "node:fs";
import { parse as parseYaml } from "yaml";
import { z } from "zod";
import { ConfigError } from "@outpost/platform";
import type { TenantTier } from "../store/store.ts";

export interface TierLimits {
  /** Runs in QUEUED, STARTING or RUNNING at once. */
  concurrentRuns: number;
  /** Runs admitted per UTC day. */
  runsPerDay: number;
  /** Longest run timeout a dispatch may have. */
  maxTimeoutMs: number;
  /** Request rates per method class, per minute, applied by the gateway. */
  createPerMinute: number;
  triggerPerMinute: number;
  readPerMinute: number;
  /** How long a run's logs are kept (telemetry deletes them after). */
  logRetentionMs: number;
  /** Container limits a run of this tier may have (SPEC E2); agents' defaults are capped by them. */
  maxCpuMillis: number;
  maxMemoryBytes: number;
  maxPids: number;
}

export type TierTable = Readonly<Record<TenantTier, Readonly<TierLimits>>>;

const DAY_MS = 24 * 3600 * 1000;
const MIB = 1024 * 1024;
const GIB = 1024 * MIB;

export const TIER_NAMES: readonly TenantTier[] = ["free", "pro", "enterprise"];

/** Pro is fixed by SPEC T3 and G3; free sits below it and enterprise above. */
export const DEFAULT_TIERS: TierTable = {
  free: {
    concurrentRuns: 2,
    runsPerDay: 50,
    maxTimeoutMs: 600_000,
    createPerMinute: 20,
    triggerPerMinute: 100,
    readPerMinute: 300,
    logRetentionMs: 7 * DAY_MS,
    maxCpuMillis: 1000,
    maxMemoryBytes: 1 * GIB,
    maxPids: 256,
  },
  pro: {
    concurrentRuns: 10,
    runsPerDay: 500,
    maxTimeoutMs: 1_800_000,
    createPerMinute: 100,
    triggerPerMinute: 500,
    readPerMinute: 1000,
    logRetentionMs: 30 * DAY_MS,
    maxCpuMillis: 4000,
    maxMemoryBytes: 8 * GIB,
    maxPids: 1024,
  },
  enterprise: {
    concurrentRuns: 50,
    runsPerDay: 10_000,
    maxTimeoutMs: 7_200_000,
    createPerMinute: 1000,
    triggerPerMinute: 5000,
    readPerMinute: 10_000,
    logRetentionMs: 90 * DAY_MS,
    maxCpuMillis: 16_000,
    maxMemoryBytes: 32 * GIB,
    maxPids: 4096,
  },
};

const count = z.number().int().min(0).max(1_000_000_000);
/** The file speaks seconds for timeouts, as people write them. */
const tierOverride = z
  .object({
    concurrent_runs: count,
    runs_per_day: count,
    max_timeout_seconds: z.number().int().min(1).max(7 * 24 * 3600),
    create_per_minute: count,
    trigger_per_minute: count,
    read_per_minute: count,
    log_retention_days: z.number().int().min(1).max(3650),
    max_cpu_millis: z.number().int().min(1).max(1_000_000),
    max_memory_mib: z.number().int().min(16).max(16 * 1024 * 1024),
    max_pids: z.number().int().min(16).max(1_000_000),
  })
  .partial()
  .strict();

const tiersFile = z
  .object({ free: tierOverride, pro: tierOverride, enterprise: tierOverride })
  .partial()
  .strict();

export type TiersFile = z.infer<typeof tiersFile>;

/** Applies a parsed override document to the defaults; throws ConfigError naming the bad entry. */
export function tiersFrom(document: unknown, source = "tiers"): TierTable {
  const parsed = tiersFile.safeParse(document ?? {});
  if (!parsed.success) {
    const problems = parsed.error.issues.map((i) => `${i.path.join(".") || "(document)"}: ${i.message}`);
    throw new ConfigError(`${source}: ${problems.join("; ")}`);
  }
  const table = {} as Record<TenantTier, TierLimits>;
  for (const tier of TIER_NAMES) {
    const o = parsed.data[tier] ?? {};
    const base = DEFAULT_TIERS[tier];
    table[tier] = {
      concurrentRuns: o.concurrent_runs ?? base.concurrentRuns,
      runsPerDay: o.runs_per_day ?? base.runsPerDay,
      maxTimeoutMs: o.max_timeout_seconds !== undefined ? o.max_timeout_seconds * 1000 : base.maxTimeoutMs,
      createPerMinute: o.create_per_minute ?? base.createPerMinute,
      triggerPerMinute: o.trigger_per_minute ?? base.triggerPerMinute,
      readPerMinute: o.read_per_minute ?? base.readPerMinute,
      logRetentionMs: o.log_retention_days !== undefined ? o.log_retention_days * DAY_MS : base.logRetentionMs,
      maxCpuMillis: o.max_cpu_millis ?? base.maxCpuMillis,
      maxMemoryBytes: o.max_memory_mib !== undefined ? o.max_memory_mib * MIB : base.maxMemoryBytes,
      maxPids: o.max_pids ?? base.maxPids,
    };
  }
  return table;
}

/** Reads OUTPOST_TIERS_FILE (YAML is a superset of JSON, so one parser reads both). */
export function loadTiers(file: string | undefined): TierTable {
  if (!file) return DEFAULT_TIERS;
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    throw new ConfigError(`OUTPOST_TIERS_FILE: cannot read ${file}: ${(err as Error).message}`);
  }
  let document: unknown;
  try {
    document = parseYaml(text);
  } catch (err) {
    throw new ConfigError(`OUTPOST_TIERS_FILE: ${file} is not valid JSON or YAML: ${(err as Error).message}`);
  }
  return tiersFrom(document, `OUTPOST_TIERS_FILE (${file})`);
}
