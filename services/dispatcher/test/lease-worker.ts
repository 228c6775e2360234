/**
 * Worker thread for the cross-connection lease test: opens its own SqliteDispatchStore on the
 * shared data directory (as a second dispatcher replica would) and leases until the queue is empty.
 */
import { parentPort, workerData } from "node:worker_threads";
import { ulid } from "ulid";
import { SqliteDispatchStore } from "../src/store/sqlite-store.ts";

const { dataDir, name, emptyPollsToStop } = workerData as { dataDir: string; name: string; emptyPollsToStop: number };
const store = new SqliteDispatchStore(dataDir);
const leased: string[] = [];
let empty = 0;
while (empty < emptyPollsToStop) {
  const now = Date.now();
  const got = await store.leaseNext({ executorId: `executor/${name}`, leaseId: ulid(now), expiresAt: now + 30_000, now });
  if (got) leased.push(got.id);
  else empty++;
}
await store.close();
parentPort!.postMessage(leased);
