import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { DatabaseSync } from "node:sqlite";
import { Worker } from "node:worker_threads";
import { afterAll, describe, expect, it } from "vitest";
import { SqliteDispatchStore } from "../src/store/sqlite-store.ts";
import { AUDIT_RETENTION_MS, EXECUTOR_RETENTION_MS } from "../src/store/store.ts";
import { T0, dispatchFixture, dispatchStoreConformance, dispatcherStoreExtrasConformance } from "./store-conformance.ts";

const DAY_MS = 86_400_000;
const dirs: string[] = [];
let lastDir = "";

afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

function freshDir(): string {
  const dir = mkdtempSync(path.join(tmpdir(), "outpost-dispatcher-store-"));
  dirs.push(dir);
  return dir;
}

dispatchStoreConformance("sqlite :memory:", () => new SqliteDispatchStore(":memory:"));
dispatcherStoreExtrasConformance("sqlite :memory:", () => new SqliteDispatchStore(":memory:"));

dispatchStoreConformance(
  "sqlite file",
  () => {
    lastDir = freshDir();
    return new SqliteDispatchStore(lastDir);
  },
  () => new SqliteDispatchStore(lastDir),
);

describe("SqliteDispatchStore on a shared file", () => {
  it("keeps data across reopening", async () => {
    const dir = freshDir();
    const first = new SqliteDispatchStore(dir);
    const record = dispatchFixture({ requestId: "persist" });
    await first.insert(record);
    await first.close();
    const second = new SqliteDispatchStore(dir);
    try {
      expect(await second.get(record.id)).toEqual(record);
      expect((await second.insert(dispatchFixture({ requestId: "persist" }))).created).toBe(false);
    } finally {
      await second.close();
    }
  });

  it("a database from before slots were tracked: active runs hold theirs, ended ones owe nothing", async () => {
    const dir = freshDir();
    const first = new SqliteDispatchStore(dir);
    const active = dispatchFixture({ state: "RUNNING", leaseId: "l1", leaseExpiresAt: T0 + 1 });
    const ended = dispatchFixture({ state: "SUCCEEDED", endTime: T0 + 2 });
    for (const r of [active, ended]) await first.insert(r);
    await first.close();
    // Back to the older schema: no slot_held column.
    const db = new DatabaseSync(path.join(dir, "dispatcher.db"));
    db.exec("DROP INDEX dispatches_slot_owed; ALTER TABLE dispatches DROP COLUMN slot_held");
    db.close();
    const upgraded = new SqliteDispatchStore(dir);
    try {
      expect((await upgraded.get(active.id))?.slotHeld).toBe(true);
      expect((await upgraded.get(ended.id))?.slotHeld).toBe(false);
      expect(await upgraded.listSlotsOwed(T0 + 1_000_000, 10)).toEqual([]);
    } finally {
      await upgraded.close();
    }
  });

  it("two replicas in separate threads lease all 50 queued runs, none twice", async () => {
    const dir = freshDir();
    const store = new SqliteDispatchStore(dir);
    const queued = Array.from({ length: 50 }, () => dispatchFixture());
    for (const r of queued) await store.insert(r);
    const run = (name: string) =>
      new Promise<string[]>((resolve, reject) => {
        const worker = new Worker(new URL("./lease-worker.ts", import.meta.url), {
          workerData: { dataDir: dir, name, emptyPollsToStop: 20 },
          execArgv: ["--disable-warning=ExperimentalWarning"],
        });
        worker.once("message", resolve);
        worker.once("error", reject);
        worker.once("exit", (code) => (code === 0 ? undefined : reject(new Error(`worker exited ${code}`))));
      });
    const [a, b] = await Promise.all([run("a"), run("b")]);
    const all = [...a, ...b];
    expect(all).toHaveLength(50);
    expect(new Set(all)).toEqual(new Set(queued.map((r) => r.id)));
    for (const r of await store.list("tenant-a", {}, 100)) {
      expect(r.state).toBe("STARTING");
      expect(r.attempt).toBe(1);
    }
    await store.close();
  });
});

describe("SqliteDispatchStore retention (MongoDB's TTL indexes, done as it writes)", () => {
  it("deletes audit events past AUDIT_RETENTION_MS as new ones are appended, oldest first, and keeps the rest", async () => {
    const store = new SqliteDispatchStore(":memory:");
    const event = (id: string, time: number) => ({ id, tenantId: "t1", principal: "key/k", method: "m", target: "x", outcome: "OK", time });
    // ULIDs by time: 01A… before 01B… before 01C…
    await store.appendAudit(event("01AAAAAAAAAAAAAAAAAAAAAAAA", T0));
    await store.appendAudit(event("01BBBBBBBBBBBBBBBBBBBBBBBB", T0 + 10 * DAY_MS));
    await store.appendAudit(event("01CCCCCCCCCCCCCCCCCCCCCCCC", T0 + AUDIT_RETENTION_MS));
    expect((await store.listAudit(undefined, 10)).map((e) => e.id[2])).toEqual(["C", "B", "A"]);
    await store.appendAudit(event("01DDDDDDDDDDDDDDDDDDDDDDDD", T0 + AUDIT_RETENTION_MS + 1));
    expect((await store.listAudit(undefined, 10)).map((e) => e.id[2])).toEqual(["D", "C", "B"]);
    await store.close();
  });

  it("deletes executor reports and key bindings a day past their last sign of life, at most once a minute", async () => {
    const store = new SqliteDispatchStore(":memory:");
    const report = (executorId: string, seenAt: number) => ({ executorId, slotsTotal: 2, slotsBusy: 0, warmContainers: 0, engineReady: true, imagesPresent: [], seenAt });
    await store.recordExecutor(report("gone", T0));
    await store.bindExecutorKey("gone", "key-gone", T0 + 600_000, T0);
    await store.recordExecutor(report("alive", T0 + EXECUTOR_RETENTION_MS));
    expect((await store.listExecutors(0)).map((e) => e.executorId)).toEqual(["alive", "gone"]);
    // Within a minute of the last sweep nothing is swept, even past the retention.
    await store.recordExecutor(report("alive", T0 + EXECUTOR_RETENTION_MS + 1));
    expect((await store.listExecutors(0)).map((e) => e.executorId)).toEqual(["alive", "gone"]);
    await store.recordExecutor(report("alive", T0 + 600_000 + EXECUTOR_RETENTION_MS + 60_000));
    expect((await store.listExecutors(0)).map((e) => e.executorId)).toEqual(["alive"]);
    // Its key binding, ended a day before, went too.
    const db = (store as unknown as { db: DatabaseSync }).db;
    expect(db.prepare("SELECT executor_id FROM executor_keys").all()).toEqual([]);
    await store.close();
  });
});
