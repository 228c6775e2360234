/**
 * Wake-ups: long-polling executors wait for "work queued", watchers wait for changes of one
 * dispatch. Between replicas, "work queued" travels over Redis pub/sub on the channel
 * "outpost:dispatch:queued" (when OUTPOST_REDIS_URL is set), so an executor long-polling one
 * replica wakes at once for work created through another. Without Redis (or while it is down)
 * every replica still re-checks its queue at least once a second, so nothing is lost, only later.
 *
 * The same bus carries cancel requests to the replica whose executor runs the dispatch, and
 * runs' outcomes to every replica's circuit breakers: a run's end is reported to whichever
 * replica its executor calls, and without this each replica's breaker would count only those.
 */
import { EventEmitter, on } from "node:events";
import type { Logger, Redis } from "@outpost/platform";

export const QUEUED_CHANNEL = "outpost:dispatch:queued";
/** Carries "<dispatch id>" when a running dispatch is asked to cancel, to every replica. */
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

/** Redis pub/sub: one connection publishes, a duplicate subscribes. Failures only log. */
export function redisWakeupBus(publisher: Redis, subscriber: Redis, logger: Logger): WakeupBus {
  return {
    publish(channel, message) {
      publisher.publish(channel, message).catch((err: unknown) => logger.debug({ err }, "wake-up publish failed; peers re-check within 1 s"));
    },
    async subscribe(channel, onMessage) {
      subscriber.on("message", (ch: string, message: string) => {
        if (ch === channel) onMessage(message);
      });
      await subscriber.subscribe(channel);
    },
    async close() {
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

  /** Starts receiving other replicas' wake-ups. */
  async start(): Promise<void> {
    await this.bus?.subscribe(QUEUED_CHANNEL, (message) => {
      if (message !== this.origin) this.events.emit("queued");
    });
    await this.bus?.subscribe(CANCEL_CHANNEL, (message) => {
      const [origin, dispatchId] = message.split(" ");
      if (origin !== this.origin && dispatchId) this.events.emit("cancel", dispatchId);
    });
    await this.bus?.subscribe(OUTCOME_CHANNEL, (message) => {
      const [origin, succeeded, agent] = message.split(" ", 3);
      if (origin !== this.origin && agent && (succeeded === "1" || succeeded === "0")) this.events.emit("peer-outcome", agent, succeeded === "1");
    });
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

  /** A run of `agent` ended with an outcome this replica's breaker counted: peers count it too. */
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
