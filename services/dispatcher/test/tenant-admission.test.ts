/**
 * The dispatcher's TenantAdmission adapter against a real tenant service on a real port
 * (contract A): admission and release over gRPC, the tenant service's errors passed through
 * unchanged, the suspended-tenant cache, an unreachable tenant service as UNAVAILABLE, and the
 * day's count after parallel creates with one request id (read from the tenant service's store).
 */
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { Code, ConnectError } from "@connectrpc/connect";
import { ulid } from "ulid";
import { createLogger, errorInfoOf, internalClient } from "@outpost/platform";
import { Tier } from "@outpost/proto/outpost/tenant/v1/tenant_pb.js";
import { TenantService } from "@outpost/proto/outpost/tenant/v1/tenant_service_pb.js";
import { utcDay } from "../../tenant/src/core/admission.ts";
import { startTenant, type RunningTenant } from "../../tenant/src/service.ts";
import { SqliteTenantStore } from "../../tenant/src/store/sqlite-store.ts";
import { GrpcTenantAdmission } from "../src/adapters/tenant-admission.ts";
import type { CreateDispatchInput } from "../src/core/dispatcher.ts";
import type { TenantAdmission } from "../src/core/ports.ts";
import { AgentRegistry, builtinAgents } from "../src/core/agents.ts";
import { Dispatcher } from "../src/core/dispatcher.ts";
import { Notifier } from "../src/core/notifier.ts";
import { SqliteDispatchStore } from "../src/store/sqlite-store.ts";
import { startFreezableProxy } from "../../../test/support/freezable-proxy.ts";
import { keysOf, signerFor, signingEnv } from "../../../test/support/signing.ts";

let tenantService: RunningTenant;
/** The tenant service's own store, to read a tenant's usage. */
let tenantStore: SqliteTenantStore;

beforeAll(async () => {
  tenantStore = new SqliteTenantStore(":memory:");
  tenantService = await startTenant(
    {
      ...signingEnv("tenant"),
      OUTPOST_TENANT_HOST: "127.0.0.1",
      OUTPOST_TENANT_PORT: 0,
      OUTPOST_DATA_DIR: ":memory:",
      OUTPOST_SECRETS_MASTER_KEYS: `k1:${Buffer.alloc(32, 4).toString("base64")}`,
    },
    createLogger("tenant-test", "silent"),
    tenantStore,
  );
});

afterAll(async () => {
  await tenantService?.close();
});

const admin = () => internalClient(TenantService, { baseUrl: tenantService.url, signingKeys: signerFor({ kind: "admin", principal: "admin" }), identity: { kind: "admin", principal: "admin" } });

async function failure(p: Promise<unknown>): Promise<ConnectError> {
  return p.then(
    () => {
      throw new Error("expected a failure");
    },
    (e: unknown) => ConnectError.from(e),
  );
}

describe("GrpcTenantAdmission", () => {
  it("admits up to the tier's concurrent limit, answers its max timeout, and release frees a slot", async () => {
    const { tenant } = await admin().createTenant({ name: "A", contactEmail: "a@a.test", tier: Tier.FREE }); // default free: 2 concurrent, 600 s
    const adapter = new GrpcTenantAdmission({ baseUrl: tenantService.url, signingKeys: keysOf("dispatcher") });
    const first = ulid();
    expect(await adapter.admit(tenant!.id, first, [], 30_000)).toEqual({ maxTimeoutMs: 600_000, logRetentionMs: 7 * 86_400_000, resourceCaps: { cpuMillis: 1000, memoryBytes: 1024 ** 3, pidsLimit: 256 } });
    await adapter.admit(tenant!.id, ulid(), [], undefined);
    const err = await failure(adapter.admit(tenant!.id, ulid(), [], undefined));
    expect(err.code).toBe(Code.ResourceExhausted);
    expect(errorInfoOf(err)?.metadata.quota).toBe("concurrent_runs");
    await adapter.release(tenant!.id, first);
    await adapter.release(tenant!.id, first); // idempotent
    await adapter.admit(tenant!.id, ulid(), [], undefined);
  });

  it("a requested timeout past what a Duration holds (a client's int64 max seconds for 'no limit') is capped by the tier, not an internal error", async () => {
    const { tenant } = await admin().createTenant({ name: "Huge", contactEmail: "h@h.test", tier: Tier.FREE });
    const adapter = new GrpcTenantAdmission({ baseUrl: tenantService.url, signingKeys: keysOf("dispatcher") });
    // What durationMs makes of { seconds: 2^63 - 1 }: 9.2e21 ms, whose seconds no longer fit an int64.
    const admitted = await adapter.admit(tenant!.id, ulid(), [], Number(9223372036854775807n) * 1000);
    expect(admitted.maxTimeoutMs).toBe(600_000);
  });

  it("passes SECRET_NOT_FOUND and TENANT_SUSPENDED through unchanged", async () => {
    const { tenant } = await admin().createTenant({ name: "B", contactEmail: "b@b.test" });
    const adapter = new GrpcTenantAdmission({ baseUrl: tenantService.url, signingKeys: keysOf("dispatcher") });
    const missing = await failure(adapter.admit(tenant!.id, ulid(), ["NOPE"], undefined));
    expect(missing.code).toBe(Code.NotFound);
    expect(errorInfoOf(missing)?.metadata.secret).toBe("NOPE");
    await admin().suspendTenant({ tenantId: tenant!.id, reason: "test" });
    const suspended = await failure(adapter.admit(tenant!.id, ulid(), [], undefined));
    expect(suspended.code).toBe(Code.PermissionDenied);
    expect(errorInfoOf(suspended)?.reason).toBe("TENANT_SUSPENDED");
  });

  it("caches the suspended-tenant list for its age, then asks again", async () => {
    let now = 1_000_000;
    const adapter = new GrpcTenantAdmission({ baseUrl: tenantService.url, signingKeys: keysOf("dispatcher"), suspendedCacheMs: 3000, now: () => now });
    const { tenant } = await admin().createTenant({ name: "C", contactEmail: "c@c.test" });
    const before = await adapter.suspendedTenants();
    expect(before.has(tenant!.id)).toBe(false);
    await admin().suspendTenant({ tenantId: tenant!.id, reason: "test" });
    now += 2000;
    expect((await adapter.suspendedTenants()).has(tenant!.id)).toBe(false); // still cached
    now += 1500;
    expect((await adapter.suspendedTenants()).has(tenant!.id)).toBe(true);
  });

  it("an unreachable tenant service is UNAVAILABLE for admission, and a failure for the suspended list", async () => {
    const adapter = new GrpcTenantAdmission({ baseUrl: "http://127.0.0.1:1", signingKeys: keysOf("dispatcher"), callTimeoutMs: 2000 });
    const err = await failure(adapter.admit(ulid(), ulid(), [], undefined));
    expect(err.code).toBe(Code.Unavailable);
    expect(errorInfoOf(err)?.reason).toBe("TENANT_SERVICE_UNAVAILABLE");
    await expect(adapter.suspendedTenants()).rejects.toBeInstanceOf(ConnectError);
  });
});

function dispatcherOver(store: SqliteDispatchStore, admission: TenantAdmission): Dispatcher {
  return new Dispatcher({
    store,
    agents: new AgentRegistry(builtinAgents("outpost/demo-agent:test")),
    notifier: new Notifier(),
    runEvents: { runCreated: async () => {}, runEnded: async () => {} },
    logger: createLogger("dispatcher-test", "silent"),
    leaseTtlMs: 30_000,
    maxTimeoutMs: 600_000,
    admission,
    releaseRetryBaseMs: 100,
  });
}

const createInput = (requestId = ""): CreateDispatchInput => ({ agent: "demo", task: "t", repoUrl: "", repoRef: "", secretNames: [], env: {}, labels: {}, requestId, traceparent: "" });

describe("parallel creates with one request id", () => {
  it("count one run of the day: the ids that lost the insert race give back their day as well as their slot", async () => {
    const { tenant } = await admin().createTenant({ name: "Retries", contactEmail: "r@r.test", tier: Tier.PRO });
    const tenantId = tenant!.id;
    const N = 5;
    const grpc = new GrpcTenantAdmission({ baseUrl: tenantService.url, signingKeys: keysOf("dispatcher") });
    // Every create is held at admission until all N have passed the request-id lookup, so all N
    // are admitted and race to insert (otherwise a later one could find the first stored).
    let arrived = 0;
    let allArrived!: () => void;
    const barrier = new Promise<void>((resolve) => (allArrived = resolve));
    const releases: { id: string; neverCreated: boolean }[] = [];
    const admission: TenantAdmission = {
      admit: async (...args) => {
        if (++arrived === N) allArrived();
        await barrier;
        return grpc.admit(...args);
      },
      release: async (tenant, id, options) => {
        await grpc.release(tenant, id, options);
        releases.push({ id, neverCreated: options?.neverCreated === true });
      },
      suspendedTenants: () => grpc.suspendedTenants(),
    };
    const store = new SqliteDispatchStore(":memory:");
    const dispatcher = dispatcherOver(store, admission);
    try {
      const created = await Promise.all(Array.from({ length: N }, () => dispatcher.create(tenantId, createInput("same-request"))));
      expect(arrived).toBe(N);
      const stored = created[0]!;
      expect(created.every((d) => d.id === stored.id)).toBe(true);
      expect(await store.list(tenantId, {}, 10)).toHaveLength(1);
      // The N-1 ids never stored were released as never created; the stored one holds its slot.
      expect(releases).toHaveLength(N - 1);
      expect(releases.every((r) => r.neverCreated && r.id !== stored.id)).toBe(true);
      expect(await tenantStore.usageOf(tenantId, utcDay(new Date()))).toEqual({ activeRuns: 1, runsToday: 1 });

      // The stored run's own release (it ended) frees its slot and keeps its day.
      await dispatcher.cancel(tenantId, stored.id);
      expect(releases.at(-1)).toEqual({ id: stored.id, neverCreated: false });
      expect(await tenantStore.usageOf(tenantId, utcDay(new Date()))).toEqual({ activeRuns: 0, runsToday: 1 });
    } finally {
      await store.close();
    }
  });
});

describe("an admission whose answer is lost", () => {
  it("is released by the dispatcher, so the slot the tenant service recorded is not held for good", async () => {
    const { tenant } = await admin().createTenant({ name: "Lost answer", contactEmail: "l@l.test", tier: Tier.FREE }); // 2 concurrent
    const proxy = await startFreezableProxy(Number(new URL(tenantService.url).port));
    const store = new SqliteDispatchStore(":memory:");
    const dispatcher = dispatcherOver(store, new GrpcTenantAdmission({ baseUrl: proxy.url, signingKeys: keysOf("dispatcher"), callTimeoutMs: 500 }));
    try {
      // The first call sets up the connection; then the tenant service's answers are lost.
      await dispatcher.admission.suspendedTenants();
      proxy.muteReplies();
      const err = await failure(dispatcher.create(tenant!.id, createInput()));
      expect(err.code).toBe(Code.Unavailable);
      expect(await store.list(tenant!.id, {}, 10)).toEqual([]);
      // The tenant service recorded that admission and then the dispatcher's release of it (the
      // requests got through; only the answers were lost): the slot and the run of the day are
      // given back (the release says the id was never created), whichever arrived first.
      await vi.waitFor(async () => expect(await tenantStore.usageOf(tenant!.id, utcDay(new Date()))).toEqual({ activeRuns: 0, runsToday: 0 }), {
        timeout: 10_000,
        interval: 100,
      });
      // Both slots are free.
      const direct = new GrpcTenantAdmission({ baseUrl: tenantService.url, signingKeys: keysOf("dispatcher") });
      await vi.waitFor(async () => {
        const first = ulid();
        await direct.admit(tenant!.id, first, [], undefined);
        await direct.admit(tenant!.id, ulid(), [], undefined).finally(() => direct.release(tenant!.id, first));
      }, { timeout: 10_000, interval: 250 });
    } finally {
      await proxy.close();
      await store.close();
    }
  });
});
