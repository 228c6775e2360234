import { ConfigError, generateSigningKeySet, loadConfig, setting } from "@outpost/platform";
import { describe, expect, it } from "vitest";

const shape = {
  OUTPOST_SIGNING_KEY: setting.signingKey(),
  OUTPOST_TRUSTED_SIGNERS: setting.trustedSigners(),
  OUTPOST_X_PORT: setting.port(7104),
  OUTPOST_X_HOST: setting.host(),
  OUTPOST_TENANT_URL: setting.url(),
  OUTPOST_DATA_DIR: setting.dataDir(),
  OUTPOST_LOG_LEVEL: setting.logLevel(),
  OUTPOST_TTL_MS: setting.durationMs(2000),
  OUTPOST_PERIOD_MS: setting.timerMs(1000),
};
const keys = generateSigningKeySet(["gateway", "tenant"]);
const valid = { OUTPOST_SIGNING_KEY: keys.signingKeys.tenant, OUTPOST_TRUSTED_SIGNERS: keys.trustedSigners, OUTPOST_TENANT_URL: "http://127.0.0.1:7101" };

function configError(env: NodeJS.ProcessEnv): ConfigError {
  try {
    loadConfig(shape, env);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return err as ConfigError;
  }
  throw new Error("expected a ConfigError");
}

describe("loadConfig", () => {
  it("applies the defaults", () => {
    expect(loadConfig(shape, valid)).toEqual({
      ...valid,
      OUTPOST_X_PORT: 7104,
      OUTPOST_X_HOST: "127.0.0.1",
      OUTPOST_DATA_DIR: ".outpost/data",
      OUTPOST_LOG_LEVEL: "info",
      OUTPOST_TTL_MS: 2000,
      OUTPOST_PERIOD_MS: 1000,
    });
  });

  it("coerces numbers from strings", () => {
    const config = loadConfig(shape, { ...valid, OUTPOST_X_PORT: "8080", OUTPOST_TTL_MS: "50" });
    expect(config.OUTPOST_X_PORT).toBe(8080);
    expect(config.OUTPOST_TTL_MS).toBe(50);
  });

  it("names every missing variable", () => {
    const err = configError({});
    expect(err.name).toBe("ConfigError");
    expect(err.message).toContain("OUTPOST_SIGNING_KEY");
    expect(err.message).toContain("OUTPOST_TRUSTED_SIGNERS");
    expect(err.message).toContain("OUTPOST_TENANT_URL");
    expect(err.message).not.toContain("OUTPOST_X_PORT");
  });

  it("names a malformed port and nothing valid", () => {
    for (const port of ["abc", "70000", "-1", "1.5", "0x1F", "1e3"]) {
      const err = configError({ ...valid, OUTPOST_X_PORT: port });
      expect(err.message).toMatch(/OUTPOST_X_PORT: /);
      expect(err.message).not.toContain("OUTPOST_TENANT_URL");
    }
  });

  it("explains a bad signing key or trust list, a bad URL and an unknown log level", () => {
    expect(configError({ ...valid, OUTPOST_SIGNING_KEY: "short" }).message).toMatch(/OUTPOST_SIGNING_KEY: must be an Ed25519 private key/);
    const [gatewayEntry] = keys.trustedSigners.split(",");
    expect(configError({ ...valid, OUTPOST_TRUSTED_SIGNERS: "" }).message).toMatch(/OUTPOST_TRUSTED_SIGNERS: names no signer/);
    expect(configError({ ...valid, OUTPOST_TRUSTED_SIGNERS: `${gatewayEntry},tenant:AAAA` }).message).toMatch(
      /OUTPOST_TRUSTED_SIGNERS: entry 2 \(tenant\): must be an Ed25519 public key/,
    );
    // A private key in the trust list is refused too (it must hold public keys only).
    expect(configError({ ...valid, OUTPOST_TRUSTED_SIGNERS: `tenant:${keys.signingKeys.tenant}` }).message).toMatch(/entry 1 \(tenant\)/);
    expect(configError({ ...valid, OUTPOST_TENANT_URL: "not a url" }).message).toMatch(/OUTPOST_TENANT_URL: must be a URL/);
    expect(configError({ ...valid, OUTPOST_LOG_LEVEL: "loud" }).message).toContain("OUTPOST_LOG_LEVEL");
    expect(configError({ ...valid, OUTPOST_TTL_MS: "0" }).message).toContain("OUTPOST_TTL_MS");
  });

  it("refuses a timer's duration Node would fire after 1 ms (over 2^31 - 1), which a plain duration may exceed", () => {
    expect(loadConfig(shape, { ...valid, OUTPOST_PERIOD_MS: "2147483647" }).OUTPOST_PERIOD_MS).toBe(2_147_483_647);
    const error = configError({ ...valid, OUTPOST_PERIOD_MS: "2147483648" });
    expect(error.message).toContain("OUTPOST_PERIOD_MS");
    expect(error.message).toContain("at most 2147483647");
    expect(loadConfig(shape, { ...valid, OUTPOST_TTL_MS: "2592000000" }).OUTPOST_TTL_MS).toBe(2_592_000_000); // 30 days
  });

  it("an empty or blank number is unset (its default, or required), never 0", () => {
    expect(loadConfig({ P: setting.port(7104), T: setting.timerMs(1000) }, { P: "", T: "  " })).toEqual({ P: 7104, T: 1000 });
    expect(() => loadConfig({ P: setting.port() }, { P: " " })).toThrow(/P: is required/);
    expect(loadConfig({ P: setting.port(7104) }, { P: " 8080 " })).toEqual({ P: 8080 });
  });

  it("says what is wrong with a whole number out of range, rather than that it is not one", () => {
    const messages = (env: NodeJS.ProcessEnv) => configError({ ...valid, ...env }).message;
    expect(messages({ OUTPOST_X_PORT: "65536" })).toMatch(/OUTPOST_X_PORT: must be at most 65535/);
    expect(messages({ OUTPOST_X_PORT: "99999999999999999999" })).toMatch(/OUTPOST_X_PORT: must be at most 65535/);
    expect(messages({ OUTPOST_TTL_MS: "0" })).toMatch(/OUTPOST_TTL_MS: must be at least 1/);
    expect(messages({ OUTPOST_TTL_MS: "000" })).toMatch(/OUTPOST_TTL_MS: must be at least 1/);
    expect(messages({ OUTPOST_PERIOD_MS: "0" })).toMatch(/OUTPOST_PERIOD_MS: must be at least 1/);
    expect(() => loadConfig({ N: setting.positiveInt(1) }, { N: "0" })).toThrow(/N: must be at least 1/);
    expect(() => loadConfig({ N: setting.positiveInt(1) }, { N: "9007199254740992" })).toThrow(/N: must be at most 9007199254740991/);
    // Not digits: said so, and "-0", "+1", "010.0", full-width and Arabic-Indic digits are not digits.
    for (const value of ["-0", "+1", "010.0", "\uff18\uff10", "\u0663", "0b1", "1_000", "Infinity", "NaN"]) {
      expect(messages({ OUTPOST_X_PORT: value }), value).toMatch(/OUTPOST_X_PORT: must be a whole number \(digits only\)/);
    }
    // Leading zeros are decimal, never octal.
    expect(loadConfig(shape, { ...valid, OUTPOST_X_PORT: "010" }).OUTPOST_X_PORT).toBe(10);
  });

  it("refuses a duration compared with clocks that would take a date past what a Date holds", () => {
    // now + the duration must stay a date (Mongo's TTL expiry, a Timestamp): 100 years at most.
    expect(loadConfig(shape, { ...valid, OUTPOST_TTL_MS: "3155760000000" }).OUTPOST_TTL_MS).toBe(3_155_760_000_000);
    expect(configError({ ...valid, OUTPOST_TTL_MS: "3155760000001" }).message).toMatch(/OUTPOST_TTL_MS: must be at most 3155760000000 \(100 years\)/);
    expect(configError({ ...valid, OUTPOST_TTL_MS: "9007199254740991" }).message).toMatch(/OUTPOST_TTL_MS: must be at most/);
  });

  it("a host or data directory is trimmed, and a blank one is unset (its default), never a name of spaces", () => {
    const config = loadConfig(shape, { ...valid, OUTPOST_X_HOST: " 0.0.0.0\t", OUTPOST_DATA_DIR: "/var/lib/outpost " });
    expect(config.OUTPOST_X_HOST).toBe("0.0.0.0");
    expect(config.OUTPOST_DATA_DIR).toBe("/var/lib/outpost");
    const blank = loadConfig(shape, { ...valid, OUTPOST_X_HOST: "  ", OUTPOST_DATA_DIR: "" });
    expect(blank.OUTPOST_X_HOST).toBe("127.0.0.1");
    expect(blank.OUTPOST_DATA_DIR).toBe(".outpost/data");
    // A host with a space inside is no host: refused at start-up, naming it (not a getaddrinfo error at listen).
    expect(configError({ ...valid, OUTPOST_X_HOST: "0.0.0.0 127.0.0.1" }).message).toMatch(/OUTPOST_X_HOST: must be a host name or IP address/);
  });

  it("a service URL is http or https", () => {
    for (const url of ["localhost:7101", "javascript:alert(1)", "file:///etc/passwd", "redis://127.0.0.1:6379"]) {
      expect(configError({ ...valid, OUTPOST_TENANT_URL: url }).message, url).toMatch(/OUTPOST_TENANT_URL: must be an http:\/\/ or https:\/\/ URL/);
    }
  });

  it("a port setting without a default is required", () => {
    expect(() => loadConfig({ P: setting.port() }, {})).toThrow(/P: /);
    expect(loadConfig({ P: setting.port() }, { P: "0" })).toEqual({ P: 0 });
  });
});
