/**
 * Test harness over the real mesh: five processes on free loopback ports, a fresh data
 * directory, the real Docker engine. Tests that need Docker fail loudly when it is missing
 * (CI installs it); set OUTPOST_TEST_SKIP_DOCKER=1 only to run the rest on a machine without it.
 */
import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import Docker from "dockerode";
import { outpostClients, type OutpostClients } from "@outpost/cli";
import { startMesh, type Mesh, type MeshOptions } from "../../scripts/lib/mesh.ts";
import { unwatchLogDir, watchLogDir } from "../support/mesh-logs-on-failure.ts";
import { TEST_SIGNING_KEY_SET } from "../support/signing.ts";

export const DEMO_IMAGE = "outpost/demo-agent:latest";

export interface TestMesh {
  mesh: Mesh;
  dir: string;
  adminToken: string;
  admin: OutpostClients;
  /** Creates a tenant through the gateway and returns its clients and key. */
  newTenant(name?: string): Promise<{ tenantId: string; apiKey: string; clients: OutpostClients }>;
}

export async function startTestMesh(overrides: Partial<MeshOptions> = {}): Promise<TestMesh> {
  const dir = mkdtempSync(path.join(os.tmpdir(), "outpost-mesh-"));
  const adminToken = randomBytes(32).toString("hex");
  const logDir = path.join(dir, "logs");
  watchLogDir(logDir);
  const mesh = await startMesh({
    dataDir: path.join(dir, "data"),
    logDir,
    // The test module's set, so tests can sign as any role (keysOf in test/support/signing.ts).
    signingKeys: TEST_SIGNING_KEY_SET,
    adminToken,
    ...overrides,
    env: {
      OUTPOST_LOG_LEVEL: "debug",
      OUTPOST_LEASE_TTL_MS: "5000",
      OUTPOST_EXECUTOR_ID: `test-${process.pid}`,
      // Tests all call from loopback; the rate-limit tests clear this to be limited.
      OUTPOST_RATE_LIMIT_ALLOW: "127.0.0.1,::1",
      ...overrides.env,
    },
  });
  // A gateway serving TLS from the mesh's CA: the clients trust that CA.
  const clientOptions = overrides.tls?.publicGateway ? { ca: readFileSync(overrides.tls.certs.ca) } : {};
  const admin = outpostClients(mesh.urls.gateway, adminToken, clientOptions);
  const executorId = overrides.env?.OUTPOST_EXECUTOR_ID ?? `test-${process.pid}`;
  const stop = mesh.stop.bind(mesh);
  // A stopped executor leaves runs it could not finish within its grace period for its next
  // start to settle; a test mesh never starts again, so its containers are removed here.
  mesh.stop = async () => {
    await stop();
    unwatchLogDir(logDir);
    const docker = new Docker();
    const leftovers = await docker.listContainers({ all: true, filters: { label: [`dev.outpost.executor-id=${executorId}`] } }).catch(() => []);
    await Promise.all(leftovers.map((c) => docker.getContainer(c.Id).remove({ force: true }).catch(() => undefined)));
  };
  return {
    mesh,
    dir,
    adminToken,
    admin,
    async newTenant(name = "Test tenant") {
      const res = await admin.tenants.createTenant({ name, contactEmail: "ops@example.com" });
      return { tenantId: res.tenant!.id, apiKey: res.apiKeyPlaintext, clients: outpostClients(mesh.urls.gateway, res.apiKeyPlaintext, clientOptions) };
    },
  };
}
