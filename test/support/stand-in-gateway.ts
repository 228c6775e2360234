/**
 * A real gateway process in front of stand-in services: one connect-node server on a loopback
 * port answers for tenant, dispatcher and telemetry with the routes a test gives it. For edge
 * behaviour that needs an upstream to answer in a particular way (or not at all).
 */
import { mkdtempSync, rmSync } from "node:fs";
import http2 from "node:http2";
import os from "node:os";
import path from "node:path";
import type { ConnectRouter } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { freePort, startMesh, type Mesh } from "../../scripts/lib/mesh.ts";

export interface StandInGateway {
  mesh: Mesh;
  /** The gateway's base URL and port. */
  url: string;
  port: number;
  /** The gateway's data and log directory (logs/gateway.log). */
  dir: string;
  stop(): Promise<void>;
}

export async function startStandInGateway(options: {
  routes: (router: ConnectRouter) => void;
  adminToken: string;
  /** Gateway settings; rate limits are off unless set here. */
  env?: Record<string, string>;
}): Promise<StandInGateway> {
  const fake = http2.createServer(connectNodeAdapter({ routes: options.routes }));
  const fakePort = await freePort();
  await new Promise<void>((resolve) => fake.listen(fakePort, "127.0.0.1", resolve));
  const dir = mkdtempSync(path.join(os.tmpdir(), "outpost-stand-in-"));
  let mesh: Mesh;
  try {
    mesh = await startMesh({
      dataDir: path.join(dir, "data"),
      logDir: path.join(dir, "logs"),
      adminToken: options.adminToken,
      only: ["gateway"],
      ports: { tenant: fakePort, dispatcher: fakePort, telemetry: fakePort },
      env: { OUTPOST_RATE_LIMIT: "off", ...options.env },
    });
  } catch (err) {
    fake.close();
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
  return {
    mesh,
    url: mesh.urls.gateway,
    port: Number(new URL(mesh.urls.gateway).port),
    dir,
    async stop() {
      await mesh.stop();
      fake.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
