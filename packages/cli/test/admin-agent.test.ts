/** Agent files (proto JSON in .json or .yaml) and the fleet text view, without a server. */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { create, toJson } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { AgentSchema, Dispatch_State, ModelTier, NetworkPolicy, RiskLevel } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { AgentStatus_CircuitState, GetFleetStatusResponseSchema } from "@outpost/proto/outpost/dispatch/v1/fleet_service_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { describeFleet, readAgentFile } from "../src/cli.ts";

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(path.join(tmpdir(), "outpost-agent-file-"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const write = (name: string, text: string) => {
  const file = path.join(dir, name);
  writeFileSync(file, text);
  return file;
};

describe("readAgentFile", () => {
  const agent = create(AgentSchema, {
    name: "lint-bot",
    description: "lints",
    image: "outpost/demo-agent:latest",
    command: ["/bin/sh", "-c", "echo hi"],
    models: [{ tier: ModelTier.FAST, modelId: "demo-1" }],
    defaultModelTier: ModelTier.FAST,
    riskLevel: RiskLevel.AUTO,
    networkPolicy: NetworkPolicy.NONE,
    resources: { cpuMillis: 500n, memoryBytes: 268435456n, pidsLimit: 64n },
  });

  it("reads the proto JSON form from .json and the same from .yaml", () => {
    const json = toJson(AgentSchema, agent);
    expect(readAgentFile(write("a.json", JSON.stringify(json)))).toEqual(agent);
    const yaml = [
      "name: lint-bot",
      "description: lints",
      "image: outpost/demo-agent:latest",
      "command: [/bin/sh, -c, echo hi]",
      "models:",
      "  - tier: MODEL_TIER_FAST",
      "    modelId: demo-1",
      "defaultModelTier: MODEL_TIER_FAST",
      "riskLevel: RISK_LEVEL_AUTO",
      "networkPolicy: NETWORK_POLICY_NONE",
      'resources: { cpuMillis: "500", memoryBytes: "268435456", pidsLimit: 64 }',
    ].join("\n");
    expect(readAgentFile(write("a.yaml", yaml))).toEqual(agent);
  });

  it("refuses, as usage errors naming the file, bad JSON, bad YAML, a non-object and a non-Agent", () => {
    const bad = write("bad.json", "{ name: ");
    expect(() => readAgentFile(bad)).toThrow(new RegExp(`${bad} is not valid JSON`));
    expect(() => readAgentFile(write("bad.yml", "name: [unclosed"))).toThrow(/is not valid YAML/);
    expect(() => readAgentFile(write("list.json", "[1, 2]"))).toThrow(/must hold one Agent object/);
    expect(() => readAgentFile(write("field.json", JSON.stringify({ name: "x", colour: "blue" })))).toThrow(
      /is not an Agent in proto JSON form: .*colour/,
    );
    expect(() => readAgentFile(write("enum.json", JSON.stringify({ name: "x", riskLevel: "RISK_LEVEL_YOLO" })))).toThrow(/not an Agent/);
    expect(() => readAgentFile(undefined)).toThrow(/missing --file/);
  });
});

describe("describeFleet", () => {
  it("shows agents with availability and circuit, executors with busy/total slots and warm containers, queue, runs and degraded notes", () => {
    const text = describeFleet(
      create(GetFleetStatusResponseSchema, {
        agents: [
          { agent: "demo", available: true, imagePresent: true, circuitState: AgentStatus_CircuitState.CLOSED },
          { agent: "claude", available: false, imagePresent: false, circuitState: AgentStatus_CircuitState.OPEN },
        ],
        executors: [
          { executorId: "exec-1", slotsTotal: 4, slotsBusy: 3, warmContainers: 2, engineReady: true, lastSeenTime: timestampFromDate(new Date("2025-01-01T00:00:00Z")) },
        ],
        queueDepth: 7n,
        warmContainers: 2n,
        runsLast24h: [
          { state: Dispatch_State.SUCCEEDED, count: 12n },
          { state: Dispatch_State.FAILED, count: 0n },
        ],
        degraded: ["executors: no report from the executor store"],
      }),
    );
    expect(text).toMatch(/demo\s+available\s+circuit closed\s+image present/);
    expect(text).toMatch(/claude\s+unavailable\s+circuit open\s+image missing/);
    expect(text).toMatch(/exec-1\s+slots 3\/4 busy\s+warm 2\s+engine ready\s+last seen 2025-01-01T00:00:00.000Z/);
    expect(text).toContain("queue depth: 7");
    expect(text).toContain("warm containers: 2");
    expect(text).toContain("runs (24 h): SUCCEEDED 12");
    expect(text).not.toContain("FAILED");
    expect(text).toContain("degraded:\n  - executors: no report from the executor store");
  });

  it("says none rather than printing empty sections, and omits degraded when all is well", () => {
    const text = describeFleet(create(GetFleetStatusResponseSchema, {}));
    expect(text).toBe("agents:\n  (none)\nexecutors:\n  (none)\nwarm containers: 0\nqueue depth: 0\nruns (24 h): none");
  });
});
