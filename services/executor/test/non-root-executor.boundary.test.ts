/**
 * An executor that is not root (the Kubernetes manifests run it as uid 1000): it cannot chown
 * run directories, nor delete what another uid made inside them. So its agents run as its own
 * uid and gid (run.ts containerUserFor), and their run directories go when the run ends. Real
 * engine, real uid switch: the executor's workspace calls run in a child process as uid 1000,
 * the agent is the demo image writing nested directories as the user the executor gives it;
 * agents as nobody are the control that shows what goes wrong otherwise.
 */
import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { bindsFor, containerUserFor, NOBODY, type ContainerUser } from "../src/core/run.ts";
import { buildDemoAgent, dockerUp, IMAGE, ROOT } from "./boundary-harness.ts";

const EXECUTOR_UID = 1000;

/** Whether a user other than the owner can read `file` (every directory above it searchable by others). */
function othersCanRead(file: string): boolean {
  if ((fs.statSync(file).mode & 0o004) === 0) return false;
  for (let dir = path.dirname(file); ; dir = path.dirname(dir)) {
    if ((fs.statSync(dir).mode & 0o001) === 0) return false;
    if (dir === path.dirname(dir)) return true;
  }
}

/** Root to switch to uid 1000, a checkout that uid can read (not one under a private home), and the engine. */
const runnable = process.getuid?.() === 0 && othersCanRead(path.join(ROOT, "services/executor/src/adapters/host-workspaces.ts")) && dockerUp();

/** What the agent makes: directories of its own, with a file deep down, not writable by others. */
const AGENT = "mkdir -p /workspace/.outpost/deep/er && echo '{}' > /workspace/.outpost/result.json && echo x > /workspace/.outpost/deep/er/f && chmod -R go-w /workspace/.outpost";

describe.skipIf(!runnable)("an executor that is not root, on the real engine", () => {
  const base = fs.mkdtempSync(path.join(os.tmpdir(), "outpost-non-root-"));
  fs.chmodSync(base, 0o755); // the executor (uid 1000) reaches its runs directory through it
  afterAll(() => fs.rmSync(base, { recursive: true, force: true }));

  /** The executor's host-workspaces calls, as uid 1000 in a process of their own. */
  function asExecutor(runsDir: string, agent: ContainerUser, op: "create" | "remove"): { status: number | null; stderr: string } {
    const module = path.join(ROOT, "services/executor/src/adapters/host-workspaces.ts");
    const script = `
      import { createHostWorkspaces } from ${JSON.stringify(module)};
      const workspaces = createHostWorkspaces({ runsDir: ${JSON.stringify(runsDir)}, uid: ${agent.uid}, gid: ${agent.gid}, repoSchemes: new Set(), checkoutTimeoutMs: 1000, checkoutEgress: { allowedNetworks: [] } });
      ${op === "create" ? 'await workspaces.create("run-1");' : 'await workspaces.remove(workspaces.filesOf("run-1"));'}`;
    const child = spawnSync(process.execPath, ["--disable-warning=ExperimentalWarning", "--input-type=module", "-e", script], {
      cwd: ROOT,
      uid: EXECUTOR_UID,
      gid: EXECUTOR_UID,
      encoding: "utf8",
      timeout: 30_000,
    });
    return { status: child.status, stderr: child.stderr };
  }

  /** One run's directory through create, the agent as `agent`, and remove: whether it is left behind. */
  function leftBehind(agent: ContainerUser): boolean {
    const runsDir = fs.mkdtempSync(path.join(base, "runs-"));
    fs.chownSync(runsDir, EXECUTOR_UID, EXECUTOR_UID);
    const created = asExecutor(runsDir, agent, "create");
    expect(created.stderr).toBe("");
    const files = { root: path.join(runsDir, "run-1"), workspace: path.join(runsDir, "run-1", "workspace"), control: path.join(runsDir, "run-1", "control") };
    const binds = bindsFor(files).flatMap((bind) => ["-v", bind]);
    execFileSync("docker", ["run", "--rm", "--platform", "linux/arm64", "--network", "none", "--user", `${agent.uid}:${agent.gid}`, ...binds, "--entrypoint", "/bin/sh", IMAGE, "-c", AGENT], {
      encoding: "utf8",
      timeout: 60_000,
    });
    expect(fs.existsSync(path.join(files.workspace, ".outpost/deep/er/f"))).toBe(true);
    asExecutor(runsDir, agent, "remove");
    return fs.existsSync(files.root);
  }

  it("runs its agents as itself, and their run directories are removed when the run ends", () => {
    buildDemoAgent();
    const agent = containerUserFor(EXECUTOR_UID, EXECUTOR_UID);
    expect(agent).toEqual({ uid: EXECUTOR_UID, gid: EXECUTOR_UID });
    expect(leftBehind(agent)).toBe(false);
  });

  it("the control: agents as nobody leave what they made behind for it", () => {
    expect(leftBehind(NOBODY)).toBe(true);
  });

  it("a root executor still gives its agents nobody", () => {
    expect(containerUserFor(0, 0)).toEqual(NOBODY);
    expect(containerUserFor(undefined, undefined)).toEqual(NOBODY);
  });
});
