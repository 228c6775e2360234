/**
 * `npm run backup` (scripts/backup-stores.ts) as its own process against the stores' files:
 * copies taken while the stores are open and hold writes not yet checkpointed (the running
 * mesh's case) read back whole through the stores themselves; copies of closed files too; the
 * copies are private; usage errors exit 2.
 */
import { spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { SqliteDispatchStore } from "../services/dispatcher/src/store/sqlite-store.ts";
import { dispatchFixture } from "../services/dispatcher/test/store-conformance.ts";
import { SqliteTelemetryStore } from "../services/telemetry/src/store/sqlite-store.ts";
import { SqliteTenantStore } from "../services/tenant/src/store/sqlite-store.ts";
import { keyFixture, tenantFixture } from "../services/tenant/test/store-conformance.ts";
import { REPO_ROOT } from "../scripts/lib/mesh.ts";

const dirs: string[] = [];
const tempDir = (name: string) => {
  const dir = mkdtempSync(path.join(tmpdir(), `outpost-backup-${name}-`));
  dirs.push(dir);
  return dir;
};
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

function backup(args: string[], env: NodeJS.ProcessEnv = {}) {
  const run = spawnSync(process.execPath, ["--disable-warning=ExperimentalWarning", path.join(REPO_ROOT, "scripts/backup-stores.ts"), ...args], {
    encoding: "utf8",
    env: { ...process.env, OUTPOST_DATA_DIR: "", ...env },
    timeout: 30_000,
  });
  return { code: run.status, out: run.stdout, err: run.stderr };
}

/** The single backup directory `backup` made under `into`. */
function madeUnder(into: string): string {
  const made = readdirSync(into);
  expect(made).toHaveLength(1);
  expect(made[0]).toMatch(/^outpost-backup-\d{4}-\d\d-\d\dT/);
  return path.join(into, made[0]!);
}

describe("npm run backup", () => {
  it("copies the three stores while they are open, unflushed writes included, and the copies read back through the stores", async () => {
    const data = tempDir("data");
    const tenants = new SqliteTenantStore(data);
    const dispatches = new SqliteDispatchStore(data);
    const logs = new SqliteTelemetryStore(data);
    const tenant = tenantFixture({ name: "Backed Up" });
    await tenants.createTenantWithKey(tenant, keyFixture(tenant.id));
    const dispatch = dispatchFixture({ tenantId: tenant.id, task: "kept in the backup" });
    await dispatches.insert(dispatch);
    await logs.insertChunks(dispatch.id, tenant.id, [1, 2, 3].map((seq) => ({ dispatchId: dispatch.id, seq, stream: 1, text: `line ${seq}`, timeMs: seq })));
    // The writes sit in the write-ahead logs: a copy of the .db files alone would miss them.
    expect(readdirSync(data).filter((f) => f.endsWith("-wal"))).toHaveLength(3);

    const into = tempDir("into");
    const run = backup([into, "--data-dir", data]);
    expect(run.err).toBe("");
    expect(run.code).toBe(0);
    const made = madeUnder(into);
    expect(run.out.trim().split("\n").map((line) => path.basename(line.split(" ")[0]!))).toEqual(["tenant.db", "dispatcher.db", "telemetry.db"]);
    expect(statSync(made).mode & 0o777).toBe(0o700);
    for (const file of readdirSync(made)) expect(statSync(path.join(made, file)).mode & 0o777, file).toBe(0o600);
    expect(readdirSync(made).sort()).toEqual(["dispatcher.db", "telemetry.db", "tenant.db"]);

    const restoredTenants = new SqliteTenantStore(made);
    const restoredDispatches = new SqliteDispatchStore(made);
    const restoredLogs = new SqliteTelemetryStore(made);
    expect((await restoredTenants.getTenant(tenant.id))?.name).toBe("Backed Up");
    expect((await restoredDispatches.get(dispatch.id))?.task).toBe("kept in the backup");
    expect((await restoredLogs.listChunks(dispatch.id, 0, 10)).map((c) => c.text)).toEqual(["line 1", "line 2", "line 3"]);
    for (const store of [tenants, dispatches, logs, restoredTenants, restoredDispatches, restoredLogs]) await store.close();

    // Closed files (no write-ahead log left beside them) are copied as well; a second backup
    // goes to a directory of its own.
    expect(readdirSync(data).filter((f) => f.endsWith("-wal"))).toEqual([]);
    const again = tempDir("again");
    expect(backup([again], { OUTPOST_DATA_DIR: data }).code).toBe(0);
    const second = new SqliteTenantStore(madeUnder(again));
    expect((await second.getTenant(tenant.id))?.name).toBe("Backed Up");
    await second.close();
  });

  it("usage errors exit 2 saying what is wrong, and write nothing", () => {
    const into = tempDir("usage");
    const none = backup([]);
    expect(none.code).toBe(2);
    expect(none.err).toContain("give one directory");
    const empty = backup([into, "--data-dir", tempDir("empty")]);
    expect(empty.code).toBe(2);
    expect(empty.err).toMatch(/no store in .*--data-dir or OUTPOST_DATA_DIR/);
    expect(backup([into, "--bogus"]).code).toBe(2);
    expect(readdirSync(into)).toEqual([]);
  });
});
