/**
 * The live feed across telemetry replicas (SPEC L2): chunks and run ends stored on one replica
 * are published on the Redis channel "outpost:logs:<dispatch_id>", and every replica with a
 * subscription to that run delivers them to its local listeners. Local listeners are also fed
 * directly (no round trip through Redis for the replica that stored the chunk; its own
 * messages are recognised by an origin id and skipped).
 *
 * Redis is only a wake-up path: storage stays the system of record. A message lost while Redis
 * is down (publishes fail fast, see platform redis.ts) or before a SUBSCRIBE took effect is
 * repaired by the subscription, which fills any gap from storage and also checks storage
 * when it has heard nothing for a while (TelemetryCoreOptions.idlePollMs).
 */
import { randomUUID } from "node:crypto";
import { subscriberOf, type Logger, type Redis } from "@outpost/platform";
import { InProcessLiveFeed, type LiveFeed, type LiveListener } from "../core/live-feed.ts";
import type { RunEndRecord, StoredChunk } from "../core/model.ts";

export const LOG_CHANNEL_PREFIX = "outpost:logs:";

interface FeedMessage {
  /** The publishing replica. */
  o: string;
  c?: StoredChunk[];
  e?: RunEndRecord;
}

export class RedisLiveFeed implements LiveFeed {
  readonly #local = new InProcessLiveFeed();
  readonly #redis: Redis;
  readonly #subscriber: Redis;
  readonly #logger: Logger;
  readonly #origin = randomUUID();
  /** How this replica's own messages begin (`o` is written first), to skip them unparsed. */
  readonly #ownPrefix = `{"o":${JSON.stringify(this.#origin)}`;
  /** Local listeners per channel, to SUBSCRIBE on the first and UNSUBSCRIBE after the last. */
  readonly #channels = new Map<string, number>();
  #lastWarnAt = 0;

  constructor(redis: Redis, logger: Logger) {
    this.#redis = redis;
    this.#logger = logger;
    this.#subscriber = subscriberOf(redis);
    this.#subscriber.on("error", () => undefined); // the main connection logs outages
    this.#subscriber.on("message", (channel: string, message: string) => this.#onMessage(channel, message));
  }

  publish(dispatchId: string, chunks: StoredChunk[]): void {
    if (chunks.length === 0) return;
    this.#local.publish(dispatchId, chunks);
    this.#send(dispatchId, { o: this.#origin, c: chunks });
  }

  publishEnd(dispatchId: string, end: RunEndRecord): void {
    this.#local.publishEnd(dispatchId, end);
    this.#send(dispatchId, { o: this.#origin, e: end });
  }

  subscribe(dispatchId: string, listener: LiveListener): () => void {
    const channel = LOG_CHANNEL_PREFIX + dispatchId;
    const stop = this.#local.subscribe(dispatchId, listener);
    const count = (this.#channels.get(channel) ?? 0) + 1;
    this.#channels.set(channel, count);
    if (count === 1) this.#subscriber.subscribe(channel).catch((err: unknown) => this.#warn(err, "redis subscribe failed"));
    let stopped = false;
    return () => {
      if (stopped) return;
      stopped = true;
      stop();
      const left = (this.#channels.get(channel) ?? 1) - 1;
      if (left > 0) {
        this.#channels.set(channel, left);
        return;
      }
      this.#channels.delete(channel);
      this.#subscriber.unsubscribe(channel).catch(() => undefined);
    };
  }

  async close(): Promise<void> {
    await this.#local.close();
    this.#channels.clear();
    this.#subscriber.disconnect();
  }

  #send(dispatchId: string, message: FeedMessage): void {
    this.#redis.publish(LOG_CHANNEL_PREFIX + dispatchId, JSON.stringify(message)).catch((err: unknown) => this.#warn(err, "redis publish failed"));
  }

  #onMessage(channel: string, raw: string): void {
    if (!channel.startsWith(LOG_CHANNEL_PREFIX)) return;
    // Its own messages come back to every replica that has subscribers of the run; they were
    // delivered locally already, and parsing every batch twice costs the ingest path.
    if (raw.startsWith(this.#ownPrefix)) return;
    let message: FeedMessage;
    try {
      message = JSON.parse(raw) as FeedMessage;
    } catch {
      return; // not ours; storage still has everything
    }
    if (message.o === this.#origin) return;
    const dispatchId = channel.slice(LOG_CHANNEL_PREFIX.length);
    if (Array.isArray(message.c)) this.#local.publish(dispatchId, message.c);
    if (message.e) this.#local.publishEnd(dispatchId, message.e);
  }

  /** At most one warning every 10 s: an outage must not flood the log. */
  #warn(err: unknown, msg: string): void {
    const now = Date.now();
    if (now - this.#lastWarnAt < 10_000) return;
    this.#lastWarnAt = now;
    this.#logger.warn({ err: err instanceof Error ? err.message : String(err) }, `${msg}; live fan-out to other replicas degraded`);
  }
}
