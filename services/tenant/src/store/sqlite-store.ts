/**
 * The embedded adapter of TenantStore: node:sqlite, one file `tenant.db` under the data
 * directory (":memory:" in tests). Times are stored as integer milliseconds since the epoch.
 */
import type { DatabaseSync, SQLOutputValue } from "node:sqlite";
import { inTransaction, openSqlite, SQLITE_BUSY_TIMEOUT_MS } from "@outpost/platform";
import {
  ADMISSION_RETENTION_MS,
  DuplicateRecordError,
  type AdmissionOutcome,
  type AdmissionRequest,
  type ApiKeyRecord,
  type ReleaseOptions,
  type SecretRecord,
  type TenantUsage,
  type TenantRecord,
  type TenantState,
  type TenantStore,
  type TenantTier,
} from "./store.ts";

/** Old released admissions deleted with each release (releaseDispatch): enough to keep up, never a long pause. */
const PRUNED_PER_RELEASE = 16;

const SCHEMA = `
CREATE TABLE IF NOT EXISTS tenants (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  contact_email TEXT NOT NULL,
  tier TEXT NOT NULL,
  state TEXT NOT NULL,
  create_time INTEGER NOT NULL,
  update_time INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS api_keys (
  id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL REFERENCES tenants(id),
  display_name TEXT NOT NULL,
  key_hash TEXT NOT NULL UNIQUE,
  prefix TEXT NOT NULL,
  last_four TEXT NOT NULL,
  create_time INTEGER NOT NULL,
  last_used_time INTEGER,
  revoke_time INTEGER
) STRICT;
CREATE INDEX IF NOT EXISTS api_keys_by_tenant ON api_keys(tenant_id, id);
CREATE TABLE IF NOT EXISTS secrets (
  tenant_id TEXT NOT NULL REFERENCES tenants(id),
  name TEXT NOT NULL,
  key_id TEXT NOT NULL,
  iv BLOB NOT NULL,
  ciphertext BLOB NOT NULL,
  create_time INTEGER NOT NULL,
  update_time INTEGER NOT NULL,
  PRIMARY KEY (tenant_id, name)
) STRICT;
CREATE INDEX IF NOT EXISTS secrets_by_key ON secrets(key_id);
CREATE TABLE IF NOT EXISTS admissions (
  tenant_id TEXT NOT NULL,
  dispatch_id TEXT NOT NULL,
  day TEXT NOT NULL,
  admit_time INTEGER NOT NULL,
  release_time INTEGER,
  PRIMARY KEY (tenant_id, dispatch_id)
) STRICT;
CREATE INDEX IF NOT EXISTS admissions_by_day ON admissions(tenant_id, day);
CREATE INDEX IF NOT EXISTS admissions_active ON admissions(tenant_id) WHERE release_time IS NULL;
CREATE INDEX IF NOT EXISTS admissions_released ON admissions(release_time) WHERE release_time IS NOT NULL;
`;

/** Columns added after a table first shipped: added in place to older files. */
const ADDED_COLUMNS: { table: string; column: string; definition: string }[] = [
  { table: "tenants", column: "suspend_reason", definition: "TEXT NOT NULL DEFAULT ''" },
];

type Row = Record<string, SQLOutputValue>;

function toTenant(row: Row): TenantRecord {
  return {
    id: String(row.id),
    name: String(row.name),
    contactEmail: String(row.contact_email),
    tier: String(row.tier) as TenantTier,
    state: String(row.state) as TenantState,
    suspendReason: String(row.suspend_reason ?? ""),
    createTime: new Date(Number(row.create_time)),
    updateTime: new Date(Number(row.update_time)),
  };
}

function optionalDate(value: SQLOutputValue | undefined): Date | null {
  return value === null || value === undefined ? null : new Date(Number(value));
}

function toApiKey(row: Row): ApiKeyRecord {
  return {
    id: String(row.id),
    tenantId: String(row.tenant_id),
    displayName: String(row.display_name),
    keyHash: String(row.key_hash),
    prefix: String(row.prefix),
    lastFour: String(row.last_four),
    createTime: new Date(Number(row.create_time)),
    lastUsedTime: optionalDate(row.last_used_time),
    revokeTime: optionalDate(row.revoke_time),
  };
}

function toSecret(row: Row): SecretRecord {
  return {
    tenantId: String(row.tenant_id),
    name: String(row.name),
    keyId: String(row.key_id),
    iv: new Uint8Array(row.iv as Uint8Array),
    ciphertext: new Uint8Array(row.ciphertext as Uint8Array),
    createTime: new Date(Number(row.create_time)),
    updateTime: new Date(Number(row.update_time)),
  };
}

function isConstraintViolation(err: unknown): boolean {
  return err instanceof Error && /constraint/i.test(err.message) && /UNIQUE|PRIMARY KEY/i.test(err.message);
}

export class SqliteTenantStore implements TenantStore {
  private readonly db: DatabaseSync;

  /** `dataDir` ":memory:" keeps everything in memory (tests). */
  constructor(dataDir: string) {
    this.db = openSqlite(dataDir, "tenant.db", (db) => {
      db.exec(SCHEMA);
      for (const { table, column, definition } of ADDED_COLUMNS) {
        const columns = db.prepare(`PRAGMA table_info(${table})`).all();
        if (!columns.some((c) => c.name === column)) db.exec(`ALTER TABLE ${table} ADD COLUMN ${column} ${definition}`);
      }
    });
    // A deleted or re-sealed secret's old ciphertext would otherwise stay in the file's free
    // space: a copy of the file plus the master key it was sealed under (the key a rotation
    // retires, perhaps because it leaked) would still open it. Overwritten with zeros instead.
    this.db.exec("PRAGMA secure_delete = ON");
  }

  async createTenantWithKey(tenant: TenantRecord, key: ApiKeyRecord): Promise<void> {
    inTransaction(this.db, () => {
      this.insertTenant(tenant);
      this.insertApiKey(key);
    });
  }

  async getTenant(id: string): Promise<TenantRecord | null> {
    const row = this.db.prepare("SELECT * FROM tenants WHERE id = ?").get(id);
    return row ? toTenant(row) : null;
  }

  async transitionTenantState(
    id: string,
    expected: TenantState,
    next: TenantState,
    updateTime: Date,
    suspendReason = "",
  ): Promise<TenantRecord | null> {
    const row = this.db
      .prepare("UPDATE tenants SET state = ?, suspend_reason = ?, update_time = ? WHERE id = ? AND state = ? RETURNING *")
      .get(next, suspendReason, updateTime.getTime(), id, expected);
    return row ? toTenant(row) : null;
  }

  async updateTenantTier(id: string, tier: TenantTier, updateTime: Date): Promise<TenantRecord | null> {
    const row = this.db.prepare("UPDATE tenants SET tier = ?, update_time = ? WHERE id = ? RETURNING *").get(tier, updateTime.getTime(), id);
    return row ? toTenant(row) : null;
  }

  async listTenants(afterId: string | undefined, limit: number): Promise<TenantRecord[]> {
    return this.db
      .prepare("SELECT * FROM tenants WHERE id > ? ORDER BY id LIMIT ?")
      .all(afterId ?? "", limit)
      .map(toTenant);
  }

  async listSuspendedTenantIds(): Promise<string[]> {
    return this.db
      .prepare("SELECT id FROM tenants WHERE state = 'suspended' ORDER BY id")
      .all()
      .map((r) => String(r.id));
  }

  async createApiKey(key: ApiKeyRecord, activeLimit?: number): Promise<boolean> {
    return inTransaction(this.db, () => {
      if (activeLimit !== undefined) {
        const row = this.db.prepare("SELECT COUNT(*) AS n FROM api_keys WHERE tenant_id = ? AND revoke_time IS NULL").get(key.tenantId);
        if (Number(row?.n ?? 0) >= activeLimit) return false;
      }
      this.insertApiKey(key);
      return true;
    });
  }

  async getApiKey(id: string): Promise<ApiKeyRecord | null> {
    const row = this.db.prepare("SELECT * FROM api_keys WHERE id = ?").get(id);
    return row ? toApiKey(row) : null;
  }

  async findApiKeyByHash(keyHash: string): Promise<ApiKeyRecord | null> {
    const row = this.db.prepare("SELECT * FROM api_keys WHERE key_hash = ?").get(keyHash);
    return row ? toApiKey(row) : null;
  }

  async revokeApiKey(id: string, revokeTime: Date): Promise<ApiKeyRecord | null> {
    const row = this.db
      .prepare("UPDATE api_keys SET revoke_time = ? WHERE id = ? AND revoke_time IS NULL RETURNING *")
      .get(revokeTime.getTime(), id);
    return row ? toApiKey(row) : null;
  }

  async touchApiKey(id: string, usedTime: Date, staleBefore: Date): Promise<boolean> {
    const result = this.db
      .prepare("UPDATE api_keys SET last_used_time = ? WHERE id = ? AND (last_used_time IS NULL OR last_used_time < ?)")
      .run(usedTime.getTime(), id, staleBefore.getTime());
    return Number(result.changes) > 0;
  }

  async listApiKeys(tenantId: string, afterId: string | undefined, limit: number): Promise<ApiKeyRecord[]> {
    return this.db
      .prepare("SELECT * FROM api_keys WHERE tenant_id = ? AND id > ? ORDER BY id LIMIT ?")
      .all(tenantId, afterId ?? "", limit)
      .map(toApiKey);
  }

  async putSecret(secret: SecretRecord, maxSecrets: number): Promise<SecretRecord | null> {
    let replaced = false;
    const stored = inTransaction(this.db, () => {
      const existing = this.db.prepare("SELECT 1 FROM secrets WHERE tenant_id = ? AND name = ?").get(secret.tenantId, secret.name);
      replaced = existing !== undefined;
      if (!existing) {
        const row = this.db.prepare("SELECT COUNT(*) AS n FROM secrets WHERE tenant_id = ?").get(secret.tenantId);
        if (Number(row?.n ?? 0) >= maxSecrets) return null;
      }
      const row = this.db
        .prepare(
          `INSERT INTO secrets (tenant_id, name, key_id, iv, ciphertext, create_time, update_time) VALUES (?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT (tenant_id, name) DO UPDATE SET key_id = excluded.key_id, iv = excluded.iv,
             ciphertext = excluded.ciphertext, update_time = excluded.update_time
           RETURNING *`,
        )
        .get(
          secret.tenantId,
          secret.name,
          secret.keyId,
          secret.iv,
          secret.ciphertext,
          secret.createTime.getTime(),
          secret.updateTime.getTime(),
        );
      return toSecret(row!);
    });
    // A replaced value's old ciphertext goes the way of a deleted one (after the commit).
    if (stored && replaced) this.dropOldPageImages();
    return stored;
  }

  async getSecrets(tenantId: string, names: readonly string[]): Promise<SecretRecord[]> {
    if (names.length === 0) return [];
    return this.db
      .prepare(`SELECT * FROM secrets WHERE tenant_id = ? AND name IN (${names.map(() => "?").join(", ")})`)
      .all(tenantId, ...names)
      .map(toSecret);
  }

  async listSecrets(tenantId: string, afterName: string | undefined, limit: number): Promise<SecretRecord[]> {
    return this.db
      .prepare("SELECT * FROM secrets WHERE tenant_id = ? AND name > ? ORDER BY name LIMIT ?")
      .all(tenantId, afterName ?? "", limit)
      .map(toSecret);
  }

  async deleteSecret(tenantId: string, name: string): Promise<boolean> {
    const result = this.db.prepare("DELETE FROM secrets WHERE tenant_id = ? AND name = ?").run(tenantId, name);
    const deleted = Number(result.changes) > 0;
    if (deleted) this.dropOldPageImages();
    return deleted;
  }

  async listSecretsNotSealedWith(keyId: string, limit: number): Promise<SecretRecord[]> {
    return this.db
      .prepare("SELECT * FROM secrets WHERE key_id <> ? ORDER BY tenant_id, name LIMIT ?")
      .all(keyId, limit)
      .map(toSecret);
  }

  async resealSecret(
    tenantId: string,
    name: string,
    expected: { keyId: string; iv: Uint8Array },
    next: { keyId: string; iv: Uint8Array; ciphertext: Uint8Array },
  ): Promise<boolean> {
    const result = this.db
      .prepare("UPDATE secrets SET key_id = ?, iv = ?, ciphertext = ? WHERE tenant_id = ? AND name = ? AND key_id = ? AND iv = ?")
      .run(next.keyId, next.iv, next.ciphertext, tenantId, name, expected.keyId, expected.iv);
    const resealed = Number(result.changes) > 0;
    if (resealed) this.dropOldPageImages();
    return resealed;
  }

  async admitDispatch(request: AdmissionRequest): Promise<AdmissionOutcome> {
    // BEGIN IMMEDIATE takes the write lock before counting, so no two admissions (in this
    // process or another sharing the file) can both see room for the last slot.
    return inTransaction(this.db, (): AdmissionOutcome => {
      const seen = this.db
        .prepare("SELECT 1 FROM admissions WHERE tenant_id = ? AND dispatch_id = ?")
        .get(request.tenantId, request.dispatchId);
      if (seen) return { kind: "duplicate" };
      const usage = this.usageNow(request.tenantId, request.day);
      // The day first: with both used up, the one to name is the one a wait for a run cannot fix.
      if (usage.runsToday >= request.dailyLimit) return { kind: "over_quota", quota: "runs_per_day" };
      if (usage.activeRuns >= request.concurrentLimit) return { kind: "over_quota", quota: "concurrent_runs" };
      this.db
        .prepare("INSERT INTO admissions (tenant_id, dispatch_id, day, admit_time, release_time) VALUES (?, ?, ?, ?, NULL)")
        .run(request.tenantId, request.dispatchId, request.day, request.admitTime.getTime());
      return { kind: "admitted" };
    });
  }

  async releaseDispatch(tenantId: string, dispatchId: string, releaseTime: Date, options: ReleaseOptions = {}): Promise<boolean> {
    const at = releaseTime.getTime();
    // One transaction, so an admission cannot slip in between the statements and stay held.
    return inTransaction(this.db, () => {
      const result = this.db
        .prepare("UPDATE admissions SET release_time = ? WHERE tenant_id = ? AND dispatch_id = ? AND release_time IS NULL")
        .run(at, tenantId, dispatchId);
      // The day's count is the rows with that day: a refund takes the row out of it ('' is no
      // day), once, since a row already out of it is not matched again. The row stays, so the id
      // still answers "duplicate".
      if (options.refundDay) {
        this.db.prepare("UPDATE admissions SET day = '' WHERE tenant_id = ? AND dispatch_id = ? AND day <> ''").run(tenantId, dispatchId);
      }
      // Admissions released longer ago than the retention go, a few at a time, as MongoDB's TTL
      // deletes them: without it the table grew by a row per dispatch for ever. None of them
      // counts for today: each was admitted before it was released, over 30 days ago.
      this.db
        .prepare(
          "DELETE FROM admissions WHERE rowid IN (SELECT rowid FROM admissions WHERE release_time IS NOT NULL AND release_time < ? ORDER BY release_time LIMIT ?)",
        )
        .run(at - ADMISSION_RETENTION_MS, PRUNED_PER_RELEASE);
      if (Number(result.changes) > 0) return true;
      // Never admitted (yet): the released mark, with no day, so it counts against nothing.
      this.db
        .prepare("INSERT INTO admissions (tenant_id, dispatch_id, day, admit_time, release_time) VALUES (?, ?, '', ?, ?) ON CONFLICT DO NOTHING")
        .run(tenantId, dispatchId, at, at);
      return false;
    });
  }

  async usageOf(tenantId: string, day: string): Promise<TenantUsage> {
    return this.usageNow(tenantId, day);
  }

  async close(): Promise<void> {
    if (this.db.isOpen) this.db.close();
  }

  /**
   * The write-ahead log still holds the pages as they were before (the deleted or re-sealed
   * ciphertext) until it is checkpointed and overwritten: checkpointed into the main file (whose
   * freed space secure_delete zeroes) and truncated. Best effort: with a reader in the way the
   * checkpoint stops short, and the next one (or SQLite's automatic one) finishes the job. It
   * waits for such a reader (another process on the file) at most 100 ms, not the store's 5 s
   * busy timeout: node:sqlite is synchronous, so the wait would stop every call in the service.
   */
  private dropOldPageImages(): void {
    try {
      this.db.exec("PRAGMA busy_timeout = 100");
      this.db.exec("PRAGMA wal_checkpoint(TRUNCATE)");
    } catch {
      // The change itself is committed; the file is cleaned by a later checkpoint.
    } finally {
      this.db.exec(`PRAGMA busy_timeout = ${SQLITE_BUSY_TIMEOUT_MS}`);
    }
  }

  private usageNow(tenantId: string, day: string): TenantUsage {
    const active = this.db.prepare("SELECT COUNT(*) AS n FROM admissions WHERE tenant_id = ? AND release_time IS NULL").get(tenantId);
    const today = this.db.prepare("SELECT COUNT(*) AS n FROM admissions WHERE tenant_id = ? AND day = ?").get(tenantId, day);
    return { activeRuns: Number(active?.n ?? 0), runsToday: Number(today?.n ?? 0) };
  }

  private insertTenant(t: TenantRecord): void {
    try {
      this.db
        .prepare(
          "INSERT INTO tenants (id, name, contact_email, tier, state, suspend_reason, create_time, update_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .run(t.id, t.name, t.contactEmail, t.tier, t.state, t.suspendReason, t.createTime.getTime(), t.updateTime.getTime());
    } catch (err) {
      if (isConstraintViolation(err)) throw new DuplicateRecordError(`tenant ${t.id} already exists`, { cause: err });
      throw err;
    }
  }

  private insertApiKey(k: ApiKeyRecord): void {
    try {
      this.db
        .prepare(
          `INSERT INTO api_keys (id, tenant_id, display_name, key_hash, prefix, last_four, create_time, last_used_time, revoke_time)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
        )
        .run(
          k.id,
          k.tenantId,
          k.displayName,
          k.keyHash,
          k.prefix,
          k.lastFour,
          k.createTime.getTime(),
          k.lastUsedTime?.getTime() ?? null,
          k.revokeTime?.getTime() ?? null,
        );
    } catch (err) {
      // The message names the constraint only, never the hash value.
      if (isConstraintViolation(err)) throw new DuplicateRecordError(`api key ${k.id} collides with an existing id or hash`, { cause: err });
      throw err;
    }
  }
}
