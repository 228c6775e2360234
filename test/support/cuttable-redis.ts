/**
 * A private redis-server with a second way in through a loopback proxy the test can close and
 * reopen: clients on `proxiedUrl` are cut off from Redis while those on `url` stay connected, as
 * when one machine loses its network.
 */
import { startBalancer, type Balancer } from "../../scripts/lib/balancer.ts";
import { freePort } from "../../scripts/lib/ports.ts";
import { startPrivateRedis } from "../../scripts/lib/scale-out.ts";

export interface CuttableRedis {
  /** Straight to the server. */
  url: string;
  /** Through the proxy. */
  proxiedUrl: string;
  /** Closes the proxy and every connection through it. */
  cut(): Promise<void>;
  /** Opens the proxy again on the same port. */
  restore(): Promise<void>;
  stop(): Promise<void>;
}

export async function startCuttableRedis(dir: string): Promise<CuttableRedis> {
  const server = await startPrivateRedis(dir);
  const redisPort = Number(new URL(server.url).port);
  const proxyPort = await freePort();
  const open = () => startBalancer(() => [redisPort], "127.0.0.1", proxyPort);
  let proxy: Balancer | undefined = await open();
  return {
    url: server.url,
    proxiedUrl: `redis://127.0.0.1:${proxyPort}`,
    async cut() {
      await proxy?.close();
      proxy = undefined;
    },
    async restore() {
      proxy ??= await open();
    },
    async stop() {
      await proxy?.close();
      await server.stop();
    },
  };
}
