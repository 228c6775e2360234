/**
 * Signing keys for tests: one fresh set per test module (identity.ts), the environment a
 * service process needs to use it, and a way to sign a call as any caller with the key of the
 * role that may sign it (a tenant with the gateway's, "executor/e1" with the executor's).
 */
import { audienceOf, generateSigningKeySet, issueLogGrant, issueSecretGrant, signerRoleOf, signingKeysOf, type Identity, type SignerRole, type SigningKeys } from "@outpost/platform";

export const TEST_SIGNING_KEY_SET = generateSigningKeySet();

const keys = new Map<SignerRole, SigningKeys>();

/** The keys of `role`, trusting every role of the test set. */
export function keysOf(role: SignerRole): SigningKeys {
  let found = keys.get(role);
  if (!found) keys.set(role, (found = signingKeysOf(TEST_SIGNING_KEY_SET, role)));
  return found;
}

/** Signs `identity` for calls to `service` into `headers`, with the key of the role allowed to sign it. */
export function signAs(headers: Headers, identity: Identity, service: { typeName: string }): void {
  signerFor(identity).writeIdentity(headers, identity, audienceOf(service));
}

/** OUTPOST_SIGNING_KEY and OUTPOST_TRUSTED_SIGNERS for a service process of `role`. */
export function signingEnv(role: SignerRole): { OUTPOST_SIGNING_KEY: string; OUTPOST_TRUSTED_SIGNERS: string } {
  return { OUTPOST_SIGNING_KEY: TEST_SIGNING_KEY_SET.signingKeys[role], OUTPOST_TRUSTED_SIGNERS: TEST_SIGNING_KEY_SET.trustedSigners };
}

/** The keys that may sign `identity`: pass as `signingKeys` with it to internalClient. */
export function signerFor(identity: Identity): SigningKeys {
  return keysOf(signerRoleOf(identity) as SignerRole);
}

/** A dispatcher's grant to `executor` to write the output of a run, as a lease would carry it. */
export function logGrantOf(dispatchId: string, tenantId: string, executor = "executor/host-1", leaseExpiresAt = Date.now() + 60_000): string {
  return issueLogGrant(keysOf("dispatcher"), { dispatchId, tenantId, executor }, leaseExpiresAt);
}

/** A dispatcher's grant of `names` of `tenantId` to `executor`, as a lease would carry it. */
export function grantOf(tenantId: string, names: string[], executor = "executor/host-1"): string {
  return issueSecretGrant(keysOf("dispatcher"), { dispatchId: "01JDISPATCHGRANT0000000000", tenantId, names, executor });
}
