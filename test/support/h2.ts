/**
 * One raw HTTP/2 exchange for tests that speak the wire directly (malformed framing, bodies that
 * never end): what the server answered, headers and trailers apart, once it closed the stream;
 * and the error such an answer carries, read as the client's protocol reads it.
 */
import http2 from "node:http2";
import { gunzipSync } from "node:zlib";
import { Code, ConnectError } from "@connectrpc/connect";
import { endStreamFromJson, errorFromJsonBytes } from "@connectrpc/connect/protocol-connect";
import { findTrailerError } from "@connectrpc/connect/protocol-grpc";
import { envelopesOf } from "./envelopes.ts";

export interface H2Answer {
  head: http2.IncomingHttpHeaders;
  trailers: http2.IncomingHttpHeaders;
  body: Buffer;
  /** From the request to the stream's close. */
  ms: number;
}

/**
 * Sends one request on a session of its own and resolves the answer when the stream closes, or
 * "no answer" after `timeoutMs`. `end: false` writes the body and never ends it, so only the
 * server can close the stream.
 */
export async function h2Exchange(
  url: string,
  headers: http2.OutgoingHttpHeaders,
  body: Buffer,
  options: { end?: boolean; timeoutMs?: number } = {},
): Promise<H2Answer | "no answer"> {
  const session = http2.connect(url);
  session.on("error", () => {});
  try {
    return await h2Call(session, headers, body, options).answer;
  } finally {
    session.destroy();
  }
}

/**
 * One request on `session` (several may share it): the stream, to write more or reset it, and
 * its answer once the stream closes, or "no answer" after `timeoutMs`. `end: false` writes the
 * body and leaves the request open.
 */
export function h2Call(
  session: http2.ClientHttp2Session,
  headers: http2.OutgoingHttpHeaders,
  body: Buffer,
  { end = true, timeoutMs = 5000 }: { end?: boolean; timeoutMs?: number } = {},
): { stream: http2.ClientHttp2Stream; answer: Promise<H2Answer | "no answer"> } {
  const started = Date.now();
  const stream = session.request({ ":method": "POST", ...headers });
  const answer = new Promise<H2Answer | "no answer">((resolve) => {
    let head: http2.IncomingHttpHeaders = {};
    let trailers: http2.IncomingHttpHeaders = {};
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => resolve("no answer"), timeoutMs);
    stream.on("response", (h) => (head = h));
    stream.on("trailers", (t) => (trailers = t));
    stream.on("data", (c: Buffer) => chunks.push(c));
    stream.on("error", () => {});
    stream.on("close", () => {
      clearTimeout(timer);
      resolve({ head, trailers, body: Buffer.concat(chunks), ms: Date.now() - started });
    });
  });
  if (end) stream.end(body);
  else stream.write(body);
  return { stream, answer };
}

/**
 * The error of an answer to a request of content type `requestType`, read as its protocol
 * reads it (gRPC status, gRPC-Web trailer frame, Connect end-of-stream message or unary error
 * body); undefined when it succeeded. Throws when a Connect unary answer is not a Connect error.
 */
export function answerError(answer: H2Answer, requestType: string): ConnectError | undefined {
  const webHeaders = (from: Record<string, unknown>) => {
    const out = new Headers();
    for (const [name, value] of Object.entries(from)) if (!name.startsWith(":") && typeof value === "string") out.set(name, value);
    return out;
  };
  if (requestType.startsWith("application/grpc-web")) {
    const frame = envelopesOf(answer.body).find((e) => e.flags === 0x80);
    const trailer = new Headers();
    for (const line of frame?.message.toString("latin1").split("\r\n") ?? []) {
      const at = line.indexOf(":");
      if (at > 0) trailer.set(line.slice(0, at).trim(), line.slice(at + 1).trim());
    }
    return findTrailerError(trailer);
  }
  if (requestType.startsWith("application/grpc")) return findTrailerError(webHeaders({ ...answer.head, ...answer.trailers }));
  if (requestType.startsWith("application/connect+")) {
    // The end of the stream is compressed (flag 1) when the answer is, and it is long enough.
    const end = envelopesOf(answer.body).find((e) => (e.flags & 2) === 2);
    return end ? endStreamFromJson(end.flags & 1 ? gunzipSync(end.message) : end.message).error : undefined;
  }
  if (Number(answer.head[":status"]) === 200) return undefined;
  const bytes = answer.head["content-encoding"] === "gzip" ? gunzipSync(answer.body) : answer.body;
  return errorFromJsonBytes(bytes, undefined, new ConnectError("", Code.Unknown));
}
