/**
 * The EGRESS network on the real engine (linux/arm64 under qemu here): runs whose agent may reach
 * the network join `outpost-egress`, a bridge with inter-container communication off, so one
 * tenant's container cannot connect to another's — which Docker's default `bridge` allows, as
 * the control shows with the same containers. Containers are made by the executor's runtime
 * adapter from an EGRESS agent's shape (the runtime makes the network when it is missing), and
 * labelled for clean-up; the network is shared with any executor on this engine and left in place.
 */
import net from "node:net";
import { create } from "@bufbuild/protobuf";
import { AgentSchema, NetworkPolicy } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createDockerRuntime } from "../src/adapters/docker-runtime.ts";
import type { ContainerSpec } from "../src/core/ports.ts";
import { agentShapeOf, EGRESS_NETWORK } from "../src/core/run.ts";
import { buildDemoAgent, docker, dockerUp, IMAGE } from "./boundary-harness.ts";

const TEST_LABEL = "dev.outpost.test";
const TEST_RUN = `egress-network-${process.pid}`;
const PORT = 8080;
const engineAvailable = dockerUp();

describe.skipIf(!engineAvailable)("the EGRESS network, on the real engine", () => {
  const runtime = createDockerRuntime();
  let serial = 0;

  /** An EGRESS agent's container spec, as a run gets it; `networkMode` overridden only for the control. */
  function specOf(command: string[], networkMode?: string): ContainerSpec {
    const shape = agentShapeOf(create(AgentSchema, { name: "demo", image: IMAGE, networkPolicy: NetworkPolicy.EGRESS }));
    return {
      ...shape,
      ...(networkMode ? { networkMode } : {}),
      name: `outpost-test-${TEST_RUN}-${++serial}`,
      command,
      env: {},
      labels: { [TEST_LABEL]: TEST_RUN },
      binds: [],
    };
  }

  /** Starts a container serving HTTP on PORT; resolves with its id and address once it accepts a connection from the host. */
  async function startListener(networkMode?: string): Promise<{ id: string; ip: string; inspect: Record<string, unknown> }> {
    const spec = specOf(["httpd", "-f", "-p", String(PORT), "-h", "/tmp"], networkMode);
    const id = await runtime.create(spec);
    await runtime.start(id);
    const inspect = JSON.parse(docker("inspect", id))[0] as { NetworkSettings: { Networks: Record<string, { IPAddress: string }> } };
    const ip = inspect.NetworkSettings.Networks[spec.networkMode]?.IPAddress ?? "";
    expect(ip).toMatch(/^\d+\.\d+\.\d+\.\d+$/);
    // The host reaches it (only container-to-container traffic is refused): it is listening.
    const deadline = Date.now() + 60_000;
    while (!(await canConnect(ip, PORT))) {
      if (Date.now() > deadline) throw new Error(`${ip}:${PORT} did not accept a connection from the host within 60 s`);
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    return { id, ip, inspect: inspect as unknown as Record<string, unknown> };
  }

  /** Runs a client container to its end; its output. */
  async function runClient(target: string, networkMode?: string): Promise<string> {
    // nc (not wget: busybox wget crashes under qemu-user without a route); -w 3: connect timeout.
    const script = `if echo "GET / HTTP/1.0" | nc -w 3 ${target} ${PORT} >/dev/null 2>/tmp/err; then echo "reachable"; else echo "unreachable: $(head -n 1 /tmp/err)"; fi`;
    const spec = specOf(["/bin/sh", "-c", script], networkMode);
    const id = await runtime.create(spec);
    try {
      const output = await runtime.attach(id);
      await runtime.start(id);
      let text = "";
      for await (const frame of output) text += frame.data.toString("utf8");
      expect((await runtime.wait(id)).exitCode).toBe(0);
      return text.trim();
    } finally {
      await runtime.remove(id);
    }
  }

  beforeAll(async () => {
    buildDemoAgent();
    await runtime.ping();
  });

  afterAll(() => {
    const left = docker("ps", "-aq", "--filter", `label=${TEST_LABEL}=${TEST_RUN}`);
    if (left) docker("rm", "-f", ...left.split("\n"));
  });

  it("is a bridge with inter-container communication off, and an EGRESS run's container is on it, logging nothing on the engine's side", async () => {
    const { id, inspect } = await startListener();
    try {
      const network = JSON.parse(docker("network", "inspect", EGRESS_NETWORK))[0] as { Driver: string; Options: Record<string, string> };
      expect(network.Driver).toBe("bridge");
      expect(network.Options).toMatchObject({ "com.docker.network.bridge.enable_icc": "false", "com.docker.network.bridge.name": EGRESS_NETWORK });
      expect(inspect).toMatchObject({ HostConfig: { NetworkMode: EGRESS_NETWORK, LogConfig: { Type: "none" } } });
    } finally {
      await runtime.remove(id);
    }
  });

  it("one EGRESS container cannot connect to another's listener", async () => {
    const listener = await startListener();
    try {
      const said = await runClient(listener.ip);
      expect(said).toMatch(/^unreachable: /);
    } finally {
      await runtime.remove(listener.id);
    }
  });

  it("control: on Docker's default bridge the same client reaches the same listener", async () => {
    const listener = await startListener("bridge");
    try {
      expect(await runClient(listener.ip, "bridge")).toBe("reachable");
    } finally {
      await runtime.remove(listener.id);
    }
  });
});

function canConnect(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host, port, timeout: 1000 });
    const done = (ok: boolean) => {
      socket.destroy();
      resolve(ok);
    };
    socket.once("connect", () => done(true));
    socket.once("timeout", () => done(false));
    socket.once("error", () => done(false));
  });
}
