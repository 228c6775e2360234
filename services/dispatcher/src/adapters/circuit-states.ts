/**
 * Circuit states saved in Redis (one hash, `outpost:dispatch:circuits`, agent -> saved state), so
 * a dispatcher replica that starts after an agent's failures begins with that agent's circuit
 * where its peers have it, not closed. The replica that handles a run's end saves the agent's
 * circuit after counting it (peers count it too, without saving). A save that fails (Redis
 * unreachable) is kept, the latest per agent, and written when the connection is back. Replicas
 * agree while every outcome reaches all of them (the outcome stream, notifier.ts); one that
 * restored a half-open circuit, whose trial successes start again from zero, saves its own view
 * with the next outcome it handles. The hash expires a day after its last write: a saved state
 * older than the failure window and the open period restores as closed or half-open anyway.
 */
import type { Logger, Redis } from "@outpost/platform";
import type { CircuitStateStore } from "../core/resilience.ts";

export const CIRCUITS_KEY = "outpost:dispatch:circuits";
const KEEP_SECONDS = 24 * 60 * 60;

export function redisCircuitStates(redis: Redis, logger: Logger, options: { readyTimeoutMs?: number } = {}): CircuitStateStore {
  /** Agent -> the latest state whose save failed; written when Redis is ready again. */
  const unsaved = new Map<string, string>();
  const write = async (agent: string, state: string) => {
    try {
      await redis.multi().hset(CIRCUITS_KEY, agent, state).expire(CIRCUITS_KEY, KEEP_SECONDS).exec();
      // A newer state may have failed meanwhile; only this one is done.
      if (unsaved.get(agent) === state) unsaved.delete(agent);
    } catch (err) {
      unsaved.set(agent, state);
      logger.debug({ err, agent }, "saving the circuit state failed; it is saved when redis is back");
    }
  };
  redis.on("ready", () => {
    for (const [agent, state] of unsaved) void write(agent, state);
  });
  return {
    async load() {
      // Commands fail at once while disconnected (no offline queue), and at start-up the
      // connection is usually still being made: wait for it, briefly.
      // (Not events.once: it rejects on the first connection error, and a refused connection
      // is what a Redis that starts a moment later looks like.)
      if (redis.status !== "ready") {
        await new Promise<void>((resolve) => {
          const done = () => {
            clearTimeout(timer);
            redis.off("ready", done);
            resolve();
          };
          const timer = setTimeout(done, options.readyTimeoutMs ?? 2000);
          redis.once("ready", done);
        });
      }
      return redis.hgetall(CIRCUITS_KEY);
    },
    save(agent, state) {
      unsaved.delete(agent);
      return write(agent, state);
    },
  };
}
