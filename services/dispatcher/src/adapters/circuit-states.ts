/**
 * Circuit states saved in Redis (one hash, `outpost:dispatch:circuits`, agent -> saved state), so
 * a dispatcher replica that starts after an agent's failures begins with that agent's circuit
 * where its peers have it, not closed. Every replica saves after each outcome it counts; they
 * all count the same outcomes, so whichever write lands last is as good as any (at worst one
 * outcome behind). The hash expires a day after its last write: a saved state older than the
 * failure window and the open period restores as closed or half-open anyway.
 */
import { once } from "node:events";
import type { Logger, Redis } from "@outpost/platform";
import type { CircuitStateStore } from "../core/resilience.ts";

export const CIRCUITS_KEY = "outpost:dispatch:circuits";
const KEEP_SECONDS = 24 * 60 * 60;

export function redisCircuitStates(redis: Redis, logger: Logger, options: { readyTimeoutMs?: number } = {}): CircuitStateStore {
  return {
    async load() {
      // Commands fail at once while disconnected (no offline queue), and at start-up the
      // connection is usually still being made: wait for it, briefly.
      if (redis.status !== "ready") {
        await Promise.race([once(redis, "ready"), new Promise((resolve) => setTimeout(resolve, options.readyTimeoutMs ?? 2000).unref())]);
      }
      return redis.hgetall(CIRCUITS_KEY);
    },
    async save(agent, state) {
      try {
        await redis.multi().hset(CIRCUITS_KEY, agent, state).expire(CIRCUITS_KEY, KEEP_SECONDS).exec();
      } catch (err) {
        logger.debug({ err, agent }, "saving the circuit state failed (the next outcome saves it again)");
      }
    },
  };
}
