/**
 * The length-prefixed framing gRPC and Connect streams share (one flags byte, the message length
 * as 4 bytes big-endian, the message), for code that reads or writes it without connect's
 * machinery: the platform's lean unary path and the gateway's raw path.
 */

/** Bytes an envelope holds besides its message. */
export const ENVELOPE_HEADER_BYTES = 5;

/** One message framed with `flags`. */
export function envelope(flags: number, message: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(ENVELOPE_HEADER_BYTES + message.byteLength);
  out[0] = flags;
  out.writeUInt32BE(message.byteLength, 1);
  out.set(message, ENVELOPE_HEADER_BYTES);
  return out;
}

/**
 * The single message of a request body that must hold exactly one: its flags and bytes, or a
 * description of what is wrong with the framing.
 */
export function singleMessage(body: Buffer): { flags: number; message: Buffer } | { problem: string } {
  if (body.length < ENVELOPE_HEADER_BYTES) return { problem: `the request holds no complete message (${body.length} bytes)` };
  const length = body.readUInt32BE(1);
  const sent = body.length - ENVELOPE_HEADER_BYTES;
  if (length !== sent) return { problem: `the request holds exactly one message (${length} bytes promised, ${sent} sent)` };
  return { flags: body[0]!, message: body.subarray(ENVELOPE_HEADER_BYTES) };
}
