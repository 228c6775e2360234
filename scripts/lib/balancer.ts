/**
 * A TCP round-robin balancer on loopback, standing in for a Kubernetes Service in front of
 * replicas on one machine. Each new connection goes to the next backend that accepts it;
 * a dead backend is skipped, so a client that reconnects after a replica dies lands on a live
 * one. HTTP/2 connections are long-lived, which is exactly how gRPC clients meet a Service.
 */
import net from "node:net";

export interface Balancer {
  readonly port: number;
  readonly url: string;
  close(): Promise<void>;
}

/** `backends()` is read per connection, so replicas restarted on the same port just work. */
export async function startBalancer(backends: () => number[], host = "127.0.0.1", port = 0): Promise<Balancer> {
  let next = 0;
  const sockets = new Set<net.Socket>();

  function connect(client: net.Socket, candidates: number[], attempt: number) {
    if (attempt >= candidates.length) {
      client.destroy();
      return;
    }
    const target = candidates[(next + attempt) % candidates.length]!;
    const upstream = net.connect({ host: "127.0.0.1", port: target });
    sockets.add(upstream);
    upstream.once("close", () => sockets.delete(upstream));
    const refused = () => {
      upstream.destroy();
      connect(client, candidates, attempt + 1);
    };
    upstream.once("error", refused);
    upstream.once("connect", () => {
      upstream.off("error", refused);
      next = (next + attempt + 1) % candidates.length;
      upstream.on("error", () => client.destroy());
      client.on("error", () => upstream.destroy());
      upstream.once("close", () => client.destroy());
      client.once("close", () => upstream.destroy());
      upstream.setNoDelay(true);
      client.pipe(upstream);
      upstream.pipe(client);
      client.resume();
    });
  }

  const server = net.createServer({ pauseOnConnect: true }, (client) => {
    sockets.add(client);
    client.setNoDelay(true);
    client.once("close", () => sockets.delete(client));
    client.on("error", () => client.destroy());
    connect(client, backends(), 0);
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => resolve());
  });
  const actual = (server.address() as net.AddressInfo).port;
  return {
    port: actual,
    url: `http://${host}:${actual}`,
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
