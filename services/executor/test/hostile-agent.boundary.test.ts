/**
 * A hostile agent on the real engine (linux/arm64 under qemu here): the executor's core with the
 * real Docker runtime and host run directories (dispatcher and telemetry are fakes). The agent
 * is the demo image with a shell command of its own: it plants links, a FIFO, hard links and
 * terminal escape sequences for the executor (root on the host) to trip over.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { buildDemoAgent, docker, dockerUp, realEngineExecutor, until } from "./boundary-harness.ts";

const EXECUTOR_ID = `test-hostile-${process.pid}`;
const QUOTA = 2 * 1024 * 1024;
const engineAvailable = dockerUp();

describe.skipIf(!engineAvailable)("a hostile agent, on the real engine", () => {
  const base = fs.mkdtempSync(path.join(os.tmpdir(), "outpost-hostile-boundary-"));
  const runsDir = path.join(base, "runs");
  /** A host file and directory the agent must not get the executor to read (stand-ins for /etc/shadow, a key file). */
  const hostDir = path.join(base, "host-secrets");
  const hostFile = path.join(hostDir, "result.json");
  const engine = realEngineExecutor(EXECUTOR_ID, runsDir, QUOTA);
  /** Runs `script` as the agent (the demo image's shell). */
  const run = (script: string) => engine.run("", { command: ["/bin/sh", "-c", script] });

  beforeAll(async () => {
    buildDemoAgent();
    fs.mkdirSync(runsDir);
    fs.mkdirSync(hostDir);
    fs.writeFileSync(hostFile, JSON.stringify({ stolen: "host-secret-value" }));
    await engine.start();
  });

  afterAll(async () => {
    await engine.stop();
    fs.rmSync(base, { recursive: true, force: true });
  });

  it("a result that is a link to a host file, or reached through a linked directory, is refused, not read", async () => {
    const file = await run(`mkdir -p /workspace/.outpost && ln -s ${hostFile} /workspace/.outpost/result.json`);
    expect(file.end).toMatchObject({ state: Dispatch_State.FAILED, failureReason: "the result could not be read: .outpost/result.json must not be a symbolic link" });
    const dir = await run(`ln -s ${hostDir} /workspace/.outpost`);
    expect(dir.end).toMatchObject({ state: Dispatch_State.FAILED, failureReason: "the result could not be read: .outpost/result.json must not be a symbolic link" });
    // The links went with the run directory; what they named did not.
    expect(fs.readFileSync(hostFile, "utf8")).toContain("host-secret-value");
    await until("run directories removed", () => fs.readdirSync(runsDir).length === 0, 10_000);
  });

  it("a result that is a FIFO is refused at once, not waited on", async () => {
    const { end, elapsedMs } = await run("mkdir -p /workspace/.outpost && mkfifo /workspace/.outpost/result.json");
    expect(end).toMatchObject({ state: Dispatch_State.FAILED, failureReason: "the result could not be read: .outpost/result.json is not a regular file" });
    expect(elapsedMs).toBeLessThan(30_000);
  });

  it("hard links to one file are no way around the disk quota", async () => {
    const { end } = await run('cd /workspace && echo x > f && i=0; while [ $i -lt 600 ]; do ln f "l$i" || exit 3; i=$((i+1)); done; sleep 5');
    expect(end.state).toBe(Dispatch_State.FAILED);
    expect(end.failureReason).toMatch(/^workspace exceeded its disk quota of 2097152 bytes/);
  });

  it("terminal escape sequences reach telemetry as visible text; colours stay", async () => {
    const { end, texts } = await run("printf '\\033]52;c;cHduZWQ=\\007ok\\rFAKE \\033[32mgreen\\033[0m\\n'");
    expect(end.state).toBe(Dispatch_State.SUCCEEDED);
    expect(texts).toContain("␛]52;c;cHduZWQ=␇ok␍FAKE \x1b[32mgreen\x1b[0m");
    expect(docker("ps", "-aq", "--filter", `label=dev.outpost.executor-id=${EXECUTOR_ID}`)).toBe("");
  });
});
