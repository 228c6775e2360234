/**
 * The conformance suite every TelemetryStore adapter passes (SQLite now, MongoDB later): call
 * it with a factory that returns an empty store.
 */
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { ulid } from "ulid";
import { DEFAULT_RETENTION_MS, type RunEndRecord, type StoredChunk } from "../src/core/model.ts";
import type { TelemetryStore } from "../src/store/store.ts";

function chunks(dispatchId: string, seqs: number[], text = (seq: number) => `line ${seq}`): StoredChunk[] {
  return seqs.map((seq) => ({ dispatchId, seq, stream: 1, text: text(seq), timeMs: 1_700_000_000_000 + seq }));
}

const range = (from: number, to: number) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

const END: RunEndRecord = { state: 4, exitCode: 0, failureReason: "", lastSeq: 3 };

export function telemetryStoreConformance(name: string, factory: () => Promise<TelemetryStore>): void {
  describe(`TelemetryStore conformance: ${name}`, () => {
    let store: TelemetryStore;
    beforeEach(async () => {
      store = await factory();
    });
    afterEach(async () => {
      await store.close();
    });

    it("registers a run once and refuses another tenant", async () => {
      const id = ulid();
      expect(await store.getRun(id)).toBeUndefined();
      const first = await store.registerRun(id, "t-a");
      expect(first).toMatchObject({ outcome: "ok", created: true, run: { dispatchId: id, tenantId: "t-a", ackedSeq: 0, end: undefined } });
      expect(await store.registerRun(id, "t-a")).toMatchObject({ outcome: "ok", created: false });
      expect(await store.registerRun(id, "t-b")).toEqual({ outcome: "other-tenant", owner: "t-a" });
      expect((await store.getRun(id))?.tenantId).toBe("t-a");
    });

    it("ignores chunks already stored and keeps the first text", async () => {
      const id = ulid();
      const first = await store.insertChunks(id, "t-a", chunks(id, [1, 2, 3]));
      expect(first).toMatchObject({ outcome: "ok", ackedSeq: 3 });
      if (first.outcome !== "ok") throw new Error("unreachable");
      expect(first.inserted.map((c) => c.seq)).toEqual([1, 2, 3]);

      const resend = await store.insertChunks(id, "t-a", chunks(id, [2, 3, 4], (s) => `changed ${s}`));
      if (resend.outcome !== "ok") throw new Error("expected ok");
      expect(resend.inserted.map((c) => c.seq)).toEqual([4]);
      expect(resend.ackedSeq).toBe(4);
      const stored = await store.listChunks(id, 0, 100);
      expect(stored.map((c) => c.text)).toEqual(["line 1", "line 2", "line 3", "changed 4"]);
      expect(stored[0]).toEqual({ dispatchId: id, seq: 1, stream: 1, text: "line 1", timeMs: 1_700_000_000_001 });
    });

    it("acknowledges the highest contiguous seq, across gaps filled later", async () => {
      const id = ulid();
      const acked = async (seqs: number[]) => {
        const result = await store.insertChunks(id, "t-a", chunks(id, seqs));
        if (result.outcome !== "ok") throw new Error("expected ok");
        return result.ackedSeq;
      };
      expect(await acked([2, 3])).toBe(0);
      expect(await acked([1])).toBe(3);
      expect(await acked([5, 6])).toBe(3);
      expect(await acked([])).toBe(3);
      expect(await acked([4])).toBe(6);
      expect(await acked([9, 8])).toBe(6);
      expect(await acked([7])).toBe(9);
      expect((await store.getRun(id))?.ackedSeq).toBe(9);
    });

    it("registers an unknown run on ingest and refuses chunks for another tenant's run", async () => {
      const id = ulid();
      await store.insertChunks(id, "t-a", chunks(id, [1]));
      expect((await store.getRun(id))?.tenantId).toBe("t-a");
      expect(await store.insertChunks(id, "t-b", chunks(id, [2]))).toEqual({ outcome: "other-tenant", owner: "t-a" });
      expect((await store.listChunks(id, 0, 10)).map((c) => c.seq)).toEqual([1]);
    });

    it("lists chunks in seq order after a cursor, a page at a time, per run", async () => {
      const id = ulid();
      const other = ulid();
      await store.insertChunks(id, "t-a", chunks(id, [...range(11, 25), ...range(1, 10)]));
      await store.insertChunks(other, "t-a", chunks(other, range(1, 5)));
      const seqs = async (after: number, limit: number) => (await store.listChunks(id, after, limit)).map((c) => c.seq);
      expect(await seqs(0, 10)).toEqual(range(1, 10));
      expect(await seqs(10, 10)).toEqual(range(11, 20));
      expect(await seqs(20, 10)).toEqual(range(21, 25));
      expect(await seqs(25, 10)).toEqual([]);
      expect(await store.listChunks(ulid(), 0, 10)).toEqual([]);
    });

    it("records a run's end once; the first end wins", async () => {
      const id = ulid();
      await store.registerRun(id, "t-a");
      const first = await store.endRun(id, "t-a", END);
      expect(first).toMatchObject({ outcome: "ok", recorded: true, run: { end: END } });
      const second = await store.endRun(id, "t-a", { state: 5, exitCode: 1, failureReason: "late", lastSeq: 9 });
      expect(second).toMatchObject({ outcome: "ok", recorded: false, run: { end: END } });
      expect((await store.getRun(id))?.end).toEqual(END);
      expect(await store.endRun(id, "t-b", END)).toEqual({ outcome: "other-tenant", owner: "t-a" });
    });

    it("keeps a missing exit code missing, and ends an unknown run", async () => {
      const id = ulid();
      const end: RunEndRecord = { state: 7, exitCode: undefined, failureReason: "cancelled by user", lastSeq: 0 };
      expect(await store.endRun(id, "t-a", end)).toMatchObject({ outcome: "ok", recorded: true });
      expect(await store.getRun(id)).toMatchObject({ dispatchId: id, tenantId: "t-a", ackedSeq: 0, end });
    });

    it("after an end with a known last seq, refuses a batch reaching past it whole and takes late chunks within it", async () => {
      const id = ulid();
      await store.insertChunks(id, "t-a", chunks(id, [1]));
      await store.endRun(id, "t-a", END); // lastSeq 3
      expect(await store.insertChunks(id, "t-a", chunks(id, [2, 4]))).toEqual({ outcome: "past-end", lastSeq: 3 });
      expect(await store.insertChunks(id, "t-a", chunks(id, [2, 3]))).toMatchObject({ outcome: "ok", ackedSeq: 3 });
      expect((await store.listChunks(id, 0, 10)).map((c) => c.seq)).toEqual([1, 2, 3]);
      // last_seq 0 (unknown): nothing to compare with, chunks are taken.
      const unknown = ulid();
      await store.endRun(unknown, "t-a", { ...END, lastSeq: 0 });
      expect(await store.insertChunks(unknown, "t-a", chunks(unknown, [1, 2]))).toMatchObject({ outcome: "ok", ackedSeq: 2 });
    });

    it("bounds a listing by end_seq", async () => {
      const id = ulid();
      await store.insertChunks(id, "t-a", chunks(id, range(1, 20)));
      const seqs = async (after: number, limit: number, end?: number) => (await store.listChunks(id, after, limit, end)).map((c) => c.seq);
      expect(await seqs(3, 100, 7)).toEqual(range(4, 7));
      expect(await seqs(3, 2, 7)).toEqual([4, 5]);
      expect(await seqs(7, 100, 7)).toEqual([]);
    });

    it("gives runs the default retention unless RegisterRun sets one, and deletes expired runs with their chunks", async () => {
      const before = Date.now();
      const early = ulid(); // ingest first (default retention), then registered with one day
      const kept = ulid(); // registered with the default
      const short = ulid(); // registered with one minute
      await store.insertChunks(early, "t-a", chunks(early, [1, 2]));
      const defaultExpiry = (await store.getRun(early))!.expireTimeMs;
      expect(defaultExpiry).toBeGreaterThanOrEqual(before + DEFAULT_RETENTION_MS);
      expect(defaultExpiry).toBeLessThanOrEqual(Date.now() + DEFAULT_RETENTION_MS);
      await store.registerRun(early, "t-a", 86_400_000);
      const earlyExpiry = (await store.getRun(early))!.expireTimeMs;
      expect(earlyExpiry).toBeLessThanOrEqual(Date.now() + 86_400_000);
      expect(earlyExpiry).toBeGreaterThanOrEqual(before + 86_400_000);
      await store.registerRun(kept, "t-a");
      await store.registerRun(short, "t-a", 60_000);
      await store.insertChunks(short, "t-a", chunks(short, [1, 2, 3]));

      expect(await store.deleteExpired(Date.now(), 10)).toBe(0);
      expect(await store.deleteExpired(Date.now() + 120_000, 10)).toBe(1);
      expect(await store.getRun(short)).toBeUndefined();
      expect(await store.listChunks(short, 0, 10)).toEqual([]);
      expect(await store.getRun(early)).toBeDefined();
      expect(await store.deleteExpired(Date.now() + 2 * 86_400_000, 10)).toBe(1);
      expect(await store.listChunks(early, 0, 10)).toEqual([]);
      expect(await store.getRun(kept)).toBeDefined();
      expect(await store.deleteExpired(Date.now() + DEFAULT_RETENTION_MS + 60_000, 10)).toBe(1);
      expect(await store.getRun(kept)).toBeUndefined();
    });

    it("deletes an expired run of 12,000 chunks (more than one SQLite piece) and nothing of an unexpired one", async () => {
      const big = ulid();
      const kept = ulid();
      await store.registerRun(big, "t-a", 60_000);
      for (let from = 1; from <= 12_000; from += 4000) await store.insertChunks(big, "t-a", chunks(big, range(from, from + 3999)));
      await store.registerRun(kept, "t-a", 86_400_000);
      await store.insertChunks(kept, "t-a", chunks(kept, range(1, 3)));
      expect((await store.getRun(big))?.ackedSeq).toBe(12_000);

      expect(await store.deleteExpired(Date.now() + 120_000, 10)).toBe(1);
      expect(await store.getRun(big)).toBeUndefined();
      expect(await store.listChunks(big, 0, 100)).toEqual([]);
      expect(await store.getRun(kept)).toMatchObject({ ackedSeq: 3 });
      expect(await store.listChunks(kept, 0, 100)).toEqual(chunks(kept, range(1, 3)));
      expect(await store.deleteExpired(Date.now() + 120_000, 10)).toBe(0);
    });
  });
}
