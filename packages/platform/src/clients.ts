/**
 * Clients for calls between services: gRPC over h2c, each call signed with the caller's
 * identity and carrying the current trace context.
 */
import type { DescService } from "@bufbuild/protobuf";
import { createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { audienceOf, type Identity, type SigningKeys } from "./identity.ts";
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
  });
}

export function internalClient<T extends DescService>(service: T, options: InternalClientOptions): Client<T> {
  return createClient(service, internalTransport(options));
}
