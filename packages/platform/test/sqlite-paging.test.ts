import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { Worker } from "node:worker_threads";
import { Code, ConnectError } from "@connectrpc/connect";
import { decodePageToken, encodePageToken, errorInfoOf, inTransaction, openSqlite } from "@outpost/platform";
import { describe, expect, it } from "vitest";

describe("openSqlite", () => {
  // Replicas of one service started together open the same fresh file at the same moment;
  // before the fix about one start in five failed with "database is locked".
  it("lets replicas open and migrate the same fresh file at the same moment", async () => {
    const root = mkdtempSync(path.join(tmpdir(), "outpost-sqlite-open-"));
    try {
      const parties = 3;
      for (let round = 0; round < 15; round++) {
        const dataDir = path.join(root, String(round));
        const barrier = new SharedArrayBuffer(4);
        const outcomes = await Promise.all(
          Array.from({ length: parties }, () => {
            const worker = new Worker(new URL("./sqlite-open-worker.ts", import.meta.url), { workerData: { dataDir, barrier, parties } });
            return new Promise<string>((resolve, reject) => {
              worker.once("message", resolve);
              worker.once("error", reject);
            });
          }),
        );
        expect(outcomes).toEqual(Array(parties).fill("ok"));
        const db = openSqlite(dataDir, "shared.db");
        expect(db.prepare("PRAGMA journal_mode").get()).toEqual({ journal_mode: "wal" });
        expect(db.prepare("PRAGMA table_info(items)").all().map((c) => c.name)).toEqual(["id", "added"]);
        db.close();
      }
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
});

describe("inTransaction", () => {
  const count = (db: ReturnType<typeof openSqlite>) => (db.prepare("SELECT COUNT(*) AS n FROM t").get() as { n: number }).n;

  it("commits what fn wrote and returns its result", () => {
    const db = openSqlite(":memory:", "unused.db");
    db.exec("CREATE TABLE t (x INTEGER)");
    expect(inTransaction(db, () => (db.prepare("INSERT INTO t VALUES (1)").run(), "done"))).toBe("done");
    expect(count(db)).toBe(1);
  });

  it("rolls back every write when fn throws, rethrows, and leaves the db usable", () => {
    const db = openSqlite(":memory:", "unused.db");
    db.exec("CREATE TABLE t (x INTEGER)");
    const boom = new Error("boom");
    expect(() =>
      inTransaction(db, () => {
        db.prepare("INSERT INTO t VALUES (1)").run();
        db.prepare("INSERT INTO t VALUES (2)").run();
        throw boom;
      }),
    ).toThrow(boom);
    expect(count(db)).toBe(0);
    expect(db.isTransaction).toBe(false);
    inTransaction(db, () => db.prepare("INSERT INTO t VALUES (3)").run());
    expect(count(db)).toBe(1);
  });
});

describe("page tokens", () => {
  it("round-trips a cursor", () => {
    const cursor = { createdAt: 1_700_000_000_000, id: "01HZX" };
    const token = encodePageToken(cursor);
    expect(token).toMatch(/^[A-Za-z0-9_-]+$/);
    expect(decodePageToken<typeof cursor>(token, { createdAt: "number", id: "string" })).toEqual(cursor);
  });

  it("treats the empty token as the first page", () => {
    expect(decodePageToken("", { id: "string" })).toBeUndefined();
  });

  it("refuses garbage with INVALID_ARGUMENT naming page_token", () => {
    const garbage = [
      "%%%",
      "not-a-token",
      Buffer.from("null").toString("base64url"),
      Buffer.from("42").toString("base64url"),
      encodePageToken({ other: 1 }),
      Buffer.from(JSON.stringify({ id: { $gt: "" }, at: 1 })).toString("base64url"), // a crafted object where a string belongs
      encodePageToken({ id: "01HZX", at: "1" }),
      Buffer.from('{"id":"01HZX","at":1e999}').toString("base64url"), // Infinity
      Buffer.from('{"id":"01HZX"}').toString("base64url"),
    ];
    for (const token of garbage) {
      let caught: unknown;
      try {
        decodePageToken<{ id: string; at: number }>(token, { id: "string", at: "number" });
      } catch (err) {
        caught = err;
      }
      expect(caught, token).toBeInstanceOf(ConnectError);
      const err = caught as ConnectError;
      expect(err.code).toBe(Code.InvalidArgument);
      expect(errorInfoOf(err)).toMatchObject({ reason: "PAGE_TOKEN_INVALID", metadata: { field: "page_token" } });
    }
  });
});
