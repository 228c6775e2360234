/**
 * Telemetry across real processes, real containers and a real Redis (issue 6, SPEC L1-L2):
 * - a subscriber that drops its connection at random points and resumes with its last seq
 *   receives the run's output exactly once, in order;
 * - a subscriber on a second telemetry replica sees lines ingested on the first, live, through
 *   Redis (that replica's storage poll is disabled, so only the Redis fan-out can wake it);
 * - the telemetry process is killed and restarted in the middle of a run: the executor buffers
 *   and resends, and every numbered line is stored exactly once, in order.
 *
 * Subscriptions here are raw loops that keep everything they receive (no client-side
 * de-duplication), so a duplicate or a gap from the server fails the test.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { createWriteStream, readFileSync } from "node:fs";
import path from "node:path";
import { ConnectError } from "@connectrpc/connect";
import Docker from "dockerode";
import { internalClient } from "@outpost/platform";
import { keysOf, signingEnv } from "../support/signing.ts";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { LogService, type SubscribeLogsResponse } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import type { LogChunk } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { freePort, REPO_ROOT } from "../../scripts/lib/mesh.ts";
import { startTestMesh, type TestMesh } from "./harness.ts";

const REDIS_URL = process.env.OUTPOST_TEST_REDIS_URL ?? "redis://127.0.0.1:6379";
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

let t: TestMesh;
let tenant: Awaited<ReturnType<TestMesh["newTenant"]>>;

beforeAll(async () => {
  await new Docker().ping();
  execFileSync("bash", [path.join(REPO_ROOT, "test/fixtures/agents/build.sh")], { stdio: "inherit" });
  t = await startTestMesh({ serviceEnv: { telemetry: { OUTPOST_REDIS_URL: REDIS_URL } } });
  tenant = await t.newTenant("Telemetry");
});

afterAll(async () => {
  await t?.mesh.stop();
});

/** Numbers of the "line N" chunks, in the order given. */
function numbered(chunks: LogChunk[]): number[] {
  return chunks.flatMap((c) => {
    const m = /^line (\d+)$/.exec(c.text);
    return m ? [Number(m[1])] : [];
  });
}

const range = (from: number, to: number) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

/** Every chunk as received, in order: the seqs must be 1..n with no repeat. */
function expectExactlyOnce(chunks: LogChunk[]) {
  expect(chunks.map((c) => Number(c.seq))).toEqual(range(1, chunks.length));
}

async function waitForState(id: string, states: Dispatch_State[], timeoutMs = 60_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const { dispatch } = await tenant.clients.dispatches.getDispatch({ dispatchId: id });
    if (states.includes(dispatch!.state)) return dispatch!;
    if (Date.now() > deadline) throw new Error(`dispatch ${id} still ${Dispatch_State[dispatch!.state]}`);
    await sleep(100);
  }
}

describe("subscriptions across reconnects, replicas and restarts", () => {
  it("a subscriber that disconnects at random points and resumes with its last seq gets every line once, in order", async () => {
    // Under qemu each pause costs ~0.1-0.25 s (a fork of sleep), so few lines make a long run.
    const lines = 80;
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: `lines=${lines} interval=0.01` });
    const id = dispatch!.id;
    const received: LogChunk[] = [];
    let end: SubscribeLogsResponse["runEnd"];
    let reconnects = 0;
    // Seeded so a failure can be replayed; each connection reads 1-8 messages before it leaves.
    let seed = 42;
    const random = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
    while (!end) {
      const leaveAfter = 1 + Math.floor(random() * 8);
      const controller = new AbortController();
      const afterSeq = received.length > 0 ? received.at(-1)!.seq : 0n;
      let read = 0;
      try {
        for await (const msg of tenant.clients.logs.subscribeLogs({ dispatchId: id, afterSeq }, { signal: controller.signal })) {
          received.push(...msg.chunks);
          if (msg.runEnd) {
            end = msg.runEnd;
            break;
          }
          if (++read >= leaveAfter) {
            controller.abort();
            break;
          }
        }
      } catch (err) {
        if (!controller.signal.aborted) throw err;
      }
      if (!end) {
        reconnects++;
        await sleep(random() * 300);
      }
    }
    expect(reconnects).toBeGreaterThanOrEqual(3);
    expectExactlyOnce(received);
    expect(numbered(received)).toEqual(range(1, lines));
    expect(end.state).toBe(Dispatch_State.SUCCEEDED);
    expect(Number(end.lastSeq)).toBe(received.length);
  });

  it("a subscriber on a second telemetry replica sees lines ingested on the first, live, through Redis", async () => {
    const port = await freePort();
    const replica: ChildProcess = spawn(process.execPath, ["--disable-warning=ExperimentalWarning", "services/telemetry/src/main.ts"], {
      cwd: REPO_ROOT,
      env: {
        ...process.env,
        ...signingEnv("telemetry"),
        OUTPOST_DATA_DIR: path.join(t.dir, "data"), // the shared store (MongoDB in production)
        OUTPOST_TELEMETRY_PORT: String(port),
        OUTPOST_REDIS_URL: REDIS_URL,
        // No storage polling: only a Redis message can wake this replica's subscription.
        OUTPOST_TELEMETRY_IDLE_POLL_MS: "600000",
        OUTPOST_LOG_LEVEL: "debug",
      },
      stdio: ["ignore", "pipe", "pipe"],
    });
    const log = createWriteStream(path.join(t.dir, "logs", "telemetry-replica.log"));
    replica.stdout!.pipe(log);
    replica.stderr!.pipe(log);
    try {
      const url = `http://127.0.0.1:${port}`;
      for (let i = 0; ; i++) {
        if ((await fetch(`${url}/healthz`).catch(() => undefined))?.ok) break;
        if (i > 200) throw new Error("replica did not start");
        await sleep(50);
      }
      const logs = internalClient(LogService, {
        baseUrl: url,
        signingKeys: keysOf("gateway"),
        identity: { kind: "tenant", tenantId: tenant.tenantId, principal: "key/test" },
      });
      const lines = 60;
      const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: `lines=${lines} interval=0.02` });
      const id = dispatch!.id;
      await waitForState(id, [Dispatch_State.RUNNING, Dispatch_State.SUCCEEDED]);
      const received: LogChunk[] = [];
      let stateAtLine20: Dispatch_State | undefined;
      let end: SubscribeLogsResponse["runEnd"];
      for await (const msg of logs.subscribeLogs({ dispatchId: id })) {
        received.push(...msg.chunks);
        if (stateAtLine20 === undefined && numbered(received).includes(20)) {
          stateAtLine20 = (await tenant.clients.dispatches.getDispatch({ dispatchId: id })).dispatch!.state;
        }
        end = msg.runEnd;
      }
      // Line 20 reached the other replica while the run was still printing.
      expect(stateAtLine20).toBe(Dispatch_State.RUNNING);
      expectExactlyOnce(received);
      expect(numbered(received)).toEqual(range(1, lines));
      expect(end?.state).toBe(Dispatch_State.SUCCEEDED);
    } finally {
      replica.kill("SIGTERM");
      await new Promise((resolve) => replica.once("exit", resolve));
    }
  });

  it("the telemetry process restarts in the middle of a run: every numbered line arrives exactly once, in order", async () => {
    // Long enough that the run is still printing when telemetry is back (also on a native host).
    const lines = 150;
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: `lines=${lines} interval=0.02` });
    const id = dispatch!.id;
    const received: LogChunk[] = [];
    // Follow until line 20 is live, then kill telemetry hard (no drain) and start it again.
    const first = tenant.clients.logs.subscribeLogs({ dispatchId: id })[Symbol.asyncIterator]();
    while (!numbered(received).includes(20)) {
      const next = await first.next();
      if (next.done) throw new Error("subscription ended before line 20");
      received.push(...next.value.chunks);
    }
    await t.mesh.kill("telemetry", "SIGKILL");
    await first.return?.().catch(() => undefined);
    await sleep(1500); // the executor keeps reading the container into its bounded buffer meanwhile
    await t.mesh.start("telemetry");
    const final = await waitForState(id, [Dispatch_State.SUCCEEDED, Dispatch_State.FAILED], 90_000);
    expect(final.state).toBe(Dispatch_State.SUCCEEDED);
    // The executor did lose its stream and resend (not merely outlive a quiet pause).
    expect(readFileSync(path.join(t.dir, "logs", "executor.log"), "utf8")).toContain(id);
    const shipperLog = readFileSync(path.join(t.dir, "logs", "executor.log"), "utf8")
      .split("\n")
      .filter((l) => l.includes(id) && l.includes("log stream to telemetry broke"));
    expect(shipperLog.length).toBeGreaterThan(0);

    // Resume the live subscriber from its last seq, and read the stored history in pages.
    let end: SubscribeLogsResponse["runEnd"];
    for (let attempt = 0; !end; attempt++) {
      try {
        for await (const msg of tenant.clients.logs.subscribeLogs({ dispatchId: id, afterSeq: received.at(-1)!.seq })) {
          received.push(...msg.chunks);
          end = msg.runEnd;
        }
      } catch (err) {
        if (attempt > 20) throw err;
        expect(ConnectError.from(err).code).toBeDefined();
        await sleep(200);
      }
    }
    expectExactlyOnce(received);
    expect(numbered(received)).toEqual(range(1, lines));
    const history: LogChunk[] = [];
    let pageToken = "";
    do {
      const page = await tenant.clients.logs.getLogs({ dispatchId: id, pageSize: 64, pageToken });
      history.push(...page.chunks);
      pageToken = page.nextPageToken;
    } while (pageToken);
    expectExactlyOnce(history);
    expect(numbered(history)).toEqual(range(1, lines));
    expect(Number(end.lastSeq)).toBe(history.length);
  });

  it("a subscriber that stops reading (SIGSTOP) through the gateway slows neither the run nor another subscriber, and resumes from storage", async () => {
    const lines = 100_000;
    const overflows = async () => {
      const text = await (await fetch(`${t.mesh.urls.telemetry}/metrics`)).text();
      return Number(/^outpost_log_subscriber_overflows_total\{[^}]*\} (\d+)/m.exec(text)?.[1] ?? 0);
    };
    const overflowsBefore = await overflows();
    const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: `lines=${lines}`, timeout: { seconds: 300n, nanos: 0 } });
    const id = dispatch!.id;
    const summaryFile = path.join(t.dir, `stalled-${id}.json`);
    const stalled = spawn(process.execPath, ["--disable-warning=ExperimentalWarning", "test/fixtures/raw-subscriber.ts", t.mesh.urls.gateway, tenant.apiKey, id, summaryFile], {
      cwd: REPO_ROOT,
      stdio: ["ignore", "pipe", "inherit"],
    });
    const exited = new Promise((resolve) => stalled.once("exit", resolve));
    try {
      await new Promise<void>((resolve, reject) => {
        stalled.stdout!.once("data", () => resolve());
        stalled.once("exit", (code) => reject(new Error(`subscriber exited (${code}) before its first chunk`)));
      });
      stalled.kill("SIGSTOP");

      // Another subscriber, reading normally, gets the whole run while the first one is stopped.
      const received: LogChunk[] = [];
      let end: SubscribeLogsResponse["runEnd"];
      for await (const msg of tenant.clients.logs.subscribeLogs({ dispatchId: id })) {
        received.push(...msg.chunks);
        if (msg.runEnd) end = msg.runEnd;
      }
      expect(end?.state).toBe(Dispatch_State.SUCCEEDED);
      expectExactlyOnce(received);
      expect(numbered(received)).toEqual(range(1, lines));

      // Telemetry noticed the stopped one fell behind (its live buffer overflowed) while it was still stopped.
      const deadline = Date.now() + 30_000;
      while ((await overflows()) <= overflowsBefore && Date.now() < deadline) await sleep(250);
      expect(await overflows()).toBeGreaterThan(overflowsBefore);

      // Woken up, it catches up from storage: every chunk once, in order, then the run's end.
      stalled.kill("SIGCONT");
      await Promise.race([exited, sleep(60_000)]);
      const summary = JSON.parse(readFileSync(summaryFile, "utf8")) as Record<string, unknown>;
      expect(summary).toMatchObject({ count: received.length, inOrderOnce: true, resumedFromStorage: true, ended: true });
      expect(summary.droppedLiveChunks).toBeGreaterThan(0);
    } finally {
      stalled.kill("SIGCONT");
      stalled.kill("SIGKILL");
    }
  }, 180_000);
});
