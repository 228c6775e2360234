/**
 * A run's workspace disk quota. The workspace is a host directory bind-mounted into the
 * container, so nothing in the container's own limits bounds it, and the engine cannot cap a
 * bind mount (`--storage-opt size` caps only the writable layer, and only on overlay2 over xfs
 * with project quotas). So the executor measures: once after the repository checkout, every
 * `intervalMs` (longer when measuring is slow) while the agent runs, and once after it exited.
 * Over the limit, the run ends FAILED with `quotaReason`; a workspace that cannot be measured
 * (a directory the executor cannot read, a path too long to name) ends it too, since its
 * quota cannot be vouched for. Other measuring errors are logged and the next measurement
 * decides. The design and its limits (how far a fast writer gets past the limit between two
 * measurements) are in docs/executor.md "Workspace disk quota".
 */
import type { Logger } from "@outpost/platform";
import { sleep } from "./backoff.ts";
import { WorkspaceUnmeasurableError } from "./ports.ts";

export interface DiskQuotaOptions {
  /** Bytes the workspace may take on the host's disk. */
  limitBytes: number;
  /** Shortest pause between two measurements while the agent runs. */
  intervalMs: number;
  /** The workspace's size in bytes; may stop counting once past `stopAboveBytes`. */
  measure: (stopAboveBytes: number, signal: AbortSignal) => Promise<number>;
  logger: Logger;
}

/**
 * The pause after a measurement is at least this many times what it took, so measuring a big
 * tree takes at most a fifth of the time whatever the interval.
 */
export const PAUSE_PER_MEASURING_TIME = 4;

export function quotaReason(limitBytes: number, usedBytes: number): string {
  return `workspace exceeded its disk quota of ${limitBytes} bytes (${usedBytes} bytes or more in use)`;
}

export class DiskQuota {
  private readonly options: DiskQuotaOptions;
  private readonly stopping = new AbortController();
  private watching: Promise<void> | undefined;

  constructor(options: DiskQuotaOptions) {
    this.options = options;
  }

  /** Measures once: the failure reason when the workspace is over its quota (or cannot be measured), else undefined. */
  async check(signal: AbortSignal = new AbortController().signal): Promise<string | undefined> {
    const { limitBytes, logger } = this.options;
    let used: number;
    try {
      used = await this.options.measure(limitBytes, signal);
    } catch (err) {
      if (signal.aborted) return undefined;
      if (err instanceof WorkspaceUnmeasurableError) return `workspace could not be measured for its disk quota of ${limitBytes} bytes: ${err.message}`;
      logger.warn({ err }, "workspace not measured; the next measurement decides");
      return undefined;
    }
    return used > limitBytes ? quotaReason(limitBytes, used) : undefined;
  }

  /** Measures every `intervalMs` (or longer, see PAUSE_PER_MEASURING_TIME) until `stop`; calls `onExceeded` once, then stops. */
  watch(onExceeded: (reason: string) => void): void {
    if (this.watching) throw new Error("already watching");
    const signal = this.stopping.signal;
    this.watching = (async () => {
      let pause = this.options.intervalMs;
      while (!signal.aborted) {
        await sleep(pause, signal);
        if (signal.aborted) return;
        const started = performance.now();
        const reason = await this.check(signal);
        if (reason !== undefined && !signal.aborted) {
          this.options.logger.warn({ reason }, "workspace over its disk quota");
          onExceeded(reason);
          return;
        }
        pause = Math.max(this.options.intervalMs, Math.ceil((performance.now() - started) * PAUSE_PER_MEASURING_TIME));
      }
    })();
  }

  /** Ends the watch; resolves once no measurement is in flight. `check` still works afterwards. */
  async stop(): Promise<void> {
    this.stopping.abort();
    await this.watching;
  }
}
