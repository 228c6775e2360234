import { Code, ConnectError } from "@connectrpc/connect";
import { errorInfoOf, unauthenticated } from "@outpost/platform";
import { RetryInfoSchema } from "@outpost/proto/google/rpc/error_details_pb.js";
import { describe, expect, it, vi } from "vitest";
import { Authenticator, credentialOf, type KeyLookup } from "../src/core/authenticator.ts";

const ADMIN_TOKEN = "admin-token-0123456789abcdef-0123456789";
const KEY = `otp_${"a1".repeat(32)}`;
const OTHER_KEY = `otp_${"b2".repeat(32)}`;

async function errorOf(call: Promise<unknown>): Promise<ConnectError> {
  try {
    await call;
  } catch (err) {
    expect(err).toBeInstanceOf(ConnectError);
    return err as ConnectError;
  }
  throw new Error("expected a failure");
}

function setup(lookup: KeyLookup = async () => ({ tenantId: "T1", apiKeyId: "K1" }), ttl = 2000) {
  let now = 1_000_000;
  const spy = vi.fn(lookup);
  const auth = new Authenticator({ adminToken: ADMIN_TOKEN, cacheTtlMs: ttl, lookup: spy, now: () => now });
  return { auth, lookup: spy, advance: (ms: number) => (now += ms) };
}

const bearer = (credential: string) => new Headers({ authorization: `Bearer ${credential}` });

describe("credentialOf", () => {
  it("reads `authorization: Bearer x` whatever the scheme's case", () => {
    expect(credentialOf(new Headers({ authorization: "Bearer abc" }))).toBe("abc");
    expect(credentialOf(new Headers({ authorization: "bearer abc" }))).toBe("abc");
    expect(credentialOf(new Headers({ authorization: "BEARER   abc  " }))).toBe("abc");
  });

  it("reads x-api-key", () => {
    expect(credentialOf(new Headers({ "x-api-key": KEY }))).toBe(KEY);
  });

  it("answers undefined when there is no credential", () => {
    expect(credentialOf(new Headers())).toBeUndefined();
  });

  it("answers an empty credential for another scheme or a malformed header (never undefined)", () => {
    expect(credentialOf(new Headers({ authorization: "Basic dXNlcjpwdw==" }))).toBe("");
    expect(credentialOf(new Headers({ authorization: "Bearer a b" }))).toBe("");
    expect(credentialOf(new Headers({ authorization: "Bearer" }))).toBe("");
  });
});

describe("Authenticator", () => {
  it("maps the admin token to the admin identity without a lookup", async () => {
    const { auth, lookup } = setup();
    expect(await auth.authenticate(bearer(ADMIN_TOKEN))).toEqual({ kind: "admin", principal: "admin" });
    expect(await auth.authenticate(new Headers({ "x-api-key": ADMIN_TOKEN }))).toEqual({ kind: "admin", principal: "admin" });
    expect(lookup).not.toHaveBeenCalled();
  });

  it("refuses a missing credential with API_KEY_MISSING", async () => {
    const { auth, lookup } = setup();
    const err = await errorOf(auth.authenticate(new Headers()));
    expect(err.code).toBe(Code.Unauthenticated);
    expect(errorInfoOf(err)?.reason).toBe("API_KEY_MISSING");
    expect(lookup).not.toHaveBeenCalled();
  });

  it("refuses a malformed key with API_KEY_MALFORMED without calling lookup", async () => {
    const { auth, lookup } = setup();
    for (const credential of ["otp_short", `otp_${"A1".repeat(32)}`, `xyz_${"a1".repeat(32)}`, `${KEY}0`, "", ADMIN_TOKEN.slice(1)]) {
      const err = await errorOf(auth.authenticate(bearer(credential)));
      expect(err.code).toBe(Code.Unauthenticated);
      expect(errorInfoOf(err)?.reason).toBe("API_KEY_MALFORMED");
      // An operator's wrong admin token is told that too, not only about API keys.
      expect(err.rawMessage).toBe("malformed API key: expected otp_ followed by 64 hex characters (nor is it the admin token)");
    }
    const basic = await errorOf(auth.authenticate(new Headers({ authorization: "Basic abc" })));
    expect(errorInfoOf(basic)?.reason).toBe("API_KEY_MALFORMED");
    expect(lookup).not.toHaveBeenCalled();
  });

  it("maps a valid key to the tenant identity", async () => {
    const { auth, lookup } = setup();
    expect(await auth.authenticate(bearer(KEY))).toEqual({ kind: "tenant", tenantId: "T1", principal: "key/K1" });
    expect(lookup).toHaveBeenCalledWith(KEY);
  });

  it("trusts a verified key for the TTL, then asks again", async () => {
    const { auth, lookup, advance } = setup(undefined, 2000);
    await auth.authenticate(bearer(KEY));
    advance(1999);
    expect(await auth.authenticate(new Headers({ "x-api-key": KEY }))).toMatchObject({ tenantId: "T1" });
    expect(lookup).toHaveBeenCalledTimes(1);
    advance(1);
    await auth.authenticate(bearer(KEY));
    expect(lookup).toHaveBeenCalledTimes(2);
  });

  it("caches per key", async () => {
    const { auth, lookup } = setup(async (key) => ({ tenantId: key === KEY ? "T1" : "T2", apiKeyId: "K" }));
    expect((await auth.authenticate(bearer(KEY))) as { tenantId: string }).toMatchObject({ tenantId: "T1" });
    expect((await auth.authenticate(bearer(OTHER_KEY))) as { tenantId: string }).toMatchObject({ tenantId: "T2" });
    expect(lookup).toHaveBeenCalledTimes(2);
  });

  it("passes the tenant service's UNAUTHENTICATED through and does not cache it", async () => {
    const refused = unauthenticated("API_KEY_REVOKED", "key revoked");
    const { auth, lookup } = setup(async () => {
      throw refused;
    });
    expect(await errorOf(auth.authenticate(bearer(KEY)))).toBe(refused);
    expect(await errorOf(auth.authenticate(bearer(KEY)))).toBe(refused);
    expect(lookup).toHaveBeenCalledTimes(2);
  });

  it("answers UNAVAILABLE AUTH_UNAVAILABLE with RetryInfo when the lookup fails otherwise", async () => {
    for (const failure of [new TypeError("fetch failed"), new ConnectError("connect ECONNREFUSED", Code.Unavailable), new ConnectError("x", Code.Internal)]) {
      const { auth } = setup(async () => {
        throw failure;
      });
      const err = await errorOf(auth.authenticate(bearer(KEY)));
      expect(err.code).toBe(Code.Unavailable);
      expect(errorInfoOf(err)?.reason).toBe("AUTH_UNAVAILABLE");
      expect(err.findDetails(RetryInfoSchema)).toHaveLength(1);
      expect(err.message).not.toContain(KEY);
    }
  });
});
