/**
 * Redis connections (ioredis) for the parts that span replicas: rate-limit counters,
 * auth-cache invalidation, live log fan-out, long-poll wake-ups. Redis is optional on one
 * machine: every user keeps an in-process fallback and must keep serving while Redis is down,
 * so commands fail fast instead of queueing while disconnected, and reconnects back off.
 */
import { Redis, type RedisOptions } from "ioredis";
import type { Logger } from "./logger.ts";

export type { Redis };

export function connectRedis(url: string, logger: Logger, options: RedisOptions = {}): Redis {
  const redis = new Redis(url, {
    // Fail commands at once while disconnected; callers fall back to in-process behaviour.
    enableOfflineQueue: false,
    maxRetriesPerRequest: 1,
    connectTimeout: 2000,
    retryStrategy: (attempt) => Math.min(100 * 2 ** attempt, 5000),
    ...options,
  });
  // "never": not reached yet. Its first failure is logged too, so a typo in the URL (or a Redis
  // that never comes) shows at start-up; after that, each change between up and down once.
  let state: "never" | "up" | "down" = "never";
  redis.on("ready", () => {
    if (state !== "up") logger.info({ redis: redactUrl(url) }, "redis connected");
    state = "up";
  });
  redis.on("error", (err: Error) => {
    if (state === "down") return;
    const message = state === "up" ? "redis unavailable; using in-process fallback" : "redis unreachable; using in-process fallback until it answers";
    logger.warn({ err: err.message, redis: redactUrl(url) }, message);
    state = "down";
  });
  return redis;
}

/** A duplicate connection for SUBSCRIBE (a subscribed connection cannot run other commands). */
export function subscriberOf(redis: Redis): Redis {
  const subscriber = redis.duplicate({ enableOfflineQueue: true });
  // The connection it duplicates logs Redis going and coming; without a listener ioredis would
  // print every failed reconnect of this one to stderr as an unhandled error.
  subscriber.on("error", () => undefined);
  return subscriber;
}

function redactUrl(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = "***";
    return parsed.toString();
  } catch {
    return "(invalid url)";
  }
}
