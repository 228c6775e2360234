/**
 * The gateway's fast path for unary calls, the bulk of SDK traffic, and for server streams (log
 * subscriptions, dispatch watches): gRPC (raw-grpc.ts), unary Connect, JSON or binary over
 * HTTP/1.1 or HTTP/2 (raw-connect.ts), and Connect server streams (raw-connect-stream.ts).
 * Connect's server and client machinery on both sides of the hop cost about 1.4 ms of CPU per
 * call, and decode and re-encode every message of a stream; here the call is checked and passed
 * on as bytes:
 *
 * - the same edge decision as every other call (`admitCall`: credential, rate budgets), made
 *   before the body is read: a refused client's body is never read, charged or decoded;
 * - the request is read within the size limit and must decode as the method's input type, so
 *   malformed input is still refused at the edge with INVALID_ARGUMENT;
 * - it goes to the owning service, in the client's own protocol and encoding, over a shared
 *   HTTP/2 session with the caller's identity signed into the headers, the client's deadline and
 *   the trace context (a server span per call, as on the Connect path); a session in use is
 *   pinged, and one whose upstream stops answering is dropped and its calls end UNAVAILABLE
 *   (`UpstreamSession`);
 * - the upstream's answer comes back unchanged (statuses and error details included) with the
 *   caller's RateLimit-* headers added; only an INTERNAL or UNKNOWN error is masked, as on the
 *   Connect path: the client gets INTERNAL with the trace id, the upstream's message goes to the
 *   gateway's log under that id;
 * - a stream's messages pass through as they come, with backpressure (a client that stops
 *   reading pauses its upstream stream, not the others); when the gateway drains, its streams
 *   end cleanly (OK), as on the Connect path, and clients resume from their last sequence;
 *   when the caller's key is revoked (or its tenant suspended) meanwhile, they end with that
 *   refusal (open-streams.ts).
 *
 * Everything else (gRPC-Web, compressed requests, Connect GET, reflection, health) takes the
 * Connect path in routes.ts, which behaves the same.
 */
import { AsyncResource } from "node:async_hooks";
import type http from "node:http";
import http2 from "node:http2";
import type { DescMethodServerStreaming, DescMethodUnary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { mergeNonProtocolHeaders } from "@connectrpc/connect/protocol";
import {
  type BodyBudget,
  type BodyCharge,
  audienceOf,
  explainMalformed,
  injectTraceHeaders,
  isHttpsUrl,
  maskedInternalMessage,
  MAX_TIMER_MS,
  otelContext,
  rpcCodeLabel,
  rpcMetrics,
  SpanStatusCode,
  startServerSpan,
  type Logger,
  type SigningKeys,
  type TlsFiles,
} from "@outpost/platform";
import type { EdgeOptions } from "../edge.ts";
import { admitCall, clientIpOf } from "../edge.ts";
import type { OpenStreams } from "../core/open-streams.ts";
import { PUBLIC_SERVICES, type Upstream } from "../core/routing.ts";
import { connectUnary } from "./raw-connect.ts";
import { connectServerStream } from "./raw-connect-stream.ts";
import { grpcUnary } from "./raw-grpc.ts";

export type ClientRequest = http.IncomingMessage | http2.Http2ServerRequest;
export type ClientResponse = http.ServerResponse | http2.Http2ServerResponse;

/** Response headers that belong to one hop. */
export const HOP_HEADERS = new Set([":status", "connection", "keep-alive", "transfer-encoding", "upgrade", "date"]);

/** A method the raw path forwards: one request message, one answer or a stream of them. */
export type ForwardedMethod = DescMethodUnary | DescMethodServerStreaming;

/** What differs between the wire protocols the raw path speaks. */
export interface UnaryWireProtocol {
  /** Bytes a request body holds besides the message (gRPC's 5-byte frame header). */
  readonly envelopeBytes: number;
  /** The kinds of method this protocol's calls are (gRPC frames both alike; Connect does not). */
  readonly methodKinds: ReadonlySet<ForwardedMethod["methodKind"]>;
  /** True when this is a call of this protocol the raw path can take (else Connect takes it). */
  accepts(req: ClientRequest): boolean;
  /** Throws INVALID_ARGUMENT unless `body` is exactly one request message of `method`. */
  validate(method: ForwardedMethod, body: Buffer, clientHeader: Headers): void;
  /** Request headers for the upstream, before identity, deadline and trace context are added. */
  upstreamHeaders(clientHeader: Headers): Headers;
  /** The client's deadline from its headers, or the protocol's error for a malformed one. */
  timeoutOf(clientHeader: Headers): { timeoutMs?: number; error?: ConnectError };
  /** Writes what is left of the deadline into the upstream's headers. */
  setTimeout(upstreamHeader: Headers, timeoutMs: number): void;
  /**
   * Relays the upstream's answer, starting from its response headers, and calls `done` once
   * with the code the client got. `mask` logs an INTERNAL/UNKNOWN cause and returns what the
   * client is told instead. Returns what it passes messages through, when it does, so a drain
   * knows whether the client's answer stops between two messages.
   */
  relayAnswer(
    answer: UpstreamAnswer,
    res: ClientResponse,
    budget: [string, string][],
    mask: (code: Code, cause: string) => string,
    done: (code: Code | 0) => void,
  ): RelayState | void;
  /** Answers with an error of the gateway's own (validation, credential, rate limit). */
  respondError(req: ClientRequest, res: ClientResponse, error: ConnectError, budget: [string, string][]): void;
  /**
   * Ends a stream the gateway stops (protocols that carry streams): cleanly (OK) when it drains,
   * with DEADLINE_EXCEEDED at the deadline; whether or not the answer began.
   */
  endStream?(req: ClientRequest, res: ClientResponse, budget: [string, string][], error?: ConnectError): void;
}

export interface UpstreamAnswer {
  /** The client's request this answers. */
  request: ClientRequest;
  stream: http2.ClientHttp2Stream;
  headers: http2.IncomingHttpHeaders;
  /** The response headers ended the stream (no body, no trailers follow). */
  ended: boolean;
}

interface Route {
  method: ForwardedMethod;
  upstream: Upstream;
}

export interface RawUnaryOptions extends Pick<EdgeOptions, "authenticator" | "rateLimits"> {
  upstreamUrls: Record<Upstream, string>;
  signingKeys: SigningKeys;
  /** Internal TLS, for upstream URLs that are https:// (internalTlsOf). */
  tls?: TlsFiles | undefined;
  readMaxBytes: number;
  /** Request bodies count against it while they are read; undefined: no budget. */
  bodyBudget?: BodyBudget;
  /** Ends open server streams whose credential is revoked. */
  openStreams: OpenStreams;
  logger: Logger;
  /** Keep-alive pings on the shared upstream sessions; UPSTREAM_PING by default. */
  upstreamPing?: UpstreamPing;
}

/**
 * How the shared upstream sessions are pinged: every `intervalMs` while a session carries calls
 * (or carried one within the interval), and on a call to a session idle longer than that; a ping
 * unanswered after `timeoutMs` ends the session and fails its calls UNAVAILABLE.
 */
export interface UpstreamPing {
  intervalMs: number;
  timeoutMs: number;
}

/** As connect-node's client on the Connect path (packages/platform/src/clients.ts): 10 s, and its 15 s ping timeout. */
export const UPSTREAM_PING: UpstreamPing = { intervalMs: 10_000, timeoutMs: 15_000 };

/** Counts a call as in flight, so a draining server waits for it; streams end on `drainSignal`. */
export interface CallTracker {
  start(): void;
  end(): void;
  readonly drainSignal: AbortSignal;
}

export function rawUnaryForwarder(options: RawUnaryOptions) {
  const protocols: UnaryWireProtocol[] = [grpcUnary(), connectUnary(), connectServerStream()];
  const routes = new Map<string, Route>();
  for (const { service, upstream } of PUBLIC_SERVICES) {
    for (const method of service.methods) {
      if (method.methodKind === "unary" || method.methodKind === "server_streaming") {
        routes.set(`/${service.typeName}/${method.name}`, { method: method as ForwardedMethod, upstream });
      }
    }
  }
  const sessions = new Map<Upstream, UpstreamSession>();
  const sessionTo = (upstream: Upstream): UpstreamSession => {
    const existing = sessions.get(upstream);
    if (existing && !existing.session.closed && !existing.session.destroyed) return existing;
    // A session whose upstream stops answering pings is dropped at once (`forget`): the next call
    // opens a fresh one instead of joining calls that will never be answered. It is made outside
    // the call's async context, as its streams are (UPSTREAM_SCOPE): it and its ping timer
    // outlive the call that opened it.
    const created = UPSTREAM_SCOPE.runInAsyncScope(() => new UpstreamSession(options.upstreamUrls[upstream], options.upstreamPing ?? UPSTREAM_PING, forget, options.tls));
    const session = created.session;
    session.on("error", (err) => options.logger.warn({ upstream, err: err.message }, "upstream session failed"));
    // A closed session, or one the upstream is draining (GOAWAY), takes no new calls: the next
    // call opens a fresh one while the old one finishes what it carries.
    function forget() {
      if (sessions.get(upstream) === created) sessions.delete(upstream);
    }
    session.on("close", forget);
    session.on("goaway", forget);
    session.unref();
    sessions.set(upstream, created);
    return created;
  };
  const requests = rpcMetrics.requests();
  const duration = rpcMetrics.duration();

  /** Takes the call when it is a call of a forwarded method in a protocol spoken here; false leaves it to Connect. */
  function handle(req: ClientRequest, res: ClientResponse, calls: CallTracker): boolean {
    if (req.method !== "POST") return false;
    const route = routes.get(req.url ?? "");
    if (!route) return false;
    const protocol = protocols.find((p) => p.methodKinds.has(route.method.methodKind) && p.accepts(req));
    if (!protocol) return false;
    calls.start();
    forward(protocol, req, res, route, calls.drainSignal)
      .catch((err: unknown) => {
        // Nothing more can be told to this client (its answer broke); keep the process up.
        options.logger.error({ err, path: req.url }, "raw call failed after its answer began");
        breakAnswer(res);
      })
      .finally(() => calls.end());
    return true;
  }

  async function forward(protocol: UnaryWireProtocol, req: ClientRequest, res: ClientResponse, route: Route, drainSignal: AbortSignal): Promise<void> {
    const methodName = `${route.method.parent.typeName}/${route.method.name}`;
    const startedAt = performance.now();
    const endTimer = duration.startTimer({ method: methodName });
    const header = headersOf(req);
    const { span, ctx } = startServerSpan(route.method.parent.typeName, route.method.name, header);
    let code = Code.Unknown as Code | 0;
    let unwatch: (() => void) | undefined;
    try {
      code = await otelContext.with(ctx, async () => {
        let budget: [string, string][] = [];
        try {
          const timeout = protocol.timeoutOf(header);
          if (timeout.error) throw timeout.error;
          const deadline = timeout.timeoutMs === undefined ? undefined : startedAt + timeout.timeoutMs;
          // The edge decision needs only the headers, so it comes first: a client over its rate
          // budget, or with a credential refused, is answered without its body being read (it
          // takes nothing of the body budget and nothing is decoded).
          const admitted = await admitCall(options, { ip: clientIpOf(req), serviceTypeName: route.method.parent.typeName, methodName: route.method.name, header });
          budget = admitted.budget;
          // The client may have left while its credential and budget were checked.
          if (isGone(res)) return Code.Canceled;
          const body = await readBody(req, options.readMaxBytes, protocol.envelopeBytes, deadline, () => options.bodyBudget?.charge(req, res));
          protocol.validate(route.method, body, header);
          const outgoing = protocol.upstreamHeaders(header);
          // The upstream gets what is left of the client's deadline; the gateway holds it too,
          // so an upstream that stops answering cannot hold the client past it.
          const remainingMs = deadline === undefined ? undefined : Math.floor(deadline - performance.now());
          if (remainingMs !== undefined) {
            if (remainingMs <= 0) throw new ConnectError("the deadline passed before the call was forwarded", Code.DeadlineExceeded);
            protocol.setTimeout(outgoing, remainingMs);
          }
          if (admitted.identity) options.signingKeys.writeIdentity(outgoing, admitted.identity, audienceOf(route.method.parent));
          injectTraceHeaders(outgoing);
          const traceId = span.spanContext().traceId;
          const mask = (upstreamCode: Code, cause: string): string => {
            otelContext.with(ctx, () => options.logger.error({ method: methodName, upstreamStatus: Code[upstreamCode], cause }, "upstream failed"));
            return maskedInternalMessage(traceId);
          };
          // Where the protocol can end an answer with a status between two messages (gRPC, any
          // kind; Connect streams), a failing upstream or the deadline ends it that way. A unary
          // call finishes on its own when the gateway drains; a stream is ended.
          let ending: AnswerEnding | undefined;
          if (protocol.endStream) {
            ending = { end: (error) => protocol.endStream!(req, res, budget, error) };
            if (route.method.methodKind === "server_streaming") {
              ending.drainSignal = drainSignal;
              const revoked = new AbortController();
              if (admitted.identity) unwatch = options.openStreams.watch(header, admitted.identity, (refusal) => revoked.abort(refusal));
              ending.revokedSignal = revoked.signal;
            }
          }
          return await exchange(sessionTo(route.upstream), req, res, outgoing, body, remainingMs, ending, (answer, done) =>
            protocol.relayAnswer(answer, res, budget, mask, done),
          );
        } catch (err) {
          // The client left (e.g. while its body was being read): nobody to answer.
          if (isGone(res)) return Code.Canceled;
          const error = clientErrorOf(err, span.spanContext().traceId, (cause) => options.logger.error({ err: cause, method: methodName }, "raw forward failed"));
          if (res.headersSent) {
            breakAnswer(res);
            discardUnreadBody(req, res);
            return error.code;
          }
          return (await respondBeforeAnswer(protocol, req, res, error, budget)) ? error.code : Code.Canceled;
        }
      });
    } finally {
      unwatch?.();
      const label = rpcCodeLabel(code);
      requests.inc({ method: methodName, code: label });
      endTimer({ code: label });
      // The same access log line as the Connect path's, under the call's trace id.
      const ms = Math.round((performance.now() - startedAt) * 100) / 100;
      otelContext.with(ctx, () => options.logger.debug({ method: methodName, ms, code: code === 0 ? "ok" : Code[code] }, "rpc"));
      if (code !== 0) span.setStatus({ code: SpanStatusCode.ERROR, message: Code[code] });
      span.end();
    }
  }

  return {
    handle,
    close() {
      for (const { session } of sessions.values()) session.close();
      sessions.clear();
    },
  };
}

/**
 * Reads the whole request body, refusing a message of more than `maxBytes` (at once when its
 * content-length says so) and giving up at the client's deadline (`deadline`, on the
 * performance.now() clock): a client that never ends its body gets DEADLINE_EXCEEDED on time.
 * While it is read the body holds its charge of the body budget (`openCharge`), given back
 * once it is read or its read failed; one that would take the budget over is refused, and one
 * still arriving at the budget's hold limit fails with DEADLINE_EXCEEDED REQUEST_BODY_TIMEOUT.
 */
async function readBody(
  req: ClientRequest,
  maxBytes: number,
  envelopeBytes: number,
  deadline: number | undefined,
  openCharge: () => BodyCharge | undefined,
): Promise<Buffer> {
  const tooBig = () => new ConnectError(`message size is larger than configured readMaxBytes ${maxBytes}`, Code.ResourceExhausted);
  const promised = Number(req.headers["content-length"]);
  if (promised > maxBytes + envelopeBytes) throw tooBig();
  const charge = openCharge();
  // The body budget's hold limit ends the read like a deadline (DEADLINE_EXCEEDED, REQUEST_BODY_TIMEOUT).
  const overdue = charge?.holdLimited ? new Promise<never>((_, reject) => charge.onOverdue(reject)) : undefined;
  const chunks: Buffer[] = [];
  let size = 0;
  const iterator = (req as AsyncIterable<Buffer>)[Symbol.asyncIterator]();
  let timer: NodeJS.Timeout | undefined;
  // A deadline beyond a timer's reach is as good as none here (exchange holds it the same way).
  const remainingMs = deadline === undefined ? undefined : deadline - performance.now();
  const late =
    remainingMs === undefined || remainingMs > MAX_TIMER_MS
      ? undefined
      : new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new ConnectError("the deadline passed before the request was read", Code.DeadlineExceeded)), Math.max(0, remainingMs));
        });
  const stops = [late, overdue].filter((stop) => stop !== undefined);
  try {
    for (;;) {
      const next = stops.length > 0 ? await Promise.race([iterator.next(), ...stops]) : await iterator.next();
      if (next.done) break;
      size += next.value.length;
      if (size > maxBytes + envelopeBytes) throw tooBig();
      charge?.add(next.value);
      chunks.push(next.value);
    }
  } catch (err) {
    // Stop reading (a next() still waiting for bytes that never come finishes when the stream does).
    iterator.return?.().catch(ignore);
    throw err;
  } finally {
    clearTimeout(timer);
    charge?.release();
  }
  return Buffer.concat(chunks, size);
}

/** Of an HTTP/1.1 request refused before its body was read, what is read and dropped so the connection can stay open. */
const DRAINED_BODY_BYTES = 64 * 1024;
const DRAIN_WAIT_MS = 1000;

/**
 * What the client is told for a failure of the gateway's own: bad input of any kind carries
 * ErrorInfo naming what was wrong; an INTERNAL or UNKNOWN one, as on the Connect path, goes to
 * the log (`log`) and the client gets INTERNAL with the trace id.
 */
export function clientErrorOf(err: unknown, traceId: string, log: (cause: unknown) => void): ConnectError {
  let error = ConnectError.from(err);
  if (!error.isWireError) error = explainMalformed(error);
  if (error.code !== Code.Internal && error.code !== Code.Unknown) return error;
  log(err);
  return new ConnectError(maskedInternalMessage(traceId), Code.Internal);
}

/**
 * Answers `error` before any of the answer was sent, in the protocol of `writer`, with as little
 * of the request body read as can be (drainSmallBody, discardUnreadBody). False when the client
 * left meanwhile (nobody to answer).
 */
export async function respondBeforeAnswer(
  writer: Pick<UnaryWireProtocol, "respondError">,
  req: ClientRequest,
  res: ClientResponse,
  error: ConnectError,
  budget: [string, string][],
): Promise<boolean> {
  await drainSmallBody(req);
  if (isGone(res)) return false;
  writer.respondError(req, res, error, budget);
  discardUnreadBody(req, res);
  return true;
}

/**
 * Before an HTTP/1.1 request is refused without its body read (its credential or rate budget
 * refused): a small body (at most DRAINED_BODY_BYTES, within DRAIN_WAIT_MS) is read and dropped,
 * so the answer can keep the connection open. Otherwise the answer says `connection: close`, and
 * a socket closed with the client's bytes unread is reset by the kernel, which can reach the
 * client before the answer does: it then sees the connection reset instead of the refusal.
 * Larger bodies still close the connection (the refusal exists not to read them).
 */
async function drainSmallBody(req: ClientRequest): Promise<void> {
  if (req.httpVersionMajor !== 1 || req.complete || req.destroyed) return;
  const declared = Number(req.headers["content-length"]);
  if (Number.isFinite(declared) && declared > DRAINED_BODY_BYTES) return;
  await new Promise<void>((resolve) => {
    let seen = 0;
    const done = () => {
      clearTimeout(timer);
      req.off("data", onData);
      req.off("end", done);
      req.off("error", done);
      req.off("close", done);
      resolve();
    };
    const onData = (chunk: Buffer) => {
      seen += chunk.length;
      if (seen > DRAINED_BODY_BYTES) {
        req.pause();
        done();
      }
    };
    const timer = setTimeout(done, DRAIN_WAIT_MS);
    req.on("data", onData);
    req.once("end", done);
    req.once("error", done);
    req.once("close", done);
    req.resume();
  });
}

/**
 * After an answer given before the request's body ended (over the limit, past the deadline): over
 * HTTP/2 the stream closes only when both sides have ended, so once the answer is out it is reset
 * with NO_ERROR (the answer is complete), as gRPC servers do, instead of waiting for a client that
 * may never end it. (HTTP/1.1: the answer said `connection: close`.)
 */
function discardUnreadBody(req: ClientRequest, res: ClientResponse): void {
  if (req.complete || !("stream" in res) || res.stream.destroyed) return;
  req.resume();
  // The trailers go out during the send that asks for them (the compat layer's own 'wantTrailers'
  // listener, registered first), so the reset waits a turn.
  res.stream.once("wantTrailers", () => setImmediate(() => res.stream.close(http2.constants.NGHTTP2_NO_ERROR)));
}

/** The client's answer cannot be completed: reset its stream (HTTP/2) or close its connection (HTTP/1.1). */
export function breakAnswer(res: ClientResponse): void {
  if (isGone(res)) return;
  if ("stream" in res) res.stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR);
  else res.destroy();
}

/**
 * Headers for an error the gateway answers itself: the error's own metadata (e.g. Retry-After)
 * without protocol headers, and none from an error that came over the wire (the tenant
 * service's answer to a key lookup carries its own content type and status), then the budget.
 */
export function errorHeaders(error: ConnectError, budget: [string, string][]): Record<string, string> {
  const headers = new Headers();
  if (!error.isWireError) mergeNonProtocolHeaders(headers, error.metadata);
  for (const [name, value] of budget) headers.set(name, value);
  return Object.fromEntries(headers);
}

/** The client's request headers (not HTTP/2 pseudo-headers) as Fetch Headers. */
export function headersOf(req: ClientRequest): Headers {
  const header = new Headers();
  for (const [name, value] of Object.entries(req.headers)) {
    if (!name.startsWith(":") && typeof value === "string") header.set(name, value);
  }
  return header;
}

/** The client's stream or connection is closed: nothing more can reach it. */
export function isGone(res: ClientResponse): boolean {
  return "stream" in res ? res.stream.destroyed : res.destroyed;
}

/**
 * Calls `then` when the upstream's answer is complete. A stream whose connection dropped (or was
 * reset) also ends, but with a reset code: that is not an answer; the upstream's `close` that
 * follows makes `exchange` fail the call instead.
 */
export function onceComplete(upstream: http2.ClientHttp2Stream, then: () => void): void {
  upstream.once("end", () => {
    if (upstream.rstCode === undefined || upstream.rstCode === http2.constants.NGHTTP2_NO_ERROR) then();
  });
}

/** `names` of the client's headers that it sent, copied into `into` (a fresh Headers by default). */
export function copyHeaders(from: Headers, names: readonly string[], into: Headers = new Headers()): Headers {
  for (const name of names) {
    const value = from.get(name);
    if (value !== null) into.set(name, value);
  }
  return into;
}

/** Writes an upstream body chunk to the client, pausing the upstream while the client is behind. */
export function passChunk(upstream: http2.ClientHttp2Stream, res: ClientResponse, chunk: Buffer): void {
  if (chunk.length === 0 || res.writableEnded || isGone(res)) return;
  if (!(res as http.ServerResponse).write(chunk) && !isGone(res)) {
    upstream.pause();
    res.once("drain", () => upstream.resume());
  }
}

/**
 * A closed HTTP/2 stream stays reachable for young-generation collections until the next full
 * one (through two V8 behaviours, packages/platform/src/runtime.ts: one fixed there, one inside
 * Node's Writable; a bare `node:http2` client promoted a fifth of what it allocated to the old
 * generation, `node:http` 0.3 %), so whatever the stream still references is promoted with it
 * and filled the gateway's old generation. Two references the gateway owns are cut. Its
 * listeners are removed once it closed (in `exchange`). And it is created in this scope, made
 * once at start-up, instead of the call's: the stream keeps the async context it was created
 * in, which held the call's trace context and server span. Its events need neither (the relay
 * gets the trace id explicitly; the call's own code resumes in its context when `exchange`
 * settles). Together they halved the gateway's promotion; docs/edge.md.
 */
const UPSTREAM_SCOPE = new AsyncResource("OutpostUpstreamCall");

const ignore = () => {};


/**
 * One shared HTTP/2 session to an upstream, with keep-alive pings (`UpstreamPing`). Without
 * them an upstream host that vanished without closing the connection (powered off, partitioned,
 * a frozen middlebox) held its session forever: its calls without a deadline never ended, those
 * with one ended DEADLINE_EXCEEDED, and new calls kept joining it. Now the session is pinged
 * every interval while it carries calls or carried one within the interval, and at once when a
 * call comes to a session idle longer than that (or new); a ping unanswered within the timeout
 * (or a session still connecting then) destroys the session, which fails every call on it (their
 * streams error, so `exchange` answers UNAVAILABLE), and `onDead` drops it from the session map
 * first. An idle session is left alone, so an upstream may still close idle connections.
 */
class UpstreamSession {
  readonly session: http2.ClientHttp2Session;
  /** Calls open on the session. */
  private streams = 0;
  /** When a call last started or ended (performance.now()). */
  private usedAt = -Infinity;
  private readonly ticker: NodeJS.Timeout;
  /** Set while a ping is unanswered: destroys the session when it fires. */
  private awaiting: NodeJS.Timeout | undefined;
  private readonly ping: UpstreamPing;
  private readonly onDead: () => void;

  constructor(url: string, ping: UpstreamPing, onDead: () => void, tls?: TlsFiles) {
    this.ping = ping;
    this.onDead = onDead;
    this.session = tls && isHttpsUrl(url) ? http2.connect(url, tls.clientOptions()) : http2.connect(url);
    this.ticker = setInterval(() => {
      if (this.streams > 0 || performance.now() - this.usedAt < ping.intervalMs) this.sendPing();
    }, ping.intervalMs);
    this.ticker.unref();
    this.session.once("close", () => {
      clearInterval(this.ticker);
      clearTimeout(this.awaiting);
      this.awaiting = undefined;
    });
  }

  /** Starts a call on the session (throws as `ClientHttp2Session.request` does). */
  request(headers: http2.OutgoingHttpHeaders): http2.ClientHttp2Stream {
    const idle = this.streams === 0 && performance.now() - this.usedAt >= this.ping.intervalMs;
    const stream = this.session.request(headers);
    this.streams++;
    this.usedAt = performance.now();
    stream.once("close", () => {
      this.streams--;
      this.usedAt = performance.now();
    });
    if (idle) this.sendPing();
    return stream;
  }

  private sendPing(): void {
    const session = this.session;
    if (this.awaiting || session.closed || session.destroyed) return;
    this.awaiting = setTimeout(() => {
      this.awaiting = undefined;
      this.onDead();
      const what = session.connecting ? "did not connect" : "did not answer a keep-alive ping";
      session.destroy(new Error(`the upstream ${what} within ${this.ping.timeoutMs} ms`));
    }, this.ping.timeoutMs);
    this.awaiting.unref();
    const send = () => {
      if (session.closed || session.destroyed) return;
      // Answered, or cancelled because the session is closing (a draining session finishes its
      // calls unpinged; its close clears the rest): either way it is not found dead.
      session.ping(() => {
        clearTimeout(this.awaiting);
        this.awaiting = undefined;
      });
    };
    // A ping on a session still connecting is cancelled at once; it goes out once connected.
    if (session.connecting) session.once("connect", send);
    else send();
  }
}

/** What a relay tells `exchange` about a stream in progress. */
export interface RelayState {
  /** True when what reached the client so far ends between two messages. */
  readonly atBoundary: boolean;
}

/** How the gateway ends a client's answer itself, between two messages (protocols that can). */
export interface AnswerEnding {
  /** Ends the client's answer with `error` as its status, or OK. */
  end(error?: ConnectError): void;
  /** Server streams only: fires when the server drains, and the stream then ends cleanly (OK). */
  drainSignal?: AbortSignal;
  /**
   * Server streams only: fires when the caller's credential is refused while the stream is open;
   * the stream then ends with the refusal (its `reason`, a ConnectError) as its status.
   */
  revokedSignal?: AbortSignal;
}

/** How long a draining gateway waits for a stream's last bytes to reach a slow client. */
const DRAIN_FLUSH_MS = 1000;

/**
 * Sends the call upstream and hands its answer to `onAnswer`. Resolves with the code the client
 * got (CANCELLED when it left first); rejects with UNAVAILABLE when the upstream failed before
 * anything reached the client, so the caller can answer instead; after that, the client's
 * answer ends with UNAVAILABLE as its status where `ending` can end it between two messages
 * (retryable, and a log subscriber resumes from its last sequence), and is broken off otherwise.
 * The same when `timeoutMs` passes, with DEADLINE_EXCEEDED, and when the caller's credential is
 * revoked (streams only), with its refusal. When the server drains (streams only), the upstream
 * call is cancelled and the client's answer ends cleanly (OK). Every path
 * settles exactly once, and nothing of the upstream reaches the client after it settled.
 */
function exchange(
  session: UpstreamSession,
  req: ClientRequest,
  res: ClientResponse,
  headers: Headers,
  body: Buffer,
  timeoutMs: number | undefined,
  ending: AnswerEnding | undefined,
  onAnswer: (answer: UpstreamAnswer, done: (code: Code | 0) => void) => RelayState | void,
): Promise<Code | 0> {
  return new Promise((resolve, reject) => {
    // Already draining (or the key already refused): no upstream call for a stream that would be ended at once.
    if (ending?.drainSignal?.aborted) {
      ending.end();
      resolve(0);
      return;
    }
    if (ending?.revokedSignal?.aborted) {
      const refusal = ending.revokedSignal.reason as ConnectError;
      ending.end(refusal);
      resolve(refusal.code);
      return;
    }
    const outgoing: http2.OutgoingHttpHeaders = { ":method": "POST", ":path": req.url! };
    for (const [name, value] of headers) outgoing[name] = value;
    let upstream: http2.ClientHttp2Stream;
    try {
      upstream = UPSTREAM_SCOPE.runInAsyncScope(() => session.request(outgoing));
    } catch (err) {
      reject(new ConnectError(`upstream unavailable: ${err instanceof Error ? err.message : String(err)}`, Code.Unavailable));
      return;
    }
    let settled = false;
    let deadlineTimer: NodeJS.Timeout | undefined;
    let relay: RelayState | void;
    /** The gateway itself ended the upstream call (drain, deadline): its close is no failure. */
    let stopped = false;
    const settle = (outcome: { code: Code | 0 } | { error: ConnectError }) => {
      if (settled) return;
      settled = true;
      clearTimeout(deadlineTimer);
      res.off("close", onClientGone);
      ending?.drainSignal?.removeEventListener("abort", onDrain);
      ending?.revokedSignal?.removeEventListener("abort", onRevoked);
      // A cancelled upstream may still deliver a chunk or two: none may reach a finished answer.
      upstream.removeAllListeners("data");
      if ("error" in outcome) reject(outcome.error);
      else resolve(outcome.code);
    };
    // The client left before its answer was complete: stop the upstream call too.
    const onClientGone = () => {
      upstream.close(http2.constants.NGHTTP2_CANCEL);
      settle({ code: Code.Canceled });
    };
    res.once("close", onClientGone);
    /** Ends an answer the gateway stops: with a status between two messages, else broken off. */
    const endAnswerHere = (ending: AnswerEnding, error?: ConnectError) => {
      stopped = true;
      upstream.removeAllListeners("data");
      upstream.close(http2.constants.NGHTTP2_CANCEL);
      if (isGone(res)) return;
      if (res.headersSent && relay && !relay.atBoundary) breakAnswer(res);
      else ending.end(error);
    };
    const onDrain = () => {
      if (settled) return;
      endAnswerHere(ending!);
      // Counted in flight until the end reached the client (or a moment passed), so a draining
      // server does not close the connection under a slow reader's last bytes.
      const flushed = () => settle({ code: 0 });
      if (isGone(res) || res.writableFinished) return flushed();
      res.once("finish", flushed);
      setTimeout(flushed, DRAIN_FLUSH_MS).unref();
    };
    ending?.drainSignal?.addEventListener("abort", onDrain, { once: true });
    const onRevoked = () => {
      if (settled) return;
      const refusal = ending!.revokedSignal!.reason as ConnectError;
      endAnswerHere(ending!, refusal);
      settle({ code: refusal.code });
    };
    ending?.revokedSignal?.addEventListener("abort", onRevoked, { once: true });
    // A timer cannot wait longer than MAX_TIMER_MS (a longer delay fires at once): a deadline
    // further off than that (about 24.8 days) is passed on but not held here.
    if (timeoutMs !== undefined && timeoutMs <= MAX_TIMER_MS) {
      deadlineTimer = setTimeout(() => {
        const late = new ConnectError("the deadline passed before the service answered", Code.DeadlineExceeded);
        if (!res.headersSent) {
          upstream.close(http2.constants.NGHTTP2_CANCEL);
          return settle({ error: late });
        }
        if (ending) endAnswerHere(ending, new ConnectError("the deadline passed", Code.DeadlineExceeded));
        else {
          upstream.close(http2.constants.NGHTTP2_CANCEL);
          breakAnswer(res);
        }
        settle({ code: Code.DeadlineExceeded });
      }, timeoutMs);
    }
    const upstreamFailed = (why: string) => {
      if (settled || stopped) return;
      // Nothing written yet (no answer, or a Connect error body still being read): the caller
      // answers UNAVAILABLE properly.
      const unavailable = new ConnectError(`upstream unavailable: ${why}`, Code.Unavailable);
      if (!res.headersSent) return settle({ error: unavailable });
      // Part of the answer is out: between two messages it can still end with the status (gRPC,
      // Connect streams); otherwise all the client can be told is that the answer broke.
      if (ending) endAnswerHere(ending, unavailable);
      else breakAnswer(res);
      settle({ code: Code.Unavailable });
    };
    upstream.once("error", (err) => upstreamFailed(err.message));
    // Closed without an answer and without an error (e.g. reset with CANCEL or NO_ERROR).
    upstream.once("close", () => upstreamFailed(`the call was closed (code ${upstream.rstCode ?? "none"})`));
    // See UPSTREAM_SCOPE: a closed stream lingers, and its listeners hold this call's client
    // request and response. Nothing is emitted after "close"; the no-op stays in case.
    upstream.once("close", () =>
      setImmediate(() => {
        upstream.removeAllListeners();
        upstream.on("error", ignore);
      }),
    );
    upstream.once("response", (upstreamHeaders, flags) => {
      if (settled) return;
      const ended = (flags & http2.constants.NGHTTP2_FLAG_END_STREAM) !== 0;
      relay = onAnswer({ request: req, stream: upstream, headers: upstreamHeaders, ended }, (code) => settle({ code }));
      if (ended) upstream.resume(); // nothing to read; let the stream close
    });
    upstream.end(body);
  });
}
