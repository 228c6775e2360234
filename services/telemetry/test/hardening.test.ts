/**
 * Hostile clients and unlucky timing: odd resume points, retention under a live subscriber,
 * subscription bounds per tenant, oversized history pages, bad chunk times, writes after the
 * run's end. Core-level where the transport adds nothing, over a port where it does.
 */
import { create, toBinary } from "@bufbuild/protobuf";
import { TimestampSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { createLogger, errorInfoOf } from "@outpost/platform";
import { GetLogsResponseSchema } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { ulid } from "ulid";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadTelemetryConfig } from "../src/config.ts";
import { InProcessLiveFeed } from "../src/core/live-feed.ts";
import { LIMITS } from "../src/core/model.ts";
import { TelemetryCore, type SubscriptionBatch } from "../src/core/telemetry-core.ts";
import { startTelemetry, type RunningTelemetry } from "../src/service.ts";
import { SqliteTelemetryStore } from "../src/store/sqlite-store.ts";
import { batch, clientsFor, collect, drain, errorOf, fieldOf, ingest, range, runEnd, sleep, storedChunks } from "./helpers.ts";
import { signingEnv } from "../../../test/support/signing.ts";

const logger = createLogger("telemetry-hardening-test", "silent");


function setup(options: ConstructorParameters<typeof TelemetryCore>[2] = {}) {
  const store = new SqliteTelemetryStore(":memory:");
  const feed = new InProcessLiveFeed();
  return { store, feed, core: new TelemetryCore(store, feed, options) };
}


/** Rejects when `promise` has not settled within `ms`. */
function within<T>(promise: Promise<T>, ms: number): Promise<T> {
  return Promise.race([promise, sleep(ms).then(() => Promise.reject(new Error(`still pending after ${ms} ms`)))]);
}

const END = (lastSeq: number) => ({ state: 4, exitCode: 0, failureReason: "", lastSeq });

describe("SubscribeLogs resume points", () => {
  it("after_seq beyond what is stored on a live run: only later chunks, then the end", async () => {
    const { core } = setup();
    const id = ulid();
    await core.ingest(id, "t-a", storedChunks(id, range(1, 5)));
    const watching = drain(core.subscribe("t-a", id, 8, new AbortController().signal));
    await sleep(10);
    await core.ingest(id, "t-a", storedChunks(id, range(6, 9)));
    await core.ingest(id, "t-a", storedChunks(id, range(11, 12))); // 10 arrives after 11..12
    await sleep(5);
    await core.ingest(id, "t-a", storedChunks(id, [10]));
    await core.completeRun(id, "t-a", END(12));
    expect(await within(watching, 2000)).toEqual({ seqs: [9, 10, 11, 12], end: END(12) });
  });

  it("after_seq exactly the last seq, and far past it, end with run_end alone", async () => {
    const { core } = setup();
    const id = ulid();
    await core.ingest(id, "t-a", storedChunks(id, range(1, 5)));
    await core.completeRun(id, "t-a", END(5));
    for (const after of [5, 6, Number.MAX_SAFE_INTEGER]) {
      expect(await within(drain(core.subscribe("t-a", id, after, new AbortController().signal)), 2000)).toEqual({ seqs: [], end: END(5) });
    }
  });

  it("a run that ends during a long replay delivers everything once, then the end", async () => {
    const { core } = setup({ storagePageSize: 100 });
    const id = ulid();
    await core.ingest(id, "t-a", storedChunks(id, range(1, 1000)));
    const gen = core.subscribe("t-a", id, 0, new AbortController().signal);
    const first = (await gen.next()).value as SubscriptionBatch;
    await core.ingest(id, "t-a", storedChunks(id, range(1001, 1050)));
    await core.completeRun(id, "t-a", END(1050));
    const rest = await within(drain(gen, first.chunks.map((c) => c.seq)), 2000);
    expect(rest).toEqual({ seqs: range(1, 1050), end: END(1050) });
  });
});

describe("retention vs a live subscriber", () => {
  it("a subscription whose run is deleted while it waits ends NOT_FOUND instead of waiting forever", async () => {
    const { core, store } = setup({ idlePollMs: 30 });
    const id = ulid();
    await core.registerRun(id, "t-a", 60_000);
    await core.ingest(id, "t-a", storedChunks(id, range(1, 3)));
    const gen = core.subscribe("t-a", id, 0, new AbortController().signal);
    expect(((await gen.next()).value as SubscriptionBatch).chunks.map((c) => c.seq)).toEqual([1, 2, 3]);
    expect(await store.deleteExpired(Date.now() + 120_000, 200)).toBe(1);
    const err = ConnectError.from(await within(gen.next().then(() => new Error("expected NOT_FOUND"), (e: unknown) => e), 2000));
    expect([err.code, errorInfoOf(err)?.reason]).toEqual([Code.NotFound, "DISPATCH_NOT_FOUND"]);
  });
});

describe("subscriptions per tenant", () => {
  it("refuses RESOURCE_EXHAUSTED past the bound, per tenant, and frees a slot when one ends", async () => {
    const { core } = setup({ maxSubscriptionsPerTenant: 2 });
    const id = ulid();
    const other = ulid();
    await core.registerRun(id, "t-a");
    await core.registerRun(other, "t-b");
    const stops = [new AbortController(), new AbortController()];
    const open = stops.map((s) => drain(core.subscribe("t-a", id, 0, s.signal)));
    await sleep(10);
    const refused = ConnectError.from(await errorOf(() => drain(core.subscribe("t-a", id, 0, new AbortController().signal))));
    expect([refused.code, errorInfoOf(refused)?.metadata["quota"]]).toEqual([Code.ResourceExhausted, "log_subscriptions_per_tenant"]);
    // A missing run does not hold a slot either.
    expect((await errorOf(() => drain(core.subscribe("t-a", ulid(), 0, new AbortController().signal)))).code).toBe(Code.ResourceExhausted);
    // Another tenant is not affected.
    const otherStop = new AbortController();
    const b = drain(core.subscribe("t-b", other, 0, otherStop.signal));
    stops[0]!.abort();
    await open[0];
    const again = new AbortController();
    const c = drain(core.subscribe("t-a", id, 0, again.signal));
    await sleep(10);
    for (const s of [stops[1]!, otherStop, again]) s.abort();
    expect(await Promise.all([open[1], b, c])).toHaveLength(3);
    // Refused and failed subscriptions released their slots: two fit again.
    const refill = [new AbortController(), new AbortController()];
    const more = refill.map((s) => drain(core.subscribe("t-a", id, 0, s.signal)));
    await sleep(10);
    for (const s of refill) s.abort();
    await Promise.all(more);
  });
});

describe("over a port", () => {
  let service: RunningTelemetry;
  let c: ReturnType<typeof clientsFor>;
  beforeAll(async () => {
    const config = loadTelemetryConfig({ ...signingEnv("telemetry"), OUTPOST_TELEMETRY_PORT: "0", OUTPOST_DATA_DIR: ":memory:" });
    service = await startTelemetry(config, logger);
    c = clientsFor(service.url);
  });
  afterAll(async () => {
    await service.close();
  });

  it("GetLogs bounds a page by bytes as well as by page_size, and pages through every chunk", async () => {
    const id = ulid();
    const long = (seq: number) => `${seq} `.padEnd(60 * 1024, "x");
    for (let seq = 1; seq <= 100; seq += 25) {
      const b = batch(id, "t-a", range(seq, seq + 24));
      for (const chunk of b.chunks) chunk.text = long(Number(chunk.seq));
      await ingest(c.executor, [b]);
    }
    const seen: number[] = [];
    let token = "";
    let pages = 0;
    do {
      const page = await c.tenant("t-a").getLogs({ dispatchId: id, pageToken: token });
      // A grpc-js client refuses messages over 4 MiB by default; 100 lines of 60 KiB were 6 MB.
      expect(toBinary(GetLogsResponseSchema, page).length).toBeLessThanOrEqual(LIMITS.maxBytesPerMessage + 64 * 1024 + 1024);
      expect(page.chunks.length).toBeGreaterThan(0);
      for (const chunk of page.chunks) {
        seen.push(Number(chunk.seq));
        expect(chunk.text).toBe(long(Number(chunk.seq)));
      }
      token = page.nextPageToken;
      pages++;
    } while (token !== "");
    expect(seen).toEqual(range(1, 100));
    expect(pages).toBeGreaterThan(1);
  });

  it("an executor's old and reconnected streams sending overlapping batches out of order: one copy of 1..N, live", async () => {
    const id = ulid();
    const N = 600;
    await c.dispatcher.registerRun({ dispatchId: id, tenantId: "t-a" });
    const watching = collect(c.tenant("t-a").subscribeLogs({ dispatchId: id }));
    await sleep(20);
    // The old stream got 1..400 out in pieces before it "broke"; the new one resends from 201.
    const old = [range(1, 100), range(201, 300), range(101, 200), range(301, 400)].map((seqs) => batch(id, "t-a", seqs));
    const fresh = [range(201, 450), range(451, 600), range(300, 350)].map((seqs) => batch(id, "t-a", seqs));
    const [a, b] = await Promise.all([ingest(c.executor, old, 1), ingest(c.executor, fresh, 1)]);
    expect(Math.max(...a, ...b)).toBe(N);
    await c.dispatcher.completeRun({ dispatchId: id, tenantId: "t-a", runEnd: runEnd(N) });
    const got = await within(watching, 5000);
    expect(got.seqs).toEqual(range(1, N));
    expect(got.end?.lastSeq).toBe(BigInt(N));
  });

  it("GetLogs page tokens: tampered, foreign or another tenant's answer like any bad token or missing run", async () => {
    const id = ulid();
    await ingest(c.executor, [batch(id, "t-a", range(1, 30))]);
    const t = c.tenant("t-a");
    const token = (cursor: unknown) => Buffer.from(JSON.stringify(cursor)).toString("base64url");
    for (const bad of [{ d: id, a: -1 }, { d: id, a: 1.5 }, { d: id, a: 1e300 }, { d: id, a: "5" }, { d: id }, [id, 5], null, { d: ulid(), a: 5 }]) {
      const err = await errorOf(() => t.getLogs({ dispatchId: id, pageToken: token(bad) }));
      expect([err.code, fieldOf(err), errorInfoOf(err)?.reason], JSON.stringify(bad)).toEqual([Code.InvalidArgument, "page_token", "PAGE_TOKEN_INVALID"]);
    }
    // A cursor past the end (or past end_seq) is an empty last page, not an error.
    expect(await t.getLogs({ dispatchId: id, pageToken: token({ d: id, a: 1e12 }) })).toMatchObject({ chunks: [], nextPageToken: "" });
    expect(await t.getLogs({ dispatchId: id, endSeq: 10n, pageToken: token({ d: id, a: 20 }) })).toMatchObject({ chunks: [], nextPageToken: "" });
    // The owner's valid token does not open the run to another tenant.
    const first = await t.getLogs({ dispatchId: id, pageSize: 10 });
    const stolen = await errorOf(() => c.tenant("t-b").getLogs({ dispatchId: id, pageToken: first.nextPageToken }));
    const missingId = ulid();
    const missing = await errorOf(() => c.tenant("t-b").getLogs({ dispatchId: missingId }));
    expect([stolen.code, stolen.rawMessage.replace(id, "<id>")]).toEqual([missing.code, missing.rawMessage.replace(missingId, "<id>")]);
    const negative = await errorOf(() => t.getLogs({ dispatchId: id, pageSize: -1 }));
    expect([negative.code, fieldOf(negative)]).toEqual([Code.InvalidArgument, "page_size"]);
  });

  it("refuses a chunk time outside the Timestamp range, naming the field, and stores nothing", async () => {
    const id = ulid();
    const bad = [
      { seconds: 1n << 62n, nanos: 0 },
      { seconds: -(1n << 62n), nanos: 0 },
      { seconds: 1_700_000_000n, nanos: -1 },
      { seconds: 1_700_000_000n, nanos: 1_000_000_000 },
    ];
    for (const time of bad) {
      const b = batch(id, "t-a", [1, 2]);
      b.chunks[1]!.time = create(TimestampSchema, time);
      const err = await errorOf(() => ingest(c.executor, [b]));
      expect([err.code, fieldOf(err)], `${time.seconds}s ${time.nanos}ns`).toEqual([Code.InvalidArgument, "chunks[1].time"]);
    }
    expect((await errorOf(() => c.tenant("t-a").getLogs({ dispatchId: id }))).code).toBe(Code.NotFound);
  });

  it("after the run ended with last_seq, refuses chunks past it (FAILED_PRECONDITION RUN_ENDED) and still takes late ones within it", async () => {
    const id = ulid();
    await ingest(c.executor, [batch(id, "t-a", [1, 2])]);
    await c.dispatcher.completeRun({ dispatchId: id, tenantId: "t-a", runEnd: runEnd(4) });
    const past = await errorOf(() => ingest(c.executor, [batch(id, "t-a", [3, 4, 5])]));
    expect([past.code, errorInfoOf(past)?.reason]).toEqual([Code.FailedPrecondition, "RUN_ENDED"]);
    expect(await ingest(c.executor, [batch(id, "t-a", [3, 4])])).toEqual([4]);
    const history = await c.tenant("t-a").getLogs({ dispatchId: id });
    expect(history.chunks.map((ch) => Number(ch.seq))).toEqual([1, 2, 3, 4]);
    const streamed = await collect(c.tenant("t-a").subscribeLogs({ dispatchId: id }));
    expect(streamed.seqs).toEqual([1, 2, 3, 4]);
  });
});
