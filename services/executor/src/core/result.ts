/**
 * The agent's result (SPEC E3): the JSON document it wrote to the result path, validated
 * against the agent's output schema with ajv. An empty schema accepts any JSON object and also
 * a missing result; a schema makes the result required. The reason of a failure names what did
 * not match (ajv's instancePath + message), so a tenant can fix the agent or the schema.
 *
 * A failure reason built from the agent's text (the JSON parser's message, the paths made of
 * the result's keys) goes through `redact`, the run's secret redactor: the reason is stored on
 * the dispatch and shown to whoever reads it, like the result itself.
 *
 * Validation runs on the executor's event loop, which also carries every run's heartbeats, so
 * it must take time linear in the result: schemas are compiled by the platform's
 * `compileJsonSchema` (patterns on RE2, `uniqueItems` in linear time), the same compiler the
 * dispatcher checks an agent's schema with when it is registered. See docs/executor.md,
 * "Output validation".
 */
import type { JsonObject } from "@bufbuild/protobuf";
import { compileJsonSchema, validateWithin } from "@outpost/platform";
import type { ValidateFunction } from "ajv";

export type ResultCheck = { ok: true; result?: JsonObject } | { ok: false; reason: string };

/** Largest result read from the workspace (it is stored on the dispatch). */
export const MAX_RESULT_BYTES = 1024 * 1024;

/**
 * Longest a result's validation may hold the executor's event loop (which carries every run's
 * heartbeats); each pattern match is bounded on its own (MAX_PATTERN_PROGRAM), so this bounds
 * their number.
 */
export const VALIDATION_BUDGET_MS = 2000;

/** Compiled schemas kept (least recently used dropped first); a schema's text is its key. */
export const MAX_CACHED_SCHEMAS = 256;

/**
 * Compiled schemas (or why one does not compile) by their text, least recently used first. Each
 * schema gets an Ajv instance of its own: one shared instance keeps every schema it compiled
 * under its `$id`, so a changed schema with the same `$id` ("result") would fail to compile
 * ("schema with key or id … already exists") until a restart.
 */
const compiled = new Map<string, ValidateFunction | string>();

function validatorFor(schemaText: string): ValidateFunction | string {
  const cached = compiled.get(schemaText);
  if (cached !== undefined) {
    compiled.delete(schemaText); // most recently used last
    compiled.set(schemaText, cached);
    return cached;
  }
  const validate = compile(schemaText);
  compiled.set(schemaText, validate);
  if (compiled.size > MAX_CACHED_SCHEMAS) compiled.delete(compiled.keys().next().value!);
  return validate;
}

function compile(schemaText: string): ValidateFunction | string {
  let schema: unknown;
  try {
    schema = JSON.parse(schemaText);
  } catch (err) {
    return `the agent's output schema is not JSON: ${err instanceof Error ? err.message : String(err)}`;
  }
  try {
    return compileJsonSchema(schema as object);
  } catch (err) {
    return `the agent's output schema is invalid: ${err instanceof Error ? err.message : String(err)}`;
  }
}

/**
 * V8's JSON.parse message quotes the input ("Unexpected token 'o', \"tok-…\" is not valid
 * JSON"), cut short for long input: a cut-off secret would escape whole-value redaction, so the
 * quote is dropped and the message keeps only what the parser says and where.
 */
function jsonErrorOf(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  return message.replace(/, ".*is not valid JSON$/s, "");
}

/** ajv's instancePath is a JSON pointer made of the result's own keys: each key is redacted (unescaped first, so `~1`/`~0` hide nothing). */
function pathOf(instancePath: string, redact: (text: string) => string): string {
  if (instancePath === "") return "(root)";
  const keys = instancePath.split("/").slice(1).map((key) => key.replaceAll("~1", "/").replaceAll("~0", "~"));
  return redact(keys.map((key) => "/" + redact(key)).join(""));
}

const noRedaction = (text: string) => text;

/**
 * Checks the raw result text (undefined when the agent wrote none) against `schemaText` ("" for
 * none). `redact` is applied to every part of a failure reason that comes from the agent.
 */
export function checkResult(raw: string | undefined, schemaText: string, redact: (text: string) => string = noRedaction): ResultCheck {
  const hasSchema = schemaText.trim() !== "";
  if (raw === undefined || raw.trim() === "") {
    return hasSchema ? { ok: false, reason: "the agent wrote no result (its output schema requires one)" } : { ok: true };
  }
  let value: unknown;
  try {
    value = JSON.parse(raw);
  } catch (err) {
    return { ok: false, reason: redact(`the result is not valid JSON: ${jsonErrorOf(err)}`) };
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    return { ok: false, reason: "the result must be a JSON object" };
  }
  // The result travels as a protobuf Struct, whose decoders stop at about 100 levels of nesting.
  if (depthOf(value, MAX_RESULT_DEPTH) > MAX_RESULT_DEPTH) {
    return { ok: false, reason: `the result nests deeper than ${MAX_RESULT_DEPTH} levels` };
  }
  if (hasSchema) {
    const validate = validatorFor(schemaText);
    if (typeof validate === "string") return { ok: false, reason: validate };
    const verdict = validateWithin(validate, value, VALIDATION_BUDGET_MS);
    if (verdict === "over budget") {
      return { ok: false, reason: `the result took longer than ${VALIDATION_BUDGET_MS / 1000} s to check against the agent's output schema (its patterns over this much text)` };
    }
    if (!verdict) {
      const problems = (validate.errors ?? []).slice(0, 5).map((e) => `${pathOf(e.instancePath, redact)} ${e.message ?? "is invalid"}`);
      return { ok: false, reason: redact(`the result does not match the output schema: ${problems.join("; ")}`) };
    }
  }
  return { ok: true, result: value as JsonObject };
}

/** How deep a result may nest (objects and arrays): well inside what protobuf decoders accept. */
export const MAX_RESULT_DEPTH = 32;

/** The nesting depth of `value`, counted no further than `limit + 1`. */
function depthOf(value: unknown, limit: number): number {
  if (typeof value !== "object" || value === null) return 0;
  if (limit < 0) return 1;
  let deepest = 0;
  for (const child of Object.values(value)) {
    deepest = Math.max(deepest, depthOf(child, limit - 1));
    if (deepest > limit) break;
  }
  return deepest + 1;
}
