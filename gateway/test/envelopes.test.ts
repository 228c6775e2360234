import { describe, expect, it } from "vitest";
import { envelope } from "@outpost/platform";
import { EnvelopeScanner } from "../src/http/envelopes.ts";

/** A small seeded generator, so a failure can be replayed. */
function prng(seed: number) {
  return (n: number) => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed % n;
  };
}

/** Splits `bytes` at random points (empty chunks included). */
function chunked(bytes: Buffer, random: (n: number) => number): Buffer[] {
  const chunks: Buffer[] = [];
  for (let i = 0; i < bytes.length; ) {
    const size = random(4) === 0 ? random(3) : 1 + random(40);
    chunks.push(bytes.subarray(i, i + size));
    i += size;
  }
  return chunks;
}

describe("EnvelopeScanner", () => {
  it("passes data messages through and separates a Connect end message, however the bytes are split", () => {
    const random = prng(42);
    for (let round = 0; round < 500; round++) {
      const messages = Array.from({ length: random(6) }, () => envelope(0, Buffer.alloc(random(60), 7)));
      const data = Buffer.concat(messages);
      const end = envelope(2, Buffer.from(JSON.stringify({ error: { code: "internal" } })));
      const boundaries = new Set<number>([0]);
      messages.reduce((at, m) => (boundaries.add(at + m.length), at + m.length), 0);
      const scanner = new EnvelopeScanner({ endStreamFlag: true });
      const passed: Buffer[] = [];
      const ended: Buffer[] = [];
      let passedBytes = 0;
      for (const chunk of chunked(Buffer.concat([data, end]), random)) {
        const scanned = scanner.scan(chunk);
        passed.push(scanned.pass);
        passedBytes += scanned.pass.length;
        if (scanned.endStream) ended.push(scanned.endStream);
        expect(scanner.atBoundary).toBe(boundaries.has(passedBytes));
      }
      expect(Buffer.concat(passed).equals(data)).toBe(true);
      expect(Buffer.concat(ended).equals(end)).toBe(true);
      expect(scanner.midMessage).toBe(false);
    }
  });

  it("treats flag 2 as an ordinary message for gRPC, and knows when the bytes stop inside a message", () => {
    const bytes = Buffer.concat([envelope(2, Buffer.from("reserved")), envelope(1, Buffer.from("compressed"))]);
    const grpc = new EnvelopeScanner({ endStreamFlag: false });
    const passed = Buffer.concat(chunked(bytes, prng(7)).map((c) => grpc.scan(c).pass));
    expect(passed.equals(bytes)).toBe(true);
    expect(grpc.midMessage).toBe(false);

    const cutInBody = new EnvelopeScanner({ endStreamFlag: false });
    cutInBody.scan(bytes.subarray(0, 8));
    expect([cutInBody.midMessage, cutInBody.atBoundary]).toEqual([true, false]);
    const cutInHeader = new EnvelopeScanner({ endStreamFlag: false });
    expect(cutInHeader.scan(bytes.subarray(0, 3)).pass.length).toBe(0); // a partial header is held back
    expect([cutInHeader.midMessage, cutInHeader.atBoundary]).toEqual([true, true]);
  });
});
