/**
 * Unary Connect on the raw path (raw-unary.ts): a POST with a JSON or binary message as the
 * whole body, over HTTP/1.1 or HTTP/2. The answer is the HTTP status and the message, or an
 * error as JSON (`{"code": "...", "message": "...", "details": [...]}`) with the status that
 * goes with its code. Compressed requests and Connect GET take the Connect path instead.
 */
import type http from "node:http";
import zlib from "node:zlib";
import { fromBinary, fromJsonString } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  codeFromHttpStatus,
  codeToHttpStatus,
  contentTypeUnaryRegExp,
  errorFromJsonBytes,
  errorToJsonBytes,
  parseTimeout,
} from "@connectrpc/connect/protocol-connect";
import { invalidArgument, MALFORMED, REQUEST_BODY_FIELD } from "@outpost/platform";
import { copyHeaders, errorHeaders, HOP_HEADERS, isGone, onceComplete, passChunk, type ClientRequest, type ForwardedMethod, type UnaryWireProtocol } from "./raw-unary.ts";

/** Request headers passed on as they are; everything else the gateway sets itself. */
const PASSED_HEADERS = ["content-type", "connect-protocol-version", "accept-encoding", "user-agent"];
/** An error answer is read whole to learn its code; a bigger one is not an error body of ours. */
const MAX_ERROR_BODY_BYTES = 1024 * 1024;
/**
 * Fatal: JSON that is not UTF-8 is refused (INVALID_ARGUMENT), not read with U+FFFD in place of
 * its bad bytes. A leading byte-order mark is dropped, as before.
 */
const jsonDecoder = new TextDecoder("utf-8", { fatal: true });

/**
 * A Connect call the raw path can take: the content type of its kind, no compression (left to
 * the Connect path) and protocol version 1 or none. Another version is refused by connect-node
 * on the Connect path, precisely.
 */
export function acceptsConnect(req: ClientRequest, contentType: RegExp, encodingHeader: "content-encoding" | "connect-content-encoding"): boolean {
  const type = req.headers["content-type"];
  if (typeof type !== "string" || !contentType.test(type)) return false;
  const encoding = req.headers[encodingHeader];
  if (encoding !== undefined && encoding !== "identity") return false;
  const version = req.headers["connect-protocol-version"];
  return version === undefined || version === "1";
}

export function connectUnary(): UnaryWireProtocol {
  return {
    envelopeBytes: 0,
    methodKinds: new Set(["unary"]),

    accepts: (req) => acceptsConnect(req, contentTypeUnaryRegExp, "content-encoding"),

    validate(method: ForwardedMethod, body: Buffer, clientHeader: Headers) {
      // The same reading connect-node gives it: unknown JSON fields are ignored.
      decodeConnectMessage(method, body, isJson(clientHeader.get("content-type") ?? ""));
    },

    upstreamHeaders(clientHeader) {
      return copyHeaders(clientHeader, PASSED_HEADERS);
    },

    ...connectDeadline,

    relayAnswer({ stream: upstream, headers: upstreamHeaders, ended }, res, budget, mask, done) {
      const status = Number(upstreamHeaders[":status"] ?? 200);
      const response: Record<string, string | string[]> = {};
      for (const [name, value] of Object.entries(upstreamHeaders)) {
        if (!HOP_HEADERS.has(name) && value !== undefined) response[name] = value as string | string[];
      }
      for (const [name, value] of budget) response[name] = value;
      const out = res as http.ServerResponse;
      if (status === 200) {
        out.writeHead(200, response);
        if (ended) {
          out.end();
          return done(0);
        }
        upstream.on("data", (chunk: Buffer) => passChunk(upstream, res, chunk));
        onceComplete(upstream, () => {
          out.end();
          done(0);
        });
        return;
      }
      // An error: its code is in the body, which is read whole (it is small) to mask it if need be.
      const chunks: Buffer[] = [];
      let size = 0;
      const finish = () => {
        let body = Buffer.concat(chunks);
        const error = size > MAX_ERROR_BODY_BYTES ? new ConnectError(`error body of ${size} bytes`, Code.Internal) : errorOf(status, response["content-encoding"], body);
        let answerStatus = status;
        let answerHeaders = response;
        if (error.code === Code.Internal || error.code === Code.Unknown) {
          // Nothing of the upstream's answer goes out, its headers included: only the budget.
          body = Buffer.from(errorToJsonBytes(new ConnectError(mask(error.code, error.rawMessage), Code.Internal), {}));
          answerStatus = codeToHttpStatus(Code.Internal);
          answerHeaders = { ...Object.fromEntries(budget), "content-type": "application/json", "content-length": String(body.length) };
        }
        out.writeHead(answerStatus, answerHeaders);
        out.end(body);
        done(error.code === Code.Unknown ? Code.Internal : error.code);
      };
      if (ended) return finish();
      upstream.on("data", (chunk: Buffer) => {
        size += chunk.length;
        if (size <= MAX_ERROR_BODY_BYTES) chunks.push(chunk);
      });
      onceComplete(upstream, finish);
    },

    respondError(req, res, error, budget) {
      if (isGone(res)) return;
      const headers: Record<string, string> = { ...errorHeaders(error, budget), "content-type": "application/json" };
      // An HTTP/1.1 request refused before its body was read: the rest of it would be read as
      // the connection's next request.
      if (req.httpVersionMajor === 1 && !(req as http.IncomingMessage).complete) headers["connection"] = "close";
      const body = errorToJsonBytes(error, {});
      headers["content-length"] = String(body.byteLength);
      (res as http.ServerResponse).writeHead(codeToHttpStatus(error.code), headers);
      (res as http.ServerResponse).end(body);
    },
  };
}

/**
 * Throws INVALID_ARGUMENT unless `message` decodes as the method's input, read as the platform
 * server reads it (`STRICT_JSON_OPTIONS` in packages/platform/src/lean-unary.ts): JSON that must
 * be UTF-8, with unknown fields ignored, or binary. Unary calls and streams alike.
 */
export function decodeConnectMessage(method: ForwardedMethod, message: Uint8Array, json: boolean): void {
  try {
    if (json) fromJsonString(method.input, jsonDecoder.decode(message), { ignoreUnknownFields: true });
    else fromBinary(method.input, message);
  } catch (err) {
    throw invalidArgument(REQUEST_BODY_FIELD, `request message could not be decoded: ${err instanceof Error ? err.message : String(err)}`, MALFORMED.MESSAGE);
  }
}

/** Connect's deadline header, the same for unary calls and streams. */
export const connectDeadline: Pick<UnaryWireProtocol, "timeoutOf" | "setTimeout"> = {
  timeoutOf(clientHeader) {
    const timeout = parseTimeout(clientHeader.get("connect-timeout-ms"), Number.MAX_SAFE_INTEGER);
    return timeout.error ? { error: invalidArgument("connect-timeout-ms", timeout.error.rawMessage, MALFORMED.TIMEOUT) } : timeout;
  },
  setTimeout(upstreamHeader, timeoutMs) {
    upstreamHeader.set("connect-timeout-ms", String(timeoutMs));
  },
};

function isJson(contentType: string): boolean {
  return !contentType.toLowerCase().endsWith("/proto");
}

/** The error an upstream answered with; a body that is not a Connect error is judged by its HTTP status. */
function errorOf(status: number, encoding: string | string[] | undefined, body: Buffer): ConnectError {
  const fallback = new ConnectError(`HTTP ${status} without a Connect error body`, codeFromHttpStatus(status));
  try {
    const plain = encoding === "gzip" ? zlib.gunzipSync(body) : encoding === "br" ? zlib.brotliDecompressSync(body) : body;
    return errorFromJsonBytes(plain, undefined, fallback);
  } catch {
    return fallback;
  }
}
