/**
 * The executor's side of enrollment (adapters/enrollment.ts) against a stand-in EnrollmentService
 * over a real socket: it enrolls a key of its own, switches its signing keys to it with the
 * certificate, keeps the key pair in its data directory (0600) so a restart in place enrolls the
 * same key, renews before the certificate ends, and tries again after a refusal.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import {
  EXECUTOR_CERTIFICATE_HEADER,
  failedPrecondition,
  invalidArgument,
  issueExecutorCertificate,
  parseExecutorPublicKey,
  signingKeysOf,
  verifyEnrollmentProof,
  type RunningServer,
} from "@outpost/platform";
import { EnrollExecutorResponseSchema, EnrollmentService } from "@outpost/proto/outpost/executor/v1/enrollment_service_pb.js";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { startEnrollment, type Enrollment } from "../src/adapters/enrollment.ts";
import { keysOf, TEST_SIGNING_KEY_SET } from "../../../test/support/signing.ts";
import { silentLogger } from "./fakes.ts";
import { startStub } from "./boundary-harness.ts";

const ID = "pod-7";

describe("executor enrollment (adapter)", () => {
  let dir: string;
  let server: RunningServer;
  /** Public keys (base64) of the calls the stand-in answered, in order. */
  const seen: string[] = [];
  /** How the stand-in answers: the certificate's lifetime, or a refusal. */
  let answer: { ttlMs: number } | "bound" = { ttlMs: 60_000 };
  const running: Enrollment[] = [];

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "outpost-enroll-"));
    server = await startStub("stub-enrollment", (router) =>
      router.service(EnrollmentService, {
        enrollExecutor(req) {
          // The executor proves it holds the key it enrolls (checked as the dispatcher does).
          if (!verifyEnrollmentProof(parseExecutorPublicKey(req.publicKey), req.executorId, req.publicKey, req.proof)) throw invalidArgument("proof", "wrong");
          seen.push(Buffer.from(req.publicKey).toString("base64"));
          if (answer === "bound") {
            answer = { ttlMs: 60_000 };
            throw failedPrecondition("EXECUTOR_KEY_BOUND", "bound to another key", { bound_until: new Date(Date.now() + 200).toISOString() });
          }
          const now = Date.now();
          const certificate = issueExecutorCertificate(keysOf("dispatcher"), `executor/${req.executorId}`, req.publicKey, answer.ttlMs, now);
          return create(EnrollExecutorResponseSchema, { certificate, expireTime: timestampFromMs(now + answer.ttlMs) });
        },
      }),
    );
  });

  afterEach(() => {
    for (const e of running.splice(0)) e.stop();
  });

  afterAll(async () => {
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const start = (keyFile: string, retryMs = 50) => {
    const signingKeys = signingKeysOf(TEST_SIGNING_KEY_SET, "executor", ID);
    const enrollment = startEnrollment({
      dispatcherUrl: server.url,
      executorId: ID,
      enrollmentKeys: signingKeysOf(TEST_SIGNING_KEY_SET, "executor", ID),
      signingKeys,
      keyFile,
      logger: silentLogger,
      retryMs,
    });
    running.push(enrollment);
    return { enrollment, signingKeys };
  };
  const certificateOf = (keys: ReturnType<typeof start>["signingKeys"]) => {
    const headers = new Headers();
    keys.writeIdentity(headers, { kind: "service", principal: `executor/${ID}` }, "outpost.executor.v1.LeaseService");
    return headers.get(EXECUTOR_CERTIFICATE_HEADER);
  };

  it("enrolls a key of its own, signs with it and the certificate, and keeps the key for a restart in place", async () => {
    const keyFile = path.join(dir, "a", "enrolled-key.pem");
    const first = start(keyFile);
    expect(certificateOf(first.signingKeys)).toBeNull();
    await first.enrollment.enrolled;
    expect(first.enrollment.certified).toBe(true);
    expect(certificateOf(first.signingKeys)).toMatch(/^[\w-]+\.[\w-]+$/);
    expect((fs.statSync(keyFile).mode & 0o777).toString(8)).toBe("600");
    first.enrollment.stop();
    // Restarted with the same data directory: the same public key is enrolled again.
    const again = start(keyFile);
    await again.enrollment.enrolled;
    expect(seen.at(-1)).toBe(seen.at(-2));
    // A fresh directory: a new key.
    const elsewhere = start(path.join(dir, "b", "enrolled-key.pem"));
    await elsewhere.enrollment.enrolled;
    expect(seen.at(-1)).not.toBe(seen.at(-2));
  });

  it("replaces a key file that holds no key (cut short by a crash) and enrolls the new key", async () => {
    const keyFile = path.join(dir, "e", "enrolled-key.pem");
    fs.mkdirSync(path.dirname(keyFile));
    fs.writeFileSync(keyFile, "-----BEGIN PRIVATE KEY-----\nMC4CAQAw", { mode: 0o600 });
    const { enrollment } = start(keyFile);
    await enrollment.enrolled;
    expect(fs.readFileSync(keyFile, "utf8")).toMatch(/^-----BEGIN PRIVATE KEY-----\n[\s\S]+-----END PRIVATE KEY-----\n$/);
    expect(fs.readdirSync(path.dirname(keyFile))).toEqual(["enrolled-key.pem"]);
  });

  it("renews at a third of the certificate's lifetime", async () => {
    answer = { ttlMs: 3000 };
    const before = seen.length;
    const { enrollment } = start(path.join(dir, "c", "enrolled-key.pem"));
    await enrollment.enrolled;
    await vi.waitFor(() => expect(seen.length).toBeGreaterThanOrEqual(before + 2), { timeout: 5000, interval: 50 });
    answer = { ttlMs: 60_000 };
  });

  it("tries again after a refusal (the id bound to another key), and then enrolls", async () => {
    answer = "bound";
    const before = seen.length;
    const { enrollment } = start(path.join(dir, "d", "enrolled-key.pem"));
    expect(enrollment.certified).toBe(false);
    await enrollment.enrolled;
    expect(seen.length).toBe(before + 2);
    expect(enrollment.certified).toBe(true);
  });
});
