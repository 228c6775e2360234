/**
 * A real gateway for the admission tests (raw-admission, admit-first): in-memory rate limits of
 * `readsPerIp` reads per minute per client IP, every upstream a counting stand-in, and HTTP/2
 * sessions from chosen loopback addresses (each address has its own rate budget).
 */
import http2 from "node:http2";
import net from "node:net";
import { loadConfig } from "@outpost/platform";
import { pino } from "pino";
import { gatewayConfigShape } from "../src/config.ts";
import { startGateway } from "../src/service.ts";
import { startCountingUpstream, type CountingUpstream } from "../../test/support/counting-upstream.ts";
import { signingEnv } from "../../test/support/signing.ts";

export interface RateLimitedGateway {
  url: string;
  port: number;
  upstream: CountingUpstream;
  /** An HTTP/2 session to the gateway from `localAddress`. */
  sessionFrom(localAddress: string): http2.ClientHttp2Session;
  close(): Promise<void>;
}

export async function startRateLimitedGateway(options: { adminToken: string; readsPerIp: number }): Promise<RateLimitedGateway> {
  const upstream = await startCountingUpstream();
  const config = loadConfig(gatewayConfigShape, {
    ...signingEnv("gateway"),
    OUTPOST_ADMIN_TOKEN: options.adminToken,
    OUTPOST_GATEWAY_HOST: "127.0.0.1",
    OUTPOST_GATEWAY_PORT: "0",
    OUTPOST_TENANT_URL: upstream.url,
    OUTPOST_DISPATCHER_URL: upstream.url,
    OUTPOST_TELEMETRY_URL: upstream.url,
    OUTPOST_RATE_LIMIT: "memory",
    OUTPOST_RATE_LIMITS_PER_IP: `read=${options.readsPerIp}`,
  });
  const gateway = await startGateway(config, pino({ level: "silent" }));
  const url = `http://127.0.0.1:${gateway.port}`;
  return {
    url,
    port: gateway.port,
    upstream,
    sessionFrom(localAddress) {
      const session = http2.connect(url, { createConnection: () => net.connect({ host: "127.0.0.1", port: gateway.port, localAddress }) });
      session.on("error", () => {});
      return session;
    },
    async close() {
      await gateway.close();
      await upstream.close();
    },
  };
}
