/**
 * Decodes the Docker Engine's multiplexed attach stream (containers without a TTY): frames of
 * an 8-byte header (stream type, 3 zero bytes, big-endian payload size) and the payload.
 * Decoding in one place keeps stdout and stderr in the order the engine sent them and lets
 * backpressure reach the socket (the consumer pulls).
 */
import type { OutputFrame } from "../core/ports.ts";

const HEADER_BYTES = 8;

export async function* demuxDockerStream(source: AsyncIterable<Buffer | string>): AsyncGenerator<OutputFrame> {
  let buffered = Buffer.alloc(0);
  for await (const piece of source) {
    buffered = buffered.length === 0 ? Buffer.from(piece) : Buffer.concat([buffered, Buffer.from(piece)]);
    while (buffered.length >= HEADER_BYTES) {
      const size = buffered.readUInt32BE(4);
      if (buffered.length < HEADER_BYTES + size) break;
      const type = buffered[0];
      const data = buffered.subarray(HEADER_BYTES, HEADER_BYTES + size);
      buffered = buffered.subarray(HEADER_BYTES + size);
      // 0 is stdin (echoed only with a TTY); 1 stdout; 2 stderr.
      if (size > 0 && (type === 1 || type === 2)) yield { stream: type === 2 ? "stderr" : "stdout", data: Buffer.from(data) };
    }
  }
}
