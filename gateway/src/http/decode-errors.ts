/**
 * Two fix-ups of the Connect path's answers to requests it could not read.
 *
 * connect-es reports a request message that cannot be decoded (truncated or garbage protobuf,
 * invalid UTF-8 in a string field), or decompressed (gzip cut short, garbage brotli), and a
 * compressed frame without a known encoding as INTERNAL
 * — its serializer cannot tell a bad request from a bad response — and it does so before any
 * interceptor runs. At the edge those are the client's mistakes, so this rewrites exactly those
 * answers to INVALID_ARGUMENT (UNIMPLEMENTED for the unknown compression) on the way out: gRPC
 * status in headers or trailers, the gRPC-Web trailer frame, and Connect unary error bodies.
 *
 * And connect-es's own INVALID_ARGUMENTs (a malformed grpc-timeout or connect-timeout-ms, broken
 * framing, a JSON message that does not parse), raised before any interceptor runs, carry no
 * ErrorInfo: every INVALID_ARGUMENT without details gets one here, naming the header or
 * `(request body)` and the reason (`explainMalformed`, docs/edge.md "Malformed requests").
 * Every other answer passes through untouched.
 */
import type http from "node:http";
import type http2 from "node:http2";
import { Code, ConnectError } from "@connectrpc/connect";
import { errorToJsonBytes } from "@connectrpc/connect/protocol-connect";
import { setTrailerStatus } from "@connectrpc/connect/protocol-grpc";
import { explainMalformed } from "@outpost/platform";

type Response = http.ServerResponse | http2.Http2ServerResponse;
type Headers = Record<string, string | string[] | number | undefined>;

const DECODE_FAILURE = /^(parse binary: |decompression failed|received compressed envelope, but do not know how to decompress)/;

/**
 * The error a client should get instead of this answer's (`code` and `message`, details or
 * none), or undefined when it stands: a decode failure called INTERNAL, or an INVALID_ARGUMENT
 * without details, becomes INVALID_ARGUMENT with ErrorInfo.
 */
function fixed(code: Code, message: string, hasDetails: boolean): ConnectError | undefined {
  if (code === Code.Internal && DECODE_FAILURE.test(message)) {
    return explainMalformed(new ConnectError(`request message could not be decoded: ${message}`, Code.InvalidArgument));
  }
  if (code === Code.InvalidArgument && !hasDetails) return explainMalformed(new ConnectError(message, Code.InvalidArgument));
  return undefined;
}

/** Rewrites the status in `headers` where it needs it; true when it did. */
function rewriteGrpcStatus(headers: Headers | undefined): boolean {
  const status = headers?.["grpc-status"];
  if (!headers || (String(status) !== "13" && String(status) !== "3")) return false;
  const raw = headers["grpc-message"];
  const message = typeof raw === "string" ? percentDecoded(raw) : "";
  const error = fixed(Number(status) as Code, message, headers["grpc-status-details-bin"] !== undefined);
  if (!error) return false;
  const trailer = new Headers();
  setTrailerStatus(trailer, error);
  for (const [name, value] of trailer) headers[name] = value;
  return true;
}

function percentDecoded(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}

/** gRPC-Web carries the status in a trailer frame (flag 0x80) in the body; rewrite it there. */
function rewriteGrpcWebTrailer(chunk: Buffer): Buffer {
  if (chunk.length < 5 || chunk[0] !== 0x80 || chunk.readUInt32BE(1) !== chunk.length - 5) return chunk;
  const lines = chunk.subarray(5).toString("latin1").split("\r\n").filter(Boolean);
  const headers: Headers = {};
  for (const line of lines) {
    const at = line.indexOf(":");
    if (at > 0) headers[line.slice(0, at).trim().toLowerCase()] = line.slice(at + 1).trim();
  }
  if (!rewriteGrpcStatus(headers)) return chunk;
  const text = Buffer.from(Object.entries(headers).map(([k, v]) => `${k}: ${String(v)}\r\n`).join(""), "latin1");
  const frame = Buffer.alloc(5 + text.length);
  frame[0] = 0x80;
  frame.writeUInt32BE(text.length, 1);
  frame.set(text, 5);
  return frame;
}

export function reclassifyDecodeErrors(req: http.IncomingMessage | http2.Http2ServerRequest, res: Response): void {
  const contentType = String(req.headers["content-type"] ?? "");
  const r = res as http.ServerResponse & { addTrailers(headers: Headers): void };
  if (contentType.startsWith("application/grpc-web")) {
    const write = r.write;
    const end = r.end;
    const fix = (chunk: unknown) => (chunk instanceof Uint8Array ? rewriteGrpcWebTrailer(Buffer.from(chunk)) : chunk);
    r.write = function (this: http.ServerResponse, chunk: unknown, ...rest: unknown[]) {
      return (write as (...a: unknown[]) => boolean).call(this, fix(chunk), ...rest);
    } as typeof r.write;
    r.end = function (this: http.ServerResponse, ...args: unknown[]) {
      if (args.length > 0 && typeof args[0] !== "function") args[0] = fix(args[0]);
      return (end as (...a: unknown[]) => http.ServerResponse).apply(this, args);
    } as typeof r.end;
    return;
  }
  if (contentType.startsWith("application/grpc")) {
    const writeHead = r.writeHead;
    r.writeHead = function (this: http.ServerResponse, status: number, ...rest: unknown[]) {
      rewriteGrpcStatus(rest.find((a) => typeof a === "object" && a !== null) as Headers | undefined);
      return (writeHead as (...a: unknown[]) => http.ServerResponse).call(this, status, ...rest);
    } as typeof r.writeHead;
    const addTrailers = r.addTrailers;
    r.addTrailers = function (this: Response, headers: Headers) {
      rewriteGrpcStatus(headers);
      return addTrailers.call(this, headers);
    };
    return;
  }
  // Connect unary: the error is a small JSON body sent with HTTP 500. Hold a 500 back until its
  // body is known, then send it as it was or reclassified.
  if (!contentType.startsWith("application/proto") && !contentType.startsWith("application/json") && req.method !== "GET") return;
  const writeHead = r.writeHead;
  const write = r.write;
  const end = r.end;
  let held: { status: number; headers: Headers } | undefined;
  const body: Buffer[] = [];
  r.writeHead = function (this: http.ServerResponse, status: number, ...rest: unknown[]) {
    const headers = rest.find((a) => typeof a === "object" && a !== null) as Headers | undefined;
    if (status !== 500 && status !== 400) return (writeHead as (...a: unknown[]) => http.ServerResponse).call(this, status, ...rest);
    held = { status, headers: { ...headers } };
    return this;
  } as typeof r.writeHead;
  r.write = function (this: http.ServerResponse, chunk: unknown, ...rest: unknown[]) {
    if (!held) return (write as (...a: unknown[]) => boolean).call(this, chunk, ...rest);
    body.push(Buffer.from(chunk as Uint8Array));
    const callback = rest.find((a) => typeof a === "function") as (() => void) | undefined;
    callback?.();
    return true;
  } as typeof r.write;
  r.end = function (this: http.ServerResponse, ...args: unknown[]) {
    if (!held) return (end as (...a: unknown[]) => http.ServerResponse).apply(this, args);
    if (args[0] !== undefined && typeof args[0] !== "function") body.push(Buffer.from(args[0] as Uint8Array));
    let payload = Buffer.concat(body);
    let status = held.status;
    try {
      const parsed = JSON.parse(payload.toString("utf8")) as { code?: string; message?: string; details?: unknown[] };
      const code = parsed.code === "internal" ? Code.Internal : parsed.code === "invalid_argument" ? Code.InvalidArgument : undefined;
      const error = code === undefined ? undefined : fixed(code, parsed.message ?? "", (parsed.details ?? []).length > 0);
      if (error) {
        status = 400;
        payload = Buffer.from(errorToJsonBytes(error, {}));
      }
    } catch {
      // not a Connect error body: send it as it was
    }
    const headers = held.headers;
    for (const name of Object.keys(headers)) if (name.toLowerCase() === "content-length") delete headers[name];
    headers["content-length"] = payload.length;
    held = undefined;
    (writeHead as (...a: unknown[]) => http.ServerResponse).call(this, status, headers);
    return (end as (...a: unknown[]) => http.ServerResponse).call(this, payload);
  } as typeof r.end;
}
