import { Code, ConnectError } from "@connectrpc/connect";
import { decodePageToken, encodePageToken, errorInfoOf, inTransaction, openSqlite } from "@outpost/platform";
import { describe, expect, it } from "vitest";

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
    expect(decodePageToken<typeof cursor>(token, ["createdAt", "id"])).toEqual(cursor);
  });

  it("treats the empty token as the first page", () => {
    expect(decodePageToken("", ["id"])).toBeUndefined();
  });

  it("refuses garbage with INVALID_ARGUMENT naming page_token", () => {
    const garbage = [
      "%%%",
      "not-a-token",
      Buffer.from("null").toString("base64url"),
      Buffer.from("42").toString("base64url"),
      encodePageToken({ other: 1 }),
    ];
    for (const token of garbage) {
      let caught: unknown;
      try {
        decodePageToken(token, ["id"]);
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
