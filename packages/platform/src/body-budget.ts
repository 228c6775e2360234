/**
 * A budget of request-body bytes a server holds at once while it receives them, across every
 * connection and every path that reads a body whole before it acts on it (at the gateway: the
 * raw path, the lean unary path and connect-node). Without one, a client that opens many calls,
 * sends most of each body and never finishes them holds that memory until it leaves.
 *
 * Each request body takes a `BodyCharge` as it arrives. A body that says how big it is (its
 * `content-length`, or the length in its first 5-byte envelope) reserves that size, at most
 * `largestBodyBytes`, with its first bytes; one that does not is charged as its bytes come.
 * A call admitted is therefore a call whose body fits, which finishes even while later calls
 * are refused. The charge is given back exactly once: when the body has been read whole, when
 * reading it failed (refused, malformed, too big, past its deadline), or when its response
 * closes (the client reset the stream, the connection closed), whichever comes first.
 *
 * A body that would take the total over `limitBytes`, or its client (TCP peer address) over
 * `perClientBytes`, is refused RESOURCE_EXHAUSTED with ErrorInfo `BODY_BUDGET_EXHAUSTED`
 * (metadata: which budget, its setting and limit) and RetryInfo; the reader answers it in the
 * call's protocol. Refusals are counted by budget and logged (warn) at most once a minute.
 *
 * A body may hold its charge for at most `holdLimitMs`: a client that starts a body and then
 * stops sending (with no deadline, or a long one) would otherwise keep it until it leaves. Past
 * that, the charge is given back and the read fails with DEADLINE_EXCEEDED, ErrorInfo
 * `REQUEST_BODY_TIMEOUT` (`onOverdue`), which the reader answers in the call's protocol.
 */
import type http from "node:http";
import type http2 from "node:http2";
import { create } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { RetryInfoSchema } from "@outpost/proto/google/rpc/error_details_pb.js";
import { ENVELOPE_HEADER_BYTES } from "./envelope.ts";
import { errorInfoOf, outpostError } from "./errors.ts";
import type { Logger } from "./logger.ts";
import { counter, gauge } from "./metrics.ts";

type Request = http.IncomingMessage | http2.Http2ServerRequest;
type Response = http.ServerResponse | http2.Http2ServerResponse;

/** ErrorInfo reason of a call refused because the server holds too many request bodies. */
export const BODY_BUDGET_EXHAUSTED = "BODY_BUDGET_EXHAUSTED";
/** ErrorInfo reason of a call whose body did not arrive whole within the budget's hold limit. */
export const REQUEST_BODY_TIMEOUT = "REQUEST_BODY_TIMEOUT";

/** Which budget refused a call (ErrorInfo `metadata.budget`, the refusals counter's label). */
export type BodyBudgetName = "total" | "per_client_ip";

export interface BodyBudgetOptions {
  /** Bytes of request bodies held at once, all calls together. */
  limitBytes: number;
  /** Of which the calls of one client (TCP peer address) may hold at most this (default: all). */
  perClientBytes?: number;
  /** The largest body a reader accepts: a declared size is reserved up to this. */
  largestBodyBytes: number;
  /** The settings behind the two limits, named in a refusal's ErrorInfo. */
  settings?: Partial<Record<BodyBudgetName, string>>;
  /** The client a request counts against (default: the TCP peer address). */
  clientOf?: (req: Request) => string;
  logger: Logger;
  /** At most one warning per this many ms while calls are refused (default 60 s). */
  warnIntervalMs?: number;
  /** How long one body may take to arrive whole (and hold its charge); undefined: no limit. */
  holdLimitMs?: number;
  /** The setting behind `holdLimitMs`, named in the refusal's ErrorInfo. */
  holdLimitSetting?: string;
}

/** How long a refused client is told to wait before it tries again. */
const RETRY_AFTER_MS = 1000;

/** Content types whose body is a series of envelopes (gRPC, gRPC-Web, Connect streams); gRPC-Web text is base64. */
const ENVELOPED = /^application\/(grpc|connect\+)(?!-web-text)/;

const NO_BYTES = new Uint8Array(0);

/** Budgets in this process, for the metrics (in-process tests start several servers). */
const live = new Set<BodyBudget>();

function registerMetrics(): void {
  gauge("outpost_request_body_buffered_bytes", "Bytes of request bodies the server holds while receiving them (the body budget in use).", [], (g) => {
    g.set([...live].reduce((sum, b) => sum + b.bufferedBytes, 0));
  });
  gauge("outpost_request_body_budget_bytes", "The body budget: bytes of request bodies the server holds at most (OUTPOST_GATEWAY_BODY_BUDGET_BYTES).", [], (g) => {
    g.set([...live].reduce((sum, b) => sum + b.limitBytes, 0));
  });
  bodyBudgetRefusals();
  bodyTimeouts();
}

/** Calls refused RESOURCE_EXHAUSTED by the body budget, by which budget refused them. */
export function bodyBudgetRefusals() {
  return counter("outpost_request_body_budget_refusals_total", "Calls refused with RESOURCE_EXHAUSTED BODY_BUDGET_EXHAUSTED, by budget (total, per_client_ip).", ["budget"]);
}

/** Request bodies that did not arrive whole within the hold limit. */
export function bodyTimeouts() {
  return counter("outpost_request_body_timeouts_total", "Calls failed with DEADLINE_EXCEEDED REQUEST_BODY_TIMEOUT: their body did not arrive whole within the hold limit.");
}

export class BodyBudget {
  readonly limitBytes: number;
  readonly perClientBytes: number;
  readonly largestBodyBytes: number;
  private readonly options: BodyBudgetOptions;
  private buffered = 0;
  private readonly byClient = new Map<string, number>();
  private readonly refusals = bodyBudgetRefusals();
  private readonly timeouts = bodyTimeouts();
  private lastWarnAt: number | undefined;
  private refusedSinceWarn = 0;

  constructor(options: BodyBudgetOptions) {
    this.options = options;
    this.limitBytes = options.limitBytes;
    this.perClientBytes = Math.min(options.perClientBytes ?? options.limitBytes, options.limitBytes);
    this.largestBodyBytes = options.largestBodyBytes;
    registerMetrics();
    live.add(this);
  }

  /** Bytes held now, all calls together. */
  get bufferedBytes(): number {
    return this.buffered;
  }

  /** Bytes held now by one client's calls. */
  bufferedBy(client: string): number {
    return this.byClient.get(client) ?? 0;
  }

  /**
   * The charge of this request's body, given back when its response closes at the latest. A
   * body that declares its size (content-length) reserves it here: throws the refusal at once
   * when it does not fit, before a byte is read.
   */
  charge(req: Request, res?: Response): BodyCharge {
    const client = this.options.clientOf?.(req) ?? req.socket?.remoteAddress ?? "";
    const contentType = req.headers["content-type"];
    const charge = new BodyCharge(this, client, declaredLength(req.headers["content-length"]), typeof contentType === "string" && ENVELOPED.test(contentType), res, this.options.holdLimitMs);
    charge.add(NO_BYTES);
    return charge;
  }

  /** Stops counting this budget in the process's metrics (the server closed). */
  close(): void {
    live.delete(this);
  }

  /** Takes `bytes` for `client`; answers the refusal instead when they do not fit. */
  take(client: string, bytes: number): ConnectError | undefined {
    const mine = this.byClient.get(client) ?? 0;
    // A share as large as the total is no share: the total refuses.
    if (this.perClientBytes < this.limitBytes && mine + bytes > this.perClientBytes) return this.refuse("per_client_ip", this.perClientBytes, client);
    if (this.buffered + bytes > this.limitBytes) return this.refuse("total", this.limitBytes, client);
    this.buffered += bytes;
    this.byClient.set(client, mine + bytes);
    return undefined;
  }

  /** Gives back `bytes` that `client` took. */
  give(client: string, bytes: number): void {
    if (bytes <= 0) return;
    this.buffered -= bytes;
    const left = (this.byClient.get(client) ?? 0) - bytes;
    if (left > 0) this.byClient.set(client, left);
    else this.byClient.delete(client);
  }

  /** The failure of a body that was not read whole within the hold limit (and counts it). */
  overdue(): ConnectError {
    this.timeouts.inc();
    const limitMs = this.options.holdLimitMs!;
    return outpostError(
      Code.DeadlineExceeded,
      REQUEST_BODY_TIMEOUT,
      `the request body did not arrive whole within ${limitMs} ms; send it at once, or retry`,
      { setting: this.options.holdLimitSetting ?? "hold limit", limit_ms: String(limitMs) },
    );
  }

  private refuse(budget: BodyBudgetName, limit: number, client: string): ConnectError {
    this.refusals.inc({ budget });
    this.refusedSinceWarn++;
    const now = performance.now();
    if (this.lastWarnAt === undefined || now - this.lastWarnAt >= (this.options.warnIntervalMs ?? 60_000)) {
      this.options.logger.warn(
        { budget, setting: this.options.settings?.[budget], limitBytes: limit, bufferedBytes: this.buffered, client, refused: this.refusedSinceWarn },
        "request body budget exhausted: refusing calls with RESOURCE_EXHAUSTED (logged at most once a minute; `refused` counts since the last line)",
      );
      this.lastWarnAt = now;
      this.refusedSinceWarn = 0;
    }
    const whose = budget === "total" ? "the server holds" : "this client's calls hold";
    return outpostError(
      Code.ResourceExhausted,
      BODY_BUDGET_EXHAUSTED,
      `request refused: ${whose} as many request bodies as the budget allows (${limit} bytes); finish or cancel open calls, or retry shortly`,
      { budget, setting: this.options.settings?.[budget] ?? budget, limit_bytes: String(limit) },
      [{ desc: RetryInfoSchema, value: create(RetryInfoSchema, { retryDelay: durationFromMs(RETRY_AFTER_MS) }) }],
    );
  }
}

/** One request body's share of a BodyBudget. */
export class BodyCharge {
  private readonly budget: BodyBudget;
  private readonly client: string;
  private readonly res: Response | undefined;
  /** The body's size as it declared it (content-length, or its first envelope), once known. */
  private declared: number | undefined;
  /** The first envelope's header so far, while its length is not known yet. */
  private head: Buffer | undefined;
  private received = 0;
  private charged = 0;
  private released = false;
  private readonly onClose = () => this.release();
  private readonly holdLimitMs: number | undefined;
  private overdueTimer: NodeJS.Timeout | undefined;
  private overdueListener: ((error: ConnectError) => void) | undefined;

  constructor(budget: BodyBudget, client: string, declared: number | undefined, enveloped: boolean, res: Response | undefined, holdLimitMs?: number) {
    this.budget = budget;
    this.client = client;
    this.declared = declared;
    this.head = declared === undefined && enveloped ? Buffer.alloc(0) : undefined;
    this.res = res;
    this.holdLimitMs = holdLimitMs;
  }

  /**
   * Calls `listener` (once, with DEADLINE_EXCEEDED REQUEST_BODY_TIMEOUT) if the body is still
   * being read when the hold limit passes, counted from this call; the charge is given back
   * first. The reader then stops reading and answers the error. No limit: never called.
   */
  onOverdue(listener: (error: ConnectError) => void): void {
    if (this.holdLimitMs === undefined || this.released) return;
    this.overdueListener = listener;
    this.overdueTimer ??= setTimeout(() => {
      const listener = this.overdueListener;
      if (this.released || !listener) return;
      this.release();
      listener(this.budget.overdue());
    }, this.holdLimitMs);
    this.overdueTimer.unref();
  }

  /** Bytes this body holds of the budget now. */
  get bytes(): number {
    return this.charged;
  }

  /** True when the body must arrive within a hold limit (`onOverdue` will fire if it does not). */
  get holdLimited(): boolean {
    return this.holdLimitMs !== undefined;
  }

  /**
   * Counts a chunk of the body as it arrives. Throws RESOURCE_EXHAUSTED (BODY_BUDGET_EXHAUSTED)
   * when the body would take the budget over; the charge is then given back. Nothing is
   * counted once the charge was given back.
   */
  add(chunk: Uint8Array): void {
    if (this.released) return;
    this.received += chunk.byteLength;
    if (this.head !== undefined) this.readHead(chunk);
    const wanted = Math.max(this.received, Math.min(this.declared ?? 0, this.budget.largestBodyBytes));
    if (wanted <= this.charged) return;
    const refusal = this.budget.take(this.client, wanted - this.charged);
    if (refusal) {
      this.release();
      throw refusal;
    }
    if (this.charged === 0) this.res?.once("close", this.onClose);
    this.charged = wanted;
  }

  /** Gives the body's bytes back (body read whole, call failed or over); only the first call counts. */
  release(): void {
    if (this.released) return;
    this.released = true;
    clearTimeout(this.overdueTimer);
    this.overdueListener = undefined;
    this.res?.off("close", this.onClose);
    this.budget.give(this.client, this.charged);
    this.charged = 0;
  }

  /** Collects the first envelope's header; its length gives the body's size (a unary call's whole body). */
  private readHead(chunk: Uint8Array): void {
    const head =
      this.head!.length === 0 && chunk.byteLength >= ENVELOPE_HEADER_BYTES
        ? Buffer.from(chunk.buffer, chunk.byteOffset, ENVELOPE_HEADER_BYTES)
        : Buffer.concat([this.head!, chunk.subarray(0, ENVELOPE_HEADER_BYTES - this.head!.length)]);
    if (head.length < ENVELOPE_HEADER_BYTES) {
      this.head = head;
      return;
    }
    this.head = undefined;
    this.declared = ENVELOPE_HEADER_BYTES + head.readUInt32BE(1);
  }
}

/** True when `err` is a body budget's refusal (it then ended a body's read). */
export function isBodyBudgetRefusal(err: unknown): boolean {
  return err instanceof ConnectError && err.code === Code.ResourceExhausted && errorInfoOf(err)?.reason === BODY_BUDGET_EXHAUSTED;
}

/** True when `err` ended a body's read for the budget: a refusal, or the hold limit passed. */
export function isBodyBudgetStop(err: unknown): boolean {
  return isBodyBudgetRefusal(err) || (err instanceof ConnectError && err.code === Code.DeadlineExceeded && errorInfoOf(err)?.reason === REQUEST_BODY_TIMEOUT);
}

/** A content-length header's value, when it is a plain non-negative number. */
function declaredLength(value: string | undefined): number | undefined {
  if (value === undefined || !/^\d+$/.test(value)) return undefined;
  return Number(value);
}
