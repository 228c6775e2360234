/**
 * The MongoDB adapter against the same conformance suites as SQLite, when
 * OUTPOST_TEST_MONGO_URL names a server (each test gets its own database, dropped after).
 */
import { describe, it } from "vitest";
import { ulid } from "ulid";
import { MongoClient } from "mongodb";
import { MongoDispatchStore } from "../src/store/mongo-store.ts";
import { dispatchStoreConformance, dispatcherStoreExtrasConformance } from "./store-conformance.ts";

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
