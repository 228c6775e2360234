/**
 * The MongoDB adapter against the same conformance suites as SQLite, when
 * OUTPOST_TEST_MONGO_URL names a server (each test gets its own database, dropped after);
 * without a server, what can be checked without one: its documents and queries, and that
 * OUTPOST_MONGO_URL selects it.
 */
import { describe, expect, it } from "vitest";
import { ulid } from "ulid";
import { MongoClient } from "mongodb";
import { createLogger, loadConfig } from "@outpost/platform";
import { dispatcherConfigShape } from "../src/config.ts";
import { startDispatcher } from "../src/service.ts";
import { fromDoc, listQuery, MongoDispatchStore, toDoc } from "../src/store/mongo-store.ts";
import { dispatchFixture, dispatchStoreConformance, dispatcherStoreExtrasConformance } from "./store-conformance.ts";
import { signingEnv } from "../../../test/support/signing.ts";

describe("MongoDispatchStore without a server", () => {
  it("stores each label as a key=value pair too, and filters on those (dotted keys are not paths)", () => {
    const record = dispatchFixture({ labels: { "app.kubernetes.io": "web", team: "core" } });
    const doc = toDoc(record);
    expect(doc._id).toBe(record.id);
    expect(doc.labelPairs).toEqual(["app.kubernetes.io=web", "team=core"]);
    expect(fromDoc(doc)).toEqual(record);
    expect(listQuery("t-a", { labels: { "app.kubernetes.io": "web" }, state: "QUEUED", agent: "claude" }, "01ZZ")).toEqual({
      tenantId: "t-a",
      _id: { $lt: "01ZZ" },
      state: "QUEUED",
      agent: "claude",
      labelPairs: { $all: ["app.kubernetes.io=web"] },
    });
    expect(listQuery("t-a", {})).toEqual({ tenantId: "t-a" });
  });

  it("selects MongoDB when OUTPOST_MONGO_URL is set: start-up fails on a dead server instead of using SQLite", async () => {
    const base = { ...signingEnv("dispatcher"), OUTPOST_DISPATCHER_PORT: "0", OUTPOST_DATA_DIR: ":memory:", OUTPOST_TELEMETRY_URL: "http://127.0.0.1:1" };
    const logger = createLogger("dispatcher-test", "silent");
    await expect(startDispatcher(loadConfig(dispatcherConfigShape, { ...base, OUTPOST_MONGO_URL: "mongodb://127.0.0.1:1/outpost" }), logger)).rejects.toThrow(/127\.0\.0\.1:1/);
    const running = await startDispatcher(loadConfig(dispatcherConfigShape, base), logger);
    await running.close();
    expect(() => loadConfig(dispatcherConfigShape, { ...base, OUTPOST_MONGO_URL: "not a url" })).toThrow(/OUTPOST_MONGO_URL/);
  }, 30_000);
});

const url = process.env.OUTPOST_TEST_MONGO_URL;

if (!url) {
  console.log("MongoDB dispatcher store: skipped (set OUTPOST_TEST_MONGO_URL to run the conformance suite against MongoDB)");
}

describe.skipIf(!url)("MongoDispatchStore", () => {
  let lastDb = "";
  const dbs: string[] = [];
  const fresh = () => {
    lastDb = `outpost_test_${ulid().toLowerCase()}`;
    dbs.push(lastDb);
    return MongoDispatchStore.connect(url!, lastDb);
  };
  dispatchStoreConformance("mongodb", fresh, () => MongoDispatchStore.connect(url!, lastDb));
  dispatcherStoreExtrasConformance("mongodb", fresh);
  it("drops its test databases", async () => {
    const client = await MongoClient.connect(url!);
    for (const db of dbs.splice(0)) await client.db(db).dropDatabase();
    await client.close();
  });
});
