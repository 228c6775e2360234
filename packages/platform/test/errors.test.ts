import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import {
  ERROR_DOMAIN,
  errorInfoOf,
  invalidArgument,
  notFound,
  resourceExhausted,
  unavailable,
  unimplemented,
  type RunningServer,
} from "@outpost/platform";
import { BadRequestSchema, QuotaFailureSchema, RetryInfoSchema } from "@outpost/proto/google/rpc/error_details_pb.js";
import { LogService } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startTestServer } from "./helpers.ts";

describe("error helpers", () => {
  it("invalidArgument carries ErrorInfo naming the field and a BadRequest violation", () => {
    const err = invalidArgument("task", "is required", "FIELD_REQUIRED");
    expect(err.code).toBe(Code.InvalidArgument);
    expect(err.rawMessage).toBe("task: is required");
    const info = errorInfoOf(err)!;
    expect(info.domain).toBe(ERROR_DOMAIN);
    expect(ERROR_DOMAIN).toBe("outpost.dev");
    expect(info.reason).toBe("FIELD_REQUIRED");
    expect(info.metadata.field).toBe("task");
    const [badRequest] = err.findDetails(BadRequestSchema);
    expect(badRequest?.fieldViolations).toEqual([expect.objectContaining({ field: "task", description: "is required", reason: "FIELD_REQUIRED" })]);
  });

  it("invalidArgument defaults the reason to INVALID_FIELD", () => {
    expect(errorInfoOf(invalidArgument("name", "too odd"))?.reason).toBe("INVALID_FIELD");
  });

  it("resourceExhausted carries QUOTA_EXCEEDED and a QuotaFailure naming the quota", () => {
    const err = resourceExhausted("concurrent_dispatches", "at most 2 running", { limit: "2" });
    expect(err.code).toBe(Code.ResourceExhausted);
    const info = errorInfoOf(err)!;
    expect(info.reason).toBe("QUOTA_EXCEEDED");
    expect(info.metadata).toEqual({ quota: "concurrent_dispatches", limit: "2" });
    const [failure] = err.findDetails(QuotaFailureSchema);
    expect(failure?.violations).toEqual([expect.objectContaining({ subject: "concurrent_dispatches", description: "at most 2 running" })]);
  });

  it("unimplemented says NOT_YET_BUILT and names the method", () => {
    const err = unimplemented("FleetService/Drain", "phase 3");
    expect(err.code).toBe(Code.Unimplemented);
    expect(errorInfoOf(err)).toMatchObject({ reason: "NOT_YET_BUILT", domain: ERROR_DOMAIN, metadata: { method: "FleetService/Drain" } });
  });

  it("unavailable carries RetryInfo only when a delay is given", () => {
    expect(unavailable("X", "later").findDetails(RetryInfoSchema)).toHaveLength(0);
    const [retry] = unavailable("X", "later", 1500).findDetails(RetryInfoSchema);
    expect(retry?.retryDelay).toMatchObject({ seconds: 1n, nanos: 500_000_000 });
  });

  it("notFound names the resource in the reason", () => {
    expect(errorInfoOf(notFound("dispatch", "D1"))).toMatchObject({ reason: "DISPATCH_NOT_FOUND", metadata: { resource: "dispatch", id: "D1" } });
  });

  it("errorInfoOf answers undefined for an error without details", () => {
    expect(errorInfoOf(new ConnectError("plain", Code.Internal))).toBeUndefined();
  });
});

describe("error details over the wire", () => {
  let server: RunningServer;
  beforeAll(async () => {
    server = await startTestServer();
  });
  afterAll(() => server.close());

  const transports = {
    grpc: () => createGrpcTransport({ baseUrl: server.url }),
    connect: () => createConnectTransport({ baseUrl: server.url, httpVersion: "1.1" }),
    grpcWeb: () => createGrpcWebTransport({ baseUrl: server.url, httpVersion: "1.1" }),
  };

  for (const [name, transport] of Object.entries(transports)) {
    it(`ErrorInfo and BadRequest survive ${name}`, async () => {
      const client = createClient(LogService, transport());
      const err = await client.getLogs({ dispatchId: "invalid" }).then(
        () => undefined,
        (e: unknown) => ConnectError.from(e),
      );
      expect(err?.code).toBe(Code.InvalidArgument);
      expect(errorInfoOf(err!)).toMatchObject({ reason: "INVALID_FIELD", domain: ERROR_DOMAIN, metadata: { field: "dispatch_id" } });
      expect(err!.findDetails(BadRequestSchema)[0]?.fieldViolations[0]?.field).toBe("dispatch_id");
    });
  }
});
