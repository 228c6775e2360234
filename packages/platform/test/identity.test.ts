import { createHmac } from "node:crypto";
import { Code, ConnectError, createContextValues, type HandlerContext } from "@connectrpc/connect";
import {
  ERROR_DOMAIN,
  IDENTITY_HEADER,
  IDENTITY_SIGNATURE_HEADER,
  errorInfoOf,
  identityKey,
  readIdentity,
  requireAdmin,
  requireService,
  requireTenant,
  writeIdentity,
  type Identity,
} from "@outpost/platform";
import { describe, expect, it } from "vitest";

const SECRET = "test-internal-secret-0123456789abcdef";
const TENANT: Identity = { kind: "tenant", tenantId: "T1", principal: "key/K1" };
const NOW = 1_700_000_000_000;

function signed(identity: Identity, now = NOW, secret = SECRET): Headers {
  const headers = new Headers();
  writeIdentity(headers, secret, identity, now);
  return headers;
}

/** Headers whose payload is `payload`, correctly signed, so only the payload is wrong. */
function signedRaw(payload: string): Headers {
  return new Headers({
    [IDENTITY_HEADER]: payload,
    [IDENTITY_SIGNATURE_HEADER]: createHmac("sha256", SECRET).update(payload).digest("base64url"),
  });
}

function reasonOf(fn: () => unknown): { code: Code; reason: string | undefined } {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(ConnectError);
    const info = errorInfoOf(err as ConnectError);
    expect(info?.domain).toBe(ERROR_DOMAIN);
    return { code: (err as ConnectError).code, reason: info?.reason };
  }
  throw new Error("expected a throw");
}

const unauth = (reason: string) => ({ code: Code.Unauthenticated, reason });

describe("writeIdentity / readIdentity", () => {
  it("round-trips every kind of identity", () => {
    const identities: Identity[] = [TENANT, { kind: "admin", principal: "admin" }, { kind: "service", principal: "executor/h1" }];
    for (const identity of identities) expect(readIdentity(signed(identity), SECRET, NOW + 1000)).toEqual(identity);
  });

  it("refuses a tampered payload", () => {
    const headers = signed(TENANT);
    const forged = Buffer.from(JSON.stringify({ id: { ...TENANT, tenantId: "T2" }, exp: NOW + 60_000 })).toString("base64url");
    headers.set(IDENTITY_HEADER, forged);
    expect(reasonOf(() => readIdentity(headers, SECRET, NOW))).toEqual(unauth("IDENTITY_FORGED"));
  });

  it("refuses an identity signed with another secret", () => {
    const headers = signed(TENANT, NOW, "another-secret-0123456789abcdef-xyz");
    expect(reasonOf(() => readIdentity(headers, SECRET, NOW))).toEqual(unauth("IDENTITY_FORGED"));
  });

  it("refuses a truncated signature", () => {
    const headers = signed(TENANT);
    headers.set(IDENTITY_SIGNATURE_HEADER, headers.get(IDENTITY_SIGNATURE_HEADER)!.slice(1));
    expect(reasonOf(() => readIdentity(headers, SECRET, NOW))).toEqual(unauth("IDENTITY_FORGED"));
  });

  it("refuses a missing signature or payload", () => {
    const noSignature = signed(TENANT);
    noSignature.delete(IDENTITY_SIGNATURE_HEADER);
    expect(reasonOf(() => readIdentity(noSignature, SECRET, NOW))).toEqual(unauth("IDENTITY_MISSING"));
    const noPayload = signed(TENANT);
    noPayload.delete(IDENTITY_HEADER);
    expect(reasonOf(() => readIdentity(noPayload, SECRET, NOW))).toEqual(unauth("IDENTITY_MISSING"));
    expect(reasonOf(() => readIdentity(new Headers(), SECRET, NOW))).toEqual(unauth("IDENTITY_MISSING"));
  });

  it("accepts an identity until its expiry and refuses it after", () => {
    const headers = signed(TENANT, NOW);
    expect(readIdentity(headers, SECRET, NOW + 59_000)).toEqual(TENANT);
    expect(reasonOf(() => readIdentity(headers, SECRET, NOW + 61_000))).toEqual(unauth("IDENTITY_EXPIRED"));
  });

  it("reuses a signature for up to a second, then signs a later expiry", () => {
    const first = signed(TENANT, NOW);
    const again = signed(TENANT, NOW + 999);
    expect(again.get(IDENTITY_HEADER)).toBe(first.get(IDENTITY_HEADER));
    expect(again.get(IDENTITY_SIGNATURE_HEADER)).toBe(first.get(IDENTITY_SIGNATURE_HEADER));
    const later = signed(TENANT, NOW + 1000);
    expect(later.get(IDENTITY_HEADER)).not.toBe(first.get(IDENTITY_HEADER));
    // The reused one expires with its own time, the new one a second later.
    expect(reasonOf(() => readIdentity(again, SECRET, NOW + 60_500))).toEqual(unauth("IDENTITY_EXPIRED"));
    expect(readIdentity(later, SECRET, NOW + 60_500)).toEqual(TENANT);
    // Another identity or another secret never gets a remembered signature.
    expect(signed({ ...TENANT, tenantId: "T2" }, NOW).get(IDENTITY_HEADER)).not.toBe(first.get(IDENTITY_HEADER));
    expect(signed(TENANT, NOW, "another-secret-0123456789abcdef-xyz").get(IDENTITY_SIGNATURE_HEADER)).not.toBe(first.get(IDENTITY_SIGNATURE_HEADER));
  });

  it("trusts a verified identity again only under the same secret", () => {
    const other = "another-secret-0123456789abcdef-xyz";
    const headers = signed(TENANT, NOW, other);
    expect(readIdentity(headers, other, NOW)).toEqual(TENANT);
    expect(reasonOf(() => readIdentity(headers, SECRET, NOW))).toEqual(unauth("IDENTITY_FORGED"));
    expect(readIdentity(headers, other, NOW + 1)).toEqual(TENANT);
  });

  it("refuses a signed payload without an expiry as expired", () => {
    const payload = Buffer.from(JSON.stringify({ id: TENANT })).toString("base64url");
    expect(reasonOf(() => readIdentity(signedRaw(payload), SECRET, NOW))).toEqual(unauth("IDENTITY_EXPIRED"));
  });

  it("refuses malformed base64 and JSON as IDENTITY_MALFORMED", () => {
    for (const payload of ["!!!not-base64***", Buffer.from("{not json").toString("base64url"), ""]) {
      if (payload === "") continue; // empty is "missing", covered above
      expect(reasonOf(() => readIdentity(signedRaw(payload), SECRET, NOW))).toEqual(unauth("IDENTITY_MALFORMED"));
    }
  });

  it("refuses signed JSON that is not an identity object as IDENTITY_MALFORMED (never a TypeError)", () => {
    const far = NOW + 60_000;
    const payloads = ["null", "42", '"text"', JSON.stringify({ exp: far }), JSON.stringify({ id: { kind: "root" }, exp: far })];
    for (const json of payloads) {
      const payload = Buffer.from(json).toString("base64url");
      expect(reasonOf(() => readIdentity(signedRaw(payload), SECRET, NOW))).toEqual(unauth("IDENTITY_MALFORMED"));
    }
  });
});

function ctxAs(identity: Identity | undefined): HandlerContext {
  const values = createContextValues();
  if (identity) values.set(identityKey, identity);
  return { values } as unknown as HandlerContext;
}

describe("role checks", () => {
  const admin: Identity = { kind: "admin", principal: "admin" };
  const executor: Identity = { kind: "service", principal: "executor/abc" };
  const dispatcher: Identity = { kind: "service", principal: "dispatcher" };

  it("requireTenant accepts only tenants", () => {
    expect(requireTenant(ctxAs(TENANT))).toEqual(TENANT);
    for (const other of [admin, executor]) {
      expect(reasonOf(() => requireTenant(ctxAs(other)))).toEqual({ code: Code.PermissionDenied, reason: "TENANT_REQUIRED" });
    }
  });

  it("requireAdmin accepts only the admin", () => {
    expect(requireAdmin(ctxAs(admin))).toEqual(admin);
    for (const other of [TENANT, executor]) {
      expect(reasonOf(() => requireAdmin(ctxAs(other)))).toEqual({ code: Code.PermissionDenied, reason: "ADMIN_REQUIRED" });
    }
  });

  it("requireService matches the role before the slash", () => {
    expect(requireService(ctxAs(executor), "executor")).toEqual(executor);
    expect(requireService(ctxAs(dispatcher))).toEqual(dispatcher);
    const denied = { code: Code.PermissionDenied, reason: "SERVICE_REQUIRED" };
    expect(reasonOf(() => requireService(ctxAs(dispatcher), "executor"))).toEqual(denied);
    expect(reasonOf(() => requireService(ctxAs({ kind: "service", principal: "executorx/1" }), "executor"))).toEqual(denied);
    expect(reasonOf(() => requireService(ctxAs(TENANT), "executor"))).toEqual(denied);
    expect(reasonOf(() => requireService(ctxAs(TENANT)))).toEqual(denied);
    expect(reasonOf(() => requireService(ctxAs(admin)))).toEqual(denied);
  });

  it("every check refuses a call without identity as UNAUTHENTICATED", () => {
    for (const check of [requireTenant, requireAdmin, (c: HandlerContext) => requireService(c)]) {
      expect(reasonOf(() => check(ctxAs(undefined)))).toEqual(unauth("IDENTITY_MISSING"));
    }
  });
});
