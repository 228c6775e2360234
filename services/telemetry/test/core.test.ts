/** The subscription logic without transport: slow subscribers, end handling, cancellation. */
import { Code } from "@connectrpc/connect";
import { ulid } from "ulid";
import { describe, expect, it } from "vitest";
import { InProcessLiveFeed, type LiveListener } from "../src/core/live-feed.ts";
import { SubscriberBuffer } from "../src/core/subscriber-buffer.ts";
import { TelemetryCore, type SubscriptionBatch } from "../src/core/telemetry-core.ts";
import { SqliteTelemetryStore } from "../src/store/sqlite-store.ts";
import { drain, range, sleep, storedChunks } from "./helpers.ts";

/** Remembers the subscriptions' inboxes so a test can see that one overflowed. */
class WatchedFeed extends InProcessLiveFeed {
  readonly inboxes: SubscriberBuffer[] = [];
  override subscribe(dispatchId: string, listener: LiveListener): () => void {
    if (listener instanceof SubscriberBuffer) this.inboxes.push(listener);
    return super.subscribe(dispatchId, listener);
  }
}



function setup(options: ConstructorParameters<typeof TelemetryCore>[2] = {}) {
  const feed = new WatchedFeed();
  const core = new TelemetryCore(new SqliteTelemetryStore(":memory:"), feed, options);
  return { feed, core };
}

describe("TelemetryCore subscriptions", () => {
  it("a subscriber that stops reading never blocks ingest or other subscribers, and still sees 1..N", async () => {
    const { core, feed } = setup({ subscriberBufferChunks: 10 });
    const id = ulid();
    const N = 400;
    await core.ingest(id, "t-a", storedChunks(id, range(1, 5)));
    const slow = core.subscribe("t-a", id, 0, new AbortController().signal);
    const first = (await slow.next()).value as SubscriptionBatch; // then it stops reading, suspended at its yield
    expect(first.chunks.map((c) => c.seq)).toEqual(range(1, 5));

    const fast = drain(core.subscribe("t-a", id, 0, new AbortController().signal));
    for (let seq = 6; seq <= N; seq += 7) {
      const acked = await core.ingest(id, "t-a", storedChunks(id, range(seq, Math.min(N, seq + 6))));
      expect(acked).toBe(Math.min(N, seq + 6));
      await sleep(0);
    }
    await core.completeRun(id, "t-a", { state: 4, exitCode: 0, failureReason: "", lastSeq: N });
    expect((await fast).seqs).toEqual(range(1, N));

    const rest = await drain(slow, [...range(1, 5)]);
    expect(rest.seqs).toEqual(range(1, N));
    expect(rest.end?.lastSeq).toBe(N);
    expect(feed.inboxes[0]!.overflows).toBeGreaterThan(0);
    expect(feed.watchedRuns).toBe(0); // both subscriptions let go of the feed
  });

  it("returns without an error when its signal fires, and lets go of the feed", async () => {
    const { core, feed } = setup();
    const id = ulid();
    await core.registerRun(id, "t-a");
    const stop = new AbortController();
    const watching = drain(core.subscribe("t-a", id, 0, stop.signal));
    await sleep(20);
    await core.ingest(id, "t-a", storedChunks(id, [1]));
    await sleep(20);
    stop.abort();
    expect(await watching).toEqual({ seqs: [1], end: undefined });
    expect(feed.watchedRuns).toBe(0);
  });

  it("does not deliver chunks past run_end.last_seq, and ends once it reached it", async () => {
    const { core } = setup({ endGraceMs: 60_000 });
    const id = ulid();
    await core.ingest(id, "t-a", storedChunks(id, [...range(1, 3), 6])); // 6 stored before the end said 4
    await core.completeRun(id, "t-a", { state: 5, exitCode: 1, failureReason: "exit 1", lastSeq: 4 });
    const watching = drain(core.subscribe("t-a", id, 0, new AbortController().signal));
    await sleep(20);
    // Past the end is refused from now on (RUN_ENDED); a late chunk within it is taken.
    await expect(core.ingest(id, "t-a", storedChunks(id, [4, 5]))).rejects.toMatchObject({ code: Code.FailedPrecondition });
    await core.ingest(id, "t-a", storedChunks(id, [4]));
    expect(await watching).toEqual({ seqs: [1, 2, 3, 4], end: { state: 5, exitCode: 1, failureReason: "exit 1", lastSeq: 4 } });
  });

  it("with last_seq unknown (0), ends after everything stored", async () => {
    const { core } = setup();
    const id = ulid();
    await core.ingest(id, "t-a", storedChunks(id, range(1, 1200)));
    await core.completeRun(id, "t-a", { state: 6, exitCode: undefined, failureReason: "timed out", lastSeq: 0 });
    const got = await drain(core.subscribe("t-a", id, 0, new AbortController().signal));
    expect(got.seqs).toEqual(range(1, 1200));
    expect(got.end?.state).toBe(6);
  });
});
