/**
 * A subscriber that stops reading (SPEC L2) over a real loopback port: HTTP/2 flow control
 * stops its stream, its bounded live buffer overflows and is dropped, ingest and a second
 * subscriber carry on, and when it reads again it is told it fell behind and gets every chunk
 * from storage, in order, exactly once.
 *
 * The slow subscriber is a raw node:http2 gRPC call: the Connect client reads responses ahead
 * into its own memory even when the caller does not iterate, so with it the server would never
 * see a slow reader. A raw stream that is not read stops at HTTP/2 flow control, like a slow
 * network or a stalled process.
 */
import http2 from "node:http2";
import { createLogger } from "@outpost/platform";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { SubscribeLogsRequestSchema, SubscribeLogsResponseSchema, type SubscribeLogsResponse } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { IngestLogsRequestSchema } from "@outpost/proto/outpost/telemetry/v1/log_ingest_service_pb.js";
import { LogService } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { LogChunkSchema, LogStream } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";
import { ulid } from "ulid";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadTelemetryConfig } from "../src/config.ts";
import { startTelemetry, type RunningTelemetry } from "../src/service.ts";
import { clientsFor, collect, ingest, range, runEnd, sleep } from "./helpers.ts";
import { logGrantOf, signAs, signingEnv } from "../../../test/support/signing.ts";

const TOTAL = 3000;
const PAD = "x".repeat(1000); // ~3 MB in all: far more than HTTP/2 flow-control windows hold

describe("a subscriber that stops reading", () => {
  let service: RunningTelemetry;
  beforeAll(async () => {
    const config = loadTelemetryConfig({
      ...signingEnv("telemetry"),
      OUTPOST_TELEMETRY_PORT: "0",
      OUTPOST_DATA_DIR: ":memory:",
      OUTPOST_TELEMETRY_SUBSCRIBER_BUFFER: "100",
    });
    service = await startTelemetry(config, createLogger("telemetry-test", "silent"));
  });
  afterAll(async () => {
    await service.close();
  });

  it("does not slow ingest or another subscriber, is told it fell behind, and misses nothing", async () => {
    const id = ulid();
    const tenant = "t-slow";
    // Separate clients: separate HTTP/2 connections, so only the slow one's stream stalls.
    const writer = clientsFor(service.url);
    await writer.dispatcher.registerRun({ dispatchId: id, tenantId: tenant });
    const slow = rawSubscription(service.url, tenant, id);
    const fast = collect(clientsFor(service.url).tenant(tenant).subscribeLogs({ dispatchId: id }));

    const batches = [];
    for (let from = 1; from <= TOTAL; from += 100) {
      const seqs = range(from, Math.min(TOTAL, from + 99));
      batches.push(
        create(IngestLogsRequestSchema, {
          dispatchId: id,
          tenantId: tenant,
          grant: logGrantOf(id, tenant),
          chunks: seqs.map((seq) => create(LogChunkSchema, { seq: BigInt(seq), stream: LogStream.STDOUT, text: `${seq} ${PAD}` })),
        }),
      );
    }
    // The slow subscriber reads the first message, then nothing while the rest is ingested.
    await ingest(writer.executor, batches.slice(0, 1));
    const first = await slow.next();
    expect(first.chunks.length).toBeGreaterThan(0);
    const seqs: number[] = first.chunks.map((c) => Number(c.seq));
    const acked = await ingest(writer.executor, batches.slice(1));
    expect(acked.at(-1)).toBe(TOTAL);
    await writer.dispatcher.completeRun({ dispatchId: id, tenantId: tenant, runEnd: runEnd(TOTAL) });

    // The other subscriber got everything while the slow one was stalled.
    const fastResult = await fast;
    expect(fastResult.seqs).toEqual(range(1, TOTAL));

    await sleep(100);
    let told = false;
    let dropped = 0n;
    for (;;) {
      const next = await slow.next();
      for (const chunk of next.chunks) seqs.push(Number(chunk.seq));
      if (next.resumedFromStorage) {
        told = true;
        dropped = next.droppedLiveChunks;
      }
      if (next.runEnd) break;
    }
    slow.close();
    expect(seqs).toEqual(range(1, TOTAL));
    expect(told).toBe(true);
    expect(dropped).toBeGreaterThan(0n);
  });
});

/** A SubscribeLogs call over raw HTTP/2 that reads one gRPC message only when asked. */
function rawSubscription(baseUrl: string, tenantId: string, dispatchId: string) {
  const session = http2.connect(baseUrl);
  const headers = new Headers();
  signAs(headers, { kind: "tenant", tenantId, principal: `key/${tenantId}` }, LogService);
  const stream = session.request({
    ":method": "POST",
    ":path": "/outpost.telemetry.v1.LogService/SubscribeLogs",
    "content-type": "application/grpc+proto",
    te: "trailers",
    ...Object.fromEntries(headers),
  });
  const body = toBinary(SubscribeLogsRequestSchema, create(SubscribeLogsRequestSchema, { dispatchId }));
  const frame = Buffer.alloc(5 + body.length);
  frame.writeUInt32BE(body.length, 1);
  Buffer.from(body).copy(frame, 5);
  stream.end(frame);
  const chunks = stream[Symbol.asyncIterator]() as AsyncIterator<Buffer>;
  let buffered = Buffer.alloc(0);
  return {
    async next(): Promise<SubscribeLogsResponse> {
      for (;;) {
        if (buffered.length >= 5) {
          const length = buffered.readUInt32BE(1);
          if (buffered.length >= 5 + length) {
            const message = fromBinary(SubscribeLogsResponseSchema, buffered.subarray(5, 5 + length));
            buffered = buffered.subarray(5 + length);
            return message;
          }
        }
        const next = await chunks.next();
        if (next.done) throw new Error("stream ended before the run's end");
        buffered = Buffer.concat([buffered, next.value]);
      }
    },
    close() {
      session.destroy();
    },
  };
}
