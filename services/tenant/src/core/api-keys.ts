/**
 * API key material (SPEC T2). A key is "otp_" followed by 64 lowercase hex characters of
 * CSPRNG output (32 bytes). Only its SHA-256 hash is persisted, plus a short display prefix
 * and the last four characters so people can tell keys apart. Exported for any code that
 * needs to mint or recognise keys (e.g. the provisioning command or test fixtures).
 */
import { createHash, randomBytes } from "node:crypto";

export const API_KEY_PREFIX = "otp_";
/** The whole shape of a well-formed key. */
export const API_KEY_PATTERN = /^otp_[0-9a-f]{64}$/;
/** How many leading characters are kept for display, e.g. "otp_3f9a". */
export const DISPLAY_PREFIX_LENGTH = 8;

export interface GeneratedApiKey {
  /** Returned to the creator exactly once; never stored, never logged. */
  plaintext: string;
  /** SHA-256 of the plaintext, lowercase hex: what the store keeps and looks keys up by. */
  hash: string;
  prefix: string;
  lastFour: string;
}

export function generateApiKey(): GeneratedApiKey {
  const plaintext = API_KEY_PREFIX + randomBytes(32).toString("hex");
  return { plaintext, hash: hashApiKey(plaintext), ...displayPartsOf(plaintext) };
}

/**
 * The lookup hash of a key. A plain (unsalted) SHA-256 is enough here: keys carry 256 bits of
 * randomness, so there is nothing to brute-force, and lookup by hash needs determinism.
 */
export function hashApiKey(plaintext: string): string {
  return createHash("sha256").update(plaintext, "utf8").digest("hex");
}

export function isWellFormedApiKey(candidate: string): boolean {
  return API_KEY_PATTERN.test(candidate);
}

export function displayPartsOf(plaintext: string): { prefix: string; lastFour: string } {
  return { prefix: plaintext.slice(0, DISPLAY_PREFIX_LENGTH), lastFour: plaintext.slice(-4) };
}
