/**
 * Connect server streams on the raw path (raw-unary.ts): a POST whose body is one enveloped
 * request message (`application/connect+json` or `+proto`), over HTTP/1.1 or HTTP/2. The answer
 * is HTTP 200 and enveloped messages, then an end-of-stream message (flag 2, JSON) carrying the
 * error, if any, and the trailers. Messages pass through as bytes; only the end-of-stream
 * message is read, to mask an INTERNAL/UNKNOWN error as everywhere else. Compressed requests
 * take the Connect path, and the upstream is not offered compression (no
 * connect-accept-encoding), so every envelope it sends can be read here.
 *
 * endStreamFromJson/endStreamToJson are connect-es's own reading and writing of that message
 * (marked internal there; the version is pinned in the lockfile).
 */
import type http from "node:http";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  codeFromHttpStatus,
  contentTypeStreamRegExp,
  endStreamFromJson,
  endStreamToJson,
  parseContentType,
} from "@connectrpc/connect/protocol-connect";
import { envelope, invalidArgument, MALFORMED, REQUEST_BODY_FIELD, singleMessage } from "@outpost/platform";
import { EnvelopeScanner } from "./envelopes.ts";
import { acceptsConnect, connectDeadline, decodeConnectMessage } from "./raw-connect.ts";
import { breakAnswer, copyHeaders, isGone, onceComplete, passChunk, type ClientRequest, type ForwardedMethod, type UnaryWireProtocol } from "./raw-unary.ts";

/** Request headers passed on as they are; everything else the gateway sets itself. */
const PASSED_HEADERS = ["content-type", "connect-protocol-version", "user-agent"];
/**
 * Response headers passed back. They go out before the stream's status is known, so an upstream
 * that ends with an INTERNAL error cannot have leaked anything through them.
 */
const ANSWER_HEADERS = ["content-type", "connect-content-encoding"];
/** Connect's end-of-stream flag. */
const END_STREAM = 0x02;
/** An end-of-stream message is small; a bigger one is not one of ours. */
const MAX_END_STREAM_BYTES = 1024 * 1024;
const jsonEncoder = new TextEncoder();

export function connectServerStream(): UnaryWireProtocol {
  return {
    envelopeBytes: 5,
    methodKinds: new Set(["server_streaming"]),

    accepts: (req) => acceptsConnect(req, contentTypeStreamRegExp, "connect-content-encoding"),

    validate(method: ForwardedMethod, body: Buffer, clientHeader: Headers) {
      const single = singleMessage(body);
      if ("problem" in single) throw invalidArgument(REQUEST_BODY_FIELD, `protocol error: ${single.problem}`, MALFORMED.FRAME);
      if (single.flags !== 0) throw invalidArgument(REQUEST_BODY_FIELD, `protocol error: request message with flags ${single.flags} (compressed without connect-content-encoding, or an end of stream)`, MALFORMED.COMPRESSION);
      decodeConnectMessage(method, single.message, !parseContentType(clientHeader.get("content-type"))?.binary);
    },

    upstreamHeaders(clientHeader) {
      return copyHeaders(clientHeader, PASSED_HEADERS);
    },

    ...connectDeadline,

    relayAnswer({ request, stream: upstream, headers: upstreamHeaders, ended }, res, budget, mask, done) {
      const status = Number(upstreamHeaders[":status"] ?? 200);
      const response: Record<string, string | string[]> = {};
      for (const name of ANSWER_HEADERS) {
        const value = upstreamHeaders[name];
        if (value !== undefined) response[name] = value;
      }
      for (const [name, value] of budget) response[name] = value;
      const out = res as http.ServerResponse;
      const scanner = new EnvelopeScanner({ endStreamFlag: true });
      const endChunks: Buffer[] = [];
      let endSize = 0;
      const finish = () => {
        // The upstream's body stopped inside a message: a broken answer, not a complete one.
        if (scanner.midMessage) {
          breakAnswer(res);
          return done(Code.Internal);
        }
        const end = status === 200 ? endStreamOf(Buffer.concat(endChunks), endSize) : { error: new ConnectError(`HTTP ${status} from the service`, codeFromHttpStatus(status)), metadata: new Headers() };
        let code: Code | 0 = end.error ? end.error.code : 0;
        let message: Buffer;
        if (code === Code.Internal || code === Code.Unknown) {
          // Nothing of the upstream's end goes out, its trailers included: only the trace id.
          code = Code.Internal;
          message = endStreamMessage(new ConnectError(mask(end.error!.code, end.error!.rawMessage), Code.Internal), new Headers());
        } else if (status === 200) {
          message = Buffer.concat(endChunks); // the upstream's own end, unchanged
        } else {
          message = endStreamMessage(end.error, new Headers());
        }
        if (!out.headersSent) out.writeHead(200, status === 200 ? response : streamHeaders(request, budget));
        out.end(message);
        done(code);
      };
      if (status !== 200) {
        // Not a stream at all (the service refused the request at the HTTP level): say so in the
        // stream's own terms once the body is read.
        upstream.resume();
        if (ended) finish();
        else onceComplete(upstream, finish);
        return;
      }
      out.writeHead(200, response);
      if (ended) return finish();
      upstream.on("data", (chunk: Buffer) => {
        const scanned = scanner.scan(chunk);
        if (scanned.pass.length > 0) passChunk(upstream, res, scanned.pass);
        if (scanned.endStream) {
          endSize += scanned.endStream.length;
          if (endSize <= MAX_END_STREAM_BYTES) endChunks.push(scanned.endStream);
        }
      });
      onceComplete(upstream, finish);
      return scanner;
    },

    respondError(req, res, error, budget) {
      if (isGone(res)) return;
      const headers = streamHeaders(req, budget);
      // An HTTP/1.1 request refused before its body was read: the rest of it would be read as
      // the connection's next request.
      if (req.httpVersionMajor === 1 && !(req as http.IncomingMessage).complete) headers["connection"] = "close";
      // The error's own metadata (e.g. Retry-After) travels as the stream's trailers: the end
      // message copies it in itself (endStreamToJson); given here too, each value was sent twice.
      const out = res as http.ServerResponse;
      out.writeHead(200, headers);
      out.end(endStreamMessage(error, new Headers()));
    },

    endStream(req, res, budget, error) {
      const out = res as http.ServerResponse;
      if (!out.headersSent) out.writeHead(200, streamHeaders(req, budget));
      out.end(endStreamMessage(error, new Headers()));
    },
  };
}

/**
 * Headers of a stream the gateway answers itself. The content type is the request's codec (the
 * client checks it), though the end message is JSON whatever the codec.
 */
function streamHeaders(req: ClientRequest, budget: [string, string][]): Record<string, string> {
  return { "content-type": req.headers["content-type"] ?? "application/connect+json", ...Object.fromEntries(budget) };
}

function endStreamMessage(error: ConnectError | undefined, metadata: Headers): Buffer {
  return envelope(END_STREAM, jsonEncoder.encode(JSON.stringify(endStreamToJson(metadata, error, undefined))));
}

/** The upstream's end of stream; a missing, oversized or malformed one is an internal error. */
function endStreamOf(bytes: Buffer, size: number): { error?: ConnectError; metadata: Headers } {
  if (size === 0) return { error: new ConnectError("the stream ended without its end message", Code.Internal), metadata: new Headers() };
  if (size > MAX_END_STREAM_BYTES) return { error: new ConnectError(`end message of ${size} bytes`, Code.Internal), metadata: new Headers() };
  const single = singleMessage(bytes);
  if ("problem" in single || (single.flags & 0x01) !== 0) return { error: new ConnectError("malformed end message", Code.Internal), metadata: new Headers() };
  try {
    return endStreamFromJson(single.message);
  } catch (err) {
    return { error: ConnectError.from(err, Code.Internal), metadata: new Headers() };
  }
}
