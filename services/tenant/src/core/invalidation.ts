/**
 * Telling gateway replicas to forget cached credentials (cross-team contract E): on the
 * channel "outpost:auth:invalidate" the tenant service publishes the SHA-256 hex of a revoked
 * key (the gateway caches identities under exactly that hash) or "tenant:<id>" when a tenant
 * is suspended. Publishing is best effort: the gateway's short cache TTL bounds the delay when
 * Redis is absent or down, so a failed publish never fails the revocation itself.
 */
export const AUTH_INVALIDATE_CHANNEL = "outpost:auth:invalidate";

export interface AuthInvalidation {
  keyRevoked(keyHash: string): Promise<void>;
  tenantSuspended(tenantId: string): Promise<void>;
}

/** One machine without Redis: nothing to tell (the cache TTL applies). */
export const NO_INVALIDATION: AuthInvalidation = {
  keyRevoked: () => Promise.resolve(),
  tenantSuspended: () => Promise.resolve(),
};

/** Anything that can PUBLISH (an ioredis client), so tests can pass a recorder. */
export interface Publisher {
  publish(channel: string, message: string): Promise<unknown>;
}

export interface PublishLogger {
  warn(obj: object, msg: string): void;
}

/** Publishes on the channel; a failure is logged (without the message: it names a key hash) and swallowed. */
export function publishingInvalidation(publisher: Publisher, logger: PublishLogger, timeoutMs = 1000): AuthInvalidation {
  const send = async (message: string, what: string) => {
    try {
      await Promise.race([
        publisher.publish(AUTH_INVALIDATE_CHANNEL, message),
        new Promise((_, reject) => setTimeout(() => reject(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs).unref()),
      ]);
    } catch (err) {
      logger.warn({ err: (err as Error).message, what }, "could not publish auth invalidation; gateways drop the entry when their cache expires");
    }
  };
  return {
    keyRevoked: (keyHash) => send(keyHash, "api key revoked"),
    tenantSuspended: (tenantId) => send(`tenant:${tenantId}`, "tenant suspended"),
  };
}
