/** Shared by the dispatcher tests: identities, in-process clients behind the real identity check, error assertions. */
import type { DescService } from "@bufbuild/protobuf";
import type { Identity } from "@outpost/platform";
import { expectError, signedRouterClient } from "../../../test/support/rpc.ts";
import { keysOf } from "../../../test/support/signing.ts";
import { AgentRegistry } from "../src/core/agents.ts";
import type { Dispatcher } from "../src/core/dispatcher.ts";
import { registerRoutes, type RouteDeps } from "../src/routes.ts";
import { AuditLog } from "../src/core/audit.ts";
import { ExecutorEnrollment } from "../src/core/enrollment.ts";
import { SqliteDispatchStore } from "../src/store/sqlite-store.ts";
import { createLogger } from "@outpost/platform";

/** Route dependencies over their own in-memory store, for tests that do not look at them. */
export function defaultRouteDeps(): RouteDeps {
  const store = new SqliteDispatchStore(":memory:");
  const signingKeys = keysOf("dispatcher");
  return {
    audit: new AuditLog(store, createLogger("dispatcher-test", "silent")),
    fleet: () => Promise.reject(new Error("fleet status is not part of this test")),
    signingKeys,
    enrollment: new ExecutorEnrollment(store, signingKeys),
  };
}

export const ADMIN: Identity = { kind: "admin", principal: "admin" };
export const EXECUTOR: Identity = { kind: "service", principal: "executor/host-1" };
export const GATEWAY: Identity = { kind: "service", principal: "gateway/test" };

export function tenantIdentity(tenantId: string): Identity {
  return { kind: "tenant", tenantId, principal: `key/${tenantId}` };
}

/** A client of `service` whose calls are signed as `identity` and checked exactly as the server does. */
export function clientFor<T extends DescService>(
  dispatcher: Dispatcher,
  agents: AgentRegistry,
  service: T,
  identity: Identity,
  deps: RouteDeps = defaultRouteDeps(),
) {
  return signedRouterClient(service, (router) => registerRoutes(router, dispatcher, agents, deps), identity);
}

export { expectError };
