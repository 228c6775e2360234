/**
 * Interceptors that must act when a call has fully ended — metrics, spans, in-flight counting,
 * error masking — share one wrapper: unary calls end when `next` settles, server streams when
 * their last message was sent (or they failed).
 */
import type { StreamResponse, UnaryResponse } from "@connectrpc/connect";

export interface CallEndOptions {
  /** Called exactly once, with the error the call ended with (undefined on success). */
  onEnd(err?: unknown): void;
  /** Maps an error before it propagates (e.g. masking); identity by default. */
  mapError?: (err: unknown) => unknown;
  /** Wraps a response stream before it is consumed (e.g. to keep a context active). */
  wrapStream?: (messages: AsyncIterable<unknown>) => AsyncIterable<unknown>;
}

export async function observeCallEnd<R extends UnaryResponse | StreamResponse>(
  call: () => Promise<R>,
  { onEnd, mapError = (err) => err, wrapStream = (messages) => messages }: CallEndOptions,
): Promise<R> {
  let res: R;
  try {
    res = await call();
  } catch (err) {
    onEnd(err);
    throw mapError(err);
  }
  if (!res.stream) {
    onEnd();
    return res;
  }
  const inner = wrapStream(res.message as AsyncIterable<unknown>);
  return {
    ...res,
    message: (async function* () {
      let failure: unknown;
      try {
        yield* inner;
      } catch (err) {
        failure = err;
        throw mapError(err);
      } finally {
        onEnd(failure);
      }
    })(),
  } as R;
}
