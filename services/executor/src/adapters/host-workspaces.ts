/**
 * Run directories on the executor's host (SPEC E1): `<runsDir>/<run>/workspace` is bind-mounted
 * at /workspace (so the repository checkout is there before the agent starts and the result
 * file outlives the container), `<run>/control` read-only at /run/outpost (a warm container's
 * start FIFO). Both belong to the container user. The Docker engine must see the same paths,
 * so the executor and its engine share a filesystem (the normal one-executor-per-host layout).
 */
import { execFile, spawn } from "node:child_process";
import { constants as fsConstants } from "node:fs";
import fs from "node:fs/promises";
import path from "node:path";
import { promisify } from "node:util";
import { CheckoutError, type RunFiles, type Workspaces } from "../core/ports.ts";
import { RESULT_RELATIVE_PATH } from "../core/run.ts";
import { isPlainHost, startCheckoutEgress, TUNNEL_PROXY_VARIABLE, writeTunnelCommand, type AllowedNetwork, type CheckoutEgress } from "./checkout-egress.ts";
import { diskUsageOf } from "./disk-usage.ts";

const execFileAsync = promisify(execFile);

export interface HostWorkspacesOptions {
  /** Absolute directory holding one directory per run. */
  runsDir: string;
  /** uid:gid of the container user. */
  uid: number;
  gid: number;
  /** URL schemes a repository may use; file: is left out by default (it would read the executor host's disk). */
  repoSchemes: ReadonlySet<string>;
  checkoutTimeoutMs: number;
  /**
   * Where a checkout may connect (checkout-egress.ts): `open` lets git reach whatever the host
   * reaches (and use the operator's proxy variables); otherwise public addresses and the networks
   * listed.
   */
  checkoutEgress: "open" | { allowedNetworks: readonly AllowedNetwork[] };
  /**
   * Whether the executor runs as root, so it can chown run directories to the container user;
   * otherwise, unless the container user is the executor's own (run.ts containerUserFor), it
   * makes them writable by everyone. Defaults to the process's own uid being 0.
   */
  asRoot?: boolean;
}

export function createHostWorkspaces(options: HostWorkspacesOptions): Workspaces {
  const runsDir = path.resolve(options.runsDir);
  const isRoot = options.asRoot ?? process.getuid?.() === 0;
  /** Agents run as the executor itself: what it makes is theirs already, and stays private. */
  const agentsAreUs = !isRoot && options.uid === process.getuid?.() && options.gid === process.getgid?.();

  const filesOf = (name: string): RunFiles => {
    if (!/^[a-z0-9][a-z0-9_.-]*$/.test(name)) throw new Error(`bad run name ${name}`);
    const root = path.join(runsDir, name);
    return { root, workspace: path.join(root, "workspace"), control: path.join(root, "control") };
  };

  /**
   * Hands a directory tree to the container user: root chowns it; an executor that is not root
   * cannot, so it makes the tree writable by everyone instead (the whole checked-out tree, not
   * just its top, or the agent could not change a checked-out file).
   */
  const giveToContainerUser = async (dir: string, recursive: boolean, signal?: AbortSignal) => {
    if (agentsAreUs) return;
    if (isRoot) {
      if (recursive) await execFileAsync("chown", ["-R", "--no-dereference", `${options.uid}:${options.gid}`, dir], { signal });
      else await fs.chown(dir, options.uid, options.gid);
    } else if (recursive) {
      await makeWritableByAll(dir, signal);
    } else {
      await fs.chmod(dir, 0o777);
    }
  };

  /** After the clone: the checked-out tree goes to the container user, within the checkout's deadline. */
  const giveWorkspace = async (files: RunFiles, timeout: AbortSignal, stop: AbortSignal, signal?: AbortSignal) => {
    try {
      await giveToContainerUser(files.workspace, true, stop);
    } catch (err) {
      if (timeout.aborted) throw new CheckoutInterrupted(`the checkout did not finish within its ${formatSeconds(options.checkoutTimeoutMs)} s`, { cause: err });
      if (stop.aborted) throw new CheckoutInterrupted("checkout stopped", { cause: signal?.reason ?? err });
      throw err; // the executor's own failure: its message names host paths (run.ts keeps it from the tenant)
    }
  };

  return {
    filesOf,

    async create(name) {
      const files = filesOf(name);
      await removeTree(files.root);
      await fs.mkdir(files.workspace, { recursive: true, mode: 0o700 });
      await fs.mkdir(files.control, { mode: 0o700 });
      await giveToContainerUser(files.workspace, false);
      await giveToContainerUser(files.control, false);
      return files;
    },

    async checkout(files, url, ref, signal) {
      let parsed: URL;
      try {
        parsed = new URL(url);
      } catch {
        throw new CheckoutError(`repository url is not a URL`);
      }
      // The URL parser drops tabs and newlines that git would keep (and hand to ssh as part of
      // the host): a URL with any whitespace or control character is not checked, it is refused.
      // eslint-disable-next-line no-control-regex -- matching control characters is the point
      if (/[\x00-\x20\x7f]/.test(url)) throw new CheckoutError("repository url contains whitespace or control characters");
      const scheme = parsed.protocol.replace(/:$/, "");
      if (!options.repoSchemes.has(scheme)) {
        throw new CheckoutError(`repository scheme ${scheme} is not allowed on this executor (allowed: ${[...options.repoSchemes].join(", ")})`);
      }
      const guard = options.checkoutEgress === "open" || scheme === "file" ? undefined : options.checkoutEgress;
      if (guard && !isPlainHost(parsed.hostname)) throw new CheckoutError("repository url's host is not a host name or an IP address");
      // git fetches a tenant's URL: it gets an empty HOME of its own (in the run directory, not
      // mounted into the container) and only the environment it needs, never the executor's.
      const home = path.join(files.root, "git-home");
      await fs.mkdir(home, { mode: 0o700 });
      let egress: CheckoutEgress | undefined;
      try {
        let env = gitEnvironment(home, options.repoSchemes, guard === undefined);
        if (guard) {
          egress = await startCheckoutEgress(guard.allowedNetworks);
          env = guardedGitEnvironment(env, egress.proxyUrl, await writeTunnelCommand(home));
        }
        // One deadline for the whole checkout; the caller's signal (a cancel, a lost lease, the
        // workspace over its disk quota) ends it at once as well.
        const timeout = AbortSignal.timeout(options.checkoutTimeoutMs);
        const stop = signal ? AbortSignal.any([signal, timeout]) : timeout;
        const git = async (step: GitStep, ...args: string[]): Promise<string> => {
          const config = [
            "-c", `protocol.file.allow=${options.repoSchemes.has("file") ? "always" : "never"}`,
            // The workspace belongs to the container user, not to the executor running git.
            "-c", `safe.directory=${files.workspace}`,
          ];
          const { code, stdout, stderr } = await runGit([...config, ...args], { cwd: files.workspace, env, signal: stop });
          if (timeout.aborted) throw new CheckoutInterrupted(`git did not finish within the checkout's ${formatSeconds(options.checkoutTimeoutMs)} s`);
          if (stop.aborted) throw new CheckoutInterrupted("checkout stopped", { cause: signal?.reason });
          if (code !== 0 && step === "fetch" && egress && egress.refusals.length > 0) throw refusedByGuard(egress);
          if (code !== 0 && step === "fetch" && egress?.couldNotConnect) {
            // Through the proxy, curl reports a name that does not resolve as the proxy's 502.
            throw new CheckoutError(COULD_NOT_CONNECT, { cause: gitFailure(step, stderr).cause });
          }
          if (code !== 0) throw gitFailure(step, stderr);
          return stdout;
        };
        await cloneAt(git, url, ref);
        await giveWorkspace(files, timeout, stop, signal);
      } finally {
        await egress?.close();
        await fs.rm(home, { recursive: true, force: true });
      }
    },

    async readResult(files, maxBytes) {
      try {
        return await readResultFile(files.workspace, maxBytes);
      } catch (err) {
        if (err instanceof ResultFileError) throw err;
        // A filesystem error's message names the executor's paths; the reason reaches the tenant.
        throw new ResultFileError(`${RESULT_RELATIVE_PATH} could not be read (${(err as NodeJS.ErrnoException).code ?? "error"})`, { cause: err });
      }
    },

    async recordClaim(files, claim) {
      await fs.writeFile(path.join(files.root, "claim.json"), JSON.stringify(claim), { mode: 0o600 });
    },

    async readClaim(files) {
      try {
        const claim = JSON.parse(await fs.readFile(path.join(files.root, "claim.json"), "utf8")) as { dispatchId?: unknown; leaseId?: unknown };
        return typeof claim.dispatchId === "string" && typeof claim.leaseId === "string"
          ? { dispatchId: claim.dispatchId, leaseId: claim.leaseId }
          : undefined;
      } catch {
        return undefined;
      }
    },

    async makeStartFifo(files) {
      const fifo = path.join(files.control, "start");
      await execFileAsync("mkfifo", ["-m", "0600", fifo]);
      if (isRoot) await fs.chown(fifo, options.uid, options.gid);
      else await fs.chmod(fifo, 0o666);
    },

    async writeStartFile(files, content, timeoutMs) {
      // The warm container blocks reading this FIFO. O_NONBLOCK makes an open without a reader
      // fail with ENXIO instead of hanging; that happens while the container's shell has not
      // opened the FIFO yet (a container joins the pool when its start returns, and its shell
      // opens the FIFO a moment later: longer under qemu), so it is tried again until the
      // deadline. A dead warm container thus costs `timeoutMs` before its lease goes back.
      const fifo = path.join(files.control, "start");
      const deadline = Date.now() + timeoutMs;
      let handle: fs.FileHandle;
      for (;;) {
        try {
          handle = await fs.open(fifo, fsConstants.O_WRONLY | fsConstants.O_NONBLOCK);
          break;
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== "ENXIO" || Date.now() >= deadline) throw err;
          await new Promise((r) => setTimeout(r, 10));
        }
      }
      try {
        const data = Buffer.from(content, "utf8");
        let offset = 0;
        while (offset < data.length) {
          try {
            const { bytesWritten } = await handle.write(data, offset);
            offset += bytesWritten;
          } catch (err) {
            if ((err as NodeJS.ErrnoException).code !== "EAGAIN" || Date.now() > deadline) throw err;
            await new Promise((r) => setTimeout(r, 5));
          }
        }
      } finally {
        await handle.close();
      }
    },

    async remove(files) {
      await removeTree(files.root);
    },

    diskUsage(files, stopAboveBytes, signal) {
      return diskUsageOf(files.workspace, stopAboveBytes, signal);
    },

    async listRuns() {
      try {
        return (await fs.readdir(runsDir, { withFileTypes: true })).filter((e) => e.isDirectory()).map((e) => e.name);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
        throw err;
      }
    },
  };
}

/** Why the result file was refused: said in the run's failure reason, so it names no host path. */
class ResultFileError extends Error {}

/**
 * Reads the agent's result file. The agent controlled the workspace, and the executor (often
 * root) must never read a host file through it, block on it, or read more than `maxBytes`:
 * - no symbolic link anywhere on the path (lstat of each part; O_NOFOLLOW on the file);
 * - opened with O_NONBLOCK, so a FIFO put there (before the check or swapped in after it) is
 *   never waited on: an open of a FIFO for reading blocks until a writer comes, holding one of
 *   libuv's few threads for ever; then the open file itself must be a regular file (fstat);
 * - the file opened must be the one at the expected path: a directory on the path swapped for
 *   a link between the checks and the open would make the open follow it (O_NOFOLLOW only
 *   covers the last part), so the descriptor's path (/proc/self/fd) is compared with it;
 * - at most `maxBytes` + 1 bytes are read, whatever the file's size says.
 * After the run's container was removed nothing writes the workspace any more; these checks
 * hold even if something did.
 */
async function readResultFile(workspace: string, maxBytes: number): Promise<string | undefined> {
  const parts = RESULT_RELATIVE_PATH.split("/");
  let current = workspace;
  for (let i = 0; i < parts.length; i++) {
    current = path.join(current, parts[i]!);
    let stat;
    try {
      stat = await fs.lstat(current);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw err;
    }
    const last = i === parts.length - 1;
    if (stat.isSymbolicLink()) throw new ResultFileError(`${RESULT_RELATIVE_PATH} must not be a symbolic link`);
    if (last && !stat.isFile()) throw new ResultFileError(`${RESULT_RELATIVE_PATH} is not a regular file`);
    if (!last && !stat.isDirectory()) return undefined;
    if (last && stat.size > maxBytes) throw new ResultFileError(`result is ${stat.size} bytes, more than the ${maxBytes} allowed`);
  }
  let handle: fs.FileHandle;
  try {
    handle = await fs.open(current, fsConstants.O_RDONLY | fsConstants.O_NOFOLLOW | fsConstants.O_NONBLOCK | fsConstants.O_NOCTTY);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ELOOP") throw new ResultFileError(`${RESULT_RELATIVE_PATH} must not be a symbolic link`, { cause: err });
    if (code === "ENOENT" || code === "ENOTDIR") throw new ResultFileError(`${RESULT_RELATIVE_PATH} changed while it was read`, { cause: err });
    throw err;
  }
  try {
    const stat = await handle.stat();
    if (!stat.isFile()) throw new ResultFileError(`${RESULT_RELATIVE_PATH} is not a regular file`);
    if (!(await isOpenAt(handle, workspace, current))) throw new ResultFileError(`${RESULT_RELATIVE_PATH} must not be reached through a symbolic link`);
    const buffer = Buffer.alloc(Math.min(maxBytes, stat.size) + 1);
    let bytesRead = 0;
    for (;;) {
      const { bytesRead: got } = await handle.read(buffer, bytesRead, buffer.length - bytesRead, bytesRead);
      bytesRead += got;
      if (got === 0 || bytesRead === buffer.length) break;
    }
    if (bytesRead > maxBytes) throw new ResultFileError(`result is more than the ${maxBytes} bytes allowed`);
    if (bytesRead > stat.size) throw new ResultFileError(`${RESULT_RELATIVE_PATH} changed while it was read`);
    return buffer.subarray(0, bytesRead).toString("utf8");
  } finally {
    await handle.close();
  }
}

/**
 * Whether an open descriptor is the file at `expected` (under `root`, whose own path is the
 * executor's): the kernel names the file it opened in /proc/self/fd. Where there is no /proc
 * (not Linux), the file at the expected path, reached without following links at its last
 * part, must be the same inode.
 */
async function isOpenAt(handle: fs.FileHandle, root: string, expected: string): Promise<boolean> {
  const wanted = path.join(await fs.realpath(root), path.relative(root, expected));
  try {
    return (await fs.readlink(`/proc/self/fd/${handle.fd}`)) === wanted;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
  }
  const [opened, there] = await Promise.all([handle.stat(), fs.lstat(wanted)]);
  return opened.dev === there.dev && opened.ino === there.ino;
}

/**
 * Removes a run directory. fs.rm names every path in full and fails past PATH_MAX, which an
 * agent reaches with relative mkdirs; rm(1) walks relative to open directories and removes it.
 */
async function removeTree(dir: string): Promise<void> {
  try {
    await fs.rm(dir, { recursive: true, force: true });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENAMETOOLONG") throw err;
    await execFileAsync("rm", ["-rf", "--", dir]);
  }
}

const CHMOD_BATCH = 64;

/**
 * `chmod -R a+rwX` without following symbolic links: every directory gets rwx for all, every
 * file rw for all (and x for all when it had any x bit); links are left alone (chmod on a link
 * would change what it points to, and the repository is the tenant's: a link may name any host
 * path). Entries are judged by lstat, and only real directories are entered. Runs on a checkout
 * the executor just made, before any container exists, so nothing swaps an entry meanwhile.
 */
export async function makeWritableByAll(root: string, signal?: AbortSignal): Promise<void> {
  const widen = async (entry: string): Promise<boolean> => {
    const stat = await fs.lstat(entry);
    if (stat.isSymbolicLink()) return false;
    const mode = stat.mode & 0o7777;
    const wanted = stat.isDirectory() || (mode & 0o111) !== 0 ? mode | 0o777 : mode | 0o666;
    if (wanted !== mode) await fs.chmod(entry, wanted);
    return stat.isDirectory();
  };
  if (!(await widen(root))) return;
  const dirs = [root];
  while (dirs.length > 0) {
    signal?.throwIfAborted();
    const dir = dirs.pop()!;
    const entries = (await fs.readdir(dir)).map((name) => path.join(dir, name));
    for (let i = 0; i < entries.length; i += CHMOD_BATCH) {
      const batch = entries.slice(i, i + CHMOD_BATCH);
      const isDir = await Promise.all(batch.map(widen));
      batch.forEach((entry, j) => {
        if (isDir[j]) dirs.push(entry);
      });
    }
  }
}

/** Variables of the executor's environment git may see: what it needs to find its programs and trust servers. */
const PASSED_TO_GIT = ["PATH", "SSL_CERT_FILE", "SSL_CERT_DIR"];
/** And, when the checkout is not guarded, the proxies the operator set up (a guarded checkout has its own). */
const PROXY_VARIABLES = ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"];
const SSH_COMMAND = "ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -o IdentityFile=/dev/null -o IdentityAgent=none";

/**
 * git's environment for a checkout (the URL is the tenant's): an empty HOME and no system or
 * global config (no operator gitconfig, credential helpers or url rewrites), no prompts, ssh
 * with no agent, no keys and no user or system ssh config, only the allowed transports (also for
 * redirects and submodules) — and nothing else of the executor's environment, so
 * OUTPOST_SIGNING_KEY, OUTPOST_ADMIN_TOKEN, SSH_AUTH_SOCK and the like never reach git or
 * what it runs.
 */
export function gitEnvironment(home: string, repoSchemes: ReadonlySet<string>, operatorProxies: boolean): Record<string, string> {
  const env: Record<string, string> = {};
  for (const name of operatorProxies ? [...PASSED_TO_GIT, ...PROXY_VARIABLES] : PASSED_TO_GIT) {
    const value = process.env[name];
    if (value !== undefined) env[name] = value;
  }
  env.PATH ??= "/usr/local/bin:/usr/bin:/bin";
  return {
    ...env,
    HOME: home,
    XDG_CONFIG_HOME: home,
    GIT_CONFIG_NOSYSTEM: "1",
    GIT_CONFIG_GLOBAL: "/dev/null",
    // Never prompt for credentials: a private repository without them fails at once.
    GIT_TERMINAL_PROMPT: "0",
    GIT_ASKPASS: "true",
    SSH_ASKPASS: "true",
    GIT_SSH_COMMAND: SSH_COMMAND,
    GIT_ALLOW_PROTOCOL: [...repoSchemes].join(":"),
    LC_ALL: "C",
  };
}

/**
 * A guarded checkout's environment: every transport goes through the checkout's proxy — http(s)
 * by `http.proxy`, git:// by `core.gitProxy` and ssh by its ProxyCommand, both the tunnel
 * command. Given as GIT_CONFIG_* variables rather than `-c` arguments, so the proxy's credential
 * is not on a command line other users of the host can read.
 */
function guardedGitEnvironment(env: Record<string, string>, proxyUrl: string, tunnelCommand: string): Record<string, string> {
  const config = [
    ["http.proxy", proxyUrl],
    ["http.proxyAuthMethod", "basic"],
    ["core.gitProxy", tunnelCommand],
  ];
  return {
    ...env,
    ...Object.fromEntries(config.flatMap(([key, value], i) => [[`GIT_CONFIG_KEY_${i}`, key!], [`GIT_CONFIG_VALUE_${i}`, value!]])),
    GIT_CONFIG_COUNT: String(config.length),
    // ssh runs ProxyCommand with a shell: %h is safe because the host was checked (isPlainHost).
    // %% keeps a % in the path from being read as one of ssh's tokens.
    GIT_SSH_COMMAND: `${SSH_COMMAND} -o "ProxyCommand='${tunnelCommand.replaceAll("%", "%%")}' %h %p"`,
    [TUNNEL_PROXY_VARIABLE]: proxyUrl,
  };
}

/** A fetch the guard stopped: the tenant is told so; which destination, and why, is the executor's log's. */
function refusedByGuard(egress: CheckoutEgress): CheckoutError {
  const detail = egress.refusals.map((r) => `${r.host}:${r.port} ${r.reason}`).join("; ");
  return new CheckoutError("the repository's address (or a redirect's) is on a network this executor does not reach: loopback, private, link-local or reserved", {
    cause: new Error(`checkout egress guard refused ${detail}`.slice(0, 600)),
  });
}

/** Clones `url` into the (empty) workspace, then moves to `ref` (default branch when empty). */
async function cloneAt(git: (step: GitStep, ...args: string[]) => Promise<string>, url: string, ref: string): Promise<void> {
  await git("fetch", "clone", "--quiet", "--no-checkout", "--", url, ".");
  if (ref) {
    // The ref is the tenant's text: it is only ever read as a revision, after --end-of-options
    // (`git checkout --detach` refuses --end-of-options, at least up to git 2.39), and the checkout is given
    // the commit id it names, so a ref like "--force" or "--orphan=x" is never an option.
    let commit: string;
    try {
      commit = (await git("local", "rev-parse", "--verify", "--quiet", "--end-of-options", `${ref}^{commit}`)).trim();
    } catch (err) {
      // A deadline or a stop is said as such, not as a ref that does not exist.
      if (err instanceof CheckoutInterrupted) throw err;
      throw new CheckoutError(`ref ${JSON.stringify(ref.slice(0, 256))} is not a branch, tag or commit of the repository`, { cause: err });
    }
    if (!/^[0-9a-f]{40}([0-9a-f]{24})?$/.test(commit)) throw new CheckoutError(`ref ${JSON.stringify(ref.slice(0, 256))} did not name one commit`);
    await git("local", "checkout", "--quiet", "--detach", commit);
  } else {
    await git("local", "checkout", "--quiet");
  }
}

/** The checkout ran past its deadline or was stopped (cancel, lost lease, disk quota). */
class CheckoutInterrupted extends CheckoutError {}

/** `fetch`: git talks to the repository's server (the tenant's URL); `local`: it works on what it fetched. */
type GitStep = "fetch" | "local";

const MAX_GIT_STDOUT = 1024 * 1024;
const MAX_GIT_STDERR = 64 * 1024;

/**
 * Runs git in a process group of its own and, when `signal` aborts, SIGKILLs the whole group:
 * git clone leaves the transfer to children (the remote helper, index-pack) that would go on
 * writing a pack into the workspace after git itself was killed. Resolves once git's output
 * pipes closed, after the group is killed (so nothing git started is left writing); more than
 * 1 MiB on stdout kills it as well.
 */
/**
 * Process groups of the git commands running now. git runs detached (a group of its own, so an
 * abort can kill what it started), which also means it would outlive the executor: when the
 * executor exits (SIGTERM past its grace, a crash) the groups still running are killed, or a
 * clone from a server that never answers would go on for ever writing into a run directory.
 */
const runningGitGroups = new Set<number>();
let killGroupsOnExit = false;

function killGroup(pid: number): void {
  try {
    process.kill(-pid, "SIGKILL");
  } catch {
    // Gone already.
  }
}

export function runGit(
  args: string[],
  options: { cwd: string; env: Record<string, string>; signal: AbortSignal },
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn("git", args, { cwd: options.cwd, env: options.env, detached: true, stdio: ["ignore", "pipe", "pipe"] });
    if (!killGroupsOnExit) {
      killGroupsOnExit = true;
      process.once("exit", () => runningGitGroups.forEach(killGroup));
    }
    if (child.pid !== undefined) runningGitGroups.add(child.pid);
    const stdout: Buffer[] = [];
    let stdoutBytes = 0;
    let stderr = "";
    const killGroupNow = () => {
      if (child.pid !== undefined) killGroup(child.pid);
    };
    child.stdout.on("data", (chunk: Buffer) => {
      stdoutBytes += chunk.length;
      if (stdoutBytes > MAX_GIT_STDOUT) killGroupNow();
      else stdout.push(chunk);
    });
    // The tail: git's own verdict (fatal:/error:) comes last, after whatever the server sent.
    child.stderr.on("data", (chunk: Buffer) => {
      stderr = (stderr + chunk.toString("utf8")).slice(-MAX_GIT_STDERR);
    });
    if (options.signal.aborted) killGroupNow();
    options.signal.addEventListener("abort", killGroupNow, { once: true });
    child.once("error", (err) => {
      options.signal.removeEventListener("abort", killGroupNow);
      if (child.pid !== undefined) runningGitGroups.delete(child.pid);
      reject(err);
    });
    child.once("close", (code) => {
      options.signal.removeEventListener("abort", killGroupNow);
      // Whatever git started and left behind goes with it.
      killGroupNow();
      if (child.pid !== undefined) runningGitGroups.delete(child.pid);
      resolve({ code: stdoutBytes > MAX_GIT_STDOUT ? 1 : code, stdout: Buffer.concat(stdout).toString("utf8"), stderr });
    });
  });
}

/**
 * The reason a tenant is given for a failed git step. What git says while fetching is about the
 * server at the tenant's URL, which may be inside the executor's network (a metadata service, an
 * internal port): echoed, it would make the checkout a probe reporting what answers where and
 * how (curl's messages carry addresses, ports and timings; a server's "remote:" lines are its
 * own text). So a fetch failure is told as one of a few fixed kinds; git's own line goes only to
 * the executor's log (the error's cause). What git says about the checked-out tree (a path the
 * filesystem refuses) is about the repository itself: its first line is kept, cut short.
 */
export function gitFailure(step: GitStep, stderr: string): CheckoutError {
  const lines = stderr.split("\n").map((l) => l.trim()).filter(Boolean);
  const verdict = lines.find((l) => /^(fatal|error):/.test(l)) ?? lines.at(-1) ?? "git failed without a message";
  const cause = new Error(verdict.slice(0, 300));
  if (step === "local") return new CheckoutError(verdict.slice(0, 200), { cause });
  // Quoted parts are the tenant's (the URL, a path): they must not decide the kind.
  const said = lines
    .filter((l) => !/^remote:/i.test(l))
    .join("\n")
    .replace(/'[^'\n]*'/g, "''");
  const kind = GIT_FETCH_FAILURES.find(([pattern]) => pattern.test(said))?.[1] ?? "git could not fetch the repository";
  return new CheckoutError(kind, { cause });
}

const COULD_NOT_CONNECT = "could not connect to the repository's server";

/** The kinds of fetch failure a tenant is told, the first that matches (gitFailure). */
const GIT_FETCH_FAILURES: ReadonlyArray<readonly [RegExp, string]> = [
  [/not allowed/i, "the repository (or a redirect from it) uses a transport this executor does not allow"],
  [/host key verification failed/i, "the repository's ssh host key could not be verified"],
  [/could not resolve/i, COULD_NOT_CONNECT],
  [/certificate|ssl_connect|ssl connect|gnutls|handshake/i, "the repository's server could not be verified (TLS)"],
  [
    /authentication failed|could not read (username|password)|terminal prompts disabled|error: 40[13]\b|permission denied|access denied/i,
    "the repository needs credentials (private repositories are not supported)",
  ],
  // Before "not found": ssh follows its own connection failure with git's "Could not read from
  // remote repository", which alone means the repository was not found.
  [/failed to connect|couldn't connect|connection refused|timed out|unreachable|no route to host|connect to host|proxy/i, COULD_NOT_CONNECT],
  [
    /not found|does not appear to be a git repository|is this a git repository|does not exist|error: 404\b|could not read from remote repository/i,
    "the repository was not found, or the URL does not serve a git repository",
  ],
  [/error: [45]\d\d\b/i, "the repository's server answered with an error"],
  [/early eof|hung up|unexpected disconnect|rpc failed|connection reset|broken pipe|recv failure|send failure|empty reply/i, "the transfer from the repository's server broke off"],
];

function formatSeconds(ms: number): string {
  return ms % 1000 === 0 ? String(ms / 1000) : (ms / 1000).toFixed(1);
}
