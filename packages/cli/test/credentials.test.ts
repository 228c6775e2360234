/**
 * The development credentials file holds a live API key and the admin token: only its owner may
 * read it, it lives in the Outpost home (never the working directory), and the CLI refuses one
 * that is not its user's own or that others can read.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import {
  CredentialsError,
  devCredentialsPath,
  outpostHome,
  readDevCredentials,
  tightenDevCredentials,
  writeDevCredentials,
  writePrivateFile,
} from "../src/credentials.ts";

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

describe("outpostHome", () => {
  it("is $OUTPOST_HOME when set, else ~/.outpost — never the working directory", () => {
    expect(outpostHome({ OUTPOST_HOME: "/srv/outpost-home" })).toBe("/srv/outpost-home");
    expect(outpostHome({ HOME: "/home/dev" })).toBe("/home/dev/.outpost");
    expect(devCredentialsPath({ HOME: "/home/dev" })).toBe("/home/dev/.outpost/credentials.json");
    expect(outpostHome({ HOME: "/home/dev" })).not.toBe(path.resolve(".outpost"));
  });
});

describe("readDevCredentials refuses a file others could have written or can read", () => {
  /** A home holding credentials.json with the given mode. */
  function homeWith(name: string, mode: number): { env: NodeJS.ProcessEnv; file: string } {
    const env = { OUTPOST_HOME: path.join(base, name) };
    const file = devCredentialsPath(env);
    fs.mkdirSync(path.dirname(file), { mode: 0o700 });
    fs.writeFileSync(file, JSON.stringify(credentials));
    fs.chmodSync(file, mode);
    return { env, file };
  }

  it("reads a 0600 file of the current user; a missing file is no credentials", () => {
    expect(readDevCredentials(homeWith("private", 0o600).env)).toEqual(credentials);
    expect(readDevCredentials({ OUTPOST_HOME: path.join(base, "none") })).toEqual({});
  });

  for (const mode of [0o644, 0o640, 0o604]) {
    it(`refuses mode ${mode.toString(8)}, naming the file and the fix`, () => {
      const { env, file } = homeWith(`mode-${mode.toString(8)}`, mode);
      expect(() => readDevCredentials(env)).toThrow(CredentialsError);
      expect(() => readDevCredentials(env)).toThrow(`${file} can be read by other users (mode 0${mode.toString(8)})`);
      expect(() => readDevCredentials(env)).toThrow(`chmod 600 ${file}`);
    });
  }

  it("refuses a file owned by another user", () => {
    const env = { OUTPOST_HOME: path.join(base, "foreign") };
    const file = devCredentialsPath(env);
    fs.mkdirSync(path.dirname(file), { mode: 0o700 });
    if (process.getuid!() === 0) {
      // As root: a 0600 file that belongs to nobody.
      fs.writeFileSync(file, JSON.stringify(credentials), { mode: 0o600 });
      fs.chownSync(file, 65534, 65534);
    } else {
      fs.symlinkSync("/etc/passwd", file); // root's file, reached through a link
    }
    expect(() => readDevCredentials(env)).toThrow(/is owned by uid \d+, not by you/);
  });

  it("refuses a file that is not a JSON object, in one line that does not quote the file", () => {
    const { env, file } = homeWith("not-json", 0o600);
    fs.writeFileSync(file, "otp_123\n");
    const fix = "fix it, or delete it and run npm start, which provisions a development tenant and writes a new one";
    expect(() => readDevCredentials(env)).toThrow(new CredentialsError(`${file} is not valid JSON: ${fix}`));
    fs.writeFileSync(file, '{"apiKey": "otp_456",\n');
    expect(() => readDevCredentials(env)).toThrow(new CredentialsError(`${file} is not valid JSON (line 2 column 1): ${fix}`));
    fs.writeFileSync(file, '["otp_789"]');
    expect(() => readDevCredentials(env)).toThrow(new CredentialsError(`${file} must hold one JSON object: ${fix}`));
  });
});

describe("tightenDevCredentials (npm start, before it reads the file)", () => {
  it("makes the current user's 0644 file 0600 and its 0755 directory 0700, content unchanged", () => {
    const env = { OUTPOST_HOME: path.join(base, "loose-checkout") };
    const file = devCredentialsPath(env);
    fs.mkdirSync(env.OUTPOST_HOME);
    fs.chmodSync(env.OUTPOST_HOME, 0o755);
    fs.writeFileSync(file, JSON.stringify(credentials));
    fs.chmodSync(file, 0o644);
    expect(() => readDevCredentials(env)).toThrow(CredentialsError);
    tightenDevCredentials(env);
    expect(modeOf(file)).toBe(0o600);
    expect(modeOf(env.OUTPOST_HOME)).toBe(0o700);
    expect(readDevCredentials(env)).toEqual(credentials);
  });

  it("does nothing without a file (no directory is made)", () => {
    const env = { OUTPOST_HOME: path.join(base, "no-home-yet") };
    tightenDevCredentials(env);
    expect(fs.existsSync(env.OUTPOST_HOME)).toBe(false);
  });

  it("leaves another user's file and its directory as they are, for readDevCredentials to refuse", () => {
    const env = { OUTPOST_HOME: path.join(base, "foreign-loose") };
    const file = devCredentialsPath(env);
    fs.mkdirSync(env.OUTPOST_HOME);
    fs.chmodSync(env.OUTPOST_HOME, 0o755);
    if (process.getuid!() === 0) {
      fs.writeFileSync(file, JSON.stringify(credentials));
      fs.chmodSync(file, 0o644);
      fs.chownSync(file, 65534, 65534); // as root: nobody's file, which root could chmod
    } else {
      fs.symlinkSync("/etc/passwd", file);
    }
    const before = modeOf(file);
    tightenDevCredentials(env);
    expect(modeOf(file)).toBe(before);
    expect(modeOf(env.OUTPOST_HOME)).toBe(0o755);
    expect(() => readDevCredentials(env)).toThrow(/is owned by uid \d+, not by you \(uid \d+\): refusing to use it; point OUTPOST_HOME at a directory of your own/);
  });
});
