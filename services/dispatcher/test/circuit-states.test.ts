/**
 * Circuit states saved after each outcome and taken up by a replica that starts later
 * (AgentCircuits.restore), in process with a Map for the store; the Redis adapter against a
 * private redis-server that starts late, and one it is cut off from for a while; a real third
 * replica is in replicas.test.ts.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { connectRedis, createLogger } from "@outpost/platform";
import { CIRCUITS_KEY, redisCircuitStates } from "../src/adapters/circuit-states.ts";
import { AgentCircuits, type CircuitOptions, type CircuitStateStore, type RunOutcome } from "../src/core/resilience.ts";
import { freePort } from "../../../scripts/lib/ports.ts";
import { startPrivateRedis, type PrivateRedis } from "../../../scripts/lib/scale-out.ts";
import { startCuttableRedis } from "../../../test/support/cuttable-redis.ts";

const OPTIONS: CircuitOptions = { failureThreshold: 5, windowMs: 60_000, halfOpenAfterMs: 300, successesToClose: 3 };

function memoryStates(): CircuitStateStore & { saved: Map<string, string> } {
  const saved = new Map<string, string>();
  return {
    saved,
    async load() {
      return Object.fromEntries(saved);
    },
    async save(agent, state) {
      saved.set(agent, state);
    },
  };
}

const silentLogger = createLogger("circuit-states-test", "silent");
const failed = (tenantId = "t0"): RunOutcome => ({ succeeded: false, tenantId, runtimeFailure: false });
const SUCCEEDED: RunOutcome = { succeeded: true, tenantId: "t0", runtimeFailure: false };
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe("a tenant's share of counted failures", () => {
  it("is not used up by failures that arrive while the circuit is open (the breaker counts none of them)", async () => {
    const circuits = new AgentCircuits(OPTIONS);
    // t0's four (its share) and one of t1's open it.
    for (let i = 0; i < 4; i++) await circuits.record("aider", failed("t0"));
    await circuits.record("aider", failed("t1"));
    expect(circuits.state("aider")).toBe("OPEN");
    // t1's runs already under way fail while it is open: not counted anywhere.
    for (let i = 0; i < 3; i++) await circuits.record("aider", failed("t1"));
    await sleep(350);
    expect(circuits.state("aider")).toBe("HALF_OPEN");
    // t1's failed trial re-opens it: its share was not spent while the circuit was open.
    await circuits.record("aider", failed("t1"));
    expect(circuits.state("aider")).toBe("OPEN");
  });
});

describe("circuit states across replicas", () => {
  it("a replica restored after three failures opens on the next two, not five", async () => {
    const states = memoryStates();
    const first = new AgentCircuits(OPTIONS, states);
    for (let i = 0; i < 3; i++) await first.record("claude", failed(`t${i % 2}`));
    const late = new AgentCircuits(OPTIONS, states);
    expect(late.restore(await states.load())).toEqual(["claude"]);
    await late.record("claude", failed("t1"));
    expect(late.state("claude")).toBe("CLOSED");
    await late.record("claude", failed("t1"));
    expect(late.state("claude")).toBe("OPEN");
    expect(() => late.assertAccepting("claude")).toThrow(/circuit open/);
  });

  it("an open circuit restores open with its wait, half-opens on time, and closes after three successes", async () => {
    const states = memoryStates();
    const first = new AgentCircuits(OPTIONS, states);
    for (let i = 0; i < 5; i++) await first.record("codex", failed(`t${i % 2}`));
    expect(first.state("codex")).toBe("OPEN");
    const late = new AgentCircuits(OPTIONS, states);
    late.restore(await states.load());
    expect(late.state("codex")).toBe("OPEN");
    await sleep(350);
    expect(late.state("codex")).toBe("HALF_OPEN");
    for (let i = 0; i < 3; i++) await late.record("codex", SUCCEEDED);
    expect(late.state("codex")).toBe("CLOSED");
  });

  it("a half-open circuit restores half-open: one failure opens it again", async () => {
    const states = memoryStates();
    const first = new AgentCircuits(OPTIONS, states);
    for (let i = 0; i < 5; i++) await first.record("gemini", failed(`t${i % 2}`));
    await sleep(350);
    await first.record("gemini", SUCCEEDED); // the first trial: half-open, saved so
    const late = new AgentCircuits(OPTIONS, states);
    late.restore(await states.load());
    expect(late.state("gemini")).toBe("HALF_OPEN");
    await late.record("gemini", failed());
    expect(late.state("gemini")).toBe("OPEN");
  });

  it("refuses saved states record could not have written; leaves circuits it already has alone", async () => {
    const states = memoryStates();
    const late = new AgentCircuits(OPTIONS, states);
    const saved = (ownState: unknown, breakerState: unknown = [], openedAt: unknown = Date.now()) =>
      JSON.stringify({ policy: { ownState, breakerState }, openedAt });
    const open = { value: 1, openedAt: Date.now(), attemptNo: 1 };
    await late.record("aider", SUCCEEDED);
    const restored = late.restore({
      garbage: "{not json",
      wrongShape: saved({ value: "x" }, "nope"),
      isolated: saved({ value: 3, counters: 1 }), // would never open again
      halfOpen: saved({ value: 2 }),
      unknownState: saved({ value: 7 }),
      openWithoutTime: saved({ value: 1, attemptNo: 1 }),
      badFailures: saved({ value: 0 }, ["soon"]),
      noOpenedAt: saved({ value: 0 }, [], null),
      aider: saved(open), // well formed, but this replica has counted aider already
      grok: saved(open),
    });
    expect(restored).toEqual(["grok"]);
    expect(late.state("aider")).toBe("CLOSED");
    expect(late.state("grok")).toBe("OPEN");
    for (const agent of ["isolated", "unknownState"]) {
      for (let i = 0; i < 5; i++) await late.record(agent, failed(`t${i % 2}`));
      expect(late.state(agent)).toBe("OPEN");
    }
  });

  it("saves what this replica handled, not what peers report (they save it themselves)", async () => {
    const states = memoryStates();
    const circuits = new AgentCircuits(OPTIONS, states);
    await circuits.record("claude", failed(), "peer");
    expect(states.saved.has("claude")).toBe(false);
    await circuits.record("claude", failed("t1"));
    expect(JSON.parse(states.saved.get("claude")!).policy.breakerState).toHaveLength(2);
  });
});

describe("one tenant cannot open an agent's circuit for all", () => {
  it("counts a tenant's run failures up to one fewer than the threshold; a second tenant's failure opens it", async () => {
    const circuits = new AgentCircuits(OPTIONS);
    for (let i = 0; i < 20; i++) await circuits.record("claude", failed("mallory"));
    expect(circuits.state("claude")).toBe("CLOSED");
    await circuits.record("claude", failed("alice"));
    expect(circuits.state("claude")).toBe("OPEN");
  });

  it("counts runtime failures (image, container) in full, whoever's run it was", async () => {
    const circuits = new AgentCircuits(OPTIONS);
    for (let i = 0; i < 5; i++) await circuits.record("codex", { succeeded: false, tenantId: "alice", runtimeFailure: true });
    expect(circuits.state("codex")).toBe("OPEN");
  });

  it("a tenant's failures leave the count with the window, and a restored replica remembers them", async () => {
    const states = memoryStates();
    const circuits = new AgentCircuits({ ...OPTIONS, windowMs: 300 }, states);
    for (let i = 0; i < 4; i++) await circuits.record("aider", failed("mallory"));
    const late = new AgentCircuits({ ...OPTIONS, windowMs: 300 }, states);
    late.restore(await states.load());
    await late.record("aider", failed("mallory")); // over mallory's share: not counted
    expect(late.state("aider")).toBe("CLOSED");
    await sleep(350);
    // The window moved on: mallory's four are gone, from the breaker and from its share.
    for (let i = 0; i < 4; i++) await late.record("aider", failed("mallory"));
    expect(late.state("aider")).toBe("CLOSED");
    await late.record("aider", failed("alice"));
    expect(late.state("aider")).toBe("OPEN");
  });
});

describe("redisCircuitStates", () => {
  it("waits for a Redis that starts a moment after the dispatcher, then reads what was saved", async () => {
    const dir = mkdtempSync(path.join(tmpdir(), "outpost-circuit-states-"));
    const port = await freePort();
    const redis = connectRedis(`redis://127.0.0.1:${port}`, silentLogger);
    let server: PrivateRedis | undefined;
    try {
      const states = redisCircuitStates(redis, silentLogger, { readyTimeoutMs: 10_000 });
      const loading = states.load();
      await sleep(300); // refused connections meanwhile
      server = await startPrivateRedis(dir, port);
      expect(await loading).toEqual({});
      await states.save("claude", "saved state");
      expect(await states.load()).toEqual({ claude: "saved state" });
      expect(await redis.ttl(CIRCUITS_KEY)).toBeGreaterThan(86_000);
    } finally {
      redis.disconnect();
      await server?.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("keeps a save that failed while Redis was unreachable and writes it when Redis is back", async () => {
    const dir = mkdtempSync(path.join(tmpdir(), "outpost-circuit-states-"));
    const redisServer = await startCuttableRedis(dir);
    const cutOff = connectRedis(redisServer.proxiedUrl, silentLogger);
    const direct = connectRedis(redisServer.url, silentLogger);
    try {
      const states = redisCircuitStates(cutOff, silentLogger);
      await states.load(); // connected
      await redisServer.cut();
      await states.save("claude", "older");
      await states.save("claude", "newer"); // only the latest state of an agent is kept
      await states.save("codex", "codex state");
      expect(await direct.hgetall(CIRCUITS_KEY)).toEqual({});
      await redisServer.restore();
      const deadline = Date.now() + 15_000;
      while (Object.keys(await direct.hgetall(CIRCUITS_KEY)).length < 2 && Date.now() < deadline) await sleep(50);
      expect(await direct.hgetall(CIRCUITS_KEY)).toEqual({ claude: "newer", codex: "codex state" });
    } finally {
      cutOff.disconnect();
      direct.disconnect();
      await redisServer.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
