/**
 * Scale-out failure test (issue #7, SPEC O3): the two-of-everything topology on one machine
 * (scripts/lib/scale-out.ts: private Redis, shared SQLite store, loopback balancers) under a
 * load of N dispatches of the demo agent (200 by default; OUTPOST_SCALE_OUT_DISPATCHES), while
 * one replica of each kind is killed with SIGKILL in turn and restarted. Asserts: every
 * dispatch reaches a terminal state, none is lost (every create's request_id maps to one
 * dispatch, and the tenant lists exactly those), none runs twice (Docker `start` events per
 * dispatch-id label), no container is orphaned; prints the client-visible error rate during
 * each failover.
 *
 * It depends on Redis wake-ups between dispatchers, executor reconciliation after a crash and
 * telemetry fan-out between replicas. Takes about two minutes for 200 dispatches on two cores;
 * OUTPOST_SKIP_SCALE_OUT_TEST=1 skips it on a machine where that is too long.
 */
import { randomBytes } from "node:crypto";
import { mkdtempSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import Docker from "dockerode";
import { Code, ConnectError } from "@connectrpc/connect";
import { outpostClients, type OutpostClients } from "@outpost/cli";
import { internalClient } from "@outpost/platform";
import { keysOf, TEST_SIGNING_KEY_SET } from "../support/signing.ts";
import { DispatchService } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { Tier } from "@outpost/proto/outpost/tenant/v1/tenant_pb.js";
import { startScaleOut, type ScaleOut } from "../../scripts/lib/scale-out.ts";
import type { ServiceName } from "../../scripts/lib/mesh.ts";
import { MethodStats, type FailureWindow } from "../../load/stats.ts";
import { isTerminal } from "../../load/workload.ts";

const LABEL = "dev.outpost.dispatch-id";
const COUNT = Number(process.env.OUTPOST_SCALE_OUT_DISPATCHES ?? 200);
/** Clients creating at once, so several creates are in flight when a replica is killed. */
const CREATORS = 4;
// What a client sees when a replica dies under its call: the gateway answers UNAVAILABLE for a
// dead upstream; a gateway dying under the client's own connection is reported by connect-node's
// client as ABORTED (ECONNRESET) or INTERNAL (other socket errors). The client retries those with
// the same request_id, as any client surviving a failover does. CANCELED is not retried: nobody
// cancelled, so a CANCELED answer would be a gateway bug and fail the test.
const RETRYABLE = new Set([Code.Unavailable, Code.Unknown, Code.Internal, Code.DeadlineExceeded, Code.Aborted]);
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

const docker = new Docker();
let topology: ScaleOut | undefined;

afterAll(async () => {
  await topology?.stop();
});

/** Retries a call on transport-level failures (a replica died under it), counting each failure. */
async function withRetry<T>(stats: MethodStats, method: string, call: () => Promise<T>, attempts = 30): Promise<T> {
  for (let i = 1; ; i++) {
    const started = performance.now();
    try {
      const result = await call();
      stats.record(method, performance.now() - started);
      return result;
    } catch (err) {
      // The tenant's concurrent-run quota is back-pressure, not a fault: wait as a client would.
      if (ConnectError.from(err).code === Code.ResourceExhausted) {
        await sleep(500);
        i--;
        continue;
      }
      stats.fail(method, err);
      if (!RETRYABLE.has(ConnectError.from(err).code) || i >= attempts) throw err;
      await sleep(Math.min(2000, 100 * i));
    }
  }
}

describe("scale-out topology under failover", () => {
  it.skipIf(Boolean(process.env.OUTPOST_SKIP_SCALE_OUT_TEST))(
    `runs ${COUNT} dispatches to a terminal state exactly once while one replica of each kind is killed and restarted`,
    { timeout: 15 * 60_000 },
    async () => {
      await docker.ping();
      const dir = mkdtempSync(path.join(os.tmpdir(), "outpost-scale-out-test-"));
      const adminToken = randomBytes(32).toString("hex");
      topology = await startScaleOut({
        dataDir: path.join(dir, "data"),
        logDir: path.join(dir, "logs"),
        signingKeys: TEST_SIGNING_KEY_SET,
        adminToken,
        env: {
          OUTPOST_LOG_LEVEL: "info",
          OUTPOST_LEASE_TTL_MS: "5000",
          OUTPOST_EXECUTOR_SLOTS: "3",
          OUTPOST_EXECUTOR_ID: `scale-test-${process.pid}`,
          OUTPOST_EXECUTOR_SHUTDOWN_GRACE_MS: "5000",
          OUTPOST_RATE_LIMITS: "create=100000,trigger=100000,read=10000000",
          OUTPOST_RATE_LIMITS_PER_IP: "create=100000,trigger=100000,read=10000000",
        },
      });
      const { mesh } = topology;
      const gateway = mesh.urls.gateway;
      const admin = outpostClients(gateway, adminToken);
      const created = await admin.tenants.createTenant({ name: "Scale-out test", contactEmail: "ops@example.com", tier: Tier.ENTERPRISE });
      const clients: OutpostClients = outpostClients(gateway, created.apiKeyPlaintext);
      const run = `so-${Date.now()}`;

      // Idempotency across replicas: the same request_id sent to both dispatcher processes at
      // once (as the tenant, the way the gateways call them) creates exactly one dispatch.
      const tenantId = created.tenant!.id;
      const direct = mesh.instances("dispatcher").map((d) =>
        internalClient(DispatchService, { baseUrl: d.url, signingKeys: keysOf("gateway"), identity: { kind: "tenant", tenantId, principal: `key/${tenantId}` } }),
      );
      expect(direct).toHaveLength(2);
      const twinIds = await Promise.all(
        Array.from({ length: 10 }, (_, i) =>
          direct[i % 2]!.createDispatch({ agent: "demo", task: "twin lines=1", requestId: `${run}-twin`, labels: { run: `${run}-twin` } }).then((r) => r.dispatch!.id),
        ),
      );
      expect(new Set(twinIds).size, "one dispatch for one request_id across both replicas").toBe(1);
      const twinListed = await clients.dispatches.listDispatches({ labels: { run: `${run}-twin` } });
      expect(twinListed.dispatches.map((d) => d.id)).toEqual([twinIds[0]]);

      // Container starts per dispatch, from the engine itself.
      const starts = new Map<string, number>();
      const events = (await docker.getEvents({ filters: { type: ["container"], event: ["start"], label: [LABEL] } })) as NodeJS.ReadableStream;
      let buffered = "";
      events.on("data", (chunk: Buffer) => {
        buffered += chunk.toString();
        let nl: number;
        while ((nl = buffered.indexOf("\n")) >= 0) {
          const line = buffered.slice(0, nl);
          buffered = buffered.slice(nl + 1);
          const id = (JSON.parse(line) as { Actor?: { Attributes?: Record<string, string> } }).Actor?.Attributes?.[LABEL];
          if (id) starts.set(id, (starts.get(id) ?? 0) + 1);
        }
      });

      const stats = new MethodStats();
      const ids = new Map<string, string>(); // request_id -> dispatch id
      let chaosDone = false;

      // CREATORS clients, each creating every CREATORS-th dispatch, one every 600 ms: together
      // one every 150 ms as before, with several in flight when a replica dies.
      async function creator(first: number) {
        await sleep(150 * first);
        for (let n = first; n < COUNT; n += CREATORS) {
          const requestId = `${run}-${n}`;
          const res = await withRetry(stats, "CreateDispatch", () =>
            clients.dispatches.createDispatch({ agent: "demo", task: `scale-out ${n} lines=2`, requestId, labels: { run } }),
          );
          ids.set(requestId, res.dispatch!.id);
          await sleep(150 * CREATORS);
        }
      }

      async function reader() {
        // Readers run through every failover window, so each has client calls to measure.
        while (!chaosDone) {
          const all = [...ids.values()];
          if (all.length) {
            const dispatchId = all[Math.floor(Math.random() * all.length)]!;
            await stats.time("GetDispatch", () => clients.dispatches.getDispatch({ dispatchId }));
          }
          await sleep(50);
        }
      }

      const failovers: ({ service: ServiceName; errorRate: number } & FailureWindow)[] = [];
      async function chaos() {
        const order: ServiceName[] = ["gateway", "dispatcher", "telemetry", "executor"];
        for (const [i, service] of order.entries()) {
          await sleep(4000);
          const index = i % 2;
          stats.openWindow();
          await mesh.killReplica(service, index, "SIGKILL");
          await sleep(2000);
          await mesh.startReplica(service, index);
          await sleep(2000);
          failovers.push({ service, ...stats.closeWindow() });
        }
        chaosDone = true;
      }

      const creators = Array.from({ length: CREATORS }, (_, i) => creator(i));
      await Promise.all([...creators, reader(), reader(), chaos()]);
      expect(ids.size).toBe(COUNT);
      expect(new Set(ids.values()).size).toBe(COUNT);

      // Every dispatch reaches a terminal state (bounded wait).
      const final = new Map<string, Dispatch_State>();
      const deadline = Date.now() + 8 * 60_000;
      while (final.size < COUNT && Date.now() < deadline) {
        for (const id of ids.values()) {
          if (final.has(id)) continue;
          const res = await withRetry(stats, "GetDispatch", () => clients.dispatches.getDispatch({ dispatchId: id }));
          if (isTerminal(res.dispatch!.state)) final.set(id, res.dispatch!.state);
        }
        if (final.size < COUNT) await sleep(1000);
      }
      // Let executors remove the last containers before looking for orphans.
      await sleep(3000);
      (events as unknown as { destroy(): void }).destroy();

      const byState = new Map<string, number>();
      for (const state of final.values()) byState.set(Dispatch_State[state], (byState.get(Dispatch_State[state]) ?? 0) + 1);
      const twice = [...starts].filter(([id, n]) => n > 1 && [...ids.values()].includes(id));
      const leftovers = await docker.listContainers({ all: true, filters: { label: [LABEL] } });
      const orphans = leftovers.filter((c) => [...ids.values()].includes(c.Labels[LABEL] ?? ""));

      process.stdout.write(
        [
          `scale-out: ${COUNT} dispatches; terminal ${final.size}; states ${JSON.stringify(Object.fromEntries(byState))}`,
          ...failovers.map((f) => `  failover ${f.service}: ${f.requests} client calls, ${f.errors} errors, error rate ${(f.errorRate * 100).toFixed(2)}% ${JSON.stringify(f.errorCodes)}`),
          `  containers started twice: ${twice.length}; orphaned: ${orphans.length}`,
        ].join("\n") + "\n",
      );

      expect(final.size, "dispatches not terminal").toBe(COUNT);
      // None lost: the tenant's list for this run holds exactly the dispatches created.
      const listed = new Set<string>();
      let pageToken = "";
      do {
        const page = await withRetry(stats, "ListDispatches", () => clients.dispatches.listDispatches({ pageSize: 100, pageToken, labels: { run } }));
        for (const d of page.dispatches) listed.add(d.id);
        pageToken = page.nextPageToken;
      } while (pageToken);
      expect([...listed].sort()).toEqual([...ids.values()].sort());
      expect(twice, "dispatches whose container started more than once").toEqual([]);
      expect(orphans.map((c) => c.Labels[LABEL]), "orphaned containers").toEqual([]);
      // Runs that succeeded actually ran (a start event each).
      for (const [id, state] of final) if (state === Dispatch_State.SUCCEEDED) expect(starts.get(id), id).toBe(1);
    },
  );
});
