/**
 * Exponential backoff with full jitter (SPEC D8): infrastructure failures are retried, but
 * never in lockstep and never faster than `baseMs` nor slower than `maxMs`.
 */
export interface BackoffOptions {
  baseMs: number;
  maxMs: number;
  /** Replaceable for tests; returns [0, 1). */
  random?: () => number;
}

export class Backoff {
  private attempt = 0;
  private readonly options: BackoffOptions;

  constructor(options: BackoffOptions) {
    this.options = options;
  }

  /** The delay before the next attempt; each call doubles the ceiling up to `maxMs`. */
  next(): number {
    const ceiling = Math.min(this.options.maxMs, this.options.baseMs * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 30);
    const random = this.options.random ?? Math.random;
    return Math.round(this.options.baseMs / 2 + random() * (ceiling - this.options.baseMs / 2));
  }

  /** Called after a success, so the next failure starts small again. */
  reset(): void {
    this.attempt = 0;
  }
}

/** Resolves after `ms`, or at once (without throwing) when `signal` aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}
