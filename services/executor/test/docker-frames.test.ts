import { describe, expect, it } from "vitest";
import { demuxDockerStream } from "../src/adapters/docker-frames.ts";

function frame(type: number, text: string): Buffer {
  const payload = Buffer.from(text);
  const header = Buffer.alloc(8);
  header[0] = type;
  header.writeUInt32BE(payload.length, 4);
  return Buffer.concat([header, payload]);
}

async function collect(pieces: Buffer[]) {
  const out: { stream: string; text: string }[] = [];
  for await (const f of demuxDockerStream((async function* () { yield* pieces; })())) {
    out.push({ stream: f.stream, text: f.data.toString() });
  }
  return out;
}

describe("demuxDockerStream", () => {
  it("decodes frames in order, across arbitrary read boundaries", async () => {
    const all = Buffer.concat([frame(1, "out 1\n"), frame(2, "err 1\n"), frame(1, "out 2\n")]);
    const expected = [
      { stream: "stdout", text: "out 1\n" },
      { stream: "stderr", text: "err 1\n" },
      { stream: "stdout", text: "out 2\n" },
    ];
    expect(await collect([all])).toEqual(expected);
    // one byte at a time: headers and payloads split everywhere
    expect(await collect([...all].map((b) => Buffer.from([b])))).toEqual(expected);
  });

  it("skips empty frames and stdin frames", async () => {
    expect(await collect([frame(1, ""), frame(0, "in"), frame(2, "e")])).toEqual([{ stream: "stderr", text: "e" }]);
  });
});
