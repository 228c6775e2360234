/**
 * Follows the length-prefixed messages of a streamed answer as its bytes pass through the raw
 * path (gRPC and Connect frame them alike: one flags byte, a 4-byte big-endian length, the
 * message), without copying message bodies. The relay needs three things from it: where a
 * Connect end-of-stream message begins (it carries the status, which may have to be masked);
 * whether the bytes passed so far end on a message boundary (a gateway that stops a stream
 * there can end it with a status; one cut inside a message can only be broken off); and whether
 * the upstream's bytes stopped inside a message (a broken answer, not a complete one).
 */

/** Connect's end-of-stream flag (gRPC never sets it). */
const END_STREAM_FLAG = 0x02;

export interface Scanned {
  /** Bytes to pass on now: whole messages and the parts of a body seen so far. */
  pass: Buffer;
  /** The end-of-stream message's bytes, once it began (the caller collects them until the end). */
  endStream?: Buffer;
}

export class EnvelopeScanner {
  /** Whether flag 0x02 marks an end-of-stream message (Connect); gRPC reserves it. */
  readonly #endStreamFlag: boolean;
  /** Bytes of the current message's body not seen yet. */
  #bodyLeft = 0;
  /** A header split across chunks, held (not passed on) until it is whole. */
  #held: Buffer | undefined;
  #inEndStream = false;

  constructor(options: { endStreamFlag: boolean }) {
    this.#endStreamFlag = options.endStreamFlag;
  }

  /** True when everything passed on so far ends on a message boundary (held bytes were not passed). */
  get atBoundary(): boolean {
    return this.#bodyLeft === 0;
  }

  /** True when the bytes scanned so far stop inside a message (its header or its body). */
  get midMessage(): boolean {
    return this.#bodyLeft > 0 || this.#held !== undefined;
  }

  scan(chunk: Buffer): Scanned {
    if (this.#inEndStream) return { pass: EMPTY, endStream: chunk };
    const buf = this.#held ? Buffer.concat([this.#held, chunk]) : chunk;
    this.#held = undefined;
    let i = 0;
    while (i < buf.length) {
      if (this.#bodyLeft > 0) {
        const n = Math.min(this.#bodyLeft, buf.length - i);
        i += n;
        this.#bodyLeft -= n;
        continue;
      }
      if (buf.length - i < 5) {
        this.#held = buf.subarray(i);
        return { pass: buf.subarray(0, i) };
      }
      if (this.#endStreamFlag && (buf[i]! & END_STREAM_FLAG) !== 0) {
        this.#inEndStream = true;
        return { pass: buf.subarray(0, i), endStream: buf.subarray(i) };
      }
      this.#bodyLeft = buf.readUInt32BE(i + 1);
      i += 5;
    }
    return { pass: buf };
  }
}

const EMPTY = Buffer.alloc(0);
