/**
 * The Docker runtime adapter (docker-runtime.ts) against a fake Engine API on a unix socket: what
 * it asks the engine for, and what it does with the answers it cannot get from a healthy engine
 * on demand — an `outpost-egress` network made by someone else without inter-container
 * communication off, one pruned behind the executor's back, a container force-removed before its
 * inspect. The real engine's side is in egress-network.boundary.test.ts.
 */
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { createDockerRuntime, EGRESS_NETWORK_OPTIONS } from "../src/adapters/docker-runtime.ts";
import type { ContainerSpec } from "../src/core/ports.ts";
import { EGRESS_NETWORK } from "../src/core/run.ts";

interface EngineRequest {
  method: string;
  path: string;
  query: URLSearchParams;
  body: Record<string, unknown> | undefined;
}

type Answer = { status: number; body?: unknown };

/** A fake engine: answers each `METHOD /path` from a handler the test sets, records every request. */
class FakeEngine {
  readonly requests: EngineRequest[] = [];
  readonly handlers = new Map<string, (req: EngineRequest) => Answer>();
  private server: http.Server | undefined;
  readonly socketPath: string;

  constructor(dir: string) {
    this.socketPath = path.join(dir, "engine.sock");
  }

  async start(): Promise<void> {
    this.server = http.createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on("data", (chunk: Buffer) => chunks.push(chunk));
      req.on("end", () => {
        const url = new URL(req.url ?? "/", "http://engine");
        const text = Buffer.concat(chunks).toString("utf8");
        const request: EngineRequest = {
          method: req.method ?? "GET",
          // Without a pinned API version dockerode asks for the unversioned paths; strip one anyway.
          path: decodeURIComponent(url.pathname).replace(/^\/v\d+\.\d+/, ""),
          query: url.searchParams,
          body: text ? (JSON.parse(text) as Record<string, unknown>) : undefined,
        };
        this.requests.push(request);
        const handler = this.handlers.get(`${request.method} ${request.path}`);
        const answer = handler ? handler(request) : { status: 500, body: { message: `fake engine: no handler for ${request.method} ${request.path}` } };
        res.writeHead(answer.status, { "content-type": "application/json" });
        res.end(answer.body === undefined ? "" : JSON.stringify(answer.body));
      });
    });
    await new Promise<void>((resolve) => this.server!.listen(this.socketPath, resolve));
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => this.server?.close(() => resolve()) ?? resolve());
  }

  on(route: string, handler: (req: EngineRequest) => Answer): void {
    this.handlers.set(route, handler);
  }

  /** Requests to a route, in order. */
  calls(route: string): EngineRequest[] {
    return this.requests.filter((r) => `${r.method} ${r.path}` === route);
  }
}

const NETWORK = `/networks/${EGRESS_NETWORK}`;
const IMAGE = "outpost/demo-agent:latest";
const notFound = (message: string): Answer => ({ status: 404, body: { message } });

function spec(extra: Partial<ContainerSpec> = {}): ContainerSpec {
  return {
    name: "outpost-run",
    image: IMAGE,
    command: [],
    env: { OUTPOST_TASK: "hello" },
    labels: { "dev.outpost.managed": "true" },
    platform: "linux/arm64",
    user: "65534:65534",
    readonlyRootfs: true,
    tmpfs: { "/tmp": "rw,size=64m" },
    binds: [],
    capDrop: ["ALL"],
    securityOpt: ["no-new-privileges"],
    pidsLimit: 256,
    memoryBytes: 512 * 1024 * 1024,
    nanoCpus: 1_000_000_000,
    networkMode: EGRESS_NETWORK,
    ...extra,
  };
}

describe("the Docker runtime against a fake engine", () => {
  let dir: string;
  let engine: FakeEngine;
  /** The network as the fake engine has it; undefined: none. */
  let network: { Driver: string; Options: Record<string, string> } | undefined;
  let containersCreated = 0;

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "outpost-fake-engine-"));
    engine = new FakeEngine(dir);
    await engine.start();
    network = undefined;
    containersCreated = 0;
    engine.on("GET /_ping", () => ({ status: 200, body: "OK" }));
    engine.on(`GET ${NETWORK}`, () => (network ? { status: 200, body: { Name: EGRESS_NETWORK, ...network } } : notFound(`network ${EGRESS_NETWORK} not found`)));
    engine.on("POST /networks/create", (req) => {
      if (network) return { status: 409, body: { message: `network with name ${EGRESS_NETWORK} already exists` } };
      network = { Driver: String(req.body?.Driver), Options: (req.body?.Options ?? {}) as Record<string, string> };
      return { status: 201, body: { Id: "net-1" } };
    });
    engine.on(`GET /images/${IMAGE}/json`, () => ({ status: 200, body: { Architecture: "arm64", Config: { Cmd: ["/bin/sh", "/agent/run.sh"], Volumes: null } } }));
    engine.on("POST /containers/create", (req) => {
      const mode = (req.body?.HostConfig as { NetworkMode?: string } | undefined)?.NetworkMode;
      if (mode === EGRESS_NETWORK && !network) return notFound(`network ${EGRESS_NETWORK} not found`);
      containersCreated++;
      return { status: 201, body: { Id: `c${containersCreated}`, Warnings: [] } };
    });
  });

  afterEach(async () => {
    await engine.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const runtime = () => createDockerRuntime({ socketPath: engine.socketPath });

  it("makes outpost-egress once, a bridge with inter-container communication off, before the first EGRESS container", async () => {
    const docker = runtime();
    expect(await docker.create(spec())).toBe("c1");
    expect(engine.calls("POST /networks/create").map((r) => r.body)).toEqual([
      {
        Name: EGRESS_NETWORK,
        Driver: "bridge",
        CheckDuplicate: true,
        Labels: { "dev.outpost.managed": "true", "dev.outpost.network": "egress" },
        Options: { "com.docker.network.bridge.enable_icc": "false", "com.docker.network.bridge.name": EGRESS_NETWORK },
      },
    ]);
    expect(EGRESS_NETWORK_OPTIONS).toEqual({ "com.docker.network.bridge.enable_icc": "false", "com.docker.network.bridge.name": "outpost-egress" });
    const [created] = engine.calls("POST /containers/create");
    expect(created!.query.get("platform")).toBe("linux/arm64");
    expect(created!.body).toMatchObject({ NetworkDisabled: false, HostConfig: { NetworkMode: EGRESS_NETWORK } });
    // Settled: later EGRESS containers cost no network round trip.
    const networkCalls = engine.requests.filter((r) => r.path.startsWith("/networks")).length;
    await docker.create(spec({ name: "outpost-run-2" }));
    await docker.create(spec({ name: "outpost-run-3" }));
    expect(engine.requests.filter((r) => r.path.startsWith("/networks")).length).toBe(networkCalls);
    expect(engine.calls("POST /containers/create")).toHaveLength(3);
  });

  it("makes the network at the first ping that answers, ahead of any run", async () => {
    await runtime().ping();
    await vi.waitFor(() => expect(network).toEqual({ Driver: "bridge", Options: { ...EGRESS_NETWORK_OPTIONS } }), { timeout: 2000 });
  });

  it("never touches a network for a run without egress, and every container logs nothing on the engine's side", async () => {
    const docker = runtime();
    await docker.create(spec({ networkMode: "none" }));
    expect(engine.requests.filter((r) => r.path.startsWith("/networks"))).toEqual([]);
    await docker.create(spec());
    const bodies = engine.calls("POST /containers/create").map((r) => r.body as { NetworkDisabled: boolean; HostConfig: Record<string, unknown> });
    expect(bodies.map((b) => [b.NetworkDisabled, b.HostConfig.NetworkMode])).toEqual([
      [true, "none"],
      [false, EGRESS_NETWORK],
    ]);
    for (const body of bodies) expect(body.HostConfig.LogConfig).toEqual({ Type: "none", Config: {} });
  });

  it("keeps a bounded json-file copy only when the operator asks for it (OUTPOST_EXECUTOR_ENGINE_LOGS)", async () => {
    await createDockerRuntime({ socketPath: engine.socketPath, engineLogs: "json-file" }).create(spec({ networkMode: "none" }));
    const [created] = engine.calls("POST /containers/create");
    expect((created!.body as { HostConfig: Record<string, unknown> }).HostConfig.LogConfig).toEqual({
      Type: "json-file",
      Config: { "max-size": "10m", "max-file": "1" },
    });
  });

  it("refuses an existing outpost-egress whose containers could reach each other, and says how to fix it", async () => {
    network = { Driver: "bridge", Options: {} }; // made by hand: icc on, Docker's default
    const docker = runtime();
    await expect(docker.create(spec())).rejects.toThrow(
      `network ${EGRESS_NETWORK} exists but is not a bridge with enable_icc=false, so its containers could reach each other; remove it (docker network rm ${EGRESS_NETWORK}) and the executor makes it again`,
    );
    network = { Driver: "macvlan", Options: { "com.docker.network.bridge.enable_icc": "false" } };
    await expect(docker.create(spec())).rejects.toThrow(/is not a bridge with enable_icc=false/);
    expect(engine.calls("POST /containers/create")).toEqual([]);
    // Removed by the operator: the next run makes it as it should be (the failure was not kept).
    network = undefined;
    expect(await docker.create(spec())).toBe("c1");
    expect(network).toEqual({ Driver: "bridge", Options: { ...EGRESS_NETWORK_OPTIONS } });
  });

  it("takes a network another executor made first (409), once it checked it", async () => {
    engine.on(`GET ${NETWORK}`, (() => {
      let first = true;
      return () => {
        // Absent at the first look; by the create, another executor on the engine has made it.
        if (first) {
          first = false;
          network = { Driver: "bridge", Options: { ...EGRESS_NETWORK_OPTIONS } };
          return notFound(`network ${EGRESS_NETWORK} not found`);
        }
        return { status: 200, body: { Name: EGRESS_NETWORK, ...network } };
      };
    })());
    expect(await runtime().create(spec())).toBe("c1");
    expect(engine.calls("POST /networks/create")).toHaveLength(1);
    expect(engine.calls(`GET ${NETWORK}`)).toHaveLength(2);
  });

  it("makes the network again, once, when it was pruned behind the executor's back", async () => {
    const docker = runtime();
    expect(await docker.create(spec())).toBe("c1");
    network = undefined; // docker network prune, while no run used it
    expect(await docker.create(spec({ name: "outpost-run-2" }))).toBe("c2");
    expect(engine.calls("POST /networks/create")).toHaveLength(2);
    expect(engine.calls("POST /containers/create")).toHaveLength(3); // c1, the refused one, c2

    // Gone again at once after it was made (a prune in a loop): one retry only, then the engine's word.
    engine.on("POST /networks/create", () => ({ status: 201, body: { Id: "net-gone-again" } }));
    network = undefined;
    await expect(docker.create(spec({ name: "outpost-run-3" }))).rejects.toThrow(`network ${EGRESS_NETWORK} not found`);
  });

  it("a launcher runs the image's ENTRYPOINT then the agent's command, or the image's CMD when the agent sets none", async () => {
    network = { Driver: "bridge", Options: { ...EGRESS_NETWORK_OPTIONS } };
    engine.on("GET /images/agent-with-entrypoint/json", () => ({
      status: 200,
      body: { Architecture: "arm64", Config: { Entrypoint: ["/usr/bin/tini", "--", "/entry.sh"], Cmd: ["--default"], Volumes: null } },
    }));
    engine.on("GET /images/agent-without-command/json", () => ({ status: 200, body: { Architecture: "arm64", Config: { Entrypoint: null, Cmd: null, Volumes: null } } }));
    const launcher = ["/bin/sh", "-c", '. /run/outpost/start && exec "$@"', "outpost-warm"];
    const docker = runtime();
    await docker.create(spec({ image: "agent-with-entrypoint", launcher }));
    await docker.create(spec({ image: "agent-with-entrypoint", launcher, command: ["--task-from-env"] }));
    await docker.create(spec({ image: IMAGE, launcher }));
    // Without a launcher (a cold container) the engine runs the image as it is: no Entrypoint given.
    await docker.create(spec({ image: "agent-with-entrypoint" }));
    await docker.create(spec({ image: "agent-with-entrypoint", command: ["--task-from-env"] }));
    const bodies = engine.calls("POST /containers/create").map((r) => r.body as { Entrypoint?: string[]; Cmd?: string[] });
    expect(bodies.map((b) => [b.Entrypoint, b.Cmd])).toEqual([
      [launcher, ["/usr/bin/tini", "--", "/entry.sh", "--default"]],
      [launcher, ["/usr/bin/tini", "--", "/entry.sh", "--task-from-env"]],
      [launcher, ["/bin/sh", "/agent/run.sh"]],
      [undefined, undefined],
      [undefined, ["--task-from-env"]],
    ]);
    await expect(docker.create(spec({ image: "agent-without-command", launcher }))).rejects.toThrow("image agent-without-command has no command and the agent sets none");
  });

  it("wait() takes the wait's status code when the container was force-removed before its inspect", async () => {
    engine.on("POST /containers/c-gone/wait", () => ({ status: 200, body: { StatusCode: 137 } }));
    engine.on("GET /containers/c-gone/json", () => notFound("No such container: c-gone"));
    expect(await runtime().wait("c-gone")).toEqual({ exitCode: 137, oomKilled: false });
    // Any other inspect failure is still one.
    engine.on("POST /containers/c-broken/wait", () => ({ status: 200, body: { StatusCode: 0 } }));
    engine.on("GET /containers/c-broken/json", () => ({ status: 500, body: { message: "engine broke" } }));
    await expect(runtime().wait("c-broken")).rejects.toThrow(/engine broke/);
  });
});
