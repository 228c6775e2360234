/**
 * Retention for the embedded store (SPEC L3): deletes runs (and their chunks) whose expire
 * time has passed, in batches of runs with a macrotask between them. A batch is bounded in runs,
 * not in chunks; the SQLite store bounds the work itself, deleting a batch's chunks in pieces of
 * a few thousand rows with a macrotask between pieces, so the event loop (ingest, subscriptions)
 * is never held for long (docs/telemetry.md, "Retention"). MongoDB does the same with a TTL index
 * on the expire time and needs no sweeper.
 */
import type { Logger } from "@outpost/platform";
import type { TelemetryStore } from "../store/store.ts";

const BATCH = 200;

export class RetentionSweeper {
  readonly #store: TelemetryStore;
  readonly #logger: Logger;
  readonly #intervalMs: number;
  #timer: NodeJS.Timeout | undefined;
  #running: Promise<number> | undefined;
  #stopped = false;

  constructor(store: TelemetryStore, logger: Logger, intervalMs: number) {
    this.#store = store;
    this.#logger = logger;
    this.#intervalMs = intervalMs;
  }

  /** Sweeps once now, then every interval. */
  start(): void {
    const tick = () => {
      void this.sweep().finally(() => {
        if (this.#timer !== undefined) this.#timer = setTimeout(tick, this.#intervalMs).unref();
      });
    };
    this.#timer = setTimeout(tick, 0).unref();
  }

  /** Deletes every run expired at `nowMs`; answers how many. */
  async sweep(nowMs = Date.now()): Promise<number> {
    this.#running ??= (async () => {
      let total = 0;
      try {
        for (;;) {
          const deleted = await this.#store.deleteExpired(nowMs, BATCH);
          total += deleted;
          if (deleted < BATCH || this.#stopped) break;
          await new Promise((resolve) => setImmediate(resolve)); // let calls in between batches
        }
        if (total > 0) this.#logger.info({ runs: total }, "deleted expired runs");
      } catch (err) {
        this.#logger.warn({ err }, "retention sweep failed; retrying next interval");
      } finally {
        this.#running = undefined;
      }
      return total;
    })();
    return this.#running;
  }

  /** Stops the timer; a sweep under way ends after its current batch. */
  async stop(): Promise<void> {
    this.#stopped = true;
    clearTimeout(this.#timer);
    this.#timer = undefined;
    try {
      await this.#running;
    } finally {
      this.#stopped = false;
    }
  }
}
