/** Repository checkout on the host (host-workspaces.ts) against a real git repository on disk; no Docker. */
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createHostWorkspaces } from "../src/adapters/host-workspaces.ts";
import { CheckoutError } from "../src/core/ports.ts";

let base: string;
let repoUrl: string;
let tagCommit: string;
let headCommit: string;

const git = (cwd: string, ...args: string[]) =>
  execFileSync("git", ["-c", "user.name=t", "-c", "user.email=t@example.invalid", ...args], { cwd, encoding: "utf8" }).trim();

beforeAll(() => {
  base = fs.mkdtempSync(path.join(os.tmpdir(), "outpost-ws-"));
  const work = path.join(base, "work");
  fs.mkdirSync(work);
  git(work, "init", "-q", "-b", "main");
  fs.writeFileSync(path.join(work, "version.txt"), "one");
  git(work, "add", ".");
  git(work, "commit", "-q", "-m", "one");
  git(work, "tag", "v1");
  tagCommit = git(work, "rev-parse", "HEAD");
  fs.writeFileSync(path.join(work, "version.txt"), "two");
  git(work, "commit", "-q", "-am", "two");
  headCommit = git(work, "rev-parse", "HEAD");
  git(base, "clone", "-q", "--bare", work, path.join(base, "project.git"));
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
