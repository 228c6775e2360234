/**
 * OpenStreams (core/open-streams.ts) over a real Authenticator whose tenant-service lookup the
 * test controls: open streams end with their credential's refusal when an invalidation or the
 * periodic re-check finds it revoked, and only then. Across real processes and every protocol:
 * test/mesh/edge-redis.test.ts and test/mesh/stream-revocation.test.ts.
 */
import { createHash } from "node:crypto";
import { Code, ConnectError } from "@connectrpc/connect";
import { errorInfoOf, unauthenticated, unavailable, permissionDenied } from "@outpost/platform";
import { afterEach, describe, expect, it, vi } from "vitest";
import { Authenticator, type KeyLookup } from "../src/core/authenticator.ts";
import { OpenStreams } from "../src/core/open-streams.ts";

const ADMIN_TOKEN = "admin-token-0123456789abcdef-0123456789";
const KEY_A = `otp_${"a1".repeat(32)}`;
const KEY_B = `otp_${"b2".repeat(32)}`;
const KEY_C = `otp_${"c3".repeat(32)}`;
const TENANT_OF: Record<string, string> = { [KEY_A]: "T1", [KEY_B]: "T2", [KEY_C]: "T1" };

const bearer = (key: string) => new Headers({ authorization: `Bearer ${key}`, "user-agent": "test" });
const hashOf = (key: string) => createHash("sha256").update(key).digest("hex");
const silent = { info() {}, warn() {} };

/** The tenant service as the test sets it: each key valid, revoked, suspended, or unreachable. */
function tenantService() {
  const state = new Map<string, "valid" | "revoked" | "suspended" | "down" | "gateway refused">([KEY_A, KEY_B, KEY_C].map((k) => [k, "valid"]));
  const lookup: KeyLookup = async (apiKey) => {
    switch (state.get(apiKey)) {
      case "revoked":
        throw unauthenticated("API_KEY_REVOKED", "the API key has been revoked");
      case "suspended":
        throw permissionDenied("TENANT_SUSPENDED", "the tenant is suspended");
      case "down":
        throw unavailable("TENANT_DOWN", "unreachable");
      case "gateway refused":
        // The tenant service refusing the gateway's own call (its identity expired), not the key.
        throw unauthenticated("IDENTITY_EXPIRED", "the signed identity has expired");
      default:
        return { tenantId: TENANT_OF[apiKey]!, apiKeyId: apiKey.slice(4, 8) };
    }
  };
  return { state, lookup: vi.fn(lookup) };
}

const created: OpenStreams[] = [];
afterEach(() => {
  for (const streams of created.splice(0)) streams.close();
});

function setup(options: { cacheTtlMs?: number; recheckMs?: number } = {}) {
  const service = tenantService();
  const auth = new Authenticator({ adminToken: ADMIN_TOKEN, cacheTtlMs: options.cacheTtlMs ?? 60_000, lookup: service.lookup });
  const streams = new OpenStreams({ authenticator: auth, recheckMs: options.recheckMs ?? 3_600_000, logger: silent });
  created.push(streams);
  /** Opens a stream as a real call would: authenticated first, then watched. */
  const open = async (key: string) => {
    const header = bearer(key);
    const identity = await auth.authenticate(header);
    const ended: ConnectError[] = [];
    const unwatch = streams.watch(header, identity, (refusal) => ended.push(refusal));
    return { ended, unwatch };
  };
  return { ...service, auth, streams, open };
}

const settle = () => new Promise((r) => setTimeout(r, 10));

describe("OpenStreams", () => {
  it("ends every open stream of a key when its revocation is announced, with the tenant service's refusal, and no other key's", async () => {
    const { auth, state, open, streams } = setup();
    const [a1, a2, b, c] = [await open(KEY_A), await open(KEY_A), await open(KEY_B), await open(KEY_C)];
    expect(streams.size).toBe(4);
    state.set(KEY_A, "revoked");
    auth.invalidate(hashOf(KEY_A));
    await settle();
    for (const stream of [a1, a2]) {
      expect(stream.ended.map((e) => [e.code, errorInfoOf(e)?.reason])).toEqual([[Code.Unauthenticated, "API_KEY_REVOKED"]]);
    }
    // Key C is the same tenant's but was not revoked; B is another tenant's.
    expect([b.ended, c.ended]).toEqual([[], []]);
    expect(streams.size).toBe(2);
  });

  it("checks a suspended tenant's keys when the tenant is announced, and ends their streams with PERMISSION_DENIED", async () => {
    const { auth, state, open, lookup } = setup();
    const [a, b, c] = [await open(KEY_A), await open(KEY_B), await open(KEY_C)];
    state.set(KEY_A, "suspended");
    state.set(KEY_C, "suspended");
    const before = lookup.mock.calls.length;
    auth.invalidate("tenant:T1");
    await settle();
    expect(a.ended.map((e) => errorInfoOf(e)?.reason)).toEqual(["TENANT_SUSPENDED"]);
    expect(c.ended.map((e) => e.code)).toEqual([Code.PermissionDenied]);
    expect(b.ended).toEqual([]);
    // Only T1's two keys were asked about.
    expect(lookup.mock.calls.slice(before).map(([key]) => key).sort()).toEqual([KEY_A, KEY_C].sort());
  });

  it("keeps a stream whose key is still valid after an invalidation (a tier change, say) or cannot be checked now, and ends it when a later check refuses it", async () => {
    const { auth, state, open } = setup({ recheckMs: 30 });
    const a = await open(KEY_A);
    auth.invalidate("tenant:T1"); // still valid
    await settle();
    expect(a.ended).toEqual([]);
    state.set(KEY_A, "down");
    auth.invalidate(hashOf(KEY_A));
    await settle();
    expect(a.ended, "an unreachable tenant service does not end streams").toEqual([]);
    // The periodic check asks again (the key is not cached: its lookups failed).
    state.set(KEY_A, "revoked");
    await vi.waitFor(() => expect(a.ended.map((e) => e.code)).toEqual([Code.Unauthenticated]), { timeout: 2000, interval: 10 });
  });

  it("keeps every stream open while the tenant service refuses the gateway's own call (not the key), and new calls get UNAVAILABLE", async () => {
    const { auth, state, open } = setup();
    const [a, b] = [await open(KEY_A), await open(KEY_B)];
    state.set(KEY_A, "gateway refused");
    state.set(KEY_B, "gateway refused");
    auth.invalidateAll();
    await settle();
    expect([a.ended, b.ended]).toEqual([[], []]);
    const refused = await auth.authenticate(bearer(KEY_A)).catch((err: ConnectError) => err);
    expect([(refused as ConnectError).code, errorInfoOf(refused as ConnectError)?.reason]).toEqual([Code.Unavailable, "AUTH_UNAVAILABLE"]);
  });

  it("sweeps again after a sweep asked for while one was running (a reconnect during a slow sweep)", async () => {
    const { auth, state, open, lookup } = setup();
    const [a, b] = [await open(KEY_A), await open(KEY_B)];
    // B's lookups are slow: the first sweep is still running when the second is asked for.
    lookup.mockImplementation(async (apiKey) => {
      if (apiKey === KEY_B) await new Promise((r) => setTimeout(r, 100));
      if (state.get(apiKey) === "revoked") throw unauthenticated("API_KEY_REVOKED", "the API key has been revoked");
      return { tenantId: TENANT_OF[apiKey]!, apiKeyId: "k" };
    });
    auth.invalidateAll();
    await settle(); // A checked (valid) by the first sweep; B still being checked
    expect(a.ended).toEqual([]);
    state.set(KEY_A, "revoked");
    auth.invalidateAll();
    await vi.waitFor(() => expect(a.ended.map((e) => e.code)).toEqual([Code.Unauthenticated]), { timeout: 1000, interval: 10 });
    expect(b.ended).toEqual([]);
  });

  it("ends a revoked key's streams on the periodic check without any invalidation, once the cached trust expired", async () => {
    const { state, open } = setup({ cacheTtlMs: 40, recheckMs: 20 });
    const a = await open(KEY_A);
    const b = await open(KEY_B);
    state.set(KEY_A, "revoked");
    await vi.waitFor(() => expect(a.ended.map((e) => errorInfoOf(e)?.reason)).toEqual(["API_KEY_REVOKED"]), { timeout: 2000, interval: 10 });
    await new Promise((r) => setTimeout(r, 100)); // several more checks
    expect(a.ended).toHaveLength(1); // ended once
    expect(b.ended).toEqual([]);
  });

  it("checks every open stream's key after the invalidation channel reconnected (invalidateAll)", async () => {
    const { auth, state, open } = setup();
    const [a, b] = [await open(KEY_A), await open(KEY_B)];
    state.set(KEY_B, "revoked");
    auth.invalidateAll();
    await settle();
    expect(a.ended).toEqual([]);
    expect(b.ended.map((e) => e.code)).toEqual([Code.Unauthenticated]);
  });

  it("does not end a stream after it ended by itself, and forgets keys whose streams all ended", async () => {
    const { auth, state, open, streams, lookup } = setup();
    const a = await open(KEY_A);
    a.unwatch();
    expect(streams.size).toBe(0);
    state.set(KEY_A, "revoked");
    const before = lookup.mock.calls.length;
    auth.invalidate(hashOf(KEY_A));
    await settle();
    expect(a.ended).toEqual([]);
    expect(lookup.mock.calls.length, "a key with no open streams is not asked about").toBe(before);
  });

  it("does not trust a lookup that was under way when the revocation was announced", async () => {
    const { auth, state, open, lookup } = setup({ cacheTtlMs: 1 });
    const a = await open(KEY_A);
    await new Promise((r) => setTimeout(r, 5)); // the cached trust expired
    // A lookup answered "valid" before the revocation, still on its way back...
    let answer!: () => void;
    lookup.mockImplementationOnce(
      (apiKey) => new Promise((resolve) => (answer = () => resolve({ tenantId: TENANT_OF[apiKey]!, apiKeyId: "old" }))),
    );
    const stale = auth.authenticate(bearer(KEY_A));
    // ...when the key is revoked and that is announced.
    state.set(KEY_A, "revoked");
    auth.invalidate(hashOf(KEY_A));
    answer();
    await stale;
    await settle();
    expect(a.ended.map((e) => errorInfoOf(e)?.reason)).toEqual(["API_KEY_REVOKED"]);
  });

  it("checks a stream at once when its key was dropped from the cache between its admission and its watch", async () => {
    const { auth, state, streams } = setup();
    const header = bearer(KEY_A);
    const identity = await auth.authenticate(header);
    state.set(KEY_A, "revoked");
    auth.invalidate(hashOf(KEY_A)); // nothing watched yet
    const ended: ConnectError[] = [];
    streams.watch(header, identity, (refusal) => ended.push(refusal));
    await settle();
    expect(ended.map((e) => e.code)).toEqual([Code.Unauthenticated]);
  });

  it("does not watch admin streams (the admin token cannot be revoked while the process runs)", async () => {
    const { auth, streams } = setup();
    const header = bearer(ADMIN_TOKEN);
    streams.watch(header, await auth.authenticate(header), () => {
      throw new Error("never");
    });
    auth.invalidateAll();
    await settle();
    expect(streams.size).toBe(0);
  });
});
