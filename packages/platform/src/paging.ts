/**
 * Opaque page tokens (AIP-158): base64url of a small JSON cursor. Clients must not build
 * them; a token that does not decode answers INVALID_ARGUMENT naming page_token.
 */
import { invalidArgument } from "./errors.ts";

export function encodePageToken(cursor: Record<string, string | number>): string {
  return Buffer.from(JSON.stringify(cursor)).toString("base64url");
}

export function decodePageToken<T extends Record<string, string | number>>(token: string, keys: (keyof T)[]): T | undefined {
  if (token === "") return undefined;
  try {
    const value = JSON.parse(Buffer.from(token, "base64url").toString("utf8")) as T;
    if (typeof value === "object" && value !== null && keys.every((k) => k in value)) return value;
  } catch {
    // fall through
  }
  throw invalidArgument("page_token", "is not a token this service issued", "PAGE_TOKEN_INVALID");
}
