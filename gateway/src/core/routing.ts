/**
 * What the edge exposes, and which service owns it. Internal services (lease, ingest,
 * tenant-internal) are not listed, so the gateway never forwards to them.
 */
import type { DescService } from "@bufbuild/protobuf";
import { AgentService } from "@outpost/proto/outpost/dispatch/v1/agent_service_pb.js";
import { AuditService } from "@outpost/proto/outpost/dispatch/v1/audit_service_pb.js";
import { DispatchService } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { FleetService } from "@outpost/proto/outpost/dispatch/v1/fleet_service_pb.js";
import { LogService } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { ApiKeyService, SecretService, TenantService } from "@outpost/proto/outpost/tenant/v1/tenant_service_pb.js";

export type Upstream = "tenant" | "dispatcher" | "telemetry";

export const PUBLIC_SERVICES: readonly { service: DescService; upstream: Upstream }[] = [
  { service: TenantService, upstream: "tenant" },
  { service: ApiKeyService, upstream: "tenant" },
  { service: SecretService, upstream: "tenant" },
  { service: DispatchService, upstream: "dispatcher" },
  { service: AgentService, upstream: "dispatcher" },
  { service: FleetService, upstream: "dispatcher" },
  { service: AuditService, upstream: "dispatcher" },
  { service: LogService, upstream: "telemetry" },
];
