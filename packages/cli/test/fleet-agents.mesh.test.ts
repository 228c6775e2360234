/**
 * `outpost fleet` and `outpost admin agent …` across the real boundary: the CLI's Connect
 * client -> gateway -> dispatcher (and a real executor on Docker reporting its slots), each a
 * separate process on a loopback port (test/mesh/harness.ts).
 */
import { rmSync, writeFileSync } from "node:fs";
import path from "node:path";
import { Capture } from "./capture.ts";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runCli } from "../src/index.ts";
import { DEMO_IMAGE, startTestMesh, type TestMesh } from "../../../test/mesh/harness.ts";

let t: TestMesh;
let apiKey: string;

beforeAll(async () => {
  // The executor checks the demo image ahead of work, so fleet status can call it available
  // before any run (no pull: the image is built locally).
  t = await startTestMesh({ serviceEnv: { executor: { OUTPOST_EXECUTOR_IMAGES: DEMO_IMAGE, OUTPOST_EXECUTOR_PULL_IMAGES: "false" } } });
  apiKey = (await t.newTenant("CLI fleet tenant")).apiKey;
});
afterAll(async () => {
  await t?.mesh.stop();
  if (t) rmSync(t.dir, { recursive: true, force: true });
});

/** Runs the CLI as an operator (admin token) or a tenant (API key), against the mesh's gateway. */
async function outpost(argv: string[], as: "admin" | "tenant") {
  const out = new Capture();
  const err = new Capture();
  const env = { OUTPOST_HOME: t.dir, ...(as === "admin" ? { OUTPOST_ADMIN_TOKEN: t.adminToken } : { OUTPOST_API_KEY: apiKey }) };
  const code = await runCli([...argv, "--gateway", t.mesh.urls.gateway], { out, err, env });
  return { code, out: out.text, err: err.text };
}

describe("outpost fleet / admin agent against the real mesh", () => {
  it("fleet shows the demo agent and at least one executor, in text and in proto JSON", async () => {
    // The executor reports on its long-polls, and the images it has once it has probed them;
    // wait (bounded) until fleet status shows it and the demo agent as available.
    type Fleet = {
      agents?: { agent: string; available?: boolean; circuitState?: string }[];
      executors?: { executorId: string; slotsTotal?: number }[];
      queueDepth?: string;
    };
    let json: Fleet = {};
    const demoReady = () => (json.executors ?? []).length > 0 && json.agents?.find((a) => a.agent === "demo")?.available === true;
    for (let i = 0; i < 60 && !demoReady(); i++) {
      if (i > 0) await new Promise((r) => setTimeout(r, 500));
      const res = await outpost(["fleet", "--json"], "admin");
      expect(res.code, res.err).toBe(0);
      json = JSON.parse(res.out) as Fleet;
    }
    expect(demoReady()).toBe(true);
    expect(json.agents?.map((a) => a.agent)).toContain("demo");
    // Proto JSON form: enum names and int64 as a string (not JSON.stringify of the message).
    expect(json.agents?.find((a) => a.agent === "demo")?.circuitState).toBe("CIRCUIT_STATE_CLOSED");
    expect(json.executors?.length).toBeGreaterThanOrEqual(1);
    expect(json.executors![0]!.slotsTotal).toBeGreaterThan(0);
    if (json.queueDepth !== undefined) expect(typeof json.queueDepth).toBe("string");

    const text = await outpost(["fleet"], "admin");
    expect(text.code, text.err).toBe(0);
    expect(text.out).toMatch(/^\s+demo\s+available\s+circuit closed/m);
    expect(text.out).toMatch(new RegExp(`${json.executors![0]!.executorId}\\s+slots \\d+/${json.executors![0]!.slotsTotal} busy\\s+warm \\d+`));
    expect(text.out).toMatch(/queue depth: \d+/);
    expect(text.out).toMatch(/runs \(24 h\): /);

    // A tenant's API key is not an operator's credential.
    const asTenant = await runCli(["fleet", "--gateway", t.mesh.urls.gateway], {
      out: new Capture(),
      err: new Capture(),
      env: { OUTPOST_HOME: t.dir, OUTPOST_ADMIN_TOKEN: apiKey },
    });
    expect(asTenant).toBe(1);
  });

  it("registers an agent from a YAML file, lists it, disables it (a dispatch to it is refused with INVALID_ARGUMENT), enables it again", async () => {
    const name = `cli-bot-${process.pid}`;
    const file = path.join(t.dir, "agent.yaml");
    writeFileSync(
      file,
      [
        `name: ${name}`,
        "description: registered by the CLI test",
        `image: ${DEMO_IMAGE}`,
        "models:",
        "  - tier: MODEL_TIER_FAST",
        "    modelId: demo-1",
        "riskLevel: RISK_LEVEL_AUTO",
        "networkPolicy: NETWORK_POLICY_NONE",
      ].join("\n"),
    );
    const registered = await outpost(["admin", "agent", "register", "--file", file], "admin");
    expect(registered.code, registered.err).toBe(0);
    expect(registered.out).toContain(`registered ${name}`);

    const listed = await outpost(["agents"], "tenant");
    expect(listed.code, listed.err).toBe(0);
    expect(listed.out).toMatch(new RegExp(`^${name}\\s+${DEMO_IMAGE.replace(/[.]/g, "\\.")}\\s+demo-1$`, "m"));
    const listedJson = await outpost(["agents", "--json"], "tenant");
    const mine = (JSON.parse(listedJson.out) as { name: string; state?: string; models?: { tier?: string }[] }[]).find((a) => a.name === name);
    expect(mine?.state).toBe("STATE_ENABLED");
    expect(mine?.models?.[0]?.tier).toBe("MODEL_TIER_FAST");

    // The server's validation error is printed as is (field named), exit 1.
    const badFile = path.join(t.dir, "bad-agent.json");
    writeFileSync(badFile, JSON.stringify({ name, image: "has spaces in it", models: [{ tier: "MODEL_TIER_FAST", modelId: "demo-1" }] }));
    const bad = await outpost(["admin", "agent", "update", "--file", badFile], "admin");
    expect(bad.code).toBe(1);
    expect(bad.err).toMatch(/InvalidArgument: agent\.image: must be an image reference without spaces/);

    const disabled = await outpost(["admin", "agent", "disable", name], "admin");
    expect(disabled.code, disabled.err).toBe(0);
    expect(disabled.out).toContain("(disabled)");

    const refused = await outpost(["dispatch", "--agent", name, "--task", "hello"], "tenant");
    expect(refused.code).toBe(1);
    expect(refused.err).toMatch(new RegExp(`InvalidArgument: .*unknown or disabled agent "${name}"`));
    expect(refused.err).toContain("demo");

    // Back into service, and dispatches are accepted again.
    const enabled = await outpost(["admin", "agent", "enable", name], "admin");
    expect(enabled.code, enabled.err).toBe(0);
    expect(enabled.out).toContain(`enabled ${name}`);
    expect(enabled.out).not.toContain("(disabled)");
    const accepted = await outpost(["dispatch", "--agent", name, "--task", "hello"], "tenant");
    expect(accepted.code, accepted.err).toBe(0);
  });
});
