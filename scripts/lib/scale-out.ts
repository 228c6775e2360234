/**
 * The scale-out topology on one machine (SPEC O3): two gateways, two dispatchers, two
 * telemetry replicas and two executors (one tenant service), every replica its own process,
 * sharing one Redis (wake-ups, log fan-out, auth invalidation, rate limits) and one store
 * (the same SQLite files: WAL and a busy timeout make that safe on one machine). Replicated
 * services sit behind loopback TCP balancers, as behind Kubernetes Services.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdirSync } from "node:fs";
import path from "node:path";
import { freePort, startMesh, type Mesh, type MeshOptions, type ServiceName } from "./mesh.ts";

export const SCALE_OUT_REPLICAS: Partial<Record<ServiceName, number>> = { gateway: 2, dispatcher: 2, telemetry: 2, executor: 2, tenant: 1 };

export interface PrivateRedis {
  url: string;
  stop(): Promise<void>;
}

/** A throw-away redis-server on a free loopback port (no persistence), so tests never touch the shared one. */
export async function startPrivateRedis(dir: string, port?: number): Promise<PrivateRedis> {
  mkdirSync(dir, { recursive: true });
  port ??= await freePort();
  const child: ChildProcess = spawn(
    "redis-server",
    ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir, "--logfile", path.join(dir, "redis.log")],
    { stdio: "ignore" },
  );
  const failed = new Promise<never>((_, reject) => {
    child.once("error", (err) => reject(new Error(`redis-server could not start: ${err.message}`)));
    child.once("exit", (code) => reject(new Error(`redis-server exited with ${code} (see ${dir}/redis.log)`)));
  });
  failed.catch(() => undefined);
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (await pingRedis(port)) break;
    if (Date.now() > deadline) throw new Error(`redis-server did not answer on ${port}`);
    await Promise.race([new Promise((r) => setTimeout(r, 50)), failed]);
  }
  return {
    url: `redis://127.0.0.1:${port}`,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((resolve) => child.once("exit", resolve));
      child.kill("SIGTERM");
      await exited;
    },
  };
}

async function pingRedis(port: number): Promise<boolean> {
  const net = await import("node:net");
  return new Promise((resolve) => {
    const socket = net.connect({ host: "127.0.0.1", port });
    socket.setTimeout(500);
    socket.once("connect", () => socket.write("PING\r\n"));
    socket.once("data", (d) => {
      socket.destroy();
      resolve(d.toString().startsWith("+PONG"));
    });
    socket.once("error", () => resolve(false));
    socket.once("timeout", () => {
      socket.destroy();
      resolve(false);
    });
  });
}

export interface ScaleOut {
  mesh: Mesh;
  redisUrl: string;
  stop(): Promise<void>;
}

export async function startScaleOut(options: MeshOptions & { redisUrl?: string }): Promise<ScaleOut> {
  const redis = options.redisUrl ? undefined : await startPrivateRedis(path.join(path.dirname(options.dataDir), "redis"));
  const redisUrl = options.redisUrl ?? redis!.url;
  try {
    const mesh = await startMesh({
      ...options,
      replicas: { ...SCALE_OUT_REPLICAS, ...options.replicas },
      env: { OUTPOST_REDIS_URL: redisUrl, ...options.env },
    });
    return {
      mesh,
      redisUrl,
      async stop() {
        await mesh.stop();
        await redis?.stop();
      },
    };
  } catch (err) {
    await redis?.stop();
    throw err;
  }
}
