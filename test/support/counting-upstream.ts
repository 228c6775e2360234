/**
 * A stand-in upstream for the gateway's tests: a connect-node server on a loopback port whose
 * DispatchService.GetDispatch answers an empty dispatch and counts the calls that reached it.
 */
import http2 from "node:http2";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { DispatchService } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";

export interface CountingUpstream {
  port: number;
  url: string;
  /** GetDispatch calls answered so far. */
  calls(): number;
  close(): Promise<void>;
}

export async function startCountingUpstream(): Promise<CountingUpstream> {
  let calls = 0;
  const server = http2.createServer(
    connectNodeAdapter({
      routes: (router) => {
        router.service(DispatchService, {
          getDispatch: () => {
            calls++;
            return {};
          },
        } as never);
      },
    }),
  );
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as { port: number }).port;
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    calls: () => calls,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
