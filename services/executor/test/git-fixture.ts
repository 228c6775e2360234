/** The git repository the checkout tests clone: two commits on main, the tag v1 on the first. */
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";

/** Runs git in `cwd` as a test author; returns its output, trimmed. */
export const git = (cwd: string, ...args: string[]) =>
  execFileSync("git", ["-c", "user.name=t", "-c", "user.email=t@example.invalid", ...args], { cwd, encoding: "utf8" }).trim();

/** Makes the repository under `dir` and clones it bare to `<dir>/project.git` (version.txt says "one", then "two"). */
export function makeTwoCommitRepo(dir: string): { bare: string; tagCommit: string; headCommit: string } {
  const work = path.join(dir, "work");
  fs.mkdirSync(work);
  git(work, "init", "-q", "-b", "main");
  fs.writeFileSync(path.join(work, "version.txt"), "one");
  git(work, "add", ".");
  git(work, "commit", "-q", "-m", "one");
  git(work, "tag", "v1");
  const tagCommit = git(work, "rev-parse", "HEAD");
  fs.writeFileSync(path.join(work, "version.txt"), "two");
  git(work, "commit", "-q", "-am", "two");
  const headCommit = git(work, "rev-parse", "HEAD");
  const bare = path.join(dir, "project.git");
  git(dir, "clone", "-q", "--bare", work, bare);
  return { bare, tagCommit, headCommit };
}
