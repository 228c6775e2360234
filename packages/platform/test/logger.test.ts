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

  it("redact the grants a Lease carries, signing keys, key plaintexts, title-case headers, a signed identity's signature, and fields two levels down", () => {
    const line = JSON.stringify(
      logLine(
        `{ lease: { leaseId: "L1", secretGrant: "SG_1", logGrant: "LG_2" }, secret_grant: "SG_3", plaintext: "PT_4", privateKey: "PK_5", signingKey: "SK_6",` +
          ` config: { headers: { Authorization: "Bearer TC_7", "X-Api-Key": "TC_8", Cookie: "TC_9" } }, req: { headers: { "outpost-identity-signature": "SIG_10" } },` +
          ` call: { request: { token: "DEEP_11", apiKey: "DEEP_12" } } }`,
      ),
    );
    for (const secret of ["SG_1", "LG_2", "SG_3", "PT_4", "PK_5", "SK_6", "TC_7", "TC_8", "TC_9", "SIG_10", "DEEP_11", "DEEP_12"]) expect(line, secret).not.toContain(secret);
    expect(line).toContain('"leaseId":"L1"');
  });

  it("log an error's cause that is not an Error, or a thrown value that is not one, as what explains it, not whole", () => {
    const line = logLine(
      `{ err: new Error("outer", { cause: { message: "inner", code: "E_INNER", token: "CAUSE_1", response: { config: { headers: { authorization: "Bearer CAUSE_2" } } } } }) }`,
    );
    expect(JSON.stringify(line)).not.toMatch(/CAUSE_1|CAUSE_2/);
    expect(line.err).toMatchObject({ type: "Error", message: "outer", cause: { type: "Object", message: "inner", code: "E_INNER" } });
    const thrown = logLine(`{ err: { message: "rejected", request: { options: { headers: { authorization: "Bearer THROWN_1" } } } } }`);
    expect(JSON.stringify(thrown)).not.toContain("THROWN_1");
    expect(thrown.err).toEqual({ type: "Object", message: "rejected" });
    // What services log as err today (a message) stays as it is.
    expect(logLine(`{ err: "connection refused" }`).err).toBe("connection refused");
  });

  it("scrub bearer tokens, API keys and URL passwords from an error's message and stack, and its causes'", () => {
    const line = logLine(
      `{ err: new Error("upstream said 401 for Authorization: Bearer otp_${"ab".repeat(32)}", { cause: new Error("connect redis://default:hunter2@cache:6379 failed for key otp_${"cd".repeat(32)}") }) }`,
    );
    const text = JSON.stringify(line);
    for (const secret of ["ab".repeat(32), "cd".repeat(32), "hunter2"]) expect(text, secret).not.toContain(secret);
    expect(line.err).toMatchObject({ message: "upstream said 401 for Authorization: Bearer [REDACTED]", cause: { message: "connect redis://default:[REDACTED]@cache:6379 failed for key otp_[REDACTED]" } });
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
