/**
 * The Redis wake-up bus: a subscribe that fails (Redis down when the replica starts) is retried
 * until it succeeds, so the replica does not miss its peers for good; messages reach the handler
 * of their channel only; peers' run outcomes reach the Notifier, its own do not; the outcome
 * stream on a real Redis carries outcomes across a replica's disconnect, both ways.
 */
import { EventEmitter } from "node:events";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { connectRedis, createLogger, subscriberOf, type Logger, type Redis } from "@outpost/platform";
import { Notifier, OUTCOME_STREAM, QUEUED_CHANNEL, redisWakeupBus, type WakeupBus } from "../src/core/notifier.ts";
import type { RunOutcome } from "../src/core/resilience.ts";
import { startCuttableRedis } from "../../../test/support/cuttable-redis.ts";

/** Stands in for ioredis's subscriber: SUBSCRIBE fails `failures` times, then succeeds. */
class FlakySubscriber extends EventEmitter {
  attempts = 0;
  subscribed = new Set<string>();
  private failures: number;
  constructor(failures: number) {
    super();
    this.failures = failures;
  }
  async subscribe(channel: string) {
    this.attempts++;
    if (this.failures-- > 0) throw new Error("Connection is closed.");
    this.subscribed.add(channel);
    return 1;
  }
  disconnect() {}
}

const published: [string, string][] = [];
const publisher = Object.assign(new EventEmitter(), { publish: async (channel: string, message: string) => void published.push([channel, message]), disconnect() {} });
const warnings: string[] = [];
const logger = { warn: (_: unknown, msg: string) => void warnings.push(msg), debug() {} } as unknown as Logger;

describe("redisWakeupBus", () => {
  it("retries a failed subscribe until Redis answers, and routes messages by channel", async () => {
    const subscriber = new FlakySubscriber(1);
    const bus = redisWakeupBus(publisher as unknown as Redis, subscriber as unknown as Redis, logger);
    const got: string[] = [];
    await bus.subscribe("a", (m) => got.push(`a:${m}`));
    await bus.subscribe("b", (m) => got.push(`b:${m}`));
    expect(subscriber.attempts).toBe(3);
    expect([...subscriber.subscribed]).toEqual(["a", "b"]);
    expect(warnings.some((w) => w.includes("retrying"))).toBe(true);
    subscriber.emit("message", "b", "1");
    subscriber.emit("message", "c", "2");
    expect(got).toEqual(["b:1"]);
    await bus.close();
  });

  it("stops retrying when it closes", async () => {
    const subscriber = new FlakySubscriber(Infinity);
    const bus = redisWakeupBus(publisher as unknown as Redis, subscriber as unknown as Redis, logger);
    const subscribing = bus.subscribe("a", () => {});
    await new Promise((r) => setTimeout(r, 50));
    await bus.close();
    await expect(subscribing).resolves.toBeUndefined();
    const attempts = subscriber.attempts;
    await new Promise((r) => setTimeout(r, 1200));
    expect(subscriber.attempts).toBe(attempts);
  });
});

/** Stands in for the Redis bus in process: channels and streams as lists of handlers. */
function memoryBus() {
  const channels = new Map<string, ((message: string) => void)[]>();
  const streams = new Map<string, ((message: string) => void)[]>();
  const appended: [string, string][] = [];
  const bus: WakeupBus = {
    publish: (channel, message) => channels.get(channel)?.forEach((h) => h(message)),
    async subscribe(channel, onMessage) {
      channels.set(channel, [...(channels.get(channel) ?? []), onMessage]);
    },
    append(stream, message) {
      appended.push([stream, message]);
    },
    async follow(stream, onMessage) {
      streams.set(stream, [...(streams.get(stream) ?? []), onMessage]);
    },
    async close() {},
  };
  /** An entry as Redis would hand it to every follower (its own appends included). */
  const deliver = (stream: string, message: string) => streams.get(stream)?.forEach((h) => h(message));
  return { bus, appended, deliver, publish: bus.publish };
}

describe("Notifier over a bus", () => {
  it("hands peers' run outcomes to its listeners, not its own, and ignores malformed ones", async () => {
    const { bus, appended, deliver, publish } = memoryBus();
    const notifier = new Notifier(bus);
    await notifier.start();
    const outcomes: [string, RunOutcome][] = [];
    notifier.onPeerOutcome((agent, outcome) => outcomes.push([agent, outcome]));
    notifier.runOutcome("demo", { succeeded: false, tenantId: "01JTENANTAAAAAAAAAAAAAAAAA", runtimeFailure: false });
    const [[stream, own]] = appended as [[string, string]];
    expect(stream).toBe(OUTCOME_STREAM);
    deliver(OUTCOME_STREAM, own); // its own entry, read back from the stream
    expect(own).toBe(`${own.split(" ")[0]} 0 demo 01JTENANTAAAAAAAAAAAAAAAAA`);
    deliver(OUTCOME_STREAM, "peer-1 0 claude t1");
    deliver(OUTCOME_STREAM, "peer-1 1 demo t2");
    deliver(OUTCOME_STREAM, "peer-1 R codex t1");
    deliver(OUTCOME_STREAM, "peer-1 0 aider"); // an older replica's entry: no tenant
    deliver(OUTCOME_STREAM, "peer-1 maybe demo t1");
    deliver(OUTCOME_STREAM, "peer-1 1");
    publish(QUEUED_CHANNEL, "peer-1 1 demo t1");
    expect(outcomes).toEqual([
      ["claude", { succeeded: false, tenantId: "t1", runtimeFailure: false }],
      ["demo", { succeeded: true, tenantId: "t2", runtimeFailure: false }],
      ["codex", { succeeded: false, tenantId: "t1", runtimeFailure: true }],
      ["aider", { succeeded: false, tenantId: "", runtimeFailure: false }],
    ]);
    await notifier.close();
  });
});

describe("the outcome stream on a real Redis", () => {
  /**
   * Replica B reaches a private redis-server through a loopback proxy the test closes: B is cut
   * off while A stays connected, as when one machine loses its network.
   */
  it("a replica cut off from Redis gets its peers' outcomes when it is back, and they get the ones it saw meanwhile", async () => {
    const dir = mkdtempSync(path.join(tmpdir(), "outpost-outcome-stream-"));
    const redis = await startCuttableRedis(dir);
    const silent = createLogger("outcome-stream-test", "silent");
    const busOf = (url: string) => {
      const publisher = connectRedis(url, silent);
      return { publisher, bus: redisWakeupBus(publisher, subscriberOf(publisher), silent) };
    };
    const a = busOf(redis.url);
    const b = busOf(redis.proxiedUrl);
    const gotA: string[] = [];
    const gotB: string[] = [];
    try {
      await a.bus.follow(OUTCOME_STREAM, (m) => gotA.push(m));
      await b.bus.follow(OUTCOME_STREAM, (m) => gotB.push(m));
      a.bus.append(OUTCOME_STREAM, "a 0 claude");
      await until(() => gotB.length === 1);

      await redis.cut(); // B is cut off; its reads fail and its appends are kept
      await until(() => b.publisher.status !== "ready");
      for (let i = 1; i <= 3; i++) a.bus.append(OUTCOME_STREAM, `a ${i} while-b-away`);
      b.bus.append(OUTCOME_STREAM, "b 0 seen-while-away");
      b.bus.append(OUTCOME_STREAM, "b 1 seen-while-away");
      await new Promise((r) => setTimeout(r, 500));
      expect(gotB).toEqual(["a 0 claude"]);
      expect(gotA.filter((m) => m.startsWith("b "))).toEqual([]);

      await redis.restore();
      await until(() => gotB.length === 6 && gotA.length === 6, 15_000);
      // Each reads every entry once, in the order appended (B's own come after A's: appended on reconnect).
      expect(gotB).toEqual(["a 0 claude", "a 1 while-b-away", "a 2 while-b-away", "a 3 while-b-away", "b 0 seen-while-away", "b 1 seen-while-away"]);
      expect(gotA).toEqual(gotB);
    } finally {
      await a.bus.close();
      await b.bus.close();
      await redis.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

async function until(condition: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error("condition not met in time");
    await new Promise((r) => setTimeout(r, 20));
  }
}
