/**
 * Tenancy across the real boundary: the tenant service as its own process (tiers file, master
 * keys, real Redis), called over gRPC by the admin, the dispatcher, the executor and the
 * gateway identities; the re-encrypt command run as its own process against the same data.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code } from "@connectrpc/connect";
import { Redis } from "ioredis";
import { ulid } from "ulid";
import { errorInfoOf, internalClient, type Identity } from "@outpost/platform";
import { TenantInternalService } from "@outpost/proto/outpost/tenant/v1/tenant_internal_service_pb.js";
import { Tier } from "@outpost/proto/outpost/tenant/v1/tenant_pb.js";
import { ApiKeyService, SecretService, TenantService } from "@outpost/proto/outpost/tenant/v1/tenant_service_pb.js";
import { hashApiKey } from "../src/core/api-keys.ts";
import { AUTH_INVALIDATE_CHANNEL } from "../src/core/invalidation.ts";
import { ADMIN, GATEWAY, expectError } from "./helpers.ts";
import { freePort } from "../../../scripts/lib/ports.ts";
import { grantOf, signerFor, signingEnv } from "../../../test/support/signing.ts";

const SRC = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../src");
const REDIS_URL = process.env.OUTPOST_TEST_REDIS_URL ?? "redis://127.0.0.1:6379";
const K1 = `k1:${Buffer.alloc(32, 1).toString("base64")}`;
const K2 = `k2:${Buffer.alloc(32, 2).toString("base64")}`;

interface Proc {
  child: ChildProcess;
  output: () => string;
  exited: Promise<number | null>;
}

function startProcess(entry: string, env: Record<string, string>): Proc {
  const { OUTPOST_SIGNING_KEY: _a, OUTPOST_SECRETS_MASTER_KEYS: _b, OUTPOST_TIERS_FILE: _c, OUTPOST_REDIS_URL: _d, ...inherited } = process.env;
  const child = spawn(process.execPath, ["--disable-warning=ExperimentalWarning", path.join(SRC, entry)], {
    env: { ...inherited, ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  child.stdout!.on("data", (b: Buffer) => (out += b.toString()));
  child.stderr!.on("data", (b: Buffer) => (out += b.toString()));
  const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
  return { child, output: () => out, exited };
}

async function waitHealthy(baseUrl: string, proc: Proc): Promise<void> {
  const deadline = Date.now() + 20_000;
  while (Date.now() < deadline) {
    if (proc.child.exitCode !== null) throw new Error(`tenant process exited early:\n${proc.output()}`);
    try {
      if ((await fetch(`${baseUrl}/healthz`)).ok) return;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`tenant process not healthy in time:\n${proc.output()}`);
}

async function stop(proc: Proc | undefined) {
  if (proc && proc.child.exitCode === null) {
    proc.child.kill("SIGTERM");
    await proc.exited;
  }
}

describe("tenant process with tiers, master keys and Redis", () => {
  const dir = mkdtempSync(path.join(tmpdir(), "outpost-tenancy-proc-"));
  const dataDir = path.join(dir, "data");
  const tiersFile = path.join(dir, "tiers.yaml");
  let proc: Proc | undefined;
  let baseUrl: string;
  const as = <T extends Parameters<typeof internalClient>[0]>(service: T, identity: Identity) =>
    internalClient(service, { baseUrl, signingKeys: signerFor(identity), identity });

  async function start(masterKeys: string) {
    const port = await freePort();
    baseUrl = `http://127.0.0.1:${port}`;
    proc = startProcess("main.ts", {
      ...signingEnv("tenant"),
      OUTPOST_TENANT_PORT: String(port),
      OUTPOST_DATA_DIR: dataDir,
      OUTPOST_LOG_LEVEL: "debug",
      OUTPOST_TIERS_FILE: tiersFile,
      OUTPOST_SECRETS_MASTER_KEYS: masterKeys,
      OUTPOST_REDIS_URL: REDIS_URL,
    });
    await waitHealthy(baseUrl, proc);
  }

  beforeAll(async () => {
    writeFileSync(tiersFile, "free:\n  concurrent_runs: 3\n  runs_per_day: 5\n  max_timeout_seconds: 60\n");
    await start(K1);
  });

  afterAll(async () => {
    await stop(proc);
    rmSync(dir, { recursive: true, force: true });
  });

  it("admits exactly the tier's concurrent limit out of 3x parallel gRPC calls, from the tiers file", async () => {
    const { tenant } = await as(TenantService, ADMIN).createTenant({ name: "Q", contactEmail: "q@q.test", tier: Tier.FREE });
    const dispatcher = as(TenantInternalService, { kind: "service", principal: "dispatcher" });
    const results = await Promise.allSettled(Array.from({ length: 9 }, () => dispatcher.admitDispatch({ tenantId: tenant!.id, dispatchId: ulid() })));
    const admitted = results.filter((r) => r.status === "fulfilled");
    expect(admitted).toHaveLength(3);
    expect(admitted[0]!.value.maxTimeout?.seconds).toBe(60n);
    for (const r of results) {
      if (r.status === "rejected") {
        const err = await expectError(Promise.reject(r.reason), Code.ResourceExhausted, "QUOTA_EXCEEDED");
        expect(errorInfoOf(err)?.metadata.quota).toBe("concurrent_runs");
      }
    }
  });

  it("publishes a revoked key's hash and a suspended tenant on outpost:auth:invalidate", async () => {
    const sub = new Redis(REDIS_URL);
    try {
      const messages: string[] = [];
      sub.on("message", (channel: string, message: string) => {
        if (channel === AUTH_INVALIDATE_CHANNEL) messages.push(message);
      });
      await sub.subscribe(AUTH_INVALIDATE_CHANNEL);
      const created = await as(TenantService, ADMIN).createTenant({ name: "R", contactEmail: "r@r.test" });
      const gateway = as(TenantInternalService, GATEWAY);
      await gateway.authenticateApiKey({ apiKey: created.apiKeyPlaintext });
      await as(ApiKeyService, ADMIN).revokeApiKey({ apiKeyId: created.apiKey!.id });
      await expectError(gateway.authenticateApiKey({ apiKey: created.apiKeyPlaintext }), Code.Unauthenticated, "API_KEY_REVOKED");
      await as(TenantService, ADMIN).suspendTenant({ tenantId: created.tenant!.id, reason: "abuse report" });
      const deadline = Date.now() + 5000;
      while (messages.length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      expect(messages).toEqual([hashApiKey(created.apiKeyPlaintext), `tenant:${created.tenant!.id}`]);
      // The plaintext key never reaches the logs.
      expect(proc!.output()).not.toContain(created.apiKeyPlaintext.slice(4));
    } finally {
      sub.disconnect();
    }
  });

  it("keeps secrets encrypted on disk; after rotation old values read, and the re-encrypt command moves them", async () => {
    const created = await as(TenantService, ADMIN).createTenant({ name: "S", contactEmail: "s@s.test" });
    const tenantId = created.tenant!.id;
    const tenantSecrets = as(SecretService, { kind: "tenant", tenantId, principal: `key/${created.apiKey!.id}` });
    const value = `sk-live-${ulid()}`;
    await tenantSecrets.putSecret({ name: "OPENAI_API_KEY", value });
    await tenantSecrets.putSecret({ name: "SECOND", value: "second-value" });
    const executor = as(TenantInternalService, { kind: "service", principal: "executor/e1" });
    expect((await executor.resolveSecrets({ tenantId, names: ["OPENAI_API_KEY"], grant: grantOf(tenantId, ["OPENAI_API_KEY"], "executor/e1") })).values).toEqual({ OPENAI_API_KEY: value });
    expect(proc!.output()).not.toContain(value);
    const onDisk = readdirSync(dataDir).map((f) => readFileSync(path.join(dataDir, f)).toString("latin1")).join("\n");
    expect(onDisk).toContain("OPENAI_API_KEY"); // the name is stored in the clear; the value is not
    expect(onDisk).not.toContain(value);
    expect(onDisk).not.toContain("second-value");

    // Rotate: k2 first, k1 still listed. Restart the service on the same data.
    await stop(proc);
    await start(`${K2},${K1}`);
    const executor2 = as(TenantInternalService, { kind: "service", principal: "executor/e1" });
    expect((await executor2.resolveSecrets({ tenantId, names: ["OPENAI_API_KEY"], grant: grantOf(tenantId, ["OPENAI_API_KEY"], "executor/e1") })).values).toEqual({ OPENAI_API_KEY: value });

    // Pointed at the wrong directory it refuses, rather than report an empty store as done.
    const wrongDir = path.join(dir, "not-the-data-dir");
    const refused = spawnSync(process.execPath, ["--disable-warning=ExperimentalWarning", path.join(SRC, "reencrypt-secrets.ts")], {
      env: { ...process.env, OUTPOST_DATA_DIR: wrongDir, OUTPOST_SECRETS_MASTER_KEYS: `${K2},${K1}` },
      encoding: "utf8",
    });
    expect(refused.status).toBe(78);
    expect(refused.stderr).toContain("OUTPOST_DATA_DIR: no tenant.db");
    expect(existsSync(wrongDir)).toBe(false);
    // With OUTPOST_MONGO_URL it works on MongoDB, as the service does (here: none answers).
    const onMongo = spawnSync(process.execPath, ["--disable-warning=ExperimentalWarning", path.join(SRC, "reencrypt-secrets.ts")], {
      env: { ...process.env, OUTPOST_DATA_DIR: wrongDir, OUTPOST_MONGO_URL: `mongodb://127.0.0.1:${await freePort()}/outpost`, OUTPOST_SECRETS_MASTER_KEYS: `${K2},${K1}` },
      encoding: "utf8",
    });
    expect(onMongo.status).not.toBe(0);
    expect(onMongo.stdout).not.toContain("re-encrypted");
    expect(onMongo.stderr).toMatch(/MongoServerSelectionError|ECONNREFUSED/);

    const reencrypt = spawnSync(process.execPath, ["--disable-warning=ExperimentalWarning", path.join(SRC, "reencrypt-secrets.ts")], {
      env: { ...process.env, OUTPOST_DATA_DIR: dataDir, OUTPOST_SECRETS_MASTER_KEYS: `${K2},${K1}` },
      encoding: "utf8",
    });
    expect(reencrypt.status).toBe(0);
    // One moved lazily when read above, the other by the command.
    expect(reencrypt.stdout).toContain('re-encrypted 1 secret(s) under master key "k2"; 0 could not be read');
    expect(reencrypt.stdout + reencrypt.stderr).not.toContain("second-value");
    // The log names the secret it moved (the logger redacts values, not names).
    expect(reencrypt.stdout + reencrypt.stderr).toMatch(/"secret_name":"SECOND".*re-encrypted under the current master key/);

    // k1 dropped: everything still reads.
    await stop(proc);
    await start(K2);
    const executor3 = as(TenantInternalService, { kind: "service", principal: "executor/e1" });
    expect((await executor3.resolveSecrets({ tenantId, names: ["OPENAI_API_KEY", "SECOND"], grant: grantOf(tenantId, ["OPENAI_API_KEY", "SECOND"], "executor/e1") })).values).toEqual({
      OPENAI_API_KEY: value,
      SECOND: "second-value",
    });
    expect(proc!.output()).not.toContain(value);
  });
});

describe("tenant process settings", () => {
  it("exits 78 naming OUTPOST_TIERS_FILE when the file is invalid", async () => {
    const dir = mkdtempSync(path.join(tmpdir(), "outpost-tenancy-cfg-"));
    try {
      const file = path.join(dir, "tiers.yaml");
      writeFileSync(file, "pro:\n  concurrent_runs: -3\n");
      const proc = startProcess("main.ts", { ...signingEnv("tenant"), OUTPOST_DATA_DIR: ":memory:", OUTPOST_TENANT_PORT: "0", OUTPOST_TIERS_FILE: file });
      expect(await proc.exited).toBe(78);
      expect(proc.output()).toMatch(/OUTPOST_TIERS_FILE .*pro\.concurrent_runs/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("exits 78 naming OUTPOST_SECRETS_MASTER_KEYS when a key is malformed", async () => {
    const proc = startProcess("main.ts", {
      ...signingEnv("tenant"),
      OUTPOST_DATA_DIR: ":memory:",
      OUTPOST_TENANT_PORT: "0",
      OUTPOST_SECRETS_MASTER_KEYS: "k1:dG9vLXNob3J0",
    });
    expect(await proc.exited).toBe(78);
    expect(proc.output()).toContain("OUTPOST_SECRETS_MASTER_KEYS");
    expect(proc.output()).not.toContain("dG9vLXNob3J0");
  });
});
