/**
 * Replaces secret values in output with `[REDACTED:<NAME>]` before lines leave the executor
 * (SPEC T5, L1; contract B). Values shorter than MIN_SECRET_CHARS are left alone: redacting
 * "a" or "123" everywhere would garble output and tell an observer the value anyway. A value
 * with line breaks is also redacted line by line, since output is shipped one line at a time.
 * Overlapping occurrences of different values are merged into one span, so no part of either
 * leaks; the span names every secret it covered.
 */
export const MIN_SECRET_CHARS = 4;

export class Redactor {
  /** [name, value] pairs, longest value first. */
  private readonly needles: Array<[string, string]>;
  /** Longest value: a partial line must keep this many chars minus one back (LineSplitter). */
  readonly maxValueLength: number;

  constructor(secrets: Record<string, string>) {
    const needles: Array<[string, string]> = [];
    for (const [name, value] of Object.entries(secrets)) {
      const pieces = new Set([value, ...value.split(/\r?\n/)]);
      for (const piece of pieces) if (piece.length >= MIN_SECRET_CHARS) needles.push([name, piece]);
    }
    needles.sort((a, b) => b[1].length - a[1].length);
    this.needles = needles;
    this.maxValueLength = needles.reduce((max, [, v]) => Math.max(max, v.length), 0);
  }

  get empty(): boolean {
    return this.needles.length === 0;
  }

  redact(text: string): string {
    if (this.needles.length === 0) return text;
    const spans: Array<{ start: number; end: number; name: string }> = [];
    for (const [name, value] of this.needles) {
      for (let at = text.indexOf(value); at !== -1; at = text.indexOf(value, at + 1)) {
        spans.push({ start: at, end: at + value.length, name });
      }
    }
    if (spans.length === 0) return text;
    spans.sort((a, b) => a.start - b.start || b.end - a.end);
    let out = "";
    let cursor = 0;
    for (let i = 0; i < spans.length; ) {
      const start = spans[i]!.start;
      let end = spans[i]!.end;
      const names: string[] = [];
      for (; i < spans.length && spans[i]!.start < end; i++) {
        end = Math.max(end, spans[i]!.end);
        if (!names.includes(spans[i]!.name)) names.push(spans[i]!.name);
      }
      out += text.slice(cursor, start) + names.map((n) => `[REDACTED:${n}]`).join("");
      cursor = end;
    }
    return out + text.slice(cursor);
  }

  /**
   * A JSON value with secret values redacted in its strings and in its object keys (a key is
   * the agent's text too). Keys that redact to the same text keep both entries: later ones get
   * a ` (2)`, ` (3)`… suffix. Built with Object.fromEntries, so a `__proto__` key stays data.
   */
  redactJson<T>(value: T): T {
    if (this.needles.length === 0) return value;
    return this.redactValue(value) as T;
  }

  private redactValue(value: unknown): unknown {
    if (typeof value === "string") return this.redact(value);
    if (Array.isArray(value)) return value.map((item) => this.redactValue(item));
    if (value === null || typeof value !== "object") return value;
    const entries: Array<[string, unknown]> = [];
    const seen = new Set<string>();
    for (const [key, item] of Object.entries(value)) {
      let name = this.redact(key);
      for (let n = 2; seen.has(name); n++) name = `${this.redact(key)} (${n})`;
      seen.add(name);
      entries.push([name, this.redactValue(item)]);
    }
    return Object.fromEntries(entries);
  }
}
