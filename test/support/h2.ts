/**
 * One raw HTTP/2 exchange for tests that speak the wire directly (malformed framing, bodies that
 * never end): what the server answered, headers and trailers apart, once it closed the stream.
 */
import http2 from "node:http2";

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
  { end = true, timeoutMs = 5000 }: { end?: boolean; timeoutMs?: number } = {},
): Promise<H2Answer | "no answer"> {
  const session = http2.connect(url);
  session.on("error", () => {});
  try {
    return await new Promise((resolve) => {
      const started = Date.now();
      const stream = session.request({ ":method": "POST", ...headers });
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
      if (end) stream.end(body);
      else stream.write(body);
    });
  } finally {
    session.destroy();
  }
}
