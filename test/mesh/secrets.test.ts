/**
 * Secrets and tenant administration across the real mesh (SPEC T2, T5, T6, C2): a secret put
 * through the gateway is resolved by the executor, injected into the arm64 container, and the
 * log stream carries the redaction marker instead of the value; the `outpost` admin, key and
 * secret commands work against the gateway; admin methods refuse tenant keys.
 */
import { spawnSync } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import path from "node:path";
import { Readable } from "node:stream";
import { Capture } from "../../packages/cli/test/capture.ts";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, ConnectError } from "@connectrpc/connect";
import Docker from "dockerode";
import { followLogs, runCli } from "@outpost/cli";
import { errorInfoOf } from "@outpost/platform";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { startTestMesh, type TestMesh } from "./harness.ts";
import { REPO_ROOT } from "../../scripts/lib/mesh.ts";

const MASTER_KEYS = `mesh1:${Buffer.alloc(32, 11).toString("base64")}`;

let t: TestMesh;
let tenant: Awaited<ReturnType<TestMesh["newTenant"]>>;

beforeAll(async () => {
  await new Docker().ping();
  // The demo agent's `print=VAR` directive is recent: make sure the image has it (no-op when current).
  const built = spawnSync("bash", [path.join(REPO_ROOT, "test/fixtures/agents/build.sh")], { encoding: "utf8" });
  if (built.status !== 0) throw new Error(`demo agent image build failed:\n${built.stderr}`);
  t = await startTestMesh({ serviceEnv: { tenant: { OUTPOST_SECRETS_MASTER_KEYS: MASTER_KEYS } } });
  tenant = await t.newTenant("Secretive");
});

afterAll(async () => {
  await t?.mesh.stop();
});

async function cli(args: string[], credential: { apiKey?: string; adminToken?: string }, stdin?: string) {
  const out = new Capture();
  const err = new Capture();
  const env: NodeJS.ProcessEnv = { OUTPOST_HOME: path.join(t.dir, "cli-home"), OUTPOST_GATEWAY_URL: t.mesh.urls.gateway };
  if (credential.apiKey) env.OUTPOST_API_KEY = credential.apiKey;
  if (credential.adminToken) env.OUTPOST_ADMIN_TOKEN = credential.adminToken;
  const input = stdin === undefined ? undefined : Object.assign(Readable.from([stdin]), { isTTY: false });
  const code = await runCli(args, { out, err, env, stdin: input });
  return { code, out: out.text, err: err.text };
}

describe("a secret reaches the run and never its logs", () => {
  it("an agent that prints its secret produces the marker, not the value", async () => {
    const value = `sk-mesh-${Date.now().toString(36)}-value`;
    await tenant.clients.secrets.putSecret({ name: "MY_SECRET", value });
    const { dispatch } = await tenant.clients.dispatches.createDispatch({
      agent: "demo",
      task: "print=MY_SECRET",
      secretNames: ["MY_SECRET"],
    });
    expect(dispatch!.secretNames).toEqual(["MY_SECRET"]);
    const lines: string[] = [];
    const end = await followLogs(tenant.clients.logs, dispatch!.id, (chunk) => lines.push(chunk.text));
    expect(end.state).toBe(Dispatch_State.SUCCEEDED);
    const all = lines.join("\n");
    expect(all).toContain("[REDACTED:MY_SECRET]");
    expect(all).not.toContain(value);
    // Nor in any service's log file, nor the tenant's database in the clear.
    const logDir = path.join(t.dir, "logs");
    for (const file of readdirSync(logDir)) expect(readFileSync(path.join(logDir, file), "utf8")).not.toContain(value);
    const dataDir = path.join(t.dir, "data");
    for (const file of readdirSync(dataDir).filter((f) => f.startsWith("tenant"))) {
      expect(readFileSync(path.join(dataDir, file)).toString("latin1")).not.toContain(value);
    }
  });

  it("another tenant cannot use the secret: its dispatch naming it is NOT_FOUND, nothing queued", async () => {
    const other = await t.newTenant("Other");
    const err = await other.clients.dispatches
      .createDispatch({ agent: "demo", task: "print=MY_SECRET", secretNames: ["MY_SECRET"] })
      .then(() => undefined, (e: unknown) => ConnectError.from(e));
    expect(err?.code).toBe(Code.NotFound);
    expect(errorInfoOf(err!)?.metadata.secret).toBe("MY_SECRET");
    expect((await other.clients.dispatches.listDispatches({})).dispatches).toEqual([]);
    expect((await other.clients.secrets.listSecrets({})).secrets).toEqual([]);
  });
});

describe("the outpost CLI for tenancy, through the gateway", () => {
  it("secret put (from --value and from stdin), list, delete", async () => {
    expect((await cli(["secret", "put", "CLI_TOKEN", "--value", "from-flag"], { apiKey: tenant.apiKey })).code).toBe(0);
    const piped = await cli(["secret", "put", "PIPED_TOKEN"], { apiKey: tenant.apiKey }, "from-stdin\n");
    expect(piped.code).toBe(0);
    expect(piped.out).not.toContain("from-stdin");
    const list = await cli(["secret", "list"], { apiKey: tenant.apiKey });
    expect(list.code).toBe(0);
    expect(list.out).toContain("CLI_TOKEN");
    expect(list.out).toContain("PIPED_TOKEN");
    expect(list.out).not.toContain("from-flag");
    expect((await cli(["secret", "delete", "CLI_TOKEN"], { apiKey: tenant.apiKey })).code).toBe(0);
    expect((await cli(["secret", "list"], { apiKey: tenant.apiKey })).out).not.toContain("CLI_TOKEN");
    const bad = await cli(["secret", "put", "lower-case", "--value", "v"], { apiKey: tenant.apiKey });
    expect(bad.code).toBe(1);
    expect(bad.err).toContain("InvalidArgument");
    expect(bad.err).toContain("name");
    const none = await cli(["secret", "put", "EMPTY"], { apiKey: tenant.apiKey }, "");
    expect(none.code).toBe(2);
  });

  it("admin tenant create/get/list/set-tier/suspend/reactivate and admin key create/list/revoke", async () => {
    const admin = { adminToken: t.adminToken };
    const created = await cli(["admin", "tenant", "create", "CLI Corp", "cli@example.com", "--tier", "pro", "--json"], admin);
    expect(created.code).toBe(0);
    const res = JSON.parse(created.out) as { tenant: { id: string }; apiKeyPlaintext: string };
    const id = res.tenant.id;
    expect(res.apiKeyPlaintext).toMatch(/^otp_[0-9a-f]{64}$/);

    expect((await cli(["admin", "tenant", "get", id], admin)).out).toMatch(/tier: +pro/);
    expect((await cli(["admin", "tenant", "list"], admin)).out).toContain(id);
    expect((await cli(["admin", "tenant", "set-tier", id, "enterprise"], admin)).out).toContain("enterprise");

    const key = await cli(["admin", "key", "create", id, "--name", "ci", "--json"], admin);
    expect(key.code).toBe(0);
    const minted = JSON.parse(key.out) as { apiKey: { id: string; lastFour: string }; apiKeyPlaintext: string };
    const keys = await cli(["admin", "key", "list", id], admin);
    expect(keys.out).toContain(minted.apiKey.id);
    expect(keys.out).toContain(`…${minted.apiKey.lastFour}`);
    expect(keys.out).not.toContain(minted.apiKeyPlaintext.slice(8, -4));
    // The minted key works until revoked; the tenant lists its own keys with it.
    const own = await cli(["key", "list"], { apiKey: minted.apiKeyPlaintext });
    expect(own.code).toBe(0);
    expect(own.out).toContain("ci");
    expect((await cli(["admin", "key", "revoke", minted.apiKey.id], admin)).out).toContain("revoked");
    expect((await cli(["admin", "key", "list", id], admin)).out).toContain("REVOKED");

    const suspended = await cli(["admin", "tenant", "suspend", id, "--reason", "cli test"], admin);
    expect(suspended.out).toContain("suspended (cli test)");
    expect((await cli(["admin", "tenant", "suspend", id], admin)).code).toBe(2); // --reason is required
    expect((await cli(["admin", "tenant", "reactivate", id], admin)).out).toContain("active");
  });

  it("admin methods refuse tenant keys, and tenant keys cannot name another tenant", async () => {
    const viaTenant = await cli(["admin", "tenant", "list"], { apiKey: tenant.apiKey, adminToken: tenant.apiKey });
    expect(viaTenant.code).toBe(1);
    expect(viaTenant.err).toContain("PermissionDenied");
    const err = await tenant.clients.tenants.listTenants({}).then(
      () => undefined,
      (e: unknown) => ConnectError.from(e),
    );
    expect(err?.code).toBe(Code.PermissionDenied);
    expect(errorInfoOf(err!)?.reason).toBe("ADMIN_REQUIRED");
    const other = await t.newTenant("Neighbour");
    const cross = await tenant.clients.apiKeys.listApiKeys({ tenantId: other.tenantId }).then(
      () => undefined,
      (e: unknown) => ConnectError.from(e),
    );
    expect(cross?.code).toBe(Code.NotFound);
  });
});
