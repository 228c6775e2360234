/**
 * Live fan-out of freshly stored chunks and run ends to subscriptions. The in-process feed
 * serves one telemetry replica; a Redis-backed feed (issue 6) implements the same interface so
 * a chunk ingested on one replica reaches subscribers on another. A feed only wakes and feeds
 * subscriptions: storage stays the system of record, so a lost or reordered live message is
 * repaired from storage by the subscription.
 */
import type { RunEndRecord, StoredChunk } from "./model.ts";

export interface LiveListener {
  /** Must not block: called on the publisher's path. */
  onChunks(chunks: StoredChunk[]): void;
  onEnd(end: RunEndRecord): void;
}

export interface LiveFeed {
  /** Publishes chunks already stored for the run. */
  publish(dispatchId: string, chunks: StoredChunk[]): void;
  /** Publishes the run's end, already stored. */
  publishEnd(dispatchId: string, end: RunEndRecord): void;
  /** Starts delivery to `listener`; the returned function stops it. */
  subscribe(dispatchId: string, listener: LiveListener): () => void;
  close(): Promise<void>;
}

/** One process: listeners per run in a map, called synchronously. */
export class InProcessLiveFeed implements LiveFeed {
  readonly #listeners = new Map<string, Set<LiveListener>>();

  publish(dispatchId: string, chunks: StoredChunk[]): void {
    if (chunks.length === 0) return;
    for (const listener of this.#listeners.get(dispatchId) ?? []) listener.onChunks(chunks);
  }

  publishEnd(dispatchId: string, end: RunEndRecord): void {
    for (const listener of this.#listeners.get(dispatchId) ?? []) listener.onEnd(end);
  }

  subscribe(dispatchId: string, listener: LiveListener): () => void {
    let set = this.#listeners.get(dispatchId);
    if (!set) this.#listeners.set(dispatchId, (set = new Set()));
    set.add(listener);
    return () => {
      set.delete(listener);
      if (set.size === 0 && this.#listeners.get(dispatchId) === set) this.#listeners.delete(dispatchId);
    };
  }

  /** Number of runs with live listeners (for tests and metrics). */
  get watchedRuns(): number {
    return this.#listeners.size;
  }

  async close(): Promise<void> {
    this.#listeners.clear();
  }
}
