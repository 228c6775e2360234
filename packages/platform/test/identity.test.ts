import { sign as cryptoSign } from "node:crypto";
import { Code, ConnectError, createContextValues, type HandlerContext } from "@connectrpc/connect";
import {
  ENROLLMENT_AUDIENCE,
  ERROR_DOMAIN,
  EXECUTOR_CERTIFICATE_HEADER,
  EXECUTOR_CERTIFICATE_TTL_MS,
  IDENTITY_HEADER,
  IDENTITY_SIGNATURE_HEADER,
  SIGNER_ROLES,
  SigningKeys,
  checkSecretGrant,
  errorInfoOf,
  generateSigningKeySet,
  identityKey,
  issueExecutorCertificate,
  issueSecretGrant,
  newExecutorKeyPair,
  parseSigningKey,
  parseTrustedSigners,
  requireAdmin,
  requireService,
  requireTenant,
  signerRoleOf,
  signingKeysOf,
  type Identity,
  type SignerRole,
} from "@outpost/platform";
import { describe, expect, it } from "vitest";

const SET = generateSigningKeySet();
/** A role's keys trusting every role of SET: what each process of one mesh holds. */
const keysOf = (role: SignerRole, set = SET) => SigningKeys.fromSettings(role, set.signingKeys[role], SET.trustedSigners);
const TENANT: Identity = { kind: "tenant", tenantId: "T1", principal: "key/K1" };
const NOW = 1_700_000_000_000;
/** The service every identity here is signed for and read by. */
const AUD = "outpost.dispatch.v1.DispatchService";

/** Signed by the role that may sign `identity` (the gateway for tenants and admins). */
function signed(identity: Identity, now = NOW, keys = keysOf(signerRoleOf(identity) as SignerRole)): Headers {
  const headers = new Headers();
  keys.writeIdentity(headers, identity, AUD, now);
  return headers;
}

/** Headers whose payload is `payload`, correctly signed by `role`, so only the payload is wrong. */
function signedRaw(payload: string, role: SignerRole = "gateway"): Headers {
  const signature = cryptoSign(null, Buffer.from(payload), parseSigningKey(SET.signingKeys[role])).toString("base64url");
  return new Headers({ [IDENTITY_HEADER]: payload, [IDENTITY_SIGNATURE_HEADER]: signature });
}

const verifier = () => keysOf("dispatcher");
const b64 = (value: unknown) => Buffer.from(JSON.stringify(value)).toString("base64url");

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
  it("round-trips every kind of identity, each signed by the role that may sign it", () => {
    const identities: Identity[] = [TENANT, { kind: "admin", principal: "admin" }, { kind: "service", principal: "executor/h1" }, { kind: "service", principal: "gateway" }];
    for (const identity of identities) expect(verifier().readIdentity(signed(identity), AUD, NOW + 1000)).toEqual(identity);
  });

  it("refuses an identity its signer may not assert: only the gateway speaks for tenants and admins, a service only for itself", () => {
    const overreach: [SignerRole, Identity][] = [
      ["executor", TENANT],
      ["executor", { kind: "admin", principal: "admin" }],
      ["executor", { kind: "service", principal: "dispatcher" }],
      ["tenant", TENANT],
      ["dispatcher", { kind: "service", principal: "executor/h1" }],
      ["gateway", { kind: "service", principal: "executor/h1" }],
      ["telemetry", { kind: "service", principal: "telemetryx/1" }],
    ];
    for (const [role, identity] of overreach) {
      expect(reasonOf(() => verifier().readIdentity(signed(identity, NOW, keysOf(role)), AUD, NOW)), `${role} as ${JSON.stringify(identity)}`).toEqual(
        unauth("IDENTITY_FORGED"),
      );
    }
  });

  it("refuses a tampered payload, and a payload that names another signer than the one that signed it", () => {
    const headers = signed(TENANT);
    headers.set(IDENTITY_HEADER, b64({ id: { ...TENANT, tenantId: "T2" }, iss: "gateway", exp: NOW + 60_000 }));
    expect(reasonOf(() => verifier().readIdentity(headers, AUD, NOW))).toEqual(unauth("IDENTITY_FORGED"));
    // An executor's signature over a payload claiming the gateway signed it.
    const relabelled = b64({ id: TENANT, iss: "gateway", exp: NOW + 60_000 });
    expect(reasonOf(() => verifier().readIdentity(signedRaw(relabelled, "executor"), AUD, NOW))).toEqual(unauth("IDENTITY_FORGED"));
  });

  it("refuses an identity signed with a key it does not trust, or by a role it has no key for", () => {
    const foreign = generateSigningKeySet();
    expect(reasonOf(() => verifier().readIdentity(signed(TENANT, NOW, keysOf("gateway", foreign)), AUD, NOW))).toEqual(unauth("IDENTITY_FORGED"));
    const trustsOnlyExecutors = new SigningKeys("tenant", parseSigningKey(SET.signingKeys.tenant), parseTrustedSigners(SET.trustedSigners.split(",").filter((e) => e.startsWith("executor:")).join(",")));
    expect(reasonOf(() => trustsOnlyExecutors.readIdentity(signed(TENANT), AUD, NOW))).toEqual(unauth("IDENTITY_FORGED"));
    expect(trustsOnlyExecutors.readIdentity(signed({ kind: "service", principal: "executor/h1" }), AUD, NOW)).toEqual({ kind: "service", principal: "executor/h1" });
  });

  it("accepts either key of a role listed twice (rotation)", () => {
    const next = generateSigningKeySet(["gateway"]);
    const both = new SigningKeys("tenant", parseSigningKey(SET.signingKeys.tenant), parseTrustedSigners(`${SET.trustedSigners},${next.trustedSigners}`));
    expect(both.readIdentity(signed(TENANT), AUD, NOW)).toEqual(TENANT);
    expect(both.readIdentity(signed(TENANT, NOW, keysOf("gateway", next)), AUD, NOW)).toEqual(TENANT);
    // Before the new key is listed, its signatures are refused.
    expect(reasonOf(() => verifier().readIdentity(signed(TENANT, NOW, keysOf("gateway", next)), AUD, NOW))).toEqual(unauth("IDENTITY_FORGED"));
  });

  it("accepts an identity only for calls to the service it was signed for, remembered or not", () => {
    const headers = signed(TENANT);
    const keys = verifier();
    const wrong = (audience: string) => reasonOf(() => keys.readIdentity(headers, audience, NOW));
    // Replayed to another service (a broken-into service passing on what it was sent).
    expect(wrong("outpost.tenant.v1.ApiKeyService")).toEqual(unauth("IDENTITY_WRONG_AUDIENCE"));
    expect(keys.readIdentity(headers, AUD, NOW)).toEqual(TENANT);
    // Once verified and remembered, still only for its own service.
    expect(wrong("outpost.tenant.v1.ApiKeyService")).toEqual(unauth("IDENTITY_WRONG_AUDIENCE"));
    expect(() => keys.readIdentity(headers, "outpost.tenant.v1.TenantService", NOW)).toThrow(`caller identity was signed for ${AUD}, not outpost.tenant.v1.TenantService`);
    // A correctly signed payload that names no service is refused too.
    expect(reasonOf(() => verifier().readIdentity(signedRaw(b64({ id: TENANT, iss: "gateway", exp: NOW + 60_000 })), AUD, NOW))).toEqual(unauth("IDENTITY_WRONG_AUDIENCE"));
    // A signature is reused per service, never across services.
    const gateway = keysOf("gateway");
    const forLogs = new Headers();
    gateway.writeIdentity(forLogs, TENANT, "outpost.telemetry.v1.LogService", NOW);
    const forDispatch = new Headers();
    gateway.writeIdentity(forDispatch, TENANT, AUD, NOW);
    expect(forLogs.get(IDENTITY_SIGNATURE_HEADER)).not.toBe(forDispatch.get(IDENTITY_SIGNATURE_HEADER));
    expect(keys.readIdentity(forLogs, "outpost.telemetry.v1.LogService", NOW)).toEqual(TENANT);
  });

  it("refuses a truncated signature", () => {
    const headers = signed(TENANT);
    headers.set(IDENTITY_SIGNATURE_HEADER, headers.get(IDENTITY_SIGNATURE_HEADER)!.slice(1));
    expect(reasonOf(() => verifier().readIdentity(headers, AUD, NOW))).toEqual(unauth("IDENTITY_FORGED"));
  });

  it("takes a signature only as its one base64url spelling: padded, standard-alphabet, suffixed or duplicated ones are refused", () => {
    const headers = signed(TENANT);
    const signature = headers.get(IDENTITY_SIGNATURE_HEADER)!;
    // Node's base64 decoder skips what is not base64 and the unused bits of the last character,
    // so each of these decoded to the same 64 bytes and verified, each a new cache entry.
    const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    const lastBits = signature.slice(0, -1) + alphabet[alphabet.indexOf(signature.at(-1)!) ^ 1]; // an unused bit set
    expect(Buffer.from(lastBits, "base64url")).toEqual(Buffer.from(signature, "base64url"));
    const respellings = [`${signature}=`, `${signature}==`, `${signature},`, `${signature}\u00e9`, `${signature}.`, Buffer.from(signature, "base64url").toString("base64"), lastBits, `${signature}, ${signature}`, "A".repeat(20_000)];
    for (const respelled of respellings) {
      const replayed = new Headers(headers);
      replayed.set(IDENTITY_SIGNATURE_HEADER, respelled);
      expect(reasonOf(() => verifier().readIdentity(replayed, AUD, NOW)), respelled.slice(0, 100)).toEqual(unauth("IDENTITY_FORGED"));
    }
    expect(verifier().readIdentity(headers, AUD, NOW)).toEqual(TENANT);
    // Grants and certificates are checked the same way.
    const token = keysOf("dispatcher").signToken({ grant: "secrets" }, 60_000, NOW);
    expect(verifier().verifyToken(token, "dispatcher", NOW)).toHaveProperty("claims");
    expect(verifier().verifyToken(`${token}=`, "dispatcher", NOW)).toEqual({ problem: "FORGED" });
  });

  it("refuses a missing signature or payload", () => {
    const noSignature = signed(TENANT);
    noSignature.delete(IDENTITY_SIGNATURE_HEADER);
    expect(reasonOf(() => verifier().readIdentity(noSignature, AUD, NOW))).toEqual(unauth("IDENTITY_MISSING"));
    const noPayload = signed(TENANT);
    noPayload.delete(IDENTITY_HEADER);
    expect(reasonOf(() => verifier().readIdentity(noPayload, AUD, NOW))).toEqual(unauth("IDENTITY_MISSING"));
    expect(reasonOf(() => verifier().readIdentity(new Headers(), AUD, NOW))).toEqual(unauth("IDENTITY_MISSING"));
  });

  it("accepts an identity until its expiry and refuses it after", () => {
    const headers = signed(TENANT, NOW);
    const keys = verifier();
    expect(keys.readIdentity(headers, AUD, NOW + 59_000)).toEqual(TENANT);
    // Remembered as verified, and still refused once expired.
    expect(reasonOf(() => keys.readIdentity(headers, AUD, NOW + 61_000))).toEqual(unauth("IDENTITY_EXPIRED"));
    expect(reasonOf(() => verifier().readIdentity(headers, AUD, NOW + 61_000))).toEqual(unauth("IDENTITY_EXPIRED"));
  });

  it("reuses a signature for up to a second, then signs a later expiry", () => {
    const gateway = keysOf("gateway");
    const first = signed(TENANT, NOW, gateway);
    const again = signed(TENANT, NOW + 999, gateway);
    expect(again.get(IDENTITY_HEADER)).toBe(first.get(IDENTITY_HEADER));
    expect(again.get(IDENTITY_SIGNATURE_HEADER)).toBe(first.get(IDENTITY_SIGNATURE_HEADER));
    const later = signed(TENANT, NOW + 1000, gateway);
    expect(later.get(IDENTITY_HEADER)).not.toBe(first.get(IDENTITY_HEADER));
    // The reused one expires with its own time, the new one a second later.
    expect(reasonOf(() => verifier().readIdentity(again, AUD, NOW + 60_500))).toEqual(unauth("IDENTITY_EXPIRED"));
    expect(verifier().readIdentity(later, AUD, NOW + 60_500)).toEqual(TENANT);
    // Another identity never gets a remembered signature.
    expect(signed({ ...TENANT, tenantId: "T2" }, NOW, gateway).get(IDENTITY_HEADER)).not.toBe(first.get(IDENTITY_HEADER));
  });

  it("refuses an identity signed to last longer than an identity may", () => {
    const gateway = keysOf("gateway");
    const decade = new Headers();
    const { payload, signature } = gateway.sign({ id: TENANT, aud: AUD }, 10 * 365 * 86_400_000, NOW);
    decade.set(IDENTITY_HEADER, payload);
    decade.set(IDENTITY_SIGNATURE_HEADER, signature);
    expect(reasonOf(() => verifier().readIdentity(decade, AUD, NOW))).toEqual(unauth("IDENTITY_LIFETIME_TOO_LONG"));
    // A signer whose clock runs a few seconds ahead is fine.
    expect(verifier().readIdentity(signed(TENANT, NOW + 4_000), AUD, NOW)).toEqual(TENANT);
  });

  it("refuses a signed payload without an expiry as expired", () => {
    expect(reasonOf(() => verifier().readIdentity(signedRaw(b64({ id: TENANT, iss: "gateway" })), AUD, NOW))).toEqual(unauth("IDENTITY_EXPIRED"));
  });

  it("refuses malformed base64 and JSON as IDENTITY_MALFORMED", () => {
    for (const payload of ["!!!not-base64***", Buffer.from("{not json").toString("base64url")]) {
      expect(reasonOf(() => verifier().readIdentity(signedRaw(payload), AUD, NOW))).toEqual(unauth("IDENTITY_MALFORMED"));
    }
  });

  it("refuses signed JSON that is not an identity object as IDENTITY_MALFORMED (never a TypeError)", () => {
    const far = NOW + 60_000;
    const payloads = ["null", "42", '"text"', JSON.stringify({ exp: far }), JSON.stringify({ iss: "gateway", exp: far }), JSON.stringify({ id: { kind: "root" }, iss: "gateway", exp: far })];
    for (const json of payloads) {
      const payload = Buffer.from(json).toString("base64url");
      expect(reasonOf(() => verifier().readIdentity(signedRaw(payload), AUD, NOW)), json).toEqual(unauth("IDENTITY_MALFORMED"));
    }
  });
});

describe("keys bound to one executor", () => {
  const BOUND = generateSigningKeySet(SIGNER_ROLES, ["host-1", "host-2"]);
  const h1: Identity = { kind: "service", principal: "executor/host-1" };
  const h2: Identity = { kind: "service", principal: "executor/host-2" };
  /** A dispatcher that trusts the executors' own keys and no key of the executor role. */
  const dispatcher = () => signingKeysOf(BOUND, "dispatcher");
  const signedBy = (keys: SigningKeys, identity: Identity) => {
    const headers = new Headers();
    keys.writeIdentity(headers, identity, AUD, NOW);
    return headers;
  };

  it("lists each executor's key under its id and none for the role", () => {
    expect(BOUND.trustedSigners).toMatch(/(^|,)executor\/host-1:/);
    expect(BOUND.trustedSigners).toMatch(/(^|,)executor\/host-2:/);
    expect(BOUND.trustedSigners).not.toMatch(/(^|,)executor:/);
    expect([...parseTrustedSigners(BOUND.trustedSigners).keys()].sort()).toEqual(["dispatcher", "executor/host-1", "executor/host-2", "gateway", "telemetry", "tenant"]);
  });

  it("signs as the executor itself, which its own key verifies", () => {
    const host1 = signingKeysOf(BOUND, "executor", "host-1");
    expect(host1.issuer).toBe("executor/host-1");
    expect(dispatcher().readIdentity(signedBy(host1, h1), AUD, NOW)).toEqual(h1);
  });

  it("refuses one executor's key speaking as another, however the payload names its issuer", () => {
    const host1 = signingKeysOf(BOUND, "executor", "host-1");
    // Signed honestly (iss executor/host-1) but for host-2's identity.
    expect(reasonOf(() => dispatcher().readIdentity(signedBy(host1, h2), AUD, NOW))).toEqual(unauth("IDENTITY_FORGED"));
    // A payload claiming host-2 (or the role) signed it, signed with host-1's key.
    const ownKey = parseSigningKey(BOUND.executorKeys["host-1"]!);
    for (const iss of ["executor/host-2", "executor"]) {
      const payload = b64({ id: h2, iss, exp: NOW + 60_000 });
      const headers = new Headers({ [IDENTITY_HEADER]: payload, [IDENTITY_SIGNATURE_HEADER]: cryptoSign(null, Buffer.from(payload), ownKey).toString("base64url") });
      expect(reasonOf(() => dispatcher().readIdentity(headers, AUD, NOW)), iss).toEqual(unauth("IDENTITY_FORGED"));
    }
    // An executor process without a key of its own (the role's) is refused when only ids are trusted.
    expect(reasonOf(() => dispatcher().readIdentity(signedBy(keysOf("executor", BOUND), h1), AUD, NOW))).toEqual(unauth("IDENTITY_FORGED"));
  });

  it("accepts an executor signing with its id under a key trusted for the whole role (the shared key)", () => {
    const shared = SigningKeys.fromSettings("executor", SET.signingKeys.executor, SET.trustedSigners, "host-9");
    expect(verifier().readIdentity(signedBy(shared, { kind: "service", principal: "executor/host-9" }), AUD, NOW)).toEqual({ kind: "service", principal: "executor/host-9" });
    // Bound issuer, bound claim: even the shared key cannot make host-9's signature speak as host-1.
    expect(reasonOf(() => verifier().readIdentity(signedBy(shared, h1), AUD, NOW))).toEqual(unauth("IDENTITY_FORGED"));
  });

  it("a bound executor's tokens count as the executor role's", () => {
    const token = signingKeysOf(BOUND, "executor", "host-1").signToken({ x: 1 }, 1000, NOW);
    expect(dispatcher().verifyToken(token, "executor", NOW)).toMatchObject({ claims: { x: 1, iss: "executor/host-1" } });
    expect(dispatcher().verifyToken(token, "dispatcher", NOW)).toEqual({ problem: "UNKNOWN_SIGNER" });
  });

  it("refuses ids on roles other than the executor, and ids an executor could not have", () => {
    const pub = BOUND.trustedSigners.split(",")[0]!.split(":")[1]!;
    for (const issuer of ["gateway/x", "dispatcher/d1", "executor/", "executor/bad id", "executor/a/b", `executor/${"x".repeat(129)}`]) {
      expect(() => parseTrustedSigners(`${issuer}:${pub}`), issuer).toThrow(/entry 1 must be .* executor\/<executor id>:<public key>, or executor-enroll:<public key>/);
    }
    expect(() => SigningKeys.fromSettings("gateway", SET.signingKeys.gateway, "", "gw-1")).toThrow(/gateway\/gw-1 cannot sign/);
    expect(() => generateSigningKeySet(["executor"], ["no spaces"])).toThrow(/executor id "no spaces"/);
  });
});

describe("enrolled executor keys (enrollment key, certificates)", () => {
  const ENROLLING = generateSigningKeySet(SIGNER_ROLES, [], { executorEnrollment: true });
  const pod: Identity = { kind: "service", principal: "executor/pod-1" };
  const other: Identity = { kind: "service", principal: "executor/pod-2" };
  /** What each service holds: the mesh's trusted signers, with the executors' key as the enrollment key. */
  const service = (role: SignerRole) => signingKeysOf(ENROLLING, role);
  const enrollmentKeys = (id: string) => signingKeysOf(ENROLLING, "executor", id);
  const signedFor = (keys: SigningKeys, identity: Identity, audience: string, now = NOW) => {
    const headers = new Headers();
    keys.writeIdentity(headers, identity, audience, now);
    return headers;
  };
  /** An executor that enrolled `id`: its own key, certified by the dispatcher for `ttlMs`. */
  const enrolled = (id: string, ttlMs = EXECUTOR_CERTIFICATE_TTL_MS, certifiedFor = `executor/${id}`, certifier = service("dispatcher")) => {
    const { privateKey, publicKey } = newExecutorKeyPair();
    const keys = enrollmentKeys(id);
    keys.useCertificate(privateKey, issueExecutorCertificate(certifier, certifiedFor, publicKey, ttlMs, NOW));
    return keys;
  };

  it("trusts the enrollment key as executor-enroll, and for EnrollmentService alone", () => {
    expect([...parseTrustedSigners(ENROLLING.trustedSigners).keys()].sort()).toEqual(["dispatcher", "executor-enroll", "gateway", "telemetry", "tenant"]);
    expect(service("dispatcher").readIdentity(signedFor(enrollmentKeys("pod-1"), pod, ENROLLMENT_AUDIENCE), ENROLLMENT_AUDIENCE, NOW)).toEqual(pod);
    for (const role of ["dispatcher", "tenant", "telemetry"] as const) {
      expect(reasonOf(() => service(role).readIdentity(signedFor(enrollmentKeys("pod-1"), pod, AUD), AUD, NOW)), role).toEqual(unauth("IDENTITY_FORGED"));
    }
    // Never for anything but an executor's own identity, even there.
    expect(reasonOf(() => service("dispatcher").readIdentity(signedFor(enrollmentKeys("pod-1"), TENANT, ENROLLMENT_AUDIENCE), ENROLLMENT_AUDIENCE, NOW))).toEqual(unauth("IDENTITY_FORGED"));
  });

  it("never remembers an identity the enrollment key signed for another service, wherever it was first read", () => {
    // Signed for the lease API, sent first to EnrollmentService (where the enrollment key is
    // good), then to the lease API: refused both times, by one verifier with its cache.
    const dispatcher = service("dispatcher");
    const headers = signedFor(enrollmentKeys("pod-1"), pod, AUD);
    expect(reasonOf(() => dispatcher.readIdentity(headers, ENROLLMENT_AUDIENCE, NOW))).toEqual(unauth("IDENTITY_FORGED"));
    expect(reasonOf(() => dispatcher.readIdentity(headers, AUD, NOW))).toEqual(unauth("IDENTITY_FORGED"));
  });

  it("trusts a remembered identity no longer than the certificate that came with it", () => {
    const tenantService = service("tenant");
    const headers = signedFor(enrolled("pod-1", 1000), pod, AUD);
    expect(tenantService.readIdentity(headers, AUD, NOW + 900)).toEqual(pod);
    // The identity itself would last a minute; its certificate ended at NOW + 1 s.
    expect(reasonOf(() => tenantService.readIdentity(headers, AUD, NOW + 2000))).toEqual(unauth("IDENTITY_EXPIRED"));
  });

  it("verifies a certified executor's calls at every service, the dispatcher's own included", () => {
    const keys = enrolled("pod-1");
    for (const role of ["dispatcher", "tenant", "telemetry"] as const) {
      expect(service(role).readIdentity(signedFor(keys, pod, AUD), AUD, NOW), role).toEqual(pod);
    }
  });

  it("refuses a certificate for another executor, one that expired, and one not signed by the dispatcher", () => {
    const forOther = enrolled("pod-2");
    // pod-2's certified key signing as pod-1 (an executor speaking as another).
    const posing = signingKeysOf(ENROLLING, "executor", "pod-1");
    const { privateKey, publicKey } = newExecutorKeyPair();
    posing.useCertificate(privateKey, issueExecutorCertificate(service("dispatcher"), "executor/pod-2", publicKey, 60_000, NOW));
    expect(reasonOf(() => service("tenant").readIdentity(signedFor(posing, pod, AUD), AUD, NOW))).toEqual(unauth("IDENTITY_FORGED"));
    expect(service("tenant").readIdentity(signedFor(forOther, other, AUD), AUD, NOW)).toEqual(other);
    // Expired: a certificate of 1 s, read 2 s later (the identity itself still fresh).
    const brief = enrolled("pod-1", 1000);
    expect(reasonOf(() => service("tenant").readIdentity(signedFor(brief, pod, AUD, NOW + 2000), AUD, NOW + 2000))).toEqual(unauth("IDENTITY_FORGED"));
    // Certified by the gateway (or by the enrollment key) instead of the dispatcher.
    for (const certifier of [service("gateway"), enrollmentKeys("pod-1")]) {
      expect(reasonOf(() => service("tenant").readIdentity(signedFor(enrolled("pod-1", 60_000, "executor/pod-1", certifier), pod, AUD), AUD, NOW))).toEqual(unauth("IDENTITY_FORGED"));
    }
    // Garbage in the certificate header.
    const headers = signedFor(enrolled("pod-1"), pod, AUD);
    headers.set(EXECUTOR_CERTIFICATE_HEADER, "not.a-certificate");
    expect(reasonOf(() => service("telemetry").readIdentity(headers, AUD, NOW))).toEqual(unauth("IDENTITY_FORGED"));
  });
});

describe("secret grants", () => {
  const grant = { dispatchId: "D1", tenantId: "T1", names: ["A", "B"], executor: "executor/h1" };
  const covers = { tenantId: "T1", names: ["A", "B"], executor: "executor/h1" };
  const refusal = (token: string, request = covers, now = NOW) => {
    try {
      checkSecretGrant(keysOf("tenant"), token, request, now);
      return "accepted";
    } catch (err) {
      const e = err as ConnectError;
      return `${Code[e.code]} ${errorInfoOf(e)?.reason}: ${e.rawMessage}`;
    }
  };

  it("accepts the dispatcher's grant for the executor, tenant and names it binds, within a minute", () => {
    const token = issueSecretGrant(keysOf("dispatcher"), grant, NOW);
    expect(refusal(token)).toBe("accepted");
    expect(refusal(token, { ...covers, names: ["B"] })).toBe("accepted");
    expect(refusal(token, covers, NOW + 60_000)).toBe("accepted");
    expect(refusal(token, covers, NOW + 60_001)).toMatch(/PermissionDenied SECRET_GRANT_INVALID: .*expired/);
  });

  it("refuses a grant for another executor, tenant or name, or from any signer but the dispatcher", () => {
    const token = issueSecretGrant(keysOf("dispatcher"), grant, NOW);
    expect(refusal(token, { ...covers, executor: "executor/h2" })).toMatch(/SECRET_GRANT_INVALID: .*another executor/);
    expect(refusal(token, { ...covers, tenantId: "T2" })).toMatch(/SECRET_GRANT_INVALID: .*another tenant/);
    expect(refusal(token, { ...covers, names: ["A", "C"] })).toMatch(/SECRET_GRANT_INVALID: .*does not cover secret C/);
    // An executor (or the gateway) signing its own grant, and a dispatcher key the tenant does not trust.
    for (const keys of [keysOf("executor"), keysOf("gateway"), keysOf("dispatcher", generateSigningKeySet())]) {
      expect(refusal(issueSecretGrant(keys, grant, NOW))).toMatch(/SECRET_GRANT_INVALID: .*not signed by the dispatcher/);
    }
    // An identity header's payload and signature are not a grant.
    const headers = signed({ kind: "service", principal: "dispatcher" }, NOW);
    expect(refusal(`${headers.get(IDENTITY_HEADER)}.${headers.get(IDENTITY_SIGNATURE_HEADER)}`)).toMatch(/SECRET_GRANT_INVALID: .*not a secret grant/);
  });

  it("answers INVALID_ARGUMENT for a missing grant and PERMISSION_DENIED for garbage", () => {
    expect(refusal("")).toBe("InvalidArgument FIELD_REQUIRED: grant: is required (Lease.secret_grant of the run)");
    for (const garbage of ["x", "a.b.c", "...", "e30.AAAA"]) expect(refusal(garbage), garbage).toMatch(/^PermissionDenied SECRET_GRANT_INVALID/);
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
