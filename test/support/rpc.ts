/**
 * Shared by the services' in-process handler tests: a client whose calls are signed as a given
 * caller and checked by the platform's own identity interceptor (no ports), and an assertion for
 * calls that must fail with a code and an ErrorInfo reason.
 */
import type { DescService } from "@bufbuild/protobuf";
import { ConnectError, createClient, createRouterTransport, type Client, type Code, type ConnectRouter, type Interceptor } from "@connectrpc/connect";
import { errorInfoOf, identityInterceptor, writeIdentity, type Identity } from "@outpost/platform";
import { expect } from "vitest";

export function signedRouterClient<T extends DescService>(
  service: T,
  routes: (router: ConnectRouter) => void,
  identity: Identity,
  secret: string,
): Client<T> {
  const sign: Interceptor = (next) => (req) => {
    writeIdentity(req.header, secret, identity);
    return next(req);
  };
  const transport = createRouterTransport(routes, {
    router: { interceptors: [identityInterceptor(secret)] },
    transport: { interceptors: [sign] },
  });
  return createClient(service, transport);
}

/** Awaits a call that must fail, and checks its code and ErrorInfo reason. */
export async function expectError(call: Promise<unknown>, code: Code, reason?: string): Promise<ConnectError> {
  let caught: unknown;
  try {
    await call;
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(ConnectError);
  const err = caught as ConnectError;
  expect(err.code).toBe(code);
  if (reason !== undefined) expect(errorInfoOf(err)?.reason).toBe(reason);
  return err;
}
