/**
 * The executor serves no API of its own: its port carries health only (liveness, readiness =
 * the engine answers, grpc.health.v1), which the platform registers. Work arrives by pull.
 */
import type { ConnectRouter } from "@connectrpc/connect";

export function executorRoutes(): (router: ConnectRouter) => void {
  return () => {};
}
