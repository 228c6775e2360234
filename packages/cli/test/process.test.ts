/**
 * The CLI as a process (packages/cli/src/main.ts) against a stand-in gateway: a reader that
 * closes the pipe early (`| head -2`), a working directory with a planted
 * .outpost/credentials.json, and `secret put` typed at a real terminal (util-linux `script`
 * gives it one).
 */
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { create } from "@bufbuild/protobuf";
import { DispatchSchema, Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { DispatchService } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { LogChunkSchema, LogStream } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";
import { LogService } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { CLI_MAIN, recordSecrets, startStandIn, type StandIn } from "./stand-in.ts";

const API_KEY = `otp_${"c".repeat(64)}`;
const LAST_PAGE = 1000;

let dir: string;
let gateway: StandIn;
let logPages = 0;
let subscriptions = 0;
let subscriptionsLeft = 0;
const secrets: { name: string; value: string }[] = [];

const line = (seq: number) => create(LogChunkSchema, { dispatchId: "D1", seq: BigInt(seq), stream: LogStream.STDOUT, text: `line ${seq} ${"x".repeat(200)}` });

beforeAll(async () => {
  dir = mkdtempSync(path.join(tmpdir(), "outpost-cli-process-"));
  gateway = await startStandIn((router) => {
    router.service(LogService, {
      // LAST_PAGE pages of 50 long lines: far more than a pipe holds.
      getLogs(req) {
        const page = Number(req.pageToken || "0");
        logPages++;
        return {
          chunks: Array.from({ length: 50 }, (_, i) => line(page * 50 + i + 1)),
          nextPageToken: page + 1 < LAST_PAGE ? String(page + 1) : "",
        };
      },
      // A run that never ends: ten lines every 10 ms until the subscriber leaves.
      async *subscribeLogs(_req, ctx) {
        subscriptions++;
        try {
          for (let seq = 1; !ctx.signal.aborted; seq += 10) {
            yield { chunks: Array.from({ length: 10 }, (_, i) => line(seq + i)) };
            await sleep(10, undefined, { signal: ctx.signal }).catch(() => {});
          }
        } finally {
          subscriptionsLeft++;
        }
      },
    });
    router.service(DispatchService, {
      async listDispatches() {
        await sleep(300); // the reader is long gone when the answer comes
        return { dispatches: [create(DispatchSchema, { id: "D1", state: Dispatch_State.SUCCEEDED, agent: "demo", task: "t" })] };
      },
    });
    recordSecrets(router, secrets);
  });
});
afterAll(async () => {
  await gateway?.close();
  rmSync(dir, { recursive: true, force: true });
});

/**
 * Runs a bash script with $NODE, $CLI (the CLI's entry point) and $GATEWAY set (--norc: with
 * sockets for stdio, bash would otherwise read ~/.bashrc as if started by rshd).
 */
function bash(script: string, env: NodeJS.ProcessEnv, cwd = dir): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn("bash", ["--norc", "--noprofile", "-c", script], {
      cwd,
      env: { PATH: process.env.PATH, NODE: process.execPath, CLI: CLI_MAIN, GATEWAY: gateway.url, ...env },
    });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.on("close", (code) => resolve({ code, stdout, stderr }));
  });
}

const CLI = `"$NODE" --disable-warning=ExperimentalWarning "$CLI"`;

describe("a reader that closes the pipe early", () => {
  const env = () => ({ OUTPOST_API_KEY: API_KEY, OUTPOST_HOME: path.join(dir, "home") });

  it("`outpost logs D1 | head -2` stops paging and exits 0 without a word on stderr", async () => {
    logPages = 0;
    const res = await bash(`${CLI} logs D1 --gateway "$GATEWAY" | head -2; echo "cli exit \${PIPESTATUS[0]}" >&2`, env());
    expect(res.stderr).toBe("cli exit 0\n");
    expect(res.stdout).toBe(`${line(1).text}\n${line(2).text}\n`);
    expect(logPages).toBeGreaterThan(0);
    expect(logPages).toBeLessThan(LAST_PAGE);
  });

  it("`outpost logs D1 --follow | head -2` stops following (the subscription ends) and exits 0", async () => {
    subscriptions = 0;
    subscriptionsLeft = 0;
    const res = await bash(`${CLI} logs D1 --follow --gateway "$GATEWAY" | head -2; echo "cli exit \${PIPESTATUS[0]}" >&2`, env());
    expect(res.stderr).toBe("cli exit 0\n");
    expect(res.stdout).toBe(`${line(1).text}\n${line(2).text}\n`);
    expect(subscriptions).toBe(1); // no reconnect after the pipe closed
    await vi.waitFor(() => expect(subscriptionsLeft).toBe(1));
  });

  it("`outpost list | true` (the reader gone before the only write) exits 0 without a word on stderr", async () => {
    const res = await bash(`${CLI} list --gateway "$GATEWAY" | true; echo "cli exit \${PIPESTATUS[0]}" >&2`, env());
    expect(res.stderr).toBe("cli exit 0\n");
  });
});

describe("Ctrl-C (SIGINT) while following", () => {
  it("stops following, says how to resume and exits 130; the subscription ends", async () => {
    const child = spawn(process.execPath, ["--disable-warning=ExperimentalWarning", CLI_MAIN, "logs", "D1", "--follow"], {
      cwd: dir,
      env: { PATH: process.env.PATH, OUTPOST_HOME: path.join(dir, "sigint-home"), OUTPOST_API_KEY: API_KEY, OUTPOST_GATEWAY_URL: gateway.url },
    });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    const left = subscriptionsLeft;
    const closed = new Promise<number | null>((resolve) => child.on("close", (code) => resolve(code)));
    await vi.waitFor(() => expect(stdout).toContain("line 20 "), { timeout: 10_000 });
    child.kill("SIGINT");
    expect(await closed).toBe(130);
    expect(stderr).toMatch(/outpost: stopped following; dispatch D1 goes on \(outpost logs D1 --follow --after \d+ to follow it again, outpost cancel D1 to stop it\)\n$/);
    await vi.waitFor(() => expect(subscriptionsLeft).toBeGreaterThan(left));
  });
});

describe("a working directory with a planted .outpost/credentials.json", () => {
  let planted: StandIn;
  let repo: string;
  let home: string;
  beforeAll(async () => {
    planted = await startStandIn();
    // What a cloned repository could carry: a valid-looking file naming the attacker's gateway.
    repo = path.join(dir, "cloned-repo");
    mkdirSync(path.join(repo, ".outpost"), { recursive: true, mode: 0o700 });
    writeFileSync(path.join(repo, ".outpost", "credentials.json"), JSON.stringify({ gatewayUrl: planted.url, apiKey: `otp_${"9".repeat(64)}` }), { mode: 0o600 });
    home = path.join(dir, "user-home"); // HOME without an .outpost
    mkdirSync(home);
  });
  afterAll(() => planted?.close());

  it("is never read: a key from OUTPOST_API_KEY is not sent to the gateway it names", async () => {
    const res = await bash(`${CLI} get D1`, { HOME: home, OUTPOST_API_KEY: API_KEY }, repo);
    expect(res.code).toBe(1); // the default gateway: whatever answers there, not the planted one
    expect(planted.requests).toEqual([]);
  });

  it("is never read: without a key the CLI says so (exit 2) and that the old file is ignored", async () => {
    const res = await bash(`${CLI} get D1`, { HOME: home }, repo);
    expect(res.code).toBe(2);
    expect(res.stderr).toContain(`no API key: set OUTPOST_API_KEY or pass --api-key (npm start writes a development key to ${home}/.outpost/credentials.json)`);
    expect(res.stderr).toContain(`${repo}/.outpost/credentials.json is no longer read`);
    expect(planted.requests).toEqual([]);
  });
});

describe("secret put at a real terminal", () => {
  it("prompts on the terminal and the typed value is not echoed", async () => {
    const child = spawn("script", ["-qec", `${CLI} secret put TERMINAL_TOKEN --gateway "$GATEWAY"`, "/dev/null"], {
      env: { PATH: process.env.PATH, NODE: process.execPath, CLI: CLI_MAIN, GATEWAY: gateway.url, OUTPOST_API_KEY: API_KEY, OUTPOST_HOME: path.join(dir, "home"), TERM: "dumb" },
    });
    let screen = "";
    child.stdout.on("data", (d: Buffer) => (screen += d.toString()));
    child.stderr.on("data", (d: Buffer) => (screen += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.on("close", resolve));
    await vi.waitFor(() => expect(screen).toContain("value for TERMINAL_TOKEN (not echoed): "), { timeout: 10_000 });
    child.stdin.write("terminal-s3cret\r");
    expect(await exited, screen).toBe(0);
    expect(secrets.at(-1)).toEqual({ name: "TERMINAL_TOKEN", value: "terminal-s3cret" });
    expect(screen).toContain("secret TERMINAL_TOKEN stored");
    expect(screen).not.toContain("terminal-s3cret");
  });
});
