import { envelope, singleMessage } from "@outpost/platform";
import { describe, expect, it } from "vitest";

describe("singleMessage", () => {
  it("takes exactly one message and says what is wrong otherwise", () => {
    expect(singleMessage(envelope(1, Buffer.from("hi")))).toEqual({ flags: 1, message: Buffer.from("hi") });
    expect(singleMessage(envelope(0, Buffer.alloc(0)))).toEqual({ flags: 0, message: Buffer.alloc(0) });
    expect(singleMessage(Buffer.from([0, 0, 0]))).toEqual({ problem: "the request holds no complete message (3 bytes)" });
    expect(singleMessage(Buffer.concat([envelope(0, Buffer.from("a")), envelope(0, Buffer.from("b"))]))).toEqual({
      problem: "the request holds exactly one message (1 bytes promised, 7 sent)",
    });
  });
});
