/** Shared by the telemetry tests: clients signed as each caller, request builders, collectors. */
import { create } from "@bufbuild/protobuf";
import { ConnectError, type Client } from "@connectrpc/connect";
import { errorInfoOf, internalClient, type Identity } from "@outpost/platform";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import {
  IngestLogsRequestSchema,
  LogIngestService,
  type IngestLogsRequest,
} from "@outpost/proto/outpost/telemetry/v1/log_ingest_service_pb.js";
import { LogChunkSchema, LogStream, RunEndSchema } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";
import { LogService, type SubscribeLogsResponse } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { logGrantOf, signerFor } from "../../../test/support/signing.ts";
import type { StoredChunk } from "../src/core/model.ts";
import type { SubscriptionBatch } from "../src/core/telemetry-core.ts";


export function clientsFor(baseUrl: string) {
  const as = (identity: Identity) => ({ baseUrl, signingKeys: signerFor(identity), identity });
  return {
    executor: internalClient(LogIngestService, as({ kind: "service", principal: "executor/host-1" })),
    dispatcher: internalClient(LogIngestService, as({ kind: "service", principal: "dispatcher/1" })),
    tenant: (tenantId: string) => internalClient(LogService, as({ kind: "tenant", tenantId, principal: `key/${tenantId}` })),
    /** A tenant identity calling the internal service (must be refused). */
    tenantOnIngest: (tenantId: string) =>
      internalClient(LogIngestService, as({ kind: "tenant", tenantId, principal: `key/${tenantId}` })),
  };
}

export type IngestClient = Client<typeof LogIngestService>;
export type LogClient = Client<typeof LogService>;

/** A batch of `line <seq>` chunks, with a log grant for the run to executor/host-1 (`clientsFor().executor`). */
export function batch(dispatchId: string, tenantId: string, seqs: number[], stream = LogStream.STDOUT): IngestLogsRequest {
  return create(IngestLogsRequestSchema, {
    dispatchId,
    tenantId,
    grant: logGrantOf(dispatchId, tenantId),
    chunks: seqs.map((seq) => create(LogChunkSchema, { dispatchId, seq: BigInt(seq), stream, text: `line ${seq}` })),
  });
}

/** Stored chunks of `dispatchId` with these sequence numbers (text "line <seq>"), for the core. */
export function storedChunks(dispatchId: string, seqs: number[]): StoredChunk[] {
  return seqs.map((seq) => ({ dispatchId, seq, stream: 1, text: `line ${seq}`, timeMs: seq }));
}

/** Reads a core subscription to its end: the sequence numbers it delivered (into `seqs`) and its end. */
export async function drain(gen: AsyncGenerator<SubscriptionBatch>, seqs: number[] = []) {
  let end: SubscriptionBatch["end"];
  for await (const b of gen) {
    seqs.push(...b.chunks.map((c) => c.seq));
    end = b.end;
  }
  return { seqs, end };
}

export const range = (from: number, to: number) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

export const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Sends batches on one IngestLogs stream, one at a time, answering the acked seq of each. */
export async function ingest(client: IngestClient, batches: IngestLogsRequest[], pauseMs = 0): Promise<number[]> {
  async function* requests() {
    for (const b of batches) {
      yield b;
      if (pauseMs > 0) await sleep(pauseMs);
    }
  }
  const acked: number[] = [];
  for await (const res of client.ingestLogs(requests())) acked.push(Number(res.ackedSeq));
  return acked;
}

/** A RunEnd; pass `null` as exitCode for a run that has none. */
export function runEnd(lastSeq: number, state = Dispatch_State.SUCCEEDED, exitCode: number | null = 0) {
  return create(RunEndSchema, { state, exitCode: exitCode ?? undefined, lastSeq: BigInt(lastSeq), failureReason: "" });
}

export interface Collected {
  seqs: number[];
  messages: number;
  end: SubscribeLogsResponse["runEnd"];
}

/** Reads a subscription to its end. */
export async function collect(stream: AsyncIterable<SubscribeLogsResponse>): Promise<Collected> {
  const out: Collected = { seqs: [], messages: 0, end: undefined };
  for await (const res of stream) {
    out.messages++;
    if (out.end) throw new Error("message after run_end");
    for (const chunk of res.chunks) out.seqs.push(Number(chunk.seq));
    out.end = res.runEnd;
  }
  return out;
}

/** The ConnectError a call raised. */
export async function errorOf(call: () => Promise<unknown>): Promise<ConnectError> {
  try {
    await call();
  } catch (err) {
    return ConnectError.from(err);
  }
  throw new Error("expected the call to fail");
}

export function fieldOf(err: ConnectError): string | undefined {
  return errorInfoOf(err)?.metadata["field"];
}
