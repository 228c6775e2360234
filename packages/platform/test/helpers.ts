/** Shared by the platform tests: a tiny server with a fake LogService whose behaviour is chosen by dispatch_id. */
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type ConnectRouter, type HandlerContext } from "@connectrpc/connect";
import {
  callEndSignal,
  currentTrace,
  invalidArgument,
  notFound,
  startServer,
  type RunningServer,
  type ServerOptions,
} from "@outpost/platform";
import { LogChunkSchema } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";
import { GetLogsResponseSchema, LogService, SubscribeLogsResponseSchema } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { pino } from "pino";


export const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

export const silentLogger = pino({ level: "silent" });

/**
 * GetLogs by dispatch_id: "slow" answers after 300 ms, "boom" throws a plain Error, "invalid" throws
 * invalidArgument, "missing" throws notFound, "trace" answers the current trace id as next_page_token,
 * "wait" waits for the call's signal and records its reason in `callAborts` before failing with it,
 * "headers" sets a response header and trailer, "url" answers ctx.url as next_page_token,
 * "connection-header" fails with metadata HTTP/2 forbids (and one it allows); anything else
 * echoes the dispatch id as one chunk. SubscribeLogs sends one chunk, then waits on
 * callEndSignal and returns.
 */
/** Why each "wait" call's signal fired, in order. */
export const callAborts: unknown[] = [];

export function fakeLogRoutes(router: ConnectRouter): void {
  router.service(LogService, {
    async getLogs(req, ctx) {
      switch (req.dispatchId) {
        case "wait":
          if (!ctx.signal.aborted) await new Promise((resolve) => ctx.signal.addEventListener("abort", resolve, { once: true }));
          callAborts.push(ctx.signal.reason);
          throw ConnectError.from(ctx.signal.reason);
        case "url":
          return create(GetLogsResponseSchema, { nextPageToken: ctx.url });
        case "connection-header":
          throw new ConnectError("refused", Code.FailedPrecondition, { "transfer-encoding": "chunked", "x-kept": "yes" });
        case "headers":
          ctx.responseHeader.set("x-answer", "head");
          ctx.responseTrailer.set("x-answer-trailer", "tail");
          break;
        case "slow":
          await sleep(300);
          break;
        case "boom":
          throw new Error("database password is hunter2");
        case "invalid":
          throw invalidArgument("dispatch_id", "must be a ULID");
        case "missing":
          throw notFound("dispatch", "D1");
        case "trace":
          return create(GetLogsResponseSchema, { nextPageToken: currentTrace()?.traceId ?? "" });
      }
      return create(GetLogsResponseSchema, {
        chunks: [create(LogChunkSchema, { dispatchId: req.dispatchId, seq: 1n, text: req.dispatchId })],
      });
    },
    async *subscribeLogs(req, ctx: HandlerContext) {
      yield create(SubscribeLogsResponseSchema, { chunks: [create(LogChunkSchema, { dispatchId: req.dispatchId, seq: 1n, text: "first" })] });
      const signal = callEndSignal(ctx);
      if (!signal.aborted) await new Promise((resolve) => signal.addEventListener("abort", resolve, { once: true }));
    },
  });
}

export function startTestServer(
  options: Partial<
    Pick<ServerOptions, "signingKeys" | "tls" | "port" | "contextValues" | "readiness" | "readMaxBytes" | "shutdownGraceMs" | "firstBytesTimeoutMs" | "headersTimeoutMs" | "idleSessionTimeoutMs" | "httpHandler">
  > = {},
): Promise<RunningServer> {
  return startServer({ name: "test", host: "127.0.0.1", port: 0, logger: silentLogger, routes: fakeLogRoutes, ...options, signingKeys: options.signingKeys });
}
