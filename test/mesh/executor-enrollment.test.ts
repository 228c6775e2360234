/**
 * Enrolled executor keys (identity.ts, docs/operations.md "Enrolled executor keys"), over the real
 * mesh: the services trust the executors' shared key only as the enrollment key; the executor
 * (OUTPOST_EXECUTOR_ENROLL=on) enrolls a key of its own at the dispatcher and runs a dispatch
 * that names a secret end to end with it (lease, secret grant, logs). The enrollment key alone
 * speaks for no executor anywhere but EnrollmentService, cannot take the running executor's id,
 * and an executor it enrolls under another id cannot speak as the first.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import Docker from "dockerode";
import { followLogs } from "@outpost/cli";
import {
  errorInfoOf,
  generateSigningKeySet,
  internalClient,
  issueExecutorCertificate,
  newExecutorKeyPair,
  SIGNER_ROLES,
  signEnrollmentProof,
  SigningKeys,
  signingKeysOf,
  type Identity,
} from "@outpost/platform";
import { AuditService } from "@outpost/proto/outpost/dispatch/v1/audit_service_pb.js";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { EnrollmentService } from "@outpost/proto/outpost/executor/v1/enrollment_service_pb.js";
import { LeaseService } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { LogIngestService } from "@outpost/proto/outpost/telemetry/v1/log_ingest_service_pb.js";
import { LogStream } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";
import { TenantInternalService } from "@outpost/proto/outpost/tenant/v1/tenant_internal_service_pb.js";
import { refusal } from "../support/rpc.ts";
import { startTestMesh, type TestMesh } from "./harness.ts";

const EXECUTOR_ID = `enrolled-${process.pid}`;
const NEWCOMER_ID = `newcomer-${process.pid}`;
/** The executor role's key is trusted only as the enrollment key. */
const KEYS = generateSigningKeySet(SIGNER_ROLES, [], { executorEnrollment: true });
const MASTER_KEYS = `keys1:${Buffer.alloc(32, 9).toString("base64")}`;

let t: TestMesh;
let tenant: Awaited<ReturnType<TestMesh["newTenant"]>>;

beforeAll(async () => {
  await new Docker().ping();
  expect(KEYS.trustedSigners).toMatch(/(^|,)executor-enroll:/);
  expect(KEYS.trustedSigners).not.toMatch(/(^|,)executor:/);
  t = await startTestMesh({
    signingKeys: KEYS,
    env: { OUTPOST_EXECUTOR_ID: EXECUTOR_ID },
    serviceEnv: { tenant: { OUTPOST_SECRETS_MASTER_KEYS: MASTER_KEYS }, executor: { OUTPOST_EXECUTOR_ENROLL: "on" } },
  });
  tenant = await t.newTenant("Enrolled");
});

afterAll(async () => {
  await t?.mesh.stop();
});

const asExecutor = (id: string): Identity => ({ kind: "service", principal: `executor/${id}` });

/** Clients of every service an executor calls, signing `identity` with `signingKeys`. */
function clientsOf(identity: Identity, signingKeys: SigningKeys) {
  return {
    enrollment: internalClient(EnrollmentService, { baseUrl: t.mesh.urls.dispatcher, signingKeys, identity }),
    leases: internalClient(LeaseService, { baseUrl: t.mesh.urls.dispatcher, signingKeys, identity }),
    secrets: internalClient(TenantInternalService, { baseUrl: t.mesh.urls.tenant, signingKeys, identity }),
    logs: internalClient(LogIngestService, { baseUrl: t.mesh.urls.telemetry, signingKeys, identity }),
  };
}

/** The enrollment key, as every executor of the Deployment holds it, signing as executor `id`. */
const enrollmentKeyAs = (id: string) => clientsOf(asExecutor(id), signingKeysOf(KEYS, "executor", id));

/** Every executor call but enrollment, as `clients` make it: what each service answered. */
async function executorCalls(clients: ReturnType<typeof clientsOf>, id: string) {
  return {
    leases: await refusal(clients.leases.listExecutorLeases({ executorId: id })),
    secrets: await refusal(clients.secrets.resolveSecrets({ tenantId: "t", names: ["X"], grant: "" })),
    logs: await refusal(
      (async () => {
        async function* oneBatch() {
          yield { dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV", tenantId: "t", grant: "", chunks: [{ seq: 1n, stream: LogStream.STDOUT, text: "x" }] };
        }
        for await (const _ of clients.logs.ingestLogs(oneBatch())) void _;
      })(),
    ),
  };
}

describe("enrolled executor keys", () => {
  it("the executor enrolls and runs a dispatch with a secret on its certified key: lease, secret grant and logs all accept it", async () => {
    await tenant.clients.secrets.putSecret({ name: "ENROLLED_SECRET", value: "enrolled-value-7171" });
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "print=ENROLLED_SECRET", secretNames: ["ENROLLED_SECRET"] });
    const lines: string[] = [];
    const end = await followLogs(tenant.clients.logs, dispatch!.id, (chunk) => lines.push(chunk.text));
    expect(end.state).toBe(Dispatch_State.SUCCEEDED);
    expect(lines.join("\n")).toContain("[REDACTED:ENROLLED_SECRET]");
    const { dispatch: done } = await tenant.clients.dispatches.getDispatch({ dispatchId: dispatch!.id });
    expect(done!.executorId).toBe(EXECUTOR_ID);
  });

  it("the enrollment key speaks for no executor outside EnrollmentService, not even a new one", async () => {
    for (const id of [EXECUTOR_ID, NEWCOMER_ID]) {
      expect(await executorCalls(enrollmentKeyAs(id), id), id).toEqual({
        leases: "Unauthenticated IDENTITY_FORGED",
        secrets: "Unauthenticated IDENTITY_FORGED",
        logs: "Unauthenticated IDENTITY_FORGED",
      });
    }
  });

  it("the enrollment key cannot take the running executor's id", async () => {
    const { privateKey, publicKey } = newExecutorKeyPair();
    const proof = signEnrollmentProof(privateKey, EXECUTOR_ID, publicKey);
    expect(await refusal(enrollmentKeyAs(EXECUTOR_ID).enrollment.enrollExecutor({ executorId: EXECUTOR_ID, publicKey, proof }))).toBe("FailedPrecondition EXECUTOR_KEY_BOUND");
    // Nor enroll for another id than the one it signs as.
    expect(await refusal(enrollmentKeyAs(NEWCOMER_ID).enrollment.enrollExecutor({ executorId: EXECUTOR_ID, publicKey, proof }))).toBe("PermissionDenied EXECUTOR_ID_MISMATCH");
    // The executor's own enrollment and both refusals are in the audit trail the admin reads.
    const { events } = await createClient(AuditService, createConnectTransport({ baseUrl: t.mesh.urls.gateway, httpVersion: "1.1" })).listAuditEvents(
      {},
      { headers: { authorization: `Bearer ${t.adminToken}` } },
    );
    const enrollments = events.filter((e) => e.method.endsWith("/EnrollExecutor")).map((e) => `${e.principal} ${e.target} ${e.outcome}`);
    expect(enrollments).toEqual(
      expect.arrayContaining([
        `executor/${EXECUTOR_ID} executor/${EXECUTOR_ID} OK`,
        `executor/${EXECUTOR_ID} executor/${EXECUTOR_ID} FAILED_PRECONDITION`,
        `executor/${NEWCOMER_ID} executor/${EXECUTOR_ID} PERMISSION_DENIED`,
      ]),
    );
    // Refused naming the field: a key that is not an Ed25519 SPKI key; a proof made with another
    // key, or for another id (a public key alone binds nothing).
    const other = newExecutorKeyPair();
    for (const [request, field] of [
      [{ executorId: NEWCOMER_ID, publicKey: new Uint8Array([1, 2, 3]), proof }, "public_key"],
      [{ executorId: NEWCOMER_ID, publicKey, proof: signEnrollmentProof(other.privateKey, NEWCOMER_ID, publicKey) }, "proof"],
      [{ executorId: NEWCOMER_ID, publicKey, proof }, "proof"],
      [{ executorId: NEWCOMER_ID, publicKey }, "proof"],
    ] as const) {
      const bad = await enrollmentKeyAs(NEWCOMER_ID).enrollment.enrollExecutor(request).catch((e: unknown) => ConnectError.from(e));
      expect(bad, field).toBeInstanceOf(ConnectError);
      expect((bad as ConnectError).code, field).toBe(Code.InvalidArgument);
      expect(errorInfoOf(bad as ConnectError)?.metadata.field, field).toBe(field);
    }
  });

  it("an executor enrolled under another id works as itself, and cannot speak as the first with its certificate", async () => {
    const { privateKey, publicKey } = newExecutorKeyPair();
    const proof = signEnrollmentProof(privateKey, NEWCOMER_ID, publicKey);
    const { certificate } = await enrollmentKeyAs(NEWCOMER_ID).enrollment.enrollExecutor({ executorId: NEWCOMER_ID, publicKey, proof });
    const newcomerKeys = signingKeysOf(KEYS, "executor", NEWCOMER_ID);
    newcomerKeys.useCertificate(privateKey, certificate);
    expect((await executorCalls(clientsOf(asExecutor(NEWCOMER_ID), newcomerKeys), NEWCOMER_ID)).leases).toBe("accepted");
    // Its certificate names it, not the running executor.
    const asVictim = new SigningKeys("executor", privateKey, new Map(), EXECUTOR_ID);
    asVictim.useCertificate(privateKey, certificate);
    expect(await executorCalls(clientsOf(asExecutor(EXECUTOR_ID), asVictim), EXECUTOR_ID)).toEqual({
      leases: "Unauthenticated IDENTITY_FORGED",
      secrets: "Unauthenticated IDENTITY_FORGED",
      logs: "Unauthenticated IDENTITY_FORGED",
    });
    // A certificate of the victim's id signed by anyone but the dispatcher (here the enrollment key) is no use.
    const forged = issueExecutorCertificate(signingKeysOf(KEYS, "executor", EXECUTOR_ID), `executor/${EXECUTOR_ID}`, publicKey, 60_000);
    asVictim.useCertificate(privateKey, forged);
    expect(await executorCalls(clientsOf(asExecutor(EXECUTOR_ID), asVictim), EXECUTOR_ID)).toEqual({
      leases: "Unauthenticated IDENTITY_FORGED",
      secrets: "Unauthenticated IDENTITY_FORGED",
      logs: "Unauthenticated IDENTITY_FORGED",
    });
  });
});
