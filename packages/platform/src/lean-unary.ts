/**
 * The server's lean path for unary calls over gRPC and Connect: all of the internal hop
 * (gateway to service, executor to dispatcher, every service to the tenant service) and most of
 * what the gateway passes on. connect-node serves every call through a pipeline of async
 * generators (body, envelope split, parse, invoke, serialize, join); at saturation that
 * machinery, and the garbage it leaves (its generators survive young collections: README,
 * "Benchmarks"), were most of the dispatcher's CPU. Here a unary call is read whole, parsed
 * with connect's own serialization, and handed to connect's own `invokeUnaryImplementation`:
 * the same handler context, the same interceptors (trace, metrics, in-flight tracking and
 * masking, identity) and the same implementation as through connect-node. The answer, or the
 * error in the protocol's form (gRPC trailers; Connect's HTTP status and JSON body), is written
 * in one piece, compressed as connect-node would (gzip or brotli, from 1 KiB, when the client
 * accepts it). It leans on connect's protocol helpers (serialization, compression negotiation,
 * timeouts, status and error encoding), which connect marks internal: package.json pins the
 * exact connect version, and these tests and every other unary test cross this path.
 *
 * It takes POSTs of a recorded unary method: gRPC over HTTP/2 (`application/grpc`, `+proto`,
 * `+json`) and Connect over HTTP/1.1 or HTTP/2 (`application/proto`, `application/json`).
 * Everything else (streams, gRPC-Web, Connect GET, other content types) goes to connect-node,
 * which answers it as before.
 */
import type http from "node:http";
import http2 from "node:http2";
import { create, type DescMessage, type DescMethod, type DescService } from "@bufbuild/protobuf";
import {
  Code,
  ConnectError,
  createHandlerContext,
  createServiceImplSpec,
  type ConnectRouter,
  type ContextValues,
  type HandlerContext,
  type Interceptor,
  type MethodImplSpec,
} from "@connectrpc/connect";
import { compressionGzip, compressionBrotli } from "@connectrpc/connect-node";
import {
  compressionNegotiate,
  createMethodSerializationLookup,
  invokeUnaryImplementation,
  mergeNonProtocolHeaders,
  validateReadWriteMaxBytes,
  type Compression,
  type MethodSerializationLookup,
} from "@connectrpc/connect/protocol";
import * as grpc from "@connectrpc/connect/protocol-grpc";
import * as connect from "@connectrpc/connect/protocol-connect";
import type { BodyBudget, BodyCharge } from "./body-budget.ts";
import { envelope, ENVELOPE_HEADER_BYTES, singleMessage } from "./envelope.ts";
import { invalidArgument, MALFORMED, REQUEST_BODY_FIELD, unsupportedConnectVersion } from "./errors.ts";
import type { Logger } from "./logger.ts";
import { MAX_TIMER_MS } from "./config.ts";

type UnarySpec = Extract<MethodImplSpec, { kind: "unary" }>;
type Request = http.IncomingMessage | http2.Http2ServerRequest;
type Response = http.ServerResponse | http2.Http2ServerResponse;

/**
 * JSON options for connect's serialization, here and in connect-node (server.ts): unknown fields
 * ignored (connect's default) and a fatal UTF-8 decoder. connect's own decoder is lenient: it
 * reads bytes that are not UTF-8 as U+FFFD, so a request with them would be served, and stored,
 * with other text than the client sent. With this one such a request fails to parse, which is
 * INVALID_ARGUMENT. connect-es's handler options do not declare `textDecoder`, but pass their
 * `jsonOptions` as they are to its JSON serialization, which reads it (the exact connect version
 * is pinned; packages/platform/test/lean-unary.test.ts and server.test.ts would see it go).
 */
export const STRICT_JSON_OPTIONS: { ignoreUnknownFields: boolean; textDecoder: { decode(input?: Uint8Array): string } } = {
  ignoreUnknownFields: true,
  textDecoder: new TextDecoder("utf-8", { fatal: true }),
};

/** connect-node's defaults, so answers are compressed exactly as they were through it. */
const ACCEPT_COMPRESSION: Compression[] = [compressionGzip, compressionBrotli];

export interface LeanUnaryOptions {
  interceptors: Interceptor[];
  readMaxBytes: number;
  /** Per-call values, built as for connect-node (drain signal, client address...). */
  contextValues: (req: Request) => ContextValues;
  logger: Logger;
  /** Request bodies count against it while they are read (body-budget.ts). */
  bodyBudget?: BodyBudget;
  /**
   * Runs on the headers before the body is read, so a caller refused for them (no identity,
   * say) costs no body: throwing answers the call with that error.
   */
  beforeBody?: (service: DescService, header: Headers, values: ContextValues) => void;
}

export interface LeanUnaryPath {
  /**
   * A router that registers on `router` and records the unary methods registered through it.
   * A registration with options (per-service interceptors, say) is left to connect-node alone.
   */
  recording(router: ConnectRouter): ConnectRouter;
  /** Serves the call when it is one this path takes (see the module comment); false otherwise. */
  serve(req: Request, res: Response): boolean;
}

interface Route {
  spec: UnarySpec;
  serialization: MethodSerializationLookup<DescMessage, DescMessage>;
}

interface Limits {
  readMaxBytes: number;
  writeMaxBytes: number;
  compressMinBytes: number;
}

/** A call this path takes. */
interface Call {
  route: Route;
  protocol: WireProtocol;
  /** Binary protobuf, else JSON. */
  binary: boolean;
  /** The request's URL, as connect-node gives it to handlers. */
  url: string;
}

export function leanUnaryPath(options: LeanUnaryOptions): LeanUnaryPath {
  const limits: Limits = validateReadWriteMaxBytes(options.readMaxBytes, undefined, undefined);
  const routes = new Map<string, Route>();
  const pathOf = (method: DescMethod) => `/${method.parent.typeName}/${method.name}`;
  const record = (spec: MethodImplSpec, routeOptions: unknown) => {
    // A later registration replaces an earlier one, as in connect's router.
    if (spec.kind !== "unary" || routeOptions !== undefined) return void routes.delete(pathOf(spec.method));
    const serialization = createMethodSerializationLookup(spec.method, undefined, STRICT_JSON_OPTIONS, limits);
    routes.set(pathOf(spec.method), { spec, serialization });
  };

  return {
    recording(router) {
      const recorder = {
        get handlers() {
          return router.handlers;
        },
        service(service: DescService, impl: Parameters<ConnectRouter["service"]>[1], routeOptions?: unknown) {
          router.service(service, impl, routeOptions as never);
          for (const method of Object.values(createServiceImplSpec(service, impl).methods)) record(method, routeOptions);
          return recorder;
        },
        rpc(method: DescMethod, impl: never, routeOptions?: unknown) {
          router.rpc(method as never, impl, routeOptions as never);
          record({ kind: method.methodKind, method, impl } as MethodImplSpec, routeOptions);
          return recorder;
        },
      } as unknown as ConnectRouter;
      return recorder;
    },

    serve(req, res) {
      if (req.method !== "POST") return false;
      const route = routes.get(req.url ?? "");
      if (route === undefined) return false;
      const contentType = req.headers["content-type"] ?? null;
      const protocol = req.httpVersionMajor === 2 && contentType?.startsWith("application/grpc") ? GRPC : CONNECT;
      const format = protocol.format(contentType);
      // Without an authority connect-node cannot make the URL either; it answers the call.
      const authority = "authority" in req ? req.authority : req.headers.host;
      if (format === undefined || !authority) return false;
      const call = { route, protocol, binary: format.binary, url: `http://${authority}${req.url}` };
      serveCall(call, req, res, options, options.contextValues(req), limits).catch((err: unknown) => {
        // The answer could not be written (a handler's header that HTTP forbids, say): the
        // client's call breaks, the process goes on, as with connect-node.
        options.logger.error({ err, method: `${route.spec.method.parent.typeName}/${route.spec.method.name}` }, "rpc answer could not be written");
        if ("stream" in res) res.stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR);
        else res.destroy();
      });
      return true;
    },
  };
}

/** What differs between gRPC and Connect for a unary call. */
interface WireProtocol {
  name: "grpc" | "connect";
  /** The message format of a request this path takes over this protocol; undefined: not taken. */
  format(contentType: string | null): { binary: boolean } | undefined;
  /** Request header names, in lower case as Node gives them. */
  timeoutHeader: string;
  parseTimeout(value: string | null, maxTimeoutMs: number): { timeoutMs?: number; error?: ConnectError };
  encodingHeader: string;
  acceptEncodingHeader: string;
  /** Bytes a request body holds besides the message. */
  envelopeBytes: number;
  /** Whether the body's size is checked against content-length (Connect's unary body is the message). */
  checksContentLength: boolean;
  responseHeader(binary: boolean): Record<string, string>;
  responseTrailer: Record<string, string> | undefined;
  /** The message bytes of a request body, and whether they are compressed with the request's encoding. */
  requestMessage(body: Buffer, compression: Compression | null): { bytes: Buffer; compressed: boolean };
  /**
   * Writes the answer or the error, compressed with the negotiated `compression` (as
   * connect-node: from `compressMinBytes`) where the protocol compresses it.
   */
  respond(res: Response, context: HandlerContext, outcome: Outcome, compression: Compression | null, compressMinBytes: number): Promise<void>;
}

type Outcome = { message: Uint8Array } | { error: ConnectError };

const GRPC: WireProtocol = {
  name: "grpc",
  format: (contentType) => grpc.parseContentType(contentType),
  timeoutHeader: grpc.headerTimeout.toLowerCase(),
  parseTimeout: grpc.parseTimeout,
  encodingHeader: grpc.headerEncoding.toLowerCase(),
  acceptEncodingHeader: grpc.headerAcceptEncoding.toLowerCase(),
  envelopeBytes: ENVELOPE_HEADER_BYTES,
  checksContentLength: false,
  responseHeader: (binary) => ({ [grpc.headerContentType]: binary ? grpc.contentTypeProto : grpc.contentTypeJson }),
  responseTrailer: { [grpc.headerGrpcStatus]: grpc.grpcStatusOk },

  requestMessage(body, compression) {
    const single = singleMessage(body);
    if ("problem" in single) throw invalidArgument(REQUEST_BODY_FIELD, `protocol error: ${single.problem}`, MALFORMED.FRAME);
    const { flags, message } = single;
    if (flags === 1 && compression === null) {
      throw invalidArgument(REQUEST_BODY_FIELD, "protocol error: a compressed message without grpc-encoding", MALFORMED.COMPRESSION);
    }
    if (flags > 1) throw invalidArgument(REQUEST_BODY_FIELD, `protocol error: unknown message flags ${flags}`, MALFORMED.COMPRESSION);
    return { bytes: message, compressed: flags === 1 };
  },

  async respond(res, context, outcome, compression, compressMinBytes) {
    // connect-node names the negotiated encoding whether or not this answer is compressed.
    if (compression) context.responseHeader.set(grpc.headerEncoding, compression.name);
    let body: Buffer | undefined;
    if ("error" in outcome) grpc.setTrailerStatus(context.responseTrailer, outcome.error);
    else {
      const compress = compression !== null && outcome.message.byteLength >= compressMinBytes;
      body = envelope(compress ? 1 : 0, compress ? await compression.compress(outcome.message) : outcome.message);
    }
    if (isGone(res)) return;
    const out = res as http2.Http2ServerResponse;
    out.writeHead(200, nodeHeaders(context.responseHeader));
    out.addTrailers(nodeHeaders(context.responseTrailer));
    if (body) out.end(body);
    else out.end();
  },
};

const CONNECT: WireProtocol = {
  name: "connect",
  format(contentType) {
    const type = connect.parseContentType(contentType);
    return type === undefined || type.stream ? undefined : type;
  },
  timeoutHeader: connect.headerTimeout.toLowerCase(),
  parseTimeout: connect.parseTimeout,
  encodingHeader: connect.headerUnaryEncoding.toLowerCase(),
  acceptEncodingHeader: connect.headerUnaryAcceptEncoding.toLowerCase(),
  envelopeBytes: 0,
  checksContentLength: true,
  responseHeader: (binary) => ({ [connect.headerContentType]: binary ? connect.contentTypeUnaryProto : connect.contentTypeUnaryJson }),
  responseTrailer: undefined,
  requestMessage: (body, compression) => ({ bytes: body, compressed: compression !== null }),

  async respond(res, context, outcome, compression, compressMinBytes) {
    let status = 200;
    let body: Uint8Array;
    if ("error" in outcome) {
      status = connect.codeToHttpStatus(outcome.error.code);
      context.responseHeader.set(connect.headerContentType, connect.contentTypeUnaryJson);
      if (!outcome.error.isWireError) mergeNonProtocolHeaders(context.responseHeader, outcome.error.metadata);
      body = connect.errorToJsonBytes(outcome.error, {});
    } else body = outcome.message;
    // connect-node compresses error bodies too.
    if (compression !== null && body.byteLength >= compressMinBytes) {
      body = await compression.compress(body);
      context.responseHeader.set(connect.headerUnaryEncoding, compression.name);
    }
    const header = connect.trailerMux(context.responseHeader, context.responseTrailer);
    header.set(connect.headerUnaryContentLength, String(body.byteLength));
    if (isGone(res)) return;
    // Both responses take writeHead(status, headers) and end(body); their types differ only in `this`.
    (res as http.ServerResponse).writeHead(status, nodeHeaders(header));
    res.end(body);
  },
};

async function serveCall(
  call: Call,
  req: Request,
  res: Response,
  options: LeanUnaryOptions,
  values: ContextValues,
  limits: Limits,
): Promise<void> {
  const { interceptors, bodyBudget } = options;
  const { route: { spec, serialization }, protocol, binary } = call;
  // Aborted when the client goes away before its answer (with connect-node's reason for an
  // HTTP/2 reset): the handler's signal follows it.
  const requestAbort = new AbortController();
  const closing = "stream" in res ? res.stream : res;
  const onClose = () => requestAbort.abort("stream" in res ? resetReason(res.stream.rstCode) : undefined);
  closing.once("close", onClose);
  const timeout = protocol.parseTimeout(headerValue(req, protocol.timeoutHeader), Number.MAX_SAFE_INTEGER);
  const context = createHandlerContext({
    ...spec,
    service: spec.method.parent,
    requestMethod: "POST",
    protocolName: protocol.name,
    timeoutMs: timeout.timeoutMs !== undefined && timeout.timeoutMs > MAX_TIMER_MS ? undefined : timeout.timeoutMs,
    requestSignal: requestAbort.signal,
    requestHeader: webHeaders(req.headers),
    url: call.url,
    responseHeader: protocol.responseHeader(binary),
    responseTrailer: protocol.responseTrailer,
    contextValues: values,
  });
  const compression = compressionNegotiate(
    ACCEPT_COMPRESSION,
    headerValue(req, protocol.encodingHeader),
    headerValue(req, protocol.acceptEncodingHeader),
    protocol.acceptEncodingHeader,
  );
  let outcome: Outcome;
  try {
    if (compression.error) throw compression.error;
    if (timeout.error) throw invalidArgument(protocol.timeoutHeader, timeout.error.rawMessage, MALFORMED.TIMEOUT);
    // Connect's protocol version: absent, or 1 (connect-node checks it only when told to).
    const version = headerValue(req, connect.headerProtocolVersion.toLowerCase());
    if (protocol.name === "connect" && version !== null && version !== connect.protocolVersion) throw unsupportedConnectVersion(version);
    try {
      options.beforeBody?.(spec.method.parent, context.requestHeader, values);
    } catch (err) {
      // Refused on its headers: the body is never read, but the refusal still goes through the
      // interceptors (metrics, traces and the call log count it like any other answer), with an
      // empty request that never reaches the method.
      await invokeUnaryImplementation({ ...spec, impl: () => Promise.reject(err) }, context, create(spec.method.input), interceptors);
      throw err;
    }
    const lengthHint = protocol.checksContentLength ? contentLength(req, limits.readMaxBytes) : undefined;
    const body = await readBody(req, limits.readMaxBytes, protocol.envelopeBytes, context.signal, bodyBudget?.charge(req, res));
    if (lengthHint !== undefined && lengthHint !== body.length) {
      throw invalidArgument(REQUEST_BODY_FIELD, `protocol error: promised ${lengthHint} bytes, received ${body.length}`, MALFORMED.FRAME);
    }
    const request = protocol.requestMessage(body, compression.request);
    const bytes = request.compressed ? await decompress(compression.request!, request.bytes, limits.readMaxBytes) : request.bytes;
    const input = parse(serialization, binary, bytes);
    const output = await invokeUnaryImplementation(spec, context, input, interceptors);
    outcome = { message: serialization.getO(binary).serialize(output) };
  } catch (err) {
    outcome = { error: err instanceof ConnectError ? err : new ConnectError("internal error", Code.Internal, undefined, undefined, err) };
  }
  closing.off("close", onClose);
  // Ends the deadline timer and whatever still follows the call's signal, as connect-node does.
  context.abort("error" in outcome ? outcome.error : undefined);
  if (isGone(res)) return;
  await protocol.respond(res, context, outcome, compression.response, limits.compressMinBytes);
  // Answered before the request ended (an oversize message, a bad deadline): the rest is not
  // wanted. Over HTTP/2 the stream closes only when both sides have ended: drop what still
  // comes and, once the trailers are out, reset it (NO_ERROR: the answer is complete) as gRPC
  // servers do. The trailers go out during the send that asks for them (compat's
  // 'wantTrailers' listener, registered first, sends them), so the reset waits a turn.
  // (HTTP/1.1: Node's server discards an unread body itself.)
  if (!req.complete && "stream" in res) {
    req.resume();
    res.stream.once("wantTrailers", () => setImmediate(() => res.stream.close(http2.constants.NGHTTP2_NO_ERROR)));
  }
}

function isGone(res: Response): boolean {
  return "stream" in res ? res.stream.destroyed : res.destroyed;
}

/**
 * The request message decompressed. connect's gzip and brotli call a message cut short or not in
 * their encoding INTERNAL (only some corrupt gzip is INVALID_ARGUMENT); it is the client's error.
 */
async function decompress(compression: Compression, bytes: Uint8Array, readMaxBytes: number): Promise<Uint8Array> {
  try {
    return await compression.decompress(bytes, readMaxBytes);
  } catch (err) {
    const error = ConnectError.from(err);
    if (error.code === Code.ResourceExhausted) throw error;
    const cause = error.cause instanceof Error ? `: ${error.cause.message}` : "";
    throw invalidArgument(REQUEST_BODY_FIELD, `request message could not be decompressed (${compression.name}${cause})`, MALFORMED.COMPRESSION);
  }
}

/** The request message; one that cannot be read is the client's error, not the server's. */
function parse(serialization: MethodSerializationLookup<DescMessage, DescMessage>, binary: boolean, bytes: Uint8Array) {
  try {
    return serialization.getI(binary).parse(bytes);
  } catch (err) {
    const error = ConnectError.from(err);
    if (error.code === Code.ResourceExhausted) throw error;
    throw invalidArgument(REQUEST_BODY_FIELD, `request message could not be decoded: ${error.rawMessage}`, MALFORMED.MESSAGE);
  }
}

/** A Connect request's content-length, refused at once when it is over the limit (as connect-node). */
function contentLength(req: Request, readMaxBytes: number): number | undefined {
  const value = req.headers["content-length"];
  if (value === undefined) return undefined;
  const length = Number.parseInt(value, 10);
  if (!Number.isSafeInteger(length) || length < 0) throw invalidArgument("content-length", `protocol error: invalid content-length ${value}`, MALFORMED.FRAME);
  if (length > readMaxBytes) throw new ConnectError(`message size ${length} is larger than configured readMaxBytes ${readMaxBytes}`, Code.ResourceExhausted);
  return length;
}

/**
 * The request body, read whole. A body of more than `readMaxBytes` (plus the envelope) is
 * refused as it arrives; over gRPC, as soon as the envelope's header promises more. Reading
 * stops when the call's deadline passes or its client goes away (`signal`), or the budget's
 * hold limit passes first. The body holds its `charge` of the body budget until then.
 */
function readBody(req: Request, readMaxBytes: number, envelopeBytes: number, signal: AbortSignal, charge: BodyCharge | undefined): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    /** The message length the envelope header promises, once its bytes are in. */
    let promised: number | undefined;
    const fail = (error: ConnectError) => {
      cleanup();
      reject(error);
    };
    const onData = (chunk: Buffer) => {
      chunks.push(chunk);
      size += chunk.length;
      if (envelopeBytes > 0 && promised === undefined && size >= envelopeBytes) promised = envelopeLength(chunks);
      if ((promised ?? 0) > readMaxBytes || size > readMaxBytes + envelopeBytes) {
        const messageSize = Math.max(promised ?? 0, size - envelopeBytes);
        return fail(new ConnectError(`message size ${messageSize} is larger than configured readMaxBytes ${readMaxBytes}`, Code.ResourceExhausted));
      }
      try {
        charge?.add(chunk);
      } catch (err) {
        fail(err as ConnectError);
      }
    };
    const onEnd = () => {
      cleanup();
      resolve(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, size));
    };
    const onError = (err: Error) => fail(ConnectError.from(err, Code.Canceled));
    const onAbort = () => fail(ConnectError.from(signal.reason, Code.Canceled));
    const cleanup = () => {
      charge?.release();
      req.off("data", onData);
      req.off("end", onEnd);
      req.off("error", onError);
      signal.removeEventListener("abort", onAbort);
    };
    if (signal.aborted) return onAbort();
    req.on("data", onData);
    req.once("end", onEnd);
    req.once("error", onError);
    signal.addEventListener("abort", onAbort, { once: true });
    charge?.onOverdue(fail);
  });
}

/** The message length a gRPC envelope header promises (the header may span chunks). */
function envelopeLength(chunks: Buffer[]): number {
  const first = chunks[0]!;
  const head = first.length >= ENVELOPE_HEADER_BYTES ? first : Buffer.concat(chunks);
  return head.readUInt32BE(1);
}

/** What the handler's signal says when the client reset its HTTP/2 stream (connect-node's mapping). */
function resetReason(rstCode: number): ConnectError | undefined {
  const known = RESET_CODES.get(rstCode);
  if (known === undefined) return undefined;
  const [name, code] = known;
  return new ConnectError(`http/2 stream closed with error code ${name} (0x${rstCode.toString(16)})`, code);
}

const RESET_CODES = new Map<number, [string, Code]>([
  [0x1, ["PROTOCOL_ERROR", Code.Internal]],
  [0x2, ["INTERNAL_ERROR", Code.Internal]],
  [0x3, ["FLOW_CONTROL_ERROR", Code.Internal]],
  [0x4, ["SETTINGS_TIMEOUT", Code.Internal]],
  [0x6, ["FRAME_SIZE_ERROR", Code.Internal]],
  [0x7, ["REFUSED_STREAM", Code.Unavailable]],
  [0x8, ["CANCEL", Code.Canceled]],
  [0x9, ["COMPRESSION_ERROR", Code.Internal]],
  [0xa, ["CONNECT_ERROR", Code.Internal]],
  [0xb, ["ENHANCE_YOUR_CALM", Code.ResourceExhausted]],
  [0xc, ["INADEQUATE_SECURITY", Code.PermissionDenied]],
  [0xd, ["HTTP_1_1_REQUIRED", Code.PermissionDenied]],
]);

function headerValue(req: Request, name: string): string | null {
  const value = req.headers[name];
  return typeof value === "string" ? value : null;
}

/** Node's request headers as web Headers, HTTP/2 pseudo-headers left out. */
function webHeaders(incoming: http.IncomingHttpHeaders): Headers {
  const headers = new Headers();
  for (const name of Object.keys(incoming)) {
    if (name.charCodeAt(0) === 0x3a /* ":" */) continue;
    const value = incoming[name];
    if (typeof value === "string") headers.append(name, value);
    else if (value !== undefined) for (const v of value) headers.append(name, v);
  }
  return headers;
}

/**
 * Headers that belong to one connection: HTTP/2 refuses them (Node throws, which in a trailer
 * would take the process down), and over HTTP/1.1 the server sets its own.
 */
const CONNECTION_HEADERS = new Set(["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "http2-settings", "te"]);

/**
 * Web Headers for Node's writeHead/addTrailers: several set-cookie values stay several, and
 * connection headers a handler or an error's metadata carried are left out.
 */
function nodeHeaders(headers: Headers): Record<string, string | string[]> {
  const out: Record<string, string | string[]> = {};
  headers.forEach((value, name) => {
    if (!CONNECTION_HEADERS.has(name)) out[name] = value;
  });
  const cookies = headers.getSetCookie();
  if (cookies.length > 1) out["set-cookie"] = cookies;
  return out;
}
