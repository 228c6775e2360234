import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { DatabaseSync } from "node:sqlite";
import { Worker } from "node:worker_threads";
import { afterAll, describe, expect, it } from "vitest";
import { SqliteDispatchStore } from "../src/store/sqlite-store.ts";
import { T0, dispatchFixture, dispatchStoreConformance, dispatcherStoreExtrasConformance } from "./store-conformance.ts";

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
