/**
 * The telemetry logic (SPEC L1-L3), free of transport: ingest with exact acknowledgements,
 * run registration and ends, paged history, and live subscriptions that join storage and the
 * live feed on the shared per-run sequence number.
 */
import { failedPrecondition, notFound, permissionDenied, resourceExhausted } from "@outpost/platform";
import type { TelemetryStore } from "../store/store.ts";
import type { LiveFeed } from "./live-feed.ts";
import { LIMITS, type RunEndRecord, type RunRecord, type StoredChunk } from "./model.ts";
import { SubscriberBuffer } from "./subscriber-buffer.ts";

export interface TelemetryCoreOptions {
  /** Live chunks a subscription may hold before it falls back to storage. */
  subscriberBufferChunks?: number;
  /**
   * After a run ended, how long a subscription waits for chunks up to run_end.last_seq that
   * have not arrived (an executor that died before flushing) before it ends with what is stored.
   */
  endGraceMs?: number;
  /** Chunks read from storage per query (also the most per message). */
  storagePageSize?: number;
  /**
   * How long a live subscription waits for a wake-up before it checks storage anyway: a safety
   * net for a live message lost between replicas (e.g. while Redis reconnects).
   */
  idlePollMs?: number;
  /**
   * Open subscriptions one tenant may hold on this replica. Each costs a live inbox, a timer and
   * storage reads; without a bound one tenant's client could open them until the process runs
   * out of memory.
   */
  maxSubscriptionsPerTenant?: number;
  /** Counts for metrics; the core stays free of the metrics library. */
  observer?: TelemetryObserver;
}

/** What the core reports as it works (wired to Prometheus metrics in service.ts). */
export interface TelemetryObserver {
  /** Chunks newly stored by ingest (resends excluded). */
  ingested(chunks: readonly StoredChunk[]): void;
  subscriptionOpened(): void;
  subscriptionClosed(): void;
  /** A subscriber fell behind: its live buffer was dropped and it continues from storage. */
  subscriberOverflowed(): void;
}

/** One message of a subscription: chunks in seq order, and the run's end on the last one. */
export interface SubscriptionBatch {
  chunks: StoredChunk[];
  end: RunEndRecord | undefined;
  /** The subscriber fell behind since the previous message; these chunks come from storage. */
  resumedFromStorage?: boolean;
  /** Live chunks the subscription's buffer dropped so far. */
  droppedLiveChunks?: number;
}

export interface LogsPage {
  chunks: StoredChunk[];
  /** Seq to continue after, when there may be more. */
  nextAfterSeq: number | undefined;
}

/**
 * Rows GetLogs reads from the store at a time while it fills a page: a page is cut at
 * LIMITS.maxBytesPerMessage, so reading all of page_size (1,000 rows of up to 64 KiB) at once
 * could load 64 MiB to answer 1 MiB.
 */
const HISTORY_READ_ROWS = 100;

/** Open subscriptions per tenant per replica unless configured (the benchmark holds 1,000 on one run). */
export const DEFAULT_MAX_SUBSCRIPTIONS_PER_TENANT = 2000;

function ownedByAnother(dispatchId: string): never {
  throw permissionDenied("RUN_OWNED_BY_OTHER_TENANT", `run ${dispatchId} belongs to another tenant`);
}

export class TelemetryCore {
  readonly #store: TelemetryStore;
  readonly #feed: LiveFeed;
  readonly #bufferChunks: number;
  readonly #endGraceMs: number;
  readonly #pageSize: number;
  readonly #idlePollMs: number;
  readonly #observer: TelemetryObserver | undefined;
  readonly #maxPerTenant: number;
  /** Open subscriptions by tenant (entries removed at zero). */
  readonly #openByTenant = new Map<string, number>();

  constructor(store: TelemetryStore, feed: LiveFeed, options: TelemetryCoreOptions = {}) {
    this.#idlePollMs = options.idlePollMs ?? 5_000;
    this.#observer = options.observer;
    this.#maxPerTenant = options.maxSubscriptionsPerTenant ?? DEFAULT_MAX_SUBSCRIPTIONS_PER_TENANT;
    this.#store = store;
    this.#feed = feed;
    this.#bufferChunks = options.subscriberBufferChunks ?? 2000;
    this.#endGraceMs = options.endGraceMs ?? 30_000;
    this.#pageSize = Math.min(options.storagePageSize ?? LIMITS.maxChunksPerMessage, LIMITS.maxChunksPerMessage);
  }

  /** Idempotent for the same tenant; a run owned by another tenant is refused. `retentionMs` sets how long it is kept. */
  async registerRun(dispatchId: string, tenantId: string, retentionMs?: number): Promise<void> {
    const result = await this.#store.registerRun(dispatchId, tenantId, retentionMs);
    if (result.outcome === "other-tenant") ownedByAnother(dispatchId);
  }

  /** Stores a batch (resends ignored), publishes what is new, answers the contiguous acked seq. */
  async ingest(dispatchId: string, tenantId: string, chunks: StoredChunk[]): Promise<number> {
    const result = await this.#store.insertChunks(dispatchId, tenantId, chunks);
    if (result.outcome === "other-tenant") ownedByAnother(dispatchId);
    if (result.outcome === "past-end") {
      // Subscriptions stop at last_seq, so storing these would make history disagree with
      // every stream; only a confused or stale writer sends them (the executor reports the
      // end after everything it wrote was acknowledged).
      throw failedPrecondition("RUN_ENDED", `run ${dispatchId} ended at seq ${result.lastSeq}; chunks after it are refused`, {
        last_seq: String(result.lastSeq),
      });
    }
    this.#feed.publish(dispatchId, result.inserted);
    if (result.inserted.length > 0) this.#observer?.ingested(result.inserted);
    return result.ackedSeq;
  }

  /** Records the run's end once (the first end wins) and wakes its subscriptions. */
  async completeRun(dispatchId: string, tenantId: string, end: RunEndRecord): Promise<void> {
    const result = await this.#store.endRun(dispatchId, tenantId, end);
    if (result.outcome === "other-tenant") ownedByAnother(dispatchId);
    if (result.run.end) this.#feed.publishEnd(dispatchId, result.run.end);
  }

  /** The run, if it exists and belongs to the tenant; otherwise NOT_FOUND exactly as for a missing id (SPEC T4). */
  async #ownRun(tenantId: string, dispatchId: string): Promise<RunRecord> {
    const run = await this.#store.getRun(dispatchId);
    if (!run || run.tenantId !== tenantId) throw notFound("dispatch", dispatchId);
    return run;
  }

  /**
   * Stored chunks with afterSeq < seq (<= endSeq when given), a page at a time: at most
   * `pageSize` chunks and, like a subscription message, about LIMITS.maxBytesPerMessage of
   * text (at least one chunk). Without the byte bound a page of long lines reached 64 MiB,
   * over what gRPC clients accept by default (4 MiB).
   */
  async getLogs(tenantId: string, dispatchId: string, afterSeq: number, pageSize: number, endSeq?: number): Promise<LogsPage> {
    await this.#ownRun(tenantId, dispatchId);
    const size = Math.max(1, pageSize);
    const chunks: StoredChunk[] = [];
    let bytes = 0;
    let cursor = afterSeq;
    for (;;) {
      const want = Math.min(size - chunks.length, HISTORY_READ_ROWS);
      // The page's last read asks for one row more: it says whether there is a next page.
      const final = chunks.length + want === size;
      const rows = await this.#store.listChunks(dispatchId, cursor, final ? want + 1 : want, endSeq);
      for (const [i, row] of rows.entries()) {
        bytes += Buffer.byteLength(row.text);
        if (i === want || (chunks.length > 0 && bytes > LIMITS.maxBytesPerMessage)) return { chunks, nextAfterSeq: chunks.at(-1)!.seq };
        chunks.push(row);
      }
      if (final || rows.length < want) return { chunks, nextAfterSeq: undefined };
      cursor = rows.at(-1)!.seq;
    }
  }

  /**
   * Chunks with seq > afterSeq: stored ones first, then live ones, with no gap and no
   * duplicate. The live listener is registered before storage is read, so every chunk stored
   * after that read is also in the inbox; chunks at or below the last delivered seq are skipped,
   * and a gap in what arrives live is filled from storage. Only contiguous chunks are delivered
   * until the run has ended and `endGraceMs` passed without the missing ones arriving; then what
   * is stored is delivered as is. Ends (returns) after the message carrying the run's end, or
   * when `signal` fires. A tenant holds at most `maxSubscriptionsPerTenant` at once
   * (RESOURCE_EXHAUSTED beyond); a run deleted under a subscription (retention) ends it with
   * NOT_FOUND, as a new subscription would be answered.
   */
  async *subscribe(tenantId: string, dispatchId: string, afterSeq: number, signal: AbortSignal): AsyncGenerator<SubscriptionBatch> {
    // Taken before the first await, so parallel opens cannot overshoot the bound.
    const open = this.#openByTenant.get(tenantId) ?? 0;
    if (open >= this.#maxPerTenant) {
      throw resourceExhausted("log_subscriptions_per_tenant", `at most ${this.#maxPerTenant} log subscriptions may be open at once`, {
        limit: String(this.#maxPerTenant),
      });
    }
    this.#openByTenant.set(tenantId, open + 1);
    try {
      yield* this.#subscribe(tenantId, dispatchId, afterSeq, signal);
    } finally {
      const left = (this.#openByTenant.get(tenantId) ?? 1) - 1;
      if (left > 0) this.#openByTenant.set(tenantId, left);
      else this.#openByTenant.delete(tenantId);
    }
  }

  async *#subscribe(tenantId: string, dispatchId: string, afterSeq: number, signal: AbortSignal): AsyncGenerator<SubscriptionBatch> {
    await this.#ownRun(tenantId, dispatchId);
    // Counted when it happens: a subscriber that stopped reading never gets to take() again.
    const inbox = new SubscriberBuffer(this.#bufferChunks, () => this.#observer?.subscriberOverflowed());
    const unsubscribe = this.#feed.subscribe(dispatchId, inbox);
    this.#observer?.subscriptionOpened();
    let behind = false;
    try {
      // Read after subscribing: an end recorded later reaches the inbox.
      let end = (await this.#store.getRun(dispatchId))?.end;
      let last = afterSeq;
      let fromStorage = true;
      let storageAhead = false;
      let progressAt = Date.now();
      let quiet = false;

      while (!signal.aborted) {
        // Nothing woke us for a while: the feed may have lost the end too (another replica
        // recorded it while Redis was down), so storage is asked for it as well. A run that is
        // gone was deleted by retention: nothing more will come, and waiting would hold the
        // subscription open forever.
        if (quiet && !end) {
          const run = await this.#store.getRun(dispatchId);
          if (!run || run.tenantId !== tenantId) throw notFound("dispatch", dispatchId);
          end = run.end;
          if (end) progressAt = Date.now();
        }
        quiet = false;
        const taken = inbox.take();
        if (!end && taken.end) progressAt = Date.now();
        end ??= taken.end;
        if (taken.overflowed) behind = true;
        // After the end only a trickle can arrive: storage alone decides completeness.
        if (taken.overflowed || end) fromStorage = true;
        const cap = end && end.lastSeq > 0 ? end.lastSeq : Number.POSITIVE_INFINITY;

        let batch: StoredChunk[];
        let drained = false;
        if (fromStorage) {
          const read = await this.#readContiguous(dispatchId, last, cap);
          batch = read.chunks;
          storageAhead = read.gapAhead;
          fromStorage = read.more;
          drained = !read.more && !read.gapAhead;
        } else {
          const live = this.#contiguousLive(taken.chunks, last, cap);
          batch = live.chunks;
          // A gap, or more than one message holds: what is missing is in storage.
          if (live.gap || live.more || storageAhead) fromStorage = true;
        }

        if (batch.length > 0) {
          last = batch.at(-1)!.seq;
          progressAt = Date.now();
        }
        const complete = end !== undefined && (end.lastSeq > 0 ? last >= end.lastSeq : drained);
        if (batch.length > 0 || complete) {
          const lag = behind ? { resumedFromStorage: true, droppedLiveChunks: inbox.dropped } : {};
          behind = false;
          yield { chunks: batch, end: complete ? end : undefined, ...lag };
        }
        if (complete) return;
        if (fromStorage || signal.aborted) continue;

        if (end) {
          const waitMs = progressAt + this.#endGraceMs - Date.now();
          if (waitMs <= 0) {
            yield* this.#flush(dispatchId, last, cap, end, signal);
            return;
          }
          await inbox.wait(signal, waitMs);
        } else {
          // Woken by the feed; if nothing came for a while, look at storage anyway.
          if (!(await inbox.wait(signal, this.#idlePollMs))) fromStorage = quiet = true;
        }
      }
    } finally {
      unsubscribe();
      this.#observer?.subscriptionClosed();
    }
  }

  /** Live chunks that continue `last` contiguously, up to one message. */
  #contiguousLive(chunks: StoredChunk[], last: number, cap: number): { chunks: StoredChunk[]; gap: boolean; more: boolean } {
    const fresh = chunks.filter((c) => c.seq > last && c.seq <= cap).sort((a, b) => a.seq - b.seq);
    const out: StoredChunk[] = [];
    let expected = last + 1;
    let bytes = 0;
    for (const chunk of fresh) {
      if (chunk.seq < expected) continue; // the same seq twice in the inbox
      if (chunk.seq > expected) return { chunks: out, gap: true, more: false };
      bytes += Buffer.byteLength(chunk.text);
      if (out.length >= this.#pageSize || (out.length > 0 && bytes > LIMITS.maxBytesPerMessage)) {
        return { chunks: out, gap: false, more: true };
      }
      out.push(chunk);
      expected++;
    }
    return { chunks: out, gap: false, more: false };
  }

  /** Stored chunks that continue `last` contiguously, up to one message. */
  async #readContiguous(
    dispatchId: string,
    last: number,
    cap: number,
  ): Promise<{ chunks: StoredChunk[]; gapAhead: boolean; more: boolean }> {
    const page = await this.#store.listChunks(dispatchId, last, this.#pageSize);
    const out: StoredChunk[] = [];
    let expected = last + 1;
    let bytes = 0;
    for (const chunk of page) {
      if (chunk.seq > cap) return { chunks: out, gapAhead: false, more: false };
      if (chunk.seq !== expected) return { chunks: out, gapAhead: true, more: false };
      bytes += Buffer.byteLength(chunk.text);
      if (out.length > 0 && bytes > LIMITS.maxBytesPerMessage) return { chunks: out, gapAhead: false, more: true };
      out.push(chunk);
      expected++;
    }
    return { chunks: out, gapAhead: false, more: page.length === this.#pageSize };
  }

  /** The run ended and the missing chunks never came: deliver what is stored, gaps and all, then the end. */
  async *#flush(dispatchId: string, last: number, cap: number, end: RunEndRecord, signal: AbortSignal): AsyncGenerator<SubscriptionBatch> {
    for (;;) {
      if (signal.aborted) return;
      const raw = await this.#store.listChunks(dispatchId, last, this.#pageSize);
      const inCap = raw.filter((c) => c.seq <= cap);
      const out: StoredChunk[] = [];
      let bytes = 0;
      for (const chunk of inCap) {
        bytes += Buffer.byteLength(chunk.text);
        if (out.length > 0 && bytes > LIMITS.maxBytesPerMessage) break;
        out.push(chunk);
      }
      if (out.length > 0) last = out.at(-1)!.seq;
      const complete = out.length === inCap.length && (inCap.length < raw.length || raw.length < this.#pageSize);
      if (out.length > 0 || complete) yield { chunks: out, end: complete ? end : undefined };
      if (complete) return;
    }
  }
}
