/**
 * Connect's streaming envelope for tests that speak the wire directly: a flags byte (2 marks the
 * end-of-stream message), the message length as 4 bytes big-endian, the message.
 */

/** One envelope; `promised` lets a test declare a length the message does not have. */
export function envelope(flags: number, message: Uint8Array | string, promised?: number): Buffer {
  const bytes = typeof message === "string" ? Buffer.from(message) : message;
  const out = Buffer.alloc(5 + bytes.length);
  out[0] = flags;
  out.writeUInt32BE(promised ?? bytes.length, 1);
  out.set(bytes, 5);
  return out;
}

/** The envelopes of a stream body, in order; a truncated last one is left out. */
export function envelopesOf(bytes: Buffer): { flags: number; message: Buffer }[] {
  const out: { flags: number; message: Buffer }[] = [];
  for (let at = 0; at + 5 <= bytes.length; at += 5 + bytes.readUInt32BE(at + 1)) {
    const end = at + 5 + bytes.readUInt32BE(at + 1);
    if (end > bytes.length) break;
    out.push({ flags: bytes[at]!, message: bytes.subarray(at + 5, end) });
  }
  return out;
}
