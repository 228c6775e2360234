/**
 * The tenant's everyday CLI commands across the real boundary (CLI Connect client -> gateway ->
 * dispatcher / telemetry / tenant, a real executor running the demo agent on Docker):
 * dispatch with its options, --follow and its exit code, idempotent --request-id, get, list with
 * filters, logs with --after, cancel, the tenant's own key create / list / revoke, and the audit
 * trail (the tenant's own, and the admin's view of it).
 */
import { rmSync } from "node:fs";
import { Capture } from "./capture.ts";
import Docker from "dockerode";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runCli } from "../src/index.ts";
import { startTestMesh, type TestMesh } from "../../../test/mesh/harness.ts";

let t: TestMesh;
let apiKey: string;

beforeAll(async () => {
  await new Docker().ping(); // runs start real containers; without an engine this must fail, not pass
  t = await startTestMesh();
  apiKey = (await t.newTenant("CLI tenant")).apiKey;
});
afterAll(async () => {
  await t?.mesh.stop();
  if (t) rmSync(t.dir, { recursive: true, force: true });
});

async function outpost(...argv: string[]) {
  const out = new Capture();
  const err = new Capture();
  const code = await runCli([...argv, "--gateway", t.mesh.urls.gateway], { out, err, env: { OUTPOST_HOME: t.dir, OUTPOST_API_KEY: apiKey } });
  return { code, out: out.text, err: err.text };
}

type DispatchJson = { id: string; state: string; exitCode?: number; env?: Record<string, string>; labels?: Record<string, string>; agent: string; task: string };

describe("outpost dispatch / get / list / logs / cancel / key against the real mesh", () => {
  it("dispatch --follow streams the lines and exits with the agent's code; the options reach the dispatch", async () => {
    const run = await outpost("dispatch", "--agent", "demo", "--task", "lines=3 exit=3", "--follow", "--label", "team=cli", "--env", "GREETING=hi", "--request-id", "cli-req-1", "--timeout", "120");
    expect(run.code, run.err).toBe(3);
    expect(run.out).toMatch(/line 1\nline 2\nline 3\n/);
    expect(run.err).toMatch(/dispatch (\w+) FAILED \(exit code 3\)/i);
    const id = /dispatch (\w{26})/.exec(run.err)![1]!;

    // The same request id answers the same dispatch, not a new run.
    const again = await outpost("dispatch", "--agent", "demo", "--task", "lines=3 exit=3", "--request-id", "cli-req-1", "--json");
    expect(again.code, again.err).toBe(0);
    expect((JSON.parse(again.out) as DispatchJson).id).toBe(id);

    const got = await outpost("get", id, "--json");
    expect(got.code, got.err).toBe(0);
    const dispatch = JSON.parse(got.out) as DispatchJson;
    expect(dispatch).toMatchObject({ id, state: "STATE_FAILED", exitCode: 3, env: { GREETING: "hi" }, labels: { team: "cli" }, agent: "demo" });
    expect((await outpost("get", id)).out).toContain(id);

    // Filters: this run is FAILED and a demo run; nothing is RUNNING.
    const failed = JSON.parse((await outpost("list", "--state", "failed", "--agent", "demo", "--json")).out) as { dispatches?: DispatchJson[] };
    expect(failed.dispatches?.map((d) => d.id)).toEqual([id]);
    const running = JSON.parse((await outpost("list", "--state", "running", "--json")).out) as { dispatches?: DispatchJson[] };
    expect(running.dispatches ?? []).toEqual([]);

    // History: everything, then only after seq 2.
    const logs = await outpost("logs", id);
    expect(logs.code, logs.err).toBe(0);
    expect(logs.out).toMatch(/line 1\nline 2\nline 3\n/);
    // All output here is stdout, one chunk per line, so --after 2 drops exactly the first two lines.
    const tail = await outpost("logs", id, "--after", "2");
    expect(tail.code, tail.err).toBe(0);
    expect(tail.out).toBe(logs.out.split("\n").slice(2).join("\n"));
    // --timestamps: the same lines, each after the time the executor read it (a moment ago, in order).
    const stamped = await outpost("logs", id, "-t");
    expect(stamped.code, stamped.err).toBe(0);
    const rows = stamped.out.trimEnd().split("\n").map((l) => /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (.*)$/.exec(l));
    expect(rows.every(Boolean), stamped.out).toBe(true);
    expect(rows.map((m) => m![2]).join("\n")).toBe(logs.out.trimEnd());
    const times = rows.map((m) => Date.parse(m![1]!));
    expect(times).toEqual([...times].sort((a, b) => a - b));
    expect(Date.now() - times[0]!).toBeLessThan(10 * 60_000);
  });

  it("cancel stops a run; the CLI reports it and get shows CANCELLED", async () => {
    const created = await outpost("dispatch", "--agent", "demo", "--task", "sleep=60");
    expect(created.code, created.err).toBe(0);
    const id = created.out.trim();
    expect(id).toMatch(/^[0-9A-Z]{26}$/);
    const cancelled = await outpost("cancel", id);
    expect(cancelled.code, cancelled.err).toBe(0);
    expect(cancelled.out).toContain(id);
    let state = "";
    for (let i = 0; i < 120 && state !== "STATE_CANCELLED"; i++) {
      if (i > 0) await new Promise((r) => setTimeout(r, 250));
      state = (JSON.parse((await outpost("get", id, "--json")).out) as DispatchJson).state;
    }
    expect(state).toBe("STATE_CANCELLED");
  });

  it("key create prints a new key once; key list masks it; key revoke stops it working", async () => {
    const created = await outpost("key", "create", "--name", "ci-runner", "--json");
    expect(created.code, created.err).toBe(0);
    const { apiKey: key, apiKeyPlaintext } = JSON.parse(created.out) as { apiKey: { id: string }; apiKeyPlaintext: string };
    expect(apiKeyPlaintext).toMatch(/^otp_[0-9a-f]{64}$/);

    const listed = await outpost("key", "list");
    expect(listed.code, listed.err).toBe(0);
    expect(listed.out).toContain("ci-runner");
    expect(listed.out).toContain(apiKeyPlaintext.slice(-4));
    expect(listed.out).not.toContain(apiKeyPlaintext);

    const viaNewKey = await runCli(["agents", "--gateway", t.mesh.urls.gateway], { out: new Capture(), err: new Capture(), env: { OUTPOST_HOME: t.dir, OUTPOST_API_KEY: apiKeyPlaintext } });
    expect(viaNewKey).toBe(0);
    const revoked = await outpost("key", "revoke", key.id);
    expect(revoked.code, revoked.err).toBe(0);
    expect(revoked.out).toContain("revoked");
    // Revocation reaches the gateway at once (pub/sub when Redis is configured, or its short auth cache).
    let code = 0;
    for (let i = 0; i < 20 && code === 0; i++) {
      if (i > 0) await new Promise((r) => setTimeout(r, 250));
      const err = new Capture();
      code = await runCli(["agents", "--gateway", t.mesh.urls.gateway], { out: new Capture(), err, env: { OUTPOST_HOME: t.dir, OUTPOST_API_KEY: apiKeyPlaintext } });
    }
    expect(code).not.toBe(0);
  });

  it("audit lists the tenant's own mutating calls, newest first; admin audit --tenant finds them too; another tenant's trail stays apart", async () => {
    const created = await outpost("key", "create", "--name", "audited", "--json");
    expect(created.code, created.err).toBe(0);
    const keyId = (JSON.parse(created.out) as { apiKey: { id: string } }).apiKey.id;
    const own = await outpost("audit", "--json");
    expect(own.code, own.err).toBe(0);
    const events = (JSON.parse(own.out) as { events: { method: string; target: string; outcome: string; tenantId: string }[] }).events;
    expect(events[0]).toMatchObject({ method: "outpost.tenant.v1.ApiKeyService/CreateApiKey", target: `api_key/${keyId}`, outcome: "OK" });
    const text = await outpost("audit", "--limit", "1");
    expect(text.out).toMatch(new RegExp(`^\\d{4}-\\d\\d-\\d\\dT[\\d:.]+Z  OK +\\S+  outpost\\.tenant\\.v1\\.ApiKeyService/CreateApiKey  api_key/${keyId}\\n$`));
    expect(text.err).toContain("more remain; for the next 1: outpost audit --page-token ");

    // The admin sees the same event under the tenant; a tenant cannot ask for another's.
    const tenantId = events[0]!.tenantId;
    const admin = new Capture();
    const adminErr = new Capture();
    const adminCode = await runCli(["admin", "audit", "--tenant", tenantId, "--limit", "5", "--gateway", t.mesh.urls.gateway], {
      out: admin,
      err: adminErr,
      env: { OUTPOST_HOME: t.dir, OUTPOST_ADMIN_TOKEN: t.adminToken },
    });
    expect(adminCode, adminErr.text).toBe(0);
    expect(admin.text).toContain(`api_key/${keyId}`);
    expect(admin.text).toContain(tenantId);
    const refused = await outpost("audit", "--tenant", tenantId);
    expect(refused.code).toBe(2);
    expect(refused.err).toContain("--tenant is for admin audit");
    const other = await t.newTenant("Someone else");
    const theirKey = (await other.clients.apiKeys.createApiKey({ displayName: "theirs" })).apiKey!.id;
    const theirs = new Capture();
    const theirErr = new Capture();
    const theirCode = await runCli(["audit", "--all", "--gateway", t.mesh.urls.gateway], { out: theirs, err: theirErr, env: { OUTPOST_HOME: t.dir, OUTPOST_API_KEY: other.apiKey } });
    expect(theirCode, theirErr.text).toBe(0);
    expect(theirs.text).toContain(`api_key/${theirKey}`);
    expect(theirs.text).not.toContain(keyId);
  });
});
