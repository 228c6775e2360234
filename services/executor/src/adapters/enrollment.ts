/**
 * Enrollment of an executor that holds the shared enrollment key (OUTPOST_EXECUTOR_ENROLL=on;
 * identity.ts and docs/operations.md, "Enrolled executor keys"): it binds a key pair of its own
 * to its id at the dispatcher's EnrollmentService, then signs every call with that key and sends
 * the dispatcher's certificate of it. The certificate is renewed at a third of its lifetime, and
 * tried again with backoff (core/backoff.ts) when the dispatcher does not answer.
 *
 * The key pair is kept in the executor's data directory (mode 0600), so an executor restarted in
 * place (same id, same directory) enrolls the same key again: the dispatcher gives an id to
 * another key only once the old binding has ended.
 */
import { createPrivateKey, createPublicKey, type KeyObject } from "node:crypto";
import fs from "node:fs/promises";
import path from "node:path";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { errorInfoOf, internalClient, newExecutorKeyPair, signEnrollmentProof, type Logger, type SigningKeys, type TlsFiles } from "@outpost/platform";
import { EnrollmentService } from "@outpost/proto/outpost/executor/v1/enrollment_service_pb.js";
import { Backoff, sleep } from "../core/backoff.ts";

export interface EnrollmentOptions {
  dispatcherUrl: string;
  executorId: string;
  /** Signs with the shared enrollment key: used only for EnrollExecutor. */
  enrollmentKeys: SigningKeys;
  /** Every other call's keys: switched to the executor's own key and certificate once enrolled. */
  signingKeys: SigningKeys;
  /** Internal TLS for an https:// URL (internalTlsOf). */
  tls?: TlsFiles | undefined;
  /** Where the executor's own key pair is kept (PKCS#8 PEM). */
  keyFile: string;
  logger: Logger;
  /** Backoff base after a failed enrollment (with jitter, doubling up to 30 s). */
  retryMs?: number;
}

export interface Enrollment {
  /** Resolves once the executor holds a certificate (the first enrollment succeeded). */
  readonly enrolled: Promise<void>;
  /** Whether the last certificate is still valid, for readiness. */
  readonly certified: boolean;
  /** Stops renewing. */
  stop(): void;
}

const MAX_RETRY_MS = 30_000;

export function startEnrollment(options: EnrollmentOptions): Enrollment {
  const client = internalClient(EnrollmentService, {
    baseUrl: options.dispatcherUrl,
    signingKeys: options.enrollmentKeys,
    tls: options.tls,
    identity: { kind: "service", principal: `executor/${options.executorId}` },
  });
  const controller = new AbortController();
  let expiresAt = 0;
  let firstEnrollment: () => void = () => {};
  const enrolled = new Promise<void>((resolve) => (firstEnrollment = resolve));

  const run = async () => {
    const { privateKey, publicKey } = await ownKeyPair(options.keyFile, options.logger);
    const proof = signEnrollmentProof(privateKey, options.executorId, publicKey);
    const backoff = new Backoff({ baseMs: options.retryMs ?? 1000, maxMs: MAX_RETRY_MS });
    while (!controller.signal.aborted) {
      let waitMs: number;
      try {
        const res = await client.enrollExecutor({ executorId: options.executorId, publicKey, proof }, { signal: controller.signal, timeoutMs: 10_000 });
        options.signingKeys.useCertificate(privateKey, res.certificate);
        const now = Date.now();
        const first = expiresAt === 0;
        expiresAt = res.expireTime ? timestampMs(res.expireTime) : now;
        options.logger[first ? "info" : "debug"]({ expiresAt: new Date(expiresAt).toISOString() }, first ? "executor enrolled" : "executor certificate renewed");
        firstEnrollment();
        backoff.reset();
        waitMs = Math.max(1000, (expiresAt - now) / 3);
      } catch (err) {
        if (controller.signal.aborted) return;
        const error = ConnectError.from(err);
        // Bound to another key: that binding has to end first; no point asking sooner than it does.
        const boundUntil = error.code === Code.FailedPrecondition ? Date.parse(errorInfoOf(error)?.metadata.bound_until ?? "") : NaN;
        const retryMs = backoff.next();
        waitMs = Number.isFinite(boundUntil) ? Math.max(retryMs, boundUntil - Date.now()) : retryMs;
        options.logger.warn({ err: error.message, retryInMs: waitMs }, "executor enrollment failed; retrying");
      }
      await sleep(waitMs, controller.signal);
    }
  };
  run().catch((err: unknown) => options.logger.error({ err }, "executor enrollment stopped: its key pair could not be read or made"));

  return {
    enrolled,
    get certified() {
      return Date.now() < expiresAt;
    },
    stop: () => controller.abort(),
  };
}

/**
 * The executor's key pair from `keyFile`, made (and written, 0600) the first time, or when the
 * file holds no Ed25519 key (cut short by a crash, say): a new key then enrolls once the old
 * binding ended. Written to a temporary file and renamed, so the file is whole or absent.
 */
async function ownKeyPair(keyFile: string, logger: Logger): Promise<{ privateKey: KeyObject; publicKey: Buffer }> {
  let text: string | undefined;
  try {
    text = await fs.readFile(keyFile, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
  }
  if (text !== undefined) {
    try {
      const privateKey = createPrivateKey(text);
      if (privateKey.asymmetricKeyType === "ed25519") {
        return { privateKey, publicKey: createPublicKey(privateKey).export({ format: "der", type: "spki" }) };
      }
    } catch {
      // Not a key: replaced below.
    }
    logger.warn({ keyFile }, "the enrolled key file holds no Ed25519 key; making a new key");
  }
  const pair = newExecutorKeyPair();
  await fs.mkdir(path.dirname(keyFile), { recursive: true, mode: 0o700 });
  const partial = `${keyFile}.${process.pid}.tmp`;
  const handle = await fs.open(partial, "w", 0o600);
  try {
    await handle.writeFile(pair.privateKey.export({ format: "pem", type: "pkcs8" }));
    await handle.sync();
  } finally {
    await handle.close();
  }
  await fs.rename(partial, keyFile);
  return pair;
}
