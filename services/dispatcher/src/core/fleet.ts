/**
 * Fleet status (SPEC D5): per agent availability (its image is present on an executor whose
 * engine is ready, and its circuit is not open), executors and their slots, warm pool, queue
 * depth, and runs created in the last 24 hours by state. Every part is computed on its own:
 * a part that fails is named in `degraded` and the rest is still answered.
 */
import type { Logger } from "@outpost/platform";
import type { DispatchState, DispatchStore, ExecutorReport, ExecutorStore } from "../store/store.ts";
import type { AgentRegistry } from "./agents.ts";
import type { AgentCircuits, CircuitStateName } from "./resilience.ts";
import { Agent_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";

const DAY_MS = 24 * 60 * 60 * 1000;

export interface AgentAvailability {
  agent: string;
  available: boolean;
  /** Undefined when no executor reported (unknown, not absent). */
  imagePresent: boolean;
  circuit: CircuitStateName;
}

export interface FleetStatus {
  agents: AgentAvailability[];
  executors: ExecutorReport[];
  warmContainers: number;
  queueDepth: number;
  runsLast24h: Partial<Record<DispatchState, number>>;
  degraded: string[];
}

export interface FleetOptions {
  store: DispatchStore & ExecutorStore;
  agents: AgentRegistry;
  circuits: AgentCircuits;
  logger: Logger;
  /** Executors not heard from for this long drop out (3 lease TTLs). */
  executorStaleMs: number;
  /** Whether the configured Redis answers now; absent when none is configured (one replica). */
  redisReady?: () => boolean;
  now?: () => number;
}

export async function fleetStatus(options: FleetOptions): Promise<FleetStatus> {
  const now = (options.now ?? Date.now)();
  const degraded: string[] = [];
  const part = async <T>(name: string, fallback: T, fn: () => Promise<T>): Promise<T> => {
    try {
      return await fn();
    } catch (err) {
      options.logger.warn({ err, part: name }, "fleet status part failed");
      degraded.push(`${name}: ${(err as Error).message}`);
      return fallback;
    }
  };
  const [executors, queueDepth, runsLast24h] = await Promise.all([
    part("executors", [] as ExecutorReport[], () => options.store.listExecutors(now - options.executorStaleMs)),
    part("queue_depth", 0, () => options.store.queueDepth()),
    part("runs_last_24h", {} as Partial<Record<DispatchState, number>>, () => options.store.countByStateSince(now - DAY_MS)),
  ]);
  await part("agents", undefined, () => options.agents.refreshIfStale());
  if (executors.length === 0 && !degraded.some((d) => d.startsWith("executors"))) {
    degraded.push("executors: no executor reported its capacity recently; image presence is unknown");
  }
  if (options.redisReady && !options.redisReady()) {
    // Work still flows (long-polls re-read the store every second), but more slowly across
    // replicas, and circuit outcomes wait for Redis to come back in each direction.
    degraded.push("redis: unreachable; queue wake-ups and cancels reach other replicas only through the store's periodic re-check, and circuit outcomes are exchanged when it is back");
  }
  const ready = executors.filter((e) => e.engineReady);
  const images = new Set(ready.flatMap((e) => e.imagesPresent));
  const agents = options.agents
    .list()
    .filter((a) => a.state === Agent_State.ENABLED)
    .map((a) => {
      const imagePresent = images.has(a.image);
      const circuit = options.circuits.state(a.name);
      return { agent: a.name, imagePresent, circuit, available: imagePresent && circuit !== "OPEN" };
    });
  return {
    agents,
    executors,
    warmContainers: executors.reduce((sum, e) => sum + e.warmContainers, 0),
    queueDepth,
    runsLast24h,
    degraded,
  };
}
