/** Repository checkout on the host (host-workspaces.ts) against a real git repository on disk; no Docker. */
import { spawn } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import type net from "node:net";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { createHostWorkspaces, gitFailure, runGit } from "../src/adapters/host-workspaces.ts";
import { parseAllowedNetworks } from "../src/adapters/checkout-egress.ts";
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

/** The executor's default: public addresses only. */
const GUARDED = { allowedNetworks: [] };
/** The slow server below is on loopback, which an operator would have to allow. */
const LOOPBACK_ALLOWED = { allowedNetworks: parseAllowedNetworks("127.0.0.0/8") };

// file: is allowed here only so the test needs no server; executors leave it out by default.
const workspaces = () =>
  createHostWorkspaces({ runsDir: path.join(base, "runs"), uid: 65534, gid: 65534, repoSchemes: new Set(["file"]), checkoutTimeoutMs: 30_000, checkoutEgress: GUARDED });

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
      runsDir: path.join(base, "runs"), uid: 65534, gid: 65534, repoSchemes: new Set(["file"]), checkoutTimeoutMs: 30_000, asRoot: false, checkoutEgress: GUARDED,
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

    const ws = createHostWorkspaces({ runsDir: path.join(base, "runs"), uid: 65534, gid: 65534, repoSchemes: new Set(["file", "ssh"]), checkoutTimeoutMs: 30_000, checkoutEgress: GUARDED });
    const rewritten = await ws.create("run-rewrite");
    await expect(ws.checkout(rewritten, fake, "")).rejects.toBeInstanceOf(CheckoutError);

    const overSsh = await ws.create("run-ssh");
    await expect(ws.checkout(overSsh, "ssh://git.example.invalid/acme/repo.git", "")).rejects.toBeInstanceOf(CheckoutError);
    const saw = fs.readFileSync(dump, "utf8");
    expect(saw).not.toMatch(/^(OUTPOST_|SSH_AUTH_SOCK=)/m);
    expect(saw).not.toContain(signingEnv("executor").OUTPOST_SIGNING_KEY);
    expect(saw).not.toContain(operatorHome);
    expect(saw).toMatch(/^ARGS -F \/dev\/null -o BatchMode=yes -o IdentitiesOnly=yes -o IdentityFile=\/dev\/null -o IdentityAgent=none /m);
    // ssh connects only through the checkout's guard.
    expect(saw).toMatch(/^ARGS .* -o ProxyCommand='[^']*\/git-home\/checkout-tunnel' %h %p /m);
    expect(saw).toMatch(/^GIT_CONFIG_NOSYSTEM=1$/m);
    expect(saw).toMatch(/^GIT_CONFIG_GLOBAL=\/dev\/null$/m);
    // The checkout's HOME was its own, and it is gone.
    expect(fs.existsSync(path.join(overSsh.root, "git-home"))).toBe(false);
  });
});

describe("what a tenant is told when git cannot fetch (gitFailure)", () => {
  // git 2.39's own stderr (LC_ALL=C, as the executor runs it), captured against local servers
  // and unreachable addresses; the hosts and ports are those a probe of the executor's network
  // would name: the metadata service, private addresses, internal host names.
  const sshEpilogue = "fatal: Could not read from remote repository.\n\nPlease make sure you have the correct access rights\nand the repository exists.\n";
  const cases: Array<[string, string, string]> = [
    ["https, port closed", "fatal: unable to access 'https://10.0.0.7:8443/x.git/': Failed to connect to 10.0.0.7 port 8443 after 0 ms: Couldn't connect to server\n", "could not connect to the repository's server"],
    ["http, metadata service", "fatal: unable to access 'http://169.254.169.254/latest/meta-data/': Failed to connect to 169.254.169.254 port 80 after 3001 ms: Timeout was reached\n", "could not connect to the repository's server"],
    ["http, name not resolved", "fatal: unable to access 'http://vault.internal.corp/x.git/': Could not resolve host: vault.internal.corp\n", "could not connect to the repository's server"],
    ["git://, port closed", "fatal: unable to connect to 10.0.0.7:\n10.0.0.7[0: 10.0.0.7]: errno=Connection refused\n\n", "could not connect to the repository's server"],
    ["ssh, port closed", `ssh: connect to host 10.0.0.7 port 2222: Connection refused\r\n${sshEpilogue}`, "could not connect to the repository's server"],
    ["ssh, filtered", `Connection timed out during banner exchange\r\nConnection to 10.0.0.7 port 22 timed out\r\n${sshEpilogue}`, "could not connect to the repository's server"],
    ["ssh, name not resolved", `ssh: Could not resolve hostname db.internal.corp: Name or service not known\r\n${sshEpilogue}`, "could not connect to the repository's server"],
    ["ssh, unknown host key", `Host key verification failed.\r\n${sshEpilogue}`, "the repository's ssh host key could not be verified"],
    ["ssh, key refused", `git@10.0.0.7: Permission denied (publickey).\r\n${sshEpilogue}`, "the repository needs credentials (private repositories are not supported)"],
    ["https, not TLS on that port", "fatal: unable to access 'https://10.0.0.7:6379/x.git/': gnutls_handshake() failed: An unexpected TLS packet was received.\n", "the repository's server could not be verified (TLS)"],
    ["https, untrusted certificate", "fatal: unable to access 'https://10.0.0.7:8443/x.git/': server certificate verification failed. CAfile: /etc/ssl/certs/ca-certificates.crt CRLfile: none\n", "the repository's server could not be verified (TLS)"],
    ["http 401", "fatal: Authentication failed for 'http://10.0.0.7:8080/x.git/'\n", "the repository needs credentials (private repositories are not supported)"],
    ["http 403", "fatal: unable to access 'http://10.0.0.7:8080/x.git/': The requested URL returned error: 403\n", "the repository needs credentials (private repositories are not supported)"],
    ["no prompt", "fatal: could not read Username for 'https://git.internal.corp': terminal prompts disabled\n", "the repository needs credentials (private repositories are not supported)"],
    ["http 404", "fatal: repository 'http://10.0.0.7:8080/x.git/' not found\n", "the repository was not found, or the URL does not serve a git repository"],
    ["server's own words", "remote: Not Found: no such project on gitlab-7f3.internal (10.0.0.7)\nfatal: repository 'https://10.0.0.7/x.git/' not found\n", "the repository was not found, or the URL does not serve a git repository"],
    ["http 500", "fatal: unable to access 'http://10.0.0.7:9200/x.git/': The requested URL returned error: 500\n", "the repository's server answered with an error"],
    ["connection reset", "fatal: unable to access 'http://10.0.0.7:5432/x.git/': Recv failure: Connection reset by peer\n", "the transfer from the repository's server broke off"],
    ["git://, reset", "fatal: read error: Connection reset by peer\n", "the transfer from the repository's server broke off"],
    ["transport refused", "fatal: transport 'file' not allowed\n", "the repository (or a redirect from it) uses a transport this executor does not allow"],
    ["nothing said", "", "git could not fetch the repository"],
  ];

  it.each(cases)("%s: a fixed reason, git's line only in the cause", (_name, stderr, reason) => {
    const err = gitFailure("fetch", stderr);
    expect(err).toBeInstanceOf(CheckoutError);
    expect(err.message).toBe(reason);
    // Nothing of the address, port or name the tenant's URL (or the server) gave away.
    for (const probe of ["10.0.0.7", "169.254", "internal", "8443", "2222", "6379", "5432", "9200", "http"]) expect(err.message).not.toContain(probe);
    // The operator's log still has git's verdict (run.ts logs the cause).
    const verdict = stderr.split("\n").map((l) => l.trim()).find((l) => /^(fatal|error):/.test(l));
    if (verdict) expect((err.cause as Error).message).toBe(verdict);
  });

  it("does not let the tenant's URL pick the reason (quoted parts are not read)", () => {
    // The URL's own text says "not allowed", "certificate" and "not found"; git says the port was closed.
    const err = gitFailure("fetch", "fatal: unable to access 'http://10.0.0.7:1/not allowed/certificate/not found.git/': Failed to connect to 10.0.0.7 port 1 after 0 ms: Couldn't connect to server\n");
    expect(err.message).toBe("could not connect to the repository's server");
  });

  it("keeps the first line of what git says about the checked-out tree, cut short", () => {
    const err = gitFailure("local", `error: unable to create file ${"d/".repeat(200)}x: File name too long\nfatal: cannot create directory\n`);
    expect(err.message.startsWith("error: unable to create file d/d/")).toBe(true);
    expect(err.message.length).toBe(200);
  });
});

describe("git's processes (runGit)", () => {
  const alive = (pid: number) => {
    try {
      process.kill(pid, 0);
    } catch {
      return false;
    }
    // Dead but not reaped (its parent, git, was killed with it) counts as dead.
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z";
  };

  it("kills git and everything it started when its signal aborts, and resolves only then", async () => {
    const dir = fs.mkdtempSync(path.join(base, "rungit-"));
    const pidFile = path.join(dir, "pid");
    const controller = new AbortController();
    // An alias runs through a shell git waits for: a child of git that holds git's pipes open,
    // as git-remote-https and index-pack do during a clone.
    const running = runGit(["-c", `alias.hang=!echo $$ > '${pidFile}'; exec sleep 30`, "hang"], {
      cwd: dir,
      env: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
      signal: controller.signal,
    });
    await vi.waitFor(() => expect(fs.readFileSync(pidFile, "utf8").trim()).toMatch(/^\d+$/), { timeout: 5000, interval: 20 });
    const grandchild = Number(fs.readFileSync(pidFile, "utf8"));
    expect(alive(grandchild)).toBe(true);
    const aborted = Date.now();
    controller.abort();
    const result = await running;
    expect(Date.now() - aborted).toBeLessThan(2000);
    expect(result.code).not.toBe(0);
    expect(alive(grandchild)).toBe(false);
  });

  it("kills git's process group when the executor's process exits with git still running", async () => {
    const dir = fs.mkdtempSync(path.join(base, "rungit-"));
    const pidFile = path.join(dir, "pid");
    // A process that starts a git that hangs, then exits as the executor does past its grace.
    const module = path.resolve(import.meta.dirname, "../src/adapters/host-workspaces.ts");
    const hang = `alias.hang=!echo $$ > '${pidFile}'; exec sleep 30`;
    const file = path.join(dir, "executor.ts");
    fs.writeFileSync(
      file,
      `import fs from "node:fs";
import { runGit } from ${JSON.stringify(module)};
void runGit(["-c", ${JSON.stringify(hang)}, "hang"], { cwd: ${JSON.stringify(dir)}, env: { PATH: process.env.PATH }, signal: new AbortController().signal });
const started = () => { try { return /^[0-9]+$/.test(fs.readFileSync(${JSON.stringify(pidFile)}, "utf8").trim()); } catch { return false; } };
const wait = () => (started() ? process.exit(0) : setTimeout(wait, 20));
wait();
`,
    );
    const exited = await new Promise<number | null>((resolve) => spawn(process.execPath, [file], { stdio: "ignore" }).once("exit", resolve));
    expect(exited).toBe(0);
    const grandchild = Number(fs.readFileSync(pidFile, "utf8"));
    await vi.waitFor(() => expect(alive(grandchild)).toBe(false), { timeout: 2000, interval: 20 });
  });

  it("does not start at all when its signal has already aborted", async () => {
    const dir = fs.mkdtempSync(path.join(base, "rungit-"));
    const marker = path.join(dir, "ran");
    const result = await runGit(["-c", `alias.touch=!sleep 0.5; touch '${marker}'`, "touch"], {
      cwd: dir,
      env: { PATH: process.env.PATH ?? "/usr/bin:/bin" },
      signal: AbortSignal.abort(),
    });
    expect(result.code).not.toBe(0);
    await new Promise((resolve) => setTimeout(resolve, 700));
    expect(fs.existsSync(marker)).toBe(false);
  });
});

describe("a checkout from a server that never answers", () => {
  let server: http.Server;
  let url: string;
  const open = new Set<net.Socket>();
  const requests: string[] = [];

  beforeAll(async () => {
    // Takes git's first request and never answers: a git server that hangs, or a port that
    // accepts and says nothing.
    server = http.createServer((req) => void requests.push(req.url ?? ""));
    server.on("connection", (socket) => {
      open.add(socket);
      socket.on("close", () => open.delete(socket));
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    url = `http://127.0.0.1:${(server.address() as net.AddressInfo).port}/slow/repo.git`;
  });

  afterAll(async () => {
    for (const socket of open) socket.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });

  /** Processes whose command line names the server's URL: git and its remote helper. */
  const gitProcessesFor = (text: string) =>
    fs.readdirSync("/proc").filter((entry) => {
      if (!/^\d+$/.test(entry)) return false;
      try {
        return fs.readFileSync(`/proc/${entry}/cmdline`, "utf8").includes(text);
      } catch {
        return false; // gone meanwhile
      }
    });

  const httpWorkspaces = (checkoutTimeoutMs: number) =>
    createHostWorkspaces({ runsDir: path.join(base, "runs"), uid: 65534, gid: 65534, repoSchemes: new Set(["http"]), checkoutTimeoutMs, asRoot: false, checkoutEgress: LOOPBACK_ALLOWED });

  it("ends at the checkout's deadline, with nothing of git left running or connected", async () => {
    const ws = httpWorkspaces(800);
    const files = await ws.create("run-deadline");
    const before = requests.length;
    const started = Date.now();
    const err = await ws.checkout(files, url, "main").catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CheckoutError);
    expect((err as Error).message).toBe("git did not finish within the checkout's 0.8 s");
    expect(Date.now() - started).toBeLessThan(5000);
    expect(requests.length).toBeGreaterThan(before); // git was waiting on this server
    expect(gitProcessesFor(url)).toEqual([]);
    await vi.waitFor(() => expect(open.size).toBe(0), { timeout: 2000 });
  });

  it("ends at once when it is cancelled mid-way, with nothing of git left running or connected", async () => {
    const ws = httpWorkspaces(60_000);
    const files = await ws.create("run-cancel");
    const controller = new AbortController();
    const before = requests.length;
    const checkingOut = ws.checkout(files, url, "main", controller.signal).catch((e: unknown) => e);
    await vi.waitFor(() => expect(requests.length).toBeGreaterThan(before), { timeout: 5000, interval: 20 });
    expect(gitProcessesFor(url).length).toBeGreaterThan(0);
    const cancelled = Date.now();
    controller.abort(new Error("cancelled"));
    const err = await checkingOut;
    expect(Date.now() - cancelled).toBeLessThan(2000);
    expect(err).toBeInstanceOf(CheckoutError);
    expect((err as Error).message).toBe("checkout stopped");
    expect(gitProcessesFor(url)).toEqual([]);
    await vi.waitFor(() => expect(open.size).toBe(0), { timeout: 2000 });
    // Its HOME went with it.
    expect(fs.existsSync(path.join(files.root, "git-home"))).toBe(false);
  });
});

describe("the warm start FIFO (writeStartFile)", () => {
  it("waits for the warm container's shell to open the FIFO: ENXIO until then is tried again", async () => {
    const ws = workspaces();
    const files = await ws.create("run-fifo-late-reader");
    await ws.makeStartFifo(files);
    const fifo = path.join(files.control, "start");
    const content = "export OUTPOST_TASK='hello'\n".repeat(4000); // more than a pipe holds (64 KiB)
    const started = Date.now();
    const writing = ws.writeStartFile(files, content, 5000);
    // The reader comes late, as a warm container's shell does (later still under qemu).
    await new Promise((resolve) => setTimeout(resolve, 300));
    const reader = spawn("cat", [fifo], { stdio: ["ignore", "pipe", "inherit"] });
    const chunks: Buffer[] = [];
    reader.stdout.on("data", (chunk: Buffer) => chunks.push(chunk));
    const closed = new Promise((resolve) => reader.on("close", resolve));
    await writing;
    await closed;
    expect(Buffer.concat(chunks).toString("utf8")).toBe(content);
    expect(Date.now() - started).toBeGreaterThanOrEqual(300);
  });

  it("gives up with ENXIO at its deadline when nothing ever reads (the warm container died)", async () => {
    const ws = workspaces();
    const files = await ws.create("run-fifo-no-reader");
    await ws.makeStartFifo(files);
    const started = Date.now();
    const err = await ws.writeStartFile(files, "export A='1'\n", 300).catch((e: unknown) => e);
    expect((err as NodeJS.ErrnoException).code).toBe("ENXIO");
    expect(Date.now() - started).toBeGreaterThanOrEqual(300);
    expect(Date.now() - started).toBeLessThan(2000);
  });
});
