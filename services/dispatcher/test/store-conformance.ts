/**
 * The conformance suite every DispatchStore adapter must pass (SQLite now, MongoDB later): call
 * it from an adapter's test file with a factory that returns a fresh, empty store. A factory
 * may also open a second store on the same backing data (`openPeer`), like a second replica.
 */
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { ulid } from "ulid";
import type { DispatchRecord, DispatcherStore, DispatchStore } from "../src/store/store.ts";
import { queuedDispatch } from "../src/store/store.ts";

export const T0 = Date.parse("2025-01-01T00:00:00.000Z");

/** Returns a fresh, empty store. */
export type StoreFactory = () => DispatchStore | Promise<DispatchStore>;
/** Opens a second store over the same data as the last factory() call (another connection, like a second replica). */
export type PeerFactory = () => DispatchStore | Promise<DispatchStore>;

let seq = 0;
/** A QUEUED dispatch; ids increase with `createTime` so newest-first order is predictable. */
export function dispatchFixture(overrides: Partial<DispatchRecord> = {}): DispatchRecord {
  seq++;
  const createTime = overrides.createTime ?? T0 + seq;
  return {
    ...queuedDispatch({
      id: ulid(createTime),
      tenantId: "tenant-a",
      agent: "claude",
      task: "fix the bug",
      repoUrl: "https://example.test/repo.git",
      repoRef: "main",
      model: "claude-sonnet-4-5",
      modelTier: 2,
      timeoutMs: 60_000,
      secretNames: [],
      env: { FOO: "bar" },
      labels: { team: "core" },
      requestId: "",
      traceparent: "",
      createTime,
    }),
    ...overrides,
  };
}

function lease(n: number | string, now = T0 + 1_000_000) {
  return { executorId: `executor/${n}`, leaseId: ulid(now), expiresAt: now + 30_000, now };
}

export function dispatchStoreConformance(name: string, factory: StoreFactory, openPeer?: PeerFactory): void {
  describe(`DispatchStore conformance: ${name}`, () => {
    let store: DispatchStore;
    const extra: DispatchStore[] = [];

    beforeEach(async () => {
      store = await factory();
    });

    afterEach(async () => {
      for (const s of extra.splice(0)) await s.close();
      await store.close();
    });

    describe("insert/get", () => {
      it("stores every field and reads it back", async () => {
        const record = dispatchFixture({
          secretNames: ["GH_TOKEN"],
          env: { A: "1", B: "two" },
          labels: { team: "core", "app.kubernetes.io": "x" },
          requestId: "req-1",
          resultJson: '{"ok":true}',
          cancelRequested: true,
          exitCode: 3,
          traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        });
        const res = await store.insert(record);
        expect(res.created).toBe(true);
        expect(res.record).toEqual(record);
        expect(await store.get(record.id)).toEqual(record);
      });

      it("get answers undefined for a missing id", async () => {
        expect(await store.get(ulid())).toBeUndefined();
      });

      it("the same (tenant, requestId) returns the existing record with created=false", async () => {
        const first = dispatchFixture({ requestId: "same", task: "first" });
        const second = dispatchFixture({ requestId: "same", task: "second" });
        expect((await store.insert(first)).created).toBe(true);
        const again = await store.insert(second);
        expect(again.created).toBe(false);
        expect(again.record.id).toBe(first.id);
        expect(again.record.task).toBe("first");
        expect(await store.get(second.id)).toBeUndefined();
      });

      it("the same requestId in another tenant is a different dispatch", async () => {
        const a = await store.insert(dispatchFixture({ requestId: "same", tenantId: "tenant-a" }));
        const b = await store.insert(dispatchFixture({ requestId: "same", tenantId: "tenant-b" }));
        expect(b.created).toBe(true);
        expect(b.record.id).not.toBe(a.record.id);
      });

      it("N parallel inserts with the same requestId produce exactly one row", async () => {
        const candidates = Array.from({ length: 20 }, () => dispatchFixture({ requestId: "burst" }));
        const results = await Promise.all(candidates.map((c) => store.insert(c)));
        expect(results.filter((r) => r.created)).toHaveLength(1);
        const winner = results.find((r) => r.created)!.record.id;
        for (const r of results) expect(r.record.id).toBe(winner);
        const rows = await store.list("tenant-a", {}, 100);
        expect(rows.map((r) => r.id)).toEqual([winner]);
      });

      it("an empty requestId never conflicts", async () => {
        const a = await store.insert(dispatchFixture({ requestId: "" }));
        const b = await store.insert(dispatchFixture({ requestId: "" }));
        expect(a.created).toBe(true);
        expect(b.created).toBe(true);
        expect(await store.list("tenant-a", {}, 100)).toHaveLength(2);
      });
    });

    describe("list", () => {
      it("is newest first, scoped to the tenant", async () => {
        const a1 = dispatchFixture();
        const b1 = dispatchFixture({ tenantId: "tenant-b" });
        const a2 = dispatchFixture();
        const a3 = dispatchFixture();
        for (const r of [a2, a1, b1, a3]) await store.insert(r);
        expect((await store.list("tenant-a", {}, 10)).map((r) => r.id)).toEqual([a3.id, a2.id, a1.id]);
        expect((await store.list("tenant-b", {}, 10)).map((r) => r.id)).toEqual([b1.id]);
        expect(await store.list("tenant-c", {}, 10)).toEqual([]);
      });

      it("filters by state, agent and labels (all labels must match)", async () => {
        const queued = dispatchFixture({ agent: "claude", labels: { team: "core", env: "prod" } });
        const running = dispatchFixture({ agent: "claude", state: "RUNNING", labels: { team: "core" } });
        const codex = dispatchFixture({ agent: "codex", labels: { team: "web", env: "prod" } });
        for (const r of [queued, running, codex]) await store.insert(r);
        const ids = async (filter: Parameters<DispatchStore["list"]>[1]) => (await store.list("tenant-a", filter, 10)).map((r) => r.id);
        expect(await ids({ state: "RUNNING" })).toEqual([running.id]);
        expect(await ids({ state: "SUCCEEDED" })).toEqual([]);
        expect(await ids({ agent: "codex" })).toEqual([codex.id]);
        expect(await ids({ agent: "claude" })).toEqual([running.id, queued.id]);
        expect(await ids({ labels: { team: "core" } })).toEqual([running.id, queued.id]);
        expect(await ids({ labels: { env: "prod" } })).toEqual([codex.id, queued.id]);
        expect(await ids({ labels: { team: "core", env: "prod" } })).toEqual([queued.id]);
        expect(await ids({ labels: { team: "nobody" } })).toEqual([]);
        expect(await ids({ agent: "claude", state: "QUEUED", labels: { env: "prod" } })).toEqual([queued.id]);
      });

      it("filters on label keys with dots and values with '=' as on any other label", async () => {
        const web = dispatchFixture({ labels: { "app.kubernetes.io": "web", query: "a=b" } });
        const api = dispatchFixture({ labels: { "app.kubernetes.io": "api", app: "x" } });
        for (const r of [web, api]) await store.insert(r);
        const ids = async (labels: Record<string, string>) => (await store.list("tenant-a", { labels }, 10)).map((r) => r.id);
        expect(await ids({ "app.kubernetes.io": "web" })).toEqual([web.id]);
        expect(await ids({ "app.kubernetes.io": "api", app: "x" })).toEqual([api.id]);
        expect(await ids({ query: "a=b" })).toEqual([web.id]);
        expect(await ids({ query: "a" })).toEqual([]);
        expect(await ids({ app: "kubernetes.io" })).toEqual([]);
        expect((await store.get(web.id))?.labels).toEqual({ "app.kubernetes.io": "web", query: "a=b" });
      });

      it("pages with limit and afterId without gaps or duplicates", async () => {
        const records = Array.from({ length: 7 }, () => dispatchFixture());
        for (const r of records) await store.insert(r);
        const expected = records.map((r) => r.id).reverse();
        const seen: string[] = [];
        let after: string | undefined;
        const sizes: number[] = [];
        for (;;) {
          const page = await store.list("tenant-a", {}, 3, after);
          if (page.length === 0) break;
          sizes.push(page.length);
          seen.push(...page.map((r) => r.id));
          after = page.at(-1)!.id;
        }
        expect(sizes).toEqual([3, 3, 1]);
        expect(seen).toEqual(expected);
      });
    });

    describe("update", () => {
      it("applies the patch when the state matches and returns the updated record", async () => {
        const r = dispatchFixture();
        await store.insert(r);
        const updated = await store.update(r.id, { states: ["QUEUED", "STARTING"] }, { state: "CANCELLED", endTime: T0 + 99, failureReason: "x" });
        expect(updated?.state).toBe("CANCELLED");
        expect(updated?.endTime).toBe(T0 + 99);
        expect(updated?.failureReason).toBe("x");
        expect(updated?.task).toBe(r.task);
        expect(await store.get(r.id)).toEqual(updated);
      });

      it("changes nothing when the state does not match", async () => {
        const r = dispatchFixture();
        await store.insert(r);
        expect(await store.update(r.id, { states: ["RUNNING"] }, { state: "SUCCEEDED", exitCode: 0 })).toBeUndefined();
        expect(await store.get(r.id)).toEqual(r);
      });

      it("changes nothing when the lease does not match", async () => {
        const r = dispatchFixture({ state: "RUNNING", leaseId: "lease-1", leaseExpiresAt: T0 + 10 });
        await store.insert(r);
        expect(await store.update(r.id, { states: ["RUNNING"], leaseId: "lease-2" }, { leaseExpiresAt: T0 + 20 })).toBeUndefined();
        expect(await store.get(r.id)).toEqual(r);
        const ok = await store.update(r.id, { states: ["RUNNING"], leaseId: "lease-1" }, { leaseExpiresAt: T0 + 20, cancelRequested: true });
        expect(ok?.leaseExpiresAt).toBe(T0 + 20);
        expect(ok?.cancelRequested).toBe(true);
      });

      it("changes nothing when the lease was renewed since it expired, or the cancel flag differs", async () => {
        const r = dispatchFixture({ state: "RUNNING", leaseId: "lease-1", leaseExpiresAt: T0 + 10 });
        await store.insert(r);
        // Renewed past the sweep's time: not expired before T0 + 10.
        expect(await store.update(r.id, { states: ["RUNNING"], leaseExpiredBefore: T0 + 10 }, { state: "FAILED" })).toBeUndefined();
        expect(await store.update(r.id, { states: ["RUNNING"], cancelRequested: true }, { state: "CANCELLED" })).toBeUndefined();
        expect(await store.get(r.id)).toEqual(r);
        const failed = await store.update(r.id, { states: ["RUNNING"], leaseExpiredBefore: T0 + 11, cancelRequested: false }, { state: "FAILED", leaseExpiresAt: null });
        expect(failed?.state).toBe("FAILED");
        // A record without a lease expiry never counts as expired.
        const q = dispatchFixture();
        await store.insert(q);
        expect(await store.update(q.id, { states: ["QUEUED"], leaseExpiredBefore: T0 + 1_000_000 }, { state: "CANCELLED" })).toBeUndefined();
      });

      it("answers undefined for a missing id", async () => {
        expect(await store.update(ulid(), { states: ["QUEUED"] }, { state: "CANCELLED" })).toBeUndefined();
      });

      it("writes structured fields and nulls", async () => {
        const r = dispatchFixture({ exitCode: 1, resultJson: "{}" });
        await store.insert(r);
        const u = await store.update(r.id, { states: ["QUEUED"] }, { exitCode: null, resultJson: null, labels: { a: "b" } });
        expect(u?.exitCode).toBeNull();
        expect(u?.resultJson).toBeNull();
        expect((await store.get(r.id))?.labels).toEqual({ a: "b" });
      });
    });

    describe("leaseNext", () => {
      it("answers undefined on an empty queue", async () => {
        expect(await store.leaseNext(lease(1))).toBeUndefined();
        await store.insert(dispatchFixture({ state: "RUNNING" }));
        await store.insert(dispatchFixture({ state: "CANCELLED" }));
        expect(await store.leaseNext(lease(1))).toBeUndefined();
      });

      it("takes the oldest QUEUED, moves it to STARTING under the lease and increments attempt", async () => {
        const oldest = dispatchFixture({ attempt: 1 });
        const newer = dispatchFixture();
        await store.insert(newer);
        await store.insert(oldest);
        await store.insert(dispatchFixture({ state: "RUNNING", createTime: T0 - 100 }));
        const l = lease(7);
        const got = await store.leaseNext(l);
        expect(got?.id).toBe(oldest.id);
        expect(got?.state).toBe("STARTING");
        expect(got?.attempt).toBe(2);
        expect(got?.executorId).toBe(l.executorId);
        expect(got?.leaseId).toBe(l.leaseId);
        expect(got?.leaseExpiresAt).toBe(l.expiresAt);
        expect(got?.updateTime).toBe(l.now);
        expect(await store.get(oldest.id)).toEqual(got);
        const next = await store.leaseNext(lease(8));
        expect(next?.id).toBe(newer.id);
        expect(next?.attempt).toBe(1);
        expect(await store.leaseNext(lease(9))).toBeUndefined();
      });

      it("never leases the same run twice when two connections lease concurrently", async (ctx) => {
        if (!openPeer) {
          ctx.skip();
          return;
        }
        const peer = await openPeer();
        extra.push(peer);
        const queued = Array.from({ length: 50 }, () => dispatchFixture());
        for (const r of queued) await store.insert(r);
        const leased: string[] = [];
        const worker = async (s: DispatchStore, n: string) => {
          // Yield between calls so the two connections interleave.
          for (let i = 0; i < 60; i++) {
            const got = await s.leaseNext(lease(`${n}-${i}`, Date.now()));
            if (got) leased.push(got.id);
            await new Promise((r) => setImmediate(r));
          }
        };
        await Promise.all([worker(store, "a"), worker(peer, "b"), worker(store, "c"), worker(peer, "d")]);
        expect(leased).toHaveLength(50);
        expect(new Set(leased).size).toBe(50);
        expect(new Set(leased)).toEqual(new Set(queued.map((r) => r.id)));
        for (const r of await store.list("tenant-a", {}, 100)) {
          expect(r.state).toBe("STARTING");
          expect(r.attempt).toBe(1);
        }
        // The peer sees the same data.
        expect((await peer.get(queued[0]!.id))?.state).toBe("STARTING");
      });
    });

    describe("listExpiredLeases", () => {
      it("returns only STARTING/RUNNING runs whose lease expired before now", async () => {
        const now = T0 + 10_000;
        const startingExpired = dispatchFixture({ state: "STARTING", leaseId: "l1", leaseExpiresAt: now - 1 });
        const runningExpired = dispatchFixture({ state: "RUNNING", leaseId: "l2", leaseExpiresAt: now - 500 });
        const runningLive = dispatchFixture({ state: "RUNNING", leaseId: "l3", leaseExpiresAt: now + 1 });
        const finished = dispatchFixture({ state: "SUCCEEDED", leaseId: "l4", leaseExpiresAt: now - 1000 });
        const queued = dispatchFixture({ state: "QUEUED", leaseExpiresAt: now - 1000 });
        const otherTenant = dispatchFixture({ tenantId: "tenant-b", state: "STARTING", leaseId: "l5", leaseExpiresAt: now - 2 });
        for (const r of [startingExpired, runningExpired, runningLive, finished, queued, otherTenant]) await store.insert(r);
        const expired = await store.listExpiredLeases(now, 10);
        expect(new Set(expired.map((r) => r.id))).toEqual(new Set([startingExpired.id, runningExpired.id, otherTenant.id]));
        expect(await store.listExpiredLeases(now, 2)).toHaveLength(2);
        expect(await store.listExpiredLeases(T0, 10)).toEqual([]);
      });
    });

    describe("listSlotsOwed", () => {
      it("returns ended runs still holding their slot, oldest end first, until the slot is marked released", async () => {
        const now = T0 + 10_000;
        const owedLate = dispatchFixture({ state: "FAILED", endTime: now - 10 });
        const owedEarly = dispatchFixture({ state: "CANCELLED", tenantId: "tenant-b", endTime: now - 500 });
        const endedJustNow = dispatchFixture({ state: "SUCCEEDED", endTime: now });
        const released = dispatchFixture({ state: "SUCCEEDED", endTime: now - 1000, slotHeld: false });
        const running = dispatchFixture({ state: "RUNNING", leaseId: "l1", leaseExpiresAt: now + 1 });
        for (const r of [owedLate, owedEarly, endedJustNow, released, running]) await store.insert(r);
        expect((await store.get(running.id))?.slotHeld).toBe(true);
        expect((await store.get(released.id))?.slotHeld).toBe(false);
        expect((await store.listSlotsOwed(now, 10)).map((r) => r.id)).toEqual([owedEarly.id, owedLate.id]);
        expect((await store.listSlotsOwed(now, 1)).map((r) => r.id)).toEqual([owedEarly.id]);
        expect(await store.update(owedEarly.id, { states: ["CANCELLED"] }, { slotHeld: false })).toMatchObject({ slotHeld: false });
        expect((await store.listSlotsOwed(now, 10)).map((r) => r.id)).toEqual([owedLate.id]);
        expect(await store.listSlotsOwed(T0, 10)).toEqual([]);
      });
    });
  });
}

/** Issue #4 parts of the store: fairness, suspension, backoff, agents, audit, executors, counts. */
export function dispatcherStoreExtrasConformance(name: string, factory: () => DispatcherStore | Promise<DispatcherStore>): void {
  describe(`DispatcherStore extras conformance: ${name}`, () => {
    let store: DispatcherStore;
    beforeEach(async () => {
      store = await factory();
    });
    afterEach(async () => {
      await store.close();
    });

    it("leases round-robin across tenants, skips excluded tenants and runs still backing off", async () => {
      for (let i = 0; i < 6; i++) await store.insert(dispatchFixture({ tenantId: "a" }));
      for (let i = 0; i < 2; i++) await store.insert(dispatchFixture({ tenantId: "b" }));
      const later = dispatchFixture({ tenantId: "c", notBefore: T0 + 5_000_000 });
      await store.insert(later);
      const order: string[] = [];
      for (let i = 0; i < 4; i++) order.push((await store.leaseNext(lease(i)))!.tenantId);
      expect(order).toEqual(["a", "b", "a", "b"]);
      expect((await store.leaseNext({ ...lease(9), excludeTenants: ["a"] }))).toBeUndefined();
      expect(await store.queueDepth()).toBe(5);
      expect(await store.activeLeases()).toBe(4);
      const counts = await store.countByStateSince(0);
      expect(counts).toEqual({ QUEUED: 5, STARTING: 4 });
      expect((await store.listLeasedTo("executor/1", 10)).map((d) => d.tenantId)).toEqual(["b"]);
      expect((await store.leaseNext(lease(10, T0 + 6_000_000)))?.id).toBe(later.id);
    });

    it("agents: insert once, update only at the expected version", async () => {
      expect(await store.putAgent("x", '{"name":"x"}', 0, T0)).toMatchObject({ version: 1 });
      expect(await store.putAgent("x", '{"name":"x"}', 0, T0)).toBeUndefined();
      expect(await store.putAgent("x", '{"name":"x","description":"2"}', 1, T0 + 1)).toMatchObject({ version: 2 });
      expect(await store.putAgent("x", "{}", 1, T0 + 2)).toBeUndefined();
      expect(await store.listAgents()).toEqual([{ name: "x", agentJson: '{"name":"x","description":"2"}', version: 2, updateTime: T0 + 1 }]);
    });

    it("audit: newest first, by tenant, paged by id", async () => {
      const ids = [1, 2, 3].map((n) => ulid(T0 + n));
      for (const [i, id] of ids.entries()) {
        await store.appendAudit({ id, tenantId: i === 1 ? "b" : "a", principal: "p", method: "m", target: "t", outcome: "OK", time: T0 + i });
      }
      expect((await store.listAudit(undefined, 10)).map((e) => e.id)).toEqual([...ids].reverse());
      expect((await store.listAudit("a", 10)).map((e) => e.id)).toEqual([ids[2], ids[0]]);
      expect((await store.listAudit(undefined, 10, ids[2])).map((e) => e.id)).toEqual([ids[1], ids[0]]);
      expect((await store.listAudit("a", 1))[0]).toEqual({ id: ids[2], tenantId: "a", principal: "p", method: "m", target: "t", outcome: "OK", time: T0 + 2 });
    });

    it("executor keys: one key per id while bound; the same key renews; another only once the binding ended", async () => {
      expect(await store.bindExecutorKey("e1", "key-a", T0 + 100, T0)).toEqual({ bound: true, renewed: false });
      expect(await store.bindExecutorKey("e1", "key-b", T0 + 150, T0 + 50)).toEqual({ bound: false, boundUntil: T0 + 100 });
      expect(await store.bindExecutorKey("e1", "key-a", T0 + 200, T0 + 60)).toEqual({ bound: true, renewed: true });
      // Still bound to key-a until T0 + 200 after the renewal.
      expect(await store.bindExecutorKey("e1", "key-b", T0 + 300, T0 + 150)).toEqual({ bound: false, boundUntil: T0 + 200 });
      expect(await store.bindExecutorKey("e1", "key-b", T0 + 400, T0 + 201)).toEqual({ bound: true, renewed: false });
      expect(await store.bindExecutorKey("e1", "key-a", T0 + 500, T0 + 250)).toEqual({ bound: false, boundUntil: T0 + 400 });
      // The same key after its binding lapsed binds anew: not a renewal.
      expect(await store.bindExecutorKey("e1", "key-b", T0 + 600, T0 + 401)).toEqual({ bound: true, renewed: false });
      // Ids are apart.
      expect(await store.bindExecutorKey("e2", "key-a", T0 + 500, T0 + 250)).toEqual({ bound: true, renewed: false });
    });

    it("executors: the last report wins; stale ones drop out", async () => {
      const report = { executorId: "e1", slotsTotal: 4, slotsBusy: 1, warmContainers: 2, engineReady: true, imagesPresent: ["img:1"], seenAt: T0 };
      await store.recordExecutor(report);
      await store.recordExecutor({ ...report, slotsBusy: 3, seenAt: T0 + 10 });
      await store.recordExecutor({ ...report, executorId: "e0", seenAt: T0 - 1000 });
      expect(await store.listExecutors(T0)).toEqual([{ ...report, slotsBusy: 3, seenAt: T0 + 10 }]);
    });
  });
}
