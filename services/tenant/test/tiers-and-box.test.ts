import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { ConfigError } from "@outpost/platform";
import { SecretBox, SecretKeyUnavailableError } from "../src/core/secret-box.ts";
import { DEFAULT_TIERS, loadTiers, tiersFrom } from "../src/core/tiers.ts";

const key = (fill: number) => Buffer.alloc(32, fill).toString("base64");

describe("tiers", () => {
  const dir = mkdtempSync(path.join(tmpdir(), "outpost-tiers-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("pro is the SPEC's 10 concurrent, 500 a day, 1800 s; free below and enterprise above", () => {
    expect(DEFAULT_TIERS.pro).toMatchObject({ concurrentRuns: 10, runsPerDay: 500, maxTimeoutMs: 1_800_000 });
    expect(DEFAULT_TIERS.pro).toMatchObject({ createPerMinute: 100, triggerPerMinute: 500, readPerMinute: 1000 });
    for (const field of Object.keys(DEFAULT_TIERS.pro) as (keyof typeof DEFAULT_TIERS.pro)[]) {
      expect(DEFAULT_TIERS.free[field]).toBeLessThan(DEFAULT_TIERS.pro[field]);
      expect(DEFAULT_TIERS.enterprise[field]).toBeGreaterThan(DEFAULT_TIERS.pro[field]);
    }
  });

  it("overrides only what a YAML file names, and reads JSON too", () => {
    const yamlFile = path.join(dir, "tiers.yaml");
    writeFileSync(yamlFile, "free:\n  concurrent_runs: 3\n  max_timeout_seconds: 90\nenterprise:\n  read_per_minute: 42\n");
    const table = loadTiers(yamlFile);
    expect(table.free).toEqual({ ...DEFAULT_TIERS.free, concurrentRuns: 3, maxTimeoutMs: 90_000 });
    expect(table.enterprise).toEqual({ ...DEFAULT_TIERS.enterprise, readPerMinute: 42 });
    expect(table.pro).toEqual(DEFAULT_TIERS.pro);

    const jsonFile = path.join(dir, "tiers.json");
    writeFileSync(jsonFile, JSON.stringify({ pro: { runs_per_day: 7, log_retention_days: 14 } }));
    expect(loadTiers(jsonFile).pro.runsPerDay).toBe(7);
    expect(loadTiers(jsonFile).pro.logRetentionMs).toBe(14 * 24 * 3600 * 1000);
    writeFileSync(jsonFile, JSON.stringify({ free: { max_memory_mib: 512, max_cpu_millis: 500, max_pids: 64 } }));
    expect(loadTiers(jsonFile).free).toMatchObject({ maxMemoryBytes: 512 * 1024 * 1024, maxCpuMillis: 500, maxPids: 64 });
    expect(loadTiers(undefined)).toBe(DEFAULT_TIERS);
  });

  it("refuses unknown tiers, unknown fields, negative and fractional numbers, naming them", () => {
    const cases: [unknown, RegExp][] = [
      [{ gold: {} }, /gold|Unrecognized/],
      [{ pro: { concurrent: 3 } }, /concurrent|Unrecognized/],
      [{ pro: { concurrent_runs: -1 } }, /pro\.concurrent_runs/],
      [{ free: { runs_per_day: 1.5 } }, /free\.runs_per_day/],
      [{ free: { max_timeout_seconds: 0 } }, /free\.max_timeout_seconds/],
      [{ free: { read_per_minute: "10" } }, /free\.read_per_minute/],
      [[1, 2], /document|expected object/],
    ];
    for (const [doc, message] of cases) {
      expect(() => tiersFrom(doc)).toThrow(ConfigError);
      expect(() => tiersFrom(doc)).toThrow(message);
    }
  });

  it("names OUTPOST_TIERS_FILE for a missing or unparseable file", () => {
    expect(() => loadTiers(path.join(dir, "nope.yaml"))).toThrow(/OUTPOST_TIERS_FILE: cannot read/);
    const bad = path.join(dir, "bad.yaml");
    writeFileSync(bad, "free: [unclosed\n");
    expect(() => loadTiers(bad)).toThrow(/OUTPOST_TIERS_FILE: .* is not valid JSON or YAML/);
  });
});

describe("SecretBox", () => {
  it("round-trips a value, with a fresh nonce each time, under the first (current) key", () => {
    const box = SecretBox.fromSetting(`k2:${key(2)},k1:${key(1)}`);
    expect(box.currentKeyId).toBe("k2");
    const a = box.seal("T1", "TOKEN", "hunter2-ünïcode");
    const b = box.seal("T1", "TOKEN", "hunter2-ünïcode");
    expect(a.keyId).toBe("k2");
    expect(Buffer.from(a.iv).equals(Buffer.from(b.iv))).toBe(false);
    expect(Buffer.from(a.ciphertext).toString("latin1")).not.toContain("hunter2");
    expect(box.open("T1", "TOKEN", a)).toBe("hunter2-ünïcode");
  });

  it("binds the value to its tenant and name, and detects tampering", () => {
    const box = SecretBox.fromSetting(`k1:${key(1)}`);
    const sealed = box.seal("T1", "TOKEN", "value-1");
    expect(() => box.open("T2", "TOKEN", sealed)).toThrow();
    expect(() => box.open("T1", "OTHER", sealed)).toThrow();
    const flipped = Uint8Array.from(sealed.ciphertext);
    flipped[0]! ^= 1;
    expect(() => box.open("T1", "TOKEN", { ...sealed, ciphertext: flipped })).toThrow();
  });

  it("opens values sealed under an older key that is still listed, and says which key is missing otherwise", () => {
    const old = SecretBox.fromSetting(`k1:${key(1)}`);
    const sealed = old.seal("T1", "TOKEN", "old-value");
    const rotated = SecretBox.fromSetting(`k2:${key(2)},k1:${key(1)}`);
    expect(rotated.open("T1", "TOKEN", sealed)).toBe("old-value");
    const dropped = SecretBox.fromSetting(`k2:${key(2)}`);
    expect(() => dropped.open("T1", "TOKEN", sealed)).toThrow(SecretKeyUnavailableError);
  });

  it("rolling rotation: a new key listed second is not used to seal, yet opens what a replica already on it sealed", () => {
    const phase1 = SecretBox.fromSetting(`k1:${key(1)},k2:${key(2)}`);
    expect(phase1.currentKeyId).toBe("k1");
    expect(phase1.seal("T1", "TOKEN", "v").keyId).toBe("k1");
    const phase2 = SecretBox.fromSetting(`k2:${key(2)},k1:${key(1)}`);
    expect(phase1.open("T1", "TOKEN", phase2.seal("T1", "TOKEN", "resealed"))).toBe("resealed");
  });

  it("refuses malformed settings naming OUTPOST_SECRETS_MASTER_KEYS", () => {
    for (const bad of ["", "nokey", `:${key(1)}`, "k1:short", `k1:${key(1)},k1:${key(2)}`, `k 1:${key(1)}`, `k1:${key(1)}!!`]) {
      expect(() => SecretBox.fromSetting(bad)).toThrow(/OUTPOST_SECRETS_MASTER_KEYS/);
    }
  });
});
