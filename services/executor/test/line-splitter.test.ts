import { describe, expect, it } from "vitest";
import { LineSplitter, MAX_LINE_CHARS } from "../src/core/line-splitter.ts";

describe("LineSplitter", () => {
  it("splits lines and carries a partial line to the next read", () => {
    const s = new LineSplitter();
    expect(s.push(Buffer.from("one\ntw"))).toEqual(["one"]);
    expect(s.push(Buffer.from("o\nthree\n"))).toEqual(["two", "three"]);
    expect(s.flush()).toEqual([]);
  });

  it("flushes an unterminated tail when the stream ends", () => {
    const s = new LineSplitter();
    expect(s.push(Buffer.from("a\nno newline"))).toEqual(["a"]);
    expect(s.flush()).toEqual(["no newline"]);
    expect(s.flush()).toEqual([]);
  });

  it("keeps empty lines and strips CRLF endings", () => {
    const s = new LineSplitter();
    expect(s.push(Buffer.from("x\r\n\r\n\ny\n"))).toEqual(["x", "", "", "y"]);
  });

  it("does not break a UTF-8 character split across reads", () => {
    const s = new LineSplitter();
    const bytes = Buffer.from("héllo ✓\n");
    const cut = bytes.indexOf(0xe2) + 1; // inside the check mark
    expect(s.push(bytes.subarray(0, 2))).toEqual([]);
    expect(s.push(bytes.subarray(2, cut))).toEqual([]);
    expect(s.push(bytes.subarray(cut))).toEqual(["héllo ✓"]);
  });

  it("cuts lines longer than the chunk limit, also when no newline ever comes", () => {
    const s = new LineSplitter();
    const long = "x".repeat(MAX_LINE_CHARS * 2 + 10);
    expect(s.push(long).map((l) => l.length)).toEqual([MAX_LINE_CHARS, MAX_LINE_CHARS]);
    expect(s.push("\n")).toEqual(["x".repeat(10)]);
    const unterminated = "y".repeat(MAX_LINE_CHARS * 3);
    const pieces = [...s.push(unterminated), ...s.flush()];
    expect(pieces.join("")).toBe(unterminated);
    expect(pieces.every((p) => p.length <= MAX_LINE_CHARS)).toBe(true);
  });
});
