/**
 * Follows a run's output to the end. A dropped connection resumes from the last sequence
 * number received, so nothing is missed or repeated (SPEC L2).
 */
import { Code, ConnectError } from "@connectrpc/connect";
import type { Client } from "@connectrpc/connect";
import type { LogService } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { LogStream, type LogChunk, type RunEnd } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";

const RETRYABLE = new Set([Code.Unavailable, Code.Internal, Code.Unknown, Code.DeadlineExceeded, Code.Aborted]);
const MAX_RECONNECTS = 20;

export async function followLogs(
  logs: Client<typeof LogService>,
  dispatchId: string,
  onChunk: (chunk: LogChunk) => void,
  options: { afterSeq?: bigint; signal?: AbortSignal; onReconnect?: (afterSeq: bigint) => void } = {},
): Promise<RunEnd> {
  let afterSeq = options.afterSeq ?? 0n;
  let failures = 0;
  for (;;) {
    try {
      for await (const message of logs.subscribeLogs({ dispatchId, afterSeq }, { signal: options.signal })) {
        for (const chunk of message.chunks) {
          if (chunk.seq <= afterSeq) continue;
          afterSeq = chunk.seq;
          onChunk(chunk);
        }
        failures = 0;
        if (message.runEnd) return message.runEnd;
      }
      // The stream ended without the run's end (server draining): resume.
    } catch (err) {
      const connectError = ConnectError.from(err);
      if (!RETRYABLE.has(connectError.code) || options.signal?.aborted || ++failures > MAX_RECONNECTS) throw connectError;
      await new Promise((resolve) => setTimeout(resolve, Math.min(2000, 100 * 2 ** failures)));
    }
    options.onReconnect?.(afterSeq);
  }
}

export function writeChunk(chunk: LogChunk, out: NodeJS.WritableStream = process.stdout, err: NodeJS.WritableStream = process.stderr): void {
  (chunk.stream === LogStream.STDERR ? err : out).write(`${chunk.text}\n`);
}
