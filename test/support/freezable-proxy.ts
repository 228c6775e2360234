/**
 * A loopback TCP proxy that can freeze: its connections stop passing bytes either way but stay
 * open, as when the host behind them vanished (powered off, partitioned) without closing them.
 * Connections made while frozen are accepted and never passed on; after `thaw` new connections
 * pass again, and the frozen ones stay frozen (the host that came back does not know them).
 * It can also mute replies: requests still reach the target, which acts on them, but what it
 * answers is dropped, as when a response is lost on the way back.
 */
import net from "node:net";

export interface FreezableProxy {
  port: number;
  url: string;
  /** Connections accepted so far. */
  readonly accepted: number;
  freeze(): void;
  thaw(): void;
  /** From now on, bytes from the target are dropped (requests still pass). */
  muteReplies(): void;
  close(): Promise<void>;
}

export async function startFreezableProxy(targetPort: number, targetHost = "127.0.0.1"): Promise<FreezableProxy> {
  const sockets = new Set<net.Socket>();
  const linked = new Set<{ client: net.Socket; target: net.Socket }>();
  let frozen = false;
  let muted = false;
  let accepted = 0;
  const track = (socket: net.Socket) => {
    sockets.add(socket);
    socket.on("error", () => {});
    socket.on("close", () => sockets.delete(socket));
    return socket;
  };
  const server = net.createServer((client) => {
    accepted++;
    track(client);
    if (frozen) {
      client.pause();
      return;
    }
    const target = track(net.connect(targetPort, targetHost));
    const pair = { client, target };
    linked.add(pair);
    client.pipe(target);
    target.on("data", (chunk: Buffer) => {
      if (!muted && !client.destroyed) client.write(chunk);
    });
    const end = () => {
      linked.delete(pair);
      client.destroy();
      target.destroy();
    };
    client.on("close", end);
    target.on("close", end);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as net.AddressInfo).port;
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    get accepted() {
      return accepted;
    },
    freeze() {
      frozen = true;
      for (const { client, target } of linked) {
        client.unpipe(target);
        target.removeAllListeners("data");
        client.pause();
        target.pause();
      }
      linked.clear();
    },
    thaw() {
      frozen = false;
    },
    muteReplies() {
      muted = true;
    },
    async close() {
      for (const socket of sockets) socket.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
