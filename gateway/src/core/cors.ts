/**
 * CORS for browsers (SPEC G1, C3): Connect-web and gRPC-Web clients on another origin send a
 * preflight, then the call; the answer must allow the protocol headers and expose the status
 * and rate-limit headers so the browser lets the client read them. Origins are an explicit
 * list (OUTPOST_CORS_ORIGINS), or `*`.
 */

/** Request headers browsers may send: Connect, gRPC-Web, credentials, trace context. */
export const CORS_ALLOWED_HEADERS = [
  "Content-Type",
  "Connect-Protocol-Version",
  "Connect-Timeout-Ms",
  "Connect-Accept-Encoding",
  "Connect-Content-Encoding",
  "Grpc-Timeout",
  "Grpc-Accept-Encoding",
  "X-Grpc-Web",
  "X-User-Agent",
  "Authorization",
  "X-Api-Key",
  "Traceparent",
  "Tracestate",
];

/** Response headers and trailers browsers may read. */
export const CORS_EXPOSED_HEADERS = [
  "Grpc-Status",
  "Grpc-Message",
  "Grpc-Status-Details-Bin",
  "Grpc-Encoding",
  "Grpc-Accept-Encoding",
  "Connect-Content-Encoding",
  "Connect-Accept-Encoding",
  "Content-Encoding",
  "RateLimit-Limit",
  "RateLimit-Remaining",
  "RateLimit-Reset",
  "Retry-After",
];

export const CORS_ALLOWED_METHODS = ["POST", "GET", "OPTIONS"];

/** How long a browser may cache a preflight answer. */
const PREFLIGHT_MAX_AGE_S = 7200;

export interface CorsPolicy {
  readonly anyOrigin: boolean;
  readonly origins: ReadonlySet<string>;
}

/** Parses "https://a.example, https://b.example" or "*"; empty means no cross-origin access. */
export function corsPolicyOf(setting: string): CorsPolicy {
  const entries = setting
    .split(",")
    .map((s) => s.trim().replace(/\/+$/, ""))
    .filter((s) => s !== "");
  return { anyOrigin: entries.includes("*"), origins: new Set(entries.filter((e) => e !== "*")) };
}

export function originAllowed(policy: CorsPolicy, origin: string): boolean {
  return policy.anyOrigin || policy.origins.has(origin);
}

export type CorsAnswer =
  /** Not a CORS request (no Origin header): nothing to add. */
  | { kind: "none" }
  /** A preflight: answer it with this status and these headers, without running the call. */
  | { kind: "preflight"; status: number; headers: Record<string, string> }
  /** A cross-origin call: run it, with these headers added to the response. */
  | { kind: "call"; headers: Record<string, string> };

export function corsAnswer(policy: CorsPolicy, method: string, origin: string | undefined, requestMethod: string | undefined): CorsAnswer {
  if (origin === undefined) return { kind: "none" };
  const allowed = originAllowed(policy, origin);
  const originHeaders: Record<string, string> = allowed ? { "Access-Control-Allow-Origin": policy.anyOrigin ? "*" : origin } : {};
  // The answer depends on the Origin unless every origin gets the same one.
  if (!policy.anyOrigin) originHeaders["Vary"] = "Origin";
  if (method === "OPTIONS" && requestMethod !== undefined) {
    if (!allowed) return { kind: "preflight", status: 403, headers: originHeaders };
    return {
      kind: "preflight",
      status: 204,
      headers: {
        ...originHeaders,
        "Access-Control-Allow-Methods": CORS_ALLOWED_METHODS.join(", "),
        "Access-Control-Allow-Headers": CORS_ALLOWED_HEADERS.join(", "),
        "Access-Control-Max-Age": String(PREFLIGHT_MAX_AGE_S),
      },
    };
  }
  if (!allowed) return { kind: "call", headers: originHeaders };
  return { kind: "call", headers: { ...originHeaders, "Access-Control-Expose-Headers": CORS_EXPOSED_HEADERS.join(", ") } };
}
