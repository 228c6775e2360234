/**
 * Encryption of secret values at rest (SPEC T5): AES-256-GCM under a master key from the
 * environment, OUTPOST_SECRETS_MASTER_KEYS = "k2:<base64 32 bytes>,k1:<base64 32 bytes>", the
 * first being the current key. Every stored value carries the id of the key that sealed it,
 * so older keys stay listed (for reading) while values move to the current one (lazily when
 * read, or all at once with the re-encrypt command); then the old key can be dropped.
 *
 * The tenant id and secret name are bound in as additional authenticated data, so a
 * ciphertext copied to another tenant's or another name's row does not open.
 */
import { createCipheriv, createDecipheriv, randomBytes } from "node:crypto";
import { ConfigError } from "@outpost/platform";

const ALGORITHM = "aes-256-gcm";
const IV_BYTES = 12;
const TAG_BYTES = 16;
const KEY_ID = /^[A-Za-z0-9_.-]{1,32}$/;

/** What the store keeps for a value; never the plaintext. */
export interface SealedValue {
  keyId: string;
  /** 12-byte GCM nonce, random per write. */
  iv: Uint8Array;
  /** Ciphertext followed by the 16-byte GCM tag. */
  ciphertext: Uint8Array;
}

export class SecretBox {
  private readonly keys: ReadonlyMap<string, Buffer>;
  readonly currentKeyId: string;

  constructor(keys: { id: string; key: Buffer }[]) {
    if (keys.length === 0) throw new ConfigError("OUTPOST_SECRETS_MASTER_KEYS: at least one key is required");
    this.keys = new Map(keys.map((k) => [k.id, k.key]));
    this.currentKeyId = keys[0]!.id;
  }

  /** Parses "id:base64,id:base64"; throws ConfigError naming the variable and the bad entry. */
  static fromSetting(value: string): SecretBox {
    const keys: { id: string; key: Buffer }[] = [];
    const seen = new Set<string>();
    for (const [index, entry] of value.split(",").map((e) => e.trim()).entries()) {
      const at = entry.indexOf(":");
      const id = at > 0 ? entry.slice(0, at) : "";
      const encoded = at > 0 ? entry.slice(at + 1) : "";
      if (!KEY_ID.test(id)) {
        throw new ConfigError(`OUTPOST_SECRETS_MASTER_KEYS: entry ${index + 1} must be "<key id>:<base64 of 32 bytes>" (key id: letters, digits, _ . -)`);
      }
      if (seen.has(id)) throw new ConfigError(`OUTPOST_SECRETS_MASTER_KEYS: key id "${id}" appears twice`);
      const key = Buffer.from(encoded, "base64");
      // Round-trip check: Buffer.from ignores junk, so compare to catch typos.
      if (key.length !== 32 || key.toString("base64").replace(/=+$/, "") !== encoded.replace(/=+$/, "")) {
        throw new ConfigError(`OUTPOST_SECRETS_MASTER_KEYS: key "${id}" must be 32 bytes in base64 (e.g. \`openssl rand -base64 32\`)`);
      }
      seen.add(id);
      keys.push({ id, key });
    }
    return new SecretBox(keys);
  }

  hasKey(keyId: string): boolean {
    return this.keys.has(keyId);
  }

  seal(tenantId: string, name: string, plaintext: string): SealedValue {
    const iv = randomBytes(IV_BYTES);
    const cipher = createCipheriv(ALGORITHM, this.keys.get(this.currentKeyId)!, iv, { authTagLength: TAG_BYTES });
    cipher.setAAD(aad(tenantId, name));
    const body = Buffer.concat([cipher.update(plaintext, "utf8"), cipher.final(), cipher.getAuthTag()]);
    return { keyId: this.currentKeyId, iv, ciphertext: body };
  }

  /** Throws SecretKeyUnavailableError when the key id is no longer configured, and on tampering. */
  open(tenantId: string, name: string, sealed: SealedValue): string {
    const key = this.keys.get(sealed.keyId);
    if (!key) throw new SecretKeyUnavailableError(sealed.keyId);
    const body = Buffer.from(sealed.ciphertext);
    const decipher = createDecipheriv(ALGORITHM, key, Buffer.from(sealed.iv), { authTagLength: TAG_BYTES });
    decipher.setAAD(aad(tenantId, name));
    decipher.setAuthTag(body.subarray(body.length - TAG_BYTES));
    return Buffer.concat([decipher.update(body.subarray(0, body.length - TAG_BYTES)), decipher.final()]).toString("utf8");
  }
}

/** A value was sealed under a key that is no longer in OUTPOST_SECRETS_MASTER_KEYS. */
export class SecretKeyUnavailableError extends Error {
  override name = "SecretKeyUnavailableError";
  readonly keyId: string;
  constructor(keyId: string) {
    super(`secret sealed under master key "${keyId}", which is not configured`);
    this.keyId = keyId;
  }
}

function aad(tenantId: string, name: string): Buffer {
  return Buffer.from(`outpost-secret\0${tenantId}\0${name}`, "utf8");
}
