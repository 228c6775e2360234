/**
 * Request validation helpers: each failure names the field and the reason (INVALID_ARGUMENT
 * with ErrorInfo and BadRequest details). Handlers validate before touching the core.
 */
import { invalidArgument } from "./errors.ts";

const ULID = /^[0-9A-HJKMNP-TV-Z]{26}$/;

export function requireNonEmpty(field: string, value: string, maxLength = 256): string {
  if (value.length === 0) throw invalidArgument(field, "is required", "FIELD_REQUIRED");
  return checkLength(field, value, maxLength);
}

export function checkLength(field: string, value: string, maxLength: number): string {
  if (value.length > maxLength) throw invalidArgument(field, `must be at most ${maxLength} characters`, "FIELD_TOO_LONG");
  return value;
}

export function requireUlid(field: string, value: string): string {
  if (value.length === 0) throw invalidArgument(field, "is required", "FIELD_REQUIRED");
  if (!ULID.test(value)) throw invalidArgument(field, "must be a ULID (26 characters, Crockford base32)", "FIELD_MALFORMED");
  return value;
}

/** Enum fields: the zero value (…_UNSPECIFIED) and unknown numbers are refused. */
export function requireEnum<E extends Record<string, string | number>>(field: string, value: number, enumObject: E): number {
  if (value === 0) throw invalidArgument(field, "must be set (the unspecified value is not accepted)", "FIELD_REQUIRED");
  if (!(value in enumObject)) throw invalidArgument(field, `unknown value ${value}`, "FIELD_OUT_OF_RANGE");
  return value;
}

export interface PageRequest {
  pageSize: number;
  pageToken: string;
}

/** page_size 0 means the default; negative or above the maximum is refused. */
export function pageSizeOf(field: string, value: number, defaultSize = 50, maxSize = 1000): number {
  if (value < 0) throw invalidArgument(field, "must not be negative", "FIELD_OUT_OF_RANGE");
  if (value > maxSize) throw invalidArgument(field, `must be at most ${maxSize}`, "FIELD_OUT_OF_RANGE");
  return value === 0 ? defaultSize : value;
}
