/**
 * Embedded dispatch store on node:sqlite. Conditional updates are single UPDATE statements
 * whose WHERE clause carries the expectation, so they are atomic across processes sharing
 * the file; leasing picks and claims the oldest queued row inside one write transaction.
 */
import type { DatabaseSync, SQLInputValue, StatementSync } from "node:sqlite";
import { inTransaction, openSqlite } from "@outpost/platform";
import { AUDIT_RETENTION_MS, EXECUTOR_RETENTION_MS } from "./store.ts";
import type {
  AuditRecord,
  DispatchPatch,
  DispatchRecord,
  DispatcherStore,
  DispatchState,
  Expectation,
  ExecutorReport,
  KeyBinding,
  LeaseRequest,
  ListFilter,
  StoredAgent,
} from "./store.ts";

/** Audit events past the retention deleted with each new one (appendAudit): enough to keep up, never a long pause. */
const PRUNED_PER_WRITE = 16;

const SCHEMA = `
CREATE TABLE IF NOT EXISTS dispatches (
  id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL,
  agent TEXT NOT NULL,
  task TEXT NOT NULL,
  repo_url TEXT NOT NULL,
  repo_ref TEXT NOT NULL,
  model TEXT NOT NULL,
  model_tier INTEGER NOT NULL,
  timeout_ms INTEGER NOT NULL,
  secret_names TEXT NOT NULL,
  env TEXT NOT NULL,
  labels TEXT NOT NULL,
  request_id TEXT NOT NULL,
  state TEXT NOT NULL,
  attempt INTEGER NOT NULL,
  exit_code INTEGER,
  failure_reason TEXT NOT NULL,
  result_json TEXT,
  executor_id TEXT NOT NULL,
  lease_id TEXT NOT NULL,
  lease_expires_at INTEGER,
  cancel_requested INTEGER NOT NULL,
  not_before INTEGER NOT NULL DEFAULT 0,
  traceparent TEXT NOT NULL,
  resource_caps TEXT NOT NULL DEFAULT 'null',
  slot_held INTEGER NOT NULL DEFAULT 0,
  create_time INTEGER NOT NULL,
  start_time INTEGER,
  end_time INTEGER,
  update_time INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS dispatches_request_id ON dispatches (tenant_id, request_id) WHERE request_id <> '';
CREATE INDEX IF NOT EXISTS dispatches_tenant ON dispatches (tenant_id, id);
CREATE INDEX IF NOT EXISTS dispatches_queue ON dispatches (state, id);
CREATE INDEX IF NOT EXISTS dispatches_lease ON dispatches (state, lease_expires_at);
CREATE INDEX IF NOT EXISTS dispatches_executor ON dispatches (executor_id, state);
CREATE INDEX IF NOT EXISTS dispatches_created ON dispatches (create_time);
CREATE INDEX IF NOT EXISTS dispatches_slot_owed ON dispatches (end_time) WHERE slot_held = 1 AND end_time IS NOT NULL;
-- Round-robin fairness: the turn number of the last lease each tenant got.
CREATE TABLE IF NOT EXISTS tenant_turns (
  tenant_id TEXT PRIMARY KEY,
  last_turn INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
  name TEXT PRIMARY KEY,
  agent_json TEXT NOT NULL,
  version INTEGER NOT NULL,
  update_time INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_events (
  id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL,
  principal TEXT NOT NULL,
  method TEXT NOT NULL,
  target TEXT NOT NULL,
  outcome TEXT NOT NULL,
  time INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_tenant ON audit_events (tenant_id, id);
CREATE TABLE IF NOT EXISTS executors (
  executor_id TEXT PRIMARY KEY,
  slots_total INTEGER NOT NULL,
  slots_busy INTEGER NOT NULL,
  warm_containers INTEGER NOT NULL,
  engine_ready INTEGER NOT NULL,
  images_present TEXT NOT NULL,
  seen_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS executor_keys (
  executor_id TEXT PRIMARY KEY,
  public_key TEXT NOT NULL,
  expires_at INTEGER NOT NULL
);
`;

/** Columns added after the first release: added to existing databases at open. */
const MIGRATIONS: [column: string, ddl: string][] = [
  ["not_before", "ALTER TABLE dispatches ADD COLUMN not_before INTEGER NOT NULL DEFAULT 0"],
  ["resource_caps", "ALTER TABLE dispatches ADD COLUMN resource_caps TEXT NOT NULL DEFAULT 'null'"],
  // Runs still active at the upgrade hold their slot; ended ones were released (or logged as lost).
  [
    "slot_held",
    `ALTER TABLE dispatches ADD COLUMN slot_held INTEGER NOT NULL DEFAULT 0;
     UPDATE dispatches SET slot_held = 1 WHERE state IN ('QUEUED', 'STARTING', 'RUNNING')`,
  ],
];

/** Record field -> column, with JSON for the structured fields. */
const COLUMNS: Record<keyof DispatchRecord, string> = {
  id: "id",
  tenantId: "tenant_id",
  agent: "agent",
  task: "task",
  repoUrl: "repo_url",
  repoRef: "repo_ref",
  model: "model",
  modelTier: "model_tier",
  timeoutMs: "timeout_ms",
  secretNames: "secret_names",
  env: "env",
  labels: "labels",
  requestId: "request_id",
  state: "state",
  attempt: "attempt",
  exitCode: "exit_code",
  failureReason: "failure_reason",
  resultJson: "result_json",
  executorId: "executor_id",
  leaseId: "lease_id",
  leaseExpiresAt: "lease_expires_at",
  cancelRequested: "cancel_requested",
  notBefore: "not_before",
  traceparent: "traceparent",
  resourceCaps: "resource_caps",
  slotHeld: "slot_held",
  createTime: "create_time",
  startTime: "start_time",
  endTime: "end_time",
  updateTime: "update_time",
};
const JSON_FIELDS = new Set<keyof DispatchRecord>(["secretNames", "env", "labels", "resourceCaps"]);

function toColumn(field: keyof DispatchRecord, value: unknown): SQLInputValue {
  if (JSON_FIELDS.has(field)) return JSON.stringify(value);
  if (typeof value === "boolean") return value ? 1 : 0;
  return value as SQLInputValue;
}

/** COLUMNS as pairs, made once: every read of a row walks them (GetDispatch is the hot path). */
const COLUMN_PAIRS = Object.entries(COLUMNS) as [keyof DispatchRecord, string][];

function fromRow(row: Record<string, unknown>): DispatchRecord {
  const record = {} as Record<string, unknown>;
  for (const [field, column] of COLUMN_PAIRS) {
    const value = row[column];
    record[field] = JSON_FIELDS.has(field) ? JSON.parse(value as string) : value;
  }
  record.cancelRequested = row.cancel_requested === 1;
  record.slotHeld = row.slot_held === 1;
  return record as unknown as DispatchRecord;
}

export class SqliteDispatchStore implements DispatcherStore {
  private readonly db: DatabaseSync;
  /** Prepared once per SQL text: compiling statements was a measurable share of every call. */
  private readonly statements = new Map<string, StatementSync>();
  /** When recordExecutor last deleted executors and key bindings past EXECUTOR_RETENTION_MS. */
  private executorsSweptAt = 0;

  private statement(sql: string): StatementSync {
    let prepared = this.statements.get(sql);
    if (!prepared) {
      prepared = this.db.prepare(sql);
      this.statements.set(sql, prepared);
    }
    return prepared;
  }

  constructor(dataDir: string) {
    this.db = openSqlite(dataDir, "dispatcher.db", (db) => {
      const existing = db.prepare("SELECT name FROM pragma_table_info('dispatches')").all().map((r) => r.name);
      if (existing.length > 0) {
        for (const [column, ddl] of MIGRATIONS) if (!existing.includes(column)) db.exec(ddl);
      }
      db.exec(SCHEMA);
    });
  }

  async findByRequestId(tenantId: string, requestId: string) {
    if (!requestId) return undefined;
    const row = this.statement("SELECT * FROM dispatches WHERE tenant_id = ? AND request_id = ?").get(tenantId, requestId);
    return row ? fromRow(row) : undefined;
  }

  async insert(record: DispatchRecord) {
    const fields = Object.keys(COLUMNS) as (keyof DispatchRecord)[];
    const result = this.statement(
        `INSERT INTO dispatches (${fields.map((f) => COLUMNS[f]).join(", ")}) VALUES (${fields.map(() => "?").join(", ")})
         ON CONFLICT (tenant_id, request_id) WHERE request_id <> '' DO NOTHING`,
      )
      .run(...fields.map((f) => toColumn(f, record[f])));
    if (result.changes === 1) return { record, created: true };
    const existing = this.statement("SELECT * FROM dispatches WHERE tenant_id = ? AND request_id = ?")
      .get(record.tenantId, record.requestId);
    if (!existing) throw new Error(`dispatch ${record.id} conflicted but no existing row was found`);
    return { record: fromRow(existing), created: false };
  }

  async get(id: string) {
    const row = this.statement("SELECT * FROM dispatches WHERE id = ?").get(id);
    return row ? fromRow(row) : undefined;
  }

  async list(tenantId: string, filter: ListFilter, limit: number, afterId?: string) {
    const where = ["tenant_id = ?"];
    const params: SQLInputValue[] = [tenantId];
    const add = (clause: string, ...values: SQLInputValue[]) => {
      where.push(clause);
      params.push(...values);
    };
    if (afterId) add("id < ?", afterId);
    if (filter.state) add("state = ?", filter.state);
    if (filter.agent) add("agent = ?", filter.agent);
    for (const [key, value] of Object.entries(filter.labels ?? {})) {
      add("json_extract(labels, ?) = ?", `$."${key}"`, value);
    }
    params.push(limit);
    return this.statement(`SELECT * FROM dispatches WHERE ${where.join(" AND ")} ORDER BY id DESC LIMIT ?`)
      .all(...params)
      .map(fromRow);
  }

  async update(id: string, expected: Expectation, patch: DispatchPatch) {
    const fields = Object.keys(patch) as (keyof DispatchPatch)[];
    const sets = fields.map((f) => `${COLUMNS[f]} = ?`);
    const params: SQLInputValue[] = fields.map((f) => toColumn(f, patch[f]));
    const where = [`id = ?`, `state IN (${expected.states.map(() => "?").join(", ")})`];
    params.push(id, ...expected.states);
    if (expected.leaseId !== undefined) {
      where.push("lease_id = ?");
      params.push(expected.leaseId);
    }
    if (expected.leaseExpiredBefore !== undefined) {
      where.push("lease_expires_at IS NOT NULL AND lease_expires_at < ?");
      params.push(expected.leaseExpiredBefore);
    }
    if (expected.cancelRequested !== undefined) {
      where.push("cancel_requested = ?");
      params.push(expected.cancelRequested ? 1 : 0);
    }
    const row = this.statement(`UPDATE dispatches SET ${sets.join(", ")} WHERE ${where.join(" AND ")} RETURNING *`)
      .get(...params);
    return row ? fromRow(row) : undefined;
  }

  async leaseNext(lease: LeaseRequest) {
    // One write transaction: SQLite serialises writers across processes, so the pick and the
    // claim cannot interleave with another replica's.
    return inTransaction(this.db, () => {
      const row = this.statement(
          `UPDATE dispatches SET state = 'STARTING', executor_id = ?, lease_id = ?, lease_expires_at = ?,
             attempt = attempt + 1, update_time = ?
           WHERE id = (
             SELECT q.id FROM dispatches q LEFT JOIN tenant_turns t ON t.tenant_id = q.tenant_id
             WHERE q.state = 'QUEUED' AND q.not_before <= ? AND q.tenant_id NOT IN (SELECT value FROM json_each(?))
             ORDER BY COALESCE(t.last_turn, 0), q.id LIMIT 1
           ) AND state = 'QUEUED'
           RETURNING *`,
        )
        .get(lease.executorId, lease.leaseId, lease.expiresAt, lease.now, lease.now, JSON.stringify(lease.excludeTenants ?? []));
      if (!row) return undefined;
      this.statement(
          `INSERT INTO tenant_turns (tenant_id, last_turn) VALUES (?, (SELECT COALESCE(MAX(last_turn), 0) + 1 FROM tenant_turns))
           ON CONFLICT (tenant_id) DO UPDATE SET last_turn = excluded.last_turn`,
        )
        .run(row.tenant_id as string);
      return fromRow(row);
    });
  }

  async listLeasedTo(executorId: string, limit: number) {
    return this.statement(`SELECT * FROM dispatches WHERE executor_id = ? AND state IN ('STARTING', 'RUNNING') ORDER BY id LIMIT ?`)
      .all(executorId, limit)
      .map(fromRow);
  }

  async queueDepth() {
    const row = this.statement(`SELECT COUNT(*) AS n FROM dispatches WHERE state = 'QUEUED'`).get();
    return Number(row?.n ?? 0);
  }

  async activeLeases() {
    const row = this.statement(`SELECT COUNT(*) AS n FROM dispatches WHERE state IN ('STARTING', 'RUNNING')`).get();
    return Number(row?.n ?? 0);
  }

  async countByStateSince(since: number) {
    const counts: Partial<Record<DispatchState, number>> = {};
    for (const row of this.statement(`SELECT state, COUNT(*) AS n FROM dispatches WHERE create_time >= ? GROUP BY state`).all(since)) {
      counts[row.state as DispatchState] = Number(row.n);
    }
    return counts;
  }

  async listAgents(): Promise<StoredAgent[]> {
    return this.statement("SELECT * FROM agents ORDER BY name")
      .all()
      .map((r) => ({ name: r.name as string, agentJson: r.agent_json as string, version: Number(r.version), updateTime: Number(r.update_time) }));
  }

  async putAgent(name: string, agentJson: string, expectedVersion: number, now: number): Promise<StoredAgent | undefined> {
    const result =
      expectedVersion === 0
        ? this.statement("INSERT INTO agents (name, agent_json, version, update_time) VALUES (?, ?, 1, ?) ON CONFLICT (name) DO NOTHING")
            .run(name, agentJson, now)
        : this.statement("UPDATE agents SET agent_json = ?, version = version + 1, update_time = ? WHERE name = ? AND version = ?")
            .run(agentJson, now, name, expectedVersion);
    if (result.changes !== 1) return undefined;
    return { name, agentJson, version: expectedVersion + 1, updateTime: now };
  }

  async appendAudit(event: AuditRecord) {
    this.statement("INSERT INTO audit_events (id, tenant_id, principal, method, target, outcome, time) VALUES (?, ?, ?, ?, ?, ?, ?)")
      .run(event.id, event.tenantId, event.principal, event.method, event.target, event.outcome, event.time);
    // Past the retention they go as MongoDB's TTL deletes them, a few with each new one: the oldest
    // by id (a ULID, so by time, on the primary key's index), those of them old enough.
    this.statement(`DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events ORDER BY id LIMIT ${PRUNED_PER_WRITE}) AND time < ?`).run(
      event.time - AUDIT_RETENTION_MS,
    );
  }

  async listAudit(tenantId: string | undefined, limit: number, afterId?: string): Promise<AuditRecord[]> {
    const where: string[] = [];
    const params: SQLInputValue[] = [];
    if (tenantId !== undefined) {
      where.push("tenant_id = ?");
      params.push(tenantId);
    }
    if (afterId) {
      where.push("id < ?");
      params.push(afterId);
    }
    params.push(limit);
    return this.statement(`SELECT * FROM audit_events ${where.length ? `WHERE ${where.join(" AND ")}` : ""} ORDER BY id DESC LIMIT ?`)
      .all(...params)
      .map((r) => ({
        id: r.id as string,
        tenantId: r.tenant_id as string,
        principal: r.principal as string,
        method: r.method as string,
        target: r.target as string,
        outcome: r.outcome as string,
        time: Number(r.time),
      }));
  }

  async recordExecutor(report: ExecutorReport) {
    this.statement(
        `INSERT INTO executors (executor_id, slots_total, slots_busy, warm_containers, engine_ready, images_present, seen_at)
         VALUES (?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (executor_id) DO UPDATE SET slots_total = excluded.slots_total, slots_busy = excluded.slots_busy,
           warm_containers = excluded.warm_containers, engine_ready = excluded.engine_ready,
           images_present = excluded.images_present, seen_at = excluded.seen_at`,
      )
      .run(
        report.executorId,
        report.slotsTotal,
        report.slotsBusy,
        report.warmContainers,
        report.engineReady ? 1 : 0,
        JSON.stringify(report.imagesPresent),
        report.seenAt,
      );
    // Reports come with every heartbeat: old ones (executors long gone) are swept once a minute.
    if (report.seenAt - this.executorsSweptAt >= 60_000) {
      this.executorsSweptAt = report.seenAt;
      this.statement("DELETE FROM executors WHERE seen_at < ?").run(report.seenAt - EXECUTOR_RETENTION_MS);
      this.statement("DELETE FROM executor_keys WHERE expires_at < ?").run(report.seenAt - EXECUTOR_RETENTION_MS);
    }
  }

  async bindExecutorKey(executorId: string, publicKey: string, expiresAt: number, now: number): Promise<KeyBinding> {
    return inTransaction(this.db, () => {
      const before = this.statement("SELECT public_key, expires_at FROM executor_keys WHERE executor_id = ?").get(executorId);
      // One conditional upsert: the row changes only when it is new, the same key, or over.
      const changed = this.statement(
        `INSERT INTO executor_keys (executor_id, public_key, expires_at) VALUES (?, ?, ?)
         ON CONFLICT (executor_id) DO UPDATE SET public_key = excluded.public_key, expires_at = excluded.expires_at
         WHERE executor_keys.public_key = excluded.public_key OR executor_keys.expires_at < ?`,
      ).run(executorId, publicKey, expiresAt, now).changes;
      if (Number(changed) > 0) return { bound: true, renewed: before?.public_key === publicKey && Number(before.expires_at) >= now };
      return { bound: false, boundUntil: Number(before?.expires_at ?? 0) };
    });
  }

  async listExecutors(seenSince: number): Promise<ExecutorReport[]> {
    return this.statement("SELECT * FROM executors WHERE seen_at >= ? ORDER BY executor_id")
      .all(seenSince)
      .map((r) => ({
        executorId: r.executor_id as string,
        slotsTotal: Number(r.slots_total),
        slotsBusy: Number(r.slots_busy),
        warmContainers: Number(r.warm_containers),
        engineReady: r.engine_ready === 1,
        imagesPresent: JSON.parse(r.images_present as string) as string[],
        seenAt: Number(r.seen_at),
      }));
  }

  async listExpiredLeases(now: number, limit: number) {
    return this.statement(
        `SELECT * FROM dispatches WHERE state IN ('STARTING', 'RUNNING') AND lease_expires_at < ? ORDER BY lease_expires_at LIMIT ?`,
      )
      .all(now, limit)
      .map(fromRow);
  }

  async listSlotsOwed(endedBefore: number, limit: number) {
    return this.statement(`SELECT * FROM dispatches WHERE slot_held = 1 AND end_time IS NOT NULL AND end_time < ? ORDER BY end_time LIMIT ?`)
      .all(endedBefore, limit)
      .map(fromRow);
  }

  async close() {
    this.db.close();
  }
}
