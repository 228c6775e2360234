/** The development credentials file holds a live API key and the admin token: only its owner may read it. */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { devCredentialsPath, readDevCredentials, writeDevCredentials, writePrivateFile } from "../src/credentials.ts";

const base = fs.mkdtempSync(path.join(os.tmpdir(), "outpost-cli-home-"));
afterAll(() => fs.rmSync(base, { recursive: true, force: true }));

const modeOf = (file: string) => fs.statSync(file).mode & 0o777;
const credentials = { gatewayUrl: "http://127.0.0.1:7100", apiKey: "otp_" + "a".repeat(64), adminToken: "admin-token", tenantId: "01JTENANT" };

describe("writeDevCredentials", () => {
  it("makes a pre-existing 0644 file 0600 and its 0755 directory 0700", () => {
    const env = { OUTPOST_HOME: path.join(base, "old-outpost") };
    const file = devCredentialsPath(env);
    // What an older version left: the directory and file with the umask's modes.
    fs.mkdirSync(path.dirname(file), { mode: 0o755 });
    fs.chmodSync(path.dirname(file), 0o755);
    fs.writeFileSync(file, "{}\n", { mode: 0o644 });
    fs.chmodSync(file, 0o644);

    expect(writeDevCredentials(credentials, env)).toBe(file);
    expect(modeOf(file)).toBe(0o600);
    expect(modeOf(path.dirname(file))).toBe(0o700);
    expect(readDevCredentials(env)).toEqual(credentials);
    expect(fs.readdirSync(path.dirname(file))).toEqual(["credentials.json"]); // no temporary file left
  });

  it("creates .outpost 0700 and the file 0600 under a permissive umask", () => {
    const env = { OUTPOST_HOME: path.join(base, "new-outpost") };
    const previous = process.umask(0);
    try {
      writeDevCredentials(credentials, env);
      writePrivateFile(path.join(env.OUTPOST_HOME, "admin-token"), "x\n");
    } finally {
      process.umask(previous);
    }
    expect(modeOf(env.OUTPOST_HOME)).toBe(0o700);
    expect(modeOf(devCredentialsPath(env))).toBe(0o600);
    expect(modeOf(path.join(env.OUTPOST_HOME, "admin-token"))).toBe(0o600);
  });
});
