/**
 * Caller identity between services (SPEC G2). The gateway authenticates API keys and the
 * services trust it to say who is calling; services also call each other. Every internal call
 * carries the identity in `outpost-identity` and a signature of it in
 * `outpost-identity-signature`. A service refuses a call whose identity is missing, unsigned,
 * forged or expired, so a client that reaches a service port directly cannot claim to be a
 * tenant.
 *
 * Signatures are Ed25519, one key pair per signer role: each process holds only its own
 * private key (OUTPOST_SIGNING_KEY) and the public keys of the roles it takes calls from
 * (OUTPOST_TRUSTED_SIGNERS). A role signs only what it is: the gateway signs tenants, admins
 * and itself; every other role signs only service identities of its own role. So a process
 * that is broken into (an executor host, say) can speak as what it already is and nothing
 * more: it cannot sign a tenant, an admin or another service. The same keys sign short-lived
 * grants (`signToken`), such as the dispatcher's grant of a leased run's secrets.
 *
 * A signed identity also names the service it was signed for (`aud`, the called service's
 * full name, e.g. "outpost.tenant.v1.ApiKeyService"), and a service accepts it only for calls
 * to that service. Every call a service takes carries its caller's signed identity, so without
 * this a service that is broken into could replay a tenant's or the admin's identity, as the
 * gateway signed it for that service, to another service within the identity's minute of life.
 *
 * Executors are many processes of one role, told apart by id, and the dispatcher and the tenant
 * service bind leases and secret grants to that id. A key listed for the whole role
 * (`executor:<key>`) signs as any executor; a key listed for one (`executor/<id>:<key>`) signs
 * only as `executor/<id>`, so an executor host that is broken into cannot take, list or watch
 * another's leases nor use its secret or log grants. An executor signs with its own principal as
 * issuer (`iss: "executor/<id>"`), which either kind of key verifies.
 *
 * Executors that come and go with an autoscaler cannot each be listed: they enroll instead. They
 * share an enrollment key (`executor-enroll:<key>` in OUTPOST_TRUSTED_SIGNERS), which verifies
 * an executor's identity only on calls to the dispatcher's EnrollmentService. There an executor
 * binds a key pair of its own to its id and gets a certificate of it, signed by the dispatcher;
 * it then signs every call with that key and sends the certificate beside the signature
 * (`outpost-executor-certificate`), and every service verifies the call with the certified key.
 * The dispatcher binds an id to one key at a time, so the enrollment key in the wrong hands can
 * enroll new executors but not speak as one that is running.
 */
import { createPrivateKey, createPublicKey, generateKeyPairSync, sign, verify, type KeyObject } from "node:crypto";
import { createContextKey, type HandlerContext } from "@connectrpc/connect";
import { permissionDenied, unauthenticated } from "./errors.ts";

export type Identity =
  /** A tenant, authenticated by the gateway from one of its API keys. */
  | { kind: "tenant"; tenantId: string; principal: string }
  /** An operator holding the admin credential. */
  | { kind: "admin"; principal: string }
  /** Another Outpost service, e.g. "executor/host-1". */
  | { kind: "service"; principal: string };

export const IDENTITY_HEADER = "outpost-identity";
export const IDENTITY_SIGNATURE_HEADER = "outpost-identity-signature";
/** An enrolled executor's certificate of the key that signed the identity (module comment). */
export const EXECUTOR_CERTIFICATE_HEADER = "outpost-executor-certificate";

/** The trusted-signers entry of the executors' shared enrollment key. */
export const ENROLLMENT_SIGNER = "executor-enroll";
/** The one service the enrollment key is good for (audienceOf of EnrollmentService). */
export const ENROLLMENT_AUDIENCE = "outpost.executor.v1.EnrollmentService";

/** The processes that sign: each has its own key pair. */
export const SIGNER_ROLES = ["gateway", "tenant", "dispatcher", "executor", "telemetry"] as const;
export type SignerRole = (typeof SIGNER_ROLES)[number];

/** The roles whose processes may each hold a key bound to their own id. */
const BOUND_ROLES: readonly SignerRole[] = ["executor"];
/** An executor id as OUTPOST_EXECUTOR_ID takes it. */
const SIGNER_NAME = /^[A-Za-z0-9._-]{1,128}$/;

/**
 * Splits an issuer, "dispatcher" or "executor/host-1", into its role and name; undefined when it
 * is neither a role nor a role that binds keys to ids followed by a valid id.
 */
export function parseIssuer(issuer: string): { role: SignerRole; name?: string } | undefined {
  const slash = issuer.indexOf("/");
  const role = (slash < 0 ? issuer : issuer.slice(0, slash)) as SignerRole;
  if (!SIGNER_ROLES.includes(role)) return undefined;
  if (slash < 0) return { role };
  const name = issuer.slice(slash + 1);
  return BOUND_ROLES.includes(role) && SIGNER_NAME.test(name) ? { role, name } : undefined;
}

/** How long a signed identity stays valid; calls are signed as they are made. */
const IDENTITY_TTL_MS = 60_000;
/**
 * How far ahead of this machine's clock a signer's may run: an identity whose expiry lies
 * further ahead than its lifetime plus this is refused (only a signer that is broken, or
 * broken into, would make one, and it could be replayed for as long).
 */
const CLOCK_SKEW_MS = 5_000;

/**
 * The role whose key may sign this identity: tenants and admins only the gateway (which
 * authenticated them), services only their own role ("executor/host-1" → "executor").
 */
export function signerRoleOf(identity: Identity): string {
  return identity.kind === "service" ? identity.principal.split("/")[0]! : "gateway";
}

/** The audience of a call to `service`: its full name (module comment). */
export function audienceOf(service: { typeName: string }): string {
  return service.typeName;
}

/** Why a signed payload was not accepted. */
export type SignatureProblem = "MALFORMED" | "UNKNOWN_SIGNER" | "FORGED" | "EXPIRED";

interface SignedClaims {
  /** The signing role. */
  iss: string;
  /** Expiry, ms since the epoch. */
  exp: number;
}

/**
 * Signing and checking cost a signature operation each per call on the hot path, so both are
 * remembered briefly: a signed identity is reused for up to a second (its expiry is then 59 s
 * to 60 s away, never more), and a payload and signature that verified are trusted again until
 * their expiry. Both caches are bounded: when full they are emptied and refilled.
 */
const SIGNATURE_REUSE_MS = 1_000;
const MAX_CACHED = 10_000;

function remember<V>(cache: Map<string, V>, key: string, value: V): void {
  if (cache.size >= MAX_CACHED) cache.clear();
  cache.set(key, value);
}

const PKCS8_HINT = "must be an Ed25519 private key as base64 PKCS#8 DER (`npm run signing-keys` makes a set)";
const SPKI_HINT = "must be an Ed25519 public key as base64 SPKI DER";

/** Parses OUTPOST_SIGNING_KEY; throws an Error whose message says what is wrong. */
export function parseSigningKey(value: string): KeyObject {
  let key: KeyObject;
  try {
    key = createPrivateKey({ key: Buffer.from(value.trim(), "base64"), format: "der", type: "pkcs8" });
  } catch {
    throw new Error(PKCS8_HINT);
  }
  if (key.asymmetricKeyType !== "ed25519") throw new Error(PKCS8_HINT);
  return key;
}

/**
 * Parses OUTPOST_TRUSTED_SIGNERS, "gateway:<key>,dispatcher:<key>,executor/host-1:<key>,…": the
 * public key of each role this process takes calls or grants from, or of one executor. An
 * issuer may be listed twice while its key is rotated (docs/operations.md). Throws an Error
 * naming the bad entry.
 */
export function parseTrustedSigners(value: string): Map<string, KeyObject[]> {
  const trusted = new Map<string, KeyObject[]>();
  for (const [i, entry] of value.split(",").map((e) => e.trim()).filter(Boolean).entries()) {
    const colon = entry.indexOf(":");
    const role = colon < 0 ? "" : entry.slice(0, colon);
    if (parseIssuer(role) === undefined && role !== ENROLLMENT_SIGNER) {
      throw new Error(
        `entry ${i + 1} must be <role>:<public key> with role one of ${SIGNER_ROLES.join(", ")}, executor/<executor id>:<public key>, or ${ENROLLMENT_SIGNER}:<public key>`,
      );
    }
    let key: KeyObject;
    try {
      key = createPublicKey({ key: Buffer.from(entry.slice(colon + 1), "base64"), format: "der", type: "spki" });
    } catch {
      throw new Error(`entry ${i + 1} (${role}): ${SPKI_HINT}`);
    }
    if (key.asymmetricKeyType !== "ed25519") throw new Error(`entry ${i + 1} (${role}): ${SPKI_HINT}`);
    trusted.set(role, [...(trusted.get(role) ?? []), key]);
  }
  return trusted;
}

/** One process's signing key and the public keys it trusts. */
export class SigningKeys {
  private readonly signedIdentities = new Map<string, { payload: string; signature: string; signedAt: number }>();
  private readonly verifiedIdentities = new Map<string, { identity: Identity; exp: number; aud: unknown }>();

  /** The role this process signs as. */
  readonly role: SignerRole;
  /** What its signatures name as issuer: the role, or "executor/<id>" for an executor. */
  readonly issuer: string;
  private privateKey: KeyObject;
  private readonly trusted: ReadonlyMap<string, readonly KeyObject[]>;
  /** The certificate sent with every signed identity, once this executor enrolled (useCertificate). */
  private certificate: string | undefined;
  /** The dispatcher's own public key, which checks the certificates it issued (made once). */
  private ownPublicKey: KeyObject | undefined;
  /** Certificates that verified: the key each certifies, for whom, until when. */
  private readonly certifiedKeys = new Map<string, { key: KeyObject; executor: string; exp: number }>();

  /** `name`: the executor's id, for an executor (its issuer is then "executor/<id>"). */
  constructor(role: SignerRole, privateKey: KeyObject, trusted: ReadonlyMap<string, readonly KeyObject[]> = new Map(), name?: string) {
    const issuer = name === undefined ? role : `${role}/${name}`;
    if (parseIssuer(issuer) === undefined) throw new Error(`${issuer} cannot sign: only executors sign with an id, which must be a valid executor id`);
    this.role = role;
    this.issuer = issuer;
    this.privateKey = privateKey;
    this.trusted = trusted;
  }

  /** From the two settings, as validated at start-up (and the executor's id, for an executor). */
  static fromSettings(role: SignerRole, signingKey: string, trustedSigners = "", name?: string): SigningKeys {
    return new SigningKeys(role, parseSigningKey(signingKey), parseTrustedSigners(trustedSigners), name);
  }

  /** Signs claims for `ttlMs`; the answer is the base64url payload and signature. */
  sign(claims: object, ttlMs: number, now = Date.now()): { payload: string; signature: string } {
    const payload = Buffer.from(JSON.stringify({ ...claims, iss: this.issuer, exp: now + ttlMs })).toString("base64url");
    return { payload, signature: sign(null, Buffer.from(payload), this.privateKey).toString("base64url") };
  }

  /**
   * Checks a payload and signature from any trusted role; answers the claims or the problem.
   * `extraKeys(claims)`: more keys that may have signed these claims (an identity's: the
   * enrollment key, a certified key).
   */
  verify(
    payload: string,
    signature: string,
    now = Date.now(),
    extraKeys: (claims: Record<string, unknown> & SignedClaims) => readonly KeyObject[] = () => [],
  ): { claims: Record<string, unknown> & SignedClaims } | { problem: SignatureProblem } {
    let claims: unknown;
    try {
      claims = JSON.parse(Buffer.from(payload, "base64url").toString("utf8"));
    } catch {
      return { problem: "MALFORMED" };
    }
    if (typeof claims !== "object" || claims === null || typeof (claims as { iss?: unknown }).iss !== "string") return { problem: "MALFORMED" };
    const signed = claims as Record<string, unknown> & SignedClaims;
    const keys = [...this.keysOf(signed.iss), ...extraKeys(signed)];
    if (keys.length === 0) return { problem: "UNKNOWN_SIGNER" };
    // Only the one spelling signing gives: Node's base64 decoder skips what is not base64 (and
    // the unused bits of the last character), so "<signature>=", "<signature>," or a standard-
    // alphabet copy decoded to the same bytes and verified, each a new string to remember.
    const signatureBytes = Buffer.from(signature, "base64url");
    if (signatureBytes.length !== 64 || signatureBytes.toString("base64url") !== signature) return { problem: "FORGED" };
    if (!keys.some((key) => verify(null, Buffer.from(payload), key, signatureBytes))) return { problem: "FORGED" };
    if (typeof signed.exp !== "number" || signed.exp < now) return { problem: "EXPIRED" };
    return { claims: signed };
  }

  /** The keys that may sign as `issuer`: its own, and its role's if it names one executor. */
  private keysOf(issuer: string): readonly KeyObject[] {
    const parsed = parseIssuer(issuer);
    if (parsed === undefined) return [];
    const own = this.trusted.get(issuer) ?? [];
    return parsed.name === undefined ? own : [...own, ...(this.trusted.get(parsed.role) ?? [])];
  }

  /** A grant as one string, "<payload>.<signature>". */
  signToken(claims: object, ttlMs: number, now = Date.now()): string {
    const { payload, signature } = this.sign(claims, ttlMs, now);
    return `${payload}.${signature}`;
  }

  /** Checks a token from `signToken`, which must come from a process of role `issuer`. */
  verifyToken(token: string, issuer: SignerRole, now = Date.now()): { claims: Record<string, unknown> } | { problem: SignatureProblem } {
    const [payload, signature, extra] = token.split(".");
    if (!payload || !signature || extra !== undefined) return { problem: "MALFORMED" };
    const checked = this.verify(payload, signature, now);
    if ("claims" in checked && parseIssuer(checked.claims.iss)?.role !== issuer) return { problem: "UNKNOWN_SIGNER" };
    return checked;
  }

  /** Writes the identity, signed for calls to `audience` (audienceOf), into outgoing request headers. */
  writeIdentity(headers: Headers, identity: Identity, audience: string, now = Date.now()): void {
    const key = `${audience}\n${JSON.stringify(identity)}`;
    let signed = this.signedIdentities.get(key);
    if (signed === undefined || now < signed.signedAt || now - signed.signedAt >= SIGNATURE_REUSE_MS) {
      signed = { ...this.sign({ id: identity, aud: audience }, IDENTITY_TTL_MS, now), signedAt: now };
      remember(this.signedIdentities, key, signed);
    }
    headers.set(IDENTITY_HEADER, signed.payload);
    headers.set(IDENTITY_SIGNATURE_HEADER, signed.signature);
    if (this.certificate !== undefined) headers.set(EXECUTOR_CERTIFICATE_HEADER, this.certificate);
  }

  /**
   * An enrolled executor from now on signs with `privateKey`, the key `certificate` certifies
   * (EnrollmentService), and sends the certificate with every identity; again at each renewal.
   */
  useCertificate(privateKey: KeyObject, certificate: string): void {
    this.privateKey = privateKey;
    this.certificate = certificate;
    this.signedIdentities.clear();
  }

  /**
   * The key a dispatcher's certificate binds to `issuer` ("executor/<id>"); none when the
   * certificate is not one, has expired, or names another executor. The dispatcher that issued
   * it checks it with its own public key (its replicas share the role's key).
   */
  private certifiedKeyOf(certificate: string, issuer: string, now: number): { key: KeyObject; exp: number } | undefined {
    let certified = this.certifiedKeys.get(certificate);
    if (certified === undefined) {
      const [payload, signature, extra] = certificate.split(".");
      if (!payload || !signature || extra !== undefined) return undefined;
      if (this.role === "dispatcher") this.ownPublicKey ??= createPublicKey(this.privateKey);
      const own = this.ownPublicKey ? [this.ownPublicKey] : [];
      const checked = this.verify(payload, signature, now, (claims) => (claims.iss === "dispatcher" ? own : []));
      if ("problem" in checked || checked.claims.iss !== "dispatcher" || checked.claims.cert !== "executor-key") return undefined;
      const { executor, key } = checked.claims;
      if (typeof executor !== "string" || typeof key !== "string") return undefined;
      try {
        certified = { key: parseExecutorPublicKey(Buffer.from(key, "base64")), executor, exp: checked.claims.exp };
      } catch {
        return undefined;
      }
      remember(this.certifiedKeys, certificate, certified);
    }
    return certified.executor === issuer && certified.exp >= now ? certified : undefined;
  }

  /**
   * Verifies the identity in the headers of a call to `audience` (audienceOf of the called
   * service); throws UNAUTHENTICATED when it cannot be trusted or was signed for another service.
   */
  readIdentity(headers: Headers, audience: string, now = Date.now()): Identity {
    const payload = headers.get(IDENTITY_HEADER);
    const signature = headers.get(IDENTITY_SIGNATURE_HEADER);
    if (!payload || !signature) {
      throw unauthenticated("IDENTITY_MISSING", "no caller identity: tenant calls must come through the gateway");
    }
    const key = `${payload}\n${signature}`;
    const remembered = this.verifiedIdentities.get(key);
    if (remembered !== undefined) {
      if (remembered.exp < now) throw unauthenticated("IDENTITY_EXPIRED", "caller identity has expired");
      if (remembered.aud !== audience) throw wrongAudience(remembered.aud, audience);
      return remembered.identity;
    }
    const certificate = headers.get(EXECUTOR_CERTIFICATE_HEADER);
    /** When the certificate that came with the identity ends: the identity is not trusted past it. */
    let certifiedUntil = Infinity;
    const checked = this.verify(payload, signature, now, (claims) => {
      if (parseIssuer(claims.iss)?.name === undefined) return [];
      // The enrollment key speaks for an executor only in identities signed for EnrollmentService
      // (and read there: the audience check below), so no identity it signed for another service
      // ever verifies, or is remembered; a certified key for the executor it names.
      const enrollment = claims.aud === ENROLLMENT_AUDIENCE && audience === ENROLLMENT_AUDIENCE ? (this.trusted.get(ENROLLMENT_SIGNER) ?? []) : [];
      const certified = certificate ? this.certifiedKeyOf(certificate, claims.iss, now) : undefined;
      if (certified) certifiedUntil = certified.exp;
      return certified ? [...enrollment, certified.key] : enrollment;
    });
    if ("problem" in checked) throw identityProblem(checked.problem);
    const { id, iss, aud } = checked.claims;
    const exp = Math.min(checked.claims.exp, certifiedUntil);
    if (!isIdentity(id)) throw unauthenticated("IDENTITY_MALFORMED", "caller identity is malformed");
    if (exp > now + IDENTITY_TTL_MS + CLOCK_SKEW_MS) {
      throw unauthenticated("IDENTITY_LIFETIME_TOO_LONG", `caller identity is valid for longer than an identity may be (${IDENTITY_TTL_MS / 1000} s)`);
    }
    // A role speaks only for what it is, an executor signing with its id only for itself
    // (module comment).
    const mayAssert = iss.includes("/") ? id.kind === "service" && id.principal === iss : signerRoleOf(id) === iss;
    if (!mayAssert) throw identityProblem("FORGED");
    const identity = Object.freeze(id);
    remember(this.verifiedIdentities, key, { identity, exp, aud });
    if (aud !== audience) throw wrongAudience(aud, audience);
    return identity;
  }
}

function wrongAudience(aud: unknown, audience: string) {
  const signedFor = typeof aud === "string" ? aud.slice(0, 128) : "no service";
  return unauthenticated("IDENTITY_WRONG_AUDIENCE", `caller identity was signed for ${signedFor}, not ${audience}`);
}

function identityProblem(problem: SignatureProblem) {
  switch (problem) {
    case "EXPIRED":
      return unauthenticated("IDENTITY_EXPIRED", "caller identity has expired");
    case "MALFORMED":
      return unauthenticated("IDENTITY_MALFORMED", "caller identity is malformed");
    default:
      return unauthenticated("IDENTITY_FORGED", "caller identity is not signed by an Outpost service that may sign it");
  }
}

/** Shape check of a decoded identity. */
function isIdentity(value: unknown): value is Identity {
  const id = value as Partial<Record<string, unknown>> | null | undefined;
  if (typeof id !== "object" || id === null || typeof id.principal !== "string") return false;
  if (id.kind === "tenant") return typeof id.tenantId === "string";
  return id.kind === "admin" || id.kind === "service";
}

/** How long an executor's certificate, and the binding of its id to the key, last unless renewed. */
export const EXECUTOR_CERTIFICATE_TTL_MS = 10 * 60_000;

/** Parses an executor's Ed25519 public key (SPKI DER); throws an Error saying what is wrong. */
export function parseExecutorPublicKey(der: Uint8Array): KeyObject {
  let key: KeyObject;
  try {
    key = createPublicKey({ key: Buffer.from(der), format: "der", type: "spki" });
  } catch {
    throw new Error(SPKI_HINT);
  }
  if (key.asymmetricKeyType !== "ed25519") throw new Error(SPKI_HINT);
  return key;
}

/** The dispatcher's certificate that `publicKey` (SPKI DER) speaks for `executor` ("executor/<id>"). */
export function issueExecutorCertificate(dispatcherKeys: SigningKeys, executor: string, publicKey: Uint8Array, ttlMs: number, now = Date.now()): string {
  return dispatcherKeys.signToken({ cert: "executor-key", executor, key: Buffer.from(publicKey).toString("base64") }, ttlMs, now);
}

/** What an enrolling executor signs with its new key (EnrollExecutorRequest.proof). */
function enrollmentProofMessage(executorId: string, publicKey: Uint8Array): Buffer {
  return Buffer.from(`outpost-executor-enrollment\n${executorId}\n${Buffer.from(publicKey).toString("base64")}`);
}

/** The proof that the enrolling executor holds the private key of `publicKey`. */
export function signEnrollmentProof(privateKey: KeyObject, executorId: string, publicKey: Uint8Array): Buffer {
  return sign(null, enrollmentProofMessage(executorId, publicKey), privateKey);
}

/** Whether `proof` is the signature of `publicKey`'s private key over the enrollment of `executorId`. */
export function verifyEnrollmentProof(publicKey: KeyObject, executorId: string, publicKeyDer: Uint8Array, proof: Uint8Array): boolean {
  return proof.byteLength === 64 && verify(null, enrollmentProofMessage(executorId, publicKeyDer), publicKey, proof);
}

/** A fresh Ed25519 key pair for an executor to enroll: the private key, and the public key as SPKI DER. */
export function newExecutorKeyPair(): { privateKey: KeyObject; publicKey: Buffer } {
  const { privateKey, publicKey } = generateKeyPairSync("ed25519");
  return { privateKey, publicKey: publicKey.export({ format: "der", type: "spki" }) };
}

/** A key pair per role, as the settings take them. */
export interface SigningKeySet {
  /** OUTPOST_SIGNING_KEY of each role (of every executor, unless they have their own below). */
  signingKeys: Record<SignerRole, string>;
  /** OUTPOST_SIGNING_KEY of each executor that has its own key, by executor id. */
  executorKeys: Record<string, string>;
  /** OUTPOST_TRUSTED_SIGNERS for every process: all the public keys. */
  trustedSigners: string;
}

function newKeyPair(): { privateKey: string; publicKey: string } {
  const { privateKey, publicKey } = generateKeyPairSync("ed25519");
  return {
    privateKey: privateKey.export({ format: "der", type: "pkcs8" }).toString("base64"),
    publicKey: publicKey.export({ format: "der", type: "spki" }).toString("base64"),
  };
}

/**
 * A fresh key pair per role, for the dev mesh, tests and `npm run signing-keys`. With
 * `executorIds`, each of those executors gets a key bound to its id instead of one shared by the
 * role, and no key is trusted for the executor role as a whole. With `executorEnrollment`, the
 * executor role's key is trusted only as the enrollment key (`executor-enroll:`): executors run
 * with OUTPOST_EXECUTOR_ENROLL=on.
 */
export function generateSigningKeySet(
  roles: readonly SignerRole[] = SIGNER_ROLES,
  executorIds: readonly string[] = [],
  options: { executorEnrollment?: boolean } = {},
): SigningKeySet {
  const signingKeys = {} as Record<SignerRole, string>;
  const executorKeys: Record<string, string> = {};
  const trusted: string[] = [];
  for (const role of roles) {
    const pair = newKeyPair();
    signingKeys[role] = pair.privateKey;
    if (role === "executor" && options.executorEnrollment) trusted.push(`${ENROLLMENT_SIGNER}:${pair.publicKey}`);
    else if (role !== "executor" || executorIds.length === 0) trusted.push(`${role}:${pair.publicKey}`);
  }
  for (const id of executorIds) {
    if (parseIssuer(`executor/${id}`) === undefined) throw new Error(`executor id ${JSON.stringify(id)}: letters, digits, '.', '_' and '-' only, at most 128`);
    const pair = newKeyPair();
    executorKeys[id] = pair.privateKey;
    trusted.push(`executor/${id}:${pair.publicKey}`);
  }
  return { signingKeys, executorKeys, trustedSigners: trusted.join(",") };
}

/** The keys of one role from a set (tests, tools); of one executor, given its id. */
export function signingKeysOf(set: SigningKeySet, role: SignerRole, executorId?: string): SigningKeys {
  const ownKey = executorId === undefined ? undefined : set.executorKeys[executorId];
  return SigningKeys.fromSettings(role, ownKey ?? set.signingKeys[role], set.trustedSigners, executorId);
}

export const identityKey = createContextKey<Identity | undefined>(undefined, { description: "caller identity" });

export function callerOf(ctx: HandlerContext): Identity {
  const identity = ctx.values.get(identityKey);
  if (!identity) throw unauthenticated("IDENTITY_MISSING", "no caller identity");
  return identity;
}

/** The calling tenant's id; admins and services are refused. */
export function requireTenant(ctx: HandlerContext): Extract<Identity, { kind: "tenant" }> {
  const identity = callerOf(ctx);
  if (identity.kind !== "tenant") {
    throw permissionDenied("TENANT_REQUIRED", "this method is called with a tenant API key");
  }
  return identity;
}

export function requireAdmin(ctx: HandlerContext): Extract<Identity, { kind: "admin" }> {
  const identity = callerOf(ctx);
  if (identity.kind !== "admin") {
    throw permissionDenied("ADMIN_REQUIRED", "this method needs the admin credential");
  }
  return identity;
}

/** Internal methods: only other Outpost services, optionally only some of them. */
export function requireService(ctx: HandlerContext, ...allowed: string[]): Extract<Identity, { kind: "service" }> {
  const identity = callerOf(ctx);
  const role = identity.kind === "service" ? signerRoleOf(identity) : "";
  if (identity.kind !== "service" || (allowed.length > 0 && !allowed.includes(role))) {
    throw permissionDenied("SERVICE_REQUIRED", "this method is internal to Outpost");
  }
  return identity;
}
