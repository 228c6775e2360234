/**
 * The one way to raise errors that cross the wire: a ConnectError carrying a
 * google.rpc.ErrorInfo detail whose UPPER_SNAKE reason a client can switch on, plus the
 * standard detail that fits the code (BadRequest for invalid arguments, RetryInfo where a
 * client should wait). Handlers throw these; anything else is masked as INTERNAL.
 */
import { create, type DescMessage, type MessageInitShape } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  QuotaFailureSchema,
  RetryInfoSchema,
} from "@outpost/proto/google/rpc/error_details_pb.js";

/** ErrorInfo.domain of every error Outpost raises. */
export const ERROR_DOMAIN = "outpost.dev";

/** A detail to attach: a message schema and a value of it. */
type Detail = { desc: DescMessage; value: MessageInitShape<DescMessage> };

export function outpostError(
  code: Code,
  reason: string,
  message: string,
  metadata: Record<string, string> = {},
  extraDetails: Detail[] = [],
  cause?: unknown,
): ConnectError {
  const info = { desc: ErrorInfoSchema, value: create(ErrorInfoSchema, { reason, domain: ERROR_DOMAIN, metadata }) };
  return new ConnectError(message, code, undefined, [info, ...extraDetails], cause);
}

/** INVALID_ARGUMENT naming the field and why; carries ErrorInfo and BadRequest. */
export function invalidArgument(field: string, description: string, reason = "INVALID_FIELD"): ConnectError {
  const badRequest = create(BadRequestSchema, { fieldViolations: [{ field, description, reason }] });
  return outpostError(Code.InvalidArgument, reason, `${field}: ${description}`, { field, description }, [
    { desc: BadRequestSchema, value: badRequest },
  ]);
}

/** ErrorInfo `metadata.field` of a problem with the request's body rather than one field of its message. */
export const REQUEST_BODY_FIELD = "(request body)";

/**
 * ErrorInfo reasons of a request that is malformed below its message's fields (docs/edge.md,
 * "Malformed requests"): the deadline header, the framing, the message's encoding, its compression,
 * the Connect protocol version.
 */
export const MALFORMED = {
  TIMEOUT: "MALFORMED_TIMEOUT",
  FRAME: "MALFORMED_FRAME",
  MESSAGE: "MALFORMED_MESSAGE",
  COMPRESSION: "MALFORMED_COMPRESSION",
  PROTOCOL_VERSION: "UNSUPPORTED_PROTOCOL_VERSION",
} as const;

/**
 * An INVALID_ARGUMENT without ErrorInfo (connect-es raises those from its protocol code: a
 * deadline header it cannot read, broken framing, a message it cannot decode or decompress) as
 * the project answers bad input: ErrorInfo and BadRequest naming the header, or
 * `(request body)`, and the reason. Anything else is returned as it is.
 */
export function explainMalformed(err: ConnectError): ConnectError {
  if (err.code !== Code.InvalidArgument || err.findDetails(ErrorInfoSchema).length > 0) return err;
  const message = err.rawMessage;
  const [reason, field] = /grpc timeout/i.test(message)
    ? [MALFORMED.TIMEOUT, "grpc-timeout"]
    : /connect timeout|^timeout \d+ms/i.test(message)
      ? [MALFORMED.TIMEOUT, /grpc/i.test(message) ? "grpc-timeout" : "connect-timeout-ms"]
      : /connect-protocol-version/i.test(message)
        ? [MALFORMED.PROTOCOL_VERSION, "connect-protocol-version"]
        : /compress|flag/i.test(message)
          ? [MALFORMED.COMPRESSION, REQUEST_BODY_FIELD]
          : /envelope|promised|incomplete|frame|exactly one message|no complete message|content-length/i.test(message)
            ? [MALFORMED.FRAME, REQUEST_BODY_FIELD]
            : [MALFORMED.MESSAGE, REQUEST_BODY_FIELD];
  const explained = invalidArgument(field, message, reason);
  for (const [name, value] of err.metadata) explained.metadata.set(name, value);
  return explained;
}

/** A Connect request whose `connect-protocol-version` header is not 1 (docs/edge.md). */
export function unsupportedConnectVersion(version: string): ConnectError {
  return invalidArgument("connect-protocol-version", `must be "1": got "${version}"`, MALFORMED.PROTOCOL_VERSION);
}

/** NOT_FOUND: also the answer for another tenant's resource, so it must not say more. */
export function notFound(resource: string, id: string): ConnectError {
  return outpostError(Code.NotFound, `${resource.toUpperCase()}_NOT_FOUND`, `${resource} "${id}" not found`, {
    resource,
    id,
  });
}

export function unauthenticated(reason: string, message: string): ConnectError {
  return outpostError(Code.Unauthenticated, reason, message);
}

export function permissionDenied(reason: string, message: string): ConnectError {
  return outpostError(Code.PermissionDenied, reason, message);
}

export function failedPrecondition(reason: string, message: string, metadata: Record<string, string> = {}): ConnectError {
  return outpostError(Code.FailedPrecondition, reason, message, metadata);
}

export function unavailable(reason: string, message: string, retryAfterMs?: number): ConnectError {
  const details: Detail[] =
    retryAfterMs === undefined
      ? []
      : [{ desc: RetryInfoSchema, value: create(RetryInfoSchema, { retryDelay: durationFromMs(retryAfterMs) }) }];
  return outpostError(Code.Unavailable, reason, message, {}, details);
}

export function resourceExhausted(quota: string, message: string, metadata: Record<string, string> = {}): ConnectError {
  const failure = create(QuotaFailureSchema, { violations: [{ subject: quota, description: message }] });
  return outpostError(Code.ResourceExhausted, "QUOTA_EXCEEDED", message, { quota, ...metadata }, [
    { desc: QuotaFailureSchema, value: failure },
  ]);
}

export function unimplemented(method: string, plannedIn: string): ConnectError {
  return outpostError(Code.Unimplemented, "NOT_YET_BUILT", `${method} is not built yet (${plannedIn})`, {
    method,
  });
}

/** Reads the ErrorInfo of an error from another service, if it carries one. */
export function errorInfoOf(err: ConnectError) {
  return err.findDetails(ErrorInfoSchema)[0];
}

/** An audit outcome: "OK", or the error's code in UPPER_SNAKE (e.g. "INVALID_ARGUMENT"). */
export function outcomeOf(err?: unknown): string {
  if (err === undefined) return "OK";
  const code = err instanceof ConnectError ? err.code : Code.Internal;
  return Code[code]!.replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

/** What a client sees instead of an internal error's cause; the cause is logged under the trace id. */
export function maskedInternalMessage(traceId: string): string {
  return `internal error (trace id ${traceId})`;
}
