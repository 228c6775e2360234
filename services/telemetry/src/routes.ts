/**
 * Thin handlers: check the caller, validate and map the request, call the core, map the
 * result. Field names in errors are the proto field paths a client sent.
 */
import { create } from "@bufbuild/protobuf";
import { durationMs, timestampFromMs, timestampMs, type Duration, type Timestamp } from "@bufbuild/protobuf/wkt";
import type { ConnectRouter, HandlerContext } from "@connectrpc/connect";
import {
  callEndSignal,
  throwIfCallAborted,
  checkLength,
  checkLogGrant,
  logGrantExpired,
  decodePageToken,
  encodePageToken,
  invalidArgument,
  pageSizeOf,
  requireEnum,
  requireNonEmpty,
  requireService,
  requireTenant,
  requireUlid,
  untilSignal,
  type SigningKeys,
} from "@outpost/platform";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import {
  CompleteRunResponseSchema,
  IngestLogsResponseSchema,
  LogIngestService,
  RegisterRunResponseSchema,
  type IngestLogsRequest,
} from "@outpost/proto/outpost/telemetry/v1/log_ingest_service_pb.js";
import { LogChunkSchema, LogStream, RunEndSchema, type RunEnd } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";
import { GetLogsResponseSchema, LogService, SubscribeLogsResponseSchema } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { LIMITS, type RunEndRecord, type StoredChunk } from "./core/model.ts";
import type { TelemetryCore } from "./core/telemetry-core.ts";

const TERMINAL_STATES = new Set<number>([Dispatch_State.SUCCEEDED, Dispatch_State.FAILED, Dispatch_State.TIMED_OUT, Dispatch_State.CANCELLED]);

/** An int64 sequence field as a number: at least `min`, and exact in a double. */
function seqOf(field: string, value: bigint, min: number): number {
  if (value < BigInt(min)) throw invalidArgument(field, `must be at least ${min}`, "FIELD_OUT_OF_RANGE");
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw invalidArgument(field, "is too large", "FIELD_OUT_OF_RANGE");
  return Number(value);
}

/** google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z. */
const MIN_TIMESTAMP_SECONDS = -62_135_596_800n;
const MAX_TIMESTAMP_SECONDS = 253_402_300_799n;

/**
 * A chunk's time in epoch ms, or `nowMs` when unset. Outside the Timestamp range it is refused:
 * such a value does not fit the store's integer column, and the failure was an INTERNAL, which the
 * executor retries as transient until it gives the run up.
 */
function chunkTimeMs(field: string, time: Timestamp | undefined, nowMs: number): number {
  if (!time) return nowMs;
  if (time.seconds < MIN_TIMESTAMP_SECONDS || time.seconds > MAX_TIMESTAMP_SECONDS || time.nanos < 0 || time.nanos > 999_999_999) {
    throw invalidArgument(field, "must be a valid timestamp (years 1 to 9999, nanos 0 to 999,999,999)", "FIELD_OUT_OF_RANGE");
  }
  return timestampMs(time);
}

function tenantIdOf(value: string): string {
  return requireNonEmpty("tenant_id", value, LIMITS.maxTenantIdLength);
}

function validateIngest(req: IngestLogsRequest, nowMs: number): { dispatchId: string; tenantId: string; chunks: StoredChunk[] } {
  const dispatchId = requireUlid("dispatch_id", req.dispatchId);
  const tenantId = tenantIdOf(req.tenantId);
  if (req.chunks.length > LIMITS.maxChunksPerBatch) {
    throw invalidArgument("chunks", `must hold at most ${LIMITS.maxChunksPerBatch} chunks per batch`, "BATCH_TOO_LARGE");
  }
  const chunks = req.chunks.map((chunk, i): StoredChunk => {
    const at = `chunks[${i}]`;
    if (chunk.dispatchId !== "" && chunk.dispatchId !== dispatchId) {
      throw invalidArgument(`${at}.dispatch_id`, "must be empty or equal the batch's dispatch_id");
    }
    const seq = seqOf(`${at}.seq`, chunk.seq, 1);
    const stream = requireEnum(`${at}.stream`, chunk.stream, LogStream);
    if (Buffer.byteLength(chunk.text) > LIMITS.maxChunkTextBytes) {
      throw invalidArgument(`${at}.text`, `must be at most ${LIMITS.maxChunkTextBytes} bytes`, "FIELD_TOO_LONG");
    }
    return { dispatchId, seq, stream, text: chunk.text, timeMs: chunkTimeMs(`${at}.time`, chunk.time, nowMs) };
  });
  return { dispatchId, tenantId, chunks };
}

/** RegisterRun's retention: unset means the default; otherwise between one minute and LIMITS.maxRetentionMs. */
function retentionOf(value: Duration | undefined): number | undefined {
  if (!value) return undefined;
  if (value.nanos < 0 || value.nanos > 999_999_999 || value.seconds < 0n) {
    throw invalidArgument("retention", "must be a positive duration", "FIELD_OUT_OF_RANGE");
  }
  const ms = Number(durationMs(value));
  if (!Number.isFinite(ms) || ms < 60_000 || ms > LIMITS.maxRetentionMs) {
    throw invalidArgument("retention", `must be between 1 minute and ${LIMITS.maxRetentionMs / 86_400_000} days`, "FIELD_OUT_OF_RANGE");
  }
  return ms;
}

function validateRunEnd(end: RunEnd | undefined): RunEndRecord {
  if (!end) throw invalidArgument("run_end", "is required", "FIELD_REQUIRED");
  const state = requireEnum("run_end.state", end.state, Dispatch_State);
  if (!TERMINAL_STATES.has(state)) {
    throw invalidArgument("run_end.state", "must be a terminal state (SUCCEEDED, FAILED, TIMED_OUT or CANCELLED)", "FIELD_OUT_OF_RANGE");
  }
  return {
    state,
    exitCode: end.exitCode,
    failureReason: checkLength("run_end.failure_reason", end.failureReason, LIMITS.maxFailureReasonLength),
    lastSeq: seqOf("run_end.last_seq", end.lastSeq, 0),
  };
}

function chunkMessage(chunk: StoredChunk) {
  return create(LogChunkSchema, {
    dispatchId: chunk.dispatchId,
    seq: BigInt(chunk.seq),
    stream: chunk.stream,
    text: chunk.text,
    time: timestampFromMs(chunk.timeMs),
  });
}

function runEndMessage(end: RunEndRecord) {
  return create(RunEndSchema, {
    state: end.state,
    exitCode: end.exitCode,
    failureReason: end.failureReason,
    lastSeq: BigInt(end.lastSeq),
  });
}

/** `signingKeys` checks the dispatcher's log grants. */
export function telemetryRoutes(core: TelemetryCore, signingKeys: SigningKeys) {
  return (router: ConnectRouter) => {
    router.service(LogIngestService, {
      async *ingestLogs(requests: AsyncIterable<IngestLogsRequest>, ctx: HandlerContext) {
        const executor = requireService(ctx, "executor");
        // Only the executor the run was leased to writes its output, while it holds the lease
        // (run-grants.ts). A stream carries one run: its grant is verified when it first comes
        // and when the executor sends a renewed one, and refused once it has expired.
        let granted: { key: string; expiresAt: number } | undefined;
        for await (const req of untilSignal(requests, callEndSignal(ctx))) {
          const now = Date.now();
          const batch = validateIngest(req, now);
          const grantKey = `${batch.dispatchId}\n${batch.tenantId}\n${req.grant}`;
          if (grantKey !== granted?.key) {
            const { expiresAt } = checkLogGrant(signingKeys, req.grant, { dispatchId: batch.dispatchId, tenantId: batch.tenantId, executor: executor.principal }, now);
            granted = { key: grantKey, expiresAt };
          } else if (granted.expiresAt < now) {
            throw logGrantExpired();
          }
          const acked = await core.ingest(batch.dispatchId, batch.tenantId, batch.chunks);
          yield create(IngestLogsResponseSchema, { dispatchId: batch.dispatchId, ackedSeq: BigInt(acked) });
        }
        throwIfCallAborted(ctx);
      },
      async registerRun(req, ctx) {
        requireService(ctx, "dispatcher");
        await core.registerRun(requireUlid("dispatch_id", req.dispatchId), tenantIdOf(req.tenantId), retentionOf(req.retention));
        return create(RegisterRunResponseSchema);
      },
      async completeRun(req, ctx) {
        requireService(ctx, "dispatcher");
        const dispatchId = requireUlid("dispatch_id", req.dispatchId);
        const tenantId = tenantIdOf(req.tenantId);
        await core.completeRun(dispatchId, tenantId, validateRunEnd(req.runEnd));
        return create(CompleteRunResponseSchema);
      },
    });

    router.service(LogService, {
      async *subscribeLogs(req, ctx) {
        const { tenantId } = requireTenant(ctx);
        const dispatchId = requireUlid("dispatch_id", req.dispatchId);
        const afterSeq = seqOf("after_seq", req.afterSeq, 0);
        for await (const batch of core.subscribe(tenantId, dispatchId, afterSeq, callEndSignal(ctx))) {
          yield create(SubscribeLogsResponseSchema, {
            chunks: batch.chunks.map(chunkMessage),
            runEnd: batch.end ? runEndMessage(batch.end) : undefined,
            resumedFromStorage: batch.resumedFromStorage ?? false,
            droppedLiveChunks: BigInt(batch.droppedLiveChunks ?? 0),
          });
        }
        throwIfCallAborted(ctx);
      },
      async getLogs(req, ctx) {
        const { tenantId } = requireTenant(ctx);
        const dispatchId = requireUlid("dispatch_id", req.dispatchId);
        let afterSeq = seqOf("after_seq", req.afterSeq, 0);
        const pageSize = pageSizeOf("page_size", req.pageSize, 100, 1000);
        const endSeq = req.endSeq === 0n ? undefined : seqOf("end_seq", req.endSeq, 1);
        if (endSeq !== undefined && endSeq <= afterSeq) throw invalidArgument("end_seq", "must be greater than after_seq", "FIELD_OUT_OF_RANGE");
        const cursor = decodePageToken<{ d: string; a: number }>(req.pageToken, { d: "string", a: "number" });
        if (cursor) {
          if (cursor.d !== dispatchId || !Number.isSafeInteger(cursor.a) || cursor.a < 0) {
            throw invalidArgument("page_token", "does not belong to this dispatch_id", "PAGE_TOKEN_INVALID");
          }
          afterSeq = Math.max(afterSeq, cursor.a);
        }
        const page = await core.getLogs(tenantId, dispatchId, afterSeq, pageSize, endSeq);
        return create(GetLogsResponseSchema, {
          chunks: page.chunks.map(chunkMessage),
          nextPageToken: page.nextAfterSeq === undefined ? "" : encodePageToken({ d: dispatchId, a: page.nextAfterSeq }),
        });
      },
    });
  };
}
