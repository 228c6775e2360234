/**
 * The telemetry methods in-process over a real loopback port (port 0), called with the
 * platform's internal clients signed as executor, dispatcher and tenants.
 */
import { Code } from "@connectrpc/connect";
import { createLogger, errorInfoOf, issueLogGrant, LOG_GRANT_GRACE_MS } from "@outpost/platform";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { LogStream } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";
import { ulid } from "ulid";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadTelemetryConfig } from "../src/config.ts";
import { startTelemetry, type RunningTelemetry } from "../src/service.ts";
import { batch, clientsFor, collect, errorOf, fieldOf, ingest, range, runEnd, sleep } from "./helpers.ts";
import { grantOf, keysOf, logGrantOf, signingEnv } from "../../../test/support/signing.ts";

const logger = createLogger("telemetry-test", "silent");

async function start(extra: Record<string, string> = {}) {
  const config = loadTelemetryConfig({
    ...signingEnv("telemetry"),
    OUTPOST_TELEMETRY_PORT: "0",
    OUTPOST_DATA_DIR: ":memory:",
    ...extra,
  });
  const service = await startTelemetry(config, logger);
  return { service, ...clientsFor(service.url) };
}

describe("telemetry service", () => {
  let service: RunningTelemetry;
  let c: ReturnType<typeof clientsFor>;
  beforeAll(async () => {
    const started = await start({ OUTPOST_TELEMETRY_END_GRACE_MS: "300" });
    service = started.service;
    c = started;
  });
  afterAll(async () => {
    await service.close();
  });

  it("acknowledges the highest contiguous seq, ignores resends, and answers a batch with no chunks with it (where a retry continues)", async () => {
    const id = ulid();
    const acked = await ingest(c.executor, [batch(id, "t-a", [1, 2, 3]), batch(id, "t-a", [5]), batch(id, "t-a", [2, 3, 4]), batch(id, "t-a", [])]);
    expect(acked).toEqual([3, 3, 5, 5]);
    const logs = await c.tenant("t-a").getLogs({ dispatchId: id });
    expect(logs.chunks.map((ch) => [Number(ch.seq), ch.text, ch.stream, ch.dispatchId])).toEqual(
      range(1, 5).map((s) => [s, `line ${s}`, LogStream.STDOUT, id]),
    );
    expect(logs.chunks[0]!.time).toBeDefined();
    expect(logs.nextPageToken).toBe("");
  });

  it("replays a finished run in batches and ends with run_end", async () => {
    const id = ulid();
    await c.dispatcher.registerRun({ dispatchId: id, tenantId: "t-a" });
    await c.dispatcher.registerRun({ dispatchId: id, tenantId: "t-a" }); // idempotent
    await ingest(c.executor, [batch(id, "t-a", range(1, 700))]);
    await c.dispatcher.completeRun({ dispatchId: id, tenantId: "t-a", runEnd: runEnd(700, Dispatch_State.FAILED, 3) });
    await c.dispatcher.completeRun({ dispatchId: id, tenantId: "t-a", runEnd: runEnd(700, Dispatch_State.FAILED, 3) });

    const all = await collect(c.tenant("t-a").subscribeLogs({ dispatchId: id }));
    expect(all.seqs).toEqual(range(1, 700));
    expect(all.messages).toBeLessThanOrEqual(3); // batched, not one message per chunk
    expect(all.end).toMatchObject({ state: Dispatch_State.FAILED, exitCode: 3, lastSeq: 700n });

    const tail = await collect(c.tenant("t-a").subscribeLogs({ dispatchId: id, afterSeq: 650n }));
    expect(tail.seqs).toEqual(range(651, 700));
    const none = await collect(c.tenant("t-a").subscribeLogs({ dispatchId: id, afterSeq: 700n }));
    expect(none).toMatchObject({ seqs: [], messages: 1 });
    expect(none.end?.lastSeq).toBe(700n);
  });

  it("a run registered before any output can be watched at once, and its end wakes the watcher", async () => {
    const id = ulid();
    await c.dispatcher.registerRun({ dispatchId: id, tenantId: "t-a" });
    const watching = collect(c.tenant("t-a").subscribeLogs({ dispatchId: id }));
    await sleep(50);
    await ingest(c.executor, [batch(id, "t-a", [1, 2])]);
    await sleep(20);
    await c.dispatcher.completeRun({ dispatchId: id, tenantId: "t-a", runEnd: runEnd(0, Dispatch_State.CANCELLED, null) });
    const got = await watching;
    expect(got.seqs).toEqual([1, 2]);
    expect(got.end).toMatchObject({ state: Dispatch_State.CANCELLED, lastSeq: 0n });
    expect(got.end?.exitCode).toBeUndefined();
  });

  it("seam: a subscriber joining mid-run receives exactly 1..N in order, then run_end", async () => {
    const id = ulid();
    const N = 3000;
    const batches = [];
    for (let seq = 1; seq <= N; ) {
      const size = 1 + Math.floor(Math.random() * 25);
      batches.push(batch(id, "t-a", range(seq, Math.min(N, seq + size - 1))));
      seq += size;
    }
    const half = Math.floor(batches.length / 2);
    await ingest(c.executor, batches.slice(0, half));
    const writer = (async () => {
      await ingest(c.executor, batches.slice(half), 1);
      await c.dispatcher.completeRun({ dispatchId: id, tenantId: "t-a", runEnd: runEnd(N) });
    })();
    const early = collect(c.tenant("t-a").subscribeLogs({ dispatchId: id, afterSeq: 0n }));
    await sleep(30);
    const late = collect(c.tenant("t-a").subscribeLogs({ dispatchId: id, afterSeq: 0n }));
    const [a, b] = await Promise.all([early, late, writer]);
    for (const got of [a, b]) {
      expect(got.seqs).toEqual(range(1, N));
      expect(got.end?.lastSeq).toBe(BigInt(N));
    }
  });

  it("resume: a subscriber that leaves at random points and resumes from its last seq misses nothing", async () => {
    const id = ulid();
    const N = 2000;
    const writer = (async () => {
      for (let seq = 1; seq <= N; seq += 20) {
        await ingest(c.executor, [batch(id, "t-a", range(seq, Math.min(N, seq + 19)))]);
        await sleep(2);
      }
      await c.dispatcher.completeRun({ dispatchId: id, tenantId: "t-a", runEnd: runEnd(N) });
    })();
    await sleep(20);
    const seen: number[] = [];
    let ended = false;
    let reconnects = 0;
    while (!ended) {
      const stop = new AbortController();
      const budget = 1 + Math.floor(Math.random() * 6);
      let messages = 0;
      try {
        for await (const res of c.tenant("t-a").subscribeLogs({ dispatchId: id, afterSeq: BigInt(seen.at(-1) ?? 0) }, { signal: stop.signal })) {
          for (const chunk of res.chunks) seen.push(Number(chunk.seq));
          if (res.runEnd) ended = true;
          if (++messages >= budget && !ended) {
            stop.abort();
            break;
          }
        }
      } catch (err) {
        if (!stop.signal.aborted) throw err;
      }
      reconnects++;
    }
    await writer;
    expect(reconnects).toBeGreaterThan(3);
    expect(seen).toEqual(range(1, N));
  });

  it("fills a gap in what arrives from storage, and after the end grace delivers what is stored", async () => {
    const id = ulid();
    await ingest(c.executor, [batch(id, "t-a", [1, 2, 3])]);
    const watching = collect(c.tenant("t-a").subscribeLogs({ dispatchId: id }));
    await sleep(30);
    await ingest(c.executor, [batch(id, "t-a", [5])]);
    await ingest(c.executor, [batch(id, "t-a", [4])]);
    await ingest(c.executor, [batch(id, "t-a", [7])]); // 6 never comes
    await c.dispatcher.completeRun({ dispatchId: id, tenantId: "t-a", runEnd: runEnd(8) });
    const started = Date.now();
    const got = await watching;
    expect(got.seqs).toEqual([1, 2, 3, 4, 5, 7]);
    expect(got.end?.lastSeq).toBe(8n);
    expect(Date.now() - started).toBeGreaterThanOrEqual(250); // waited for the grace
  });

  it("isolation: another tenant's run answers NOT_FOUND exactly like a missing one", async () => {
    const id = ulid();
    const missing = ulid();
    await ingest(c.executor, [batch(id, "t-a", [1])]);
    const b = c.tenant("t-b");
    const shape = (err: Awaited<ReturnType<typeof errorOf>>, dispatchId: string) => ({
      code: err.code,
      message: err.rawMessage.replace(dispatchId, "<id>"),
      info: JSON.stringify(err.details.length),
    });
    const subOther = await errorOf(() => collect(b.subscribeLogs({ dispatchId: id })));
    const subMissing = await errorOf(() => collect(b.subscribeLogs({ dispatchId: missing })));
    const getOther = await errorOf(() => b.getLogs({ dispatchId: id }));
    const getMissing = await errorOf(() => b.getLogs({ dispatchId: missing }));
    expect(subOther.code).toBe(Code.NotFound);
    expect(shape(subOther, id)).toEqual(shape(subMissing, missing));
    expect(shape(getOther, id)).toEqual(shape(getMissing, missing));
    expect(shape(getOther, id)).toEqual(shape(subOther, id));
    expect(subOther.rawMessage).not.toContain("t-a");
    // The owner still reads it.
    expect((await c.tenant("t-a").getLogs({ dispatchId: id })).chunks).toHaveLength(1);
  });

  it("refuses writes to a run registered to another tenant, and callers other than the right service", async () => {
    const id = ulid();
    await c.dispatcher.registerRun({ dispatchId: id, tenantId: "t-a" });
    expect((await errorOf(() => ingest(c.executor, [batch(id, "t-b", [1])]))).code).toBe(Code.PermissionDenied);
    expect((await errorOf(() => c.dispatcher.registerRun({ dispatchId: id, tenantId: "t-b" }))).code).toBe(Code.PermissionDenied);
    expect((await errorOf(() => c.dispatcher.completeRun({ dispatchId: id, tenantId: "t-b", runEnd: runEnd(0) }))).code).toBe(
      Code.PermissionDenied,
    );
    expect((await errorOf(() => ingest(c.dispatcher, [batch(id, "t-a", [1])]))).code).toBe(Code.PermissionDenied);
    expect((await errorOf(() => c.executor.completeRun({ dispatchId: id, tenantId: "t-a", runEnd: runEnd(0) }))).code).toBe(
      Code.PermissionDenied,
    );
    expect((await errorOf(() => ingest(c.tenantOnIngest("t-a"), [batch(id, "t-a", [1])]))).code).toBe(Code.PermissionDenied);
    expect((await c.tenant("t-a").getLogs({ dispatchId: id })).chunks).toHaveLength(0);
  });

  it("stores a run's output only under the dispatcher's log grant to the calling executor for that run and tenant", async () => {
    const id = ulid();
    const withGrant = (grant: string, dispatchId = id) => Object.assign(batch(dispatchId, "t-a", [1]), { grant });
    const refused: [string, string][] = [
      [logGrantOf(ulid(), "t-a"), "it is for another run"],
      [logGrantOf(id, "t-b"), "it is for another tenant"],
      // Granted to host-2; the caller is executor/host-1.
      [logGrantOf(id, "t-a", "executor/host-2"), "it was given to another executor"],
      [logGrantOf(id, "t-a", "executor/host-1", Date.now() - LOG_GRANT_GRACE_MS - 1), "it has expired"],
      [issueLogGrant(keysOf("executor"), { dispatchId: id, tenantId: "t-a", executor: "executor/host-1" }, Date.now() + 60_000), "it is not signed by the dispatcher"],
      [grantOf("t-a", ["X"]), "it is not a log grant"],
      ["garbage", "it is malformed"],
    ];
    for (const [grant, why] of refused) {
      const err = await errorOf(() => ingest(c.executor, [withGrant(grant)]));
      expect([err.code, errorInfoOf(err)?.reason, err.rawMessage], why).toEqual([Code.PermissionDenied, "LOG_GRANT_INVALID", `log grant refused: ${why}`]);
    }
    const missing = await errorOf(() => ingest(c.executor, [withGrant("")]));
    expect([missing.code, fieldOf(missing)]).toEqual([Code.InvalidArgument, "grant"]);
    // A stream whose first run was granted cannot go on to write another with the same grant.
    const other = ulid();
    const switched = await errorOf(() => ingest(c.executor, [batch(other, "t-a", [1]), withGrant(logGrantOf(other, "t-a"))]));
    expect(errorInfoOf(switched)?.reason).toBe("LOG_GRANT_INVALID");
    // Nothing of the refused batches was stored; the granted one was.
    expect((await errorOf(() => c.tenant("t-a").getLogs({ dispatchId: id }))).code).toBe(Code.NotFound);
    expect((await c.tenant("t-a").getLogs({ dispatchId: other })).chunks.map((ch) => Number(ch.seq))).toEqual([1]);
    expect(await ingest(c.executor, [withGrant(logGrantOf(id, "t-a"))])).toEqual([1]);
  });

  it("refuses a stream's grant once it expires, and takes a renewed one on the same stream", async () => {
    const id = ulid();
    const expiresSoon = logGrantOf(id, "t-a", "executor/host-1", Date.now() - LOG_GRANT_GRACE_MS + 300);
    const withGrant = (seq: number, grant: string) => Object.assign(batch(id, "t-a", [seq]), { grant });
    // Renewed before it expires (as a heartbeat does): the stream goes on.
    expect(await ingest(c.executor, [withGrant(1, expiresSoon), withGrant(2, logGrantOf(id, "t-a"))])).toEqual([1, 2]);
    // The same grant sent again after its expiry, on a stream that already checked it.
    const expiring = logGrantOf(id, "t-a", "executor/host-1", Date.now() - LOG_GRANT_GRACE_MS + 300);
    async function* late() {
      yield withGrant(3, expiring);
      await sleep(400);
      yield withGrant(4, expiring);
    }
    const acks: number[] = [];
    const err = await errorOf(async () => {
      for await (const res of c.executor.ingestLogs(late())) acks.push(Number(res.ackedSeq));
    });
    expect(acks).toEqual([3]);
    expect([err.code, errorInfoOf(err)?.reason, err.rawMessage]).toEqual([Code.PermissionDenied, "LOG_GRANT_INVALID", "log grant refused: it has expired"]);
    expect((await c.tenant("t-a").getLogs({ dispatchId: id })).chunks.map((ch) => Number(ch.seq))).toEqual([1, 2, 3]);
  });

  it("pages GetLogs with opaque tokens", async () => {
    const id = ulid();
    await ingest(c.executor, [batch(id, "t-a", range(1, 25))]);
    const t = c.tenant("t-a");
    const seqs: number[][] = [];
    let token = "";
    do {
      const page = await t.getLogs({ dispatchId: id, pageSize: 10, pageToken: token });
      seqs.push(page.chunks.map((ch) => Number(ch.seq)));
      token = page.nextPageToken;
    } while (token !== "");
    expect(seqs).toEqual([range(1, 10), range(11, 20), range(21, 25)]);
    expect((await t.getLogs({ dispatchId: id, afterSeq: 22n })).chunks.map((ch) => Number(ch.seq))).toEqual([23, 24, 25]);
    const bad = await errorOf(() => t.getLogs({ dispatchId: id, pageToken: "nonsense" }));
    expect([bad.code, fieldOf(bad)]).toEqual([Code.InvalidArgument, "page_token"]);
    const first = await t.getLogs({ dispatchId: id, pageSize: 10 });
    const foreign = await errorOf(() => t.getLogs({ dispatchId: ulid(), pageToken: first.nextPageToken }));
    expect([foreign.code, fieldOf(foreign)]).toEqual([Code.InvalidArgument, "page_token"]);
    const big = await errorOf(() => t.getLogs({ dispatchId: id, pageSize: 5000 }));
    expect([big.code, fieldOf(big)]).toEqual([Code.InvalidArgument, "page_size"]);
  });

  describe("bad input answers INVALID_ARGUMENT naming the field", () => {
    const id = ulid();
    const cases: [string, () => Promise<unknown>, string][] = [
      ["subscribe without dispatch_id", () => collect(c.tenant("t-a").subscribeLogs({})), "dispatch_id"],
      ["subscribe with a non-ULID", () => collect(c.tenant("t-a").subscribeLogs({ dispatchId: "run-1" })), "dispatch_id"],
      ["subscribe with negative after_seq", () => collect(c.tenant("t-a").subscribeLogs({ dispatchId: id, afterSeq: -1n })), "after_seq"],
      ["get logs with negative after_seq", () => c.tenant("t-a").getLogs({ dispatchId: id, afterSeq: -5n }), "after_seq"],
      ["ingest without dispatch_id", () => ingest(c.executor, [batch("", "t-a", [1])]), "dispatch_id"],
      ["ingest with a non-ULID", () => ingest(c.executor, [batch("not-a-ulid", "t-a", [1])]), "dispatch_id"],
      ["ingest without tenant_id", () => ingest(c.executor, [batch(id, "", [1])]), "tenant_id"],
      ["ingest with seq 0", () => ingest(c.executor, [batch(id, "t-a", [1, 0])]), "chunks[1].seq"],
      ["ingest with stream UNSPECIFIED", () => ingest(c.executor, [batch(id, "t-a", [1], LogStream.UNSPECIFIED)]), "chunks[0].stream"],
      [
        "ingest with a huge line",
        () => {
          const b = batch(id, "t-a", [1]);
          b.chunks[0]!.text = "x".repeat(64 * 1024 + 1);
          return ingest(c.executor, [b]);
        },
        "chunks[0].text",
      ],
      ["ingest with too many chunks", () => ingest(c.executor, [batch(id, "t-a", range(1, 1001))]), "chunks"],
      ["register without tenant_id", () => c.dispatcher.registerRun({ dispatchId: id }), "tenant_id"],
      ["complete without run_end", () => c.dispatcher.completeRun({ dispatchId: id, tenantId: "t-a" }), "run_end"],
      [
        "complete with a non-terminal state",
        () => c.dispatcher.completeRun({ dispatchId: id, tenantId: "t-a", runEnd: runEnd(0, Dispatch_State.RUNNING) }),
        "run_end.state",
      ],
    ];
    it.each(cases)("%s", async (_name, call, field) => {
      const err = await errorOf(call);
      expect(err.code).toBe(Code.InvalidArgument);
      expect(fieldOf(err)).toBe(field);
      expect(err.rawMessage).toContain(field);
    });
    it("stored nothing for the refused batches", async () => {
      const err = await errorOf(() => c.tenant("t-a").getLogs({ dispatchId: id }));
      expect(err.code).toBe(Code.NotFound);
    });
  });
});

describe("telemetry service shutdown", () => {
  it("ends open subscriptions and ingest streams cleanly when the server drains", async () => {
    const { service, executor, tenant } = await start();
    const id = ulid();
    await ingest(executor, [batch(id, "t-a", [1, 2])]);
    const watching = collect(tenant("t-a").subscribeLogs({ dispatchId: id }));
    let release!: () => void;
    const hold = new Promise<void>((resolve) => (release = resolve));
    async function* openStream() {
      yield batch(id, "t-a", [3]);
      await hold; // the executor keeps its stream open
    }
    const acks: number[] = [];
    const ingesting = (async () => {
      for await (const res of executor.ingestLogs(openStream())) acks.push(Number(res.ackedSeq));
    })();
    await sleep(100);
    const started = Date.now();
    await service.close();
    release();
    const got = await watching;
    await ingesting;
    expect(got.seqs).toEqual([1, 2, 3]);
    expect(got.end).toBeUndefined();
    expect(acks).toEqual([3]);
    expect(Date.now() - started).toBeLessThan(5000);
  });
});

describe("history bounds and retention (issue 6)", () => {
  it("pages GetLogs within after_seq < seq <= end_seq and rejects a bad range or retention naming the field", async () => {
    const { service, executor, dispatcher, tenant } = await start();
    try {
      const id = ulid();
      await ingest(executor, [batch(id, "t-a", range(1, 30))]);
      const first = await tenant("t-a").getLogs({ dispatchId: id, afterSeq: 5n, endSeq: 20n, pageSize: 10 });
      expect(first.chunks.map((ch) => Number(ch.seq))).toEqual(range(6, 15));
      const second = await tenant("t-a").getLogs({ dispatchId: id, afterSeq: 5n, endSeq: 20n, pageSize: 10, pageToken: first.nextPageToken });
      expect(second.chunks.map((ch) => Number(ch.seq))).toEqual(range(16, 20));
      expect(second.nextPageToken).toBe("");

      const badRange = await errorOf(() => tenant("t-a").getLogs({ dispatchId: id, afterSeq: 9n, endSeq: 9n }));
      expect([badRange.code, fieldOf(badRange)]).toEqual([Code.InvalidArgument, "end_seq"]);
      const badRetention = await errorOf(() =>
        dispatcher.registerRun({ dispatchId: ulid(), tenantId: "t-a", retention: { seconds: 5n, nanos: 0 } }),
      );
      expect([badRetention.code, fieldOf(badRetention)]).toEqual([Code.InvalidArgument, "retention"]);
      await dispatcher.registerRun({ dispatchId: ulid(), tenantId: "t-a", retention: { seconds: 30n * 86_400n, nanos: 0 } });
    } finally {
      await service.close();
    }
  });
});
