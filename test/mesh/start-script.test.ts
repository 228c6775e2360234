/** `npm start` / `npm run demo` on a machine whose Docker engine cannot be reached. */
import { spawnSync } from "node:child_process";
import { mkdtempSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { expect, it } from "vitest";
import { REPO_ROOT } from "../../scripts/lib/mesh.ts";

it("says plainly that the Docker engine is unreachable and what to install", () => {
  const home = mkdtempSync(path.join(os.tmpdir(), "outpost-home-"));
  const res = spawnSync(process.execPath, ["--disable-warning=ExperimentalWarning", "scripts/start-mesh.ts", "--demo"], {
    cwd: REPO_ROOT,
    env: { ...process.env, OUTPOST_HOME: home, DOCKER_HOST: `unix://${path.join(home, "no-docker.sock")}` },
    encoding: "utf8",
    timeout: 30_000,
  });
  expect(res.stderr).toContain("the Docker engine is not reachable");
  expect(res.stderr).toContain("docker.io");
  expect(res.status).toBe(1);
});
