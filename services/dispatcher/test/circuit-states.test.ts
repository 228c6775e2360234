/**
 * Circuit states saved after each outcome and taken up by a replica that starts later
 * (AgentCircuits.restore), in process with a Map for the store; the Redis adapter and a real
 * third replica are in replicas.test.ts.
 */
import { describe, expect, it } from "vitest";
import { AgentCircuits, type CircuitOptions, type CircuitStateStore } from "../src/core/resilience.ts";

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

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe("circuit states across replicas", () => {
  it("a replica restored after three failures opens on the next two, not five", async () => {
    const states = memoryStates();
    const first = new AgentCircuits(OPTIONS, states);
    for (let i = 0; i < 3; i++) await first.record("claude", false);
    const late = new AgentCircuits(OPTIONS, states);
    expect(late.restore(await states.load())).toEqual(["claude"]);
    await late.record("claude", false);
    expect(late.state("claude")).toBe("CLOSED");
    await late.record("claude", false);
    expect(late.state("claude")).toBe("OPEN");
    expect(() => late.assertAccepting("claude")).toThrow(/circuit open/);
  });

  it("an open circuit restores open with its wait, half-opens on time, and closes after three successes", async () => {
    const states = memoryStates();
    const first = new AgentCircuits(OPTIONS, states);
    for (let i = 0; i < 5; i++) await first.record("codex", false);
    expect(first.state("codex")).toBe("OPEN");
    const late = new AgentCircuits(OPTIONS, states);
    late.restore(await states.load());
    expect(late.state("codex")).toBe("OPEN");
    await sleep(350);
    expect(late.state("codex")).toBe("HALF_OPEN");
    for (let i = 0; i < 3; i++) await late.record("codex", true);
    expect(late.state("codex")).toBe("CLOSED");
  });

  it("a half-open circuit restores half-open: one failure opens it again", async () => {
    const states = memoryStates();
    const first = new AgentCircuits(OPTIONS, states);
    for (let i = 0; i < 5; i++) await first.record("gemini", false);
    await sleep(350);
    await first.record("gemini", true); // the first trial: half-open, saved so
    const late = new AgentCircuits(OPTIONS, states);
    late.restore(await states.load());
    expect(late.state("gemini")).toBe("HALF_OPEN");
    await late.record("gemini", false);
    expect(late.state("gemini")).toBe("OPEN");
  });

  it("skips saved states that do not parse, and leaves circuits it already has alone", async () => {
    const states = memoryStates();
    const late = new AgentCircuits(OPTIONS, states);
    await late.record("aider", true);
    const restored = late.restore({
      garbage: "{not json",
      wrongShape: JSON.stringify({ policy: { ownState: { value: "x" }, breakerState: "nope" }, openedAt: 1 }),
      aider: JSON.stringify({ policy: { ownState: { value: 2, openedAt: Date.now(), attemptNo: 1 }, breakerState: [] }, openedAt: Date.now() }),
    });
    expect(restored).toEqual([]);
    expect(late.state("aider")).toBe("CLOSED");
    expect(late.state("garbage")).toBe("CLOSED");
  });
});
