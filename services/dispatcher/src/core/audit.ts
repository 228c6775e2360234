/**
 * The audit trail (SPEC D9): every mutating call, with its tenant, principal, method, target,
 * outcome and time, kept in the dispatcher store. Tenants list their own events; admins list
 * all (optionally one tenant's). Other services report theirs through RecordAuditEvent.
 */
import { monotonicFactory } from "ulid";
import type { Logger } from "@outpost/platform";
import type { AuditRecord, AuditStore } from "../store/store.ts";

/**
 * Event ids order the trail (lists page newest first by id), so two events recorded in the same
 * millisecond must still sort in the order they were recorded.
 */
const eventId = monotonicFactory();

export type AuditEntry = Omit<AuditRecord, "id" | "time"> & { time?: number };

export class AuditLog {
  private readonly store: AuditStore;
  private readonly logger: Logger;
  private readonly now: () => number;

  constructor(store: AuditStore, logger: Logger, now: () => number = Date.now) {
    this.store = store;
    this.logger = logger;
    this.now = now;
  }

  /** Appends an event. A store failure is logged, never raised: the call itself already happened. */
  async record(entry: AuditEntry): Promise<AuditRecord> {
    const time = entry.time ?? this.now();
    const event: AuditRecord = { ...entry, id: eventId(time), time };
    try {
      await this.store.appendAudit(event);
    } catch (err) {
      this.logger.error({ err, method: entry.method, target: entry.target }, "audit event could not be stored");
    }
    return event;
  }

  list(tenantId: string | undefined, limit: number, afterId?: string): Promise<AuditRecord[]> {
    return this.store.listAudit(tenantId, limit, afterId);
  }
}
