/**
 * What a tenant's web page does with the buf-generated SDK over Connect-web (SPEC C1): create a
 * dispatch at the edge from another origin (CORS, G1) and follow its output live to the end,
 * over the Connect protocol (JSON or binary) or gRPC-Web. Bundled for the browser by
 * `test/mesh/browser-sdk.test.ts` and run there in Chromium; it sets `globalThis.outpostPage`.
 * Everything it answers is plain JSON (no bigint), as Playwright hands it back to the test.
 */
import { Code, ConnectError, createClient, type Interceptor, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-web";
import { ErrorInfoSchema } from "@outpost/proto/google/rpc/error_details_pb.js";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { DispatchService } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { LogStream } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";
import { LogService } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";

export type PageProtocol = "connect-json" | "connect-binary" | "grpc-web";

export interface PageCall {
  protocol: PageProtocol;
  gatewayUrl: string;
  apiKey: string;
}

export interface FollowedRun {
  dispatchId: string;
  /** Each chunk as `seq stream text`. */
  lines: string[];
  endState: string;
  lastSeq: number;
  /** The RateLimit-Limit header of the create call, as the page could read it cross-origin. */
  rateLimitLimit: string | null;
}

export interface PageError {
  /** The Code's name, e.g. "Unauthenticated". */
  code: string;
  /** The ErrorInfo reason the SDK decoded from the error's details. */
  reason: string | undefined;
  message: string;
}

function transportFor(call: PageCall, headersSeen?: (headers: Headers) => void): Transport {
  const auth: Interceptor = (next) => async (req) => {
    req.header.set("authorization", `Bearer ${call.apiKey}`);
    const res = await next(req);
    headersSeen?.(res.header);
    return res;
  };
  const options = { baseUrl: call.gatewayUrl, interceptors: [auth] };
  if (call.protocol === "grpc-web") return createGrpcWebTransport(options);
  return createConnectTransport({ ...options, useBinaryFormat: call.protocol === "connect-binary" });
}

/** Creates a dispatch of the demo agent and follows its log stream until the run's end. */
async function dispatchAndFollow(call: PageCall, task: string): Promise<FollowedRun> {
  let rateLimitLimit: string | null = null;
  const creating = transportFor(call, (headers) => (rateLimitLimit = headers.get("ratelimit-limit")));
  const { dispatch } = await createClient(DispatchService, creating).createDispatch({ agent: "demo", task });
  const transport = transportFor(call);
  const lines: string[] = [];
  for await (const message of createClient(LogService, transport).subscribeLogs({ dispatchId: dispatch!.id })) {
    for (const chunk of message.chunks) lines.push(`${chunk.seq} ${LogStream[chunk.stream]} ${chunk.text}`);
    if (message.runEnd) return { dispatchId: dispatch!.id, lines, endState: Dispatch_State[message.runEnd.state], lastSeq: Number(message.runEnd.lastSeq), rateLimitLimit };
  }
  throw new Error("the log stream ended without the run's end");
}

/** A call that must fail: its code, message and ErrorInfo reason as the SDK sees them in the page. */
async function failingCall(call: PageCall): Promise<PageError> {
  try {
    await createClient(DispatchService, transportFor(call)).getDispatch({ dispatchId: "01ARZ3NDEKTSV4RRFFQ69G5FAV" });
  } catch (err) {
    const error = ConnectError.from(err);
    return { code: Code[error.code], reason: error.findDetails(ErrorInfoSchema)[0]?.reason, message: error.rawMessage };
  }
  throw new Error("the call succeeded");
}

(globalThis as Record<string, unknown>).outpostPage = { dispatchAndFollow, failingCall };
