/**
 * `npm start`: brings the five processes up on loopback on embedded defaults (SQLite files
 * under ~/.outpost/data or $OUTPOST_HOME/data, no Redis or MongoDB needed), provisions a development tenant, writes
 * its key where the CLI finds it, and prints the next command. `npm run demo` (--demo) also
 * runs one dispatch of the demo agent, follows its output, and shuts the mesh down. With --tls
 * the services talk mutual TLS to each other, with a CA and certificates under
 * $OUTPOST_HOME/tls (docs/operations.md, "Internal TLS"); the gateway's public port stays plain
 * HTTP on loopback, so the CLI needs nothing more.
 */
import { randomBytes } from "node:crypto";
import { readFileSync, existsSync, chmodSync } from "node:fs";
import { spawnSync } from "node:child_process";
import path from "node:path";
import Docker from "dockerode";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  CredentialsError,
  outpostClients,
  outpostHome,
  readDevCredentials,
  runCli,
  tightenDevCredentials,
  writeDevCredentials,
  devCredentialsPath,
  ensurePrivateDir,
  writePrivateFile,
  type DevCredentials,
} from "@outpost/cli";
import { DEFAULT_PORTS, exitWithMesh, REPO_ROOT, SERVICES, startMesh, type Mesh } from "./lib/mesh.ts";
import { makeTlsCerts } from "./lib/tls-certs.ts";

const DEMO_IMAGE = "outpost/demo-agent:latest";
const demo = process.argv.includes("--demo");
const internalTls = process.argv.includes("--tls");
const home = outpostHome();

function say(line: string) {
  process.stderr.write(`${line}\n`);
}

// Before anything can fail: Ctrl-C (exit 0, the usual way to stop `npm start`), SIGTERM, SIGHUP,
// or an error anywhere below stops every service process started so far (even mid start-up)
// instead of leaving them holding the fixed ports; the mesh processes also stop by themselves
// when this process is killed outright (scripts/lib/mesh.ts).
let mesh: Mesh | undefined = undefined;
const shutdown = exitWithMesh(async () => void (await mesh?.stop()), { say: (line) => say(`outpost: ${line}`), signalExitCode: 0 });

/**
 * Secrets that must stay the same across restarts of the development mesh: 0600 files in a
 * 0700 ~/.outpost or $OUTPOST_HOME (files an older version left with the umask's mode are tightened on read).
 */
function devSecret(name: string): string {
  ensurePrivateDir(home);
  const file = path.join(home, name);
  if (existsSync(file)) {
    chmodSync(file, 0o600);
    return readFileSync(file, "utf8").trim();
  }
  const value = randomBytes(32).toString("hex");
  writePrivateFile(file, `${value}\n`);
  return value;
}

async function checkDocker(): Promise<boolean> {
  const docker = new Docker();
  try {
    await docker.ping();
  } catch {
    say(
      [
        `outpost: the Docker engine is not reachable at ${process.env.DOCKER_HOST ?? "/var/run/docker.sock"}, so runs cannot start.`,
        "  Install and start it (Debian/Ubuntu, as root):  bash scripts/setup-docker.sh",
        "  (that is: apt-get install docker.io qemu-user-static binfmt-support; dockerd &; update-binfmts --enable qemu-aarch64)",
      ].join("\n"),
    );
    return false;
  }
  try {
    await docker.getImage(DEMO_IMAGE).inspect();
  } catch {
    say(`outpost: building the demo agent image ${DEMO_IMAGE} (offline, from Debian's busybox-static:arm64)…`);
    const built = spawnSync("bash", [path.join(REPO_ROOT, "test/fixtures/agents/build.sh")], { stdio: "inherit" });
    if (built.status !== 0) {
      say("outpost: building the demo agent image failed; see above");
      return false;
    }
  }
  return true;
}

/**
 * The credentials an earlier `npm start` wrote, read before anything starts. The README's
 * migration note points OUTPOST_HOME at an old checkout's .outpost, whose file an older version
 * left readable by others: one of the user's own is tightened to 0600 (its directory to 0700),
 * like the secrets above. One that is not JSON or belongs to someone else ends npm start with
 * one line naming the file and what to do, exit 2.
 */
async function savedCredentials(): Promise<Partial<DevCredentials>> {
  try {
    tightenDevCredentials();
    return readDevCredentials();
  } catch (err) {
    if (!(err instanceof CredentialsError)) throw err;
    say(`outpost: ${err.message}`);
    return await shutdown(2);
  }
}

const saved = await savedCredentials();
const dockerReady = await checkDocker();
if (demo && !dockerReady) await shutdown(1);

/**
 * The development secrets, kept in the home across restarts. A home that cannot hold them (not a
 * directory, another user's, read-only) ends npm start with one line saying so, exit 2, before
 * anything starts, rather than a stack trace.
 */
async function devSecrets(): Promise<{ adminToken: string; masterKey: string }> {
  try {
    return { adminToken: devSecret("admin-token"), masterKey: devSecret("secrets-master-key") };
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === undefined) throw err;
    say(`outpost: cannot keep the development secrets in ${home} (${code}); point OUTPOST_HOME at a directory of your own`);
    return await shutdown(2);
  }
}

const { adminToken, masterKey } = await devSecrets();
const tlsDir = path.join(home, "tls");
// The CA is made once and kept there; the certificates are issued anew at each start.
const tls = internalTls ? { certs: makeTlsCerts(tlsDir, SERVICES, { caName: "Outpost development CA" }) } : undefined;
mesh = await startMesh({
  tls,
  dataDir: path.join(home, "data"),
  logDir: path.join(home, "logs"),
  // Secrets at rest are encrypted under this development master key (key id "dev").
  serviceEnv: { tenant: { OUTPOST_SECRETS_MASTER_KEYS: `dev:${Buffer.from(masterKey, "hex").toString("base64")}` } },
  adminToken,
  ports: DEFAULT_PORTS,
});
const gatewayUrl = mesh.urls.gateway;

// Reuse the development tenant's key while it still works; otherwise provision a new tenant.
let apiKey = saved.apiKey;
if (apiKey) {
  try {
    await outpostClients(gatewayUrl, apiKey).agents.listAgents({});
  } catch (err) {
    if (!(err instanceof ConnectError && err.code === Code.Unauthenticated)) throw err;
    apiKey = undefined;
  }
}
if (!apiKey) {
  const created = await outpostClients(gatewayUrl, adminToken).tenants.createTenant({
    name: "Development",
    contactEmail: "dev@localhost.localdomain",
  });
  apiKey = created.apiKeyPlaintext;
  writeDevCredentials({ gatewayUrl, apiKey, adminToken, tenantId: created.tenant!.id });
}

say(`outpost: mesh up — gateway ${gatewayUrl} (Connect, gRPC, gRPC-Web); logs in ${path.join(home, "logs")}`);
say(`outpost: development key stored in ${devCredentialsPath()}`);
if (tls) say(`outpost: services talk mutual TLS to each other (CA and certificates in ${tlsDir})`);
if (demo) {
  const command = ["dispatch", "--agent", "demo", "--task", "say hello from an arm64 container", "--follow"];
  say(`outpost: running: outpost ${command.join(" ")}`);
  const code = await runCli(command, { out: process.stdout, err: process.stderr, env: process.env });
  await shutdown(code);
} else {
  say("outpost: next, in another terminal:\n");
  say(`  npx outpost dispatch --agent demo --task "hello exit=0" --follow\n`);
  say("outpost: Ctrl-C stops the mesh");
}
