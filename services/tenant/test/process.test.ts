/**
 * Crosses the real boundary: the tenant service as its own process on a real port, called over
 * gRPC (h2c) with signed identities, forged ones and none at all.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { generateSigningKeySet, internalClient, signingKeysOf } from "@outpost/platform";
import { TenantInternalService } from "@outpost/proto/outpost/tenant/v1/tenant_internal_service_pb.js";
import { Tenant_State, Tier } from "@outpost/proto/outpost/tenant/v1/tenant_pb.js";
import { TenantService } from "@outpost/proto/outpost/tenant/v1/tenant_service_pb.js";
import { ADMIN, GATEWAY, expectError } from "./helpers.ts";
import { freePort } from "../../../scripts/lib/ports.ts";
import { signerFor, signingEnv } from "../../../test/support/signing.ts";

const MAIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../src/main.ts");

function startProcess(env: Record<string, string>): { child: ChildProcess; output: () => string; exited: Promise<number | null> } {
  const { OUTPOST_SIGNING_KEY: _drop, OUTPOST_TRUSTED_SIGNERS: _drop2, ...inherited } = process.env;
  const child = spawn(process.execPath, ["--disable-warning=ExperimentalWarning", MAIN], {
    env: { ...inherited, ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  child.stdout!.on("data", (b: Buffer) => (out += b.toString()));
  child.stderr!.on("data", (b: Buffer) => (out += b.toString()));
  const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
  return { child, output: () => out, exited };
}

async function waitHealthy(baseUrl: string, exited: Promise<unknown>, output: () => string): Promise<void> {
  let done = false;
  void exited.then(() => (done = true));
  const deadline = Date.now() + 20_000;
  while (Date.now() < deadline) {
    if (done) throw new Error(`tenant process exited early:\n${output()}`);
    try {
      const res = await fetch(`${baseUrl}/healthz`);
      if (res.ok) return;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`tenant process not healthy in time:\n${output()}`);
}

describe("tenant process", () => {
  let dataDir: string;
  let baseUrl: string;
  let proc: ReturnType<typeof startProcess>;

  beforeAll(async () => {
    dataDir = mkdtempSync(path.join(tmpdir(), "outpost-tenant-proc-"));
    const port = await freePort();
    baseUrl = `http://127.0.0.1:${port}`;
    proc = startProcess({
      ...signingEnv("tenant"),
      OUTPOST_TENANT_HOST: "127.0.0.1",
      OUTPOST_TENANT_PORT: String(port),
      OUTPOST_DATA_DIR: dataDir,
      OUTPOST_LOG_LEVEL: "debug",
    });
    await waitHealthy(baseUrl, proc.exited, proc.output);
  });

  afterAll(async () => {
    if (proc && proc.child.exitCode === null) {
      proc.child.kill("SIGTERM");
      await proc.exited;
    }
    if (dataDir) rmSync(dataDir, { recursive: true, force: true });
  });

  it("creates a tenant as admin and authenticates its key as the gateway, over gRPC", async () => {
    const admin = internalClient(TenantService, { baseUrl, signingKeys: signerFor(ADMIN), identity: ADMIN });
    const created = await admin.createTenant({ name: "Boundary Inc", contactEmail: "ops@boundary.test", tier: Tier.PRO });
    expect(created.apiKeyPlaintext).toMatch(/^otp_[0-9a-f]{64}$/);
    expect(created.tenant?.state).toBe(Tenant_State.ACTIVE);

    const gateway = internalClient(TenantInternalService, { baseUrl, signingKeys: signerFor(GATEWAY), identity: GATEWAY });
    const auth = await gateway.authenticateApiKey({ apiKey: created.apiKeyPlaintext });
    expect(auth.tenant?.id).toBe(created.tenant?.id);
    expect(auth.apiKeyId).toBe(created.apiKey?.id);

    await expectError(
      gateway.authenticateApiKey({ apiKey: "otp_" + "0".repeat(64) }),
      Code.Unauthenticated,
      "API_KEY_UNKNOWN",
    );
    const fetched = await admin.getTenant({ tenantId: created.tenant!.id });
    expect(fetched.tenant?.name).toBe("Boundary Inc");

    // The plaintext key never reaches the logs, even at debug level.
    expect(proc.output()).not.toContain(created.apiKeyPlaintext.slice(4));
  });

  it("refuses a forged signature with UNAUTHENTICATED", async () => {
    const forged = internalClient(TenantService, {
      baseUrl,
      signingKeys: signingKeysOf(generateSigningKeySet(), "gateway"),
      identity: ADMIN,
    });
    await expectError(forged.createTenant({ name: "Evil", contactEmail: "evil@x.test" }), Code.Unauthenticated, "IDENTITY_FORGED");
  });

  it("refuses a call with no identity headers with UNAUTHENTICATED", async () => {
    const bare = createClient(TenantInternalService, createGrpcTransport({ baseUrl }));
    await expectError(bare.authenticateApiKey({ apiKey: "otp_" + "0".repeat(64) }), Code.Unauthenticated, "IDENTITY_MISSING");
  });
});

describe("tenant process configuration", () => {
  it("exits non-zero naming OUTPOST_SIGNING_KEY when it is missing", async () => {
    const port = await freePort();
    const dataDir = mkdtempSync(path.join(tmpdir(), "outpost-tenant-cfg-"));
    try {
      const proc = startProcess({ OUTPOST_TENANT_PORT: String(port), OUTPOST_DATA_DIR: dataDir });
      const code = await proc.exited;
      expect(code).not.toBe(0);
      expect(code).not.toBeNull();
      expect(proc.output()).toMatch(/OUTPOST_SIGNING_KEY: is required/);
    } finally {
      rmSync(dataDir, { recursive: true, force: true });
    }
  });

  it("exits non-zero naming the signing settings when they are not Ed25519 keys", async () => {
    const keys = signingEnv("tenant");
    const notAKey = startProcess({ ...keys, OUTPOST_SIGNING_KEY: "c2hvcnQ=", OUTPOST_DATA_DIR: ":memory:" });
    expect(await notAKey.exited).toBe(78);
    expect(notAKey.output()).toMatch(/OUTPOST_SIGNING_KEY: must be an Ed25519 private key/);
    // A public key where the private one belongs, and a trust list naming an unknown role.
    const publicKey = keys.OUTPOST_TRUSTED_SIGNERS.split(",")[0]!.split(":")[1]!;
    const swapped = startProcess({ ...keys, OUTPOST_SIGNING_KEY: publicKey, OUTPOST_DATA_DIR: ":memory:" });
    expect(await swapped.exited).toBe(78);
    expect(swapped.output()).toMatch(/OUTPOST_SIGNING_KEY: must be an Ed25519 private key/);
    const unknownRole = startProcess({ ...keys, OUTPOST_TRUSTED_SIGNERS: `robot:${publicKey}`, OUTPOST_DATA_DIR: ":memory:" });
    expect(await unknownRole.exited).toBe(78);
    expect(unknownRole.output()).toMatch(/OUTPOST_TRUSTED_SIGNERS: entry 1 must be <role>:<public key> with role one of gateway/);
  });
});
