/**
 * SecretResolver over the tenant service's TenantInternalService.ResolveSecrets (contract B;
 * callable by the "executor" service only). Values travel only over this signed internal
 * channel and are never logged: errors carry names, never values.
 */
import { Code, ConnectError, type Client } from "@connectrpc/connect";
import { errorInfoOf, internalClient, type SigningKeys, type TlsFiles } from "@outpost/platform";
import { TenantInternalService } from "@outpost/proto/outpost/tenant/v1/tenant_internal_service_pb.js";
import { SecretsError, type SecretResolver } from "../core/ports.ts";

export interface SecretResolverOptions {
  tenantUrl: string;
  signingKeys: SigningKeys;
  /** Internal TLS for an https:// URL (internalTlsOf). */
  tls?: TlsFiles | undefined;
  executorId: string;
  callTimeoutMs?: number;
}

export function createSecretResolver(options: SecretResolverOptions): SecretResolver {
  const client: Client<typeof TenantInternalService> = internalClient(TenantInternalService, {
    baseUrl: options.tenantUrl,
    signingKeys: options.signingKeys,
    tls: options.tls,
    identity: { kind: "service", principal: `executor/${options.executorId}` },
  });
  return {
    async resolve(tenantId, names, grant) {
      let values: Record<string, string>;
      try {
        values = (await client.resolveSecrets({ tenantId, names, grant }, { timeoutMs: options.callTimeoutMs ?? 10_000 })).values;
      } catch (err) {
        const connectErr = ConnectError.from(err);
        if (connectErr.code === Code.NotFound) {
          const metadata = errorInfoOf(connectErr)?.metadata ?? {};
          const secret = metadata["secret"] ?? (metadata["resource"] === "secret" ? metadata["id"] : undefined);
          throw new SecretsError(secret ? `secret ${secret} not found` : `secret not found: ${connectErr.rawMessage}`, false, { cause: err });
        }
        if (connectErr.code === Code.PermissionDenied || connectErr.code === Code.InvalidArgument) {
          throw new SecretsError(`secrets refused: ${connectErr.rawMessage}`, false, { cause: err });
        }
        throw new SecretsError(`secrets could not be resolved: tenant service answered ${Code[connectErr.code]}`, true, { cause: err });
      }
      const missing = names.find((name) => values[name] === undefined);
      if (missing) throw new SecretsError(`secret ${missing} not found`, false);
      return Object.fromEntries(names.map((name) => [name, values[name]!]));
    },
  };
}
