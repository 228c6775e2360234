import { LeaseService } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { LogIngestService } from "@outpost/proto/outpost/telemetry/v1/log_ingest_service_pb.js";
import { TenantInternalService } from "@outpost/proto/outpost/tenant/v1/tenant_internal_service_pb.js";
import { describe, expect, it } from "vitest";
import { Code, ConnectError } from "@connectrpc/connect";
import { PUBLIC_SERVICES } from "../src/core/routing.ts";
import { upstreamFailure } from "../src/routes.ts";

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

describe("upstreamFailure (the Connect path's answer when the upstream fails under a call)", () => {
  const wire = (code: Code) => Object.assign(new ConnectError("the service said so", code), { isWireError: true });
  const systemError = (code: string) => Object.assign(new Error(`socket: ${code}`), { code });

  it("turns the client's own reports of a refused, dropped or reset connection into UNAVAILABLE", () => {
    for (const err of [
      new ConnectError("read ECONNRESET", Code.Aborted, undefined, undefined, systemError("ECONNRESET")),
      new ConnectError("http/2 stream closed with error code CANCEL (0x8)", Code.Canceled),
      new ConnectError("http/2 stream closed with error code INTERNAL_ERROR (0x2)", Code.Internal),
      new ConnectError("connect ECONNREFUSED", Code.Unavailable),
      new ConnectError("stream error", Code.Internal, undefined, undefined, new Error("outer", { cause: systemError("ERR_HTTP2_STREAM_ERROR") })),
    ]) {
      const mapped = upstreamFailure(err) as ConnectError;
      expect(`${err.rawMessage}: ${Code[mapped.code]}`).toBe(`${err.rawMessage}: Unavailable`);
      expect(mapped.rawMessage).toContain("upstream unavailable");
      expect(mapped.cause).toBe(err);
    }
  });

  it("passes the service's own answers, deadlines and undecodable answers through unchanged", () => {
    for (const err of [
      wire(Code.Internal),
      wire(Code.Canceled),
      wire(Code.Aborted),
      new ConnectError("the deadline passed", Code.DeadlineExceeded),
      new ConnectError("parse binary: premature EOF", Code.Internal),
    ]) {
      expect(upstreamFailure(err)).toBe(err);
    }
    const plain = new Error("not a ConnectError");
    expect(upstreamFailure(plain)).toBe(plain);
  });
});
