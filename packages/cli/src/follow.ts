/**
 * Follows a run's output to the end. A dropped connection resumes from the last sequence
 * number received, so nothing is missed or repeated (SPEC L2).
 */
import { Code, ConnectError } from "@connectrpc/connect";
import type { Client } from "@connectrpc/connect";
import type { LogService } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { LogStream, type LogChunk, type RunEnd } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";

const RETRYABLE = new Set([Code.Unavailable, Code.Internal, Code.Unknown, Code.DeadlineExceeded, Code.Aborted]);
const MAX_RECONNECTS = 20;

/**
 * Subscribes until the run's end arrives. A subscription that fails retryably, or that ends
 * cleanly without the run's end (a draining server), is resumed from the last sequence number.
 * One that delivered new chunks before it failed or ended resumes at once, without sleeping, and
 * starts the count afresh; one that delivered nothing new counts as a failed attempt:
 * exponential backoff (200 ms … 2 s), and after MAX_RECONNECTS of them in a row the last error
 * (UNAVAILABLE for clean ends) is thrown — so a server that keeps failing or ending streams at
 * once is not hammered.
 */
export async function followLogs(
  logs: Client<typeof LogService>,
  dispatchId: string,
  onChunk: (chunk: LogChunk) => void,
  options: {
    afterSeq?: bigint;
    signal?: AbortSignal;
    onReconnect?: (afterSeq: bigint) => void;
    /** Before each backoff after an attempt that brought nothing new: why, and which attempt of how many. */
    onRetry?: (failure: ConnectError, attempt: number, max: number) => void;
  } = {},
): Promise<RunEnd> {
  let afterSeq = options.afterSeq ?? 0n;
  let failures = 0;
  for (;;) {
    const before = afterSeq;
    let failure: ConnectError | undefined;
    try {
      for await (const message of logs.subscribeLogs({ dispatchId, afterSeq }, { signal: options.signal })) {
        for (const chunk of message.chunks) {
          if (chunk.seq <= afterSeq) continue;
          afterSeq = chunk.seq;
          onChunk(chunk);
        }
        if (message.runEnd) return message.runEnd;
      }
    } catch (err) {
      failure = ConnectError.from(err);
      if (!RETRYABLE.has(failure.code) || options.signal?.aborted) throw failure;
    }
    if (afterSeq > before) {
      // New output arrived before the stream failed or ended without the run's end (a dropped
      // connection, a draining server): the server is making progress, so resume now.
      failures = 0;
      options.onReconnect?.(afterSeq);
      continue;
    }
    failure ??= new ConnectError("the log stream ended without new output or the run's end", Code.Unavailable);
    if (++failures > MAX_RECONNECTS) throw failure;
    options.onRetry?.(failure, failures, MAX_RECONNECTS);
    await sleep(Math.min(2000, 100 * 2 ** failures), options.signal);
    options.onReconnect?.(afterSeq);
  }
}

/** Waits, or rejects with the signal's reason as soon as it is aborted. */
function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(ConnectError.from(signal.reason));
    const onAbort = () => {
      clearTimeout(timer);
      reject(ConnectError.from(signal!.reason));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/**
 * Writes a line where the run wrote it: stdout or stderr. `timestamps`: first the time the
 * executor read it, RFC 3339 in UTC to the millisecond (as `docker logs -t` and `kubectl logs
 * --timestamps` put theirs), so lines can be lined up with other logs and events.
 */
export function writeChunk(
  chunk: LogChunk,
  out: NodeJS.WritableStream = process.stdout,
  err: NodeJS.WritableStream = process.stderr,
  options: { timestamps?: boolean } = {},
): void {
  const time = options.timestamps ? `${chunk.time ? timestampDate(chunk.time).toISOString() : "-".padEnd(24)} ` : "";
  (chunk.stream === LogStream.STDERR ? err : out).write(`${time}${chunk.text}\n`);
}
