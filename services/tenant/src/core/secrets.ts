/**
 * Per-tenant named secrets (SPEC T5): stored sealed (core/secret-box.ts), listed by name only,
 * opened only for executors at run start (ResolveSecrets) and checked for existence when a
 * dispatch is admitted. Values sealed under an older master key are re-sealed under the
 * current one when read, and all at once by `reencryptAll` (the rotate command).
 */
import { Code } from "@connectrpc/connect";
import { failedPrecondition, notFound, outpostError, resourceExhausted } from "@outpost/platform";
import type { SecretRecord, TenantStore } from "../store/store.ts";
import { SecretKeyUnavailableError, type SecretBox } from "./secret-box.ts";
import { pageOf, type Page } from "./tenants.ts";

export const SECRET_NAME_PATTERN = /^[A-Z_][A-Z0-9_]{0,127}$/;
/** Values become environment variables: 32 KiB is far above any token and far below ARG_MAX. */
export const SECRET_VALUE_MAX_BYTES = 32 * 1024;
/** Bounds what one tenant can make the store (and a run's environment) hold. */
export const MAX_SECRETS_PER_TENANT = 200;

export interface SecretsLogger {
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
  error(obj: object, msg: string): void;
}

/** NOT_FOUND naming the secret (contract A/B): reason SECRET_NOT_FOUND, metadata.secret. */
export function secretNotFound(name: string) {
  return outpostError(Code.NotFound, "SECRET_NOT_FOUND", `secret "${name}" not found`, { resource: "secret", id: name, secret: name });
}

export class SecretsCore {
  private readonly store: TenantStore;
  private readonly box: SecretBox | undefined;
  private readonly now: () => Date;
  private readonly logger: SecretsLogger | undefined;

  constructor(options: { store: TenantStore; box: SecretBox | undefined; now?: () => Date; logger?: SecretsLogger }) {
    this.store = options.store;
    this.box = options.box;
    this.now = options.now ?? (() => new Date());
    this.logger = options.logger;
  }

  async put(tenantId: string, name: string, value: string): Promise<SecretRecord> {
    const box = this.requireBox();
    const now = this.now();
    const sealed = box.seal(tenantId, name, value);
    const stored = await this.store.putSecret({ tenantId, name, ...sealed, createTime: now, updateTime: now }, MAX_SECRETS_PER_TENANT);
    if (!stored) {
      throw resourceExhausted("secrets", `a tenant can hold at most ${MAX_SECRETS_PER_TENANT} secrets`, {
        limit: String(MAX_SECRETS_PER_TENANT),
      });
    }
    return stored;
  }

  async list(tenantId: string, pageSize: number, after: string | undefined): Promise<Page<SecretRecord>> {
    return pageOf(await this.store.listSecrets(tenantId, after, pageSize + 1), pageSize, (s) => s.name);
  }

  async delete(tenantId: string, name: string): Promise<void> {
    if (!(await this.store.deleteSecret(tenantId, name))) throw notFound("secret", name);
  }

  /** The first of `names` (in the order given) that the tenant has no secret for, if any. */
  async firstMissing(tenantId: string, names: readonly string[]): Promise<string | undefined> {
    if (names.length === 0) return undefined;
    const found = new Set((await this.store.getSecrets(tenantId, names)).map((s) => s.name));
    return names.find((n) => !found.has(n));
  }

  /** Opens the named secrets; NOT_FOUND naming the first missing one. */
  async resolve(tenantId: string, names: readonly string[]): Promise<Record<string, string>> {
    const unique = [...new Set(names)];
    const records = new Map((await this.store.getSecrets(tenantId, unique)).map((s) => [s.name, s]));
    const missing = unique.find((n) => !records.has(n));
    if (missing !== undefined) throw secretNotFound(missing);
    if (unique.length === 0) return {};
    const box = this.requireBox();
    const values: Record<string, string> = {};
    for (const name of unique) {
      const record = records.get(name)!;
      values[name] = this.open(box, record);
      if (record.keyId !== box.currentKeyId) await this.resealQuietly(box, record, values[name]);
    }
    return values;
  }

  /** Re-seals every value not under the current key; returns how many were moved. */
  async reencryptAll(batchSize = 100): Promise<{ resealed: number; failed: number }> {
    const box = this.requireBox();
    let resealed = 0;
    let failed = 0;
    const skip = new Set<string>();
    for (;;) {
      const batch = (await this.store.listSecretsNotSealedWith(box.currentKeyId, batchSize + skip.size)).filter(
        (r) => !skip.has(`${r.tenantId}/${r.name}`),
      );
      if (batch.length === 0) break;
      for (const record of batch) {
        try {
          if (await this.reseal(box, record, this.open(box, record))) resealed++;
        } catch (err) {
          // Keeps going: one unreadable value (key dropped too early) must not stop the rest.
          failed++;
          skip.add(`${record.tenantId}/${record.name}`);
          this.logger?.error({ tenant_id: record.tenantId, secret_name: record.name, err: (err as Error).message }, "cannot re-encrypt secret");
        }
      }
    }
    return { resealed, failed };
  }

  private open(box: SecretBox, record: SecretRecord): string {
    try {
      return box.open(record.tenantId, record.name, record);
    } catch (err) {
      if (err instanceof SecretKeyUnavailableError) {
        throw failedPrecondition(
          "SECRET_KEY_UNAVAILABLE",
          `secret "${record.name}" is sealed under master key "${err.keyId}", which is no longer configured`,
          { secret: record.name, key_id: err.keyId },
        );
      }
      // Tampered or corrupt: say so without any value.
      throw failedPrecondition("SECRET_UNREADABLE", `secret "${record.name}" cannot be decrypted`, { secret: record.name });
    }
  }

  /**
   * Moving a value to the current key on read is housekeeping: if the write fails (the store
   * busy or away), the run still gets its secret, and the next read or the bulk command moves it.
   */
  private async resealQuietly(box: SecretBox, record: SecretRecord, value: string): Promise<void> {
    try {
      await this.reseal(box, record, value);
    } catch (err) {
      this.logger?.warn({ err, tenant_id: record.tenantId, secret_name: record.name }, "secret not re-encrypted on read; it still reads under its old key");
    }
  }

  private async reseal(box: SecretBox, record: SecretRecord, value: string): Promise<boolean> {
    const next = box.seal(record.tenantId, record.name, value);
    const done = await this.store.resealSecret(record.tenantId, record.name, { keyId: record.keyId, iv: record.iv }, next);
    if (done) this.logger?.info({ tenant_id: record.tenantId, secret_name: record.name, from: record.keyId, to: next.keyId }, "secret re-encrypted under the current master key");
    return done;
  }

  private requireBox(): SecretBox {
    if (!this.box) {
      throw failedPrecondition(
        "SECRETS_NOT_CONFIGURED",
        "secrets are not available: the operator has not set OUTPOST_SECRETS_MASTER_KEYS on the tenant service",
      );
    }
    return this.box;
  }
}
