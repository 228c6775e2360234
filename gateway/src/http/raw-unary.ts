/**
 * The gateway's fast path for unary gRPC calls (binary protobuf over HTTP/2), the bulk of SDK
 * traffic. Connect's server and client machinery on both sides of the hop cost about 1.4 ms of
 * CPU per call; here the call is checked and passed on as bytes:
 *
 * - the same edge decision as every other call (`admitCall`: credential, rate budgets);
 * - the request is read within the size limit, must be exactly one uncompressed message, and
 *   must decode as the method's input type, so malformed input is still refused at the edge
 *   with INVALID_ARGUMENT;
 * - it goes to the owning service over a shared HTTP/2 session with the caller's identity
 *   signed into the headers, the client's `grpc-timeout` and the trace context (a server span
 *   per call, as the Connect path has);
 * - the upstream's response headers, message and trailers come back unchanged (statuses and
 *   error details included), with the caller's RateLimit-* headers added; only an INTERNAL or
 *   UNKNOWN status is masked, as on the Connect path: the client gets INTERNAL with the trace
 *   id, the upstream's message goes to the gateway's log under that id.
 *
 * Everything else (Connect, gRPC-Web, JSON, streams, compression, reflection, health) takes the
 * Connect path in routes.ts, which behaves the same.
 */
import http2 from "node:http2";
import { fromBinary, type DescMethodUnary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { setTrailerStatus } from "@connectrpc/connect/protocol-grpc";
import {
  injectTraceHeaders,
  maskedInternalMessage,
  otelContext,
  rpcCodeLabel,
  rpcMetrics,
  SpanStatusCode,
  startServerSpan,
  writeIdentity,
  type Logger,
} from "@outpost/platform";
import type { EdgeOptions } from "../edge.ts";
import { admitCall, clientIpOf } from "../edge.ts";
import { PUBLIC_SERVICES, type Upstream } from "../core/routing.ts";

const GRPC_CONTENT_TYPES = new Set(["application/grpc", "application/grpc+proto"]);
/** Request headers passed on as they are; everything else the gateway sets itself. */
const PASSED_HEADERS = ["grpc-timeout", "grpc-accept-encoding", "user-agent"];
/** Response headers that belong to one hop. */
const HOP_HEADERS = new Set([":status", "connection", "keep-alive", "transfer-encoding", "upgrade", "date"]);
const STATUS_HEADERS = ["grpc-status", "grpc-message", "grpc-status-details-bin"];

interface Route {
  method: DescMethodUnary;
  upstream: Upstream;
}

export interface RawUnaryOptions extends Pick<EdgeOptions, "authenticator" | "rateLimits"> {
  upstreamUrls: Record<Upstream, string>;
  internalSecret: string;
  readMaxBytes: number;
  logger: Logger;
}

/** Counts a call as in flight, so a draining server waits for it. */
export interface CallTracker {
  start(): void;
  end(): void;
}

export function rawUnaryForwarder(options: RawUnaryOptions) {
  const routes = new Map<string, Route>();
  for (const { service, upstream } of PUBLIC_SERVICES) {
    for (const method of service.methods) {
      if (method.methodKind === "unary") routes.set(`/${service.typeName}/${method.name}`, { method: method as DescMethodUnary, upstream });
    }
  }
  const sessions = new Map<Upstream, http2.ClientHttp2Session>();
  const sessionTo = (upstream: Upstream): http2.ClientHttp2Session => {
    const existing = sessions.get(upstream);
    if (existing && !existing.closed && !existing.destroyed) return existing;
    const session = http2.connect(options.upstreamUrls[upstream]);
    session.on("error", (err) => options.logger.warn({ upstream, err: err.message }, "upstream session failed"));
    // A closed session, or one the upstream is draining (GOAWAY), takes no new calls: the next
    // call opens a fresh one while the old one finishes what it carries.
    const forget = () => {
      if (sessions.get(upstream) === session) sessions.delete(upstream);
    };
    session.on("close", forget);
    session.on("goaway", forget);
    session.unref();
    sessions.set(upstream, session);
    return session;
  };
  const requests = rpcMetrics.requests();
  const duration = rpcMetrics.duration();

  /** Takes the call when it is a unary gRPC call of a forwarded method; false leaves it to Connect. */
  function handle(req: http2.Http2ServerRequest, res: http2.Http2ServerResponse, calls: CallTracker): boolean {
    if (req.httpVersionMajor !== 2 || req.method !== "POST") return false;
    const contentType = req.headers["content-type"];
    if (typeof contentType !== "string" || !GRPC_CONTENT_TYPES.has(contentType)) return false;
    const encoding = req.headers["grpc-encoding"];
    if (encoding !== undefined && encoding !== "identity") return false;
    const route = routes.get(req.url);
    if (!route) return false;
    calls.start();
    forward(req, res, route)
      .catch((err: unknown) => {
        // Nothing more can be told to this client (its stream broke); keep the process up.
        options.logger.error({ err, path: req.url }, "raw unary call failed after its answer began");
        if (!res.stream.destroyed) res.stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR);
      })
      .finally(() => calls.end());
    return true;
  }

  async function forward(req: http2.Http2ServerRequest, res: http2.Http2ServerResponse, route: Route): Promise<void> {
    const methodName = `${route.method.parent.typeName}/${route.method.name}`;
    const endTimer = duration.startTimer({ method: methodName });
    const header = new Headers();
    for (const [name, value] of Object.entries(req.headers)) {
      if (!name.startsWith(":") && typeof value === "string") header.set(name, value);
    }
    const { span, ctx } = startServerSpan(route.method.parent.typeName, route.method.name, header);
    let code = Code.Unknown as Code | 0;
    try {
      code = await otelContext.with(ctx, async () => {
        let budget: [string, string][] = [];
        try {
          const body = await readBody(req, options.readMaxBytes);
          validateRequest(route.method, body);
          const admitted = await admitCall(options, { ip: clientIpOf(req), serviceTypeName: route.method.parent.typeName, methodName: route.method.name, header });
          budget = admitted.budget;
          const outgoing = new Headers({ "content-type": "application/grpc", te: "trailers" });
          for (const name of PASSED_HEADERS) {
            const value = header.get(name);
            if (value !== null) outgoing.set(name, value);
          }
          if (admitted.identity) writeIdentity(outgoing, options.internalSecret, admitted.identity);
          injectTraceHeaders(outgoing);
          const traceId = span.spanContext().traceId;
          const mask = (trailers: Record<string, string>): Record<string, string> => {
            const status = Number(trailers["grpc-status"]);
            if (status !== Code.Internal && status !== Code.Unknown) return trailers;
            const cause = percentDecoded(trailers["grpc-message"] ?? "");
            otelContext.with(ctx, () => options.logger.error({ method: methodName, upstreamStatus: Code[status], cause }, "upstream failed"));
            const { "grpc-status-details-bin": _details, ...rest } = trailers;
            return { ...rest, "grpc-status": String(Code.Internal), "grpc-message": encodeURIComponent(maskedInternalMessage(traceId)) };
          };
          return await relay(req, res, sessionTo(route.upstream), req.url, outgoing, body, budget, mask);
        } catch (err) {
          const error = ConnectError.from(err);
          if (error.code === Code.Internal || error.code === Code.Unknown) options.logger.error({ err, method: methodName }, "raw unary forward failed");
          respondError(res, error, budget);
          return error.code;
        }
      });
    } finally {
      const label = rpcCodeLabel(code);
      requests.inc({ method: methodName, code: label });
      endTimer({ code: label });
      if (code !== 0) span.setStatus({ code: SpanStatusCode.ERROR, message: Code[code] });
      span.end();
    }
  }

  return {
    handle,
    close() {
      for (const session of sessions.values()) session.close();
      sessions.clear();
    },
  };
}

/** Reads the whole request body, refusing more than one message of `maxBytes`. */
async function readBody(req: http2.Http2ServerRequest, maxBytes: number): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > maxBytes + 5) {
      throw new ConnectError(`message size is larger than configured readMaxBytes ${maxBytes}`, Code.ResourceExhausted);
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks, size);
}

/** One uncompressed gRPC message that decodes as the method's input, or INVALID_ARGUMENT. */
function validateRequest(method: DescMethodUnary, body: Buffer): void {
  if (body.length < 5) throw new ConnectError("protocol error: the request holds no complete message", Code.InvalidArgument);
  if (body[0] !== 0) throw new ConnectError("protocol error: compressed message without grpc-encoding", Code.InvalidArgument);
  const length = body.readUInt32BE(1);
  if (length !== body.length - 5) {
    throw new ConnectError(`protocol error: a unary request holds exactly one message (${length} bytes promised, ${body.length - 5} sent)`, Code.InvalidArgument);
  }
  try {
    fromBinary(method.input, body.subarray(5));
  } catch (err) {
    throw new ConnectError(`request message could not be decoded: ${err instanceof Error ? err.message : String(err)}`, Code.InvalidArgument);
  }
}

/**
 * Sends the call upstream and relays the answer. Resolves with the gRPC status code the client
 * got (CANCELLED when it left first); rejects with UNAVAILABLE when the upstream failed before
 * answering, so the caller can answer instead. Every path settles exactly once.
 */
function relay(
  req: http2.Http2ServerRequest,
  res: http2.Http2ServerResponse,
  session: http2.ClientHttp2Session,
  path: string,
  headers: Headers,
  body: Buffer,
  budget: [string, string][],
  mask: (trailers: Record<string, string>) => Record<string, string>,
): Promise<Code | 0> {
  return new Promise((resolve, reject) => {
    const outgoing: http2.OutgoingHttpHeaders = { ":method": "POST", ":path": path };
    for (const [name, value] of headers) outgoing[name] = value;
    let upstream: http2.ClientHttp2Stream;
    try {
      upstream = session.request(outgoing);
    } catch (err) {
      reject(new ConnectError(`upstream unavailable: ${err instanceof Error ? err.message : String(err)}`, Code.Unavailable));
      return;
    }
    let settled = false;
    let responded = false;
    const settle = (outcome: { code: Code | 0 } | { error: ConnectError }) => {
      if (settled) return;
      settled = true;
      req.off("close", onClientGone);
      if ("error" in outcome) reject(outcome.error);
      else resolve(outcome.code);
    };
    // The client left: stop the upstream call too.
    const onClientGone = () => {
      upstream.close(http2.constants.NGHTTP2_CANCEL);
      settle({ code: Code.Canceled });
    };
    req.once("close", onClientGone);
    const upstreamFailed = (why: string) => {
      if (settled) return;
      if (!responded) {
        settle({ error: new ConnectError(`upstream unavailable: ${why}`, Code.Unavailable) });
      } else {
        // Part of the answer is out: all the client can be told is that the stream broke.
        if (!res.stream.destroyed) res.stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR);
        settle({ code: Code.Unavailable });
      }
    };
    upstream.once("error", (err) => upstreamFailed(err.message));
    // Closed without an answer and without an error (e.g. reset with CANCEL or NO_ERROR).
    upstream.once("close", () => upstreamFailed(`the call was closed (code ${upstream.rstCode ?? "none"})`));
    upstream.once("response", (upstreamHeaders, flags) => {
      if (settled) return;
      responded = true;
      const status = Number(upstreamHeaders[":status"] ?? 200);
      const response: Record<string, string | string[]> = {};
      const statusTrailers: Record<string, string> = {};
      for (const [name, value] of Object.entries(upstreamHeaders)) {
        if (HOP_HEADERS.has(name) || value === undefined) continue;
        // A trailers-only answer carries its status in the headers: relay it as trailers.
        if (STATUS_HEADERS.includes(name) && typeof value === "string") statusTrailers[name] = value;
        else response[name] = value as string | string[];
      }
      for (const [name, value] of budget) response[name] = value;
      res.writeHead(status, response);
      let trailers: http2.IncomingHttpHeaders = {};
      upstream.once("trailers", (t) => (trailers = t));
      const finish = () => {
        if (settled) return;
        let out: Record<string, string> = { ...statusTrailers };
        for (const [name, value] of Object.entries(trailers)) if (typeof value === "string") out[name] = value;
        out = mask(out);
        res.addTrailers(out);
        res.end();
        settle({ code: Number(out["grpc-status"] ?? Code.Unknown) as Code | 0 });
      };
      if ((flags & http2.constants.NGHTTP2_FLAG_END_STREAM) !== 0) {
        finish();
        upstream.resume(); // nothing to read; let the stream close
        return;
      }
      upstream.on("data", (chunk: Buffer) => {
        if (!res.write(chunk) && !res.stream.destroyed) {
          upstream.pause();
          res.once("drain", () => upstream.resume());
        }
      });
      upstream.once("end", finish);
    });
    upstream.end(body);
  });
}

/** A gRPC error answered by the gateway itself: status, message and details in the trailers. */
function respondError(res: http2.Http2ServerResponse, error: ConnectError, budget: [string, string][]): void {
  if (res.stream.destroyed) return; // the client is gone
  if (res.headersSent) {
    res.stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR);
    return;
  }
  const headers: Record<string, string> = { "content-type": "application/grpc" };
  for (const [name, value] of budget) headers[name] = value;
  const trailer = new Headers();
  setTrailerStatus(trailer, error);
  const trailers: Record<string, string> = {};
  for (const [name, value] of error.metadata) trailers[name] = value;
  for (const [name, value] of trailer) trailers[name] = value;
  res.writeHead(200, headers);
  res.addTrailers(trailers);
  res.end();
}

/** grpc-message is percent-encoded; a malformed one is shown as sent. */
function percentDecoded(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}
