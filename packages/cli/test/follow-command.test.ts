/**
 * Following a run (`dispatch --follow`, `logs --follow`) against a stand-in gateway, in process:
 * the exit code a run's end maps to, what is said on long waits (queued, a log stream that keeps
 * failing), and Ctrl-C, which stops following (not the run) and says how to pick it up again.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { DispatchSchema, Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { DispatchService, WatchDispatchResponseSchema } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { LogChunkSchema, LogStream, RunEndSchema } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";
import { LogService, SubscribeLogsResponseSchema } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runCli, type CliIo } from "../src/index.ts";
import { Capture } from "./capture.ts";
import { startStandIn, type StandIn } from "./stand-in.ts";

let home: string;
let gateway: StandIn;
const subscribeCalls: Record<string, number> = {};

const end = (state: Dispatch_State, exitCode?: number) => create(SubscribeLogsResponseSchema, { runEnd: create(RunEndSchema, { state, exitCode }) });
const line = (seq: number) =>
  create(SubscribeLogsResponseSchema, {
    chunks: [create(LogChunkSchema, { seq: BigInt(seq), stream: LogStream.STDOUT, text: `line ${seq}`, time: { seconds: BigInt(1_800_000_000 + seq), nanos: 5_000_000 } })],
  });
/** Resolves when `signal` aborts (the client went away). */
const aborted = (signal: AbortSignal) => new Promise<void>((resolve) => signal.addEventListener("abort", () => resolve(), { once: true }));

beforeAll(async () => {
  home = mkdtempSync(path.join(tmpdir(), "outpost-cli-follow-"));
  gateway = await startStandIn((router) => {
    router.service(DispatchService, {
      // QUEUED: queued for 400 ms, then running; anything else: its state, then held open.
      async *watchDispatch(req, context) {
        const dispatch = (state: Dispatch_State) => create(WatchDispatchResponseSchema, { dispatch: create(DispatchSchema, { id: req.dispatchId, state }) });
        if (req.dispatchId === "QUEUED") {
          yield dispatch(Dispatch_State.QUEUED);
          await sleep(400);
          yield dispatch(Dispatch_State.RUNNING);
        } else {
          yield dispatch(Dispatch_State.RUNNING);
        }
        await aborted(context.signal);
      },
    });
    router.service(LogService, {
      async *subscribeLogs(req, context) {
        const call = (subscribeCalls[req.dispatchId] = (subscribeCalls[req.dispatchId] ?? 0) + 1);
        switch (req.dispatchId) {
          case "TIMED_OUT":
            yield end(Dispatch_State.TIMED_OUT, 143);
            return;
          case "CANCELLED":
            yield end(Dispatch_State.CANCELLED, 143);
            return;
          case "FAILED":
            yield end(Dispatch_State.FAILED, 3);
            return;
          case "FAILED_BIG":
            yield end(Dispatch_State.FAILED, 200);
            return;
          case "QUEUED":
            await sleep(600);
            yield line(1);
            yield end(Dispatch_State.SUCCEEDED, 0);
            return;
          case "FLAKY":
            if (call <= 2) throw new ConnectError("upstream went away", Code.Unavailable);
            yield end(Dispatch_State.SUCCEEDED, 0);
            return;
          default: // a long run: a few lines, then nothing until the client leaves
            for (let seq = 1; seq <= 7; seq++) yield line(seq);
            await aborted(context.signal);
        }
      },
    });
  });
});
afterAll(async () => {
  await gateway?.close();
  rmSync(home, { recursive: true, force: true });
});

async function outpost(argv: string[], extra: Partial<CliIo> = {}) {
  const out = new Capture();
  const err = new Capture();
  const env = { OUTPOST_HOME: home, OUTPOST_API_KEY: `otp_${"a".repeat(64)}`, OUTPOST_GATEWAY_URL: gateway.url };
  const code = await runCli(argv, { out, err, env, ...extra });
  return { code, out: out.text, err: err.text };
}

describe("--timestamps", () => {
  it("puts the time each line was read before it, and nothing else changes", async () => {
    const stamped = await outpost(["logs", "QUEUED", "--follow", "--timestamps"]);
    expect(stamped.code, stamped.err).toBe(0);
    expect(stamped.out).toBe("2027-01-15T08:00:01.005Z line 1\n");
    const plain = await outpost(["logs", "QUEUED", "--follow"]);
    expect(plain.out).toBe("line 1\n");
  });
});

describe("the exit code of a followed run", () => {
  it("is the agent's own exit code only when the run FAILED with one (capped at 125)", async () => {
    expect((await outpost(["logs", "FAILED", "--follow"])).code).toBe(3);
    expect((await outpost(["logs", "FAILED_BIG", "--follow"])).code).toBe(125);
  });

  it("is 1 for a timed-out or cancelled run, not the 143 of the SIGTERM that stopped it", async () => {
    for (const id of ["TIMED_OUT", "CANCELLED"]) {
      const res = await outpost(["logs", id, "--follow"]);
      expect(res.err).toContain(`outpost: dispatch ${id} ${id} (exit code 143)`);
      expect(res.code, id).toBe(1);
    }
  });
});

describe("long waits while following", () => {
  it("say that the run is still queued", async () => {
    const res = await outpost(["logs", "QUEUED", "--follow"], { progressEveryMs: 100 });
    expect(res.code, res.err).toBe(0);
    expect(res.err).toMatch(/outpost: still QUEUED after \d+ s, waiting for a free executor\n/);
    expect(res.out).toBe("line 1\n");
  });

  it("say nothing when output or state changes keep coming", async () => {
    const res = await outpost(["logs", "FAILED", "--follow"], { progressEveryMs: 100 });
    expect(res.err).not.toContain("still");
  });

  it("say when the log stream fails and is retried", async () => {
    const res = await outpost(["logs", "FLAKY", "--follow"]);
    expect(res.code, res.err).toBe(0);
    expect(res.err).toContain("outpost: log stream: Unavailable: upstream went away; retrying (attempt 1 of 20)\n");
  });
});

describe("Ctrl-C while following", () => {
  it("stops following, says the run goes on and how to resume after the last line shown, and exits 130", async () => {
    let handler: (() => void) | undefined;
    let undone = false;
    const onInterrupt = (h: () => void) => {
      handler = h;
      return () => {
        undone = true;
      };
    };
    const running = outpost(["logs", "LONG", "--follow"], { onInterrupt });
    for (let i = 0; i < 100 && !handler; i++) await sleep(10);
    await sleep(200); // the seven lines arrive
    handler!();
    const res = await running;
    expect(res.code).toBe(130);
    expect(res.out).toContain("line 7\n");
    expect(res.err).toContain("outpost: stopped following; dispatch LONG goes on (outpost logs LONG --follow --after 7 to follow it again, outpost cancel LONG to stop it)\n");
    expect(undone).toBe(true);
  });
});
