/**
 * Rate counters on rate-limiter-flexible (SPEC G3): fixed one-minute windows, on Redis so every
 * gateway replica shares the count, with an in-memory insurance limiter that takes over while
 * Redis is unreachable (the gateway keeps serving and says so in its log) and hands back when
 * Redis returns. One limiter per (method class, limit), since a limiter has one point budget.
 */
import { RateLimiterMemory, RateLimiterRedis, RateLimiterRes, type RateLimiterAbstract } from "rate-limiter-flexible";
import type { Logger, Redis } from "@outpost/platform";
import type { MethodClass } from "../core/method-class.ts";
import { RATE_WINDOW_MS, type CounterResult, type RateCounter } from "../core/rate-limit.ts";

const WINDOW_S = RATE_WINDOW_MS / 1000;
/** Key prefix in Redis: outpost:rl:<class>:<limit>:<ip:…|tenant:…>. */
export const REDIS_KEY_PREFIX = "outpost:rl";

async function consumeWith(limiter: RateLimiterAbstract, key: string): Promise<CounterResult> {
  try {
    const res = await limiter.consume(key, 1);
    return { allowed: true, remaining: res.remainingPoints, msBeforeReset: res.msBeforeNext };
  } catch (err) {
    if (err instanceof RateLimiterRes) return { allowed: false, remaining: 0, msBeforeReset: err.msBeforeNext };
    throw err;
  }
}

abstract class LimiterPerBudget implements RateCounter {
  private readonly limiters = new Map<string, RateLimiterAbstract>();
  protected abstract build(prefix: string, limit: number): RateLimiterAbstract;

  consume(key: string, methodClass: MethodClass, limit: number): Promise<CounterResult> {
    const id = `${methodClass}:${limit}`;
    let limiter = this.limiters.get(id);
    if (!limiter) {
      limiter = this.build(`${REDIS_KEY_PREFIX}:${id}`, limit);
      this.limiters.set(id, limiter);
    }
    return consumeWith(limiter, key);
  }

  async close(): Promise<void> {}
}

/** Counts in this process only (one replica, or OUTPOST_RATE_LIMIT=memory). */
export class MemoryRateCounter extends LimiterPerBudget {
  protected build(prefix: string, limit: number): RateLimiterAbstract {
    return new RateLimiterMemory({ keyPrefix: prefix, points: limit, duration: WINDOW_S });
  }
}

/** Counts in Redis, shared by every replica; in memory while Redis is unreachable. */
export class RedisRateCounter extends LimiterPerBudget {
  private readonly redis: Redis;
  private readonly logger: Logger;
  private onFallback = false;

  constructor(redis: Redis, logger: Logger) {
    super();
    this.redis = redis;
    this.logger = logger;
    redis.on("ready", () => {
      if (!this.onFallback) return;
      this.onFallback = false;
      this.logger.info("rate limiter: Redis is back; counting in Redis again");
    });
  }

  /** True while the in-memory insurance limiter is counting (Redis unreachable). */
  get usingFallback(): boolean {
    return this.onFallback;
  }

  protected build(prefix: string, limit: number): RateLimiterAbstract {
    const fallingBack = () => this.fallingBack();
    // The insurance limiter is asked only when the Redis call failed or Redis is not ready.
    class Insurance extends RateLimiterMemory {
      override consume(...args: Parameters<RateLimiterMemory["consume"]>) {
        fallingBack();
        return super.consume(...args);
      }
    }
    return new RateLimiterRedis({
      storeClient: this.redis,
      keyPrefix: prefix,
      points: limit,
      duration: WINDOW_S,
      // Do not wait on a dead connection: go to the insurance limiter at once.
      rejectIfRedisNotReady: true,
      insuranceLimiter: new Insurance({ keyPrefix: `${prefix}:insurance`, points: limit, duration: WINDOW_S }),
    });
  }

  private fallingBack(): void {
    if (this.onFallback) return;
    this.onFallback = true;
    this.logger.warn("rate limiter: Redis unreachable; counting in memory until it returns");
  }

  override async close(): Promise<void> {
    this.redis.disconnect();
  }
}
