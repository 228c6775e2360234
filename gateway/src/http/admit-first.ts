/**
 * The edge decision before the body, for the calls the raw path leaves to Connect (gRPC-Web,
 * compressed requests, Connect GET, client streams, health, reflection). connect-node reads,
 * decompresses and decodes a request before any interceptor runs, so without this a client over
 * its rate budget (or with a refused key) still had each of those bodies read and decoded before
 * it was told RESOURCE_EXHAUSTED. Here `admitCall` runs on the headers alone: a refused call is
 * answered in its own protocol without its body read; an admitted one goes on to Connect with
 * its admission, which the edge interceptor uses instead of deciding (and counting) again.
 */
import type http from "node:http";
import type { DescService } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { setTrailerStatus } from "@connectrpc/connect/protocol-grpc";
import { envelope, rpcCodeLabel, rpcMetrics, SpanStatusCode, startServerSpan } from "@outpost/platform";
import { type Admitted, admitCall, clientIpOf, type EdgeOptions } from "../edge.ts";
import { connectUnary } from "./raw-connect.ts";
import { connectServerStream } from "./raw-connect-stream.ts";
import { grpcUnary } from "./raw-grpc.ts";
import { type ClientRequest, type ClientResponse, clientErrorOf, errorHeaders, headersOf, isGone, respondBeforeAnswer, type UnaryWireProtocol } from "./raw-unary.ts";

type ErrorWriter = Pick<UnaryWireProtocol, "respondError">;

/**
 * gRPC-Web's refusal, as connect-node writes one: status 200, the RateLimit-* and other metadata
 * in the headers, and the status in a trailer frame (flag 0x80) as the whole body — base64 for
 * the text form (`application/grpc-web-text`).
 */
const grpcWebErrors: ErrorWriter = {
  respondError(req, res, error, budget) {
    if (isGone(res)) return;
    const status = new Headers();
    setTrailerStatus(status, error);
    const contentType = String(req.headers["content-type"] ?? "").split(";")[0]!.trim();
    let body = envelope(0x80, Buffer.from([...status].map(([name, value]) => `${name}: ${value}\r\n`).join(""), "latin1"));
    if (contentType.startsWith("application/grpc-web-text")) body = Buffer.from(body.toString("base64"));
    (res as http.ServerResponse).writeHead(200, { ...errorHeaders(error, budget), "content-type": contentType, "content-length": String(body.length) });
    res.end(body);
  },
};

/** The content types of the protocols connect-node serves (Connect unary and streams, gRPC, gRPC-Web). */
const SERVED_CONTENT_TYPE = /^application\/(json|proto|connect\+(json|proto)|grpc(\+(json|proto))?|grpc-web(\+(json|proto))?|grpc-web-text(\+(json|proto))?)\s*(;|$)/i;

const grpcErrors = grpcUnary();
const connectStreamErrors = connectServerStream();
const connectUnaryErrors = connectUnary();

/** How a refusal is written for this request: by its content type, as connect-node tells protocols apart. */
function errorWriterFor(req: ClientRequest): ErrorWriter {
  const contentType = String(req.headers["content-type"] ?? "");
  if (contentType.startsWith("application/grpc-web")) return grpcWebErrors;
  if (contentType.startsWith("application/grpc")) return grpcErrors;
  if (contentType.startsWith("application/connect+")) return connectStreamErrors;
  return connectUnaryErrors; // Connect unary, POST or GET
}

export function admitFirst(options: Pick<EdgeOptions, "authenticator" | "rateLimits" | "logger">, services: readonly DescService[]) {
  const methods = new Map<string, { serviceTypeName: string; methodName: string }>();
  for (const service of services) {
    for (const method of service.methods) methods.set(`/${service.typeName}/${method.name}`, { serviceTypeName: service.typeName, methodName: method.name });
  }
  const admissions = new WeakMap<ClientRequest, Admitted>();
  const requests = rpcMetrics.requests();

  async function decide(req: ClientRequest, res: ClientResponse, call: { serviceTypeName: string; methodName: string }): Promise<boolean> {
    const header = headersOf(req);
    try {
      const admitted = await admitCall(options, { ip: clientIpOf(req), ...call, header });
      admissions.set(req, admitted);
      // The budget rides on whatever answer Connect gives, a request it cannot decode included
      // (refused before any interceptor runs); on success the interceptor sets the same values.
      for (const [name, value] of admitted.budget) res.setHeader(name, value);
      return false;
    } catch (err) {
      // Refused (or the decision failed): answered here, the body unread, traced and counted
      // as the Connect path would have.
      const method = `${call.serviceTypeName}/${call.methodName}`;
      const { span } = startServerSpan(call.serviceTypeName, call.methodName, header);
      const error = clientErrorOf(err, span.spanContext().traceId, (cause) => options.logger.error({ err: cause, method }, "edge decision failed"));
      requests.inc({ method, code: rpcCodeLabel(error.code) });
      span.setStatus({ code: SpanStatusCode.ERROR, message: Code[error.code] });
      span.end();
      if (!isGone(res)) await respondBeforeAnswer(errorWriterFor(req), req, res, error, []);
      return true;
    }
  }

  return {
    /** False when the request is not a call of a method served here; else a promise of whether it was answered (refused). */
    admit(req: ClientRequest, res: ClientResponse): false | Promise<boolean> {
      const call = methods.get((req.url ?? "").split("?")[0]!);
      if (call === undefined) return false;
      // A content type no protocol here speaks is Connect's to refuse (415), whoever sends it.
      if (req.method !== "GET" && !SERVED_CONTENT_TYPE.test(String(req.headers["content-type"] ?? ""))) return false;
      return decide(req, res, call);
    },
    /** The admission made for this request, for the edge interceptor. */
    admissionOf: (req: ClientRequest): Admitted | undefined => admissions.get(req),
  };
}
