import { describe, expect, it } from "vitest";
import { checkResult, MAX_RESULT_DEPTH } from "../src/core/result.ts";

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
});

