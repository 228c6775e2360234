/**
 * Splits a byte stream into lines (SPEC L1: one chunk per line). Bytes of a multi-byte UTF-8
 * character split across reads are carried over, as is a partial line, until its newline
 * arrives or the stream ends (`flush`).
 */
import { StringDecoder } from "node:string_decoder";

/**
 * Longest chunk text: longer lines (or output that never prints a newline) are cut into
 * pieces of this many UTF-16 units, which stay under telemetry's 64 KiB per chunk in UTF-8.
 */
export const MAX_LINE_CHARS = 16 * 1024;

export interface LineSplitterOptions {
  /** Applied to every line before it is cut and emitted (secret redaction). */
  transform?: (text: string) => string;
  /**
   * Characters of an unterminated line kept back when its full-size pieces are emitted early,
   * so a value the transform looks for is never split across two emitted pieces (longest
   * value - 1).
   */
  holdBack?: number;
}

export class LineSplitter {
  private readonly decoder = new StringDecoder("utf8");
  private partial = "";
  private readonly transform: (text: string) => string;
  private readonly holdBack: number;

  constructor(options: LineSplitterOptions = {}) {
    this.transform = options.transform ?? ((text) => text);
    this.holdBack = Math.max(0, options.holdBack ?? 0);
  }

  /** The complete lines in `data` (plus what was carried), without their line endings. */
  push(data: Buffer | string): string[] {
    const text = this.partial + (typeof data === "string" ? data : this.decoder.write(data));
    const parts = text.split("\n");
    const tail = parts.pop() ?? "";
    const lines = parts.map((line) => this.transform(stripCarriageReturn(line))).flatMap(cut);
    if (tail.length <= MAX_LINE_CHARS) {
      this.partial = tail;
      return lines;
    }
    // An unterminated line may not grow without bound: emit its full-size pieces now, keeping
    // back what could be the start of a value the transform has not seen whole yet.
    const transformed = this.transform(tail);
    let at = 0;
    while (transformed.length - at > MAX_LINE_CHARS + this.holdBack) {
      const end = cutPoint(transformed, at + MAX_LINE_CHARS);
      lines.push(transformed.slice(at, end));
      at = end;
    }
    this.partial = transformed.slice(at);
    return lines;
  }

  /** The unterminated tail, if any, when the stream has ended. */
  flush(): string[] {
    const tail = this.partial + this.decoder.end();
    this.partial = "";
    return tail === "" ? [] : cut(this.transform(stripCarriageReturn(tail)));
  }
}

function stripCarriageReturn(line: string): string {
  return line.endsWith("\r") ? line.slice(0, -1) : line;
}

function cut(line: string): string[] {
  if (line.length <= MAX_LINE_CHARS) return [line];
  const pieces: string[] = [];
  for (let at = 0; at < line.length; ) {
    const end = cutPoint(line, at + MAX_LINE_CHARS);
    pieces.push(line.slice(at, end));
    at = end;
  }
  return pieces;
}

/**
 * Where to cut `text` near `at`: one unit earlier when `at` would split a surrogate pair (a
 * character beyond U+FFFF), since a piece ending in half of one is not valid UTF-8 and would
 * reach telemetry as U+FFFD.
 */
function cutPoint(text: string, at: number): number {
  if (at >= text.length) return text.length;
  const before = text.charCodeAt(at - 1);
  return before >= 0xd800 && before <= 0xdbff ? at - 1 : at;
}
