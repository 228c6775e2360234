/**
 * Forwarding handlers, derived from the contracts: every method of every public service is
 * passed to its owning service over gRPC with the caller's identity signed into the metadata,
 * the client's deadline, and the trace context. Requests and responses are decoded and
 * re-encoded on the way, so a malformed message is refused at the edge. A server stream ends
 * with its credential's refusal when that credential is revoked while it is open (open-streams.ts).
 */
import { type DescMethod, type DescService, fromBinary, toBinary } from "@bufbuild/protobuf";
import { type CallOptions, Code, type ConnectRouter, ConnectError, type HandlerContext, type ServiceImpl, type Transport, createClient } from "@connectrpc/connect";
import { audienceOf, callerOf, drainSignalKey, type SigningKeys } from "@outpost/platform";
import {
  ServerReflection,
  ServerReflectionRequestSchema,
  ServerReflectionResponseSchema,
} from "@outpost/proto/grpc/reflection/v1/reflection_pb.js";
import {
  ServerReflection as ServerReflectionV1Alpha,
  ServerReflectionRequestSchema as ServerReflectionRequestV1AlphaSchema,
  ServerReflectionResponseSchema as ServerReflectionResponseV1AlphaSchema,
} from "@outpost/proto/grpc/reflection/v1alpha/reflection_pb.js";
import type { OpenStreams } from "./core/open-streams.ts";
import type { ReflectionIndex } from "./core/reflection.ts";

export function registerForwarding(router: ConnectRouter, service: DescService, transport: Transport, signingKeys: SigningKeys, openStreams: OpenStreams): void {
  const client = createClient(service, transport) as unknown as Record<string, (req: unknown, options: CallOptions) => unknown>;
  const audience = audienceOf(service);
  const impl: Record<string, unknown> = {};

  /**
   * A unary call finishes on its own when the server drains; only streams end on the drain
   * signal too, and on `revoked` (their key refused while open). One combined signal per stream:
   * combining signals costs on every call of the hot path, and each one registers with the
   * server-wide drain signal.
   */
  const optionsFor = (ctx: HandlerContext, revoked?: AbortSignal): CallOptions => {
    const headers = new Headers();
    signingKeys.writeIdentity(headers, callerOf(ctx), audience);
    const signal = revoked ? AbortSignal.any([ctx.signal, ctx.values.get(drainSignalKey), revoked]) : ctx.signal;
    return { signal, timeoutMs: ctx.timeoutMs(), headers };
  };

  for (const method of service.methods) {
    const call = client[method.localName]!.bind(client);
    impl[method.localName] = forwarder(method, call, optionsFor, openStreams);
  }
  router.service(service, impl as ServiceImpl<DescService>);
}

function forwarder(
  method: DescMethod,
  call: (req: unknown, options: CallOptions) => unknown,
  optionsFor: (ctx: HandlerContext, revoked?: AbortSignal) => CallOptions,
  openStreams: OpenStreams,
) {
  switch (method.methodKind) {
    case "unary":
      return async (req: unknown, ctx: HandlerContext) => {
        try {
          return await call(req, optionsFor(ctx));
        } catch (err) {
          throw ctx.signal.aborted ? err : upstreamFailure(err);
        }
      };
    case "server_streaming":
      return async function* (req: unknown, ctx: HandlerContext) {
        const revoked = new AbortController();
        const unwatch = openStreams.watch(ctx.requestHeader, callerOf(ctx), (refusal) => revoked.abort(refusal));
        const options = optionsFor(ctx, revoked.signal);
        try {
          yield* call(req, options) as AsyncIterable<unknown>;
        } catch (err) {
          // The caller's key was revoked (or its tenant suspended) while the stream was open.
          if (revoked.signal.aborted) throw revoked.signal.reason;
          // The gateway is draining: end the stream cleanly; clients resume.
          if (ctx.values.get(drainSignalKey).aborted) return;
          // The client's deadline passed (or it left): say so, whatever the upstream said first.
          if (ctx.signal.aborted) throw ConnectError.from(ctx.signal.reason);
          throw upstreamFailure(err);
        } finally {
          unwatch();
        }
      };
    default:
      // No public method streams from the client; the contracts would have to change first.
      throw new Error(`${method.parent.typeName}/${method.name}: ${method.methodKind} methods are not forwarded`);
  }
}

/**
 * An error the gateway's client raised itself rather than the service's answer (not a wire
 * error), while the caller was still there: the upstream's connection was refused, dropped or
 * reset under the call. connect-node reports that as CANCELED, ABORTED or INTERNAL, which no
 * retry policy retries; the client gets UNAVAILABLE instead, as on the raw path. The service's
 * own errors, deadlines and undecodable answers pass unchanged.
 */
export function upstreamFailure(err: unknown): unknown {
  if (!(err instanceof ConnectError) || err.isWireError) return err;
  const transportFailure =
    err.code === Code.Unavailable ||
    err.code === Code.Canceled ||
    err.code === Code.Aborted ||
    (err.code === Code.Internal && (err.rawMessage.startsWith("http/2 stream closed") || hasSystemErrorCode(err.cause)));
  return transportFailure ? new ConnectError(`upstream unavailable: ${err.rawMessage}`, Code.Unavailable, undefined, undefined, err) : err;
}

/** True when `cause`, or one of its causes, is an error Node raised (it has a string `code`). */
function hasSystemErrorCode(cause: unknown, depth = 0): boolean {
  if (!(cause instanceof Error) || depth > 8) return false;
  if (typeof (cause as { code?: unknown }).code === "string") return true;
  return hasSystemErrorCode(cause.cause, depth + 1);
}

/**
 * gRPC server reflection, v1 and the v1alpha that older tools still ask for. The two are the
 * same messages under another package, so v1alpha requests are re-read as v1 from their bytes.
 */
export function registerReflection(router: ConnectRouter, index: ReflectionIndex): void {
  router.service(ServerReflection, {
    async *serverReflectionInfo(requests) {
      for await (const req of requests) yield index.answer(req);
    },
  });
  router.service(ServerReflectionV1Alpha, {
    async *serverReflectionInfo(requests) {
      for await (const req of requests) {
        const answer = index.answer(fromBinary(ServerReflectionRequestSchema, toBinary(ServerReflectionRequestV1AlphaSchema, req)));
        yield fromBinary(ServerReflectionResponseV1AlphaSchema, toBinary(ServerReflectionResponseSchema, answer));
      }
    },
  });
}
