/**
 * The checkout's egress guard (checkout-egress.ts): which addresses a checkout may reach, and
 * real git checkouts through it over http, https, git:// and ssh against servers on loopback
 * (the stand-in for an internal service the executor's host reaches). No Docker.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import dns from "node:dns/promises";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { isPlainHost, isReachable, parseAllowedNetworks, startCheckoutEgress } from "../src/adapters/checkout-egress.ts";
import { createHostWorkspaces, type HostWorkspacesOptions } from "../src/adapters/host-workspaces.ts";
import { executorConfigShape } from "../src/config.ts";
import { CheckoutError } from "../src/core/ports.ts";
import { git, makeTwoCommitRepo } from "./git-fixture.ts";

const REFUSED = "the repository's address (or a redirect's) is on a network this executor does not reach: loopback, private, link-local or reserved";

describe("which addresses a checkout may reach (isReachable)", () => {
  const refused = [
    "127.0.0.1", "127.255.0.9", "::1", // loopback
    "10.0.0.7", "172.16.0.1", "172.31.255.254", "192.168.1.1", // RFC 1918
    "169.254.169.254", "fe80::1", // link-local: the cloud metadata service
    "100.64.0.1", // shared address space (carrier-grade NAT)
    "fd00::1", "fc00::1", // unique local
    "0.0.0.0", "::", "255.255.255.255", "224.0.0.1", "ff02::1", // unspecified, broadcast, multicast
    "192.0.2.1", "198.18.0.1", "240.0.0.1", // documentation, benchmarking, reserved
    "::ffff:127.0.0.1", "::ffff:10.0.0.7", "::ffff:169.254.169.254", // IPv4-mapped
    "64:ff9b::7f00:1", "2002:7f00:1::1", "2001:0:7f00:1::1", // NAT64, 6to4, Teredo
    "::7f00:1", // IPv4-compatible (deprecated): outside 2000::/3
    "not an address", "",
  ];
  const reachable = ["93.184.215.14", "140.82.121.3", "1.1.1.1", "::ffff:140.82.121.3", "2606:4700::6810:84e5", "2a00:1450:4001:80b::200e"];

  it.each(refused)("refuses %j", (address) => expect(isReachable(address, [])).toBe(false));
  it.each(reachable)("lets %j through", (address) => expect(isReachable(address, [])).toBe(true));

  it("lets an allowed network through, and only that network", () => {
    const allowed = parseAllowedNetworks("10.20.0.0/16, fd12:3456::/32");
    expect(isReachable("10.20.3.4", allowed)).toBe(true);
    expect(isReachable("::ffff:10.20.3.4", allowed)).toBe(true);
    expect(isReachable("fd12:3456::9", allowed)).toBe(true);
    expect(isReachable("10.21.0.1", allowed)).toBe(false);
    expect(isReachable("fd12:3457::9", allowed)).toBe(false);
    expect(isReachable("127.0.0.1", allowed)).toBe(false);
  });
});

describe("OUTPOST_EXECUTOR_CHECKOUT_ALLOWED_NETWORKS", () => {
  const parse = (value: string | undefined) => executorConfigShape.OUTPOST_EXECUTOR_CHECKOUT_ALLOWED_NETWORKS.safeParse(value);

  it("is empty by default and takes comma-separated CIDRs", () => {
    expect(parse(undefined)).toMatchObject({ success: true, data: [] });
    const parsed = parse("10.0.0.0/8,192.168.4.0/24 , fd00::/8");
    expect(parsed.success).toBe(true);
    expect(parsed.data!.map(([network, bits]) => `${network.toString()}/${bits}`)).toEqual(["10.0.0.0/8", "192.168.4.0/24", "fd00::/8"]);
  });

  it.each(["10.0.0.0", "10.0.0.0/33", "10.0.0/8", "git.internal/24", "fd00::/129"])("refuses %j, naming the entry", (value) => {
    const parsed = parse(value);
    expect(parsed.success).toBe(false);
    expect(parsed.error!.issues[0]!.message).toBe(`${JSON.stringify(value)} is not a network in CIDR notation (like 10.20.0.0/16 or fd00::/8)`);
  });
});

describe("hosts handed to ssh's ProxyCommand (isPlainHost)", () => {
  it.each(["github.com", "git.internal_corp.example", "10.0.0.7", "[::1]", "[2001:db8::1]"])("takes %j", (host) => expect(isPlainHost(host)).toBe(true));
  it.each(["a$(id)b", "a;b", "a`id`", "a'b", "-oProxyCommand=x", "[not-v6]", "a b", ""])("refuses %j", (host) => expect(isPlainHost(host)).toBe(false));
});

describe("the checkout's proxy", () => {
  const connect = (port: number, request: string) =>
    new Promise<{ answer: string; socket: net.Socket }>((resolve, reject) => {
      const socket = net.connect(port, "127.0.0.1", () => socket.write(request));
      socket.once("error", reject);
      socket.once("data", (chunk: Buffer) => resolve({ answer: chunk.toString("latin1"), socket }));
    });
  let echo: net.Server;
  let echoPort: number;

  beforeAll(async () => {
    echo = net.createServer((socket) => socket.pipe(socket));
    await new Promise<void>((resolve) => echo.listen(0, "127.0.0.1", resolve));
    echoPort = (echo.address() as net.AddressInfo).port;
  });
  afterAll(() => new Promise<void>((resolve) => echo.close(() => resolve())));

  it("answers only its own credential: 407 without it or with another", async () => {
    const egress = await startCheckoutEgress(parseAllowedNetworks("127.0.0.0/8"));
    try {
      const { port, username, password } = new URL(egress.proxyUrl);
      const basic = (user: string, pass: string) => Buffer.from(`${user}:${pass}`).toString("base64");
      for (const auth of ["", `Proxy-Authorization: Basic ${basic(username, "0".repeat(password.length))}\r\n`, `Proxy-Authorization: Basic ${basic(username, password)}x\r\n`]) {
        const { answer, socket } = await connect(Number(port), `CONNECT 127.0.0.1:${echoPort} HTTP/1.1\r\n${auth}\r\n`);
        socket.destroy();
        expect(answer).toMatch(/^HTTP\/1\.1 407 /);
      }
      const plain = await fetch(`http://127.0.0.1:${port}/`, { headers: {} }).catch(() => undefined);
      expect(plain?.status ?? 407).toBe(407);
      expect(egress.refusals).toEqual([]);
    } finally {
      await egress.close();
    }
  });

  it("refuses a CONNECT to loopback unless allowed, records why, and tunnels to an allowed address", async () => {
    for (const [allowed, expected] of [["", 403], ["127.0.0.0/8", 200]] as const) {
      const egress = await startCheckoutEgress(parseAllowedNetworks(allowed));
      try {
        const { port, username, password } = new URL(egress.proxyUrl);
        const auth = Buffer.from(`${username}:${password}`).toString("base64");
        const { answer, socket } = await connect(Number(port), `CONNECT localhost:${echoPort} HTTP/1.1\r\nProxy-Authorization: Basic ${auth}\r\n\r\n`);
        expect(answer).toMatch(new RegExp(`^HTTP/1\\.1 ${expected} `));
        if (expected === 200) {
          const echoed = new Promise<string>((resolve) => socket.once("data", (chunk: Buffer) => resolve(chunk.toString())));
          socket.write("ping");
          expect(await echoed).toBe("ping");
          expect(egress.refusals).toEqual([]);
          // Closing the proxy cuts a tunnel still open.
          const closed = new Promise((resolve) => socket.once("close", resolve));
          await egress.close();
          await closed;
        } else {
          socket.destroy();
          expect(egress.refusals).toEqual([{ host: "localhost", port: echoPort, reason: expect.stringMatching(/^resolves only to addresses this executor does not reach \(.*127\.0\.0\.1/) }]);
        }
      } finally {
        await egress.close();
      }
    }
  });
});

describe("the checkout's proxy when the checkout ends mid-way", () => {
  it("connects nowhere once closed, even when a lookup answers after the close", async () => {
    let accepted = 0;
    const target = net.createServer((socket) => {
      accepted++;
      socket.destroy();
    });
    await new Promise<void>((resolve) => target.listen(0, "127.0.0.1", resolve));
    const targetPort = (target.address() as net.AddressInfo).port;
    // A slow authoritative DNS server: the answer comes after git was killed and the proxy closed.
    const lookup = vi.spyOn(dns, "lookup").mockImplementation((async () => {
      await new Promise((resolve) => setTimeout(resolve, 300));
      return [{ address: "127.0.0.1", family: 4 }];
    }) as never);
    try {
      const egress = await startCheckoutEgress(parseAllowedNetworks("127.0.0.0/8"));
      const { port, username, password } = new URL(egress.proxyUrl);
      const client = net.connect(Number(port), "127.0.0.1");
      client.on("error", () => {});
      client.write(`CONNECT slow.example:${targetPort} HTTP/1.1\r\nProxy-Authorization: Basic ${Buffer.from(`${username}:${password}`).toString("base64")}\r\n\r\n`);
      await vi.waitFor(() => expect(lookup).toHaveBeenCalled());
      await egress.close();
      await new Promise((resolve) => setTimeout(resolve, 600));
      expect(accepted).toBe(0);
      client.destroy();
    } finally {
      lookup.mockRestore();
      await new Promise((resolve) => target.close(resolve));
    }
  });
});

describe("checkouts through the guard (real git against servers on loopback)", () => {
  let base: string;
  let internal: http.Server;
  let internalPort: number;
  /** Connections the "internal" server (127.0.0.1) accepted: what a refused checkout must not make. */
  let internalConnections = 0;
  let redirector: http.Server;
  let redirectorPort: number;
  let gitDaemon: ChildProcess | undefined;
  let daemonPort: number;

  const listen = async (server: net.Server, host: string) => {
    await new Promise<void>((resolve) => server.listen(0, host, resolve));
    return (server.address() as net.AddressInfo).port;
  };

  beforeAll(async () => {
    base = fs.mkdtempSync(path.join(os.tmpdir(), "outpost-guard-"));
    const { bare } = makeTwoCommitRepo(base);
    git(bare, "update-server-info"); // git's "dumb" http protocol: the repository served as files
    // A static file server: the internal git server a tenant's URL must not reach.
    internal = http.createServer((req, res) => {
      const file = path.join(base, decodeURIComponent(new URL(req.url ?? "/", "http://x").pathname));
      if (!file.startsWith(`${bare}/`) || !fs.existsSync(file) || !fs.statSync(file).isFile()) return void res.writeHead(404).end();
      res.writeHead(200, { "content-type": "application/octet-stream" }).end(fs.readFileSync(file));
    });
    internal.on("connection", () => internalConnections++);
    internalPort = await listen(internal, "127.0.0.1");
    // Another address on loopback that redirects to the internal server.
    redirector = http.createServer((req, res) => res.writeHead(301, { location: `http://127.0.0.1:${internalPort}${req.url}` }).end());
    redirectorPort = await listen(redirector, "127.0.0.2");

    const probe = net.createServer();
    daemonPort = await listen(probe, "127.0.0.1");
    await new Promise((resolve) => probe.close(resolve));
    gitDaemon = spawn("git", ["daemon", "--reuseaddr", "--export-all", `--base-path=${base}`, "--listen=127.0.0.1", `--port=${daemonPort}`, base], { stdio: "ignore" });
    const deadline = Date.now() + 15_000;
    for (;;) {
      try {
        execFileSync("git", ["ls-remote", `git://127.0.0.1:${daemonPort}/project.git`], { stdio: "ignore" });
        break;
      } catch (err) {
        if (Date.now() > deadline) throw err;
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
  });

  afterAll(async () => {
    gitDaemon?.kill();
    internal.closeAllConnections();
    redirector.closeAllConnections();
    await Promise.all([internal, redirector].map((s) => new Promise((resolve) => s.close(resolve))));
    fs.rmSync(base, { recursive: true, force: true });
  });

  let runs = 0;
  const checkout = async (url: string, checkoutEgress: HostWorkspacesOptions["checkoutEgress"]) => {
    const ws = createHostWorkspaces({
      runsDir: path.join(base, "runs"),
      uid: 65534,
      gid: 65534,
      repoSchemes: new Set(["https", "http", "ssh", "git"]),
      checkoutTimeoutMs: 30_000,
      asRoot: false,
      checkoutEgress,
    });
    const files = await ws.create(`run-${++runs}`);
    await ws.checkout(files, url, "");
    return fs.readFileSync(path.join(files.workspace, "version.txt"), "utf8");
  };
  const failureOf = (url: string, checkoutEgress: HostWorkspacesOptions["checkoutEgress"]) =>
    checkout(url, checkoutEgress).then(
      () => undefined,
      (err: unknown) => err as CheckoutError,
    );

  it("refuses loopback, private and metadata addresses over every transport, before anything connects", async () => {
    const urls = [
      `http://127.0.0.1:${internalPort}/project.git`,
      `http://localhost:${internalPort}/project.git`,
      `http://[::ffff:127.0.0.1]:${internalPort}/project.git`,
      `https://127.0.0.1:${internalPort}/project.git`, // a CONNECT tunnel
      `git://127.0.0.1:${internalPort}/project.git`, // git's core.gitProxy: the tunnel command
      `ssh://git@127.0.0.1:${internalPort}/project.git`, // ssh's ProxyCommand: the tunnel command
      "http://169.254.169.254/latest/meta-data/",
      "http://10.0.0.7/project.git",
      "http://[::1]/project.git",
      // Other spellings of loopback: WHATWG URL turns http's into 127.0.0.1; git:// keeps them as
      // written, and the proxy's getaddrinfo reads them as an address.
      `http://0x7f.1:${internalPort}/project.git`,
      `git://2130706433:${internalPort}/project.git`,
      `git://0177.0.0.1:${internalPort}/project.git`,
    ];
    const before = internalConnections;
    for (const url of urls) {
      const err = await failureOf(url, { allowedNetworks: [] });
      expect(err, url).toBeInstanceOf(CheckoutError);
      expect(err!.message, url).toBe(REFUSED);
      // What was refused and why is the executor's log's (the error's cause), not the tenant's.
      expect((err!.cause as Error).message, url).toMatch(/^checkout egress guard refused .+:\d+ resolves only to addresses this executor does not reach/);
    }
    expect(internalConnections).toBe(before);
  });

  it("checks a redirect like the first request: an allowed address redirecting to loopback is refused", async () => {
    const before = internalConnections;
    const err = await failureOf(`http://127.0.0.2:${redirectorPort}/project.git`, { allowedNetworks: parseAllowedNetworks("127.0.0.2/32") });
    expect(err?.message).toBe(REFUSED);
    expect((err!.cause as Error).message).toContain(`127.0.0.1:${internalPort}`);
    expect(internalConnections).toBe(before);
  });

  it("clones from an allowed network over http and git:// (through the proxy and the tunnel command)", async () => {
    const allowed = { allowedNetworks: parseAllowedNetworks("127.0.0.1/32") };
    const before = internalConnections;
    expect(await checkout(`http://127.0.0.1:${internalPort}/project.git`, allowed)).toBe("two");
    expect(internalConnections).toBeGreaterThan(before);
    expect(await checkout(`git://127.0.0.1:${daemonPort}/project.git`, allowed)).toBe("two");
    // Following an allowed redirect to an allowed address works too.
    expect(await checkout(`http://127.0.0.2:${redirectorPort}/project.git`, { allowedNetworks: parseAllowedNetworks("127.0.0.0/8") })).toBe("two");
  });

  it("reaches loopback with the guard off (the control: the refusals above are the guard's)", async () => {
    expect(await checkout(`http://127.0.0.1:${internalPort}/project.git`, "open")).toBe("two");
    expect(await checkout(`git://127.0.0.1:${daemonPort}/project.git`, "open")).toBe("two");
  });

  it("survives a server answering a status Node cannot write (000), and fails that checkout", async () => {
    const hostile = net.createServer((socket) => {
      socket.once("data", () => socket.end("HTTP/1.1 000 X\r\ncontent-length: 0\r\n\r\n"));
      socket.on("error", () => {});
    });
    const port = await listen(hostile, "127.0.0.3");
    try {
      const err = await failureOf(`http://127.0.0.3:${port}/project.git`, { allowedNetworks: parseAllowedNetworks("127.0.0.3/32") });
      expect(err).toBeInstanceOf(CheckoutError);
      expect(err!.message).toBe("the repository's server answered with an error");
    } finally {
      await new Promise((resolve) => hostile.close(resolve));
    }
  });

  it("says it could not connect when the name does not resolve, over every transport", async () => {
    for (const url of ["http://nonexistent.invalid/project.git", "https://nonexistent.invalid/project.git", "git://nonexistent.invalid/project.git"]) {
      const err = await failureOf(url, { allowedNetworks: [] });
      expect(err?.message, url).toBe("could not connect to the repository's server");
    }
  });

  it("refuses a URL with whitespace or control characters, which the URL parser would drop and git would keep", async () => {
    for (const url of ["ssh://x\ntouch\tPWNED\n/project.git", "http://example.com/a b.git", "git://exa\rmple.com/x"]) {
      const err = await failureOf(url, { allowedNetworks: [] });
      expect(err?.message, JSON.stringify(url)).toBe("repository url contains whitespace or control characters");
    }
  });

  it("refuses a host ssh's shell would read as a command, before git runs", async () => {
    const before = runs;
    for (const url of ["ssh://a$(id)b/project.git", "ssh://a;id/project.git", "git://a`id`b/project.git"]) {
      const err = await failureOf(url, { allowedNetworks: [] });
      expect(err?.message, url).toBe("repository url's host is not a host name or an IP address");
      expect(err?.cause, url).toBeUndefined(); // refused by the check, not by git
    }
    expect(runs).toBe(before + 3);
  });
});
