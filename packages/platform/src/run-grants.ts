/**
 * Run grants: what an executor may do for a run is what the dispatcher granted it when it
 * leased the run to it. The dispatcher signs each grant (its own Ed25519 key, identity.ts),
 * binding the run, its tenant and the executor that took the lease; the executor hands it on and
 * the service that acts on it checks it against the caller's signed identity. No process but the
 * dispatcher can mint a grant, and a grant is no use to any executor but the one it names, so
 * an executor reaches the runs it was given and no others.
 *
 * - Secret grant: the tenant service's ResolveSecrets releases the named secrets' values.
 * - Log grant: telemetry's IngestLogs stores the run's output.
 */
import type { ConnectError } from "@connectrpc/connect";
import { invalidArgument, permissionDenied } from "./errors.ts";
import type { SigningKeys } from "./identity.ts";

interface RunGrant {
  dispatchId: string;
  tenantId: string;
  /** The executor's principal, "executor/<id>", from its signed identity. */
  executor: string;
}

export interface SecretGrant extends RunGrant {
  names: readonly string[];
}

export type LogGrant = RunGrant;

/**
 * How long a secret grant can be used. The executor resolves secrets straight after taking the
 * lease (and gives the lease back on failure, so a retry comes with a new grant); a minute
 * leaves room for a slow tenant service and clock skew between hosts.
 */
export const SECRET_GRANT_TTL_MS = 60_000;

/**
 * How long a log grant outlives the lease it comes with: time for the executor's last output
 * after the container exits (it waits up to 10 s for telemetry's acknowledgement) and for a
 * heartbeat that is late. Every heartbeat renews the lease and the grant, so an executor that
 * loses its lease (cut off, or the run leased again elsewhere) can write the run's output for
 * this long at most.
 */
export const LOG_GRANT_GRACE_MS = 60_000;

export function issueSecretGrant(keys: SigningKeys, grant: SecretGrant, now = Date.now()): string {
  return keys.signToken({ grant: "secrets", ...grant, names: [...grant.names] }, SECRET_GRANT_TTL_MS, now);
}

/** A log grant that lasts until `leaseExpiresAt` (ms since the epoch) and LOG_GRANT_GRACE_MS more. */
export function issueLogGrant(keys: SigningKeys, grant: LogGrant, leaseExpiresAt: number, now = Date.now()): string {
  return keys.signToken({ grant: "logs", ...grant }, leaseExpiresAt + LOG_GRANT_GRACE_MS - now, now);
}

/**
 * The claims of a dispatcher's grant of `kind` to `request.executor` for `request.tenantId`
 * (and `request.dispatchId`, when given); throws INVALID_ARGUMENT naming `field` when the token
 * is missing, PERMISSION_DENIED with `reason` when it is not such a grant.
 */
function checkRunGrant(
  keys: SigningKeys,
  token: string,
  kind: "secrets" | "logs",
  request: Omit<RunGrant, "dispatchId"> & { dispatchId?: string },
  errors: { field: string; source: string; reason: string; what: string },
  now: number,
): Record<string, unknown> {
  if (token.length === 0) throw invalidArgument(errors.field, `is required (${errors.source} of the run)`, "FIELD_REQUIRED");
  const checked = keys.verifyToken(token, "dispatcher", now);
  const refuse = (why: string) => permissionDenied(errors.reason, `${errors.what} refused: ${why}`);
  if ("problem" in checked) {
    const why = { EXPIRED: "it has expired", MALFORMED: "it is malformed", FORGED: "it is not signed by the dispatcher", UNKNOWN_SIGNER: "it is not signed by the dispatcher" };
    throw refuse(why[checked.problem]);
  }
  const claims = checked.claims;
  if (claims.grant !== kind) throw refuse(`it is not a ${errors.what}`);
  if (claims.executor !== request.executor) throw refuse("it was given to another executor");
  if (claims.tenantId !== request.tenantId) throw refuse("it is for another tenant");
  if (request.dispatchId !== undefined && claims.dispatchId !== request.dispatchId) throw refuse("it is for another run");
  return claims;
}

/**
 * Checks that `token` is a dispatcher's secret grant covering this request; throws
 * INVALID_ARGUMENT when it is missing, PERMISSION_DENIED (reason SECRET_GRANT_INVALID) when it
 * does not cover it.
 */
export function checkSecretGrant(keys: SigningKeys, token: string, request: Omit<SecretGrant, "dispatchId">, now = Date.now()): void {
  const errors = { field: "grant", source: "Lease.secret_grant", reason: "SECRET_GRANT_INVALID", what: "secret grant" };
  const claims = checkRunGrant(keys, token, "secrets", request, errors, now);
  const names = Array.isArray(claims.names) ? claims.names : [];
  const outside = request.names.find((name) => !names.includes(name));
  if (outside !== undefined) throw permissionDenied(errors.reason, `secret grant refused: it does not cover secret ${outside}`);
}

/**
 * Checks that `token` is a dispatcher's log grant for this run, tenant and executor, and
 * answers when it expires (ms since the epoch); throws INVALID_ARGUMENT when it is missing,
 * PERMISSION_DENIED (reason LOG_GRANT_INVALID) otherwise.
 */
export function checkLogGrant(keys: SigningKeys, token: string, request: LogGrant, now = Date.now()): { expiresAt: number } {
  const errors = { field: "grant", source: "Lease.log_grant", reason: "LOG_GRANT_INVALID", what: "log grant" };
  const claims = checkRunGrant(keys, token, "logs", request, errors, now);
  return { expiresAt: Number(claims.exp) };
}

/** The refusal of a log grant that was accepted and has since expired. */
export function logGrantExpired(): ConnectError {
  return permissionDenied("LOG_GRANT_INVALID", "log grant refused: it has expired");
}
