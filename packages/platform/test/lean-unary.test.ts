/**
 * The lean unary path (lean-unary.ts), over raw HTTP/2 and plain fetch so every byte and header
 * is the test's choice. The other platform tests cover it too: every unary gRPC and Connect call
 * they make takes it.
 */
import http2 from "node:http2";
import { gunzipSync, gzipSync } from "node:zlib";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { compressionGzip, createGrpcTransport } from "@connectrpc/connect-node";
import type { RunningServer } from "@outpost/platform";
import { findTrailerError } from "@connectrpc/connect/protocol-grpc";
import { ErrorInfoSchema } from "@outpost/proto/google/rpc/error_details_pb.js";
import { GetLogsRequestSchema, GetLogsResponseSchema, LogService } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { envelope } from "../../../test/support/envelopes.ts";
import { callAborts, sleep, startTestServer } from "./helpers.ts";

const GET_LOGS = "/outpost.telemetry.v1.LogService/GetLogs";

interface RawAnswer {
  headers: http2.IncomingHttpHeaders;
  trailers: http2.IncomingHttpHeaders;
  body: Buffer;
  /** grpc-status and grpc-message, from the trailers (or the headers of a trailers-only answer). */
  code: number;
  message: string;
}

const getLogs = (dispatchId: string) => toBinary(GetLogsRequestSchema, create(GetLogsRequestSchema, { dispatchId }));
/** A GetLogsRequest as JSON whose dispatch_id holds the bytes ff fe: not UTF-8 (a lenient decoder reads "ab\uFFFD\uFFFDcd"). */
const invalidUtf8Json = Buffer.concat([Buffer.from('{"dispatchId":"ab'), Buffer.from([0xff, 0xfe]), Buffer.from('cd"}')]);

/**
 * One gRPC call over its own HTTP/2 session. `end: false` leaves the request open (the answer
 * must come anyway); `cancelAfterMs` resets the stream from the client's side.
 */
function rawGrpc(
  url: string,
  body: Buffer,
  options: { headers?: Record<string, string>; end?: boolean; cancelAfterMs?: number } = {},
): Promise<RawAnswer | "cancelled"> {
  const session = http2.connect(url);
  return new Promise<RawAnswer | "cancelled">((resolve, reject) => {
    const stream = session.request({
      ":method": "POST",
      ":path": GET_LOGS,
      "content-type": "application/grpc",
      te: "trailers",
      ...options.headers,
    });
    let headers: http2.IncomingHttpHeaders = {};
    let trailers: http2.IncomingHttpHeaders = {};
    const chunks: Buffer[] = [];
    stream.on("response", (h) => (headers = h));
    stream.on("trailers", (t) => (trailers = t));
    stream.on("data", (chunk: Buffer) => chunks.push(chunk));
    stream.on("error", reject);
    stream.on("close", () => {
      if (options.cancelAfterMs !== undefined) return resolve("cancelled");
      const status = trailers["grpc-status"] ?? headers["grpc-status"];
      const message = trailers["grpc-message"] ?? headers["grpc-message"] ?? "";
      resolve({ headers, trailers, body: Buffer.concat(chunks), code: Number(status), message: decodeURIComponent(String(message)) });
    });
    if (options.end === false) stream.write(body);
    else stream.end(body);
    if (options.cancelAfterMs !== undefined) setTimeout(() => stream.close(http2.constants.NGHTTP2_CANCEL), options.cancelAfterMs);
  }).finally(() => session.close());
}

/** The reason and field of the ErrorInfo a gRPC answer's status carries ("none" without one). */
function errorInfoOf(answer: RawAnswer): string {
  const status = new Headers();
  for (const [name, value] of Object.entries({ ...answer.headers, ...answer.trailers })) if (typeof value === "string" && !name.startsWith(":")) status.set(name, value);
  const info = findTrailerError(status)?.findDetails(ErrorInfoSchema)[0];
  return `${info?.reason ?? "none"} ${info?.metadata["field"] ?? "none"}`;
}

async function answerOf(call: Promise<RawAnswer | "cancelled">): Promise<RawAnswer> {
  const answer = await call;
  if (answer === "cancelled") throw new Error("expected an answer");
  return answer;
}

describe("lean unary path, gRPC", () => {
  let server: RunningServer;
  beforeAll(async () => {
    server = await startTestServer({ readMaxBytes: 1024 });
  });
  afterAll(() => server.close());

  it("answers with the handler's message, response headers and trailers", async () => {
    const answer = await answerOf(rawGrpc(server.url, envelope(0, getLogs("headers"))));
    expect(answer.code).toBe(0);
    expect(answer.headers["content-type"]).toBe("application/grpc+proto");
    expect(answer.headers["x-answer"]).toBe("head");
    expect(answer.trailers["x-answer-trailer"]).toBe("tail");
    expect(answer.body.readUInt32BE(1)).toBe(answer.body.length - 5);
    const message = fromBinary(GetLogsResponseSchema, answer.body.subarray(5));
    expect(message.chunks.map((c) => c.text)).toEqual(["headers"]);
  });

  it("refuses framing and messages it cannot read with INVALID_ARGUMENT naming the problem", async () => {
    const valid = getLogs("x");
    const cases: [string, Buffer, RegExp, string][] = [
      ["an empty body", Buffer.alloc(0), /no complete message \(0 bytes\)/, "MALFORMED_FRAME"],
      ["a cut envelope header", Buffer.from([0, 0, 0]), /no complete message \(3 bytes\)/, "MALFORMED_FRAME"],
      ["a cut message", envelope(0, valid, valid.length + 10), /\d+ bytes promised, \d+ sent/, "MALFORMED_FRAME"],
      ["two messages", Buffer.concat([envelope(0, valid), envelope(0, valid)]), /exactly one message/, "MALFORMED_FRAME"],
      ["a compressed flag without grpc-encoding", envelope(1, valid), /compressed message without grpc-encoding/, "MALFORMED_COMPRESSION"],
      ["unknown flags", envelope(4, valid), /unknown message flags 4/, "MALFORMED_COMPRESSION"],
      ["bytes that are no GetLogsRequest", envelope(0, Buffer.from([0xff, 0xff, 0xff])), /request message could not be decoded/, "MALFORMED_MESSAGE"],
    ];
    for (const [name, body, expected, reason] of cases) {
      const answer = await answerOf(rawGrpc(server.url, body));
      expect({ name, code: answer.code, info: errorInfoOf(answer) }).toEqual({ name, code: Code.InvalidArgument, info: `${reason} (request body)` });
      expect(answer.message).toMatch(expected);
    }
    const after = await answerOf(rawGrpc(server.url, envelope(0, valid)));
    expect(after.code).toBe(0);
  });

  it("refuses gRPC JSON (application/grpc+json) that is not UTF-8 with INVALID_ARGUMENT, not a U+FFFD in its place", async () => {
    const answer = await answerOf(rawGrpc(server.url, envelope(0, invalidUtf8Json), { headers: { "content-type": "application/grpc+json" } }));
    expect(answer.code).toBe(Code.InvalidArgument);
    expect(answer.message).toMatch(/request message could not be decoded: .*utf-8/i);
    expect(errorInfoOf(answer)).toBe("MALFORMED_MESSAGE (request body)");
    const valid = await answerOf(rawGrpc(server.url, envelope(0, JSON.stringify({ dispatchId: "ab\u00e9cd" })), { headers: { "content-type": "application/grpc+json" } }));
    expect(valid.code).toBe(0);
    expect(JSON.parse(valid.body.subarray(5).toString()).chunks[0].text).toBe("ab\u00e9cd");
  });

  it("refuses an oversize message once its envelope header arrives, without waiting for the body", async () => {
    const header = envelope(0, Buffer.alloc(0), 1024 * 1024);
    const answer = await answerOf(rawGrpc(server.url, header, { end: false }));
    expect(answer.code).toBe(Code.ResourceExhausted);
    expect(answer.message).toBe("message size 1048576 is larger than configured readMaxBytes 1024");
  });

  it("refuses a malformed grpc-timeout", async () => {
    const answer = await answerOf(rawGrpc(server.url, envelope(0, getLogs("x")), { headers: { "grpc-timeout": "soon" } }));
    expect(answer.code).toBe(Code.InvalidArgument);
    expect(answer.message).toContain("invalid grpc timeout value: soon");
    expect(errorInfoOf(answer)).toBe("MALFORMED_TIMEOUT grpc-timeout");
  });

  it("stops waiting for a body that never ends at the deadline", async () => {
    const answer = await answerOf(rawGrpc(server.url, envelope(0, getLogs("x")).subarray(0, 4), { headers: { "grpc-timeout": "100m" }, end: false }));
    expect(answer.code).toBe(Code.DeadlineExceeded);
  });

  it("aborts the handler's signal at the deadline", async () => {
    const before = callAborts.length;
    const answer = await answerOf(rawGrpc(server.url, envelope(0, getLogs("wait")), { headers: { "grpc-timeout": "50m" } }));
    expect(answer.code).toBe(Code.DeadlineExceeded);
    expect(ConnectError.from(callAborts[before]).code).toBe(Code.DeadlineExceeded);
  });

  it("aborts the handler's signal when the client goes away, and keeps serving", async () => {
    const before = callAborts.length;
    expect(await rawGrpc(server.url, envelope(0, getLogs("wait")), { cancelAfterMs: 100 })).toBe("cancelled");
    for (let i = 0; i < 100 && callAborts.length === before; i++) await sleep(10);
    expect(callAborts.length).toBe(before + 1);
    // connect-node's reason for a client's HTTP/2 CANCEL: the call is logged and counted as CANCELED.
    expect(ConnectError.from(callAborts[before]).code).toBe(Code.Canceled);
    expect(ConnectError.from(callAborts[before]).rawMessage).toBe("http/2 stream closed with error code CANCEL (0x8)");
    expect((await answerOf(rawGrpc(server.url, envelope(0, getLogs("x"))))).code).toBe(0);
  });

  it("reads compressed requests and compresses answers of 1 KiB or more for clients that accept it", async () => {
    const transport = createGrpcTransport({ baseUrl: server.url, sendCompression: compressionGzip, compressMinBytes: 1 });
    const res = await createClient(LogService, transport).getLogs({ dispatchId: "compressed" });
    expect(res.chunks.map((c) => c.text)).toEqual(["compressed"]);

    const long = "x".repeat(900);
    const gzipped = await answerOf(
      rawGrpc(server.url, envelope(1, gzipSync(getLogs(long))), { headers: { "grpc-encoding": "gzip", "grpc-accept-encoding": "gzip" } }),
    );
    expect(gzipped.code).toBe(0);
    expect(gzipped.headers["grpc-encoding"]).toBe("gzip");
    expect(gzipped.body[0]).toBe(1);
    expect(fromBinary(GetLogsResponseSchema, gunzipSync(gzipped.body.subarray(5))).chunks[0]?.text).toBe(long);

    // As connect-node: the negotiated encoding is named, a small message goes uncompressed.
    const small = await answerOf(rawGrpc(server.url, envelope(0, getLogs("small")), { headers: { "grpc-accept-encoding": "gzip" } }));
    expect(small.headers["grpc-encoding"]).toBe("gzip");
    expect(small.body[0]).toBe(0);
  });

  it("gives the handler the full URL, as connect-node does", async () => {
    const answer = await answerOf(rawGrpc(server.url, envelope(0, getLogs("url"))));
    expect(fromBinary(GetLogsResponseSchema, answer.body.subarray(5)).nextPageToken).toBe(`${server.url}${GET_LOGS}`);
  });

  it("reads an envelope whose header arrives split across frames", async () => {
    const body = envelope(0, getLogs("split"));
    const session = http2.connect(server.url);
    const stream = session.request({ ":method": "POST", ":path": GET_LOGS, "content-type": "application/grpc", te: "trailers" });
    stream.write(body.subarray(0, 1));
    await sleep(20);
    stream.write(body.subarray(1, 3));
    await sleep(20);
    stream.end(body.subarray(3));
    const chunks: Buffer[] = [];
    stream.on("data", (c: Buffer) => chunks.push(c));
    await new Promise((resolve) => stream.on("close", resolve));
    session.close();
    expect(fromBinary(GetLogsResponseSchema, Buffer.concat(chunks).subarray(5)).chunks[0]?.text).toBe("split");
  });

  it("leaves out connection headers an error carries instead of failing the process", async () => {
    const answer = await answerOf(rawGrpc(server.url, envelope(0, getLogs("connection-header"))));
    expect(answer.code).toBe(Code.FailedPrecondition);
    expect(answer.trailers["x-kept"]).toBe("yes");
    expect(answer.trailers["transfer-encoding"]).toBeUndefined();
    expect((await answerOf(rawGrpc(server.url, envelope(0, getLogs("x"))))).code).toBe(0);
  });

  it("refuses an unknown compression with UNIMPLEMENTED naming the supported ones", async () => {
    const answer = await answerOf(rawGrpc(server.url, envelope(1, getLogs("x")), { headers: { "grpc-encoding": "snappy" } }));
    expect(answer.code).toBe(Code.Unimplemented);
    expect(answer.message).toBe('unknown compression "snappy": supported encodings are gzip,br');
    const garbage = await answerOf(rawGrpc(server.url, envelope(1, Buffer.from("not gzip")), { headers: { "grpc-encoding": "gzip" } }));
    expect(garbage.code).not.toBe(0);
    expect((await answerOf(rawGrpc(server.url, envelope(0, getLogs("x"))))).code).toBe(0);
  });

  it("refuses a compressed message that does not decompress (cut, or not that encoding) with INVALID_ARGUMENT", async () => {
    const gzipped = gzipSync(getLogs("x"));
    for (const [encoding, bytes] of [
      ["gzip", gzipped.subarray(0, gzipped.length - 6)], // cut before its end
      ["gzip", gzipped.subarray(0, 12)],
      ["br", Buffer.from("not brotli")],
    ] as const) {
      const answer = await answerOf(rawGrpc(server.url, envelope(1, bytes), { headers: { "grpc-encoding": encoding } }));
      expect(answer.code, `${encoding}, ${bytes.length} bytes`).toBe(Code.InvalidArgument);
      expect(answer.message).toContain("request message could not be decompressed");
      expect(errorInfoOf(answer)).toBe("MALFORMED_COMPRESSION (request body)");
    }
  });
});

describe("lean unary path, Connect", () => {
  let server: RunningServer;
  beforeAll(async () => {
    server = await startTestServer({ readMaxBytes: 1024 });
  });
  afterAll(() => server.close());

  const post = (body: string | Uint8Array, headers: Record<string, string> = {}, signal?: AbortSignal) =>
    fetch(`${server.url}${GET_LOGS}`, { method: "POST", headers: { "content-type": "application/json", ...headers }, body, signal });

  it("answers JSON with the handler's headers, its trailers as trailer- headers", async () => {
    const res = await post(JSON.stringify({ dispatchId: "headers" }));
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toBe("application/json");
    expect(res.headers.get("x-answer")).toBe("head");
    expect(res.headers.get("trailer-x-answer-trailer")).toBe("tail");
    expect(await res.json()).toEqual({ chunks: [expect.objectContaining({ text: "headers", seq: "1" })] });
  });

  it("answers binary for application/proto", async () => {
    const res = await post(getLogs("binary"), { "content-type": "application/proto" });
    expect(res.headers.get("content-type")).toBe("application/proto");
    const message = fromBinary(GetLogsResponseSchema, new Uint8Array(await res.arrayBuffer()));
    expect(message.chunks[0]?.text).toBe("binary");
  });

  it("answers errors as Connect does: HTTP status, JSON code, message and details", async () => {
    const res = await post(JSON.stringify({ dispatchId: "missing" }));
    expect(res.status).toBe(404);
    const body = (await res.json()) as { code: string; message: string; details: { type: string }[] };
    expect(body.code).toBe("not_found");
    expect(body.message).toBe('dispatch "D1" not found');
    expect(body.details.map((d) => d.type)).toEqual(["google.rpc.ErrorInfo"]);
  });

  it("refuses JSON that is no GetLogsRequest, and an oversize body, naming the problem", async () => {
    const bad = await post("{\"dispatchId\": 7");
    expect(bad.status).toBe(400);
    const refusal = (await bad.json()) as { code: string; message: string; details: { type: string; debug: unknown }[] };
    expect(refusal.code).toBe("invalid_argument");
    expect(refusal.message).toMatch(/^\(request body\): request message could not be decoded: /);
    expect(refusal.details.find((d) => d.type === "google.rpc.ErrorInfo")?.debug).toMatchObject({ reason: "MALFORMED_MESSAGE", metadata: { field: "(request body)" } });
    const timeout = await post(JSON.stringify({ dispatchId: "x" }), { "connect-timeout-ms": "soon" });
    expect(timeout.status).toBe(400);
    const timeoutInfo = ((await timeout.json()) as typeof refusal).details.find((d) => d.type === "google.rpc.ErrorInfo")?.debug;
    expect(timeoutInfo).toMatchObject({ reason: "MALFORMED_TIMEOUT", metadata: { field: "connect-timeout-ms" } });
    const big = await post(JSON.stringify({ dispatchId: "x".repeat(2000) }));
    expect(big.status).toBe(429);
    expect(((await big.json()) as { code: string }).code).toBe("resource_exhausted");
  });

  it("refuses JSON that is not UTF-8 with INVALID_ARGUMENT and an ErrorInfo, not a U+FFFD in its place", async () => {
    for (const [name, body, headers] of [
      ["plain", invalidUtf8Json, {}],
      ["gzip", gzipSync(invalidUtf8Json), { "content-encoding": "gzip" }],
      // Valid UTF-8 bytes, but an escape for half of a surrogate pair: no text either (protobuf-es refuses it).
      ["lone surrogate escape", Buffer.from('{"dispatchId":"ab\\udcffcd"}'), {}],
    ] as const) {
      const res = await post(body, headers);
      expect(res.status, name).toBe(400);
      const refusal = (await res.json()) as { code: string; message: string; details: { type: string; debug: unknown }[] };
      expect(refusal.code, name).toBe("invalid_argument");
      expect(refusal.message, name).toMatch(/^\(request body\): request message could not be decoded: .*utf-?8/i);
      expect(refusal.details.find((d) => d.type === "google.rpc.ErrorInfo")?.debug, name).toMatchObject({ reason: "MALFORMED_MESSAGE", metadata: { field: "(request body)" } });
    }
    // Valid UTF-8 beyond ASCII, and a leading byte-order mark, are read as before.
    const valid = await post(Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(JSON.stringify({ dispatchId: "ab\u00e9\u{1f600}cd" }))]));
    expect(valid.status).toBe(200);
    expect(((await valid.json()) as { chunks: { text: string }[] }).chunks[0]?.text).toBe("ab\u00e9\u{1f600}cd");
  });

  it("refuses a connect-protocol-version other than 1 before reading the body; 1 or none is served", async () => {
    const two = await post(JSON.stringify({ dispatchId: "headers" }), { "connect-protocol-version": "2" });
    expect(two.status).toBe(400);
    const body = (await two.json()) as { code: string; message: string; details: { type: string; debug: unknown }[] };
    expect(body.code).toBe("invalid_argument");
    expect(body.details.find((d) => d.type === "google.rpc.ErrorInfo")?.debug).toMatchObject({
      reason: "UNSUPPORTED_PROTOCOL_VERSION",
      metadata: { field: "connect-protocol-version" },
    });
    for (const version of [{ "connect-protocol-version": "1" }, {}] as Record<string, string>[]) {
      expect((await post(JSON.stringify({ dispatchId: "headers" }), version)).status).toBe(200);
    }
  });

  it("gives the handler the full URL; leaves out connection headers an error carries", async () => {
    const url = await post(JSON.stringify({ dispatchId: "url" }));
    expect(((await url.json()) as { nextPageToken: string }).nextPageToken).toBe(`${server.url}${GET_LOGS}`);
    const res = await post(JSON.stringify({ dispatchId: "connection-header" }));
    expect(res.status).toBe(400);
    expect(res.headers.get("x-kept")).toBe("yes");
    expect(((await res.json()) as { code: string }).code).toBe("failed_precondition");
  });

  it("refuses a body whose content-length is over the limit before reading it (HTTP/2)", async () => {
    const answer = await answerOf(
      rawGrpc(server.url, Buffer.from("{"), { headers: { "content-type": "application/json", "content-length": "1000000" }, end: false }),
    );
    expect(answer.headers[":status"]).toBe(429);
    expect(JSON.parse(answer.body.toString())).toEqual({
      code: "resource_exhausted",
      message: "message size 1000000 is larger than configured readMaxBytes 1024",
    });
  });

  it("aborts the handler's signal at connect-timeout-ms and when the client goes away", async () => {
    const before = callAborts.length;
    const res = await post(JSON.stringify({ dispatchId: "wait" }), { "connect-timeout-ms": "50" });
    expect(((await res.json()) as { code: string }).code).toBe("deadline_exceeded");
    expect(ConnectError.from(callAborts[before]).code).toBe(Code.DeadlineExceeded);

    const gone = new AbortController();
    const call = post(JSON.stringify({ dispatchId: "wait" }), {}, gone.signal);
    await sleep(100);
    gone.abort();
    await expect(call).rejects.toThrow();
    for (let i = 0; i < 100 && callAborts.length === before + 1; i++) await sleep(10);
    expect(callAborts.length).toBe(before + 2);
  });
});
