/**
 * What a log line may carry: keys, tokens, grants and secret values are redacted wherever a
 * request or an error would put them, and an error is logged as what explains it.
 */
import { spawnSync } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";

const LOGGER = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../src/logger.ts");

/** Logs `expression` (a JS object literal) at error level in a process of its own; returns the JSON line. */
function logLine(expression: string): Record<string, unknown> {
  const script = `import { createLogger } from ${JSON.stringify(LOGGER)}; createLogger("t", "info").error(${expression}, "logged");`;
  const out = spawnSync(process.execPath, ["--disable-warning=ExperimentalWarning", "--input-type=module", "-e", script], { encoding: "utf8" });
  expect(out.stderr).toBe("");
  return JSON.parse(out.stdout.trim()) as Record<string, unknown>;
}

describe("log lines", () => {
  it("redact credentials in a request's headers, nested, and in token, password and grant fields", () => {
    const line = JSON.stringify(
      logLine(`{ req: { headers: { authorization: "Bearer otp_A", "x-api-key": "KEY_B" } }, call: { req: { headers: { authorization: "Bearer C" } } }, headers: { cookie: "D" }, token: "E", grant: "F", apiKey: "G" }`),
    );
    for (const secret of ["otp_A", "KEY_B", "Bearer C", '"D"', '"E"', '"F"', '"G"']) expect(line).not.toContain(secret);
    expect(line).toContain("[REDACTED]");
  });

  it("log an error as its type, message, stack, code and cause, not the credentials it carries", () => {
    const line = logLine(
      `{ err: Object.assign(new TypeError("upstream refused", { cause: Object.assign(new Error("socket hang up"), { code: "ECONNRESET" }) }), { code: "E_UPSTREAM", config: { headers: { authorization: "Bearer otp_LEAK" } } }) }`,
    );
    expect(JSON.stringify(line)).not.toContain("otp_LEAK");
    expect(line.err).toMatchObject({ type: "TypeError", message: "upstream refused", code: "E_UPSTREAM", cause: { type: "Error", message: "socket hang up", code: "ECONNRESET" } });
    expect((line.err as { stack: string }).stack).toContain("TypeError: upstream refused");
  });
});
