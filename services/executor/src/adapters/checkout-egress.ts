/**
 * The checkout's egress guard. `git` fetches a tenant's `repo.url` on the executor's host, in
 * the executor's network, before any container exists, so the container's egress rules do not
 * apply to it: unguarded, a URL naming 127.0.0.1, 10.x or 169.254.169.254 would have the
 * executor clone from (or probe) services only the host can reach.
 *
 * Every connection git (or the ssh and git:// transports it runs) makes goes through a forward
 * proxy started for that one checkout, on 127.0.0.1 with a random credential. The proxy resolves
 * each destination once, refuses it unless an address is public (or on a network the operator
 * allowed) and connects to exactly the address it checked, so a name that resolves to a public
 * address when checked and a private one a moment later (DNS rebinding) cannot get through, and
 * a redirect is checked like the first request, since it is another request through the proxy.
 */
import { randomBytes, timingSafeEqual } from "node:crypto";
import dns from "node:dns/promises";
import fs from "node:fs/promises";
import http from "node:http";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import ipaddr from "ipaddr.js";

type Address = ipaddr.IPv4 | ipaddr.IPv6;
/** A network the operator lets checkouts reach although it is not public (an internal git server). */
export type AllowedNetwork = readonly [Address, number];

/** Parses `OUTPOST_EXECUTOR_CHECKOUT_ALLOWED_NETWORKS`: comma-separated CIDRs; throws naming the entry that is not one. */
export function parseAllowedNetworks(text: string): AllowedNetwork[] {
  return text
    .split(",")
    .map((entry) => entry.trim())
    .filter(Boolean)
    .map((entry) => {
      const address = entry.split("/")[0]!;
      // ipaddr.js also reads inet_aton's short and hex forms ("10.0.0/8" as 10.0.0.0/8): an
      // operator who wrote one most likely meant something else.
      const loose = ipaddr.IPv4.isValid(address) && !ipaddr.IPv4.isValidFourPartDecimal(address);
      try {
        if (!loose) return ipaddr.parseCIDR(entry);
      } catch {
        // said below
      }
      throw new Error(`${JSON.stringify(entry)} is not a network in CIDR notation (like 10.20.0.0/16 or fd00::/8)`);
    });
}

// IPv6 global unicast; ipaddr.js calls everything outside its special ranges "unicast", which
// would include IPv4-compatible addresses like ::7f00:1.
const IPV6_GLOBAL_UNICAST = ipaddr.parseCIDR("2000::/3");

/**
 * Whether a checkout may connect to `address` (an IP literal): a public unicast address, or one
 * on an allowed network. Refused: loopback, private (RFC 1918, unique local), link-local (the
 * cloud metadata address 169.254.169.254), shared (100.64/10), unspecified, multicast, broadcast,
 * reserved and documentation ranges, and IPv6 forms that carry an IPv4 address (mapped,
 * NAT64, 6to4, Teredo) unless the IPv4 address inside is itself allowed (mapped only).
 */
export function isReachable(address: string, allowed: readonly AllowedNetwork[]): boolean {
  let parsed: Address;
  try {
    // process() turns ::ffff:127.0.0.1 into 127.0.0.1, so the mapped form is judged as IPv4.
    parsed = ipaddr.process(address);
  } catch {
    return false;
  }
  if (allowed.some(([network, bits]) => network.kind() === parsed.kind() && parsed.match(network, bits))) return true;
  if (parsed.range() !== "unicast") return false;
  return parsed.kind() === "ipv4" || parsed.match(IPV6_GLOBAL_UNICAST);
}

/** A destination the guard refused, for the executor's log (the host is the tenant's text). */
export interface Refusal {
  host: string;
  port: number;
  reason: string;
}

export interface CheckoutEgress {
  /** The proxy's URL with its credential, for git's `http.proxy` and the tunnel helper. */
  proxyUrl: string;
  /** Destinations refused so far. */
  readonly refusals: readonly Refusal[];
  /** Whether a destination did not resolve, or did not accept the connection. */
  readonly couldNotConnect: boolean;
  /** Stops the proxy and cuts every connection through it. */
  close(): Promise<void>;
}

const PROXY_USER = "outpost";
/** Refusals kept per checkout (for the log); any one is enough to say why the fetch failed. */
const MAX_REFUSALS = 16;

/** Starts the forward proxy of one checkout. */
export async function startCheckoutEgress(allowed: readonly AllowedNetwork[]): Promise<CheckoutEgress> {
  const token = randomBytes(24).toString("hex");
  const expectedAuth = Buffer.from(`Basic ${Buffer.from(`${PROXY_USER}:${token}`).toString("base64")}`);
  const refusals: Refusal[] = [];
  /** Set when a destination did not resolve or did not accept the connection. */
  let couldNotConnect = false;
  /** Once the checkout is over nothing connects any more, even a lookup that answers late. */
  let closed = false;
  const sockets = new Set<net.Socket>();
  const track = (socket: net.Socket) => {
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
  };

  const authorized = (req: http.IncomingMessage): boolean => {
    const given = Buffer.from(req.headers["proxy-authorization"] ?? "");
    return given.length === expectedAuth.length && timingSafeEqual(given, expectedAuth);
  };

  /** The one address to connect to, or undefined (a refusal, or a name that does not resolve, recorded) when there is none. */
  const resolve = async (host: string, port: number): Promise<string | undefined> => {
    const refuse = (reason: string) => {
      if (refusals.length < MAX_REFUSALS) refusals.push({ host: host.slice(0, 256), port, reason });
      return undefined;
    };
    if (!Number.isInteger(port) || port < 1 || port > 65535) return refuse("not a port");
    const literal = host.startsWith("[") && host.endsWith("]") ? host.slice(1, -1) : host;
    let addresses: string[];
    if (net.isIP(literal)) {
      addresses = [literal];
    } else {
      try {
        addresses = (await dns.lookup(literal, { all: true, verbatim: true })).map((a) => a.address);
      } catch {
        couldNotConnect = true; // not a refusal: the name does not resolve
        return undefined;
      }
    }
    const reachable = addresses.find((a) => isReachable(a, allowed));
    return reachable ?? refuse(`resolves only to addresses this executor does not reach (${addresses.join(", ")})`);
  };

  const server = http.createServer();
  server.on("connection", track);

  // CONNECT host:port: https, and the tunnels of the ssh and git:// transports (checkout-tunnel.mjs).
  server.on("connect", (req: http.IncomingMessage, client: net.Socket, head: Buffer) => {
    let upstream: net.Socket | undefined;
    client.on("error", () => client.destroy());
    client.once("close", () => upstream?.destroy());
    const answer = (status: string) => client.end(`HTTP/1.1 ${status}\r\nConnection: close\r\n\r\n`);
    if (!authorized(req)) return answer('407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="checkout"');
    const target = /^(\[[0-9a-fA-F:.]+\]|[^:[\]]+):(\d{1,5})$/.exec(req.url ?? "");
    if (!target) return answer("400 Bad Request");
    void resolve(target[1]!, Number(target[2])).then((address) => {
      if (closed || client.destroyed) return;
      if (!address) return answer(couldNotConnect ? "502 Bad Gateway" : "403 Forbidden");
      const socket = net.connect({ host: address, port: Number(target[2]) });
      upstream = socket;
      track(socket);
      let connected = false;
      socket.once("error", () => {
        if (connected) return client.destroy();
        couldNotConnect = true;
        answer("502 Bad Gateway");
      });
      socket.once("connect", () => {
        connected = true;
        client.write("HTTP/1.1 200 Connection Established\r\n\r\n");
        if (head.length > 0) socket.write(head);
        socket.pipe(client);
        client.pipe(socket);
        socket.once("close", () => client.destroy());
      });
    });
  });

  // Absolute-form requests: plain http, which curl sends to a proxy without a tunnel.
  server.on("request", (req: http.IncomingMessage, res: http.ServerResponse) => {
    let upstream: http.ClientRequest | undefined;
    res.once("close", () => upstream?.destroy());
    const fail = (status: number) => {
      req.resume();
      if (res.headersSent) return void res.destroy();
      res.writeHead(status, { connection: "close" });
      res.end();
    };
    if (!authorized(req)) {
      req.resume();
      return void res.writeHead(407, { "proxy-authenticate": 'Basic realm="checkout"', connection: "close" }).end();
    }
    let url: URL;
    try {
      url = new URL(req.url ?? "");
    } catch {
      return fail(400);
    }
    if (url.protocol !== "http:") return fail(400);
    const port = url.port ? Number(url.port) : 80;
    void resolve(url.hostname, port).then((address) => {
      if (closed || res.destroyed) return;
      if (!address) return fail(couldNotConnect ? 502 : 403);
      const headers = { ...req.headers };
      delete headers["proxy-authorization"];
      delete headers["proxy-connection"];
      const outgoing = http.request({ host: address, port, method: req.method, path: `${url.pathname}${url.search}`, headers, agent: false });
      upstream = outgoing;
      outgoing.on("socket", track);
      outgoing.once("error", () => {
        if (!outgoing.socket || outgoing.socket.connecting) couldNotConnect = true;
        fail(502);
      });
      outgoing.once("response", (answer) => {
        answer.on("error", () => res.destroy());
        // The server is the tenant's: a status Node cannot write (000, 099) must not throw here.
        const status = answer.statusCode ?? 0;
        if (status < 100 || status > 599) {
          answer.destroy();
          return fail(502);
        }
        try {
          res.writeHead(status, answer.rawHeaders);
        } catch {
          answer.destroy();
          return fail(502);
        }
        answer.pipe(res);
      });
      req.pipe(outgoing);
    });
  });

  await new Promise<void>((ready, fail) => {
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => ready());
  });
  // Listening: a failed accept (EMFILE) is the checkout's failure, not the executor's crash.
  server.on("error", () => {});
  const { port } = server.address() as net.AddressInfo;
  return {
    proxyUrl: `http://${PROXY_USER}:${token}@127.0.0.1:${port}`,
    refusals,
    get couldNotConnect() {
      return couldNotConnect;
    },
    close: () =>
      new Promise<void>((done) => {
        closed = true;
        server.close(() => done());
        for (const socket of sockets) socket.destroy();
      }),
  };
}

/** The tunnel helper git's `core.gitProxy` and ssh's `ProxyCommand` run (see checkout-tunnel.mjs). */
const TUNNEL_HELPER = path.join(path.dirname(fileURLToPath(import.meta.url)), "checkout-tunnel.mjs");
/** The environment variable through which the helper learns the proxy's URL. */
export const TUNNEL_PROXY_VARIABLE = "CHECKOUT_TUNNEL_PROXY";

/**
 * Writes the executable git and ssh run to open a connection (`<script> <host> <port>`, the
 * connection on its stdin and stdout): git wants a program, not a shell line, for core.gitProxy.
 * Returns its path.
 */
export async function writeTunnelCommand(dir: string): Promise<string> {
  const script = path.join(dir, "checkout-tunnel");
  // The script's own path goes into ssh's ProxyCommand in single quotes, inside the double quotes
  // of GIT_SSH_COMMAND, which a shell reads: none of the characters either kind of quote gives
  // meaning to.
  const quote = (text: string) => {
    // eslint-disable-next-line no-control-regex -- matching control characters is the point
    if (/['"$`\\\x00-\x1f\x7f]/.test(text)) throw new Error(`path ${JSON.stringify(text)} has a quote, $, backquote, backslash or control character`);
    return `'${text}'`;
  };
  quote(script);
  await fs.writeFile(script, `#!/bin/sh\nexec ${quote(process.execPath)} ${quote(TUNNEL_HELPER)} "$@"\n`, { mode: 0o700 });
  return script;
}

/**
 * A host name git may hand to ssh or to the tunnel helper: DNS labels or an IP literal. ssh
 * puts `%h` into its ProxyCommand, which a shell runs, so anything else is refused before git
 * starts (`ssh://a$(id)b/x` is a valid URL).
 */
export function isPlainHost(hostname: string): boolean {
  if (hostname.startsWith("[") && hostname.endsWith("]")) return net.isIPv6(hostname.slice(1, -1));
  return /^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$/.test(hostname);
}
