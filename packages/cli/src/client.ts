/** Connect clients for the edge, authenticated with an API key or the admin token. */
import tls from "node:tls";
import { createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { AgentService } from "@outpost/proto/outpost/dispatch/v1/agent_service_pb.js";
import { AuditService } from "@outpost/proto/outpost/dispatch/v1/audit_service_pb.js";
import { DispatchService } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { FleetService } from "@outpost/proto/outpost/dispatch/v1/fleet_service_pb.js";
import { LogService } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { ApiKeyService, SecretService, TenantService } from "@outpost/proto/outpost/tenant/v1/tenant_service_pb.js";

export interface OutpostClients {
  dispatches: Client<typeof DispatchService>;
  agents: Client<typeof AgentService>;
  audit: Client<typeof AuditService>;
  fleet: Client<typeof FleetService>;
  logs: Client<typeof LogService>;
  tenants: Client<typeof TenantService>;
  apiKeys: Client<typeof ApiKeyService>;
  secrets: Client<typeof SecretService>;
}

/** `options.ca`: PEM of the CA to trust for an https:// gateway besides the system's (a private CA). */
export function outpostClients(gatewayUrl: string, credential: string, options: { ca?: Buffer } = {}): OutpostClients {
  const auth: Interceptor = (next) => (req) => {
    req.header.set("authorization", `Bearer ${credential}`);
    return next(req);
  };
  // Connect protocol over HTTP/1.1: what browsers and most SDK users speak to the edge.
  const transport = createConnectTransport({
    baseUrl: gatewayUrl,
    httpVersion: "1.1",
    interceptors: [auth],
    ...(options.ca ? { nodeOptions: { ca: [...tls.rootCertificates, options.ca.toString()] } } : {}),
  });
  return {
    dispatches: createClient(DispatchService, transport),
    agents: createClient(AgentService, transport),
    audit: createClient(AuditService, transport),
    fleet: createClient(FleetService, transport),
    logs: createClient(LogService, transport),
    tenants: createClient(TenantService, transport),
    apiKeys: createClient(ApiKeyService, transport),
    secrets: createClient(SecretService, transport),
  };
}
