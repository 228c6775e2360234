/**
 * The audit trail (SPEC D9) lives in the dispatcher's store; the tenant service reports its own
 * mutating calls there (AuditInternalService.RecordAuditEvent), with the caller, the target and
 * the outcome, successful or not. Reporting is bounded in time and never fails the call: a lost
 * audit event is logged loudly instead.
 */
import { type Interceptor } from "@connectrpc/connect";
import { identityKey, internalClient, outcomeOf, type Logger, type SigningKeys, type TlsFiles } from "@outpost/platform";
import { AuditInternalService } from "@outpost/proto/outpost/dispatch/v1/audit_service_pb.js";
import { SECRET_NAME_PATTERN } from "../core/secrets.ts";

/** Methods of the tenant service that change something, and the resource each acts on. */
const MUTATIONS: Record<string, (req: Record<string, unknown>, res: Record<string, unknown> | undefined) => { tenantId?: string; target: string }> = {
  "outpost.tenant.v1.TenantService/CreateTenant": (_req, res) => {
    const id = (res?.tenant as { id?: string } | undefined)?.id ?? "";
    return { tenantId: id, target: `tenant/${id}` };
  },
  "outpost.tenant.v1.TenantService/UpdateTenant": (req) => ({ tenantId: String(req.tenantId ?? ""), target: `tenant/${String(req.tenantId ?? "")}` }),
  "outpost.tenant.v1.TenantService/SuspendTenant": (req) => ({ tenantId: String(req.tenantId ?? ""), target: `tenant/${String(req.tenantId ?? "")}` }),
  "outpost.tenant.v1.TenantService/ReactivateTenant": (req) => ({ tenantId: String(req.tenantId ?? ""), target: `tenant/${String(req.tenantId ?? "")}` }),
  "outpost.tenant.v1.ApiKeyService/CreateApiKey": (req, res) => {
    const key = res?.apiKey as { id?: string; tenantId?: string } | undefined;
    return { tenantId: key?.tenantId ?? String(req.tenantId ?? ""), target: `api_key/${key?.id ?? ""}` };
  },
  "outpost.tenant.v1.ApiKeyService/RevokeApiKey": (req, res) => {
    const key = res?.apiKey as { tenantId?: string } | undefined;
    return { tenantId: key?.tenantId, target: `api_key/${String(req.apiKeyId ?? "")}` };
  },
  "outpost.tenant.v1.SecretService/PutSecret": (req) => ({ target: secretTarget(req.name) }),
  "outpost.tenant.v1.SecretService/DeleteSecret": (req) => ({ target: secretTarget(req.name) }),
};

/**
 * A secret's name as the audit trail records it. The name comes from the request as sent, also
 * when it is refused, and a name that is no name (a tenant who swapped the arguments, `secret put
 * ghp_… --value GITHUB_TOKEN`) may well be the value itself: only a valid name is written down.
 */
function secretTarget(name: unknown): string {
  return typeof name === "string" && SECRET_NAME_PATTERN.test(name) ? `secret/${name}` : "secret/(invalid name)";
}

/** What the audit trail records for a call of `method` (undefined: not a mutation); exported for tests. */
export function auditedMutation(
  method: string,
  req: Record<string, unknown>,
  res: Record<string, unknown> | undefined,
): { tenantId?: string; target: string } | undefined {
  return MUTATIONS[method]?.(req, res);
}

/**
 * The audit trail's bounds on a target and a tenant id. Both come from the request as sent, so a
 * hostile one (refused for its length) must still be recorded: it is clipped, with a marker.
 */
const TARGET_MAX = 256;
const TENANT_ID_MAX = 128;

function clip(value: string, max: number): string {
  return value.length <= max ? value : `${value.slice(0, max - 1).toWellFormed()}…`;
}

/** How long a call may wait for its audit record to be written. */
const RECORD_TIMEOUT_MS = 2000;

export interface AuditReporterOptions {
  dispatcherUrl: string;
  signingKeys: SigningKeys;
  tls?: TlsFiles | undefined;
  logger: Logger;
}

export function auditReporter({ dispatcherUrl, signingKeys, tls, logger }: AuditReporterOptions): Interceptor {
  const audit = internalClient(AuditInternalService, { baseUrl: dispatcherUrl, signingKeys, tls, identity: { kind: "service", principal: "tenant" } });
  return (next) => async (req) => {
    const method = `${req.service.typeName}/${req.method.name}`;
    const describe = MUTATIONS[method];
    if (!describe || req.stream) return next(req);
    const caller = req.contextValues.get(identityKey);
    const record = async (res: Record<string, unknown> | undefined, err?: unknown) => {
      let described: { tenantId?: string; target: string };
      try {
        described = describe(req.message as Record<string, unknown>, res);
      } catch {
        described = { target: "" };
      }
      const tenantId = caller?.kind === "tenant" ? caller.tenantId : (described.tenantId ?? "");
      try {
        await audit.recordAuditEvent(
          {
            tenantId: clip(tenantId, TENANT_ID_MAX),
            principal: caller?.principal ?? "unknown",
            method,
            target: clip(described.target, TARGET_MAX),
            outcome: outcomeOf(err),
          },
          { timeoutMs: RECORD_TIMEOUT_MS },
        );
      } catch (auditErr) {
        logger.error({ err: auditErr, method, tenant_id: tenantId }, "audit event not recorded");
      }
    };
    try {
      const res = await next(req);
      await record(res.message as unknown as Record<string, unknown>);
      return res;
    } catch (err) {
      await record(undefined, err);
      throw err;
    }
  };
}
