/**
 * The Redis live feed between two telemetry replicas (in-process services on real ports,
 * sharing one SQLite file, with a private redis-server on a free port so stopping it touches
 * nothing else): a subscriber on B gets chunks ingested on A while the run is live; with Redis
 * stopped, ingest keeps working and B's subscriber still completes (from storage, via the idle
 * poll, and the run's end is read from storage too), so Redis is never on the path that stores
 * or acknowledges.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { connectRedis, createLogger } from "@outpost/platform";
import { ulid } from "ulid";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { freePort } from "../../../scripts/lib/mesh.ts";
import { RedisLiveFeed } from "../src/adapters/redis-live-feed.ts";
import type { StoredChunk } from "../src/core/model.ts";
import { loadTelemetryConfig } from "../src/config.ts";
import { startTelemetry, type RunningTelemetry } from "../src/service.ts";
import { batch, clientsFor, ingest, range, runEnd, sleep } from "./helpers.ts";
import { signingEnv } from "../../../test/support/signing.ts";

let redis: ChildProcess;
let redisPort: number;
let dir: string;
let a: RunningTelemetry;
let b: RunningTelemetry;
let c: RunningTelemetry;

async function startRedis(): Promise<void> {
  redis = spawn("redis-server", ["--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], { stdio: "ignore" });
  for (let i = 0; i < 100; i++) {
    const ok = await new Promise<boolean>((resolve) => {
      const probe = spawn("redis-cli", ["-p", String(redisPort), "ping"], { stdio: ["ignore", "pipe", "ignore"] });
      let out = "";
      probe.stdout.on("data", (d: Buffer) => (out += d.toString()));
      probe.once("exit", () => resolve(out.includes("PONG")));
    });
    if (ok) return;
    await sleep(50);
  }
  throw new Error("private redis-server did not start");
}

async function stopRedis(): Promise<void> {
  if (redis.exitCode !== null || redis.signalCode !== null) return;
  const exited = new Promise((resolve) => redis.once("exit", resolve));
  redis.kill("SIGKILL");
  await exited;
}

beforeAll(async () => {
  redisPort = await freePort();
  await startRedis();
  dir = mkdtempSync(path.join(tmpdir(), "outpost-telemetry-replicas-"));
  const logger = createLogger("telemetry-test", "silent");
  const config = (idlePollMs: string) =>
    loadTelemetryConfig({
      ...signingEnv("telemetry"),
      OUTPOST_TELEMETRY_PORT: "0",
      OUTPOST_DATA_DIR: dir,
      OUTPOST_REDIS_URL: `redis://127.0.0.1:${redisPort}`,
      OUTPOST_TELEMETRY_IDLE_POLL_MS: idlePollMs,
    });
  a = await startTelemetry(config("600000"), logger);
  // B hears of new chunks only through Redis; C also checks storage when quiet for 300 ms.
  b = await startTelemetry(config("600000"), logger);
  c = await startTelemetry(config("300"), logger);
  await sleep(300); // both connected
});

afterAll(async () => {
  await a?.close();
  await b?.close();
  await c?.close();
  if (redis) await stopRedis();
  rmSync(dir, { recursive: true, force: true });
});

describe("live fan-out between replicas through Redis", () => {
  it("delivers chunks ingested on A to a subscriber on B while the run is live", async () => {
    const id = ulid();
    const onA = clientsFor(a.url);
    const onB = clientsFor(b.url);
    await onA.dispatcher.registerRun({ dispatchId: id, tenantId: "t-a" });
    const seen: number[] = [];
    const firstSeen = new Promise<void>((resolve) => {
      void (async () => {
        for await (const msg of onB.tenant("t-a").subscribeLogs({ dispatchId: id })) {
          seen.push(...msg.chunks.map((c) => Number(c.seq)));
          if (seen.length > 0) resolve();
          if (msg.runEnd) break;
        }
      })();
    });
    await sleep(200); // B's SUBSCRIBE took effect
    await ingest(onA.executor, [batch(id, "t-a", range(1, 5))]);
    await firstSeen; // B never polls storage on its own: only Redis can have woken it
    await ingest(onA.executor, [batch(id, "t-a", range(6, 10))]);
    await onA.dispatcher.completeRun({ dispatchId: id, tenantId: "t-a", runEnd: runEnd(10) });
    for (let i = 0; i < 50 && seen.length < 10; i++) await sleep(50);
    expect(seen).toEqual(range(1, 10));
  });

  it("feeds each listener once: the publishing replica locally, the other through Redis (its own echo skipped)", async () => {
    const logger = createLogger("feed-test", "silent");
    const redisA = connectRedis(`redis://127.0.0.1:${redisPort}`, logger);
    const redisB = connectRedis(`redis://127.0.0.1:${redisPort}`, logger);
    const feedA = new RedisLiveFeed(redisA, logger);
    const feedB = new RedisLiveFeed(redisB, logger);
    try {
      const id = ulid();
      const got = { a: [] as number[], b: [] as number[] };
      const listener = (into: number[]) => ({ onChunks: (chunks: StoredChunk[]) => into.push(...chunks.map((c) => c.seq)), onEnd: () => undefined });
      feedA.subscribe(id, listener(got.a));
      feedB.subscribe(id, listener(got.b));
      await sleep(200); // both SUBSCRIBEs took effect
      const chunk = (seq: number): StoredChunk => ({ dispatchId: id, seq, stream: 1, text: `line ${seq}`, timeMs: Date.now() });
      feedA.publish(id, [chunk(1), chunk(2)]);
      expect(got.a).toEqual([1, 2]); // at once, without Redis
      for (let i = 0; i < 50 && got.b.length < 2; i++) await sleep(20);
      expect(got.b).toEqual([1, 2]);
      await sleep(200); // A's own message came back from Redis meanwhile, and was skipped
      expect(got.a).toEqual([1, 2]);
    } finally {
      await feedA.close();
      await feedB.close();
      redisA.disconnect();
      redisB.disconnect();
    }
  });

  it("keeps ingesting with Redis down; a subscriber on another replica completes from storage", async () => {
    await stopRedis();
    const id = ulid();
    const onA = clientsFor(a.url);
    const onC = clientsFor(c.url);
    await onA.dispatcher.registerRun({ dispatchId: id, tenantId: "t-a" });
    const watching = (async () => {
      const seqs: number[] = [];
      for await (const msg of onC.tenant("t-a").subscribeLogs({ dispatchId: id })) {
        seqs.push(...msg.chunks.map((chunk) => Number(chunk.seq)));
        if (msg.runEnd) return seqs;
      }
      return seqs;
    })();
    const acked = await ingest(onA.executor, [batch(id, "t-a", range(1, 50)), batch(id, "t-a", range(51, 100))]);
    expect(acked).toEqual([50, 100]);
    await onA.dispatcher.completeRun({ dispatchId: id, tenantId: "t-a", runEnd: runEnd(100) });
    expect(await watching).toEqual(range(1, 100));
  });
});
