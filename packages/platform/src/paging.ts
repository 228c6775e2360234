/**
 * Opaque page tokens (AIP-158): base64url of a small JSON cursor. Clients must not build
 * them; a token that does not decode answers INVALID_ARGUMENT naming page_token.
 */
import { invalidArgument } from "./errors.ts";

export function encodePageToken(cursor: Record<string, string | number>): string {
  return Buffer.from(JSON.stringify(cursor)).toString("base64url");
}

/**
 * The cursor in `token`, checked against `shape` (each key's type): a token that does not
 * decode, lacks a key or holds another type there (a crafted `{"after": {...}}` would reach a
 * query otherwise) answers INVALID_ARGUMENT PAGE_TOKEN_INVALID.
 */
export function decodePageToken<T extends Record<string, string | number>>(
  token: string,
  shape: { [K in keyof T]: T[K] extends number ? "number" : "string" },
): T | undefined {
  if (token === "") return undefined;
  try {
    const value = JSON.parse(Buffer.from(token, "base64url").toString("utf8")) as Record<string, unknown>;
    const fits = (key: string, kind: "number" | "string") =>
      kind === "number" ? typeof value[key] === "number" && Number.isFinite(value[key]) : typeof value[key] === "string";
    if (typeof value === "object" && value !== null && Object.entries(shape).every(([key, kind]) => fits(key, kind as "number" | "string"))) return value as T;
  } catch {
    // fall through
  }
  throw invalidArgument("page_token", "is not a token this service issued", "PAGE_TOKEN_INVALID");
}
