/**
 * The telemetry domain, independent of protobuf and transport: sequence numbers are plain
 * numbers (a run never reaches 2^53 chunks), times are epoch milliseconds.
 */

/** One stored line of a run's output. `seq` starts at 1 and grows by one per chunk. */
export interface StoredChunk {
  dispatchId: string;
  seq: number;
  /** LogStream number (1 stdout, 2 stderr). */
  stream: number;
  text: string;
  /** When the executor read it, epoch milliseconds. */
  timeMs: number;
}

/** How a run ended, as the dispatcher recorded it. */
export interface RunEndRecord {
  /** Dispatch.State number (a terminal state). */
  state: number;
  exitCode: number | undefined;
  failureReason: string;
  /** Sequence number of the run's last chunk; 0 when the dispatcher does not know it. */
  lastSeq: number;
}

export interface RunRecord {
  dispatchId: string;
  tenantId: string;
  /** Highest seq such that every chunk 1..ackedSeq is stored: what a sender may drop. */
  ackedSeq: number;
  /** Set once the run has ended (first CompleteRun wins). */
  end: RunEndRecord | undefined;
  /**
   * When the run and its chunks may be deleted (registration time + the tenant's retention,
   * SPEC L3), epoch milliseconds. The embedded store deletes expired runs periodically; a
   * MongoDB adapter stamps this time on run and chunk documents and lets a TTL index
   * (`expireAfterSeconds: 0`) delete them.
   */
  expireTimeMs: number;
}

const DAY_MS = 24 * 60 * 60 * 1000;

/** Default retention per tier (days), as the dispatcher passes it in RegisterRun (configurable there). */
export const DEFAULT_RETENTION_DAYS = { free: 7, pro: 30, enterprise: 90 } as const;

/** Retention when RegisterRun carries none (the free tier's). */
export const DEFAULT_RETENTION_MS = DEFAULT_RETENTION_DAYS.free * DAY_MS;

/** Limits that keep one caller from exhausting memory or message sizes. */
export const LIMITS = {
  /** Largest chunk text, in UTF-8 bytes. */
  maxChunkTextBytes: 64 * 1024,
  /** Most chunks in one ingest batch. */
  maxChunksPerBatch: 1000,
  /** Most chunks / text bytes in one subscription message. */
  maxChunksPerMessage: 500,
  maxBytesPerMessage: 1024 * 1024,
  maxFailureReasonLength: 4096,
  maxTenantIdLength: 128,
  /** Longest retention RegisterRun accepts (ten years). */
  maxRetentionMs: 3650 * DAY_MS,
} as const;
