/**
 * Load profiles (issue #7). `clients` virtual users each loop over a read-heavy mix with a
 * think time; creates of the demo agent come from a separate, rate-bounded creator because
 * every create runs an arm64 container (under emulation on the development machines).
 */
export interface LoadProfile {
  name: string;
  clients: number;
  durationMs: number;
  /** Mean pause between one client's calls. */
  thinkMs: number;
  /** Creates of the demo agent per minute across all clients; every other one is cancelled soon after. */
  createsPerMinute: number;
}

export const PROFILES: Record<string, LoadProfile> = {
  smoke: { name: "smoke", clients: 10, durationMs: 60_000, thinkMs: 250, createsPerMinute: 6 },
  normal: { name: "normal", clients: 50, durationMs: 5 * 60_000, thinkMs: 250, createsPerMinute: 12 },
  peak: { name: "peak", clients: 200, durationMs: 10 * 60_000, thinkMs: 250, createsPerMinute: 20 },
  endurance: { name: "endurance", clients: 100, durationMs: 30 * 60_000, thinkMs: 250, createsPerMinute: 10 },
};

/** Mix of the clients' calls (weights); creates and cancels come from the creator. */
export const READ_MIX = [
  { method: "GetDispatch", weight: 40 },
  { method: "ListDispatches", weight: 20 },
  { method: "ListAgents", weight: 10 },
  { method: "GetLogs", weight: 10 },
  { method: "SubscribeLogs", weight: 20 },
] as const;

export type ReadMethod = (typeof READ_MIX)[number]["method"];

/** "90s", "20s", "5m", "1h", "1500ms" or plain seconds. */
export function parseDuration(text: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(text.trim());
  if (!m) throw new Error(`cannot read duration "${text}" (e.g. 20s, 5m)`);
  const n = Number(m[1]);
  const unit = m[2] ?? "s";
  return Math.round(n * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[unit]!);
}
