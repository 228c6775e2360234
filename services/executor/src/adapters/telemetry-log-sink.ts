/**
 * LogSink over telemetry's bidirectional `LogIngestService.IngestLogs`: one stream per run,
 * each batch a request, each response an acknowledgement of the highest stored sequence.
 */
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type Client } from "@connectrpc/connect";
import { internalClient, type SigningKeys, type TlsFiles } from "@outpost/platform";
import {
  IngestLogsRequestSchema,
  LogIngestService,
  type IngestLogsRequest,
} from "@outpost/proto/outpost/telemetry/v1/log_ingest_service_pb.js";
import { LogStream } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";
import { LogRefusedError, type LogConnection, type LogConnectionHandlers, type LogLine, type LogSink } from "../core/ports.ts";
import { PushQueue } from "./push-queue.ts";

export interface TelemetryLogSinkOptions {
  telemetryUrl: string;
  signingKeys: SigningKeys;
  /** Internal TLS for an https:// URL (internalTlsOf). */
  tls?: TlsFiles | undefined;
  executorId: string;
}

export function createTelemetryLogSink(options: TelemetryLogSinkOptions): LogSink {
  const client: Client<typeof LogIngestService> = internalClient(LogIngestService, {
    baseUrl: options.telemetryUrl,
    signingKeys: options.signingKeys,
    tls: options.tls,
    identity: { kind: "service", principal: `executor/${options.executorId}` },
  });
  return {
    open(run, handlers: LogConnectionHandlers): LogConnection {
      const requests = new PushQueue<IngestLogsRequest>();
      const abort = new AbortController();
      let closed = false;
      void (async () => {
        try {
          for await (const res of client.ingestLogs(requests, { signal: abort.signal })) {
            if (!closed) handlers.onAck(Number(res.ackedSeq));
          }
          if (!closed) handlers.onClose();
        } catch (err) {
          if (!closed) handlers.onClose(refusalOf(err));
        }
      })();
      return {
        send(lines: LogLine[]) {
          requests.push(
            create(IngestLogsRequestSchema, {
              dispatchId: run.dispatchId,
              tenantId: run.tenantId,
              grant: run.grant(),
              chunks: lines.map((line) => ({
                dispatchId: run.dispatchId,
                seq: BigInt(line.seq),
                stream: line.stream === "stderr" ? LogStream.STDERR : LogStream.STDOUT,
                text: line.text,
                time: timestampFromDate(line.time),
              })),
            }),
          );
        },
        close() {
          if (closed) return;
          closed = true;
          requests.end();
          // Give the server a moment to finish the stream cleanly, then cut it.
          setTimeout(() => abort.abort(), 1000).unref();
        },
      };
    },
  };
}

/**
 * Telemetry's answers that sending again cannot change (run-grants.ts): the grant refused
 * (PERMISSION_DENIED), the request invalid (INVALID_ARGUMENT), or the run already ended before
 * these lines (FAILED_PRECONDITION RUN_ENDED: a stale executor's output).
 */
export function refusalOf(err: unknown): unknown {
  const code = ConnectError.from(err).code;
  return code === Code.PermissionDenied || code === Code.InvalidArgument || code === Code.FailedPrecondition ? new LogRefusedError(ConnectError.from(err).message) : err;
}
