import { describe, expect, it } from "vitest";
import { checkResult } from "../src/core/result.ts";

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

  it("fails results that are not JSON objects, and bad schemas", () => {
    expect(checkResult("{not json", "")).toMatchObject({ ok: false, reason: expect.stringContaining("the result is not valid JSON") });
    expect(checkResult("[1,2]", "")).toEqual({ ok: false, reason: "the result must be a JSON object" });
    expect(checkResult("{}", "{oops")).toMatchObject({ ok: false, reason: expect.stringContaining("output schema is not JSON") });
    expect(checkResult("{}", '{"type":"nonsense"}')).toMatchObject({ ok: false, reason: expect.stringContaining("output schema is invalid") });
  });
});
