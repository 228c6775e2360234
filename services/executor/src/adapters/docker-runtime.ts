/**
 * ContainerRuntime over the Docker Engine API (dockerode). Runs are always created for
 * linux/arm64 (the `platform` query parameter, API >= 1.41). A missing image is reported as
 * such; `pull` fetches one for linux/arm64 where a registry is reachable (SPEC E4).
 */
import Docker from "dockerode";
import path from "node:path";
import type { Duplex } from "node:stream";
import {
  ImageNotFoundError,
  type ContainerExit,
  type ContainerRuntime,
  type ContainerSpec,
  type ContainerSummary,
  type OutputFrame,
} from "../core/ports.ts";
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
}

export function createDockerRuntime(options: DockerRuntimeOptions = {}): ContainerRuntime {
  const docker = new Docker(dockerOptions(options));
  const pingTimeoutMs = options.pingTimeoutMs ?? 3000;
  return {
    async ping() {
      // dockerode 5 accepts an abort signal here; @types/dockerode (v4) does not know it yet.
      await (docker.ping as unknown as (options: { abortSignal: AbortSignal }) => Promise<unknown>)({
        abortSignal: AbortSignal.timeout(pingTimeoutMs),
      });
    },

    async create(spec: ContainerSpec) {
      try {
        const tmpfs = spec.imageVolumeTmpfs === undefined ? spec.tmpfs : await withImageVolumesCovered(docker, spec);
        // docker-modem's _query/_body split keeps `platform` out of the body; @types/dockerode
        // (v4) does not model it, hence the cast.
        const container = await docker.createContainer({
          _query: { name: spec.name, platform: spec.platform },
          _body: {
            Image: spec.image,
            ...(spec.entrypoint ? { Entrypoint: spec.entrypoint } : {}),
            ...(spec.command.length > 0 ? { Cmd: spec.command } : {}),
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
            },
          },
        } as unknown as Docker.ContainerCreateOptions);
        return container.id;
      } catch (err) {
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

    async defaultCommand(image: string) {
      const info = await docker.getImage(image).inspect();
      return [...(info.Config.Entrypoint ?? []), ...(info.Config.Cmd ?? [])];
    },

    async rename(id: string, name: string) {
      await docker.getContainer(id).rename({ name });
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
      const info = await container.inspect();
      return { exitCode: result.StatusCode ?? info.State.ExitCode, oomKilled: info.State.OOMKilled };
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
async function withImageVolumesCovered(docker: Docker, spec: ContainerSpec): Promise<Record<string, string>> {
  const info = await docker.getImage(spec.image).inspect();
  const tmpfs = { ...spec.tmpfs };
  const mounted = new Set([...Object.keys(tmpfs), ...spec.binds.map((bind) => bind.split(":")[1] ?? "")].map((p) => path.posix.normalize(p)));
  for (const volume of Object.keys(info.Config.Volumes ?? {})) {
    if (!mounted.has(path.posix.normalize(volume))) tmpfs[volume] = spec.imageVolumeTmpfs!;
  }
  return tmpfs;
}

function dockerOptions(options: DockerRuntimeOptions): ConstructorParameters<typeof Docker>[0] {
  const host = options.dockerHost;
  if (!host) return { socketPath: options.socketPath ?? "/var/run/docker.sock" };
  if (host.startsWith("unix://")) return { socketPath: host.slice("unix://".length) };
  const url = new URL(host.replace(/^tcp:/, "http:"));
  return { host: url.hostname, port: url.port || "2375", protocol: url.protocol === "https:" ? "https" : "http" };
}
