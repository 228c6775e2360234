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
  let up = false;
  redis.on("ready", () => {
    if (!up) logger.info({ redis: redactUrl(url) }, "redis connected");
    up = true;
  });
  redis.on("error", (err: Error) => {
    if (up) logger.warn({ err: err.message, redis: redactUrl(url) }, "redis unavailable; using in-process fallback");
    up = false;
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
