import { afterEach, describe, expect, it, vi } from "vitest";
import { Code, ConnectError } from "@connectrpc/connect";
import { refusalOf } from "../src/adapters/telemetry-log-sink.ts";
import { Backoff } from "../src/core/backoff.ts";
import { LogShipper, outputCost, truncationNotice } from "../src/core/log-shipper.ts";
import { MAX_LINE_CHARS } from "../src/core/line-splitter.ts";
import { LogRefusedError } from "../src/core/ports.ts";
import { FakeSink, silentLogger } from "./fakes.ts";
import { executorConfigShape } from "../src/config.ts";

function shipper(sink: FakeSink, extra: Partial<ConstructorParameters<typeof LogShipper>[0]> = {}) {
  return new LogShipper({
    dispatchId: "D1",
    tenantId: "T1",
    grant: () => "log-grant-of-D1",
    sink,
    logger: silentLogger,
    backoff: new Backoff({ baseMs: 10, maxMs: 10, random: () => 0.5 }),
    ...extra,
  });
}

describe("LogShipper", () => {
  afterEach(() => vi.useRealTimers());

  it("sends the first line at once and batches what accumulates while it is unacked", () => {
    const sink = new FakeSink();
    const s = shipper(sink);
    s.add("stdout", "first");
    expect(sink.connections).toHaveLength(1);
    expect(sink.last.batches).toEqual([[expect.objectContaining({ seq: 1, text: "first", stream: "stdout" })]]);
    s.add("stdout", "second");
    s.add("stderr", "third");
    expect(sink.last.batches).toHaveLength(1); // in flight: nothing more sent yet
    sink.last.ack(1);
    expect(sink.last.batches).toHaveLength(2);
    expect(sink.last.batches[1]!.map((l) => [l.seq, l.stream, l.text])).toEqual([
      [2, "stdout", "second"],
      [3, "stderr", "third"],
    ]);
    s.close();
  });

  it("past maxOutputBytes sends one stderr line saying the output was truncated, then drops the rest", async () => {
    const sink = new FakeSink();
    sink.autoAck = true;
    // Each line costs its UTF-8 bytes plus 64 (what telemetry stores with any line).
    const s = shipper(sink, { maxOutputBytes: 64 + 6 + 64 + 4 });
    expect(outputCost("héllo")).toBe(70);
    expect(s.add("stdout", "héllo")?.seq).toBe(1);
    expect(s.add("stdout", "abcd")?.text).toBe("abcd"); // at the cap, still kept
    expect(s.add("stdout", "x")?.text).toBe(truncationNotice(138)); // the notice takes its place
    expect(s.add("stderr", "more")).toBeUndefined();
    expect(s.lastSequence).toBe(3);
    expect(await s.finish(1000)).toBe(3);
    expect(sink.allSent.map((l) => [l.seq, l.stream, l.text])).toEqual([
      [1, "stdout", "héllo"],
      [2, "stdout", "abcd"],
      [3, "stderr", truncationNotice(138)],
    ]);
    expect(truncationNotice(100 * 1024 ** 2)).toBe("[outpost] output truncated: this run printed more than 100 MiB of output; the rest of it is not kept");
    expect(truncationNotice(1000)).toContain("more than 1000 bytes of output;");
  });

  it("empty lines count against the cap too, and once truncated the producer never waits", () => {
    const sink = new FakeSink(); // never acks: everything stays buffered
    const s = shipper(sink, { maxOutputBytes: 3 * 64, maxBuffered: 2 });
    for (let i = 0; i < 3; i++) s.add("stdout", "");
    expect(s.full).toBe(true); // two lines buffered, unacked: the producer would wait
    expect(s.add("stdout", "")?.text).toBe(truncationNotice(3 * 64));
    expect(s.full).toBe(false); // truncated: what comes now is dropped, not waited for
    expect(s.add("stdout", "")).toBeUndefined();
    s.close();
  });

  describe("continueStored (a retried attempt)", () => {
    it("asks with an empty batch first and numbers what it took meanwhile after telemetry's answer", () => {
      const sink = new FakeSink();
      const s = shipper(sink, { continueStored: true });
      s.add("stdout", "a");
      s.add("stderr", "b");
      expect(sink.last.batches).toEqual([[]]); // only the question, no line yet
      sink.last.ack(7);
      expect(sink.last.batches[1]!.map((l) => [l.seq, l.stream, l.text])).toEqual([
        [8, "stdout", "a"],
        [9, "stderr", "b"],
      ]);
      expect(s.add("stdout", "c")?.seq).toBe(10);
      expect(s.lastSequence).toBe(10);
      s.close();
    });

    it("a connection that fails before the answer asks again on the next; nothing is numbered twice", async () => {
      const sink = new FakeSink();
      const s = shipper(sink, { continueStored: true });
      s.add("stdout", "a");
      sink.last.handlers.onClose(new Error("telemetry restarting"));
      await vi.waitFor(() => expect(sink.connections).toHaveLength(2));
      expect(sink.last.batches).toEqual([[]]);
      sink.last.ack(2);
      expect(sink.last.batches[1]!.map((l) => l.seq)).toEqual([3]);
      sink.last.ack(3);
      expect(await s.finish(100)).toBe(3);
    });

    it("a refused question drops the output as any refusal does", async () => {
      const sink = new FakeSink();
      const s = shipper(sink, { continueStored: true });
      s.add("stdout", "a");
      sink.last.handlers.onClose(new LogRefusedError("log grant refused"));
      s.add("stdout", "b");
      expect(await s.finish(100)).toBe(0);
      expect(sink.connections).toHaveLength(1);
    });
  });

  it("caps a batch by size so it fits telemetry's message limit", () => {
    const sink = new FakeSink();
    const s = shipper(sink);
    s.add("stdout", "first");
    const big = "z".repeat(16 * 1024);
    for (let i = 0; i < 100; i++) s.add("stdout", big); // 1.6 M characters waiting
    sink.last.ack(1);
    const batch = sink.last.batches[1]!;
    expect(batch.length).toBeGreaterThan(1);
    expect(batch.length).toBeLessThan(100);
    expect(batch.reduce((n, l) => n + l.text.length, 0)).toBeLessThanOrEqual(512 * 1024);
    s.close();
  });

  it("resends unacked lines on a new connection after a failure, and finish returns the acked seq", async () => {
    const sink = new FakeSink();
    const s = shipper(sink);
    s.add("stdout", "a");
    sink.last.ack(1);
    s.add("stdout", "b");
    s.add("stdout", "c");
    sink.last.ack(2); // b acked, c in the next batch
    expect(sink.last.batches.map((b) => b.map((l) => l.seq))).toEqual([[1], [2], [3]]);
    sink.last.fail();
    s.add("stdout", "d");
    expect(sink.connections).toHaveLength(1); // reconnect waits for the backoff
    await vi.waitFor(() => expect(sink.connections).toHaveLength(2));
    expect(sink.last.batches.map((b) => b.map((l) => l.seq))).toEqual([[3, 4]]);
    // Every connection presents the run's log grant, the new one too.
    expect(sink.runs.map((run) => [run.dispatchId, run.tenantId, run.grant()])).toEqual([1, 2].map(() => ["D1", "T1", "log-grant-of-D1"]));
    // acks of the dead connection are ignored
    sink.connections[0]!.ack(4);
    expect(s.acked).toBe(2);
    const done = s.finish(1000);
    sink.last.ack(4);
    expect(await done).toBe(4);
    expect(sink.last.closed).toBe(true);
  });

  it("drops the output telemetry refuses for good (its grant refused): no resend, and the producer is never held up", async () => {
    const sink = new FakeSink();
    const s = shipper(sink, { maxBuffered: 3 });
    s.add("stdout", "a");
    sink.last.ack(1);
    s.add("stdout", "b");
    sink.last.fail(new LogRefusedError("[permission_denied] log grant refused: it has expired"));
    // More than the buffer holds: had it kept them, the producer would wait for room forever.
    for (const text of ["c", "d", "e", "f", "g"]) {
      s.add("stdout", text);
      expect(s.full).toBe(false);
    }
    await s.room();
    await new Promise((resolve) => setTimeout(resolve, 50)); // several backoffs (10 ms)
    expect(sink.connections).toHaveLength(1);
    expect(await s.finish(1000)).toBe(1);
    expect(s.lastSequence).toBe(7);
  });

  it("telemetry's answers that sending again cannot change are refusals for good; the rest are retried", () => {
    for (const code of [Code.PermissionDenied, Code.InvalidArgument, Code.FailedPrecondition]) {
      expect(refusalOf(new ConnectError("no", code)), Code[code]).toBeInstanceOf(LogRefusedError);
    }
    for (const code of [Code.Unavailable, Code.DeadlineExceeded, Code.Internal, Code.ResourceExhausted]) {
      expect(refusalOf(new ConnectError("later", code)), Code[code]).not.toBeInstanceOf(LogRefusedError);
    }
  });

  it("treats a stalled stream as failed and resends", async () => {
    const sink = new FakeSink();
    const s = shipper(sink, { ackTimeoutMs: 30 });
    s.add("stdout", "x");
    await vi.waitFor(() => expect(sink.connections.length).toBeGreaterThanOrEqual(2));
    expect(sink.connections[0]!.closed).toBe(true);
    expect(sink.last.batches[0]!.map((l) => l.seq)).toEqual([1]);
    s.close();
  });

  it("finish gives up after its bound and answers what was acked", async () => {
    const sink = new FakeSink();
    const s = shipper(sink);
    s.add("stdout", "1");
    s.add("stdout", "2");
    sink.last.ack(1);
    const started = Date.now();
    expect(await s.finish(100)).toBe(1);
    expect(Date.now() - started).toBeLessThan(1000);
  });

  it("never claims more than was sent, and answers 0 when nothing was written", async () => {
    const sink = new FakeSink();
    const s = shipper(sink);
    s.add("stdout", "1");
    sink.last.ack(99);
    expect(s.acked).toBe(1);
    expect(await shipper(new FakeSink()).finish(10)).toBe(0);
    s.close();
  });

  it("bounds the buffer: the producer waits for room until acks arrive", async () => {
    const sink = new FakeSink();
    const s = shipper(sink, { maxBuffered: 3, maxBatch: 2 });
    for (const t of ["a", "b", "c"]) s.add("stdout", t);
    expect(s.full).toBe(true);
    let roomy = false;
    const waiting = s.room().then(() => (roomy = true));
    await new Promise((r) => setTimeout(r, 20));
    expect(roomy).toBe(false);
    sink.last.ack(1);
    await waiting;
    expect(s.full).toBe(false);
    // the first line went alone; the two that accumulated meanwhile went together
    expect(sink.last.batches.map((b) => b.map((l) => l.seq))).toEqual([[1], [2, 3]]);
    s.close();
  });

  it("keeps sequence numbers contiguous from 1 under heavy output", async () => {
    const sink = new FakeSink();
    sink.autoAck = true;
    const s = shipper(sink, { maxBatch: 7 });
    for (let i = 0; i < 100; i++) s.add(i % 3 === 0 ? "stderr" : "stdout", `line ${i}`);
    expect(await s.finish(1000)).toBe(100);
    expect(sink.allSent.map((l) => l.seq)).toEqual(Array.from({ length: 100 }, (_, i) => i + 1));
    expect(Math.max(...sink.last.batches.map((b) => b.length))).toBeLessThanOrEqual(7);
  });

  it("bounds the buffer in bytes too: with a sink that never acknowledges, 16 K-character lines stop at 8 MiB and the producer waits", async () => {
    const sink = new FakeSink(); // never acks
    const s = shipper(sink, { ackTimeoutMs: 60_000 });
    const line = "x".repeat(MAX_LINE_CHARS);
    // A producer as the run's output pump is: add, and wait for room while the buffer is full.
    let added = 0;
    let waiting = false;
    while (added < 20_000) {
      if (s.full) {
        const roomy = await Promise.race([s.room().then(() => true), new Promise<boolean>((resolve) => setTimeout(() => resolve(false), 50))]);
        if (!roomy) {
          waiting = true;
          break;
        }
      }
      s.add("stdout", line);
      added++;
    }
    expect(waiting).toBe(true);
    // Unacked: everything added (counted here, not by the shipper), at 2 bytes per UTF-16 unit.
    const unackedBytes = (added - s.acked) * 2 * line.length;
    const bound = 8 * 1024 * 1024; // the default
    expect(unackedBytes).toBeLessThanOrEqual(bound);
    expect(unackedBytes).toBeGreaterThan(bound - 2 * 2 * line.length);
    expect(s.bufferedBytes).toBe(unackedBytes);
    // An ack makes room; the bytes it freed are counted off.
    const room = s.room();
    sink.last.ack(1);
    await room;
    expect(s.full).toBe(false);
    expect(s.bufferedBytes).toBe(unackedBytes - 2 * line.length);
    s.close();
  });

  it("takes lines one at a time when a line is larger than the byte bound, rather than never", async () => {
    const sink = new FakeSink();
    const s = shipper(sink, { maxBufferedBytes: 100 });
    expect(s.full).toBe(false);
    s.add("stdout", "y".repeat(1000));
    expect(s.full).toBe(true);
    const room = s.room();
    sink.last.ack(1);
    await room;
    expect(s.bufferedBytes).toBe(0);
    s.add("stdout", "z");
    expect(sink.last.batches.map((b) => b.map((l) => l.seq))).toEqual([[1], [2]]);
    s.close();
  });
});

describe("OUTPOST_EXECUTOR_RUN_OUTPUT_MAX_BYTES", () => {
  const parse = (value: string | undefined) => executorConfigShape.OUTPOST_EXECUTOR_RUN_OUTPUT_MAX_BYTES.safeParse(value);
  it("defaults to 100 MiB, takes whole bytes (0: no cap) and refuses anything else, naming the unit", () => {
    expect(parse(undefined).data).toBe(100 * 1024 * 1024);
    expect(parse("0").data).toBe(0);
    expect(parse("16384").data).toBe(16384);
    for (const bad of ["", "100MiB", "-1", "1e9", "1.5", "99999999999999999999"]) expect(parse(bad).success, bad).toBe(false);
    expect(parse("100MiB").error?.issues[0]?.message).toBe("must be a whole number of bytes (0: no cap)");
  });
});
