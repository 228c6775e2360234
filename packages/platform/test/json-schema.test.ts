import { Ajv } from "ajv";
import { describe, expect, it } from "vitest";
import { compileJsonSchema, MAX_PATTERN_PROGRAM, validateWithin } from "../src/json-schema.ts";

/** Whether `text` matches `pattern` as the compiled schema sees it. */
const matches = (pattern: string, text: string) => compileJsonSchema({ type: "string", pattern })(text) as boolean;
const refusal = (schema: object) => {
  try {
    compileJsonSchema(schema);
  } catch (err) {
    return (err as Error).message;
  }
  return "compiled";
};

describe("patterns on RE2 mean what they mean in ECMA-262", () => {
  // Each pattern against texts where RE2's own reading differs from ECMA's.
  const cases: [string, string[]][] = [
    ["^\\s$", ["\u00a0", "\v", "\u2028", "\ufeff", "\u3000", " ", "\t", "a", "\u200b"]],
    ["^\\S+$", ["a\u3000b", "ab", "a\u00a0b", "a\vb"]],
    ["^[^\\s]+$", ["a\u00a0b", "ab", "a\u2029b"]],
    ["^[a\\s]+$", ["a\u00a0a", "ab"]],
    ["^.$", ["\r", "\n", "\u2028", "\u2029", "a", "\u00e9", "😀"]],
    ["^a.c$", ["a\rc", "abc"]],
    ["^[.]$", [".", "a"]],
    ["^\\d+$", ["123", "١٢٣"]],
    ["^\\w+$", ["abc_1", "é"]],
    ["^\\u00e9$", ["é", "e"]],
    ["^\\ud83d\\ude00$", ["😀", "x"]],
    ["^\\u{1F600}$", ["😀", "x"]],
    ["^[\\]a]+$", ["]a", "b"]],
    ["\\bword\\b", ["a word here", "swordfish"]],
    ["^\\p{L}+$", ["héllo", "h3llo"]],
  ];
  for (const [pattern, texts] of cases) {
    it(`${pattern}`, () => {
      const ecma = new RegExp(pattern, "u");
      for (const text of texts) expect(matches(pattern, text), JSON.stringify(text)).toBe(ecma.test(text));
    });
  }

  it("refuses syntax only RE2 knows, and what RE2 cannot run, naming the pattern", () => {
    for (const pattern of ["(?i)abc", "abc\\z", "\\Qa.b\\E", "(?P<x>a)"]) {
      expect(refusal({ type: "string", pattern }), pattern).toMatch(/not a valid ECMA-262 regular expression/);
    }
    expect(refusal({ type: "string", pattern: "^(?=x)x$" })).toMatch(/RE2.*no lookaround/);
    expect(refusal({ type: "string", pattern: "^(a)\\1$" })).toMatch(/no backreference/);
    expect(refusal({ type: "string", pattern: "^[\\Sa]$" })).toMatch(/\\S inside a character class/);
  });

  it(`refuses a pattern whose RE2 program is over ${MAX_PATTERN_PROGRAM} instructions, and takes everyday ones`, () => {
    expect(refusal({ type: "string", pattern: "(a|aa){1000}[!#]" })).toMatch(/too complex.*at most 1000/);
    expect(refusal({ patternProperties: { "(a|aa){400}": { type: "string" } } })).toMatch(/too complex/);
    for (const pattern of ["^[a-z0-9-]{1,64}$", "^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\\.[A-Za-z]{2,}$", "^\\d{4}-\\d{2}-\\d{2}T", "^[0-9a-f]{40}$"]) {
      expect(refusal({ type: "string", pattern }), pattern).toBe("compiled");
    }
  });
});

describe("validateWithin", () => {
  it("gives up once its budget is spent, and answers the verdict within it", () => {
    const validate = compileJsonSchema({ type: "array", items: { type: "string", pattern: "^(a|aa){100}$" } });
    const items = Array.from({ length: 20_000 }, () => "a".repeat(150));
    expect(validateWithin(validate, items, 1)).toBe("over budget");
    expect(validateWithin(validate, items.slice(0, 10), 5000)).toBe(true);
    expect(validateWithin(validate, ["b"], 5000)).toBe(false);
    // The budget is the validation's own: a later plain call has none.
    expect(validate(items.slice(0, 100))).toBe(true);
  });
});

describe("uniqueItems in linear time", () => {
  it("names the same two items as ajv's own keyword", () => {
    const ours = compileJsonSchema({ type: "array", uniqueItems: true });
    const ajvs = new Ajv({ allErrors: true }).compile({ type: "array", uniqueItems: true });
    for (const items of [["a", "b", "a", "b"], [1, 2, 3, 2, 1], [{ a: 1, b: 2 }, { b: 2, a: 1 }], [[1], [2], [1], [3], [2]], [1, "1", true, null]]) {
      expect(ours(items), JSON.stringify(items)).toBe(ajvs(items));
      expect(ours.errors?.map((e) => e.message), JSON.stringify(items)).toEqual(ajvs.errors?.map((e) => e.message));
    }
  });
});
