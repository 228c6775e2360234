/**
 * `npm start` / `npm run demo` on a machine whose Docker engine cannot be reached, with the
 * credentials file an earlier version left (readable by others, not JSON, someone else's), and the mesh
 * launcher (scripts/lib/mesh.ts) they share with the tests and harnesses: a port someone else
 * holds, a process that dies during start-up, one that will not stop, and a parent that fails or
 * is killed.
 */
import { spawn, spawnSync } from "node:child_process";
import { chmodSync, chownSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { afterEach, describe, expect, it } from "vitest";
import { DEFAULT_PORTS, freePort, listensOn, REPO_ROOT, startMesh } from "../../scripts/lib/mesh.ts";

it("says plainly that the Docker engine is unreachable and what to install", () => {
  const home = mkdtempSync(path.join(os.tmpdir(), "outpost-home-"));
  const res = spawnSync(process.execPath, ["--disable-warning=ExperimentalWarning", "scripts/start-mesh.ts", "--demo"], {
    cwd: REPO_ROOT,
    env: { ...process.env, OUTPOST_HOME: home, DOCKER_HOST: `unix://${path.join(home, "no-docker.sock")}` },
    encoding: "utf8",
    timeout: 30_000,
  });
  rmSync(home, { recursive: true, force: true });
  expect(res.stderr).toContain("the Docker engine is not reachable");
  expect(res.stderr).toContain("docker.io");
  expect(res.status).toBe(1);
});

describe("npm start with the credentials file an earlier version left in OUTPOST_HOME", () => {
  const homes: string[] = [];
  afterEach(() => {
    for (const home of homes.splice(0)) rmSync(home, { recursive: true, force: true });
  });
  const saved = JSON.stringify({ gatewayUrl: "http://127.0.0.1:7100", apiKey: `otp_${"b".repeat(64)}`, adminToken: "c".repeat(64), tenantId: "T1" });
  /** An old checkout's .outpost, as the README's migration note has users point OUTPOST_HOME at: 0755, its file 0644. */
  const oldHome = (content: string) => {
    const home = path.join(mkdtempSync(path.join(os.tmpdir(), "outpost-old-checkout-")), ".outpost");
    homes.push(path.dirname(home));
    mkdirSync(home);
    chmodSync(home, 0o755);
    const file = path.join(home, "credentials.json");
    writeFileSync(file, content);
    chmodSync(file, 0o644);
    return { home, file };
  };
  const npmStart = (home: string, ...args: string[]) =>
    spawnSync(process.execPath, ["--disable-warning=ExperimentalWarning", "scripts/start-mesh.ts", ...args], {
      cwd: REPO_ROOT,
      env: { ...process.env, OUTPOST_HOME: home, DOCKER_HOST: `unix://${path.join(home, "no-docker.sock")}` },
      encoding: "utf8",
      timeout: 30_000,
    });
  const modeOf = (file: string) => statSync(file).mode & 0o777;

  it("makes the user's own file 0600 and its directory 0700 before anything else, as it does its other secrets", () => {
    const { home, file } = oldHome(saved);
    // --demo stops at the unreachable Docker engine, after the credentials and before the mesh.
    const res = npmStart(home, "--demo");
    expect(res.stderr).toContain("the Docker engine is not reachable");
    expect(res.stderr).not.toContain("refusing");
    expect(res.status).toBe(1);
    expect(modeOf(file)).toBe(0o600);
    expect(modeOf(home)).toBe(0o700);
    expect(readFileSync(file, "utf8")).toBe(saved);
  });

  it("stops before starting anything at a file that is not JSON: one line naming it and the fix, no stack trace", () => {
    const key = `otp_${"d".repeat(64)}`;
    const { home, file } = oldHome(`${key}\n`); // a bare key, not the JSON npm start writes
    chmodSync(file, 0o600);
    const res = npmStart(home);
    expect(res.stderr).toBe(`outpost: ${file} is not valid JSON: fix it, or delete it and run npm start, which provisions a development tenant and writes a new one\n`);
    expect(res.stderr).not.toContain(key);
    expect(res.status).toBe(2);
    expect(existsSync(path.join(home, "data"))).toBe(false); // no service was started
    expect(existsSync(path.join(home, "logs"))).toBe(false);
  });

  it("stops before starting anything when the home cannot hold its secrets: one line naming it, no stack trace", () => {
    const home = mkdtempSync(path.join(os.tmpdir(), "outpost-home-"));
    homes.push(home);
    mkdirSync(path.join(home, "admin-token")); // a directory where the admin token's file goes
    const res = npmStart(home);
    // (After the note that the Docker engine is unreachable, which npm start without --demo only warns about.)
    expect(res.stderr.trimEnd().split("\n").at(-1)).toBe(`outpost: cannot keep the development secrets in ${home} (EISDIR); point OUTPOST_HOME at a directory of your own`);
    expect(res.stderr).not.toMatch(/\n\s+at /); // no stack trace
    expect(res.status).toBe(2);
  });

  it("stops before starting anything at a file that belongs to someone else, leaving it as it is", () => {
    const { home, file } = oldHome(saved);
    if (process.getuid!() === 0) {
      chownSync(file, 65534, 65534); // as root: nobody's file
    } else {
      rmSync(file);
      symlinkSync("/etc/passwd", file); // root's file, reached through a link
    }
    const before = modeOf(file);
    const res = npmStart(home);
    expect(res.stderr).toMatch(
      new RegExp(`^outpost: ${file.replace(/[.]/g, "\\.")} is owned by uid \\d+, not by you \\(uid \\d+\\): refusing to use it; point OUTPOST_HOME at a directory of your own\\n$`),
    );
    expect(res.status).toBe(2);
    expect(modeOf(file)).toBe(before);
    expect(existsSync(path.join(home, "data"))).toBe(false);
  });
});

/** Whether a process runs (a zombie nobody reaped yet counts as gone). */
function alive(pid: number): boolean {
  try {
    return !/^State:\s+Z/m.test(readFileSync(`/proc/${pid}/status`, "utf8"));
  } catch {
    return false;
  }
}

async function until(what: string, check: () => boolean, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

function canBind(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = net.createServer();
    probe.once("error", () => resolve(false));
    probe.listen(port, "127.0.0.1", () => probe.close(() => resolve(true)));
  });
}

/** An HTTP server on loopback that answers /healthz like an Outpost service: a stale mesh, or a stranger. */
async function stranger(port = 0): Promise<{ port: number; close(): Promise<void> }> {
  const server = http.createServer((_req, res) => res.writeHead(200).end("ok\n"));
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, "127.0.0.1", () => resolve());
  });
  return {
    port: (server.address() as net.AddressInfo).port,
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}

/** A preload (NODE_OPTIONS --import) for a service process. */
const preload = (code: string) => `--import=data:text/javascript,${encodeURIComponent(code)}`;

describe("the mesh launcher", () => {
  const dirs: string[] = [];
  const cleanups: (() => Promise<void>)[] = [];
  const tempDir = () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "outpost-launcher-"));
    dirs.push(dir);
    return dir;
  };
  const meshOptions = (dir: string) => ({ dataDir: path.join(dir, "data"), logDir: path.join(dir, "logs"), adminToken: "a".repeat(64) });
  afterEach(async () => {
    for (const cleanup of cleanups.splice(0)) await cleanup();
    for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
  });

  it("refuses a port another process holds, naming it, instead of taking that process's /healthz for its own", async () => {
    const other = await stranger(await freePort());
    cleanups.push(() => other.close());
    const started = Date.now();
    const result = await startMesh({ ...meshOptions(tempDir()), only: ["tenant"], ports: { tenant: other.port } }).then(
      async (mesh) => {
        await mesh.stop();
        return "started";
      },
      (err: Error) => err.message,
    );
    expect(result).toMatch(new RegExp(`^tenant: port ${other.port} is already in use by another process that answers /healthz`));
    expect(Date.now() - started).toBeLessThan(5_000);
  });

  it("tells the process it started by the listening socket it holds", async () => {
    const other = await stranger();
    cleanups.push(() => other.close());
    expect(listensOn(process.pid, other.port)).toBe(true);
    const unused = await freePort();
    expect(listensOn(process.pid, unused)).toBe(false);
    const child = spawn("sleep", ["5"]);
    cleanups.push(async () => void child.kill());
    expect(listensOn(child.pid!, other.port)).toBe(false);
  });

  it("fails at once when a process is killed by a signal during start-up", async () => {
    const started = Date.now();
    const result = await startMesh({
      ...meshOptions(tempDir()),
      only: ["tenant"],
      serviceEnv: { tenant: { NODE_OPTIONS: preload("process.kill(process.pid, 'SIGKILL')") } },
    }).then(
      async (mesh) => {
        await mesh.stop();
        return "started";
      },
      (err: Error) => err.message,
    );
    expect(result).toMatch(/^tenant was killed by SIGKILL during start-up \(see .*tenant\.log\)$/);
    expect(Date.now() - started).toBeLessThan(10_000);
  });

  it("kills a process that does not exit within stop()'s deadline", async () => {
    // A service whose shutdown never ends: exiting does nothing and a timer keeps it alive.
    const mesh = await startMesh({
      ...meshOptions(tempDir()),
      only: ["tenant"],
      serviceEnv: { tenant: { NODE_OPTIONS: preload("process.exit = () => {}; setInterval(() => {}, 1000);") } },
    });
    const child = mesh.processes.get("tenant")!;
    cleanups.push(async () => void child.kill("SIGKILL"));
    const started = Date.now();
    await mesh.stop({ timeoutMs: 1_000 });
    expect(Date.now() - started).toBeLessThan(5_000);
    expect(child.signalCode).toBe("SIGKILL");
  });

  describe("when the process that started the mesh ends", () => {
    const parentScript = (dir: string) => {
      const file = path.join(dir, "parent.ts");
      writeFileSync(
        file,
        [
          `import { exitWithMesh, startMesh, type Mesh } from ${JSON.stringify(pathToFileURL(path.join(REPO_ROOT, "scripts/lib/mesh.ts")).href)};`,
          "const [mode, dir] = process.argv.slice(2) as [string, string];",
          "let mesh: Mesh | undefined = undefined;",
          "if (mode === 'handled') exitWithMesh(async () => void (await mesh?.stop()), { say: (line) => process.stderr.write(`${line}\\n`) });",
          "mesh = await startMesh({ dataDir: `${dir}/data`, logDir: `${dir}/logs`, adminToken: 'a'.repeat(64), only: ['tenant'] });",
          "process.stdout.write(`${mesh.processes.get('tenant')!.pid}\\n`);",
          "if (mode === 'throw') setTimeout(() => { throw new Error('a bug in the harness'); }, 100);",
          "else setInterval(() => {}, 1000);",
        ].join("\n"),
      );
      return file;
    };

    async function startParent(mode: string) {
      const dir = tempDir();
      const parent = spawn(process.execPath, ["--disable-warning=ExperimentalWarning", parentScript(dir), mode, dir], { cwd: REPO_ROOT, stdio: ["ignore", "pipe", "pipe"] });
      let stderr = "";
      parent.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
      const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => parent.once("exit", (code, signal) => resolve({ code, signal })));
      const pid = await new Promise<number>((resolve, reject) => {
        parent.stdout.once("data", (d: Buffer) => resolve(Number(d.toString().trim())));
        void exited.then(() => reject(new Error(`parent exited early: ${stderr}`)));
      });
      cleanups.push(async () => {
        parent.kill("SIGKILL");
        if (alive(pid)) process.kill(pid, "SIGKILL");
      });
      expect(alive(pid)).toBe(true);
      return { parent, pid, exited, stderr: () => stderr };
    }

    it("stops the services when it dies of an uncaught exception", async () => {
      const { pid, exited } = await startParent("throw");
      expect((await exited).code).toBe(1);
      await until(`service ${pid} to stop`, () => !alive(pid));
    });

    it("stops the services when it is killed outright (kill -9)", async () => {
      const { parent, pid, exited } = await startParent("plain");
      parent.kill("SIGKILL");
      await exited;
      await until(`service ${pid} to stop`, () => !alive(pid));
    });

    it("stops the services on SIGTERM and exits 128 + 15 (exitWithMesh)", async () => {
      const { parent, pid, exited, stderr } = await startParent("handled");
      parent.kill("SIGTERM");
      expect(await exited, stderr()).toEqual({ code: 143, signal: null });
      expect(alive(pid)).toBe(false);
    });
  });

  it("npm start fails naming a taken port and leaves no service behind", async () => {
    // The fixed ports must be free for this (as on CI); the test takes the tenant's.
    const others = (["gateway", "dispatcher", "executor", "telemetry"] as const).map((s) => DEFAULT_PORTS[s]);
    for (const port of [DEFAULT_PORTS.tenant, ...others]) expect(await canBind(port), `port ${port} is free`).toBe(true);
    const other = await stranger(DEFAULT_PORTS.tenant);
    cleanups.push(() => other.close());
    const home = tempDir();
    const started = Date.now();
    const res = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
      const child = spawn(process.execPath, ["--disable-warning=ExperimentalWarning", "scripts/start-mesh.ts"], {
        cwd: REPO_ROOT,
        env: { ...process.env, OUTPOST_HOME: home, DOCKER_HOST: `unix://${path.join(home, "no-docker.sock")}` },
        stdio: ["ignore", "ignore", "pipe"],
      });
      let stderr = "";
      child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
      child.once("exit", (code) => resolve({ code, stderr }));
      cleanups.push(async () => void child.kill("SIGKILL"));
    });
    expect(res.stderr).toMatch(new RegExp(`tenant: port ${DEFAULT_PORTS.tenant} is already in use by another process that answers /healthz`));
    expect(res.code).toBe(1);
    expect(Date.now() - started).toBeLessThan(30_000);
    for (const port of others) expect(await canBind(port), `port ${port} is free again`).toBe(true);
  });
});
