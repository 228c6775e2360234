import v8 from "node:v8";
import vm from "node:vm";
import { describe, expect, it } from "vitest";
import { untilSignal } from "../src/streams.ts";

v8.setFlagsFromString("--expose-gc");
const gc = vm.runInNewContext("gc") as () => void;

/** A source that yields `count` fresh objects, then waits until told to end (a live stream). */
function liveSource(count: number, refs: WeakRef<object>[]) {
  let end!: () => void;
  const ended = new Promise<void>((resolve) => (end = resolve));
  async function* source() {
    for (let i = 0; i < count; i++) {
      const message = { seq: i, payload: "x".repeat(100) };
      refs.push(new WeakRef(message));
      yield message;
    }
    await ended;
  }
  return { source: source(), end };
}

describe("untilSignal", () => {
  it("yields everything, then stops when the signal fires while a read is pending", async () => {
    const controller = new AbortController();
    const { source } = liveSource(3, []);
    const seen: number[] = [];
    for await (const message of untilSignal(source, controller.signal)) {
      seen.push(message.seq);
      if (seen.length === 3) setTimeout(() => controller.abort(), 10);
    }
    expect(seen).toEqual([0, 1, 2]);
  });

  it("ends with the source", async () => {
    const { source, end } = liveSource(2, []);
    end();
    const seen: number[] = [];
    for await (const message of untilSignal(source, new AbortController().signal)) seen.push(message.seq);
    expect(seen).toEqual([0, 1]);
  });

  it("does not keep the messages it passed on while the stream stays open", async () => {
    const refs: WeakRef<object>[] = [];
    const controller = new AbortController();
    const { source, end } = liveSource(2000, refs);
    const iterator = untilSignal(source, controller.signal)[Symbol.asyncIterator]();
    for (let i = 0; i < 2000; i++) expect((await iterator.next()).done).toBe(false);
    // The stream is still open (the next read is pending): what was read must be collectable.
    const pending = iterator.next();
    await new Promise((r) => setTimeout(r, 10));
    gc();
    await new Promise((r) => setTimeout(r, 10));
    gc();
    const alive = refs.filter((ref) => ref.deref() !== undefined).length;
    expect(alive).toBeLessThan(10);
    end();
    expect((await pending).done).toBe(true);
  });
});
