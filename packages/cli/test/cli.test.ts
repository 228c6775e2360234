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
import { afterAll, beforeAll, describe, expect, it } from "vitest";
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
});
