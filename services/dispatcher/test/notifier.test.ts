/**
 * The Redis wake-up bus: a subscribe that fails (Redis down when the replica starts) is retried
 * until it succeeds, so the replica does not miss its peers for good; messages reach the handler
 * of their channel only; peers' run outcomes reach the Notifier, its own do not.
 */
import { EventEmitter } from "node:events";
import { describe, expect, it } from "vitest";
import type { Logger, Redis } from "@outpost/platform";
import { Notifier, OUTCOME_CHANNEL, QUEUED_CHANNEL, redisWakeupBus } from "../src/core/notifier.ts";

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
const publisher = { publish: async (channel: string, message: string) => void published.push([channel, message]), disconnect() {} };
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

describe("Notifier over a bus", () => {
  it("hands peers' run outcomes to its listeners, not its own, and ignores malformed ones", async () => {
    const subscriber = new FlakySubscriber(0);
    const bus = redisWakeupBus(publisher as unknown as Redis, subscriber as unknown as Redis, logger);
    const notifier = new Notifier(bus);
    await notifier.start();
    const outcomes: [string, boolean][] = [];
    notifier.onPeerOutcome((agent, succeeded) => outcomes.push([agent, succeeded]));
    published.length = 0;
    notifier.runOutcome("demo", false);
    const [[channel, own]] = published as [[string, string]];
    expect(channel).toBe(OUTCOME_CHANNEL);
    subscriber.emit("message", OUTCOME_CHANNEL, own); // its own message, echoed by Redis
    subscriber.emit("message", OUTCOME_CHANNEL, "peer-1 0 claude");
    subscriber.emit("message", OUTCOME_CHANNEL, "peer-1 1 demo");
    subscriber.emit("message", OUTCOME_CHANNEL, "peer-1 maybe demo");
    subscriber.emit("message", OUTCOME_CHANNEL, "peer-1 1");
    subscriber.emit("message", QUEUED_CHANNEL, "peer-1 1 demo");
    expect(outcomes).toEqual([
      ["claude", false],
      ["demo", true],
    ]);
    await notifier.close();
  });
});
