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

/**
 * The largest RE2 program a pattern may compile to. Up to about this size re2js matches a
 * megabyte in tens of milliseconds whatever the input; beyond it, its cost per character grows
 * with the program (`(a|aa){1000}[!#]`, 6,000 instructions, took 143 s on a 1 MB string). A
 * bounded repeat is what makes programs big (`{1,64}` is 64 copies): `[a-z0-9-]{1,64}` is 131.
 */
export const MAX_PATTERN_PROGRAM = 1000;

/** Thrown out of a validation that ran past its time budget (validateWithin). */
export class ValidationBudgetError extends Error {}

/** When the validation running now must end (performance.now()); checked at every pattern match. */
let budgetEnd: number | undefined;

/**
 * Validates `data`, giving up once `budgetMs` has passed: patterns check the clock before each
 * match, so a schema with many patterns over a large document cannot hold the event loop for
 * long (each match itself is bounded by MAX_PATTERN_PROGRAM). Answers ajv's verdict, or
 * "over budget".
 */
export function validateWithin(validate: ValidateFunction, data: unknown, budgetMs: number): boolean | "over budget" {
  budgetEnd = performance.now() + budgetMs;
  try {
    return validate(data) as boolean;
  } catch (err) {
    if (err instanceof ValidationBudgetError) return "over budget";
    throw err;
  } finally {
    budgetEnd = undefined;
  }
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
 * Schema patterns are ECMA-262 (checked first with V8's own parser in unicode mode, so syntax
 * only RE2 knows, such as `(?i)` or `\z`, is refused as ajv would); RE2 has no lookaround and
 * no backreference, so a schema using them fails to compile with a reason naming the pattern.
 * Where the two differ in meaning, the pattern is rewritten to ECMA's (re2Syntax).
 */
const linearRegExp: RegExpEngine = Object.assign(
  (pattern: string): { test: (text: string) => boolean; toString: () => string } => {
    try {
      new RegExp(pattern, "u"); // ECMA-262 syntax check only; never matched
    } catch (err) {
      throw new Error(`pattern ${JSON.stringify(pattern)} is not a valid ECMA-262 regular expression: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
    }
    let re: ReturnType<typeof RE2JS.compile>;
    try {
      re = RE2JS.compile(re2Syntax(pattern));
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      throw new Error(`pattern ${JSON.stringify(pattern)} is not supported (patterns run on RE2, in linear time: no lookaround, no backreference): ${message}`, {
        cause: err,
      });
    }
    const size = re.programSize();
    if (size > MAX_PATTERN_PROGRAM) {
      throw new Error(`pattern ${JSON.stringify(pattern)} is too complex to match in bounded time (${size} RE2 instructions, at most ${MAX_PATTERN_PROGRAM}; large bounded repeats such as {1,500} are what make it big)`);
    }
    const test = (text: string) => {
      if (budgetEnd !== undefined && performance.now() > budgetEnd) throw new ValidationBudgetError("validation ran past its time budget");
      return re.test(text);
    };
    // ajv shares compiled patterns within a schema by this string.
    return { test, toString: () => `/${pattern}/u` };
  },
  { code: "re2js" },
);

const SURROGATE_PAIR_ESCAPE = /u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})/iy;
const CODE_UNIT_ESCAPE = /u([0-9a-f]{4})|u\{([0-9a-f]{1,6})\}/iy;

/** ECMA-262's white space and line terminators (`\s`), as the members of an RE2 class; RE2's `\s` is only [\t\n\f\r ]. */
const ECMA_SPACE = "\\t\\n\\x{0b}\\f\\r \\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}\\x{feff}";
/** ECMA-262's `.` without the s flag: anything but a line terminator (RE2's `.` excludes only \n). */
const ECMA_DOT = "[^\\n\\r\\x{2028}\\x{2029}]";

/**
 * An ECMA-262 pattern (already known to be valid) in RE2's syntax, with ECMA's meaning where the
 * two differ: `\s`/`\S` are ECMA's white space (Unicode spaces, \v, U+FEFF), `.` does not match
 * \r, U+2028 or U+2029, and `\uXXXX` (a surrogate pair as one code point) and `\u{X}` escapes
 * become RE2's `\x{X}`. Other escapes (`\d`, `\w`, `\b`: ASCII in both) are kept as they are.
 */
function re2Syntax(pattern: string): string {
  let out = "";
  let inClass = false;
  for (let at = 0; at < pattern.length; at++) {
    const char = pattern[at]!;
    if (char === "[" && !inClass) {
      inClass = true;
      out += char;
      continue;
    }
    if (char === "]" && inClass) {
      inClass = false;
      out += char;
      continue;
    }
    if (char === "." && !inClass) {
      out += ECMA_DOT;
      continue;
    }
    if (char !== "\\") {
      out += char;
      continue;
    }
    const next = pattern[at + 1] ?? "";
    if (next === "s") {
      out += inClass ? ECMA_SPACE : `[${ECMA_SPACE}]`;
      at++;
      continue;
    }
    if (next === "S") {
      // A negated set cannot sit inside another class in RE2: refused there, by name.
      if (inClass) throw new Error("\\S inside a character class is not supported; write the class negated with \\s instead");
      out += `[^${ECMA_SPACE}]`;
      at++;
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
      out += char + next; // any other escape is kept as it is
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

/**
 * The pair of equal items ajv names, as [earlier, later] indexes (undefined when none): the last
 * item that repeats an earlier one, with the nearest such earlier one (ajv scans from the end).
 */
function firstDuplicate(items: unknown[]): [number, number] | undefined {
  const lastSeen = new Map<string, number>();
  let pair: [number, number] | undefined;
  for (let i = 0; i < items.length; i++) {
    const key = canonicalJson(items[i]);
    const earlier = lastSeen.get(key);
    if (earlier !== undefined) pair = [earlier, i];
    lastSeen.set(key, i);
  }
  return pair;
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
