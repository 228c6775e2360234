/**
 * The bare baseline for edge benchmarks: a plain @connectrpc/connect-node server that answers
 * `DispatchService.GetDispatch` with a dispatch of the same shape Outpost returns, built from
 * the request alone — no auth, no forwarding, no store. Run as its own process (so it gets
 * its own event loop, as the gateway does) and prints `{"h1":port,"h2":port}` on stdout.
 * It also answers `GET /healthz` with 200, the bare baseline of the liveness path.
 */
import http from "node:http";
import http2 from "node:http2";
import type net from "node:net";
import { create } from "@bufbuild/protobuf";
import { timestampNow } from "@bufbuild/protobuf/wkt";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { Dispatch_State, DispatchSchema } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { DispatchService, GetDispatchResponseSchema } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";

const handler = connectNodeAdapter({
  routes(router) {
    router.service(DispatchService, {
      getDispatch(req) {
        const now = timestampNow();
        return create(GetDispatchResponseSchema, {
          dispatch: create(DispatchSchema, {
            id: req.dispatchId,
            tenantId: "01JBENCHTENANT000000000000",
            agent: "demo",
            task: "benchmark",
            model: "demo",
            state: Dispatch_State.QUEUED,
            createTime: now,
            updateTime: now,
          }),
        });
      },
    });
  },
});

function withLiveness(req: http.IncomingMessage | http2.Http2ServerRequest, res: http.ServerResponse | http2.Http2ServerResponse) {
  if (req.url === "/healthz") {
    (res as http.ServerResponse).writeHead(200, { "content-type": "text/plain" }).end("ok\n");
    return;
  }
  (handler as (req: unknown, res: unknown) => void)(req, res);
}

async function listen(server: net.Server): Promise<number> {
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve((server.address() as net.AddressInfo).port)));
}

const h1 = http.createServer(withLiveness);
h1.keepAliveTimeout = 60_000;
const h2 = http2.createServer(withLiveness);
const ports = { h1: await listen(h1), h2: await listen(h2) };
process.stdout.write(`${JSON.stringify(ports)}\n`);
process.on("SIGTERM", () => process.exit(0));
