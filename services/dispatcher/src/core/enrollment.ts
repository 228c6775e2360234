/**
 * Executor enrollment (identity.ts, "executors that come and go"): an executor binds a key pair
 * of its own to its id and gets the dispatcher's certificate of it. An id is bound to one key at
 * a time, for a certificate's lifetime, renewed by the executor enrolling the same key again;
 * another key gets the id only once that binding ended (the executor stopped renewing), so the
 * shared enrollment key cannot be used to speak as an executor that is running.
 */
import {
  EXECUTOR_CERTIFICATE_TTL_MS,
  failedPrecondition,
  invalidArgument,
  issueExecutorCertificate,
  parseExecutorPublicKey,
  type SigningKeys,
  verifyEnrollmentProof,
} from "@outpost/platform";
import type { ExecutorStore } from "../store/store.ts";

export interface Enrolled {
  certificate: string;
  /** When the certificate and the binding end unless renewed (ms since the epoch). */
  expiresAt: number;
  /** The same key's binding, still in force, was extended (not a new binding). */
  renewed: boolean;
}

export class ExecutorEnrollment {
  private readonly store: Pick<ExecutorStore, "bindExecutorKey">;
  private readonly signingKeys: SigningKeys;
  private readonly ttlMs: number;
  private readonly now: () => number;

  constructor(store: Pick<ExecutorStore, "bindExecutorKey">, signingKeys: SigningKeys, ttlMs = EXECUTOR_CERTIFICATE_TTL_MS, now: () => number = Date.now) {
    this.store = store;
    this.signingKeys = signingKeys;
    this.ttlMs = ttlMs;
    this.now = now;
  }

  async enroll(executorId: string, publicKey: Uint8Array, proof: Uint8Array): Promise<Enrolled> {
    if (publicKey.byteLength === 0) throw invalidArgument("public_key", "is required (the executor's Ed25519 public key, SPKI DER)", "FIELD_REQUIRED");
    let key;
    try {
      key = parseExecutorPublicKey(publicKey);
    } catch (err) {
      throw invalidArgument("public_key", (err as Error).message, "FIELD_MALFORMED");
    }
    // Only the holder of the private key binds (or keeps bound) an id to it: a public key alone,
    // a dead executor's say, cannot hold its id.
    if (!verifyEnrollmentProof(key, executorId, publicKey, proof)) {
      throw invalidArgument("proof", "is not the public key's signature of this enrollment (see EnrollExecutorRequest.proof)", "FIELD_MALFORMED");
    }
    const now = this.now();
    const expiresAt = now + this.ttlMs;
    const binding = await this.store.bindExecutorKey(executorId, Buffer.from(publicKey).toString("base64"), expiresAt, now);
    if (!binding.bound) {
      throw failedPrecondition(
        "EXECUTOR_KEY_BOUND",
        `executor ${executorId} is enrolled with another key until ${new Date(binding.boundUntil).toISOString()} (while it renews, no other key gets its id)`,
        { executor_id: executorId, bound_until: new Date(binding.boundUntil).toISOString() },
      );
    }
    return { certificate: issueExecutorCertificate(this.signingKeys, `executor/${executorId}`, publicKey, this.ttlMs, now), expiresAt, renewed: binding.renewed };
  }
}
