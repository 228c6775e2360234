/**
 * Crosses the real boundaries: the executor process (spawned as in production) leases from a
 * stub dispatcher over gRPC with signed identity, runs the demo agent as a linux/arm64
 * container in the real Docker engine, streams its output to a stub telemetry, resolves
 * secrets from a stub tenant service and checks repositories out from a git daemon on loopback.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { makeTwoCommitRepo } from "./git-fixture.ts";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { RunningServer } from "@outpost/platform";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { LogStream } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  buildDemoAgent,
  demoLease,
  docker,
  dockerUp,
  removeContainersOf,
  spawnExecutor,
  startStub,
  StubDispatcher,
  StubTelemetry,
  StubTenant,
  TERMINAL,
  until,
  type ExecutorProcess,
} from "./boundary-harness.ts";
import { freePort } from "../../../scripts/lib/ports.ts";

const EXECUTOR_ID = `test-executor-${process.pid}`;
const engineAvailable = dockerUp();
if (!engineAvailable) {
  console.warn("SKIPPED executor boundary tests: the Docker engine is unreachable (run scripts/setup-docker.sh as root)");
}

describe.skipIf(!engineAvailable)("executor process against Docker (linux/arm64)", () => {
  const dispatcher = new StubDispatcher();
  const telemetry = new StubTelemetry();
  const tenant = new StubTenant();
  const servers: RunningServer[] = [];
  let executor: ExecutorProcess;
  let gitDaemon: ChildProcess | undefined;
  let gitBase = "";
  let repoHead = "";
  let repoTagCommit = "";

  const terminalReport = (dispatchId: string) =>
    until(
      () => `terminal report of ${dispatchId}\n${executor.output().slice(-3000)}`,
      () => dispatcher.reportsFor(dispatchId).find((r) => TERMINAL.has(r.state)),
    );

  beforeAll(async () => {
    buildDemoAgent();
    const dispatcherServer = await startStub("stub-dispatcher", dispatcher.routes);
    const telemetryServer = await startStub("stub-telemetry", telemetry.routes);
    const tenantServer = await startStub("stub-tenant", tenant.routes);
    servers.push(dispatcherServer, telemetryServer, tenantServer);

    // A real git repository served by `git daemon` on loopback: two commits, a tag on the first.
    gitBase = fs.mkdtempSync(path.join(os.tmpdir(), "outpost-git-"));
    ({ tagCommit: repoTagCommit, headCommit: repoHead } = makeTwoCommitRepo(gitBase));
    const gitPort = await freePort();
    gitDaemon = spawn("git", ["daemon", "--reuseaddr", "--export-all", `--base-path=${gitBase}`, "--listen=127.0.0.1", `--port=${gitPort}`, gitBase], {
      stdio: "ignore",
    });
    process.env.TEST_GIT_URL = `git://127.0.0.1:${gitPort}/project.git`;
    await until("git daemon", () => {
      try {
        execFileSync("git", ["ls-remote", process.env.TEST_GIT_URL!], { stdio: "ignore" });
        return true;
      } catch {
        return false;
      }
    }, 15_000);

    executor = spawnExecutor({
      OUTPOST_EXECUTOR_ID: EXECUTOR_ID,
      OUTPOST_DISPATCHER_URL: dispatcherServer.url,
      OUTPOST_TELEMETRY_URL: telemetryServer.url,
      OUTPOST_TENANT_URL: tenantServer.url,
      OUTPOST_EXECUTOR_IMAGES: "outpost/demo-agent:latest,outpost/not-built-here:latest",
      // The git daemon is on loopback: allowed as an operator allows an internal git server; the
      // rest of loopback stays refused.
      OUTPOST_EXECUTOR_CHECKOUT_ALLOWED_NETWORKS: "127.0.0.1/32",
    });
    const port = await executor.port();
    const res = await fetch(`http://127.0.0.1:${port}/readyz`);
    expect(res.status).toBe(200);
  });

  afterAll(async () => {
    if (executor) expect(await executor.stop()).toBe(0);
    gitDaemon?.kill();
    for (const server of servers) await server.close();
    removeContainersOf(EXECUTOR_ID);
    if (gitBase) fs.rmSync(gitBase, { recursive: true, force: true });
    if (executor) fs.rmSync(executor.dataDir, { recursive: true, force: true });
  });

  it("runs the agent on arm64, streams its lines in order, reports RUNNING then SUCCEEDED with its result", async () => {
    const lease = demoLease({ task: "say hello lines=5" });
    dispatcher.enqueue(lease);
    const id = lease.dispatch!.id;
    const end = await terminalReport(id);
    const chunks = telemetry.chunksFor(id);
    const texts = chunks.map((c) => c.text);
    expect(texts).toContain("aarch64");
    expect(texts).toEqual(expect.arrayContaining(["line 1", "line 5", "done, exit code 0"]));
    expect(texts.indexOf("line 1")).toBeLessThan(texts.indexOf("line 5"));
    expect(chunks.map((c) => Number(c.seq))).toEqual(chunks.map((_, i) => i + 1));
    expect(chunks.every((c) => c.dispatchId === id && c.stream === LogStream.STDOUT && c.time !== undefined)).toBe(true);
    expect(telemetry.tenants.get(id)).toBe("tenant-boundary");
    expect(dispatcher.reportsFor(id).map((r) => Dispatch_State[r.state])).toEqual(["RUNNING", "SUCCEEDED"]);
    expect(end.exitCode).toBe(0);
    // The result file outlived the container in the bind-mounted workspace.
    expect(end.result).toEqual({ agent: "demo", exit_code: 0, lines: 5 });
    expect(Number(end.lastLogSeq)).toBe(chunks.length);
    expect(dispatcher.callers).toContain(EXECUTOR_ID);
    expect(docker("ps", "-aq", "--filter", `label=dev.outpost.dispatch-id=${id}`)).toBe("");
    // Its run directory goes too (removed just after the report, so wait for it, bounded).
    const runs = path.join(executor.dataDir, "executor", EXECUTOR_ID, "runs");
    await until("run directory removed", () => fs.readdirSync(runs).length === 0);
    expect(fs.readdirSync(runs)).toEqual([]);
  });

  it("finishes a run whose output telemetry refuses for good: asked once, never again, and the agent is not held up", async () => {
    // More lines than the executor buffers (10,000): kept for resending, they would stall the agent.
    const lease = demoLease({ task: "lines=12000" });
    const id = lease.dispatch!.id;
    telemetry.refusing.add(id);
    dispatcher.enqueue(lease);
    const end = await terminalReport(id);
    expect(Dispatch_State[end.state]).toBe("SUCCEEDED");
    expect(Number(end.lastLogSeq)).toBe(0);
    expect(telemetry.requests.get(id)).toBe(1);
    expect(telemetry.chunksFor(id)).toEqual([]);
    expect(executor.output()).toContain("telemetry refused the run's output");
  });

  it("reports its capacity and the images present with every lease call", async () => {
    const capacity = await until("a capacity report with images", () =>
      dispatcher.capacities.findLast((c) => c.imagesPresent.length > 0),
    );
    expect(capacity).toMatchObject({ slotsTotal: 2, engineReady: true, imagesPresent: ["outpost/demo-agent:latest"] });
  });

  it("reports FAILED with the agent's exit code, and stderr lines marked", async () => {
    const lease = demoLease({ task: "fail please exit=3 stderr" });
    dispatcher.enqueue(lease);
    const id = lease.dispatch!.id;
    const end = await terminalReport(id);
    expect(end.state).toBe(Dispatch_State.FAILED);
    expect(end.exitCode).toBe(3);
    expect(end.failureReason).toBe("agent exited with code 3");
    const err = telemetry.chunksFor(id).find((c) => c.text === "a line on stderr");
    expect(err?.stream).toBe(LogStream.STDERR);
    expect(dispatcher.reportsFor(id).map((r) => Dispatch_State[r.state])).toEqual(["RUNNING", "FAILED"]);
  });

  it("validates the result against the agent's output schema", async () => {
    const outputSchema = JSON.stringify({
      type: "object",
      required: ["summary", "score"],
      properties: { summary: { type: "string" }, score: { type: "integer", maximum: 10 } },
    });
    const good = demoLease({ task: 'result={"summary":"all-good","score":7}', agent: { outputSchema } });
    const bad = demoLease({ task: 'result={"summary":5,"score":11}', agent: { outputSchema } });
    const missing = demoLease({ task: "no-result", agent: { outputSchema } });
    const missingNoSchema = demoLease({ task: "no-result" });
    for (const l of [good, bad, missing, missingNoSchema]) dispatcher.enqueue(l);
    const [g, b, m, n] = await Promise.all([good, bad, missing, missingNoSchema].map((l) => terminalReport(l.dispatch!.id)));
    expect(g).toMatchObject({ state: Dispatch_State.SUCCEEDED, result: { summary: "all-good", score: 7 } });
    expect(b!.state).toBe(Dispatch_State.FAILED);
    expect(b!.failureReason).toBe("the result does not match the output schema: /summary must be string; /score must be <= 10");
    expect(m).toMatchObject({ state: Dispatch_State.FAILED, failureReason: "the agent wrote no result (its output schema requires one)" });
    expect(n!.state).toBe(Dispatch_State.SUCCEEDED);
    expect(n!.result).toBeUndefined();
  });

  it("reports a run whose result the dispatcher refuses as too large FAILED with the reason, not lost", async () => {
    const lease = demoLease({ task: 'result={"summary":"big"}' });
    dispatcher.refusingResults.add(lease.dispatch!.id);
    dispatcher.enqueue(lease);
    const end = await terminalReport(lease.dispatch!.id);
    expect(end).toMatchObject({ state: Dispatch_State.FAILED, exitCode: 0 });
    expect(end.result).toBeUndefined();
    expect(end.failureReason).toBe("the result could not be reported: message size 5767144 is larger than configured readMaxBytes 4194304");
  });

  it("runs the container locked down, and cancels it when the heartbeat says so", async () => {
    const lease = demoLease({ task: "wait a while sleep=30" });
    dispatcher.enqueue(lease);
    const id = lease.dispatch!.id;
    await until("RUNNING", () => dispatcher.reportsFor(id).some((r) => r.state === Dispatch_State.RUNNING));
    const containerId = await until("container", () => docker("ps", "-q", "--filter", `label=dev.outpost.dispatch-id=${id}`) || false);
    const info = JSON.parse(docker("inspect", containerId))[0];
    expect(info.Config.User).toBe("65534:65534");
    expect(info.Config.Labels).toMatchObject({
      "dev.outpost.managed": "true",
      "dev.outpost.dispatch-id": id,
      "dev.outpost.tenant-id": "tenant-boundary",
      "dev.outpost.executor-id": EXECUTOR_ID,
      "dev.outpost.lease-id": lease.leaseId,
    });
    expect(info.Config.Env).toEqual(
      expect.arrayContaining([
        `OUTPOST_DISPATCH_ID=${id}`,
        "OUTPOST_TASK=wait a while sleep=30",
        "OUTPOST_MODEL=demo-model",
        "OUTPOST_WORKSPACE=/workspace",
        "OUTPOST_RESULT_PATH=/workspace/.outpost/result.json",
        "TRACEPARENT=00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
      ]),
    );
    expect(info.HostConfig.ReadonlyRootfs).toBe(true);
    expect(info.HostConfig.CapDrop).toEqual(["ALL"]);
    expect(info.HostConfig.SecurityOpt).toEqual(["no-new-privileges"]);
    expect(info.HostConfig.Privileged).toBe(false);
    expect(info.HostConfig.Init).toBe(true);
    expect(info.HostConfig.NetworkMode).toBe("none");
    expect(info.HostConfig.PidsLimit).toBe(256);
    expect(info.HostConfig.Memory).toBe(512 * 1024 * 1024);
    expect(info.HostConfig.NanoCpus).toBe(1_000_000_000);
    expect(Object.keys(info.HostConfig.Tmpfs)).toEqual(["/tmp"]);
    const workspaceMount = info.Mounts.find((m: { Destination: string }) => m.Destination === "/workspace");
    expect(workspaceMount).toMatchObject({ Type: "bind", RW: true });
    expect(fs.statSync(workspaceMount.Source).uid).toBe(process.getuid?.() === 0 ? 65534 : process.getuid?.());
    expect(docker("image", "inspect", "-f", "{{.Architecture}}", info.Image)).toBe("arm64");

    // The agent's TERM handler is in place once it has printed its first line.
    await until("the agent's first line", () => telemetry.textsFor(id).includes("outpost demo agent starting"));
    dispatcher.cancel(id);
    const end = await terminalReport(id);
    expect(end.state).toBe(Dispatch_State.CANCELLED);
    expect(telemetry.textsFor(id)).toContain("received SIGTERM, stopping");
    expect(docker("ps", "-aq", "--filter", `label=dev.outpost.dispatch-id=${id}`)).toBe("");
  });

  it("SIGTERM ends an agent that installs no handler at once: an init runs as PID 1", async () => {
    // As PID 1, a process without a TERM handler would ignore SIGTERM and be SIGKILLed (137)
    // after the grace period; under the init the default action applies (143).
    const lease = demoLease({ task: "no handler", command: ["/bin/sleep", "30"] });
    dispatcher.enqueue(lease);
    const id = lease.dispatch!.id;
    await until("RUNNING", () => dispatcher.reportsFor(id).some((r) => r.state === Dispatch_State.RUNNING));
    dispatcher.cancel(id);
    const end = await terminalReport(id);
    expect(end.state).toBe(Dispatch_State.CANCELLED);
    expect(end.exitCode).toBe(143);
  });

  it("stops a run cancelled through WatchCancellations alone (no heartbeat says so)", async () => {
    dispatcher.cancelViaHeartbeat = false;
    try {
      const lease = demoLease({ task: "wait a while sleep=30", executorId: EXECUTOR_ID });
      dispatcher.enqueue(lease);
      const id = lease.dispatch!.id;
      await until("RUNNING", () => dispatcher.reportsFor(id).some((r) => r.state === Dispatch_State.RUNNING));
      await until("the agent's first line", () => telemetry.textsFor(id).includes("outpost demo agent starting"));
      dispatcher.cancel(id);
      const end = await terminalReport(id);
      expect(end.state).toBe(Dispatch_State.CANCELLED);
      expect(telemetry.textsFor(id)).toContain("received SIGTERM, stopping");
    } finally {
      dispatcher.cancelViaHeartbeat = true;
    }
  });

  it("times out an agent that ignores SIGTERM: SIGTERM, grace, SIGKILL, TIMED_OUT", async () => {
    const lease = demoLease({ task: "stubborn ignore-term sleep=60", timeoutMs: 2500 });
    dispatcher.enqueue(lease);
    const id = lease.dispatch!.id;
    await until("RUNNING", () => dispatcher.reportsFor(id).some((r) => r.state === Dispatch_State.RUNNING));
    const runningAt = Date.now();
    const end = await terminalReport(id);
    const elapsed = Date.now() - runningAt;
    expect(end.state).toBe(Dispatch_State.TIMED_OUT);
    expect(end.failureReason).toBe("timed out after 2.5s");
    // Killed, not terminated: SIGKILL's 137 (a TERM handler would have said so and exited 143).
    expect(end.exitCode).toBe(137);
    expect(telemetry.textsFor(id)).not.toContain("received SIGTERM, stopping");
    // Timeout (2.5 s) plus the 3 s grace: the kill did not come before the grace ran out.
    expect(elapsed).toBeGreaterThanOrEqual(5000);
    expect(docker("ps", "-aq", "--filter", `label=dev.outpost.dispatch-id=${id}`)).toBe("");
  });

  it("injects secrets as environment variables and redacts their values from the shipped output", async () => {
    tenant.secrets.set("tenant-boundary", { API_TOKEN: "tok-very-secret-4242", SHORT: "abc" });
    const lease = demoLease({ task: "print=API_TOKEN print=SHORT", secretNames: ["API_TOKEN", "SHORT"] });
    dispatcher.enqueue(lease);
    const id = lease.dispatch!.id;
    const end = await terminalReport(id);
    expect(end.state).toBe(Dispatch_State.SUCCEEDED);
    const texts = telemetry.textsFor(id);
    expect(texts).toContain("API_TOKEN=[REDACTED:API_TOKEN]");
    expect(texts).toContain("SHORT=abc"); // below the 4-character floor
    expect(texts.join("\n")).not.toContain("tok-very-secret-4242");
    expect(executor.output()).not.toContain("tok-very-secret-4242");

    // Nor in the result or its failure reason: a result that is the secret (not JSON), one with it as a key.
    const notJson = demoLease({ task: "result=tok-very-secret-4242", secretNames: ["API_TOKEN"] });
    const asKey = demoLease({ task: 'result={"tok-very-secret-4242":"tok-very-secret-4242"}', secretNames: ["API_TOKEN"] });
    dispatcher.enqueue(notJson);
    dispatcher.enqueue(asKey);
    const [notJsonEnd, asKeyEnd] = await Promise.all([terminalReport(notJson.dispatch!.id), terminalReport(asKey.dispatch!.id)]);
    expect(notJsonEnd).toMatchObject({ state: Dispatch_State.FAILED, failureReason: expect.stringContaining("the result is not valid JSON") });
    expect(asKeyEnd).toMatchObject({ state: Dispatch_State.SUCCEEDED, result: { "[REDACTED:API_TOKEN]": "[REDACTED:API_TOKEN]" } });
    expect(JSON.stringify([notJsonEnd, asKeyEnd], (_k, v: unknown) => (typeof v === "bigint" ? String(v) : v))).not.toContain("tok-very");

    const missing = demoLease({ task: "print=NOPE", secretNames: ["NOPE_KEY"] });
    dispatcher.enqueue(missing);
    const failed = await terminalReport(missing.dispatch!.id);
    expect(failed).toMatchObject({ state: Dispatch_State.FAILED, failureReason: "secret NOPE_KEY not found" });
  });

  it("checks the repository out into the workspace before the agent starts, at the ref asked for", async () => {
    const url = process.env.TEST_GIT_URL!;
    const tagged = demoLease({ task: "ls-workspace", repo: { url, ref: "v1" } });
    const head = demoLease({ task: "ls-workspace", repo: { url, ref: "" } });
    const badRef = demoLease({ task: "ls-workspace", repo: { url, ref: "no-such-branch" } });
    const fileUrl = demoLease({ task: "ls-workspace", repo: { url: `file://${gitBase}/project.git`, ref: "" } });
    const notAllowed = demoLease({ task: "ls-workspace", repo: { url: url.replace("127.0.0.1", "127.0.0.2"), ref: "" } });
    for (const l of [tagged, head, badRef, fileUrl, notAllowed]) dispatcher.enqueue(l);
    const [t, h, b, f, n] = await Promise.all([tagged, head, badRef, fileUrl, notAllowed].map((l) => terminalReport(l.dispatch!.id)));
    expect(t!.state).toBe(Dispatch_State.SUCCEEDED);
    expect(telemetry.textsFor(tagged.dispatch!.id)).toContain("version.txt: one");
    expect(telemetry.textsFor(tagged.dispatch!.id)).toContain(".git");
    expect(h!.state).toBe(Dispatch_State.SUCCEEDED);
    expect(telemetry.textsFor(head.dispatch!.id)).toContain("version.txt: two");
    expect(b).toMatchObject({ state: Dispatch_State.FAILED });
    expect(b!.failureReason).toMatch(/^repository checkout failed: .*no-such-branch/);
    expect(f!.failureReason).toBe("repository checkout failed: repository scheme file is not allowed on this executor (allowed: https, http, ssh, git)");
    expect(repoHead).not.toBe(repoTagCommit);
    // Through the checkout's guard (git:// goes by its tunnel command): 127.0.0.2 is loopback and not allowed.
    expect(n).toMatchObject({ state: Dispatch_State.FAILED });
    expect(n!.failureReason).toBe(
      "repository checkout failed: the repository's address (or a redirect's) is on a network this executor does not reach: loopback, private, link-local or reserved",
    );
  });

  it("fails a run whose image is not on the host when the dispatcher cannot take the lease back", async () => {
    dispatcher.contractC = false;
    try {
      const lease = demoLease({ task: "anything", image: "outpost/not-built-here:latest" });
      dispatcher.enqueue(lease);
      const end = await terminalReport(lease.dispatch!.id);
      expect(end.state).toBe(Dispatch_State.FAILED);
      expect(end.failureReason).toBe("image outpost/not-built-here:latest not present on executor host");
    } finally {
      dispatcher.contractC = true;
    }
  });

  it("gives a run whose image is missing back as an infrastructure failure (ReleaseLease)", async () => {
    const lease = demoLease({ task: "anything", image: "outpost/not-built-here:latest" });
    dispatcher.enqueue(lease);
    const release = await until("ReleaseLease", () => dispatcher.releases.find((r) => r.dispatchId === lease.dispatch!.id));
    expect(release).toMatchObject({ infrastructureFailure: true, runtimeFailure: true, reason: "image outpost/not-built-here:latest not present on executor host" });
    expect(dispatcher.reportsFor(lease.dispatch!.id)).toEqual([]);
  });
});
