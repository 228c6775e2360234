/**
 * Server bootstrap shared by every service. One TCP port serves HTTP/1.1 and HTTP/2
 * (cleartext, h2c prior knowledge; or over TLS, negotiated by ALPN, when the service has a
 * certificate: tls.ts) side by side, so Connect, gRPC and gRPC-Web all work on it; internal
 * traffic is gRPC over h2c or TLS. The liveness path is answered before anything else runs.
 * On shutdown: health turns NOT_SERVING, the listener stops accepting, long waits and streams
 * are told to wrap up (the drain signal), in-flight calls finish, then connections close.
 */
import { X509Certificate } from "node:crypto";
import { setMaxListeners } from "node:events";
import http from "node:http";
import http2 from "node:http2";
import net from "node:net";
import tls from "node:tls";
import type { ConnectRouter, Interceptor, HandlerContext, ContextValues } from "@connectrpc/connect";
import type { DescService } from "@bufbuild/protobuf";
import { Code, ConnectError, createContextKey, createContextValues } from "@connectrpc/connect";
import { parseTimeout as parseGrpcTimeout } from "@connectrpc/connect/protocol-grpc";
import { parseTimeout as parseConnectTimeout } from "@connectrpc/connect/protocol-connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { formatTraceparent, currentTrace } from "./call-context.ts";
import { initMetrics, metricsInterceptor, metricsText, METRICS_PATH } from "./metrics.ts";
import { flushTracing, initTracing, serverTraceInterceptor } from "./tracing.ts";
import { HealthState, registerHealth, type ReadinessCheck } from "./health.ts";
import { audienceOf, identityKey, type Identity, type SigningKeys } from "./identity.ts";
import type { Logger } from "./logger.ts";
import { observeCallEnd } from "./call-end.ts";
import { maskedInternalMessage, unauthenticated, unsupportedConnectVersion } from "./errors.ts";
import { certificatesOf, chainStillTrusted, TLS_RELOAD_CHECK_MS, type TlsFiles } from "./tls.ts";
import { applyRuntimeFixes } from "./runtime.ts";
import { leanUnaryPath, STRICT_JSON_OPTIONS } from "./lean-unary.ts";
import { isBodyBudgetStop, type BodyBudget, type BodyCharge } from "./body-budget.ts";
import { MAX_TIMER_MS } from "./config.ts";

/** Answered with 200 before any middleware, for process supervisors and load balancers. */
export const LIVENESS_PATH = "/healthz";
/** 200 when the readiness check passes, 503 with the reason otherwise. */
export const READINESS_PATH = "/readyz";

const HTTP2_PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
/** A client that connects and says nothing for this long is disconnected. */
const FIRST_BYTES_TIMEOUT_MS = 10_000;

/** Aborted when the server starts draining; long waits and streams end cleanly on it. */
export const drainSignalKey = createContextKey<AbortSignal>(new AbortController().signal, { description: "server drain" });
/**
 * Called when a call's handler starts (trackingInterceptor): the count a call got from its
 * headers (serveCall) is handed over to the handler's own.
 */
const handlerStartedKey = createContextKey<() => void>(() => {}, { description: "call handed to its handler" });
/**
 * Why the caller's connection has no client certificate the server's CA signed, on a server
 * that asks for one (mutual TLS: tls.ts); undefined when it has one, or none is asked for.
 */
const clientCertificateProblemKey = createContextKey<string | undefined>(undefined, { description: "client certificate problem" });

/** The signal that fires when this call should wrap up: the client went away or the server is draining. */
export function callEndSignal(ctx: HandlerContext): AbortSignal {
  return AbortSignal.any([ctx.signal, ctx.values.get(drainSignalKey)]);
}

export interface ServerOptions {
  /** Service name for logs and health. */
  name: string;
  host: string;
  port: number;
  logger: Logger;
  /** Registers the service's handlers. */
  routes: (router: ConnectRouter) => void;
  /**
   * Verifies the signed caller identity on every call (internal services) against the keys'
   * trusted signers. The gateway authenticates API keys itself and passes `undefined`.
   */
  signingKeys: SigningKeys | undefined;
  readiness?: ReadinessCheck;
  /** Interceptors run after the platform's (trace, logging, error masking, identity). */
  interceptors?: Interceptor[];
  /** Adds per-call values from the raw request (e.g. the client address). */
  contextValues?: (req: http.IncomingMessage | http2.Http2ServerRequest, values: ContextValues) => void;
  /** Largest accepted message; bigger ones answer RESOURCE_EXHAUSTED. */
  readMaxBytes?: number;
  /**
   * Request bodies count against this budget while they are received, on the lean unary path
   * and connect-node's (body-budget.ts); one that would take it over is refused
   * RESOURCE_EXHAUSTED. An `httpHandler` that reads bodies itself charges them itself.
   */
  bodyBudget?: BodyBudget;
  /**
   * Serve GET /metrics on this separate port instead of the main one — for the gateway, whose
   * main port is public. Undefined: /metrics is on the main port.
   */
  metricsPort?: number;
  /**
   * Serve TLS (HTTP/2 and HTTP/1.1 by ALPN) with these files instead of cleartext; when they
   * name a CA, RPCs other than health need a client certificate it signed (tls.ts).
   */
  tls?: TlsFiles;
  /** How long in-flight calls may take to finish on shutdown. */
  shutdownGraceMs?: number;
  /** How long a new connection may stay silent before it is closed (default 10 s). */
  firstBytesTimeoutMs?: number;
  /** How long an HTTP/1 request's headers may take to arrive (default 60 s; then 408 and the connection closes). */
  headersTimeoutMs?: number;
  /** How long an HTTP/2 connection with no call open may stay silent before it is closed (default 2 min). */
  idleSessionTimeoutMs?: number;
  /**
   * Concurrent HTTP/2 streams a client may open on one connection (advertised in SETTINGS;
   * clients queue the rest). Unset: no limit beyond nghttp2's session memory, which suits the
   * internal services, whose callers share one connection for everything.
   */
  maxStreamsPerConnection?: number;
  /**
   * Largest request header block accepted, in bytes, over both protocols (default Node's
   * HTTP/1 limit, `http.maxHeaderSize`: 16 KiB). HTTP/1 answers 431 and closes; HTTP/2
   * advertises it as SETTINGS_MAX_HEADER_LIST_SIZE (clients refuse to send more) and resets a
   * stream whose headers go over (ENHANCE_YOUR_CALM). Without it HTTP/2 took 64 KiB.
   */
  maxHeaderBytes?: number;
  /**
   * Runs on every HTTP request after the liveness/readiness paths and before Connect (e.g. the
   * gateway's CORS: it answers preflights and adds response headers). Returns true when it
   * answered the request itself; a promise when it decides later (without reading the body),
   * false then handing the request on as if it had returned false at once.
   */
  httpHandler?: (
    req: http.IncomingMessage | http2.Http2ServerRequest,
    res: http.ServerResponse | http2.Http2ServerResponse,
    /**
     * For calls the handler serves itself: counted in flight, so draining waits for them;
     * `drainSignal` fires when the server starts draining (streams end cleanly on it).
     */
    calls: { start(): void; end(): void; readonly drainSignal: AbortSignal },
  ) => boolean | Promise<boolean>;
}

export interface RunningServer {
  readonly port: number;
  readonly url: string;
  /** Where GET /metrics is served: the main URL, or the separate metrics port. */
  readonly metricsUrl: string;
  readonly health: HealthState;
  /** Drains and closes; resolves when every connection is closed. */
  close(): Promise<void>;
}

const DEFAULT_READ_MAX_BYTES = 4 * 1024 * 1024;
/** An HTTP/1 request's headers must arrive within this (Node's default). */
const HEADERS_TIMEOUT_MS = 60_000;
/** An HTTP/1 request (headers and body) must arrive within this (Node's default); answers may take longer. */
const REQUEST_TIMEOUT_MS = 300_000;
/** An HTTP/2 connection with no call open and no frame (pings included) for this long is closed. */
const IDLE_SESSION_TIMEOUT_MS = 120_000;

export async function startServer(options: ServerOptions): Promise<RunningServer> {
  // The client-certificate check runs with the identity check (identityReader): without one,
  // mutual TLS would be asked for and never enforced.
  if (options.tls?.mutual && options.signingKeys === undefined) throw new Error(`${options.name}: mutual TLS needs signing keys, whose check enforces it`);
  applyRuntimeFixes();
  const { logger } = options;
  const drain = new AbortController();
  // Every stream served outside Connect (the gateway's raw path) listens for the drain.
  setMaxListeners(0, drain.signal);
  let inFlight = 0;
  let onIdle: (() => void) | undefined;
  const track = {
    drainSignal: drain.signal,
    start: () => inFlight++,
    end: () => {
      inFlight--;
      if (inFlight === 0) onIdle?.();
    },
  };

  const serviceNames: string[] = [];
  const health = new HealthState(options.readiness ?? (async () => null), serviceNames);

  // Tracing and metrics for the process (idempotent: in-process tests start several servers).
  initTracing(options.name);
  initMetrics(options.name);
  // Outermost first: the server span is active for everything after it (logs carry its trace
  // id); metrics see the code the client gets (after masking).
  const platformInterceptors: Interceptor[] = [
    serverTraceInterceptor(),
    metricsInterceptor(),
    trackingInterceptor(track, logger),
    connectVersionInterceptor(),
  ];
  if (options.signingKeys !== undefined) platformInterceptors.push(identityInterceptor(options.signingKeys));

  const interceptors = [...platformInterceptors, ...(options.interceptors ?? [])];
  const readMaxBytes = options.readMaxBytes ?? DEFAULT_READ_MAX_BYTES;
  /**
   * Calls counted in flight from their headers until their handler starts (serveCall): a unary
   * call's handler starts only once its body is in, and a drain must wait for a body still
   * arriving as for a handler that runs. A stream's handler starts at once, so a client that
   * keeps its side open (the executor's IngestLogs) is counted by its handler, as before, and
   * ends on the drain signal; it is not held on to until its body ends.
   */
  const countedFromHeaders = new WeakMap<object, () => void>();
  const contextValues = (req: http.IncomingMessage | http2.Http2ServerRequest) => {
    const values = createContextValues();
    values.set(drainSignalKey, drain.signal);
    const handed = countedFromHeaders.get(req);
    if (handed) values.set(handlerStartedKey, handed);
    if (options.tls?.mutual) values.set(clientCertificateProblemKey, clientCertificateProblemOf(req));
    options.contextValues?.(req, values);
    return values;
  };
  // Unary gRPC and Connect calls (nearly all traffic) take the lean path; the rest connect-node.
  const identityCheck = options.signingKeys === undefined ? undefined : identityReader(options.signingKeys);
  const leanUnary = leanUnaryPath({
    interceptors,
    readMaxBytes,
    contextValues,
    logger,
    bodyBudget: options.bodyBudget,
    // The caller's identity is checked on the headers, before the body is read: a caller
    // without one is refused at once, whatever it declared it would send.
    beforeBody: identityCheck && ((service, header, values) => values.set(identityKey, identityCheck(service, header, values))),
  });
  const handler = connectNodeAdapter({
    routes(router) {
      const recording = leanUnary.recording(router);
      registerHealth(recording, health, drain.signal);
      options.routes(recording);
      for (const h of router.handlers) serviceNames.push(h.service.typeName);
    },
    interceptors,
    readMaxBytes,
    contextValues,
    // JSON that is not UTF-8 is INVALID_ARGUMENT, as on the lean path (lean-unary.ts).
    jsonOptions: STRICT_JSON_OPTIONS,
  });

  const onRequest = (req: http.IncomingMessage, res: http.ServerResponse) => {
    // While draining, an HTTP/1.1 connection is closed after its answer (keep-alive would
    // carry the client's next call to a server that is going away).
    if (req.httpVersionMajor === 1) {
      if (drain.signal.aborted) res.setHeader("connection", "close");
      // Pipelined requests are all served at once (Node queues only their answers): without a
      // cap one connection could hold any number of calls open, past the per-connection limit
      // HTTP/2 connections have. One over it is answered 503 and the connection closed.
      if (options.maxStreamsPerConnection !== undefined && (h1Connections.get(req.socket) ?? 0) >= options.maxStreamsPerConnection) {
        tooManyPipelined(req, res);
        return;
      }
      answering(req.socket, res);
    }
    if (req.url === LIVENESS_PATH) {
      res.writeHead(200, { "content-type": "text/plain" });
      res.end("ok\n");
      return;
    }
    if (req.url === READINESS_PATH) {
      void health.notReadyReason().then((reason) => {
        res.writeHead(reason === null ? 200 : 503, { "content-type": "text/plain" });
        res.end(reason === null ? "ready\n" : `not ready: ${reason}\n`);
      });
      return;
    }
    if (req.url === METRICS_PATH && req.method === "GET" && options.metricsPort === undefined) {
      serveMetrics(res, logger);
      return;
    }
    const handled = options.httpHandler?.(req, res, track);
    if (handled === true) return;
    if (handled instanceof Promise) {
      // The handler decides after a wait (the gateway's edge check before a body is read): the
      // call counts as in flight meanwhile, and its body waits unread in the socket.
      track.start();
      handled.then(
        (taken) => {
          // The call's own count (serveCall) starts before this one ends, so a drain never sees
          // it at zero in between.
          try {
            if (!taken) serveCall(req, res);
          } finally {
            track.end();
          }
        },
        (err: unknown) => {
          track.end();
          logger.error({ err, path: req.url }, "http handler failed");
          if (!res.headersSent) res.writeHead(500);
          res.end();
        },
      );
      return;
    }
    serveCall(req, res);
  };
  const serveCall = (req: http.IncomingMessage, res: http.ServerResponse) => {
    track.start();
    let counted = true;
    const release = () => {
      if (!counted) return;
      counted = false;
      track.end();
    };
    countedFromHeaders.set(req, release);
    // Answered without a handler (a malformed request, say), or the client left: released then.
    res.once("close", release);
    if (leanUnary.serve(req, res)) return;
    readBodyUntilDeadline(req, res);
    if (options.bodyBudget) chargeBodyReads(req, res, options.bodyBudget);
    handler(req, res);
  };

  // HTTP/1 connections and how many answers each has pending, so shutdown closes each one once
  // its answers are written (Node's closeAllConnections would cut answers still being sent).
  const h1Connections = new Map<net.Socket, number>();
  /** HTTP/1 connections to close once their answers are written (retire). */
  const retiring = new WeakSet<net.Socket>();
  /** Each HTTP/2 connection's session, to end it gracefully (retire). */
  const sessionOf = new WeakMap<net.Socket, http2.ServerHttp2Session>();
  const answering = (socket: net.Socket, res: http.ServerResponse) => {
    if (!h1Connections.has(socket)) return;
    h1Connections.set(socket, h1Connections.get(socket)! + 1);
    res.once("close", () => {
      const open = h1Connections.get(socket);
      if (open === undefined) return;
      h1Connections.set(socket, open - 1);
      if (open === 1 && (drain.signal.aborted || retiring.has(socket))) socket.end();
    });
  };
  const headersTimeout = options.headersTimeoutMs ?? HEADERS_TIMEOUT_MS;
  const maxHeaderBytes = options.maxHeaderBytes ?? http.maxHeaderSize;
  const h1 = http.createServer(
    {
      maxHeaderSize: maxHeaderBytes,
      headersTimeout,
      requestTimeout: Math.max(REQUEST_TIMEOUT_MS, headersTimeout),
      // Node checks the two deadlines this often (its default: 30 s).
      connectionsCheckingInterval: Math.min(30_000, Math.max(100, Math.floor(headersTimeout / 4))),
    },
    onRequest,
  );
  // `Expect: 100-continue`: Node would send "100 Continue" at once, before anything decided
  // on the headers, inviting a client that is about to be refused (rate limit, credential,
  // identity, size) to send its body. It goes out only when something reads the body; an
  // answer given without reading it closes the connection (Node does, since the client may or
  // may not send the body after it), and the client never sends it.
  h1.on("checkContinue", (req: http.IncomingMessage, res: http.ServerResponse) => {
    const read = req._read.bind(req);
    req._read = (size: number) => {
      req._read = read;
      if (!res.headersSent && !res.destroyed) res.writeContinue();
      read(size);
    };
    onRequest(req, res);
  });
  // Node tracks an HTTP/1 server's connections (and so enforces headersTimeout and
  // requestTimeout, and can close idle ones) from its "listening" event on; this server is handed
  // its connections by the sniffer below and never listens itself, so it is told here.
  h1.emit("listening");
  // The HTTP/2 compatibility API offers the same request/response surface as HTTP/1.
  // The header limit is a setting, which nghttp2 enforces per stream (Node's `maxHeaderSize`
  // option for HTTP/2 only sizes its buffers and enforces nothing).
  const h2 = http2.createServer(
    {
      settings: {
        maxHeaderListSize: maxHeaderBytes,
        ...(options.maxStreamsPerConnection === undefined ? {} : { maxConcurrentStreams: options.maxStreamsPerConnection }),
      },
    },
    onRequest as unknown as (req: http2.Http2ServerRequest, res: http2.Http2ServerResponse) => void);
  const sessions = new Set<http2.ServerHttp2Session>();
  const openStreams = new WeakMap<http2.Http2Session, number>();
  /**
   * Each session's idle timer, (re)armed whenever it has no call open: at its start, when its
   * last call ends, and at each ping the client sends. Its own timer rather than Node's session
   * timeout, which fires once (a session that had a call open at that moment was never closed
   * for idleness afterwards) and does not see pings (Node passes them up only to a listener).
   */
  const idleTimers = new WeakMap<http2.Http2Session, () => void>();
  const idleSessionTimeoutMs = options.idleSessionTimeoutMs ?? IDLE_SESSION_TIMEOUT_MS;
  h2.on("session", (session) => {
    sessions.add(session);
    // A connection with no call open and nothing said for this long is closed (GOAWAY): one that
    // sent only its preface, or whose client forgot it, would otherwise be kept for ever.
    // Clients that keep an idle connection open send pings, which count as activity.
    let timer: NodeJS.Timeout | undefined;
    const armIdle = () => {
      clearTimeout(timer);
      if ((openStreams.get(session) ?? 0) > 0 || session.closed) return;
      timer = setTimeout(() => {
        if ((openStreams.get(session) ?? 0) === 0) session.close();
      }, idleSessionTimeoutMs).unref();
    };
    idleTimers.set(session, armIdle);
    session.on("ping", armIdle);
    session.on("close", () => {
      sessions.delete(session);
      clearTimeout(timer);
    });
    armIdle();
  });
  h2.on("stream", (stream: http2.ServerHttp2Stream) => {
    const session = stream.session;
    if (!session) return;
    openStreams.set(session, (openStreams.get(session) ?? 0) + 1);
    stream.once("close", () => {
      const open = (openStreams.get(session) ?? 1) - 1;
      openStreams.set(session, open);
      if (open === 0) idleTimers.get(session)?.();
    });
  });

  // Sniffs the first bytes of each connection: HTTP/2 starts with its 24-byte preface, which no
  // HTTP/1 request does. Until the bytes decide (the whole preface, or one that differs from
  // it), the connection belongs to neither server, and neither one's timeouts would close it:
  // it has a deadline of its own, and shutdown closes it.
  const undecided = new Set<net.Socket>();
  const firstBytesTimeoutMs = options.firstBytesTimeoutMs ?? FIRST_BYTES_TIMEOUT_MS;
  const route = (socket: net.Socket) => {
    // A TLS handshake that ends after the drain began: no new connection is served.
    if (drain.signal.aborted) {
      socket.destroy();
      return;
    }
    undecided.add(socket);
    socket.once("close", () => undecided.delete(socket));
    const onSilent = () => socket.destroy();
    socket.setTimeout(firstBytesTimeoutMs, onSilent);
    let head = Buffer.alloc(0);
    socket.on("readable", function route() {
      for (let chunk: Buffer | null; (chunk = socket.read() as Buffer | null) !== null; ) head = Buffer.concat([head, chunk]);
      const protocol = protocolOf(head);
      if (protocol === undefined) return; // a prefix of the HTTP/2 preface so far
      socket.off("readable", route);
      undecided.delete(socket);
      // The deadline and its listener go: the HTTP servers set their own socket timeouts.
      socket.setTimeout(0);
      socket.off("timeout", onSilent);
      socket.unshift(head);
      if (protocol === "h1") {
        h1Connections.set(socket, 0);
        socket.once("close", () => h1Connections.delete(socket));
        h1.emit("connection", socket);
        return;
      }
      // The session is made, and announced, while the server takes the connection.
      const remember = (session: http2.ServerHttp2Session) => sessionOf.set(socket, session);
      h2.once("session", remember);
      h2.emit("connection", socket);
      h2.off("session", remember);
    });
    socket.on("error", () => socket.destroy());
  };
  // Under TLS the decrypted bytes are sniffed the same way (a client that negotiated "h2" by
  // ALPN sends the preface; HTTP/2 without ALPN is refused by Node's HTTP/2 server, as RFC 9113
  // asks). A handshake gets as long as a cleartext connection's first bytes.
  /**
   * Ends a connection whose peer may no longer call (tlsListener): HTTP/2 with GOAWAY (calls on
   * it finish, the client opens a new connection for the next: a new handshake), HTTP/1 once its
   * answers are written.
   */
  const retire = (socket: net.Socket) => {
    const session = sessionOf.get(socket);
    if (session) return session.close();
    const open = h1Connections.get(socket);
    if (open === undefined) socket.destroy();
    else if (open === 0) socket.end();
    else retiring.add(socket);
  };
  const secure = options.tls && tlsListener(options.tls, firstBytesTimeoutMs, route, retire, logger);
  const tcp = secure ? secure.server : net.createServer({ noDelay: true }, route);

  await new Promise<void>((resolve, reject) => {
    tcp.once("error", reject);
    tcp.listen(options.port, options.host, () => resolve());
  });
  const address = tcp.address() as net.AddressInfo;
  let metricsServer: http.Server | undefined;
  if (options.metricsPort !== undefined) {
    const server = http.createServer((req, res) => {
      if (req.url === METRICS_PATH && req.method === "GET") return serveMetrics(res, logger);
      res.writeHead(404).end();
    });
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(options.metricsPort, options.host, () => resolve());
    });
    metricsServer = server;
    logger.info({ port: (server.address() as net.AddressInfo).port }, "metrics listening");
  }
  const hostPart = options.host.includes(":") ? `[${options.host}]` : options.host;
  const url = `${secure ? "https" : "http"}://${hostPart}:${address.port}`;
  logger.info({ port: address.port, host: options.host }, `${options.name} listening`);

  let closing: Promise<void> | undefined;
  const close = () =>
    (closing ??= (async () => {
      logger.info({ inFlight }, "draining");
      health.drain();
      drain.abort();
      tcp.close();
      secure?.stop();
      for (const socket of undecided) socket.destroy();
      metricsServer?.close();
      // HTTP/1 connections with no request in progress close now (Node tracks them: it was told
      // "listening"); the others after their answer ("answering"), so a request whose headers
      // are still arriving is answered, not cut.
      h1.closeIdleConnections();
      // GOAWAY now: calls in flight finish, and clients open no new ones on these connections
      // (they go to another replica) — rather than keep serving until the grace runs out.
      for (const session of sessions) session.close();
      if (inFlight > 0) {
        await Promise.race([
          new Promise<void>((resolve) => (onIdle = resolve)),
          new Promise((resolve) => setTimeout(resolve, options.shutdownGraceMs ?? 10_000).unref()),
        ]);
      }
      h1.close(() => {}); // stops its connection checks (it never listened, so there is no error to see)
      // Answers still being written get a moment to reach their clients; then everything goes.
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          for (const session of sessions) session.destroy();
          for (const socket of h1Connections.keys()) socket.destroy();
          resolve();
        }, 2000).unref();
        const check = () => (sessions.size === 0 && h1Connections.size === 0 ? (clearTimeout(timer), resolve()) : setTimeout(check, 10).unref());
        check();
      });
      await flushTracing();
      logger.info("closed");
    })());

  const metricsUrl = metricsServer ? `http://${hostPart}:${(metricsServer.address() as net.AddressInfo).port}` : url;
  return { port: address.port, url, metricsUrl, health, close };
}

/** The answer to an HTTP/1.1 request pipelined past the per-connection limit: 503, and the connection closes after it. */
function tooManyPipelined(req: http.IncomingMessage, res: http.ServerResponse): void {
  req.resume();
  res.shouldKeepAlive = false;
  res.writeHead(503, { "content-type": "text/plain", connection: "close", "retry-after": "1" });
  res.end("too many pipelined requests on this connection\n");
}

function serveMetrics(res: http.ServerResponse, logger: Logger): void {
  metricsText().then(
    ({ contentType, body }) => {
      res.writeHead(200, { "content-type": contentType });
      res.end(body);
    },
    (err: unknown) => {
      logger.error({ err }, "metrics collection failed");
      res.writeHead(500, { "content-type": "text/plain" });
      res.end("metrics collection failed\n");
    },
  );
}


/**
 * connect-node reads a request body (gRPC-Web, streams, everything the lean path leaves to it)
 * without regard to the call's deadline: a client that never ended its body held the call
 * forever. Here the body's reader gives up at the deadline (grpc-timeout, or connect-timeout-ms)
 * with DEADLINE_EXCEEDED, which connect-node answers in the call's protocol; over HTTP/2 the
 * stream is then reset with NO_ERROR once that answer is out (the client's side is still open).
 * Malformed deadlines are left to connect-node, which refuses them.
 */
function readBodyUntilDeadline(req: http.IncomingMessage | http2.Http2ServerRequest, res: http.ServerResponse | http2.Http2ServerResponse): void {
  if (req.method !== "POST" || req.complete) return;
  const grpcTimeout = req.headers["grpc-timeout"];
  const connectTimeout = req.headers["connect-timeout-ms"];
  const { timeoutMs } =
    typeof grpcTimeout === "string" ? parseGrpcTimeout(grpcTimeout, Number.MAX_SAFE_INTEGER)
    : typeof connectTimeout === "string" ? parseConnectTimeout(connectTimeout, Number.MAX_SAFE_INTEGER)
    : {};
  if (timeoutMs === undefined || timeoutMs > MAX_TIMER_MS) return;
  const read = (req as AsyncIterable<Buffer>)[Symbol.asyncIterator].bind(req);
  const onLate = () => discardRestOnceAnswered(req, res);
  Object.defineProperty(req, Symbol.asyncIterator, { configurable: true, value: () => chunksUntil(read(), timeoutMs, onLate) });
}

/**
 * The call is answered before its body ended (the answer is an error): over HTTP/2 the stream
 * then closes only when the client ends its side, so what still comes is dropped and, once the
 * answer is out, the stream is reset with NO_ERROR. (HTTP/1.1: Node's server discards it.)
 */
function discardRestOnceAnswered(req: http.IncomingMessage | http2.Http2ServerRequest, res: http.ServerResponse | http2.Http2ServerResponse): void {
  if (req.complete || !("stream" in res) || res.stream.destroyed) return;
  req.resume();
  // The trailers go out during the send that asks for them (the compat layer's own listener,
  // registered first), so the reset waits a turn.
  res.stream.once("wantTrailers", () => setImmediate(() => res.stream.close(http2.constants.NGHTTP2_NO_ERROR)));
}

/**
 * connect-node's reads of a request body (gRPC-Web, streams, compressed calls the lean path
 * leaves to it) count against the body budget as they come; a body that would take it over
 * ends the read with RESOURCE_EXHAUSTED, and one still arriving at the budget's hold limit with
 * DEADLINE_EXCEEDED, which connect-node answers in the call's protocol. The charge is given
 * back when the body ends, its read fails, or the response closes.
 */
function chargeBodyReads(req: http.IncomingMessage | http2.Http2ServerRequest, res: http.ServerResponse | http2.Http2ServerResponse, budget: BodyBudget): void {
  if (req.method !== "POST") return;
  const read = (req as AsyncIterable<Buffer>)[Symbol.asyncIterator].bind(req);
  Object.defineProperty(req, Symbol.asyncIterator, {
    configurable: true,
    value: async function* charged(): AsyncGenerator<Buffer> {
      const chunks = read();
      let charge: BodyCharge | undefined;
      try {
        charge = budget.charge(req, res);
        // Raced only when it can fire: a promise that never settles would keep every race's reaction.
        let overdue: Promise<never> | undefined;
        if (charge.holdLimited) {
          const held = charge;
          overdue = new Promise<never>((_, reject) => held.onOverdue(reject));
        }
        const nextChunk = () => (overdue ? Promise.race([chunks.next(), overdue]) : chunks.next());
        for (let next = await nextChunk(); next.done !== true; next = await nextChunk()) {
          charge.add(next.value);
          yield next.value;
        }
      } catch (err) {
        if (isBodyBudgetStop(err)) discardRestOnceAnswered(req, res);
        throw err;
      } finally {
        charge?.release();
      }
    },
  });
}

async function* chunksUntil(chunks: AsyncIterator<Buffer>, timeoutMs: number, onLate: () => void): AsyncGenerator<Buffer> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      onLate();
      reject(new ConnectError("the deadline passed before the request was read", Code.DeadlineExceeded));
    }, timeoutMs);
  });
  late.catch(() => {}); // a reader that stopped early never sees it
  try {
    for (;;) {
      const next = await Promise.race([chunks.next(), late]);
      if (next.done) return;
      yield next.value;
    }
  } finally {
    clearTimeout(timer);
  }
}

/** "h2" once `head` holds the whole HTTP/2 preface, "h1" once it differs from it, else undefined. */
function protocolOf(head: Buffer): "h1" | "h2" | undefined {
  const n = Math.min(head.length, HTTP2_PREFACE.length);
  if (!head.subarray(0, n).equals(HTTP2_PREFACE.subarray(0, n))) return "h1";
  return n === HTTP2_PREFACE.length ? "h2" : undefined;
}

/**
 * A TLS listener that hands each connection, once its handshake is done, to `route`. It asks
 * for a client certificate when the files name a CA but accepts a connection without one (the
 * handshake cannot tell a probe from an RPC): RPCs then check it (identityReader). A handshake
 * must be done within `handshakeTimeoutMs` of the connection, however its bytes trickle in (Node's
 * own handshake timeout is an idle timeout, and only reports: it closes nothing). Renewed files
 * are loaded for new connections as they appear (tls.ts). Under mutual TLS the peers of open
 * connections are checked again at each look at the files: a connection whose client
 * certificate has expired, or no longer leads to a CA of the bundle (one taken out), is retired.
 */
function tlsListener(files: TlsFiles, handshakeTimeoutMs: number, route: (socket: net.Socket) => void, retire: (socket: net.Socket) => void, logger: Logger) {
  const server = tls.createServer({
    ...files.current(),
    requestCert: files.mutual,
    rejectUnauthorized: false,
    ALPNProtocols: ["h2", "http/1.1"],
    noDelay: true,
  });
  // Connections still in their handshake, by peer address: the TLS socket Node makes of a
  // connection tells no public tale of the TCP socket under it, but both have the one peer.
  const handshaking = new Map<string, { socket: net.Socket; deadline: NodeJS.Timeout }>();
  const peerOf = (socket: net.Socket) => `${socket.remoteAddress}|${socket.remotePort}`;
  server.on("connection", (socket: net.Socket) => {
    if (socket.remoteAddress === undefined) return socket.destroy(); // gone already
    const peer = peerOf(socket);
    const deadline = setTimeout(() => socket.destroy(), handshakeTimeoutMs).unref();
    handshaking.set(peer, { socket, deadline });
    socket.once("close", () => {
      clearTimeout(deadline);
      if (handshaking.get(peer)?.socket === socket) handshaking.delete(peer);
    });
  });
  /** Connections whose client certificate the handshake accepted: checked again at each look. */
  const certified = new Set<tls.TLSSocket>();
  server.on("secureConnection", (socket: tls.TLSSocket) => {
    const peer = peerOf(socket);
    const pending = handshaking.get(peer);
    if (pending) {
      clearTimeout(pending.deadline);
      handshaking.delete(peer);
    }
    if (socket.authorized) {
      certified.add(socket);
      socket.once("close", () => certified.delete(socket));
    }
    route(socket);
  });
  const recheckPeers = (material: ReturnType<TlsFiles["current"]>) => {
    if (certified.size === 0) return;
    const cas = certificatesOf(material.ca);
    for (const socket of certified) {
      const chain = peerChainOf(socket);
      if (chainStillTrusted(chain, cas)) continue;
      certified.delete(socket);
      logger.info({ peer: chain[0]?.subject, validTo: chain[0]?.validTo }, "closing a connection whose client certificate is no longer trusted (expired, or its CA left the bundle)");
      retire(socket);
    }
  };
  // A failed handshake (a cleartext client, a wrong protocol, no common cipher) is the client's
  // problem: logged at debug, and the connection closed.
  server.on("tlsClientError", (err, socket) => {
    logger.debug({ err: err.message }, "TLS handshake failed");
    socket.destroy();
  });
  // What the listener serves, compared by identity: the process's clients share the files and
  // may have loaded a renewal first (when they opened a connection), which the listener must
  // still take up.
  let served = files.current();
  let lastProblem: string | undefined;
  const timer = setInterval(() => {
    const outcome = files.reloadIfChanged(Date.now(), { force: true });
    const material = files.current();
    if (material !== served) {
      served = material;
      lastProblem = undefined;
      server.setSecureContext({ ...material });
      logger.info({ cert: files.paths.cert }, "TLS certificate reloaded");
    } else if (typeof outcome === "object" && outcome.problem !== lastProblem) {
      // Said once per problem: a renewal that never loads would otherwise go unnoticed until
      // the old certificate expires.
      lastProblem = outcome.problem;
      logger.warn({ problem: outcome.problem }, "TLS files changed but do not load; still serving the previous certificate");
    }
    if (files.mutual) recheckPeers(material);
  }, TLS_RELOAD_CHECK_MS);
  timer.unref();
  return {
    server,
    /** On shutdown: the reload checks stop and connections still in their handshake close. */
    stop() {
      clearInterval(timer);
      for (const { socket } of handshaking.values()) socket.destroy();
    },
  };
}

/** A TLS peer's certificate and the chain it sent, as X509Certificates (leaf first). */
function peerChainOf(socket: tls.TLSSocket): X509Certificate[] {
  const chain: X509Certificate[] = [];
  let cert: tls.DetailedPeerCertificate | undefined = socket.getPeerCertificate(true);
  const seen = new Set<string>();
  while (cert?.raw && !seen.has(cert.fingerprint256) && chain.length < 10) {
    seen.add(cert.fingerprint256);
    chain.push(new X509Certificate(cert.raw));
    cert = cert.issuerCertificate;
  }
  return chain;
}

/**
 * Counts in-flight calls (streams until their last message) for graceful shutdown, logs each
 * call's outcome, and masks errors that are not ConnectErrors: the client gets INTERNAL with
 * the trace id, the operator finds the cause under that id in the logs.
 */
function trackingInterceptor(track: { start(): void; end(): void }, logger: Logger): Interceptor {
  return (next) => async (req) => {
    const startedAt = performance.now();
    const method = `${req.service.typeName}/${req.method.name}`;
    const finish = (err?: unknown) => {
      track.end();
      const ms = Math.round((performance.now() - startedAt) * 100) / 100;
      if (err === undefined) logger.debug({ method, ms, code: "ok" }, "rpc");
      else if (err instanceof ConnectError && err.code !== Code.Internal && err.code !== Code.Unknown) {
        logger.debug({ method, ms, code: Code[err.code] }, "rpc");
      } else logger.error({ method, ms, err }, "rpc failed");
    };
    const mask = (err: unknown): ConnectError => {
      if (err instanceof ConnectError && err.code !== Code.Internal && err.code !== Code.Unknown) return err;
      const traceId = currentTrace()?.traceId ?? "none";
      return new ConnectError(maskedInternalMessage(traceId), Code.Internal, undefined, undefined, err);
    };
    track.start();
    req.contextValues.get(handlerStartedKey)();
    return observeCallEnd(() => next(req), { onEnd: finish, mapError: mask });
  };
}

/**
 * Refuses a Connect call (any content type but gRPC's and gRPC-Web's) whose
 * connect-protocol-version header is present and not 1, as docs/edge.md says: connect-node
 * checks it only when told to require it, which would refuse clients that leave it out. (The
 * lean unary path checks it before reading the body; this covers connect-node's calls.)
 */
function connectVersionInterceptor(): Interceptor {
  return (next) => async (req) => {
    const version = req.header.get("connect-protocol-version");
    if (version !== null && version !== "1" && !(req.header.get("content-type") ?? "").startsWith("application/grpc")) {
      throw unsupportedConnectVersion(version);
    }
    return await next(req);
  };
}

/**
 * Refuses calls whose caller identity is missing, forged or expired (health excepted).
 * Exported so in-process tests (createRouterTransport) check identity exactly as servers do.
 */
export function identityInterceptor(keys: SigningKeys): Interceptor {
  const read = identityReader(keys);
  return (next) => (req) => {
    // The lean unary path verified it before reading the body (beforeBody): not twice.
    if (req.contextValues.get(identityKey) === undefined) req.contextValues.set(identityKey, read(req.service, req.header, req.contextValues));
    return next(req);
  };
}

/**
 * The verified caller identity of a call to `service`; health is open to all (undefined). Under
 * mutual TLS a caller without a client certificate the CA signed is refused first.
 */
function identityReader(keys: SigningKeys): (service: DescService, header: Headers, values: ContextValues) => Identity | undefined {
  return (service, header, values) => {
    if (service.typeName === "grpc.health.v1.Health") return undefined;
    const certificateProblem = values.get(clientCertificateProblemKey);
    if (certificateProblem !== undefined) {
      throw unauthenticated(
        "CLIENT_CERTIFICATE_REQUIRED",
        `this service takes calls only from Outpost processes holding a certificate its CA signed (OUTPOST_TLS_CA_FILE): ${certificateProblem}`,
      );
    }
    return keys.readIdentity(header, audienceOf(service));
  };
}

/** Why the TLS connection `req` came on has no client certificate the CA signed; undefined when it has one. */
function clientCertificateProblemOf(req: http.IncomingMessage | http2.Http2ServerRequest): string | undefined {
  // HTTP/2's compatibility request answers `socket` through a proxy of the session's socket,
  // which passes reads of these two properties through.
  const socket = req.socket as Partial<Pick<tls.TLSSocket, "authorized" | "authorizationError">>;
  if (socket.authorized === true) return undefined;
  const error = socket.authorizationError;
  if (error === undefined || error === null) return "the connection is not TLS";
  const text = error instanceof Error ? ((error as NodeJS.ErrnoException).code ?? error.message) : String(error);
  return text === "UNABLE_TO_GET_ISSUER_CERT" || text === "ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE" || /no.*certificate/i.test(text)
    ? `no client certificate, or one from another CA (${text})`
    : `the client certificate was not accepted (${text})`;
}

export { formatTraceparent };
