/**
 * Shared by the services' in-process handler tests: a client whose calls are signed as a given
 * caller (with the key of the role that may sign it) and checked by the platform's own identity interceptor (no ports), and an assertion for
 * calls that must fail with a code and an ErrorInfo reason.
 */
import type { DescService } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, createRouterTransport, type Client, type ConnectRouter, type Interceptor } from "@connectrpc/connect";
import { errorInfoOf, identityInterceptor, type Identity } from "@outpost/platform";
import { expect } from "vitest";
import { keysOf, signAs } from "./signing.ts";

export function signedRouterClient<T extends DescService>(
  service: T,
  routes: (router: ConnectRouter) => void,
  identity: Identity,
): Client<T> {
  const sign: Interceptor = (next) => (req) => {
    signAs(req.header, identity, req.service);
    return next(req);
  };
  const transport = createRouterTransport(routes, {
    // Any role's keys verify: each trusts the whole test set.
    router: { interceptors: [identityInterceptor(keysOf("tenant"))] },
    transport: { interceptors: [sign] },
  });
  return createClient(service, transport);
}

/** The error of a call that must fail (as a ConnectError); a call that succeeds fails the test. */
export async function errorOf(call: Promise<unknown>): Promise<ConnectError> {
  try {
    await call;
  } catch (err) {
    return ConnectError.from(err);
  }
  throw new Error("expected the call to fail");
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

/** What a call's answer was, as "accepted" or "<Code> <ErrorInfo reason>" (for tables of refusals). */
export async function refusal(call: Promise<unknown>): Promise<string> {
  const err = await call.then(
    () => undefined,
    (e: unknown) => ConnectError.from(e),
  );
  return err ? `${Code[err.code]} ${errorInfoOf(err)?.reason}` : "accepted";
}
