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
 * each replica's breaker would count only those. Outcomes have no other way round, so they go
 * through a Redis stream rather than pub/sub: each replica reads it from where it left off, so
 * one cut off from Redis for a while counts its peers' outcomes when it is back, and the
 * outcomes it saw meanwhile wait in memory (bounded) until it can append them.
 */
import { EventEmitter } from "node:events";
import { ExponentialBackoff, handleAll, retry } from "cockatiel";
import type { Logger, Redis } from "@outpost/platform";
import type { RunOutcome } from "./resilience.ts";

export const QUEUED_CHANNEL = "outpost:dispatch:queued";
/** Carries "<origin> <dispatch id>" when a running dispatch is asked to cancel, to every replica. */
export const CANCEL_CHANNEL = "outpost:dispatch:cancel";
/**
 * A stream of "<origin> <outcome> <agent> <tenant>", one entry per run outcome the circuit
 * breakers count: 1 = succeeded, 0 = the run failed, R = the agent's runtime failed.
 */
export const OUTCOME_STREAM = "outpost:dispatch:outcomes";
/** Entries a stream keeps (about): hours of outcomes, more than any reconnect needs. */
const STREAM_LENGTH = 10_000;
/** Entries a replica keeps while it cannot append them; the oldest are dropped past this. */
const UNSENT_LIMIT = 1000;
/** Cancel requests one cancellation stream buffers before it is told to re-read the store instead. */
const MAX_PENDING_CANCELS = 1000;
/** In a cancellation stream: requests were dropped (the consumer fell behind); re-read what is flagged. */
export const RESYNC = Symbol("resync");
/** How long one XREAD waits for new entries before asking again. */
const STREAM_BLOCK_MS = 5000;

/** Publishes and receives cross-replica wake-ups. */
export interface WakeupBus {
  /** Fire and forget: a peer that is not listening misses it. */
  publish(channel: string, message: string): void;
  /** Calls `onMessage` for every message on `channel`. */
  subscribe(channel: string, onMessage: (message: string) => void): Promise<void>;
  /** Appends to a stream every peer reads in order; kept and appended later while Redis is down. */
  append(stream: string, message: string): void;
  /**
   * Calls `onMessage` for every entry appended to `stream` from now on, including those appended
   * while this replica could not read (it resumes after the last entry it read). Resolves once
   * "now" is fixed, retrying until Redis answers or the bus closes.
   */
  follow(stream: string, onMessage: (message: string) => void): Promise<void>;
  close(): Promise<void>;
}

/**
 * Redis pub/sub: one connection publishes, a duplicate subscribes. Publish failures only log.
 * A subscribe that fails (Redis down at start-up) is retried with backoff until it succeeds or
 * the bus closes: ioredis re-subscribes by itself after a reconnect, but only to channels it
 * had subscribed, so a replica that gave up would miss its peers for good.
 *
 * Streams: the publisher appends (XADD, trimmed to about 10,000 entries); each `follow` reads on
 * a connection of its own (XREAD BLOCK holds the connection) from the id of the last entry it
 * read, so after a disconnect it picks up what it missed. Entries that could not be appended
 * are appended, in order, when the publisher is connected again.
 */
export function redisWakeupBus(publisher: Redis, subscriber: Redis, logger: Logger): WakeupBus {
  const handlers = new Map<string, (message: string) => void>();
  subscriber.on("message", (channel: string, message: string) => handlers.get(channel)?.(message));
  const closing = new AbortController();
  const readers: Redis[] = [];
  const subscribeRetry = retry(handleAll, { backoff: new ExponentialBackoff({ initialDelay: 500, maxDelay: 30_000 }) });
  subscribeRetry.onRetry(({ delay }) => logger.warn({ retry_in_ms: Math.round(delay) }, "redis subscribe failed; retrying (peers' messages are missed meanwhile)"));

  const unsent: [stream: string, message: string][] = [];
  let flushing = false;
  const xadd = (stream: string, message: string) => publisher.xadd(stream, "MAXLEN", "~", STREAM_LENGTH, "*", "m", message);
  const keepUnsent = (stream: string, message: string) => {
    if (unsent.length === 0) logger.warn({ stream }, "redis unavailable; keeping stream entries until it is back");
    unsent.push([stream, message]);
    if (unsent.length > UNSENT_LIMIT) unsent.shift();
  };
  const flushUnsent = async () => {
    if (flushing) return;
    flushing = true;
    let appended = 0;
    try {
      while (unsent.length > 0 && !closing.signal.aborted) {
        const [stream, message] = unsent[0]!;
        await xadd(stream, message);
        unsent.shift();
        appended++;
      }
      logger.info({ appended }, "stream entries kept while redis was unavailable are appended");
    } catch {
      // Disconnected again: the next "ready" tries again.
    } finally {
      flushing = false;
    }
  };
  publisher.on("ready", () => {
    if (unsent.length > 0) void flushUnsent();
  });

  // A failed read (Redis gone) is tried again, backing off, from the same id: nothing is skipped.
  const readRetry = retry(handleAll, { backoff: new ExponentialBackoff({ initialDelay: 250, maxDelay: 5000 }) });
  readRetry.onRetry(({ delay }) => logger.debug({ retry_in_ms: Math.round(delay) }, "stream read failed; resuming after the last entry read"));

  /** Reads `stream` after `lastId` until the bus closes. */
  const readFrom = async (reader: Redis, stream: string, lastId: string, onMessage: (message: string) => void) => {
    while (!closing.signal.aborted) {
      let reply: [string, [string, string[]][]][] | null;
      try {
        reply = await readRetry.execute(() => reader.xread("COUNT", 500, "BLOCK", STREAM_BLOCK_MS, "STREAMS", stream, lastId), closing.signal);
      } catch {
        return; // only closing the bus ends the retries
      }
      for (const [, entries] of reply ?? []) {
        for (const [id, fields] of entries) {
          lastId = id;
          if (fields[0] === "m" && fields[1] !== undefined) onMessage(fields[1]);
        }
      }
    }
  };

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
    append(stream, message) {
      // Behind earlier unsent entries, or while disconnected: keep it, so peers get them in order.
      if (unsent.length > 0 || publisher.status !== "ready") {
        keepUnsent(stream, message);
        return;
      }
      xadd(stream, message).catch(() => {
        keepUnsent(stream, message);
        if (publisher.status === "ready") void flushUnsent();
      });
    },
    async follow(stream, onMessage) {
      // Queued while disconnected: the first read waits for the connection instead of failing.
      const reader = publisher.duplicate({ enableOfflineQueue: true });
      reader.on("error", () => undefined); // the read loop handles a lost connection
      readers.push(reader);
      // "From now on" is the id of the stream's last entry (XREAD's "$" would be re-read as
      // "now" on every call and lose entries appended between two reads).
      let lastId: string;
      try {
        lastId = await subscribeRetry.execute(async () => (await reader.xrevrange(stream, "+", "-", "COUNT", 1))[0]?.[0] ?? "0-0", closing.signal);
      } catch (err) {
        if (closing.signal.aborted) return;
        throw err;
      }
      void readFrom(reader, stream, lastId, onMessage);
    },
    async close() {
      closing.abort();
      subscriber.disconnect();
      publisher.disconnect();
      for (const reader of readers) reader.disconnect();
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
      this.bus.follow(OUTCOME_STREAM, (message) => {
        const [origin, code, agent, tenantId = ""] = message.split(" ", 4);
        if (origin === this.origin || !agent || (code !== "1" && code !== "0" && code !== "R")) return;
        const outcome: RunOutcome = { succeeded: code === "1", tenantId, runtimeFailure: code === "R" };
        this.events.emit("peer-outcome", agent, outcome);
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

  /**
   * Every cancel request on any replica, until `signal` aborts or the consumer stops (`return()`,
   * e.g. a `for await` left early). Requests wait in a per-consumer buffer of at most
   * `maxPending`: a consumer that falls further behind (its executor stopped reading the stream)
   * gets one `RESYNC` in place of what was dropped, and must read what is flagged from the store,
   * so a stalled stream costs bounded memory and misses nothing. The listener is removed on
   * whichever comes first, also when the consumer never started reading (a generator's `finally`
   * runs only once it has started); a signal already aborted subscribes nothing.
   */
  cancellations(signal: AbortSignal, maxPending = MAX_PENDING_CANCELS): AsyncIterableIterator<string | typeof RESYNC> {
    if (signal.aborted) return (async function* () {})();
    // Listens from this call on (not from the first next()), so nothing is missed between.
    const pending: string[] = [];
    let overflowed = false;
    let closed = false;
    let wake: (() => void) | undefined;
    const onCancel = (id: string) => {
      if (pending.length < maxPending) pending.push(id);
      else overflowed = true;
      wake?.();
    };
    const events = this.events;
    const stop = () => {
      closed = true;
      pending.length = 0;
      events.off("cancel", onCancel);
      signal.removeEventListener("abort", stop);
      wake?.();
    };
    events.on("cancel", onCancel);
    signal.addEventListener("abort", stop, { once: true });
    const stream = (async function* () {
      try {
        while (!closed) {
          if (overflowed) {
            overflowed = false;
            pending.length = 0;
            yield RESYNC;
          } else if (pending.length > 0) {
            yield pending.shift()!;
          } else {
            await new Promise<void>((resolve) => (wake = resolve));
            wake = undefined;
          }
        }
      } finally {
        stop();
      }
    })();
    const finish = stream.return.bind(stream);
    return Object.assign(stream, {
      // Stops listening at once, even before the first next() (when the body's finally cannot run).
      return(value?: unknown) {
        stop();
        return finish(value as undefined);
      },
    });
  }

  /** A run of `agent` ended with an outcome for the circuit breakers: peers count it too (their breakers may be in another state than this one's). */
  runOutcome(agent: string, outcome: RunOutcome): void {
    const code = outcome.succeeded ? "1" : outcome.runtimeFailure ? "R" : "0";
    this.bus?.append(OUTCOME_STREAM, `${this.origin} ${code} ${agent} ${outcome.tenantId}`);
  }

  /** Calls `listener` for every run outcome another replica counted. */
  onPeerOutcome(listener: (agent: string, outcome: RunOutcome) => void): void {
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
