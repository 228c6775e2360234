/**
 * Secret grants: a tenant's secret values are released to an executor only for a run it holds
 * a lease on. When the dispatcher leases a run that names secrets it signs a grant (its own
 * Ed25519 key, identity.ts) binding the run's tenant, the secret names and the executor that
 * took the lease; the executor hands the grant to the tenant service's ResolveSecrets, which
 * checks it. An executor can therefore read the secrets of the runs it was given and no
 * others, and no process but the dispatcher can mint a grant.
 */
import { invalidArgument, permissionDenied } from "./errors.ts";
import type { SigningKeys } from "./identity.ts";

export interface SecretGrant {
  dispatchId: string;
  tenantId: string;
  names: readonly string[];
  /** The executor's principal, "executor/<id>", from its signed identity. */
  executor: string;
}

/**
 * How long a grant can be used. The executor resolves secrets straight after taking the lease
 * (and gives the lease back on failure, so a retry comes with a new grant); a minute leaves
 * room for a slow tenant service and clock skew between hosts.
 */
export const SECRET_GRANT_TTL_MS = 60_000;

export function issueSecretGrant(keys: SigningKeys, grant: SecretGrant, now = Date.now()): string {
  return keys.signToken({ grant: "secrets", ...grant, names: [...grant.names] }, SECRET_GRANT_TTL_MS, now);
}

/**
 * Checks that `token` is a dispatcher's grant covering this request; throws INVALID_ARGUMENT
 * when it is missing, PERMISSION_DENIED (reason SECRET_GRANT_INVALID) when it does not cover it.
 */
export function checkSecretGrant(keys: SigningKeys, token: string, request: Omit<SecretGrant, "dispatchId">, now = Date.now()): void {
  if (token.length === 0) throw invalidArgument("grant", "is required (Lease.secret_grant of the run)", "FIELD_REQUIRED");
  const checked = keys.verifyToken(token, "dispatcher", now);
  const refuse = (why: string) => permissionDenied("SECRET_GRANT_INVALID", `secret grant refused: ${why}`);
  if ("problem" in checked) {
    const why = { EXPIRED: "it has expired", MALFORMED: "it is malformed", FORGED: "it is not signed by the dispatcher", UNKNOWN_SIGNER: "it is not signed by the dispatcher" };
    throw refuse(why[checked.problem]);
  }
  const claims = checked.claims;
  const names = Array.isArray(claims.names) ? claims.names : [];
  if (claims.grant !== "secrets") throw refuse("it is not a secret grant");
  if (claims.executor !== request.executor) throw refuse("it was given to another executor");
  if (claims.tenantId !== request.tenantId) throw refuse("it is for another tenant");
  const outside = request.names.find((name) => !names.includes(name));
  if (outside !== undefined) throw refuse(`it does not cover secret ${outside}`);
}
