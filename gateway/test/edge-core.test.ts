import { createHash } from "node:crypto";
import { fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { describe, expect, it, vi } from "vitest";
import { create } from "@bufbuild/protobuf";
import { ServerReflectionRequestSchema } from "@outpost/proto/grpc/reflection/v1/reflection_pb.js";
import { DispatchService } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { LogService } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { Authenticator } from "../src/core/authenticator.ts";
import { corsAnswer, corsPolicyOf } from "../src/core/cors.ts";
import { methodClassOf } from "../src/core/method-class.ts";
import { RateLimitPolicy, parseAllowList, tightest, type RateDecision } from "../src/core/rate-limit.ts";
import { ReflectionIndex } from "../src/core/reflection.ts";
import { MemoryRateCounter } from "../src/store/rate-counter.ts";

describe("methodClassOf", () => {
  it("classifies by verb", () => {
    expect(["CreateDispatch", "PutSecret", "RegisterAgent", "CreateApiKey"].map(methodClassOf)).toEqual(["create", "create", "create", "create"]);
    expect(["GetDispatch", "ListDispatches", "WatchDispatch", "SubscribeLogs"].map(methodClassOf)).toEqual(["read", "read", "read", "read"]);
    expect(["CancelDispatch", "RevokeApiKey", "SuspendTenant", "DeleteSecret", "UpdateTenant"].map(methodClassOf)).toEqual(Array(5).fill("trigger"));
  });
});

describe("CORS", () => {
  const policy = corsPolicyOf("https://a.example, https://b.example/");
  it("answers an allowed preflight with the protocol headers and refuses others", () => {
    const ok = corsAnswer(policy, "OPTIONS", "https://b.example", "POST");
    expect(ok.kind).toBe("preflight");
    if (ok.kind !== "preflight") return;
    expect(ok.status).toBe(204);
    expect(ok.headers["Access-Control-Allow-Origin"]).toBe("https://b.example");
    expect(ok.headers["Access-Control-Allow-Headers"]).toContain("Connect-Protocol-Version");
    expect(ok.headers["Vary"]).toBe("Origin");
    const no = corsAnswer(policy, "OPTIONS", "https://c.example", "POST");
    expect(no.kind === "preflight" && no.status).toBe(403);
    expect(no.kind === "preflight" && no.headers["Access-Control-Allow-Origin"]).toBeUndefined();
  });
  it("exposes status and rate-limit headers on calls; nothing without an Origin; * allows any", () => {
    const call = corsAnswer(policy, "POST", "https://a.example", undefined);
    expect(call.kind === "call" && call.headers["Access-Control-Expose-Headers"]).toContain("RateLimit-Remaining");
    expect(corsAnswer(policy, "POST", undefined, undefined).kind).toBe("none");
    const any = corsAnswer(corsPolicyOf("*"), "POST", "https://z.example", undefined);
    expect(any.kind === "call" && any.headers["Access-Control-Allow-Origin"]).toBe("*");
  });
});

describe("RateLimitPolicy", () => {
  const limits = { create: 2, trigger: 3, read: 4 };
  it("counts per tenant and class, with the tier's limit when sent", async () => {
    const policy = new RateLimitPolicy({ counter: new MemoryRateCounter(), defaults: limits, perIp: { create: 100, trigger: 100, read: 100 }, allow: [] });
    const results = [];
    for (let i = 0; i < 3; i++) results.push(await policy.checkTenant("10.0.0.1", "T1", "create"));
    expect(results.map((r) => r!.allowed)).toEqual([true, true, false]);
    expect(results[2]!.limit).toBe(2);
    expect(results[2]!.msBeforeReset).toBeGreaterThan(0);
    expect((await policy.checkTenant("10.0.0.1", "T2", "create"))!.allowed).toBe(true); // another tenant
    expect((await policy.checkTenant("10.0.0.1", "T1", "read"))!.allowed).toBe(true); // another class
    const tier = await policy.checkTenant("10.0.0.1", "T3", "create", { create: 50 });
    expect(tier!.limit).toBe(50);
    expect(tier!.remaining).toBe(49);
  });
  it("skips allow-listed callers (v4-mapped addresses too) and rejects bad entries", async () => {
    const policy = new RateLimitPolicy({ counter: new MemoryRateCounter(), defaults: limits, perIp: limits, allow: ["10.1.0.0/16", "::1"] });
    expect(await policy.checkIp("::ffff:10.1.2.3", "create")).toBeUndefined();
    expect(await policy.checkIp("::1", "create")).toBeUndefined();
    expect(await policy.checkIp("10.2.0.1", "create")).toBeDefined();
    expect(() => parseAllowList(["10.0.0.0/33"])).toThrow(/CIDR/);
    expect(() => parseAllowList(["nope"])).toThrow(/nope/);
  });
  it("reports the refusal, else the budget with the fewest calls left", () => {
    const d = (allowed: boolean, remaining: number, subject: "ip" | "tenant"): RateDecision => ({ allowed, remaining, subject, limit: 10, msBeforeReset: 1, methodClass: "read" });
    expect(tightest(d(true, 5, "ip"), d(true, 2, "tenant"))!.subject).toBe("tenant");
    expect(tightest(d(false, 0, "ip"), d(true, 0, "tenant"))!.subject).toBe("ip");
    expect(tightest(undefined, undefined)).toBeUndefined();
  });
});

describe("ReflectionIndex", () => {
  const index = new ReflectionIndex([DispatchService, LogService]);
  it("lists services and finds files by symbol (service, method, nested message) with imports", () => {
    expect(index.listServices()).toEqual(["outpost.dispatch.v1.DispatchService", "outpost.telemetry.v1.LogService"]);
    for (const symbol of ["outpost.dispatch.v1.DispatchService", "outpost.dispatch.v1.DispatchService.GetDispatch", ".outpost.dispatch.v1.GetDispatchRequest"]) {
      const files = index.fileContainingSymbol(symbol)!.map((b) => fromBinary(FileDescriptorProtoSchema, b).name);
      expect(files[0]).toBe("outpost/dispatch/v1/dispatch_service.proto");
      expect(new Set(files).size).toBe(files.length);
    }
    expect(fromBinary(FileDescriptorProtoSchema, index.fileContainingSymbol("outpost.dispatch.v1.Dispatch.State")![0]!).name).toBe("outpost/dispatch/v1/dispatch.proto");
    expect(index.fileContainingSymbol("outpost.nope.Missing")).toBeUndefined();
  });
  it("answers errors in-band", () => {
    const res = index.answer(create(ServerReflectionRequestSchema, { messageRequest: { case: "fileByFilename", value: "nope.proto" } }));
    expect(res.messageResponse.case).toBe("errorResponse");
    const none = index.answer(create(ServerReflectionRequestSchema, {}));
    expect(none.messageResponse.case === "errorResponse" && none.messageResponse.value.errorCode).toBe(3);
  });
});

describe("Authenticator invalidation", () => {
  const KEY = `otp_${"c3".repeat(32)}`;
  const headers = new Headers({ authorization: `Bearer ${KEY}` });
  const hash = createHash("sha256").update(KEY).digest("hex");
  const setup = () => {
    const lookup = vi.fn(async () => ({ tenantId: "T1", apiKeyId: "K1", rateLimits: { read: 7 } }));
    return { lookup, auth: new Authenticator({ adminToken: "a".repeat(40), cacheTtlMs: 60_000, lookup }) };
  };
  it("drops a key by its hash and a tenant's keys by tenant:<id>", async () => {
    const { auth, lookup } = setup();
    await auth.authenticate(headers);
    await auth.authenticate(headers);
    expect(lookup).toHaveBeenCalledTimes(1);
    expect(auth.rateLimitsOf("T1")).toEqual({ read: 7 });
    auth.invalidate(hash);
    expect(auth.cachedIdentity(headers)).toBeUndefined();
    await auth.authenticate(headers);
    expect(lookup).toHaveBeenCalledTimes(2);
    auth.invalidate("tenant:T1");
    expect(auth.cachedIdentity(headers)).toBeUndefined();
  });
  it("asks once for concurrent calls, and does not cache an answer that raced a revocation", async () => {
    const { auth, lookup } = setup();
    let release!: () => void;
    lookup.mockImplementationOnce(() => new Promise((resolve) => (release = () => resolve({ tenantId: "T1", apiKeyId: "K1", rateLimits: { read: 7 } }))));
    const calls = [auth.authenticate(headers), auth.authenticate(headers)];
    auth.invalidate(hash); // revoked while the tenant service was answering
    release();
    await Promise.all(calls);
    expect(lookup).toHaveBeenCalledTimes(1);
    expect(auth.cachedIdentity(headers)).toBeUndefined();
  });
});
