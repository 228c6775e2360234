/**
 * Retention for the embedded store (SPEC L3): deletes runs (and their chunks) whose expire
 * time has passed, in small batches so a sweep never holds the write lock for long. MongoDB
 * does the same with a TTL index on the expire time and needs no sweeper.
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
          if (deleted < BATCH) break;
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

  async stop(): Promise<void> {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    await this.#running;
  }
}
