/**
 * A stand-in gateway for CLI tests: one connect-node server (HTTP/1.1, what the CLI speaks) on a
 * loopback port answering with the routes a test gives it, recording each request's path and
 * authorization header.
 */
import http from "node:http";
import type net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import type { ConnectRouter } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { SecretService } from "@outpost/proto/outpost/tenant/v1/tenant_service_pb.js";

/** The CLI's entry point, for tests that run it as a process. */
export const CLI_MAIN = path.join(path.dirname(fileURLToPath(import.meta.url)), "../src/main.ts");

export interface StandIn {
  url: string;
  /** Every request received: path and authorization header. */
  requests: { path: string; authorization: string | undefined }[];
  close(): Promise<void>;
}

export async function startStandIn(routes: (router: ConnectRouter) => void = () => {}): Promise<StandIn> {
  const handler = connectNodeAdapter({ routes });
  const requests: StandIn["requests"] = [];
  const server = http.createServer((req, res) => {
    requests.push({ path: req.url ?? "", authorization: req.headers.authorization });
    handler(req, res);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as net.AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    requests,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/** Serves SecretService.PutSecret, keeping each name and value in `secrets`. */
export function recordSecrets(router: ConnectRouter, secrets: { name: string; value: string }[]): void {
  router.service(SecretService, {
    putSecret(req) {
      secrets.push({ name: req.name, value: req.value });
      return { secret: { name: req.name } };
    },
  });
}
