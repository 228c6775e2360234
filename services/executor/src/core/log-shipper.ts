/**
 * Ships one run's output to telemetry (SPEC L1). Lines get sequence numbers as they are read;
 * the first line goes out at once and whatever accumulates while a batch is unacknowledged
 * goes out as the next batch, so latency stays low without a batching delay. Unacked lines stay
 * in a buffer bounded in lines and in bytes (the producer waits for room: backpressure, so a
 * stuck telemetry holds up the container's output rather than growing the executor's memory:
 * 10,000 lines of 16 K characters were 230 MiB per run); when the stream fails or
 * stalls, it reconnects with backoff and resends everything unacked; telemetry ignores
 * duplicates. `finish` waits (bounded) until everything is acked and answers the highest
 * acked sequence, which the terminal state report carries as `last_log_seq`. Output telemetry
 * refuses for good (LogRefusedError: its log grant refused) is dropped from then on, never
 * retried, so the container is not held up by a buffer that can never drain.
 */
import type { Logger } from "@outpost/platform";
import { Backoff } from "./backoff.ts";
import { MAX_LINE_CHARS } from "./line-splitter.ts";
import { LogRefusedError, type LogConnection, type LogLine, type LogSink, type OutputStream } from "./ports.ts";

export interface LogShipperOptions {
  dispatchId: string;
  tenantId: string;
  /** The run's current log grant (Lease.log_grant, renewed by heartbeats). */
  grant: () => string;
  sink: LogSink;
  logger: Logger;
  /**
   * Continue after what telemetry already holds for the run: a retried attempt, whose earlier
   * attempt's agent may have printed before its executor died, or a run taken up again after
   * its executor restarted (run.ts adoptRun). Telemetry keeps the first line
   * stored under a sequence, so this attempt's lines, numbered from 1 again, would be lost
   * behind that output. Instead the first connection opens with a batch of no chunks, whose ack
   * is the run's stored high-water mark, and nothing is sent until it came: the lines taken
   * meanwhile are numbered after it then (a connection that fails first asks again). Telemetry
   * being down costs the run nothing more than for a first attempt: lines wait in the buffer.
   */
  continueStored?: boolean;
  /**
   * Output this shipper may send, counted as `outputCost` does (no cap when absent or 0). The
   * line that would pass it is replaced by one stderr line saying the output was truncated, and
   * everything after it is dropped here, so an agent printing without end (`yes`) neither fills
   * telemetry's store nor holds up its own run: its output is still read, and thrown away.
   */
  maxOutputBytes?: number;
  /** Unacked lines kept at most before the producer has to wait. */
  maxBuffered?: number;
  /**
   * Unacked output kept at most before the producer has to wait, in bytes counted as
   * `textBytes` does (DEFAULT_MAX_BUFFERED_BYTES). At least one line is always taken.
   */
  maxBufferedBytes?: number;
  /** Lines per request at most. */
  maxBatch?: number;
  /** A batch unacked for this long counts as a failed stream. */
  ackTimeoutMs?: number;
  backoff?: Backoff;
  now?: () => Date;
}

export class LogShipper {
  private readonly options: LogShipperOptions;
  private readonly maxBuffered: number;
  private readonly maxBufferedBytes: number;
  private readonly maxBatch: number;
  private readonly ackTimeoutMs: number;
  private readonly backoff: Backoff;
  /** Unacked lines, in sequence order. */
  private pending: LogLine[] = [];
  /** `textBytes` of the lines in `pending`. */
  private pendingBytes = 0;
  private lastSeq = 0;
  private ackedSeq = 0;
  /** Highest sequence sent on the current connection. */
  private sentSeq = 0;
  private conn: LogConnection | undefined;
  /** Bumped per connection, so callbacks of an old one are ignored. */
  private generation = 0;
  private reconnectTimer: NodeJS.Timeout | undefined;
  private ackTimer: NodeJS.Timeout | undefined;
  private closed = false;
  /** Telemetry refused the run's output for good: lines are dropped from then on. */
  private refused = false;
  private waiters: Array<() => void> = [];
  /**
   * Under `continueStored`, until telemetry said where the run's output stands: lines are
   * numbered from 0 meanwhile and renumbered after that mark once it is known. The probe is
   * the empty batch in flight on the current connection.
   */
  private base: "unknown" | "probing" | "known";
  /** Output taken so far, counted as `outputCost` does (only under `maxOutputBytes`). */
  private outputBytes = 0;
  /** Past `maxOutputBytes`: what is dropped since, for the executor's log. */
  private truncated: { lines: number; bytes: number } | undefined;

  constructor(options: LogShipperOptions) {
    this.options = options;
    this.maxBuffered = options.maxBuffered ?? 10_000;
    this.maxBufferedBytes = options.maxBufferedBytes ?? DEFAULT_MAX_BUFFERED_BYTES;
    this.maxBatch = options.maxBatch ?? 500;
    this.ackTimeoutMs = options.ackTimeoutMs ?? 5_000;
    this.backoff = options.backoff ?? new Backoff({ baseMs: 100, maxMs: 5_000 });
    this.base = options.continueStored ? "unknown" : "known";
  }

  /** Highest sequence number handed out so far (0 when none; provisional until a `continueStored` shipper learned its base). */
  get lastSequence(): number {
    return this.lastSeq;
  }

  get acked(): number {
    return this.ackedSeq;
  }

  /** Bytes of unacked output held (`textBytes` of each line). */
  get bufferedBytes(): number {
    return this.pendingBytes;
  }

  /**
   * Whether the producer should wait (`room()`) before adding more: the buffer holds its
   * number of lines, or one more line of the longest kind would take it past its bytes. Never
   * when it is empty, so a bound smaller than one line still lets lines through one at a time.
   */
  get full(): boolean {
    // Once truncated nothing more is buffered: the agent's output is read on and dropped, never waited for.
    if (this.pending.length === 0 || this.truncated) return false;
    return this.pending.length >= this.maxBuffered || this.pendingBytes + MAX_LINE_BYTES > this.maxBufferedBytes;
  }

  /**
   * Adds one line and sends it as soon as the connection allows; past `maxOutputBytes`, drops
   * it (undefined) after the one line that says so.
   */
  add(stream: OutputStream, text: string): LogLine | undefined {
    const cap = this.options.maxOutputBytes;
    if (cap) {
      const bytes = outputCost(text);
      if (this.truncated) {
        this.truncated.lines++;
        this.truncated.bytes += bytes;
        return undefined;
      }
      if (this.outputBytes + bytes > cap) {
        this.truncated = { lines: 1, bytes };
        this.options.logger.warn({ dispatchId: this.options.dispatchId, maxOutputBytes: cap }, "run output passed its cap; the rest is dropped");
        return this.number("stderr", truncationNotice(cap));
      }
      this.outputBytes += bytes;
    }
    return this.number(stream, text);
  }

  private number(stream: OutputStream, text: string): LogLine {
    const line: LogLine = { seq: ++this.lastSeq, stream, text, time: (this.options.now ?? (() => new Date()))() };
    if (this.refused) return line;
    this.pending.push(line);
    this.pendingBytes += textBytes(text);
    this.pump();
    return line;
  }

  /** Resolves when the buffer has room again (or the shipper closed). */
  async room(): Promise<void> {
    while (this.full && !this.closed) await this.nextChange();
  }

  /**
   * Waits until every line is acked or `timeoutMs` passes, then closes the stream. Returns the
   * highest acked sequence.
   */
  async finish(timeoutMs: number): Promise<number> {
    const deadline = Date.now() + timeoutMs;
    this.pump();
    while (this.ackedSeq < this.lastSeq && Date.now() < deadline && !this.closed && !this.refused) {
      await Promise.race([this.nextChange(), new Promise((resolve) => setTimeout(resolve, Math.max(0, deadline - Date.now())).unref())]);
    }
    if (this.truncated) {
      this.options.logger.warn({ dispatchId: this.options.dispatchId, droppedLines: this.truncated.lines, droppedBytes: this.truncated.bytes }, "run output dropped past its cap");
    }
    if (this.ackedSeq < this.lastSeq && !this.refused) {
      this.options.logger.warn(
        { dispatchId: this.options.dispatchId, acked: this.ackedSeq, last: this.lastSeq },
        "log lines not acknowledged by telemetry in time",
      );
    }
    this.close();
    return this.ackedSeq;
  }

  /** Stops sending; unacked lines are dropped. */
  close(): void {
    this.closed = true;
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.ackTimer);
    this.generation++;
    const conn = this.conn;
    this.conn = undefined;
    conn?.close();
    this.notify();
  }

  private pump(): void {
    if (this.closed || this.refused || this.lastSeq === this.sentSeq) return;
    if (this.conn === undefined) {
      if (this.reconnectTimer === undefined) this.connect();
      return;
    }
    if (this.base !== "known") {
      // Nothing goes out before telemetry said where the run's output stands (continueStored).
      if (this.base === "unknown") {
        this.base = "probing";
        this.armAckTimer();
        this.conn.send([]);
      }
      return;
    }
    if (this.sentSeq > this.ackedSeq) return; // a batch is in flight; the rest accumulates
    const start = this.pending.findIndex((line) => line.seq > this.sentSeq);
    if (start < 0) return;
    const batch = takeBatch(this.pending, start, this.maxBatch, MAX_BATCH_CHARS);
    this.sentSeq = batch[batch.length - 1]!.seq;
    this.armAckTimer();
    this.conn.send(batch);
  }

  private connect(): void {
    const generation = ++this.generation;
    this.sentSeq = this.ackedSeq;
    this.conn = this.options.sink.open(
      { dispatchId: this.options.dispatchId, tenantId: this.options.tenantId, grant: this.options.grant },
      {
        onAck: (seq) => generation === this.generation && this.onAck(seq),
        onClose: (err) => generation === this.generation && this.onClose(err),
      },
    );
    this.pump();
  }

  private onAck(seq: number): void {
    if (this.base === "probing") {
      this.learnBase(seq);
      return;
    }
    // Telemetry cannot have stored what was never sent on any connection.
    const acked = Math.min(seq, this.sentSeq);
    if (acked <= this.ackedSeq) return;
    this.ackedSeq = acked;
    this.backoff.reset();
    let drop = 0;
    while (drop < this.pending.length && this.pending[drop]!.seq <= acked) this.pendingBytes -= textBytes(this.pending[drop++]!.text);
    this.pending.splice(0, drop);
    if (this.sentSeq > this.ackedSeq) this.armAckTimer();
    else clearTimeout(this.ackTimer);
    this.notify();
    this.pump();
  }

  /** The probe's answer: the lines taken so far are renumbered after what telemetry holds. */
  private learnBase(stored: number): void {
    clearTimeout(this.ackTimer);
    this.base = "known";
    for (const line of this.pending) line.seq += stored;
    this.lastSeq += stored;
    this.ackedSeq = this.sentSeq = stored;
    if (stored > 0) this.options.logger.info({ dispatchId: this.options.dispatchId, afterSeq: stored }, "telemetry already holds output of the run; these lines follow it");
    this.backoff.reset();
    this.pump();
  }

  private onClose(err: unknown): void {
    if (this.closed) return;
    // A probe without its answer is asked again on the next connection.
    if (this.base === "probing") this.base = "unknown";
    this.generation++;
    const conn = this.conn;
    this.conn = undefined;
    conn?.close();
    clearTimeout(this.ackTimer);
    this.sentSeq = this.ackedSeq;
    if (err instanceof LogRefusedError) {
      this.refused = true;
      this.options.logger.error(
        { dispatchId: this.options.dispatchId, err: err.message, dropped: this.lastSeq - this.ackedSeq },
        "telemetry refused the run's output; the rest of it is dropped",
      );
      this.pending = [];
      this.pendingBytes = 0;
      this.notify();
      return;
    }
    if (this.ackedSeq === this.lastSeq && err === undefined) return; // nothing to resend
    const delay = this.backoff.next();
    this.options.logger.warn(
      { dispatchId: this.options.dispatchId, err, delayMs: delay, unacked: this.lastSeq - this.ackedSeq },
      "log stream to telemetry broke; reconnecting",
    );
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      if (!this.closed && this.lastSeq > this.ackedSeq) this.connect();
    }, delay);
  }

  private armAckTimer(): void {
    clearTimeout(this.ackTimer);
    this.ackTimer = setTimeout(() => this.onClose(new Error(`no acknowledgement within ${this.ackTimeoutMs} ms`)), this.ackTimeoutMs);
  }

  private nextChange(): Promise<void> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  private notify(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const resolve of waiters) resolve();
  }
}

/**
 * What a line counts against `maxOutputBytes`: its UTF-8 bytes, plus what telemetry stores with
 * every line whatever its text (sequence, stream, time, run), so empty lines count too.
 */
export function outputCost(text: string): number {
  return Buffer.byteLength(text) + LINE_OVERHEAD_BYTES;
}
const LINE_OVERHEAD_BYTES = 64;

/** The line a run's output ends with once it passed its cap (shown to whoever follows the run). */
export function truncationNotice(maxOutputBytes: number): string {
  return `[outpost] output truncated: this run printed more than ${formatBytes(maxOutputBytes)} of output; the rest of it is not kept`;
}

function formatBytes(bytes: number): string {
  for (const [unit, size] of [["GiB", 1024 ** 3], ["MiB", 1024 ** 2], ["KiB", 1024]] as const) {
    if (bytes >= size && bytes % size === 0) return `${bytes / size} ${unit}`;
  }
  return `${bytes} bytes`;
}

/** Unacked output one run may hold by default (bytes as `textBytes` counts them). */
export const DEFAULT_MAX_BUFFERED_BYTES = 8 * 1024 * 1024;

/**
 * The memory a line's text may take: 2 bytes per UTF-16 unit, what V8 needs at most to hold a
 * string whatever its characters (Latin-1 text takes half of it; the margin also covers the
 * larger read a short line may keep alive as a slice of it).
 */
export function textBytes(text: string): number {
  return 2 * text.length;
}

/** `textBytes` of the longest line the line splitter emits. */
const MAX_LINE_BYTES = 2 * MAX_LINE_CHARS;

/**
 * Telemetry bounds a message (4 MiB) as well as a batch's count; lines are at most
 * MAX_LINE_CHARS (line-splitter.ts), so a batch of at most this many characters always fits.
 */
const MAX_BATCH_CHARS = 512 * 1024;

function takeBatch<T extends { text: string }>(pending: T[], start: number, maxCount: number, maxChars: number): T[] {
  let chars = 0;
  let end = start;
  while (end < pending.length && end - start < maxCount) {
    chars += pending[end]!.text.length;
    if (chars > maxChars && end > start) break;
    end++;
  }
  return pending.slice(start, end);
}
