import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { Capture } from "./capture.ts";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { LogChunkSchema, LogStream, RunEndSchema } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";
import { LogService, SubscribeLogsResponseSchema } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { followLogs, runCli } from "../src/index.ts";

let home: string;
beforeAll(() => {
  // An empty OUTPOST_HOME, so a developer's .outpost/credentials.json never leaks into the tests.
  home = mkdtempSync(path.join(tmpdir(), "outpost-cli-"));
});
afterAll(() => rmSync(home, { recursive: true, force: true }));

async function run(argv: string[], env: NodeJS.ProcessEnv = { OUTPOST_API_KEY: `otp_${"a".repeat(64)}` }) {
  const out = new Capture();
  const err = new Capture();
  const code = await runCli(argv, { out, err, env: { OUTPOST_HOME: home, ...env } });
  return { code, out: out.text, err: err.text };
}

/** A loopback port nothing listens on. */
async function closedPort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as net.AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

describe("runCli usage errors", () => {
  let gateway: string;
  beforeAll(async () => {
    // Usage errors must be caught before any call: a closed port would turn a call into exit 1.
    gateway = `http://127.0.0.1:${await closedPort()}`;
  });

  it("prints usage and exits 2 without a command, 0 with --help", async () => {
    const none = await run([]);
    expect(none.code).toBe(2);
    expect(none.out).toContain("usage: outpost");
    expect((await run(["--help"])).code).toBe(0);
  });

  const cases: [string, string[], RegExp][] = [
    ["an unknown command", ["frobnicate"], /unknown command "frobnicate"/],
    ["an unknown option", ["get", "D1", "--nope"], /nope/],
    ["--env without =", ["dispatch", "--agent", "echo", "--task", "t", "--env", "NOEQUALS"], /--env takes KEY=VALUE, got "NOEQUALS"/],
    ["--env with an empty key", ["dispatch", "--agent", "echo", "--task", "t", "--env", "=v"], /--env takes KEY=VALUE/],
    ["--label without =", ["dispatch", "--agent", "echo", "--task", "t", "--label", "x"], /--label takes KEY=VALUE/],
    ["a bad --model-tier", ["dispatch", "--agent", "echo", "--task", "t", "--model-tier", "turbo"], /--model-tier must be one of .*fast/],
    ["a bad --timeout", ["dispatch", "--agent", "echo", "--task", "t", "--timeout", "5m"], /--timeout takes seconds/],
    ["a --timeout finer than a millisecond", ["dispatch", "--agent", "echo", "--task", "t", "--timeout", "1.0000001"], /--timeout takes seconds above 0, to the millisecond at most.*"1\.0000001"/],
    ["a --timeout of 0", ["dispatch", "--agent", "echo", "--task", "t", "--timeout", "0"], /--timeout takes seconds above 0/],
    ["a --timeout beyond any number", ["dispatch", "--agent", "echo", "--task", "t", "--timeout", "9".repeat(400)], /--timeout takes seconds/],
    ["a --timeout in exponent form", ["dispatch", "--agent", "echo", "--task", "t", "--timeout", "1e3"], /--timeout takes seconds/],
    ["list --page-size abc", ["list", "--page-size", "abc"], /--page-size takes a number/],
    ["list --page-size -1", ["list", "--page-size=-1"], /--page-size takes a number/],
    ["list --limit 0", ["list", "--limit", "0"], /--limit takes a number above 0/],
    ["list --limit abc", ["list", "--limit", "abc"], /--limit takes a number above 0/],
    ["list with both --limit and --all", ["list", "--limit", "5", "--all"], /pass --limit <n> or --all, not both/],
    ["secret put with --value and --value-file", ["secret", "put", "X", "--value", "a", "--value-file", "/dev/null"], /pass --value or --value-file, not both/],
    ["secret put with an unreadable --value-file", ["secret", "put", "X", "--value-file", "/nonexistent/token"], /cannot read \/nonexistent\/token: ENOENT/],
    ["get without a dispatch id", ["get"], /missing dispatch id/],
    ["cancel without a dispatch id", ["cancel"], /missing dispatch id/],
    ["logs without a dispatch id", ["logs"], /missing dispatch id/],
    ["a bad --state", ["list", "--state", "sleeping"], /--state must be one of/],
    ["an unknown admin command", ["admin", "tenant", "delete"], /admin commands/],
    ["an unknown admin area", ["admin", "robots"], /outpost: admin commands: .*admin agent register --file <agent\.json\|yaml>/],
    ["an unknown admin agent command", ["admin", "agent", "delete", "x"], /admin agent commands/],
    ["admin agent register without --file", ["admin", "agent", "register"], /missing --file/],
    ["admin agent update without --file", ["admin", "agent", "update"], /missing --file/],
    ["admin agent register with a missing file", ["admin", "agent", "register", "--file", "/nonexistent/agent.json"], /cannot read \/nonexistent\/agent.json: ENOENT/],
    ["admin agent disable without a name", ["admin", "agent", "disable"], /missing agent name/],
    ["dispatch without --agent", ["dispatch", "--task", "t"], /missing --agent <name>/],
    ["dispatch without --task", ["dispatch", "--agent", "demo"], /missing --task "<text>"/],
    ["logs --json (the output is the run's own lines)", ["logs", "D1", "--json"], /--json is not available with logs/],
    ["dispatch --follow --json", ["dispatch", "--agent", "demo", "--task", "t", "--follow", "--json"], /--json is not available with dispatch --follow/],
    ["an admin command given --api-key (the admin token is never taken from it)", ["admin", "tenant", "list", "--api-key", `otp_${"b".repeat(64)}`], /--api-key is a tenant's key; admin commands take the admin token from OUTPOST_ADMIN_TOKEN/],
    ["fleet given --api-key", ["fleet", "--api-key", `otp_${"b".repeat(64)}`], /--api-key is a tenant's key; fleet takes the admin token/],
  ];
  for (const [what, argv, message] of cases) {
    it(`exits 2 on ${what}`, async () => {
      const res = await run([...argv, "--gateway", gateway], { OUTPOST_API_KEY: `otp_${"a".repeat(64)}`, OUTPOST_ADMIN_TOKEN: "t".repeat(40) });
      expect(res.code).toBe(2);
      expect(res.err).toMatch(message);
      expect(res.err).toContain("usage: outpost");
      expect(res.out).toBe("");
    });
  }

  it("exits 2 naming OUTPOST_API_KEY when there is no API key", async () => {
    const res = await run(["get", "D1", "--gateway", gateway], {});
    expect(res.code).toBe(2);
    expect(res.err).toContain("OUTPOST_API_KEY");
  });

  it("exits 2 naming OUTPOST_ADMIN_TOKEN for fleet without one (an API key is not enough)", async () => {
    const res = await run(["fleet", "--gateway", gateway], { OUTPOST_API_KEY: `otp_${"a".repeat(64)}` });
    expect(res.code).toBe(2);
    expect(res.err).toContain("OUTPOST_ADMIN_TOKEN");
  });

  it("exits 2 naming OUTPOST_ADMIN_TOKEN for admin commands without one", async () => {
    const res = await run(["admin", "tenant", "create", "Acme", "a@b.c", "--gateway", gateway], { OUTPOST_API_KEY: `otp_${"a".repeat(64)}` });
    expect(res.code).toBe(2);
    expect(res.err).toContain("OUTPOST_ADMIN_TOKEN");
  });
});

describe("runCli with a gateway that is not a URL", () => {
  it("exits 2 naming it, before any call, from --gateway or OUTPOST_GATEWAY_URL", async () => {
    for (const [argv, env] of [
      [["agents", "--gateway", "localhost:7100"], {}],
      [["agents"], { OUTPOST_GATEWAY_URL: "notaurl" }],
    ] as const) {
      const res = await run([...argv], { OUTPOST_API_KEY: `otp_${"a".repeat(64)}`, ...env });
      expect(res.code, res.err).toBe(2);
      expect(res.err).toMatch(/outpost: the gateway must be an http:\/\/ or https:\/\/ URL, e\.g\. http:\/\/127\.0\.0\.1:7100 \(got "(localhost:7100|notaurl)"/);
    }
  });
});

describe("runCli against an unreachable gateway", () => {
  it("exits 1 with Unavailable and a hint to run npm start", async () => {
    const gateway = `http://127.0.0.1:${await closedPort()}`;
    for (const argv of [["get", "D1"], ["agents"]]) {
      const res = await run([...argv, "--gateway", gateway]);
      expect(res.code).toBe(1);
      expect(res.err).toMatch(/unavailable/i);
      expect(res.err).toContain("npm start");
    }
    // The gateway URL can also come from the environment.
    const viaEnv = await run(["get", "D1"], { OUTPOST_API_KEY: `otp_${"a".repeat(64)}`, OUTPOST_GATEWAY_URL: gateway });
    expect(viaEnv.code).toBe(1);
    expect(viaEnv.err).toContain("npm start");
  });
});

describe("followLogs", () => {
  const chunk = (seq: number) =>
    create(LogChunkSchema, { dispatchId: "D1", seq: BigInt(seq), stream: seq % 2 ? LogStream.STDOUT : LogStream.STDERR, text: `line ${seq}` });
  const batch = (...seqs: number[]) => create(SubscribeLogsResponseSchema, { chunks: seqs.map(chunk) });

  it("resumes after a dropped stream from the last seq, delivering every chunk once, in order", async () => {
    const requests: bigint[] = [];
    const transport = createRouterTransport(({ service }) => {
      service(LogService, {
        async *subscribeLogs(req) {
          requests.push(req.afterSeq);
          if (requests.length === 1) {
            yield batch(1, 2);
            yield batch(3);
            throw new ConnectError("upstream went away", Code.Unavailable);
          }
          // The server replays from after_seq; an overlapping chunk must not be delivered twice.
          yield batch(...[3, 4, 5].filter((s) => BigInt(s) > req.afterSeq - 1n));
          yield create(SubscribeLogsResponseSchema, {
            chunks: [chunk(6)],
            runEnd: create(RunEndSchema, { state: Dispatch_State.SUCCEEDED, exitCode: 0, lastSeq: 6n }),
          });
        },
        async getLogs() {
          throw new ConnectError("unused", Code.Unimplemented);
        },
      });
    });
    const seen: number[] = [];
    const reconnects: bigint[] = [];
    const end = await followLogs(createClient(LogService, transport), "D1", (c) => seen.push(Number(c.seq)), {
      onReconnect: (after) => reconnects.push(after),
    });
    expect(seen).toEqual([1, 2, 3, 4, 5, 6]);
    expect(requests).toEqual([0n, 3n]);
    expect(reconnects).toEqual([3n]);
    expect(end.state).toBe(Dispatch_State.SUCCEEDED);
    expect(end.lastSeq).toBe(6n);
  });

  it("resumes when the stream ends without a run end (server draining)", async () => {
    const requests: bigint[] = [];
    const transport = createRouterTransport(({ service }) => {
      service(LogService, {
        async *subscribeLogs(req) {
          requests.push(req.afterSeq);
          if (requests.length === 1) {
            yield batch(1, 2);
            return;
          }
          yield create(SubscribeLogsResponseSchema, { chunks: [chunk(3)], runEnd: create(RunEndSchema, { state: Dispatch_State.FAILED, exitCode: 3, lastSeq: 3n }) });
        },
        async getLogs() {
          throw new ConnectError("unused", Code.Unimplemented);
        },
      });
    });
    const seen: number[] = [];
    const end = await followLogs(createClient(LogService, transport), "D1", (c) => seen.push(Number(c.seq)), { afterSeq: 0n });
    expect(seen).toEqual([1, 2, 3]);
    expect(requests).toEqual([0n, 2n]);
    expect(end.exitCode).toBe(3);
  });

  it("does not retry a non-retryable error", async () => {
    let calls = 0;
    const transport = createRouterTransport(({ service }) => {
      service(LogService, {
        // eslint-disable-next-line require-yield
        async *subscribeLogs() {
          calls++;
          throw new ConnectError("dispatch not found", Code.NotFound);
        },
        async getLogs() {
          throw new ConnectError("unused", Code.Unimplemented);
        },
      });
    });
    await expect(followLogs(createClient(LogService, transport), "D1", () => {})).rejects.toMatchObject({ code: Code.NotFound });
    expect(calls).toBe(1);
  });

  describe("streams that fail retryably", () => {
    afterEach(() => {
      vi.useRealTimers();
    });
    /**
     * A log service whose n-th subscription (1-based) yields the chunks `answer` gives, then ends
     * with the run's end when `answer` says so, else fails UNAVAILABLE. Records each call's
     * after_seq and (fake) clock time.
     */
    const logsFailing = (answer: (call: number) => { seqs: number[]; end?: boolean }) => {
      const calls: { afterSeq: bigint; at: number }[] = [];
      const transport = createRouterTransport(({ service }) => {
        service(LogService, {
          async *subscribeLogs(req) {
            calls.push({ afterSeq: req.afterSeq, at: Date.now() });
            const { seqs, end } = answer(calls.length);
            if (seqs.length > 0) yield batch(...seqs);
            if (end) {
              yield create(SubscribeLogsResponseSchema, { runEnd: create(RunEndSchema, { state: Dispatch_State.SUCCEEDED, exitCode: 0 }) });
              return;
            }
            throw new ConnectError("upstream went away", Code.Unavailable);
          },
          async getLogs() {
            throw new ConnectError("unused", Code.Unimplemented);
          },
        });
      });
      return { logs: createClient(LogService, transport), calls };
    };

    it("resume at once, without sleeping, when each delivered new chunks before it failed", async () => {
      // Ten drops in a row, each after one new line: 10 × 200 ms if a drop after progress backed off.
      const { logs, calls } = logsFailing((call) => (call > 10 ? { seqs: [], end: true } : { seqs: [call] }));
      const seen: number[] = [];
      const reconnects: bigint[] = [];
      const started = performance.now();
      const end = await followLogs(logs, "D1", (c) => seen.push(Number(c.seq)), { onReconnect: (after) => reconnects.push(after) });
      expect(performance.now() - started).toBeLessThan(1000);
      expect(end.state).toBe(Dispatch_State.SUCCEEDED);
      expect(seen).toEqual(Array.from({ length: 10 }, (_, i) => i + 1));
      expect(calls.map((c) => c.afterSeq)).toEqual(Array.from({ length: 11 }, (_, i) => BigInt(i)));
      expect(reconnects).toEqual(Array.from({ length: 10 }, (_, i) => BigInt(i + 1)));
    });

    it("back off while they fail without new chunks, and resume at once after one that delivered", async () => {
      vi.useFakeTimers();
      // Three failures without output, one after a new line, one more without, then the run's end.
      const { logs, calls } = logsFailing((call) => (call === 4 ? { seqs: [1] } : call === 6 ? { seqs: [], end: true } : { seqs: [] }));
      const start = Date.now();
      const outcome = followLogs(logs, "D1", () => {});
      await vi.advanceTimersByTimeAsync(10_000);
      expect((await outcome).state).toBe(Dispatch_State.SUCCEEDED);
      // 200, 400, 800 ms between the first four; none after the one with output (its failure
      // count starts afresh: the next failure without output waits 200 ms again).
      expect(calls.map((c) => c.at - start)).toEqual([0, 200, 600, 1400, 1400, 1600]);
      expect(calls.map((c) => c.afterSeq)).toEqual([0n, 0n, 0n, 0n, 1n, 1n]);
    });
  });

  describe("streams that end cleanly without the run's end", () => {
    afterEach(() => {
      vi.useRealTimers();
    });
    const runEnd = () => create(SubscribeLogsResponseSchema, { runEnd: create(RunEndSchema, { state: Dispatch_State.SUCCEEDED, exitCode: 0 }) });
    /** A log service whose subscriptions answer as `answer` says for the n-th call (1-based). */
    const logsAnswering = (answer: (call: number, afterSeq: bigint) => ReturnType<typeof batch>[]) => {
      const calls: bigint[] = [];
      const transport = createRouterTransport(({ service }) => {
        service(LogService, {
          async *subscribeLogs(req) {
            calls.push(req.afterSeq);
            yield* answer(calls.length, req.afterSeq);
          },
          async getLogs() {
            throw new ConnectError("unused", Code.Unimplemented);
          },
        });
      });
      return { logs: createClient(LogService, transport), calls };
    };

    it("back off when they deliver nothing new, and give up with UNAVAILABLE after 20 reconnects", async () => {
      vi.useFakeTimers();
      // Ends at once, every time (the bound only keeps a regression from spinning for ever).
      const { logs, calls } = logsAnswering((call) => (call > 100 ? [runEnd()] : []));
      const outcome = followLogs(logs, "D1", () => {}).then(
        () => "resolved",
        (err: unknown) => err,
      );
      await vi.advanceTimersByTimeAsync(1000);
      expect(calls.length).toBeLessThanOrEqual(3); // at 0, 200 and 600 ms: no tight loop
      await vi.advanceTimersByTimeAsync(120_000);
      expect(await outcome).toMatchObject({ code: Code.Unavailable, rawMessage: expect.stringContaining("ended without new output") });
      expect(calls.length).toBe(21);
    });

    it("resume at once, as often as needed, when each delivered new chunks", async () => {
      // 30 drains in a row (more than the reconnect limit), each after one new line.
      const { logs, calls } = logsAnswering((call) => (call > 30 ? [runEnd()] : [batch(call)]));
      const seen: number[] = [];
      const started = performance.now();
      const end = await followLogs(logs, "D1", (c) => seen.push(Number(c.seq)));
      expect(performance.now() - started).toBeLessThan(1000); // no backoff
      expect(end.state).toBe(Dispatch_State.SUCCEEDED);
      expect(seen).toEqual(Array.from({ length: 30 }, (_, i) => i + 1));
      expect(calls).toEqual(Array.from({ length: 31 }, (_, i) => BigInt(i)));
    });

    it("count again from zero after one that delivered new chunks", async () => {
      vi.useFakeTimers();
      // 15 empty ends, one with a new line, 15 empty ends, then the run's end: 30 empty ends in
      // all, more than the limit, but never more than 15 in a row.
      const { logs, calls } = logsAnswering((call) => (call === 16 ? [batch(1)] : call === 32 ? [runEnd()] : []));
      const outcome = followLogs(logs, "D1", () => {});
      await vi.advanceTimersByTimeAsync(120_000);
      expect((await outcome).state).toBe(Dispatch_State.SUCCEEDED);
      expect(calls.length).toBe(32);
      expect(calls.at(-1)).toBe(1n);
    });
  });
});
