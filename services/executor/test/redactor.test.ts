import { describe, expect, it } from "vitest";
import { LineSplitter, MAX_LINE_CHARS } from "../src/core/line-splitter.ts";
import { Redactor } from "../src/core/redactor.ts";

function splitterFor(redactor: Redactor) {
  return new LineSplitter({ transform: (t) => redactor.redact(t), holdBack: redactor.maxValueLength - 1 });
}

describe("Redactor", () => {
  it("replaces every occurrence of each value with its name", () => {
    const r = new Redactor({ API_KEY: "sk-12345", DB_PASSWORD: "hunter22" });
    expect(r.redact("key=sk-12345 pw=hunter22 again sk-12345")).toBe(
      "key=[REDACTED:API_KEY] pw=[REDACTED:DB_PASSWORD] again [REDACTED:API_KEY]",
    );
    expect(r.redact("nothing secret here")).toBe("nothing secret here");
  });

  it("leaves values shorter than 4 characters alone", () => {
    const r = new Redactor({ PIN: "123", TOKEN: "abcd" });
    expect(r.empty).toBe(false);
    expect(r.redact("123 abcd")).toBe("123 [REDACTED:TOKEN]");
    expect(new Redactor({ PIN: "123" }).empty).toBe(true);
  });

  it("merges overlapping values so no part of either leaks", () => {
    const r = new Redactor({ A: "abcdef", B: "defghi" });
    expect(r.redact("xxabcdefghiyy")).toBe("xx[REDACTED:A][REDACTED:B]yy");
    // One value inside another: the longer span wins, naming both.
    const nested = new Redactor({ OUTER: "password123", INNER: "word" });
    expect(nested.redact("[password123]")).toBe("[[REDACTED:OUTER][REDACTED:INNER]]");
    expect(nested.redact("a word")).toBe("a [REDACTED:INNER]");
  });

  it("redacts each line of a multi-line value", () => {
    const r = new Redactor({ CERT: "-----BEGIN-----\nMIIBsecretbody\n-----END-----" });
    expect(r.redact("MIIBsecretbody")).toBe("[REDACTED:CERT]");
  });

  it("catches values split across reads (through the line splitter)", () => {
    const r = new Redactor({ TOKEN: "s3cr3t-value" });
    const splitter = splitterFor(r);
    const out = [...splitter.push("token: s3c"), ...splitter.push("r3t-va"), ...splitter.push("lue done\n")];
    expect(out).toEqual(["token: [REDACTED:TOKEN] done"]);
    // Split inside a multi-byte character and a value at once.
    const bytes = Buffer.from("é s3cr3t-value\n");
    const s2 = splitterFor(r);
    expect([...s2.push(bytes.subarray(0, 1)), ...s2.push(bytes.subarray(1, 6)), ...s2.push(bytes.subarray(6))]).toEqual([
      "é [REDACTED:TOKEN]",
    ]);
  });

  it("never emits part of a value when a long unterminated line is cut", () => {
    const secret = "ZZZZ-secret-ZZZZ";
    const r = new Redactor({ S: secret });
    const splitter = splitterFor(r);
    // The value straddles the first cut point of an unterminated line.
    const before = "a".repeat(MAX_LINE_CHARS - 5);
    const pieces = [...splitter.push(before + secret.slice(0, 8)), ...splitter.push(secret.slice(8) + "b".repeat(MAX_LINE_CHARS)), ...splitter.flush()];
    const joined = pieces.join("");
    expect(joined).not.toContain("secret");
    expect(joined).toContain("[REDACTED:S]");
    expect(pieces.every((p) => p.length <= MAX_LINE_CHARS)).toBe(true);
  });
});
