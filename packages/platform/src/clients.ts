/**
 * Clients for calls between services: gRPC over h2c, or over TLS to an https:// URL (tls.ts),
 * each call signed with the caller's identity and carrying the current trace context.
 */
import type { DescService } from "@bufbuild/protobuf";
import { createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { audienceOf, type Identity, type SigningKeys } from "./identity.ts";
import { isHttpsUrl, type TlsFiles } from "./tls.ts";
import { clientTraceInterceptor } from "./tracing.ts";

export interface InternalClientOptions {
  baseUrl: string;
  /** Signs each call's identity. */
  signingKeys: SigningKeys;
  /**
   * Who every call is made as. Omitted by the gateway, which signs each forwarded call with
   * its caller's identity in the call's headers.
   */
  identity?: Identity;
  interceptors?: Interceptor[];
  /**
   * For an https:// URL: the CA to verify the service against and the certificate to present
   * (internalTlsOf). Without it an https:// service is verified against the system's CAs.
   */
  tls?: TlsFiles;
}

export function internalTransport(options: InternalClientOptions) {
  const identityInterceptor: Interceptor = (next) => (req) => {
    if (options.identity) options.signingKeys.writeIdentity(req.header, options.identity, audienceOf(req.service));
    return next(req);
  };
  return createGrpcTransport({
    baseUrl: options.baseUrl,
    // A client span per call, its context propagated in `traceparent` (tracing.ts).
    interceptors: [clientTraceInterceptor(), identityInterceptor, ...(options.interceptors ?? [])],
    // Keep connections warm between services; probes detect peers that vanished.
    pingIntervalMs: 10_000,
    idleConnectionTimeoutMs: 60_000,
    ...(options.tls && isHttpsUrl(options.baseUrl) ? { nodeOptions: options.tls.clientOptions() } : {}),
  });
}

export function internalClient<T extends DescService>(service: T, options: InternalClientOptions): Client<T> {
  return createClient(service, internalTransport(options));
}
