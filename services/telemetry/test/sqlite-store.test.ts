import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { ulid } from "ulid";
import { afterAll, describe, expect, it } from "vitest";
import { SqliteTelemetryStore } from "../src/store/sqlite-store.ts";
import { telemetryStoreConformance } from "./store-conformance.ts";

telemetryStoreConformance("sqlite (:memory:)", async () => new SqliteTelemetryStore(":memory:"));

describe("SqliteTelemetryStore on disk", () => {
  const dir = mkdtempSync(path.join(tmpdir(), "outpost-telemetry-store-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("keeps runs and chunks across a reopen", async () => {
    const id = ulid();
    const first = new SqliteTelemetryStore(dir);
    await first.insertChunks(id, "t-a", [{ dispatchId: id, seq: 1, stream: 2, text: "boom", timeMs: 5 }]);
    await first.endRun(id, "t-a", { state: 5, exitCode: 2, failureReason: "exit 2", lastSeq: 1 });
    await first.close();
    const second = new SqliteTelemetryStore(dir);
    expect(await second.getRun(id)).toMatchObject({
      dispatchId: id,
      tenantId: "t-a",
      ackedSeq: 1,
      end: { state: 5, exitCode: 2, failureReason: "exit 2", lastSeq: 1 },
    });
    expect(await second.listChunks(id, 0, 10)).toEqual([{ dispatchId: id, seq: 1, stream: 2, text: "boom", timeMs: 5 }]);
    await second.close();
  });

  it("adds the expire time to a data directory from before retention", async () => {
    const { DatabaseSync } = await import("node:sqlite");
    const old = mkdtempSync(path.join(tmpdir(), "outpost-telemetry-old-"));
    const db = new DatabaseSync(path.join(old, "telemetry.db"));
    db.exec(`CREATE TABLE runs (dispatch_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, acked_seq INTEGER NOT NULL DEFAULT 0,
      ended INTEGER NOT NULL DEFAULT 0, end_state INTEGER NOT NULL DEFAULT 0, exit_code INTEGER, failure_reason TEXT NOT NULL DEFAULT '',
      last_seq INTEGER NOT NULL DEFAULT 0, create_time INTEGER NOT NULL, end_time INTEGER) STRICT`);
    db.prepare("INSERT INTO runs (dispatch_id, tenant_id, create_time) VALUES (?, ?, ?)").run("01OLD", "t-a", 1000);
    db.close();
    const store = new SqliteTelemetryStore(old, { defaultRetentionMs: 5000 });
    expect((await store.getRun("01OLD"))?.expireTimeMs).toBe(6000);
    expect(await store.deleteExpired(6000, 10)).toBe(1);
    await store.close();
    rmSync(old, { recursive: true, force: true });
  });
});
