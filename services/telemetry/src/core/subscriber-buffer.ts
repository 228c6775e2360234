/**
 * A subscription's bounded inbox for live chunks. The publisher only appends (never waits), so a
 * slow subscriber cannot hold up ingest or other subscribers. When the inbox overflows it is
 * dropped and marked; the subscription then continues from storage, which holds every chunk
 * the inbox lost, so the subscriber still sees one contiguous stream.
 */
import type { LiveListener } from "./live-feed.ts";
import type { RunEndRecord, StoredChunk } from "./model.ts";

export interface Taken {
  chunks: StoredChunk[];
  overflowed: boolean;
  end: RunEndRecord | undefined;
}

export class SubscriberBuffer implements LiveListener {
  readonly #maxChunks: number;
  #chunks: StoredChunk[] = [];
  #overflowed = false;
  #end: RunEndRecord | undefined;
  #dirty = false;
  #wake: (() => void) | undefined;
  /** How many times the inbox overflowed (observable in tests). */
  overflows = 0;
  /** Live chunks dropped by overflows (the subscription read them from storage instead). */
  dropped = 0;

  readonly #onOverflow: (() => void) | undefined;

  /** `onOverflow` runs at the moment the inbox overflows, even while its reader is stuck in a write. */
  constructor(maxChunks: number, onOverflow?: () => void) {
    this.#maxChunks = maxChunks;
    this.#onOverflow = onOverflow;
  }

  onChunks(chunks: StoredChunk[]): void {
    if (!this.#overflowed) {
      if (this.#chunks.length + chunks.length > this.#maxChunks) {
        this.dropped += this.#chunks.length + chunks.length;
        this.#chunks = [];
        this.#overflowed = true;
        this.overflows++;
        this.#onOverflow?.();
      } else {
        for (const chunk of chunks) this.#chunks.push(chunk);
      }
    } else {
      this.dropped += chunks.length;
    }
    this.#signal();
  }

  onEnd(end: RunEndRecord): void {
    this.#end ??= end;
    this.#signal();
  }

  /** Empties the inbox. */
  take(): Taken {
    const taken = { chunks: this.#chunks, overflowed: this.#overflowed, end: this.#end };
    this.#chunks = [];
    this.#overflowed = false;
    this.#dirty = false;
    return taken;
  }

  /**
   * Resolves when something arrived since the last take (true), the signal fires (true), or
   * after `timeoutMs` (false).
   */
  wait(signal: AbortSignal, timeoutMs?: number): Promise<boolean> {
    if (this.#dirty || signal.aborted) return Promise.resolve(true);
    return new Promise<boolean>((resolve) => {
      let timer: NodeJS.Timeout | undefined;
      const done = (woke: boolean) => {
        this.#wake = undefined;
        if (timer) clearTimeout(timer);
        signal.removeEventListener("abort", onAbort);
        resolve(woke);
      };
      const onAbort = () => done(true);
      this.#wake = () => done(true);
      signal.addEventListener("abort", onAbort, { once: true });
      if (timeoutMs !== undefined) timer = setTimeout(() => done(false), Math.max(0, timeoutMs));
    });
  }

  #signal(): void {
    this.#dirty = true;
    this.#wake?.();
  }
}
