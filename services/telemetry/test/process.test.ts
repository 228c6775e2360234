/**
 * Crosses the real boundary: the telemetry process started as in production (its main.ts on
 * Node 24), a real port, gRPC over h2c, signed identities; then SIGTERM during a subscription.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { ulid } from "ulid";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { batch, clientsFor, collect, ingest, range, runEnd, sleep } from "./helpers.ts";
import { freePort } from "../../../scripts/lib/ports.ts";
import { signingEnv } from "../../../test/support/signing.ts";

const MAIN = fileURLToPath(new URL("../src/main.ts", import.meta.url));

async function waitHealthy(baseUrl: string, child: ChildProcess): Promise<void> {
  const deadline = Date.now() + 20_000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`telemetry exited with ${child.exitCode}`);
    try {
      if ((await fetch(`${baseUrl}/healthz`)).ok) return;
    } catch {
      // not listening yet
    }
    await sleep(100);
  }
  throw new Error("telemetry did not become healthy");
}

describe("telemetry process", () => {
  const dataDir = mkdtempSync(path.join(tmpdir(), "outpost-telemetry-"));
  let child: ChildProcess;
  let baseUrl: string;
  let output = "";
  let exited: Promise<number | null>;

  beforeAll(async () => {
    const port = await freePort();
    baseUrl = `http://127.0.0.1:${port}`;
    child = spawn(process.execPath, ["--disable-warning=ExperimentalWarning", MAIN], {
      env: {
        ...process.env,
        ...signingEnv("telemetry"),
        OUTPOST_TELEMETRY_HOST: "127.0.0.1",
        OUTPOST_TELEMETRY_PORT: String(port),
        OUTPOST_DATA_DIR: dataDir,
        OUTPOST_LOG_LEVEL: "info",
      },
      stdio: ["ignore", "pipe", "pipe"],
    });
    child.stdout!.on("data", (d: Buffer) => (output += d.toString()));
    child.stderr!.on("data", (d: Buffer) => (output += d.toString()));
    exited = new Promise((resolve) => child.once("exit", (code) => resolve(code)));
    await waitHealthy(baseUrl, child);
  });

  afterAll(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    rmSync(dataDir, { recursive: true, force: true });
  });

  it("ingests as executor, streams to the tenant, completes as dispatcher", async () => {
    const c = clientsFor(baseUrl);
    const id = ulid();
    await c.dispatcher.registerRun({ dispatchId: id, tenantId: "t-a" });
    const watching = collect(c.tenant("t-a").subscribeLogs({ dispatchId: id }));
    await sleep(50);
    const acked = await ingest(c.executor, [batch(id, "t-a", range(1, 50)), batch(id, "t-a", range(40, 120))], 5);
    expect(acked).toEqual([50, 120]);
    await c.dispatcher.completeRun({ dispatchId: id, tenantId: "t-a", runEnd: runEnd(120, Dispatch_State.SUCCEEDED, 0) });
    const got = await watching;
    expect(got.seqs).toEqual(range(1, 120));
    expect(got.end).toMatchObject({ state: Dispatch_State.SUCCEEDED, exitCode: 0, lastSeq: 120n });
    const page = await c.tenant("t-a").getLogs({ dispatchId: id, afterSeq: 118n });
    expect(page.chunks.map((ch) => ch.text)).toEqual(["line 119", "line 120"]);
  });

  it("refuses a call whose identity is not signed with a trusted key", async () => {
    const { generateSigningKeySet, internalClient, signingKeysOf } = await import("@outpost/platform");
    const { LogService } = await import("@outpost/proto/outpost/telemetry/v1/log_service_pb.js");
    const forged = internalClient(LogService, {
      baseUrl,
      signingKeys: signingKeysOf(generateSigningKeySet(), "gateway"),
      identity: { kind: "tenant", tenantId: "t-a", principal: "key/x" },
    });
    await expect(forged.getLogs({ dispatchId: ulid() })).rejects.toMatchObject({ code: 16 }); // UNAUTHENTICATED
  });

  it("on SIGTERM ends an open subscription cleanly and exits 0", async () => {
    const c = clientsFor(baseUrl);
    const id = ulid();
    await ingest(c.executor, [batch(id, "t-a", range(1, 10))]);
    const watching = collect(c.tenant("t-a").subscribeLogs({ dispatchId: id, afterSeq: 3n }));
    await sleep(200);
    const startedAt = Date.now();
    child.kill("SIGTERM");
    const got = await watching; // resolves without an error
    expect(got.seqs).toEqual(range(4, 10));
    expect(got.end).toBeUndefined();
    expect(await exited).toBe(0);
    expect(Date.now() - startedAt).toBeLessThan(8000);
    expect(output).toContain("stopping");
    expect(output).not.toMatch(/"level":"(error|fatal)"/);
  });
});
