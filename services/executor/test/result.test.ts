import { Ajv } from "ajv";
import { describe, expect, it, vi } from "vitest";
import { checkResult, MAX_CACHED_SCHEMAS, MAX_RESULT_DEPTH } from "../src/core/result.ts";

const schema = JSON.stringify({
  type: "object",
  required: ["summary", "files_changed"],
  properties: { summary: { type: "string" }, files_changed: { type: "integer", minimum: 0 }, url: { type: "string", format: "uri" } },
});

describe("checkResult", () => {
  it("accepts a result that matches the schema and returns it", () => {
    expect(checkResult('{"summary":"ok","files_changed":2}', schema)).toEqual({ ok: true, result: { summary: "ok", files_changed: 2 } });
  });

  it("fails naming each mismatch with its path", () => {
    const check = checkResult('{"summary":3,"url":"not a uri"}', schema);
    expect(check.ok).toBe(false);
    if (check.ok) return;
    expect(check.reason).toContain("the result does not match the output schema");
    expect(check.reason).toContain("(root) must have required property 'files_changed'");
    expect(check.reason).toContain("/summary must be string");
    expect(check.reason).toContain('/url must match format "uri"');
  });

  it("requires a result when there is a schema, and not without one", () => {
    expect(checkResult(undefined, schema)).toEqual({ ok: false, reason: "the agent wrote no result (its output schema requires one)" });
    expect(checkResult(undefined, "")).toEqual({ ok: true });
    expect(checkResult('{"anything":[1,2]}', "")).toEqual({ ok: true, result: { anything: [1, 2] } });
  });

  it("fails a result that nests deeper than a protobuf Struct can carry, without deep recursion", () => {
    const nested = (levels: number) => `${'{"a":'.repeat(levels)}1${"}".repeat(levels)}`;
    expect(checkResult(nested(MAX_RESULT_DEPTH), "")).toMatchObject({ ok: true });
    expect(checkResult(nested(MAX_RESULT_DEPTH + 1), "")).toEqual({ ok: false, reason: `the result nests deeper than ${MAX_RESULT_DEPTH} levels` });
    expect(checkResult(`{"a":${"[".repeat(5000)}${"]".repeat(5000)}}`, "")).toEqual({ ok: false, reason: `the result nests deeper than ${MAX_RESULT_DEPTH} levels` });
  });

  it("fails results that are not JSON objects, and bad schemas", () => {
    expect(checkResult("{not json", "")).toMatchObject({ ok: false, reason: expect.stringContaining("the result is not valid JSON") });
    expect(checkResult("[1,2]", "")).toEqual({ ok: false, reason: "the result must be a JSON object" });
    expect(checkResult("{}", "{oops")).toMatchObject({ ok: false, reason: expect.stringContaining("output schema is not JSON") });
    expect(checkResult("{}", '{"type":"nonsense"}')).toMatchObject({ ok: false, reason: expect.stringContaining("output schema is invalid") });
  });

  it("puts agent text in a failure reason only through the redactor, and never V8's quote of the input", () => {
    const secret = "tok-very-secret-4242";
    const redact = (text: string) => text.replaceAll(secret, "[REDACTED:T]");
    // JSON.parse quotes the input, cut short when long: a cut-off value escapes whole-value redaction.
    for (const raw of [secret, `{"a":${secret}-and-more-and-more-and-more}`]) {
      const check = checkResult(raw, "", redact);
      expect(check).toMatchObject({ ok: false, reason: expect.stringContaining("the result is not valid JSON") });
      if (!check.ok) expect(check.reason).not.toContain("tok-very");
    }
    // ajv's paths are built from the result's keys; a JSON pointer escapes "/" as "~1".
    const strict = JSON.stringify({ type: "object", additionalProperties: { type: "string" } });
    const slashed = "tok/very/secret";
    const check = checkResult(JSON.stringify({ [secret]: 1, [slashed]: 2 }), strict, (text) => redact(text).replaceAll(slashed, "[REDACTED:S]"));
    expect(check).toEqual({ ok: false, reason: "the result does not match the output schema: /[REDACTED:T] must be string; /[REDACTED:S] must be string" });
  });

  it("compiles two different schemas with the same $id (an agent's schema edited in place) each with its own rules", () => {
    const before = JSON.stringify({ $id: "result", type: "object", required: ["summary"] });
    const after = JSON.stringify({ $id: "result", type: "object", required: ["findings"], properties: { findings: { type: "array" } } });
    expect(checkResult('{"summary":"ok"}', before)).toMatchObject({ ok: true });
    expect(checkResult('{"summary":"ok"}', after)).toEqual({
      ok: false,
      reason: "the result does not match the output schema: (root) must have required property 'findings'",
    });
    expect(checkResult('{"findings":[]}', after)).toMatchObject({ ok: true });
    expect(checkResult('{"findings":[]}', before)).toMatchObject({ ok: false });
  });

  it("reuses a compiled schema across runs, keeping the most recently used ones", () => {
    const compile = vi.spyOn(Ajv.prototype, "compile");
    try {
      const schemaOf = (n: number) => JSON.stringify({ type: "object", description: `cache test ${n}`, required: ["a"] });
      expect(checkResult('{"a":1}', schemaOf(0))).toMatchObject({ ok: true });
      expect(checkResult('{"b":1}', schemaOf(0))).toMatchObject({ ok: false });
      expect(compile).toHaveBeenCalledTimes(1);
      // Others fill the cache; schema 0, used in between, stays; schema 1, not used, is dropped.
      checkResult("{}", schemaOf(1));
      for (let n = 2; n < MAX_CACHED_SCHEMAS + 1; n++) {
        checkResult("{}", schemaOf(n));
        if (n === MAX_CACHED_SCHEMAS / 2) checkResult("{}", schemaOf(0));
      }
      expect(compile).toHaveBeenCalledTimes(MAX_CACHED_SCHEMAS + 1);
      checkResult("{}", schemaOf(0));
      expect(compile).toHaveBeenCalledTimes(MAX_CACHED_SCHEMAS + 1);
      checkResult("{}", schemaOf(1));
      expect(compile).toHaveBeenCalledTimes(MAX_CACHED_SCHEMAS + 2);
    } finally {
      compile.mockRestore();
    }
  });

  it("matches a pathological pattern in linear time (^(a|a)*$ on 28 a's and '!' took V8 13 s)", () => {
    const schema = JSON.stringify({ type: "object", properties: { name: { type: "string", pattern: "^(a|a)*$" } } });
    const started = performance.now();
    expect(checkResult(JSON.stringify({ name: "a".repeat(28) + "!" }), schema)).toEqual({
      ok: false,
      reason: 'the result does not match the output schema: /name must match pattern "^(a|a)*$"',
    });
    expect(performance.now() - started).toBeLessThan(1000);
    // Checked only once the short one was quick: a backtracking engine would never end this one.
    expect(checkResult(JSON.stringify({ name: "a".repeat(10_000) + "!" }), schema)).toMatchObject({ ok: false });
    expect(checkResult(JSON.stringify({ name: "a".repeat(28) }), schema)).toMatchObject({ ok: true });
    expect(performance.now() - started).toBeLessThan(1000);
  });

  it("runs patternProperties on RE2 as well: a pathological key pattern over a long key is linear", () => {
    const schema = JSON.stringify({ type: "object", patternProperties: { "^(a+)+$": { type: "number" } } });
    const started = performance.now();
    // The key does not match, so the value is not checked; a backtracking engine would never answer.
    expect(checkResult(JSON.stringify({ ["a".repeat(50_000) + "!"]: "not a number" }), schema)).toMatchObject({ ok: true });
    expect(checkResult(JSON.stringify({ ["a".repeat(50_000)]: "not a number" }), schema)).toMatchObject({ ok: false });
    expect(performance.now() - started).toBeLessThan(1000);
  });

  it("keeps ECMA-262 pattern semantics RE2 shares, and refuses lookaround and backreferences with a reason naming the pattern", () => {
    const check = (pattern: string, text: string, where: "pattern" | "patternProperties" = "pattern") =>
      checkResult(
        JSON.stringify(where === "pattern" ? { s: text } : { [text]: 1 }),
        JSON.stringify(
          where === "pattern"
            ? { type: "object", properties: { s: { type: "string", pattern } } }
            : { type: "object", patternProperties: { [pattern]: { type: "string" } } },
        ),
      ).ok;
    expect(check("^[\\u0041-\\u005A]+$", "ABC")).toBe(true);
    expect(check("^[\\u0041-\\u005A]+$", "abc")).toBe(false);
    expect(check("^\\uD83D\\uDE00$", "\u{1F600}")).toBe(true);
    expect(check("^\\u{1F600}$", "\u{1F600}")).toBe(true);
    expect(check("^\\\\u0041$", "\\u0041")).toBe(true); // an escaped backslash, then "u0041"
    expect(check("\\d{3}-\\p{L}+$", "id 123-été")).toBe(true); // unanchored start, as in ECMA-262
    expect(check("^x", "xy", "patternProperties")).toBe(false); // the value must be a string
    expect(check("^x", "yx", "patternProperties")).toBe(true);
    // Two patterns of one schema are kept apart.
    const two = JSON.stringify({ type: "object", properties: { a: { pattern: "^a$" }, b: { pattern: "^b$" } } });
    expect(checkResult('{"a":"a","b":"b"}', two)).toMatchObject({ ok: true });
    expect(checkResult('{"a":"b","b":"a"}', two)).toMatchObject({ ok: false });
    for (const pattern of ["^(?=.*[A-Z])", "^(a)\\1$"]) {
      expect(checkResult("{}", JSON.stringify({ properties: { s: { pattern } } }))).toEqual({
        ok: false,
        reason: expect.stringContaining(`the agent's output schema is invalid: pattern ${JSON.stringify(pattern)} is not supported`),
      });
    }
  });

  it("checks uniqueItems in linear time with ajv's semantics (deep equality of JSON values, key order aside)", () => {
    const schema = JSON.stringify({ type: "object", properties: { a: { type: "array", uniqueItems: true } } });
    expect(checkResult('{"a":[{"x":1,"y":[2]},[1],{"y":[2],"x":1}]}', schema)).toEqual({
      ok: false,
      reason: "the result does not match the output schema: /a must NOT have duplicate items (items ## 0 and 2 are identical)",
    });
    expect(checkResult('{"a":[1,"1",[1],{"1":1},null,"null",true,"true",1.5]}', schema)).toMatchObject({ ok: true });
    expect(checkResult('{"a":[1,1.0]}', schema)).toMatchObject({ ok: false });
    expect(checkResult('{"a":[1,2]}', JSON.stringify({ properties: { a: { uniqueItems: false } } }))).toMatchObject({ ok: true });
    // 30,000 distinct items: ajv's pairwise comparison took 6 s (150,000, a 1 MiB result, minutes).
    const many = JSON.stringify({ a: Array.from({ length: 30_000 }, (_, i) => [i]) });
    const started = performance.now();
    expect(checkResult(many, schema)).toMatchObject({ ok: true });
    expect(performance.now() - started).toBeLessThan(1000);
  });
});
