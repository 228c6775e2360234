/** Helpers for streaming handlers: consuming request streams, ending response streams. */
import { Code, ConnectError, type HandlerContext } from "@connectrpc/connect";

/**
 * For a stream that follows `callEndSignal` and has stopped: one stopped by the call's own
 * signal (its deadline passed, or the client left) ends with that reason, so a client whose
 * deadline cut a watch is not told the watch finished; one stopped by a draining server ends
 * cleanly (OK) and its client resumes on another replica.
 */
export function throwIfCallAborted(ctx: HandlerContext): void {
  if (ctx.signal.aborted) throw ConnectError.from(ctx.signal.reason, Code.Canceled);
}

/**
 * Yields from `source` until it ends or `signal` fires (then returns without waiting for the
 * pending read, which the closing stream settles).
 *
 * Each read races against its own abort promise, removed afterwards. Racing every read against
 * one long-lived promise instead would leak: each `Promise.race` leaves a reaction on that
 * promise holding the race's result, so a stream that lives as long as a run would keep every
 * message it ever received.
 */
export async function* untilSignal<T>(source: AsyncIterable<T>, signal: AbortSignal): AsyncGenerator<T> {
  const iterator = source[Symbol.asyncIterator]();
  for (;;) {
    if (signal.aborted) return;
    const next = iterator.next();
    let onAbort: (() => void) | undefined;
    const aborted = new Promise<"aborted">((resolve) => {
      onAbort = () => resolve("aborted");
      signal.addEventListener("abort", onAbort, { once: true });
    });
    let result: IteratorResult<T> | "aborted";
    try {
      result = await Promise.race([next, aborted]);
    } finally {
      signal.removeEventListener("abort", onAbort!);
    }
    if (result === "aborted") {
      next.catch(() => undefined); // the stream closes under it
      return;
    }
    if (result.done) return;
    yield result.value;
  }
}
