import { LeaseService } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { LogIngestService } from "@outpost/proto/outpost/telemetry/v1/log_ingest_service_pb.js";
import { TenantInternalService } from "@outpost/proto/outpost/tenant/v1/tenant_internal_service_pb.js";
import { describe, expect, it } from "vitest";
import { PUBLIC_SERVICES } from "../src/core/routing.ts";

describe("PUBLIC_SERVICES", () => {
  const names = PUBLIC_SERVICES.map((s) => s.service.typeName);

  it("lists no internal service", () => {
    for (const internal of [LeaseService, LogIngestService, TenantInternalService]) expect(names).not.toContain(internal.typeName);
    for (const name of names) expect(name).not.toMatch(/Internal|Ingest|Lease/);
  });

  it("lists each service once", () => {
    expect(new Set(names).size).toBe(names.length);
  });

  it("routes each service to the upstream that owns its package", () => {
    const owner: Record<string, string> = { "outpost.tenant.v1": "tenant", "outpost.dispatch.v1": "dispatcher", "outpost.telemetry.v1": "telemetry" };
    for (const { service, upstream } of PUBLIC_SERVICES) expect(upstream, service.typeName).toBe(owner[service.file.proto.package]);
  });

  it("only has unary and server-streaming methods (all the forwarder supports)", () => {
    for (const { service } of PUBLIC_SERVICES) {
      expect(service.methods.length).toBeGreaterThan(0);
      for (const method of service.methods) expect(["unary", "server_streaming"], `${service.typeName}/${method.name}`).toContain(method.methodKind);
    }
  });
});
