/**
 * Executors with keys of their own (identity.ts, docs/operations.md "A key per executor"), over
 * the real mesh: the mesh trusts one key per executor id and none for the executor role, the
 * executor runs a dispatch that names a secret end to end with its key (lease, secrets, logs),
 * and a second executor's key cannot speak as the first at the dispatcher, the tenant service or
 * telemetry, nor use the grants the dispatcher gave the first.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import Docker from "dockerode";
import { followLogs } from "@outpost/cli";
import { generateSigningKeySet, internalClient, issueLogGrant, issueSecretGrant, SIGNER_ROLES, signingKeysOf, type Identity } from "@outpost/platform";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { LeaseService } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { LogIngestService } from "@outpost/proto/outpost/telemetry/v1/log_ingest_service_pb.js";
import { LogStream } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";
import { TenantInternalService } from "@outpost/proto/outpost/tenant/v1/tenant_internal_service_pb.js";
import { refusal } from "../support/rpc.ts";
import { startTestMesh, type TestMesh } from "./harness.ts";

const EXECUTOR_ID = `keyed-${process.pid}`;
const INTRUDER_ID = `intruder-${process.pid}`;
/** The mesh's keys: the executor's and the intruder's are bound to their ids; no role key is trusted. */
const KEYS = generateSigningKeySet(SIGNER_ROLES, [EXECUTOR_ID, INTRUDER_ID]);
const MASTER_KEYS = `keys1:${Buffer.alloc(32, 7).toString("base64")}`;

let t: TestMesh;
let tenant: Awaited<ReturnType<TestMesh["newTenant"]>>;

beforeAll(async () => {
  await new Docker().ping();
  t = await startTestMesh({
    signingKeys: KEYS,
    env: { OUTPOST_EXECUTOR_ID: EXECUTOR_ID },
    serviceEnv: { tenant: { OUTPOST_SECRETS_MASTER_KEYS: MASTER_KEYS } },
  });
  tenant = await t.newTenant("Keyed");
});

afterAll(async () => {
  await t?.mesh.stop();
});

/** The intruder's own key, signing `identity` (its own, or the executor's it is after). */
function asIntruder(identity: Identity, signingKeys = signingKeysOf(KEYS, "executor", INTRUDER_ID)) {
  return {
    leases: internalClient(LeaseService, { baseUrl: t.mesh.urls.dispatcher, signingKeys, identity }),
    secrets: internalClient(TenantInternalService, { baseUrl: t.mesh.urls.tenant, signingKeys, identity }),
    logs: internalClient(LogIngestService, { baseUrl: t.mesh.urls.telemetry, signingKeys, identity }),
  };
}
const self: Identity = { kind: "service", principal: `executor/${INTRUDER_ID}` };
const victim: Identity = { kind: "service", principal: `executor/${EXECUTOR_ID}` };

describe("a key per executor", () => {
  it("the executor runs a dispatch with a secret on its own key: lease, secret grant and logs all accept it", async () => {
    await tenant.clients.secrets.putSecret({ name: "KEYED_SECRET", value: "keyed-value-4242" });
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "print=KEYED_SECRET", secretNames: ["KEYED_SECRET"] });
    const lines: string[] = [];
    const end = await followLogs(tenant.clients.logs, dispatch!.id, (chunk) => lines.push(chunk.text));
    expect(end.state).toBe(Dispatch_State.SUCCEEDED);
    expect(lines.join("\n")).toContain("[REDACTED:KEYED_SECRET]");
    const { dispatch: done } = await tenant.clients.dispatches.getDispatch({ dispatchId: dispatch!.id });
    expect(done!.executorId).toBe(EXECUTOR_ID);
  });

  it("another executor's key cannot take or list its leases, nor use its secret or log grants", async () => {
    const intruder = asIntruder(self);
    // As itself, the intruder is a working executor.
    expect(await refusal(intruder.leases.listExecutorLeases({ executorId: INTRUDER_ID }))).toBe("accepted");
    // Naming the victim while signed as itself: the dispatcher's id check.
    expect(await refusal(intruder.leases.listExecutorLeases({ executorId: EXECUTOR_ID }))).toBe("PermissionDenied EXECUTOR_ID_MISMATCH");
    // Signing as the victim with its own key: the signature does not verify.
    const posing = asIntruder(victim);
    expect(await refusal(posing.leases.listExecutorLeases({ executorId: EXECUTOR_ID }))).toBe("Unauthenticated IDENTITY_FORGED");
    expect(await refusal(posing.leases.acquireLease({ executorId: EXECUTOR_ID }))).toBe("Unauthenticated IDENTITY_FORGED");
    // The executor role's key is not trusted by this mesh, whatever it signs.
    const roleKey = asIntruder(victim, signingKeysOf(KEYS, "executor"));
    expect(await refusal(roleKey.leases.listExecutorLeases({ executorId: EXECUTOR_ID }))).toBe("Unauthenticated IDENTITY_FORGED");

    // A secret grant the dispatcher gave the victim: useless to the intruder either way.
    const grant = issueSecretGrant(signingKeysOf(KEYS, "dispatcher"), { dispatchId: "01JKEYEDGRANT0000000000000", tenantId: tenant.tenantId, names: ["KEYED_SECRET"], executor: victim.principal });
    const request = { tenantId: tenant.tenantId, names: ["KEYED_SECRET"], grant };
    expect(await refusal(intruder.secrets.resolveSecrets(request))).toBe("PermissionDenied SECRET_GRANT_INVALID");
    expect(await refusal(posing.secrets.resolveSecrets(request))).toBe("Unauthenticated IDENTITY_FORGED");
    // The victim's own key is what the grant was for: the same request succeeds.
    const owner = internalClient(TenantInternalService, { baseUrl: t.mesh.urls.tenant, signingKeys: signingKeysOf(KEYS, "executor", EXECUTOR_ID), identity: victim });
    expect((await owner.resolveSecrets(request)).values).toEqual({ KEYED_SECRET: "keyed-value-4242" });

    // The victim's log grant for a run of the tenant: the intruder cannot write that run's output
    // (seq 1: had it been stored, it would stand in place of the run's first line).
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "sleep=1" });
    const logGrant = issueLogGrant(signingKeysOf(KEYS, "dispatcher"), { dispatchId: dispatch!.id, tenantId: tenant.tenantId, executor: victim.principal }, 60_000);
    const fake = { dispatchId: dispatch!.id, tenantId: tenant.tenantId, grant: logGrant, chunks: [{ seq: 1n, stream: LogStream.STDOUT, text: "injected" }] };
    async function* oneBatch() {
      yield fake;
    }
    const write = async (client: typeof intruder.logs) => {
      for await (const _ of client.ingestLogs(oneBatch())) void _;
    };
    expect(await refusal(write(intruder.logs))).toBe("PermissionDenied LOG_GRANT_INVALID");
    expect(await refusal(write(posing.logs))).toBe("Unauthenticated IDENTITY_FORGED");
    const lines: string[] = [];
    await followLogs(tenant.clients.logs, dispatch!.id, (chunk) => lines.push(chunk.text));
    expect(lines.length).toBeGreaterThan(0);
    expect(lines).not.toContain("injected");
  });
});
