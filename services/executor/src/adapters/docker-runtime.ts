/**
 * ContainerRuntime over the Docker Engine API (dockerode). Runs are always created for
 * linux/arm64 (the `platform` query parameter, API >= 1.41). A missing image is reported as
 * such; `pull` fetches one for linux/arm64 where a registry is reachable (SPEC E4).
 *
 * Runs whose agent may reach the network (policy EGRESS) join EGRESS_NETWORK, a bridge network
 * the runtime creates once (on the first ping that answers, idempotently, labelled) with
 * inter-container communication off: Docker's default `bridge` lets every container on it
 * connect to every other, so one tenant's agent could reach another's listener. Containers log
 * nothing on the engine's side (log driver `none`): their output reaches the executor through
 * `attach` only, so the daemon keeps no unbounded, unredacted copy of it on disk.
 */
import Docker from "dockerode";
import path from "node:path";
import type { Duplex } from "node:stream";
import {
  HostSetupError,
  ImageNotFoundError,
  type ContainerExit,
  type ContainerRuntime,
  type ContainerSpec,
  type ContainerSummary,
  type OutputFrame,
} from "../core/ports.ts";
import { EGRESS_NETWORK, LABEL_PREFIX } from "../core/run.ts";
import { demuxDockerStream } from "./docker-frames.ts";

interface EngineError extends Error {
  statusCode?: number;
  json?: { message?: string } | null;
}

export interface DockerRuntimeOptions {
  /** DOCKER_HOST-style address; the local socket when unset. */
  dockerHost?: string;
  socketPath?: string;
  pingTimeoutMs?: number;
  /** What the engine keeps of a container's output (OUTPOST_EXECUTOR_ENGINE_LOGS); `none` by default. */
  engineLogs?: "none" | "json-file";
}

export function createDockerRuntime(options: DockerRuntimeOptions = {}): ContainerRuntime {
  const docker = new Docker(dockerOptions(options));
  const pingTimeoutMs = options.pingTimeoutMs ?? 3000;
  const logConfig = options.engineLogs === "json-file" ? { Type: "json-file", Config: { "max-size": "10m", "max-file": "1" } } : { Type: "none", Config: {} };
  /** Settles once EGRESS_NETWORK is there; forgotten on failure, so the next call tries again. */
  let egressNetwork: Promise<void> | undefined;
  const ensureEgress = (): Promise<void> => {
    egressNetwork ??= ensureEgressNetwork(docker).catch((err: unknown) => {
      egressNetwork = undefined;
      throw err;
    });
    return egressNetwork;
  };
  const createContainer = async (spec: ContainerSpec): Promise<string> => {
    // Once settled, this costs no engine round trip: a run's start path stays as it was.
    if (spec.networkMode === EGRESS_NETWORK) {
      await ensureEgress().catch((err: unknown) => {
        const engineError = err as EngineError;
        throw new HostSetupError(`network ${EGRESS_NETWORK}: ${engineError.json?.message ?? engineError.message}`, { cause: err });
      });
    }
    // One image inspect serves both the VOLUMEs to cover and a launcher's command.
    const image = spec.imageVolumeTmpfs !== undefined || spec.launcher ? await docker.getImage(spec.image).inspect() : undefined;
    const tmpfs = image && spec.imageVolumeTmpfs !== undefined ? withImageVolumesCovered(image, spec) : spec.tmpfs;
    // docker-modem's _query/_body split keeps `platform` out of the body; @types/dockerode
    // (v4) does not model it, hence the cast.
    const container = await docker.createContainer({
      _query: { name: spec.name, platform: spec.platform },
      _body: {
        Image: spec.image,
        ...(spec.launcher ? { Entrypoint: spec.launcher, Cmd: launchedCommand(image!, spec) } : spec.command.length > 0 ? { Cmd: spec.command } : {}),
        Env: Object.entries(spec.env).map(([key, value]) => `${key}=${value}`),
        Labels: spec.labels,
        User: spec.user,
        Tty: false,
        OpenStdin: false,
        AttachStdin: false,
        AttachStdout: true,
        AttachStderr: true,
        NetworkDisabled: spec.networkMode === "none",
        HostConfig: {
          ReadonlyRootfs: spec.readonlyRootfs,
          Tmpfs: tmpfs,
          Binds: spec.binds,
          CapDrop: spec.capDrop,
          SecurityOpt: spec.securityOpt,
          PidsLimit: spec.pidsLimit,
          Memory: spec.memoryBytes,
          MemorySwap: spec.memoryBytes,
          NanoCpus: spec.nanoCpus,
          NetworkMode: spec.networkMode,
          Privileged: false,
          AutoRemove: false,
          // A real init as PID 1 (the engine's docker-init): signals reach the agent with their
          // default action even before it installs handlers (PID 1 ignores unhandled SIGTERM,
          // which turned early cancels into a full grace period and a SIGKILL), and zombies
          // are reaped.
          Init: true,
          // The output reaches the executor through `attach` (which works with any driver) and is
          // redacted there; the engine's default json-file would keep an unbounded, unredacted
          // copy on the host's disk. Nothing reads it back: reconciliation never re-adopts a
          // running container's output (docs/executor.md "Reconciliation"). An operator may ask
          // for a bounded json-file copy (OUTPOST_EXECUTOR_ENGINE_LOGS) to use `docker logs`.
          LogConfig: logConfig,
        },
      },
    } as unknown as Docker.ContainerCreateOptions);
    return container.id;
  };

  return {
    async ping() {
      // dockerode 5 accepts an abort signal here; @types/dockerode (v4) does not know it yet.
      await (docker.ping as unknown as (options: { abortSignal: AbortSignal }) => Promise<unknown>)({
        abortSignal: AbortSignal.timeout(pingTimeoutMs),
      });
      // The executor pings before anything else: the network is made at its start, ahead of
      // the first EGRESS run (which waits for it, and says why when it cannot be had).
      void ensureEgress().catch(() => undefined);
    },

    async create(spec: ContainerSpec) {
      try {
        try {
          return await createContainer(spec);
        } catch (err) {
          // Removed behind the executor's back (`docker network prune` takes it while no run
          // uses it): made again, once.
          const engineError = err as EngineError;
          if (spec.networkMode !== EGRESS_NETWORK || engineError.statusCode !== 404 || !/network/i.test(engineError.json?.message ?? engineError.message)) throw err;
          egressNetwork = undefined;
          return await createContainer(spec);
        }
      } catch (err) {
        if (err instanceof HostSetupError) throw err;
        const engineError = err as EngineError;
        const message = engineError.json?.message ?? engineError.message;
        if (engineError.statusCode === 404 && /image|reference|platform/i.test(message)) {
          throw new ImageNotFoundError(spec.image, { cause: err });
        }
        throw new Error(message, { cause: err });
      }
    },

    async list(labels: Record<string, string>): Promise<ContainerSummary[]> {
      const found = await docker.listContainers({
        all: true,
        filters: { label: Object.entries(labels).map(([key, value]) => `${key}=${value}`) },
      });
      return found.map((c) => ({
        id: c.Id,
        name: (c.Names[0] ?? "").replace(/^\//, ""),
        labels: c.Labels ?? {},
        running: c.State === "running" || c.State === "restarting" || c.State === "paused",
        started: c.State !== "created",
      }));
    },

    async imagePresent(image: string) {
      try {
        const info = await docker.getImage(image).inspect();
        return info.Architecture === "arm64";
      } catch (err) {
        if ((err as EngineError).statusCode === 404) return false;
        throw err;
      }
    },

    async pull(image: string) {
      const stream = await docker.pull(image, { platform: "linux/arm64" });
      // The pull runs as long as its progress stream is read; errors arrive inside it.
      await new Promise<void>((resolve, reject) =>
        docker.modem.followProgress(stream, (err: Error | null) => (err ? reject(err) : resolve())),
      );
    },

    async rename(id: string, name: string) {
      await docker.getContainer(id).rename({ name });
    },

    async environment(id: string): Promise<Record<string, string>> {
      const info = await docker.getContainer(id).inspect();
      const env: Record<string, string> = {};
      for (const entry of info.Config.Env ?? []) {
        const at = entry.indexOf("=");
        if (at > 0) env[entry.slice(0, at)] = entry.slice(at + 1);
      }
      return env;
    },

    async attach(id: string): Promise<AsyncIterable<OutputFrame>> {
      const stream = (await docker.getContainer(id).attach({ stream: true, stdout: true, stderr: true, hijack: true })) as unknown as Duplex;
      // Hijacked (HTTP upgrade) so output flows as soon as the container writes it.
      return demuxDockerStream(stream as AsyncIterable<Buffer>);
    },

    async start(id: string) {
      await docker.getContainer(id).start();
    },

    async wait(id: string): Promise<ContainerExit> {
      const container = docker.getContainer(id);
      const result = await container.wait({ condition: "not-running" });
      let info: Docker.ContainerInspectInfo | undefined;
      try {
        info = await container.inspect();
      } catch (err) {
        // Force-removed once it would not stop (run.ts): the wait's status code is all there is.
        if ((err as EngineError).statusCode !== 404) throw err;
      }
      return { exitCode: result.StatusCode ?? info?.State.ExitCode ?? -1, oomKilled: info?.State.OOMKilled ?? false };
    },

    async stop(id: string, graceMs: number) {
      try {
        await docker.getContainer(id).stop({ t: Math.max(0, Math.ceil(graceMs / 1000)) });
      } catch (err) {
        // 304: already stopped; 404: already gone.
        const status = (err as EngineError).statusCode;
        if (status !== 304 && status !== 404) throw err;
      }
    },

    async remove(id: string) {
      try {
        await docker.getContainer(id).remove({ force: true, v: true });
      } catch (err) {
        const status = (err as EngineError).statusCode;
        // 404: gone; 409: removal already in progress.
        if (status !== 404 && status !== 409) throw err;
      }
    },
  };
}

/**
 * The spec's tmpfs mounts plus one over each VOLUME of the image not already covered by a
 * mount: a mount at its path keeps the engine from making it an anonymous volume on the host.
 */
function withImageVolumesCovered(info: Docker.ImageInspectInfo, spec: ContainerSpec): Record<string, string> {
  const tmpfs = { ...spec.tmpfs };
  const mounted = new Set([...Object.keys(tmpfs), ...spec.binds.map((bind) => bind.split(":")[1] ?? "")].map((p) => path.posix.normalize(p)));
  for (const volume of Object.keys(info.Config.Volumes ?? {})) {
    if (!mounted.has(path.posix.normalize(volume))) tmpfs[volume] = spec.imageVolumeTmpfs!;
  }
  return tmpfs;
}

/**
 * What a launcher runs: what the engine would run without it — the image's ENTRYPOINT, then the
 * spec's command or, when it has none, the image's CMD. So a warm container runs exactly what a
 * cold one of the same agent does.
 */
function launchedCommand(info: Docker.ImageInspectInfo, spec: ContainerSpec): string[] {
  const command = [...(info.Config.Entrypoint ?? []), ...(spec.command.length > 0 ? spec.command : (info.Config.Cmd ?? []))];
  if (command.length === 0) throw new Error(`image ${spec.image} has no command and the agent sets none`);
  return command;
}

/** Options of EGRESS_NETWORK: no traffic between its containers; the bridge's interface named after it (for host firewall rules). */
export const EGRESS_NETWORK_OPTIONS: Readonly<Record<string, string>> = {
  "com.docker.network.bridge.enable_icc": "false",
  "com.docker.network.bridge.name": EGRESS_NETWORK,
};

/**
 * Makes EGRESS_NETWORK unless it is there; several executors on one engine share it (a
 * conflict means another one just made it). One that exists without inter-container
 * communication off is refused, never used: its containers could reach each other.
 */
async function ensureEgressNetwork(docker: Docker): Promise<void> {
  const check = (info: Docker.NetworkInspectInfo) => {
    if (info.Driver !== "bridge" || info.Options?.["com.docker.network.bridge.enable_icc"] !== "false") {
      throw new Error(
        `network ${EGRESS_NETWORK} exists but is not a bridge with enable_icc=false, so its containers could reach each other; ` +
          `remove it (docker network rm ${EGRESS_NETWORK}) and the executor makes it again`,
      );
    }
  };
  try {
    check(await docker.getNetwork(EGRESS_NETWORK).inspect());
    return;
  } catch (err) {
    if ((err as EngineError).statusCode !== 404) throw err;
  }
  try {
    await docker.createNetwork({
      Name: EGRESS_NETWORK,
      Driver: "bridge",
      CheckDuplicate: true,
      Labels: { [`${LABEL_PREFIX}managed`]: "true", [`${LABEL_PREFIX}network`]: "egress" },
      Options: { ...EGRESS_NETWORK_OPTIONS },
    });
  } catch (err) {
    if ((err as EngineError).statusCode !== 409) throw err;
    check(await docker.getNetwork(EGRESS_NETWORK).inspect());
  }
}

function dockerOptions(options: DockerRuntimeOptions): ConstructorParameters<typeof Docker>[0] {
  const host = options.dockerHost;
  if (!host) return { socketPath: options.socketPath ?? "/var/run/docker.sock" };
  if (host.startsWith("unix://")) return { socketPath: host.slice("unix://".length) };
  const url = new URL(host.replace(/^tcp:/, "http:"));
  return { host: url.hostname, port: url.port || "2375", protocol: url.protocol === "https:" ? "https" : "http" };
}
