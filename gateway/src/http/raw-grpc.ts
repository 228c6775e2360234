/**
 * gRPC on the raw path (raw-unary.ts): binary protobuf over HTTP/2, one uncompressed
 * length-prefixed request message, the answer's messages (one, or a server stream's) passed
 * through, the status in trailers (or in the headers of a trailers-only answer).
 */
import http2 from "node:http2";
import { fromBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { parseTimeout, setTrailerStatus } from "@connectrpc/connect/protocol-grpc";
import { invalidArgument, MALFORMED, REQUEST_BODY_FIELD, singleMessage } from "@outpost/platform";
import { EnvelopeScanner } from "./envelopes.ts";
import {
  breakAnswer,
  copyHeaders,
  errorHeaders,
  HOP_HEADERS,
  isGone,
  onceComplete,
  passChunk,
  type ClientRequest,
  type ClientResponse,
  type ForwardedMethod,
  type UnaryWireProtocol,
} from "./raw-unary.ts";

const GRPC_CONTENT_TYPES = new Set(["application/grpc", "application/grpc+proto"]);
/** Request headers passed on as they are; everything else the gateway sets itself. */
const PASSED_HEADERS = ["grpc-accept-encoding", "user-agent"];
const STATUS_HEADERS = new Set(["grpc-status", "grpc-message", "grpc-status-details-bin"]);

export function grpcUnary(): UnaryWireProtocol {
  return {
    envelopeBytes: 5,
    methodKinds: new Set(["unary", "server_streaming"]),

    accepts(req) {
      if (req.httpVersionMajor !== 2) return false;
      const contentType = req.headers["content-type"];
      if (typeof contentType !== "string" || !GRPC_CONTENT_TYPES.has(contentType)) return false;
      const encoding = req.headers["grpc-encoding"];
      return encoding === undefined || encoding === "identity";
    },

    validate(method: ForwardedMethod, body: Buffer) {
      const single = singleMessage(body);
      if ("problem" in single) throw invalidArgument(REQUEST_BODY_FIELD, `protocol error: ${single.problem}`, MALFORMED.FRAME);
      if (single.flags !== 0) throw invalidArgument(REQUEST_BODY_FIELD, `protocol error: message flags ${single.flags} without grpc-encoding`, MALFORMED.COMPRESSION);
      try {
        fromBinary(method.input, single.message);
      } catch (err) {
        throw invalidArgument(REQUEST_BODY_FIELD, `request message could not be decoded: ${err instanceof Error ? err.message : String(err)}`, MALFORMED.MESSAGE);
      }
    },

    upstreamHeaders(clientHeader) {
      return copyHeaders(clientHeader, PASSED_HEADERS, new Headers({ "content-type": "application/grpc", te: "trailers" }));
    },

    timeoutOf(clientHeader) {
      const timeout = parseTimeout(clientHeader.get("grpc-timeout"), Number.MAX_SAFE_INTEGER);
      return timeout.error ? { error: invalidArgument("grpc-timeout", timeout.error.rawMessage, MALFORMED.TIMEOUT) } : timeout;
    },

    setTimeout(upstreamHeader, timeoutMs) {
      upstreamHeader.set("grpc-timeout", grpcTimeout(timeoutMs));
    },

    relayAnswer({ stream: upstream, headers: upstreamHeaders, ended }, res, budget, mask, done) {
      const status = Number(upstreamHeaders[":status"] ?? 200);
      const response: Record<string, string | string[]> = {};
      const statusTrailers: Record<string, string> = {};
      for (const [name, value] of Object.entries(upstreamHeaders)) {
        if (HOP_HEADERS.has(name) || value === undefined) continue;
        // A trailers-only answer carries its status in the headers: relay it as trailers.
        if (STATUS_HEADERS.has(name) && typeof value === "string") statusTrailers[name] = value;
        else response[name] = value as string | string[];
      }
      for (const [name, value] of budget) response[name] = value;
      const out = res as http2.Http2ServerResponse;
      // A trailers-only INTERNAL/UNKNOWN carries its metadata in these headers: none goes out.
      const early = Number(statusTrailers["grpc-status"]);
      const masked = early === Code.Internal || early === Code.Unknown;
      out.writeHead(status, masked ? { "content-type": "application/grpc", ...Object.fromEntries(budget) } : response);
      let trailers: http2.IncomingHttpHeaders = {};
      upstream.once("trailers", (t) => (trailers = t));
      const scanner = new EnvelopeScanner({ endStreamFlag: false });
      const finish = () => {
        // The upstream's body stopped inside a message: a broken answer, not a complete one.
        if (scanner.midMessage) {
          breakAnswer(res);
          return done(Code.Internal);
        }
        const sent: Record<string, string> = { ...statusTrailers };
        for (const [name, value] of Object.entries(trailers)) if (typeof value === "string") sent[name] = value;
        const code = Number(sent["grpc-status"] ?? Code.Unknown) as Code | 0;
        out.addTrailers(code === Code.Internal || code === Code.Unknown ? maskedTrailers(sent, code, mask) : sent);
        out.end();
        done(code === Code.Unknown ? Code.Internal : code);
      };
      if (ended) return finish();
      // Messages pass through as they come; the scanner knows whether the gateway may end the
      // stream with a status here (drain, deadline) and whether the upstream's answer was whole.
      upstream.on("data", (chunk: Buffer) => passChunk(upstream, res, scanner.scan(chunk).pass));
      onceComplete(upstream, finish);
      return scanner;
    },

    respondError(_req: ClientRequest, res: ClientResponse, error: ConnectError, budget) {
      if (isGone(res)) return;
      const out = res as http2.Http2ServerResponse;
      // The budget goes in the headers; the error's metadata in the trailers, beside the status.
      const status = new Headers();
      setTrailerStatus(status, error);
      const trailers = { ...errorHeaders(error, []), ...Object.fromEntries(status) };
      out.writeHead(200, { "content-type": "application/grpc", ...Object.fromEntries(budget) });
      out.addTrailers(trailers);
      out.end();
    },

    endStream(_req, res, budget, error) {
      const out = res as http2.Http2ServerResponse;
      if (!out.headersSent) out.writeHead(200, { "content-type": "application/grpc", ...Object.fromEntries(budget) });
      const status = new Headers();
      if (error) setTrailerStatus(status, error);
      out.addTrailers(error ? Object.fromEntries(status) : { "grpc-status": "0" });
      out.end();
    },
  };
}


/** An upstream INTERNAL/UNKNOWN: the client gets INTERNAL with the trace id, no details and no other trailers. */
function maskedTrailers(trailers: Record<string, string>, code: Code, mask: (code: Code, cause: string) => string): Record<string, string> {
  const message = mask(code, percentDecoded(trailers["grpc-message"] ?? ""));
  return { "grpc-status": String(Code.Internal), "grpc-message": encodeURIComponent(message) };
}

/** A gRPC timeout header: at most 8 digits, so long deadlines are written in coarser units. */
function grpcTimeout(ms: number): string {
  if (ms <= 99_999_999) return `${ms}m`;
  if (ms <= 99_999_999_000) return `${Math.ceil(ms / 1000)}S`;
  return `${Math.min(99_999_999, Math.ceil(ms / 3_600_000))}H`;
}

/** grpc-message is percent-encoded; a malformed one is shown as sent. */
function percentDecoded(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}
