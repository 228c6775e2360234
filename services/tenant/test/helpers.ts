/** In-process transport for handler tests: the real routes behind a signed-identity check, no ports. */
import type { DescService } from "@bufbuild/protobuf";
import type { Identity } from "@outpost/platform";
import { expectError, signedRouterClient } from "../../../test/support/rpc.ts";
import { keysOf } from "../../../test/support/signing.ts";
import { AdmissionCore } from "../src/core/admission.ts";
import { SecretBox } from "../src/core/secret-box.ts";
import { SecretsCore } from "../src/core/secrets.ts";
import { TenantCore, type TenantCoreOptions } from "../src/core/tenants.ts";
import { tenantRoutes, type TenantCores } from "../src/routes.ts";
import type { TenantStore } from "../src/store/store.ts";

export const ADMIN: Identity = { kind: "admin", principal: "admin" };
export const GATEWAY: Identity = { kind: "service", principal: "gateway/test" };

export function tenantIdentity(tenantId: string): Identity {
  return { kind: "tenant", tenantId, principal: `tenant/${tenantId}` };
}

/** A fixed 32-byte test master key, base64: "k1:<key>". */
export const TEST_MASTER_KEYS = `k1:${Buffer.alloc(32, 7).toString("base64")}`;

/** The three cores over one store, as the service wires them; secrets sealed under TEST_MASTER_KEYS. */
export function buildCores(
  store: TenantStore,
  options: Omit<TenantCoreOptions, "store"> & { box?: SecretBox | null } = {},
): TenantCores {
  const { box, ...tenantOptions } = options;
  const tenants = new TenantCore({ store, ...tenantOptions });
  const secrets = new SecretsCore({
    store,
    box: box === null ? undefined : (box ?? SecretBox.fromSetting(TEST_MASTER_KEYS)),
    now: options.now,
  });
  const admission = new AdmissionCore({ store, tenants, secrets, now: options.now });
  return { tenants, secrets, admission, signingKeys: keysOf("tenant") };
}

export function clientFor<T extends DescService>(core: TenantCores, service: T, identity: Identity) {
  return signedRouterClient(service, tenantRoutes(core), identity);
}

export { expectError };
