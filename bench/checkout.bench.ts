/**
 * Repository checkout (SPEC E1; docs/executor.md, "The checkout's egress guard"): the executor's
 * checkout — `createHostWorkspaces().checkout`, i.e. git with an environment of its own, the
 * tree handed to the container user, and every connection through the checkout's egress guard
 * (a proxy started for the checkout; for git:// also the tunnel command, a Node process) —
 * against a bare `git clone` of the same repository from the same server, over git:// (git
 * daemon) and http (git's dumb protocol from a static file server), both on loopback. The guard
 * turned off is measured too, so its own cost shows apart from the rest of the checkout.
 */
import { execFileSync, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { createHostWorkspaces, type HostWorkspacesOptions } from "../services/executor/src/adapters/host-workspaces.ts";
import { parseAllowedNetworks } from "../services/executor/src/adapters/checkout-egress.ts";
import { median, type BenchResult, type Benchmark } from "./lib/types.ts";

const git = (cwd: string, ...args: string[]) => execFileSync("git", ["-c", "user.name=b", "-c", "user.email=b@example.invalid", ...args], { cwd, stdio: ["ignore", "pipe", "pipe"] });

/** A bare repository of `files` files of 4 KiB of random bytes (incompressible), one commit. */
function makeRepository(dir: string, files: number): string {
  const work = path.join(dir, "work");
  fs.mkdirSync(path.join(work, "src"), { recursive: true });
  for (let i = 0; i < files; i++) fs.writeFileSync(path.join(work, "src", `f${i}.bin`), randomBytes(4096));
  git(work, "init", "-q", "-b", "main");
  git(work, "add", ".");
  git(work, "commit", "-q", "-m", "bench");
  const bare = path.join(dir, "project.git");
  git(dir, "clone", "-q", "--bare", work, bare);
  git(bare, "update-server-info");
  return bare;
}

const checkoutBench: Benchmark = async (ctx): Promise<BenchResult> => {
  const files = ctx.quick ? 50 : 400;
  const perRun = ctx.quick ? 2 : 8;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "outpost-bench-checkout-"));
  const bare = makeRepository(dir, files);
  const server = http.createServer((req, res) => {
    const file = path.join(dir, decodeURIComponent(new URL(req.url ?? "/", "http://x").pathname));
    if (!file.startsWith(`${bare}/`) || !fs.existsSync(file) || !fs.statSync(file).isFile()) return void res.writeHead(404).end();
    res.writeHead(200, { "content-type": "application/octet-stream" }).end(fs.readFileSync(file));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const httpUrl = `http://127.0.0.1:${(server.address() as net.AddressInfo).port}/project.git`;
  const probe = net.createServer();
  await new Promise<void>((resolve) => probe.listen(0, "127.0.0.1", resolve));
  const daemonPort = (probe.address() as net.AddressInfo).port;
  await new Promise((resolve) => probe.close(resolve));
  const daemon = spawn("git", ["daemon", "--reuseaddr", "--export-all", `--base-path=${dir}`, "--listen=127.0.0.1", `--port=${daemonPort}`, dir], { stdio: "ignore" });
  const gitUrl = `git://127.0.0.1:${daemonPort}/project.git`;
  try {
    for (let tries = 0; ; tries++) {
      try {
        git(dir, "ls-remote", gitUrl);
        break;
      } catch (err) {
        if (tries > 100) throw err;
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    }
    const workspaces = (checkoutEgress: HostWorkspacesOptions["checkoutEgress"]) =>
      createHostWorkspaces({ runsDir: path.join(dir, "runs"), uid: 65534, gid: 65534, repoSchemes: new Set(["git", "http"]), checkoutTimeoutMs: 120_000, checkoutEgress });
    const guarded = workspaces({ allowedNetworks: parseAllowedNetworks("127.0.0.1/32") });
    const open = workspaces("open");
    let n = 0;
    const outpost = async (ws: ReturnType<typeof workspaces>, url: string): Promise<number> => {
      const files = await ws.create(`run-${++n}`);
      const started = performance.now();
      await ws.checkout(files, url, "main");
      const ms = performance.now() - started;
      await ws.remove(files);
      return ms;
    };
    const bareClone = async (url: string): Promise<number> => {
      const target = path.join(dir, `bare-${++n}`);
      const started = performance.now();
      await new Promise<void>((resolve, reject) => {
        const child = spawn("git", ["clone", "-q", url, target], { stdio: "ignore" });
        child.once("error", reject);
        child.once("exit", (code) => (code === 0 ? resolve() : reject(new Error(`git clone exited ${code}`))));
      });
      const ms = performance.now() - started;
      fs.rmSync(target, { recursive: true, force: true });
      return ms;
    };
    // Warm-up (page cache, git's first start), unmeasured.
    await outpost(guarded, gitUrl);
    await bareClone(gitUrl);
    const series = { gitGuarded: [] as number[], gitOpen: [] as number[], gitBare: [] as number[], httpGuarded: [] as number[], httpOpen: [] as number[], httpBare: [] as number[] };
    for (let run = 0; run < ctx.runs; run++) {
      for (let i = 0; i < perRun; i++) {
        // Interleaved, so a slow moment of the machine falls on all alike.
        series.gitGuarded.push(await outpost(guarded, gitUrl));
        series.gitOpen.push(await outpost(open, gitUrl));
        series.gitBare.push(await bareClone(gitUrl));
        series.httpGuarded.push(await outpost(guarded, httpUrl));
        series.httpOpen.push(await outpost(open, httpUrl));
        series.httpBare.push(await bareClone(httpUrl));
      }
      ctx.log(`run ${run + 1}: git:// guarded ${median(series.gitGuarded).toFixed(1)} ms, bare ${median(series.gitBare).toFixed(1)} ms; http guarded ${median(series.httpGuarded).toFixed(1)} ms, bare ${median(series.httpBare).toFixed(1)} ms`);
    }
    const row = (metric: string, value: number[], baseline: number[]) => {
      const v = median(value);
      const b = median(baseline);
      return { metric, value: v, unit: "ms", baseline: b, ratio: v / b };
    };
    return {
      name: "checkout",
      conditions: `${files} files of 4 KiB (one commit), ${perRun} checkouts per series per run, interleaved; Outpost's checkout includes handing the tree to the container user; servers on loopback (allowed network 127.0.0.1/32)`,
      rows: [
        row("checkout over git://, guarded vs bare git clone (lower is better)", series.gitGuarded, series.gitBare),
        row("checkout over git://, guard off vs bare git clone (lower is better)", series.gitOpen, series.gitBare),
        row("checkout over http, guarded vs bare git clone (lower is better)", series.httpGuarded, series.httpBare),
        row("checkout over http, guard off vs bare git clone (lower is better)", series.httpOpen, series.httpBare),
      ],
    };
  } finally {
    daemon.kill();
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
    fs.rmSync(dir, { recursive: true, force: true });
  }
};

export default checkoutBench;
