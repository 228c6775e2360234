/**
 * Protocol headers whose value a refusal quotes back: a deadline (`grpc-timeout`,
 * `connect-timeout-ms`), the Connect protocol version, a compression. connect-es, the platform's
 * lean unary path and the raw path all name the value they could not read, and at the edge it
 * is then written up to three times (the message, `grpc-status-details-bin`'s Status and its
 * BadRequest), base64 for two of them: a 16 KiB `grpc-timeout` made trailers over 64 KiB, which
 * Node could not send (the client's connection was closed without a status), and a 5 KB
 * `connect-timeout-ms` a 29 KB error body. Every valid value of these headers is a few
 * characters, so a longer one is cut here, before any path reads it: it is refused as before (a
 * cut value never parses, nor names a known encoding), and the refusal quotes at most
 * QUOTED_CHARS of it.
 */
import type { ClientRequest } from "./raw-unary.ts";

/** Headers whose values refusals quote; each valid value is far shorter than MAX_CHARS. */
const QUOTED_HEADERS = ["grpc-timeout", "connect-timeout-ms", "connect-protocol-version", "grpc-encoding", "content-encoding", "connect-content-encoding"];
/** Longer values are cut. */
const MAX_CHARS = 64;
/** What is kept of a cut value. */
const QUOTED_CHARS = 32;

/** Cuts the overlong values of QUOTED_HEADERS in `req.headers` (what every path reads). */
export function boundQuotedHeaders(req: ClientRequest): void {
  const headers = req.headers as Record<string, string | string[] | undefined>;
  for (const name of QUOTED_HEADERS) {
    const value = headers[name];
    if (value === undefined) continue;
    const joined = Array.isArray(value) ? value.join(", ") : value;
    if (joined.length > MAX_CHARS) headers[name] = `${joined.slice(0, QUOTED_CHARS)}... (${joined.length} characters)`;
  }
}
