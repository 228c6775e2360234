/**
 * Wake-ups: long-polling executors wait for "work queued", watchers wait for changes of one
 * dispatch. Between replicas, "work queued" travels over Redis pub/sub on the channel
 * "outpost:dispatch:queued" (when OUTPOST_REDIS_URL is set), so an executor long-polling one
 * replica wakes at once for work created through another. Without Redis (or while it is down)
 * every replica still re-checks its queue at least once a second, so no work is lost, only
 * found later.
 *
 * The same bus carries cancel requests to the replica whose executor runs the dispatch (while
 * Redis is down, heartbeats still carry them), and runs' outcomes to every replica's circuit
 * breakers: a run's end is reported to whichever replica its executor calls, and without this
 * each replica's breaker would count only those. An outcome published while Redis is down is
 * counted only by the replica that saw it.
 */
import { EventEmitter, on } from "node:events";
import { ExponentialBackoff, handleAll, retry } from "cockatiel";
import type { Logger, Redis } from "@outpost/platform";

export const QUEUED_CHANNEL = "outpost:dispatch:queued";
/** Carries "<origin> <dispatch id>" when a running dispatch is asked to cancel, to every replica. */
export const CANCEL_CHANNEL = "outpost:dispatch:cancel";
/** Carries "<origin> <1|0> <agent>" for each run outcome the circuit breakers count (1 = succeeded). */
export const OUTCOME_CHANNEL = "outpost:dispatch:outcome";

/** Publishes and receives cross-replica wake-ups. */
export interface WakeupBus {
  publish(channel: string, message: string): void;
  /** Calls `onMessage` for every message on `channel`. */
  subscribe(channel: string, onMessage: (message: string) => void): Promise<void>;
  close(): Promise<void>;
}

/**
 * Redis pub/sub: one connection publishes, a duplicate subscribes. Publish failures only log.
 * A subscribe that fails (Redis down at start-up) is retried with backoff until it succeeds or
 * the bus closes: ioredis re-subscribes by itself after a reconnect, but only to channels it
 * had subscribed, so a replica that gave up would miss its peers for good.
 */
export function redisWakeupBus(publisher: Redis, subscriber: Redis, logger: Logger): WakeupBus {
  const handlers = new Map<string, (message: string) => void>();
  subscriber.on("message", (channel: string, message: string) => handlers.get(channel)?.(message));
  const closing = new AbortController();
  const subscribeRetry = retry(handleAll, { backoff: new ExponentialBackoff({ initialDelay: 500, maxDelay: 30_000 }) });
  subscribeRetry.onRetry(({ delay }) => logger.warn({ retry_in_ms: Math.round(delay) }, "redis subscribe failed; retrying (peers' messages are missed meanwhile)"));
  return {
    publish(channel, message) {
      publisher.publish(channel, message).catch((err: unknown) => logger.debug({ err, channel }, "cross-replica publish failed"));
    },
    async subscribe(channel, onMessage) {
      handlers.set(channel, onMessage);
      try {
        await subscribeRetry.execute(() => subscriber.subscribe(channel), closing.signal);
      } catch (err) {
        // Only closing the bus ends the retries.
        if (!closing.signal.aborted) throw err;
      }
    },
    async close() {
      closing.abort();
      subscriber.disconnect();
      publisher.disconnect();
    },
  };
}

export class Notifier {
  private readonly events = new EventEmitter();
  private readonly bus: WakeupBus | undefined;
  /** Tells this replica's own messages apart, so they do not wake it twice. */
  private readonly origin = `${process.pid}-${Math.random().toString(36).slice(2)}`;

  constructor(bus?: WakeupBus) {
    this.events.setMaxListeners(0);
    this.bus = bus;
  }

  /** Starts receiving other replicas' messages; resolves once every channel is subscribed. */
  async start(): Promise<void> {
    if (!this.bus) return;
    await Promise.all([
      this.bus.subscribe(QUEUED_CHANNEL, (message) => {
        if (message !== this.origin) this.events.emit("queued");
      }),
      this.bus.subscribe(CANCEL_CHANNEL, (message) => {
        const [origin, dispatchId] = message.split(" ");
        if (origin !== this.origin && dispatchId) this.events.emit("cancel", dispatchId);
      }),
      this.bus.subscribe(OUTCOME_CHANNEL, (message) => {
        const [origin, succeeded, agent] = message.split(" ", 3);
        if (origin !== this.origin && agent && (succeeded === "1" || succeeded === "0")) this.events.emit("peer-outcome", agent, succeeded === "1");
      }),
    ]);
  }

  async close(): Promise<void> {
    await this.bus?.close();
  }

  workQueued(): void {
    this.events.emit("queued");
    this.bus?.publish(QUEUED_CHANNEL, this.origin);
  }

  /** A running dispatch was asked to cancel: executors watching cancellations learn of it. */
  cancelRequested(id: string): void {
    this.events.emit("cancel", id);
    this.bus?.publish(CANCEL_CHANNEL, `${this.origin} ${id}`);
  }

  /** Every cancel request on any replica, until `signal` aborts. */
  cancellations(signal: AbortSignal): AsyncIterable<string> {
    // on() listens from this call on (not from the first next()), so nothing is missed between.
    const events = on(this.events, "cancel", { signal });
    return (async function* () {
      try {
        for await (const [id] of events) yield id as string;
      } catch (err) {
        if (!signal.aborted) throw err;
      }
    })();
  }

  /** A run of `agent` ended with an outcome for the circuit breakers: peers count it too (their breakers may be in another state than this one's). */
  runOutcome(agent: string, succeeded: boolean): void {
    this.bus?.publish(OUTCOME_CHANNEL, `${this.origin} ${succeeded ? 1 : 0} ${agent}`);
  }

  /** Calls `listener` for every run outcome another replica counted. */
  onPeerOutcome(listener: (agent: string, succeeded: boolean) => void): void {
    this.events.on("peer-outcome", listener);
  }

  dispatchChanged(id: string): void {
    this.events.emit(`changed:${id}`);
  }

  /** Resolves on the next "work queued", after `timeoutMs`, or when `signal` aborts. */
  waitForWork(timeoutMs: number, signal: AbortSignal): Promise<void> {
    return this.waitFor("queued", timeoutMs, signal);
  }

  waitForChange(id: string, timeoutMs: number, signal: AbortSignal): Promise<void> {
    return this.waitFor(`changed:${id}`, timeoutMs, signal);
  }

  private waitFor(event: string, timeoutMs: number, signal: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.events.off(event, done);
        signal.removeEventListener("abort", done);
        resolve();
      };
      const timer = setTimeout(done, timeoutMs);
      this.events.on(event, done);
      signal.addEventListener("abort", done, { once: true });
      if (signal.aborted) done();
    });
  }
}
