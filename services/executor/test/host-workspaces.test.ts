/** Repository checkout on the host (host-workspaces.ts) against a real git repository on disk; no Docker. */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createHostWorkspaces } from "../src/adapters/host-workspaces.ts";
import { CheckoutError } from "../src/core/ports.ts";
import { git, makeTwoCommitRepo } from "./git-fixture.ts";
import { signingEnv } from "../../../test/support/signing.ts";

let base: string;
let repoUrl: string;
let tagCommit: string;
let headCommit: string;

beforeAll(() => {
  base = fs.mkdtempSync(path.join(os.tmpdir(), "outpost-ws-"));
  ({ tagCommit, headCommit } = makeTwoCommitRepo(base));
  repoUrl = `file://${base}/project.git`;
});

afterAll(() => {
  fs.rmSync(base, { recursive: true, force: true });
});

// file: is allowed here only so the test needs no server; executors leave it out by default.
const workspaces = () =>
  createHostWorkspaces({ runsDir: path.join(base, "runs"), uid: 65534, gid: 65534, repoSchemes: new Set(["file"]), checkoutTimeoutMs: 30_000 });

async function checkout(name: string, ref: string) {
  const ws = workspaces();
  const files = await ws.create(name);
  await ws.checkout(files, repoUrl, ref);
  return { files, head: git(files.workspace, "-c", `safe.directory=${files.workspace}`, "rev-parse", "HEAD") };
}

describe("repository checkout", () => {
  it("checks out a tag, a commit id and the default branch", async () => {
    expect((await checkout("run-tag", "v1")).head).toBe(tagCommit);
    expect((await checkout("run-commit", tagCommit)).head).toBe(tagCommit);
    expect((await checkout("run-default", "")).head).toBe(headCommit);
    expect((await checkout("run-branch", "main")).head).toBe(headCommit);
  });

  it("never takes a ref for a git option", async () => {
    // Without end-of-options, `git checkout --detach --force` would succeed on the default branch.
    for (const ref of ["--force", "--orphan=x", "-q"]) {
      const err = await checkout(`run-opt${ref.length}`, ref).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(CheckoutError);
      expect((err as Error).message).toBe(`ref ${JSON.stringify(ref)} is not a branch, tag or commit of the repository`);
    }
    await expect(checkout("run-missing", "no-such-branch")).rejects.toThrow('ref "no-such-branch" is not a branch, tag or commit of the repository');
  });
});

describe("the checked-out tree, when the executor is not root", () => {
  it("is writable by the container user throughout (a+rwX), and symbolic links are not followed", async () => {
    // Outside the workspace: what the repository's links name, with modes that must not change.
    const outsideFile = path.join(base, "outside.txt");
    const outsideDir = path.join(base, "outside-dir");
    fs.writeFileSync(outsideFile, "host file", { mode: 0o600 });
    fs.chmodSync(outsideFile, 0o600);
    fs.mkdirSync(outsideDir, { mode: 0o700 });
    fs.chmodSync(outsideDir, 0o700);
    const work = path.join(base, "nested-work");
    fs.mkdirSync(path.join(work, "src", "lib", "deep"), { recursive: true });
    fs.mkdirSync(path.join(work, "bin"));
    fs.writeFileSync(path.join(work, "README.md"), "top");
    fs.writeFileSync(path.join(work, "src", "lib", "deep", "code.ts"), "export {};\n");
    fs.writeFileSync(path.join(work, "bin", "run.sh"), "#!/bin/sh\n", { mode: 0o755 });
    fs.symlinkSync(outsideFile, path.join(work, "src", "to-host-file"));
    fs.symlinkSync(outsideDir, path.join(work, "to-host-dir"));
    git(work, "init", "-q", "-b", "main");
    git(work, "add", ".");
    git(work, "commit", "-q", "-m", "nested");
    git(base, "clone", "-q", "--bare", work, path.join(base, "nested.git"));

    const ws = createHostWorkspaces({
      runsDir: path.join(base, "runs"), uid: 65534, gid: 65534, repoSchemes: new Set(["file"]), checkoutTimeoutMs: 30_000, asRoot: false,
    });
    const files = await ws.create("run-nonroot");
    await ws.checkout(files, `file://${base}/nested.git`, "");

    const dirs: string[] = [];
    const regular: string[] = [];
    const links: string[] = [];
    const walk = (dir: string) => {
      dirs.push(dir);
      for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
        const full = path.join(dir, entry.name);
        if (entry.isSymbolicLink()) links.push(full);
        else if (entry.isDirectory()) walk(full);
        else regular.push(full);
      }
    };
    walk(files.workspace);
    const mode = (p: string) => fs.lstatSync(p).mode & 0o777;
    expect(regular.map((p) => path.relative(files.workspace, p))).toEqual(
      expect.arrayContaining(["README.md", "src/lib/deep/code.ts", "bin/run.sh", ".git/HEAD"]),
    );
    expect(dirs.map((p) => path.relative(files.workspace, p))).toEqual(expect.arrayContaining(["src/lib/deep", ".git/objects"]));
    // Every directory rwx for all (create and delete in it), every file rw for all; x where it had x.
    expect(dirs.filter((d) => mode(d) !== 0o777)).toEqual([]);
    expect(regular.filter((f) => (mode(f) & 0o666) !== 0o666)).toEqual([]);
    expect(mode(path.join(files.workspace, "bin", "run.sh"))).toBe(0o777);
    expect(mode(path.join(files.workspace, "README.md"))).toBe(0o666);
    // The links are still links, and what they name kept its modes.
    expect(links.map((p) => path.relative(files.workspace, p)).sort()).toEqual(["src/to-host-file", "to-host-dir"]);
    expect(fs.readlinkSync(path.join(files.workspace, "src", "to-host-file"))).toBe(outsideFile);
    expect(fs.statSync(outsideFile).mode & 0o777).toBe(0o600);
    expect(fs.statSync(outsideDir).mode & 0o777).toBe(0o700);
  });
});

describe("git's environment", () => {
  const saved = { ...process.env };
  afterAll(() => {
    for (const name of Object.keys(process.env)) if (!(name in saved)) delete process.env[name];
    Object.assign(process.env, saved);
  });

  it("is not the executor's: no HOME gitconfig, no OUTPOST_* or SSH_AUTH_SOCK, ssh without agent or keys", async () => {
    // The executor's own HOME with a global gitconfig that rewrites a URL, and its secrets.
    const operatorHome = path.join(base, "operator-home");
    fs.mkdirSync(operatorHome);
    const fake = "file:///nonexistent/outpost-rewritten.git";
    fs.writeFileSync(path.join(operatorHome, ".gitconfig"), `[url "${repoUrl}"]\n\tinsteadOf = ${fake}\n`);
    // A stand-in ssh first on PATH records what git's ssh would see.
    const bin = path.join(base, "bin");
    const dump = path.join(base, "ssh-saw.txt");
    fs.mkdirSync(bin);
    fs.writeFileSync(path.join(bin, "ssh"), `#!/bin/sh\n{ echo "ARGS $*"; env; } > '${dump}'\nexit 1\n`, { mode: 0o755 });
    Object.assign(process.env, {
      HOME: operatorHome,
      PATH: `${bin}:${process.env.PATH}`,
      ...signingEnv("executor"),
      OUTPOST_ADMIN_TOKEN: "admin-token-of-the-executor",
      SSH_AUTH_SOCK: path.join(base, "agent.sock"),
    });
    expect(git(base, "config", "--global", "--get-regexp", "url")).toContain(fake); // the executor's git would rewrite it

    const ws = createHostWorkspaces({ runsDir: path.join(base, "runs"), uid: 65534, gid: 65534, repoSchemes: new Set(["file", "ssh"]), checkoutTimeoutMs: 30_000 });
    const rewritten = await ws.create("run-rewrite");
    await expect(ws.checkout(rewritten, fake, "")).rejects.toBeInstanceOf(CheckoutError);

    const overSsh = await ws.create("run-ssh");
    await expect(ws.checkout(overSsh, "ssh://git.example.invalid/acme/repo.git", "")).rejects.toBeInstanceOf(CheckoutError);
    const saw = fs.readFileSync(dump, "utf8");
    expect(saw).not.toMatch(/^(OUTPOST_|SSH_AUTH_SOCK=)/m);
    expect(saw).not.toContain(signingEnv("executor").OUTPOST_SIGNING_KEY);
    expect(saw).not.toContain(operatorHome);
    expect(saw).toMatch(/^ARGS -F \/dev\/null -o BatchMode=yes -o IdentitiesOnly=yes -o IdentityFile=\/dev\/null -o IdentityAgent=none /m);
    expect(saw).toMatch(/^GIT_CONFIG_NOSYSTEM=1$/m);
    expect(saw).toMatch(/^GIT_CONFIG_GLOBAL=\/dev\/null$/m);
    // The checkout's HOME was its own, and it is gone.
    expect(fs.existsSync(path.join(overSsh.root, "git-home"))).toBe(false);
  });
});
