/**
 * The MongoDB adapter of the telemetry store. The conformance suite (the same one SQLite
 * passes) and the two-replica tests run when OUTPOST_TEST_MONGO_URL names a server (each store
 * gets its own database, dropped after); without it they are skipped with a note. The pure
 * helpers that build the guarded filters and updates, the classification of insert errors and
 * a connect to a dead port are tested always.
 */
import { describe, expect, it } from "vitest";
import { ulid } from "ulid";
import { MongoBulkWriteError, MongoClient, MongoServerError } from "mongodb";
import { createLogger } from "@outpost/platform";
import type { StoredChunk } from "../src/core/model.ts";
import { loadTelemetryConfig } from "../src/config.ts";
import { startTelemetry } from "../src/service.ts";
import {
  MongoTelemetryStore,
  advanceAckedUpdate,
  chunkDoc,
  chunkRangeFilter,
  contiguousEnd,
  duplicateIndexes,
  endRunUpdate,
  expiryOf,
  isDuplicateKey,
  runOf,
  runUpsert,
  type ChunkDoc,
  type RunDoc,
} from "../src/store/mongo-store.ts";
import { range } from "./helpers.ts";
import { telemetryStoreConformance } from "./store-conformance.ts";
import { signingEnv } from "../../../test/support/signing.ts";

const url = process.env.OUTPOST_TEST_MONGO_URL;

if (!url) {
  console.log("MongoDB telemetry store: skipped (set OUTPOST_TEST_MONGO_URL to run the conformance suite against MongoDB)");
}

const chunksOf = (dispatchId: string, seqs: number[]): StoredChunk[] =>
  seqs.map((seq) => ({ dispatchId, seq, stream: 1, text: `line ${seq}`, timeMs: 1_700_000_000_000 + seq }));

/** A bulk-write error as the driver raises it for insertMany(ordered: false). */
function bulkError(writeErrors: Array<{ code: number; index: number }>, writeConcernError?: object): MongoBulkWriteError {
  const result = { getWriteConcernError: () => writeConcernError };
  return new MongoBulkWriteError(
    { message: "write failed", code: writeErrors[0]?.code ?? 64, writeErrors } as unknown as ConstructorParameters<typeof MongoBulkWriteError>[0],
    result as unknown as ConstructorParameters<typeof MongoBulkWriteError>[1],
  );
}

describe.skipIf(!url)("MongoTelemetryStore", () => {
  const dbs: string[] = [];
  const freshDb = () => {
    const db = `outpost_test_${ulid().toLowerCase()}`;
    dbs.push(db);
    return db;
  };
  telemetryStoreConformance("mongodb", () => MongoTelemetryStore.connect(url!, { dbName: freshDb() }));

  it("keeps the contiguous acked seq exact under concurrent ingest from two replicas", async () => {
    const dbName = freshDb();
    const a = await MongoTelemetryStore.connect(url!, { dbName });
    const b = await MongoTelemetryStore.connect(url!, { dbName });
    try {
      const id = ulid();
      // Seqs 1..200 in small batches, alternately sent through A and B, all at once and out of
      // order (and some resent through both), so the inserts interleave on the server.
      const seqs = range(1, 200).reverse();
      const batches: number[][] = [];
      for (let i = 0; i < seqs.length; i += 5) batches.push(seqs.slice(i, i + 5));
      const results = await Promise.all(
        batches.flatMap((batch, i) => {
          const sends = [(i % 2 === 0 ? a : b).insertChunks(id, "t-a", chunksOf(id, batch))];
          if (i % 7 === 0) sends.push((i % 2 === 0 ? b : a).insertChunks(id, "t-a", chunksOf(id, batch)));
          return sends;
        }),
      );
      const inserted = results.flatMap((r) => (r.outcome === "ok" ? r.inserted.map((c) => c.seq) : []));
      expect(inserted.sort((x, y) => x - y)).toEqual(range(1, 200)); // each seq inserted exactly once
      expect((await a.getRun(id))?.ackedSeq).toBe(200);
      expect((await b.listChunks(id, 0, 1000)).map((c) => c.seq)).toEqual(range(1, 200));
    } finally {
      await a.close();
      await b.close();
    }
  });

  it("fixes the owner at the first of two concurrent writers", async () => {
    const dbName = freshDb();
    const a = await MongoTelemetryStore.connect(url!, { dbName });
    const b = await MongoTelemetryStore.connect(url!, { dbName });
    try {
      const id = ulid();
      const [ra, rb] = await Promise.all([a.registerRun(id, "t-a"), b.insertChunks(id, "t-b", chunksOf(id, [1]))]);
      const owner = (await a.getRun(id))!.tenantId;
      expect(["t-a", "t-b"]).toContain(owner);
      const loser = owner === "t-a" ? rb : ra;
      expect(loser).toEqual({ outcome: "other-tenant", owner });
    } finally {
      await a.close();
      await b.close();
    }
  });

  it("creates TTL indexes and stamps the run's expiry on its chunks, also after RegisterRun changes it", async () => {
    const dbName = freshDb();
    const store = await MongoTelemetryStore.connect(url!, { dbName });
    const client = await MongoClient.connect(url!);
    try {
      const db = client.db(dbName);
      for (const name of ["telemetry_runs", "telemetry_chunks"]) {
        const indexes = await db.collection(name).indexes();
        expect(indexes.find((i) => i.name === "retention")).toMatchObject({ key: { expireAt: 1 }, expireAfterSeconds: 0 });
      }
      const id = ulid();
      await store.insertChunks(id, "t-a", chunksOf(id, [1, 2]));
      const expiries = async () =>
        (await db.collection<ChunkDoc>("telemetry_chunks").find({ dispatchId: id }).toArray()).map((c) => c.expireAt.getTime());
      const first = (await store.getRun(id))!.expireTimeMs;
      expect(await expiries()).toEqual([first, first]);
      await store.registerRun(id, "t-a", 60_000);
      const second = (await store.getRun(id))!.expireTimeMs;
      expect(second).toBeLessThan(first);
      expect(await expiries()).toEqual([second, second]);
      await store.insertChunks(id, "t-a", chunksOf(id, [3]));
      expect(await expiries()).toEqual([second, second, second]);
    } finally {
      await store.close();
      await client.close();
    }
  });

  it("drops its test databases", async () => {
    const client = await MongoClient.connect(url!);
    for (const db of dbs.splice(0)) await client.db(db).dropDatabase();
    await client.close();
  });
});

describe("MongoTelemetryStore helpers (no server needed)", () => {
  it("recognises duplicate-key errors only", () => {
    expect(isDuplicateKey(new MongoServerError({ message: "E11000 duplicate key", code: 11000 }))).toBe(true);
    expect(isDuplicateKey(new MongoServerError({ message: "other", code: 2 }))).toBe(false);
    expect(isDuplicateKey(new Error("E11000"))).toBe(false);
  });

  it("treats an unordered insert that failed only on duplicate keys as resends, and anything else as a failure", () => {
    expect(duplicateIndexes(bulkError([{ code: 11000, index: 1 }, { code: 11000, index: 3 }]))).toEqual(new Set([1, 3]));
    // Another write error among the duplicates: not just resends.
    expect(duplicateIndexes(bulkError([{ code: 11000, index: 0 }, { code: 121, index: 2 }]))).toBeUndefined();
    // Duplicates plus a write-concern failure: the inserts may not be durable.
    expect(duplicateIndexes(bulkError([{ code: 11000, index: 0 }], { code: 64, errmsg: "waiting for replication timed out" }))).toBeUndefined();
    expect(duplicateIndexes(bulkError([]))).toBeUndefined();
    expect(duplicateIndexes(new MongoServerError({ message: "E11000", code: 11000 }))).toBeUndefined();
    expect(duplicateIndexes(new Error("network"))).toBeUndefined();
  });

  it("walks the contiguous prefix and stops reading at the first gap", async () => {
    expect(await contiguousEnd(0, [1, 2, 3])).toBe(3);
    expect(await contiguousEnd(0, [2, 3])).toBe(0);
    expect(await contiguousEnd(3, [4, 5, 7, 8])).toBe(5);
    expect(await contiguousEnd(6, [])).toBe(6);
    let pulled = 0;
    async function* seqs() {
      for (const seq of [11, 12, 14, 15, 16]) {
        pulled++;
        yield seq;
      }
    }
    expect(await contiguousEnd(10, seqs())).toBe(12);
    expect(pulled).toBe(3); // 11, 12, and the gap at 14; 15 and 16 are never read
  });

  it("builds the guarded run updates: owner on insert only, acked forward only, end while none", () => {
    const upsert = runUpsert("t-a", 1_000, 5_000);
    expect(Object.keys(upsert)).toEqual(["$setOnInsert"]); // an existing run is never changed by it
    expect(upsert).toEqual({
      $setOnInsert: { tenantId: "t-a", ackedSeq: 0, end: null, createTime: 1_000, endTime: null, expireAt: new Date(6_000) },
    });
    expect(advanceAckedUpdate(42)).toEqual({ $max: { ackedSeq: 42 } });
    const { filter, update } = endRunUpdate("d1", "t-a", { state: 7, exitCode: undefined, failureReason: "cancelled", lastSeq: 0 }, 9_000);
    expect(filter).toEqual({ _id: "d1", tenantId: "t-a", end: null });
    expect(update).toEqual({ $set: { end: { state: 7, exitCode: null, failureReason: "cancelled", lastSeq: 0 }, endTime: 9_000 } });
  });

  it("pages chunks by seq range", () => {
    expect(chunkRangeFilter("d1", 10)).toEqual({ dispatchId: "d1", seq: { $gt: 10 } });
    expect(chunkRangeFilter("d1", 10, 20)).toEqual({ dispatchId: "d1", seq: { $gt: 10, $lte: 20 } });
  });

  it("maps documents to records and stamps the run's expiry on chunks", () => {
    const expireAt = expiryOf(1_000, 86_400_000);
    expect(expireAt.getTime()).toBe(86_401_000);
    const doc: RunDoc = {
      _id: "d1",
      tenantId: "t-a",
      ackedSeq: 3,
      end: { state: 5, exitCode: null, failureReason: "lost", lastSeq: 3 },
      createTime: 1_000,
      endTime: 2_000,
      expireAt,
    };
    expect(runOf(doc)).toEqual({
      dispatchId: "d1",
      tenantId: "t-a",
      ackedSeq: 3,
      end: { state: 5, exitCode: undefined, failureReason: "lost", lastSeq: 3 },
      expireTimeMs: 86_401_000,
    });
    expect(runOf({ ...doc, end: { ...doc.end!, exitCode: 0 } }).end?.exitCode).toBe(0);
    expect(runOf({ ...doc, end: null }).end).toBeUndefined();
    const chunk = chunksOf("d1", [4])[0]!;
    expect(chunkDoc("d1", { ...chunk, dispatchId: "ignored" }, expireAt)).toEqual({
      dispatchId: "d1",
      seq: 4,
      stream: 1,
      text: "line 4",
      timeMs: 1_700_000_000_004,
      expireAt,
    });
  });

  it("fails to connect within the selection timeout when no server answers (no hang)", async () => {
    await expect(MongoTelemetryStore.connect("mongodb://127.0.0.1:1/outpost", { serverSelectionTimeoutMS: 1000 })).rejects.toThrow();
  }, 20_000);

  it("selects MongoDB when OUTPOST_MONGO_URL is set: start-up fails on a dead server instead of using SQLite", async () => {
    const base = { ...signingEnv("telemetry"), OUTPOST_TELEMETRY_PORT: "0", OUTPOST_DATA_DIR: ":memory:" };
    const logger = createLogger("telemetry-test", "silent");
    await expect(startTelemetry(loadTelemetryConfig({ ...base, OUTPOST_MONGO_URL: "mongodb://127.0.0.1:1/outpost" }), logger)).rejects.toThrow(
      /127\.0\.0\.1:1/,
    );
    // Without the URL the same settings start (on SQLite).
    const running = await startTelemetry(loadTelemetryConfig(base), logger);
    await running.close();
    expect(() => loadTelemetryConfig({ ...base, OUTPOST_MONGO_URL: "not a url" })).toThrow(/OUTPOST_MONGO_URL/);
  }, 30_000);
});
