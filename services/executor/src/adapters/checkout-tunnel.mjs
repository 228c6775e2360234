// The connection command of a guarded checkout (checkout-egress.ts): git runs it as core.gitProxy
// for git:// and ssh as its ProxyCommand, as `checkout-tunnel <host> <port>`. It asks the
// checkout's proxy (CHECKOUT_TUNNEL_PROXY) for a tunnel with CONNECT, so the proxy resolves and
// checks the destination, then copies stdin to the tunnel and the tunnel to stdout.
import net from "node:net";
import { URL } from "node:url";

const [host, port] = process.argv.slice(2);
const proxy = new URL(process.env.CHECKOUT_TUNNEL_PROXY ?? "");
if (!host || !/^\d{1,5}$/.test(port ?? "")) {
  process.stderr.write("checkout-tunnel: usage: checkout-tunnel <host> <port>\n");
  process.exit(2);
}
const target = host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
const credential = Buffer.from(`${decodeURIComponent(proxy.username)}:${decodeURIComponent(proxy.password)}`).toString("base64");

const tunnel = net.connect(Number(proxy.port), proxy.hostname);
tunnel.on("error", (err) => {
  process.stderr.write(`checkout-tunnel: ${err.message}\n`);
  process.exit(1);
});
tunnel.write(`CONNECT ${target} HTTP/1.1\r\nHost: ${target}\r\nProxy-Authorization: Basic ${credential}\r\n\r\n`);

let answer = Buffer.alloc(0);
const readAnswer = (chunk) => {
  answer = Buffer.concat([answer, chunk]);
  const end = answer.indexOf("\r\n\r\n");
  if (end < 0) {
    if (answer.length > 16 * 1024) tunnel.destroy(new Error("the proxy's answer is too long"));
    return;
  }
  tunnel.off("data", readAnswer);
  const status = answer.subarray(0, answer.indexOf("\r\n")).toString("latin1");
  if (!/^HTTP\/1\.[01] 200 /.test(status)) {
    process.stderr.write(`checkout-tunnel: the checkout's proxy refused ${target}: ${status}\n`);
    process.exit(1);
  }
  const rest = answer.subarray(end + 4);
  if (rest.length > 0) process.stdout.write(rest);
  tunnel.pipe(process.stdout);
  process.stdin.pipe(tunnel);
  tunnel.once("close", () => process.exit(0));
};
tunnel.on("data", readAnswer);
