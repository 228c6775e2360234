/**
 * The load harness (load/run.ts) on a short run, as CI runs it: the full mesh on loopback,
 * five clients for ten seconds with the realistic mix, two creates of the demo agent (one
 * cancelled). Asserts the harness reports what it promises and that the mesh served the mix
 * without errors, settled every run and reported each process's memory — not any figure.
 */
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
import Docker from "dockerode";
import { READ_MIX } from "../load/profiles.ts";
import type { MethodSummary } from "../load/stats.ts";
import { REPO_ROOT, SERVICES } from "../scripts/lib/mesh.ts";

interface Report {
  profile: { name: string; clients: number; durationMs: number };
  total: number;
  errors: number;
  methods: MethodSummary[];
  created: number;
  cancelled: number;
  openAfterSettling: string[];
  memoryStart: Record<string, number>;
  memoryEnd: Record<string, number>;
}

describe("npm run load (short smoke run)", () => {
  it("drives the mix through the gateway and reports per-method figures, settled runs and memory", { timeout: 180_000 }, async () => {
    await new Docker().ping(); // CI runs the engine; created runs need it to finish
    const json = path.join(mkdtempSync(path.join(os.tmpdir(), "outpost-load-test-")), "load.json");
    const args = ["load/run.ts", "--profile", "smoke", "--duration", "10s", "--clients", "5", "--creates-per-minute", "12", "--json", json];
    const { code, stdout, stderr } = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
      const child = spawn(process.execPath, ["--disable-warning=ExperimentalWarning", ...args], { cwd: REPO_ROOT });
      let out = "";
      let err = "";
      child.stdout.on("data", (d: Buffer) => (out += d.toString()));
      child.stderr.on("data", (d: Buffer) => (err += d.toString()));
      child.on("exit", (c) => resolve({ code: c, stdout: out, stderr: err }));
    });
    expect(code, stderr).toBe(0);
    expect(stdout).toMatch(/^\| method +\| requests \| errors \| error rate \| p50 ms \| p95 ms \| p99 ms \| error codes \|$/m);
    expect(stdout).toMatch(/^\| process +\| +pid \| VmRSS start MiB \| VmRSS end MiB \|$/m);

    const report = JSON.parse(readFileSync(json, "utf8")) as Report;
    expect(report.profile).toMatchObject({ name: "smoke", clients: 5, durationMs: 10_000 });
    const methods = new Map(report.methods.map((m) => [m.method, m]));
    for (const method of [...READ_MIX.map((m) => m.method), "CreateDispatch", "CancelDispatch"]) {
      expect(methods.get(method)?.requests, method).toBeGreaterThan(0);
    }
    // Five clients over three tenants stay well inside every limit: any error is a real fault.
    expect(report.methods.filter((m) => m.errors > 0)).toEqual([]);
    expect(report.errors).toBe(0);
    expect(report.total).toBe(report.methods.reduce((n, m) => n + m.requests, 0));
    for (const m of report.methods.filter((m) => m.method !== "SubscribeLogs" || m.requests > 0)) {
      expect(m.p50Ms).toBeGreaterThan(0);
      expect(m.p99Ms).toBeGreaterThanOrEqual(m.p95Ms);
      expect(m.p95Ms).toBeGreaterThanOrEqual(m.p50Ms);
    }
    expect(report.created).toBe(2);
    expect(report.cancelled).toBe(1);
    expect(report.openAfterSettling).toEqual([]);
    for (const service of SERVICES) {
      expect(report.memoryStart[service], service).toBeGreaterThan(10 * 1024);
      expect(report.memoryEnd[service], service).toBeGreaterThan(10 * 1024);
    }
  });
});
