/**
 * JSON Schema compilation shared by the dispatcher (an agent's output schema is checked when it
 * is registered) and the executor (a run's result is validated against it), so a schema one
 * accepts the other can run.
 *
 * Validation must take time linear in the document whatever the schema: `pattern`s (and
 * `patternProperties`) run on RE2 (re2js: linear time, no backtracking) instead of V8's
 * backtracking RegExp, and `uniqueItems` compares canonical encodings in a Map instead of ajv's
 * pairwise deep-equal (quadratic in the array's length). Each schema gets an Ajv instance of its
 * own: a shared one keeps every schema it compiled under its `$id`, so a changed schema with the
 * same `$id` would fail to compile ("schema with key or id … already exists").
 */
import { _, Ajv, str, type KeywordCxt, type KeywordDefinition, type Options, type ValidateFunction } from "ajv";
import addFormatsModule from "ajv-formats";
import { RE2JS } from "re2js";

// ajv-formats is CommonJS: at run time its default export is the plugin function, but its
// typings describe a module namespace, hence the cast.
const addFormats = addFormatsModule as unknown as (ajv: Ajv) => Ajv;

/** ajv does not export its RegExpEngine type from the package root. */
type RegExpEngine = NonNullable<NonNullable<Options["code"]>["regExp"]>;

/** Compiles a JSON Schema (all errors reported, formats known); throws with ajv's reason when it is invalid. */
export function compileJsonSchema(schema: object): ValidateFunction {
  return newAjv().compile(schema);
}

function newAjv(): Ajv {
  const ajv = addFormats(new Ajv({ allErrors: true, strict: false, code: { regExp: linearRegExp } }));
  ajv.removeKeyword("uniqueItems");
  ajv.addKeyword(linearUniqueItems);
  return ajv;
}

/**
 * ajv's regular expression engine for `pattern`/`patternProperties`: RE2 (re2js), linear in the
 * input whatever the pattern (`^(a|a)*$` on "aaaa…!" takes microseconds, not seconds). JSON
 * Schema patterns are ECMA-262; RE2 has no lookaround and no backreference, so a schema using
 * them fails to compile with a reason naming the pattern. `\uXXXX` and `\u{X}` escapes are
 * translated to RE2's `\x{X}`.
 */
const linearRegExp: RegExpEngine = Object.assign(
  (pattern: string): { test: (text: string) => boolean; toString: () => string } => {
    let re: ReturnType<typeof RE2JS.compile>;
    try {
      re = RE2JS.compile(re2Syntax(pattern));
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      throw new Error(`pattern ${JSON.stringify(pattern)} is not supported (patterns run on RE2, in linear time: no lookaround, no backreference): ${message}`, {
        cause: err,
      });
    }
    // ajv shares compiled patterns within a schema by this string.
    return { test: (text) => re.test(text), toString: () => `/${pattern}/u` };
  },
  { code: "re2js" },
);

const SURROGATE_PAIR_ESCAPE = /u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})/iy;
const CODE_UNIT_ESCAPE = /u([0-9a-f]{4})|u\{([0-9a-f]{1,6})\}/iy;

/** ECMA-262 `\uXXXX` (a surrogate pair as one code point) and `\u{X}` escapes as RE2's `\x{X}`. */
function re2Syntax(pattern: string): string {
  let out = "";
  for (let at = 0; at < pattern.length; at++) {
    const char = pattern[at]!;
    if (char !== "\\") {
      out += char;
      continue;
    }
    SURROGATE_PAIR_ESCAPE.lastIndex = CODE_UNIT_ESCAPE.lastIndex = at + 1;
    const pair = SURROGATE_PAIR_ESCAPE.exec(pattern);
    const single = pair ? null : CODE_UNIT_ESCAPE.exec(pattern);
    if (pair) {
      const codePoint = 0x10000 + ((parseInt(pair[1]!, 16) - 0xd800) << 10) + (parseInt(pair[2]!, 16) - 0xdc00);
      out += `\\x{${codePoint.toString(16)}}`;
      at += pair[0].length;
    } else if (single) {
      out += `\\x{${single[1] ?? single[2]}}`;
      at += single[0].length;
    } else {
      out += char + (pattern[at + 1] ?? ""); // any other escape is kept as it is
      at++;
    }
  }
  return out;
}

/**
 * `uniqueItems` in time linear in the array: ajv compares every pair of items with a deep
 * equality unless the schema types them as scalars (150,000 distinct `[n]` items, a 1 MiB
 * result, took minutes). Items are JSON values (the result is parsed JSON), so two are equal
 * exactly when their encodings with sorted keys are; the error is ajv's own.
 */
const linearUniqueItems: KeywordDefinition = {
  keyword: "uniqueItems",
  type: "array",
  schemaType: "boolean",
  error: {
    message: ({ params: { i, j } }) => str`must NOT have duplicate items (items ## ${j} and ${i} are identical)`,
    params: ({ params: { i, j } }) => _`{i: ${i}, j: ${j}}`,
  },
  code(cxt: KeywordCxt) {
    if (cxt.schema !== true) return;
    const { gen, data } = cxt;
    const find = gen.scopeValue("func", { ref: firstDuplicate });
    const pair = gen.const("pair", _`${find}(${data})`);
    cxt.setParams({ i: _`${pair}[1]`, j: _`${pair}[0]` });
    cxt.fail(_`${pair} !== undefined`);
  },
};

/** The first two items that are equal JSON values, as [earlier, later] indexes; undefined when none. */
function firstDuplicate(items: unknown[]): [number, number] | undefined {
  const seen = new Map<string, number>();
  for (let i = 0; i < items.length; i++) {
    const key = canonicalJson(items[i]);
    const earlier = seen.get(key);
    if (earlier !== undefined) return [earlier, i];
    seen.set(key, i);
  }
  return undefined;
}

function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  if (typeof value === "object" && value !== null) {
    const object = value as Record<string, unknown>;
    return `{${Object.keys(object)
      .sort()
      .map((key) => `${JSON.stringify(key)}:${canonicalJson(object[key])}`)
      .join(",")}}`;
  }
  return JSON.stringify(value);
}
