/**
 * Two real dispatcher processes sharing one SQLite file and one real Redis (a private
 * redis-server: the circuit states saved there must not outlive the test): concurrent executors
 * on both replicas never lease the same run twice, an executor long-polling replica 2 wakes
 * promptly for work created through replica 1 (Redis pub/sub, well under the 1 s re-check), an
 * agent's circuit opened by failures reported to one replica refuses creates on the other, a
 * third replica started afterwards begins with that circuit open, and a replica cut off from
 * Redis while an agent failed on its peer refuses that agent once it is back (replica 2 reaches
 * Redis through a loopback proxy the test closes).
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { internalClient } from "@outpost/platform";
import { DispatchService } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { LeaseService } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { Code, ConnectError } from "@connectrpc/connect";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { tenantIdentity } from "./helpers.ts";
import { startDispatcherProcess, stop, type Proc } from "./process-helpers.ts";
import { startCuttableRedis, type CuttableRedis } from "../../../test/support/cuttable-redis.ts";
import { signerFor } from "../../../test/support/signing.ts";

describe("two dispatcher replicas on one store and one Redis", () => {
  let dataDir: string;
  /** Replica 2 reaches it through the proxy (`proxiedUrl`), which the last test cuts. */
  let redis: CuttableRedis | undefined;
  const procs: Proc[] = [];
  const urls: string[] = [];
  const startReplica = async (redisUrl = redis!.url) => {
    // The store re-check is set far beyond the 5 s long-poll below, so only a Redis wake-up
    // can hand a poll on one replica work created on the other.
    const { baseUrl, proc } = await startDispatcherProcess(dataDir, { OUTPOST_REDIS_URL: redisUrl, OUTPOST_LOG_LEVEL: "warn", OUTPOST_QUEUE_RECHECK_MS: "60000" });
    procs.push(proc);
    urls.push(baseUrl);
  };

  beforeAll(async () => {
    dataDir = mkdtempSync(path.join(tmpdir(), "outpost-dispatcher-replicas-"));
    redis = await startCuttableRedis(path.join(dataDir, "redis"));
    await startReplica();
    await startReplica(redis.proxiedUrl);
  });

  afterAll(async () => {
    for (const proc of procs) await stop(proc);
    await redis?.stop();
    if (dataDir) rmSync(dataDir, { recursive: true, force: true });
  });

  const TENANTS = ["01JTENANTAAAAAAAAAAAAAAAAA", "01JTENANTBBBBBBBBBBBBBBBBB"] as const;
  const tenant = (i: number, t: string = TENANTS[0]) =>
    internalClient(DispatchService, { baseUrl: urls[i]!, signingKeys: signerFor(tenantIdentity(t)), identity: tenantIdentity(t) });
  /** Replica `i`'s LeaseService as executor `executorId` (an executor may only name itself). */
  const executor = (i: number, executorId: string) => {
    const identity = { kind: "service", principal: `executor/${executorId}` } as const;
    return internalClient(LeaseService, { baseUrl: urls[i]!, signingKeys: signerFor(identity), identity });
  };

  /** Leases runs on replica 1 until one of `ids` (not `skip`), and reports it failed by the agent. */
  const failOne = async (ids: Set<string>, skip?: string) => {
    for (;;) {
      const { lease } = await executor(0, "host-circuit").acquireLease({ executorId: "host-circuit", wait: durationFromMs(0) });
      if (!lease) throw new Error("the queue ran dry before the agent's runs failed");
      const dispatchId = lease.dispatch!.id;
      if (!ids.has(dispatchId) || dispatchId === skip) continue;
      await executor(0, "host-circuit").reportRunState({ dispatchId, leaseId: lease.leaseId, state: Dispatch_State.RUNNING });
      await executor(0, "host-circuit").reportRunState({ dispatchId, leaseId: lease.leaseId, state: Dispatch_State.FAILED, exitCode: 1 });
      return;
    }
  };

  /** Creates on replica `i` until one is refused (polling: peers' outcomes arrive over Redis). */
  const refusalOn = async (i: number, agent: string, attempts = 50): Promise<ConnectError | undefined> => {
    for (let n = 0; n < attempts; n++) {
      try {
        await tenant(i).createDispatch({ agent, task: "after the failures" });
        await new Promise((r) => setTimeout(r, 100));
      } catch (err) {
        return ConnectError.from(err);
      }
    }
    return undefined;
  };

  it("an executor long-polling replica 2 gets work created on replica 1 promptly", async () => {
    // Warm up both connections and let the subscriber attach.
    await executor(1, "warm").acquireLease({ executorId: "warm", wait: durationFromMs(0) });
    await new Promise((r) => setTimeout(r, 300));
    for (let i = 0; i < 5; i++) {
      const poll = executor(1, "host-2").acquireLease({ executorId: "host-2", wait: durationFromMs(20_000) });
      await new Promise((r) => setTimeout(r, 100)); // the poll is waiting on replica 2
      const created = (await tenant(0).createDispatch({ agent: "demo", task: `wake ${i}` })).dispatch!;
      const createdAt = Date.now();
      const { lease } = await poll;
      expect(lease?.dispatch?.id).toBe(created.id);
      // Woken, it answers within milliseconds; not woken, only when its 20 s wait ends (and its
      // next store re-check is 60 s away). The bound is the wait's half: a behaviour, not a speed.
      expect(Date.now() - createdAt).toBeLessThan(10_000);
    }
  });

  it("executors on both replicas lease 60 runs concurrently, none twice", async () => {
    const ids = new Set<string>();
    for (let i = 0; i < 60; i++) {
      ids.add((await tenant(i % 2, TENANTS[i % 2]).createDispatch({ agent: "demo", task: `run ${i}` })).dispatch!.id);
    }
    const leased: string[] = [];
    const worker = async (replica: number, n: number) => {
      for (;;) {
        const { lease } = await executor(replica, `host-${replica}-${n}`).acquireLease({ executorId: `host-${replica}-${n}`, wait: durationFromMs(0) });
        if (!lease) return;
        leased.push(lease.dispatch!.id);
      }
    };
    await Promise.all([0, 1, 2, 3].flatMap((n) => [worker(0, n), worker(1, n)]));
    expect(leased.length).toBe(60);
    expect(new Set(leased).size).toBe(60);
    expect(new Set(leased)).toEqual(ids);
  });

  it("five agent failures reported to replica 1 open the agent's circuit on replica 2 too", async () => {
    // claude: an agent no other test here runs, so its circuit starts closed on both replicas.
    const mine = new Set<string>();
    // Two tenants' runs: one tenant's failures alone never open an agent's circuit.
    for (let i = 0; i < 5; i++) mine.add((await tenant(0, TENANTS[i % 2]).createDispatch({ agent: "claude", task: `fails ${i}` })).dispatch!.id);
    // Replica 2 accepts claude before the failures.
    const before = (await tenant(1).createDispatch({ agent: "claude", task: "before" })).dispatch!;
    mine.add(before.id);
    // Both replicas' subscribers are attached (as in the first test) before outcomes flow.
    await new Promise((r) => setTimeout(r, 300));
    let failed = 0;
    const failNext = async () => {
      await failOne(mine, before.id);
      failed++;
    };
    while (failed < 4) await failNext();
    // Four failures open it nowhere: an outcome counted twice (e.g. a replica's own echo) would.
    await new Promise((r) => setTimeout(r, 300));
    await tenant(0).createDispatch({ agent: "claude", task: "after four, replica 1" });
    await tenant(1).createDispatch({ agent: "claude", task: "after four, replica 2" });
    await failNext();
    // The outcomes reach replica 2 over Redis: poll briefly rather than assume a delivery time.
    const refusal = await refusalOn(1, "claude");
    expect(refusal?.code).toBe(Code.Unavailable);
    expect(refusal?.rawMessage).toContain("circuit open");
    // Other agents are not affected on either replica.
    await tenant(1).createDispatch({ agent: "demo", task: "unaffected" });

    // A replica started now saw none of those outcomes; it takes up the state its peers saved.
    await startReplica();
    const late = ConnectError.from(await tenant(2).createDispatch({ agent: "claude", task: "late replica" }).catch((err: unknown) => err));
    expect(late.code).toBe(Code.Unavailable);
    expect(late.rawMessage).toContain("circuit open");
    await tenant(2).createDispatch({ agent: "demo", task: "unaffected on the late replica" });
  });

  it("a replica cut off from Redis while an agent failed on its peer refuses that agent once it is back", async () => {
    // codex: an agent no other test here runs.
    const mine = new Set<string>();
    for (let i = 0; i < 5; i++) mine.add((await tenant(0, TENANTS[i % 2]).createDispatch({ agent: "codex", task: `fails ${i}` })).dispatch!.id);
    await redis!.cut(); // replica 2 loses Redis; replica 1 keeps it
    for (let i = 0; i < 5; i++) await failOne(mine);
    await expect(tenant(0).createDispatch({ agent: "codex", task: "refused on replica 1" })).rejects.toThrow(/circuit open/);
    // Replica 2 has not heard: it still accepts codex.
    await new Promise((r) => setTimeout(r, 300));
    await tenant(1).createDispatch({ agent: "codex", task: "accepted while cut off" });
    await redis!.restore();
    // Back on Redis (its reconnect backs off up to 5 s), it reads the outcomes it missed.
    const refusal = await refusalOn(1, "codex", 150);
    expect(refusal?.code).toBe(Code.Unavailable);
    expect(refusal?.rawMessage).toContain("circuit open");
  });
});
