/**
 * Warm containers (SPEC E4): per agent, a configured number of containers created and started
 * ahead of work, so a run skips container creation and start-up.
 *
 * Docker fixes a container's environment at creation, but a run's environment (task, model,
 * dispatch id, trace context, secrets) is only known when its lease arrives. So a warm
 * container runs `/bin/sh -c '. /run/outpost/start && exec "$@"' <what a cold container runs>`
 * (the image's ENTRYPOINT, then the agent's command or else the image's CMD, resolved by the
 * runtime from the image: ContainerSpec.launcher): it blocks reading a FIFO in its read-only
 * control mount; the executor writes the run's environment into that FIFO as `export` lines, and
 * the shell execs the agent, which then runs under the init as in a cold container. Trade-offs (docs/executor.md): the image needs /bin/sh; the run's env is not in
 * `docker inspect` (a plus for secrets); labels cannot change after creation, so a warm run's
 * container carries the agent and run directory labels but not the dispatch id (its name and
 * the run directory's claim file say which dispatch it serves).
 *
 * The executor learns an agent's image, command and limits from its first lease (it has no
 * registry of its own); from then on the pool keeps `target` containers of that shape, and a
 * lease takes one only when the shape still matches.
 */
import type { Logger } from "@outpost/platform";
import type { Lease } from "@outpost/proto/outpost/executor/v1/lease_service_pb.js";
import { ulid } from "ulid";
import type { ContainerRuntime, ContainerSpec, RunFiles, Workspaces } from "./ports.ts";
import { agentShapeOf, bindsFor, CONTROL_DIR, LABEL_PREFIX, type ContainerUser } from "./run.ts";

export interface WarmContainer {
  id: string;
  name: string;
  files: RunFiles;
}

export interface WarmPoolOptions {
  /** Warm containers to keep per agent name. */
  targets: ReadonlyMap<string, number>;
  runtime: ContainerRuntime;
  workspaces: Workspaces;
  executorId: string;
  logger: Logger;
  /** Who agents run as (run.ts containerUserFor); nobody when absent. */
  containerUser?: ContainerUser;
}

export const WARM_LABEL = `${LABEL_PREFIX}warm-agent`;
const WAITER = `. ${CONTROL_DIR}/start && exec "$@"`;

interface AgentPool {
  /** JSON of the agent's container shape; a lease must match it. */
  key: string;
  shape: ReturnType<typeof agentShapeOf>;
  idle: WarmContainer[];
  creating: number;
}

export class WarmPool {
  private readonly options: WarmPoolOptions;
  private readonly pools = new Map<string, AgentPool>();
  private closed = false;
  /** Fills in flight, so tests and shutdown can wait for them. */
  private readonly filling = new Set<Promise<void>>();

  constructor(options: WarmPoolOptions) {
    this.options = options;
  }

  /** Idle warm containers over all agents. */
  get size(): number {
    let n = 0;
    for (const pool of this.pools.values()) n += pool.idle.length;
    return n;
  }

  /** Takes a warm container matching the lease's agent, if one is idle; the pool refills behind it. */
  claim(lease: Lease): WarmContainer | undefined {
    const agent = lease.agent;
    if (!agent || this.closed) return undefined;
    const target = this.options.targets.get(agent.name);
    if (!target) return undefined;
    const shape = agentShapeOf(agent, this.options.containerUser);
    const key = JSON.stringify(shape);
    let pool = this.pools.get(agent.name);
    if (!pool || pool.key !== key) {
      // First lease of this agent, or its registration changed: (re)learn its shape.
      const stale = pool?.idle ?? [];
      pool = { key, shape, idle: [], creating: 0 };
      this.pools.set(agent.name, pool);
      for (const old of stale) void this.discard(old);
      this.fill(agent.name);
      return undefined;
    }
    const taken = pool.idle.shift();
    this.fill(agent.name);
    return taken;
  }

  /** Resolves when no fill is in flight. */
  async settled(): Promise<void> {
    while (this.filling.size > 0) await Promise.all([...this.filling]);
  }

  /** Removes every idle warm container and stops refilling. */
  async close(): Promise<void> {
    this.closed = true;
    await this.settled();
    const all = [...this.pools.values()].flatMap((p) => p.idle.splice(0));
    await Promise.all(all.map((c) => this.discard(c)));
  }

  private fill(agentName: string): void {
    const pool = this.pools.get(agentName);
    const target = this.options.targets.get(agentName) ?? 0;
    if (!pool || this.closed) return;
    while (pool.idle.length + pool.creating < target) {
      pool.creating++;
      const job = this.createOne(agentName, pool)
        .then((warm) => {
          if (this.pools.get(agentName) === pool && !this.closed) pool.idle.push(warm);
          else void this.discard(warm);
        })
        .catch((err: unknown) => this.options.logger.warn({ agent: agentName, err }, "warm container not created"))
        .finally(() => {
          pool.creating--;
          this.filling.delete(job);
        });
      this.filling.add(job);
    }
  }

  private async createOne(agentName: string, pool: AgentPool): Promise<WarmContainer> {
    const { runtime, workspaces, executorId } = this.options;
    const name = `outpost-warm-${ulid().toLowerCase()}`;
    const files = await workspaces.create(name);
    let keep = false;
    try {
      await workspaces.makeStartFifo(files);
      const spec: ContainerSpec = {
        ...pool.shape,
        name,
        // Then the image's ENTRYPOINT and the agent's command (or the image's CMD), as a cold
        // container of the agent runs them.
        launcher: ["/bin/sh", "-c", WAITER, "outpost-warm"],
        env: {},
        labels: {
          [`${LABEL_PREFIX}managed`]: "true",
          [`${LABEL_PREFIX}executor-id`]: executorId,
          [`${LABEL_PREFIX}run-dir`]: name,
          [WARM_LABEL]: agentName,
        },
        binds: bindsFor(files),
      };
      const id = await runtime.create(spec);
      try {
        await runtime.start(id);
      } catch (err) {
        await runtime.remove(id).catch(() => {
          keep = true;
        });
        throw err;
      }
      return { id, name, files };
    } catch (err) {
      // Not while a container that could not be removed may still use it (discard).
      if (!keep) await workspaces.remove(files).catch(() => undefined);
      throw err;
    }
  }

  private async discard(warm: WarmContainer): Promise<void> {
    try {
      await this.options.runtime.remove(warm.id);
    } catch (err) {
      // Its run directory stays while the container may run (run.ts cleanUp); reconciliation removes both.
      this.options.logger.warn({ err }, "warm container not removed; its run directory is kept");
      return;
    }
    await this.options.workspaces.remove(warm.files).catch(() => undefined);
  }
}

/** Parses OUTPOST_WARM_POOL, e.g. "demo=2,claude=1". */
export function parseWarmPool(text: string | undefined): Map<string, number> {
  const targets = new Map<string, number>();
  for (const part of (text ?? "").split(",").map((p) => p.trim()).filter(Boolean)) {
    const match = /^([a-z0-9][a-z0-9_-]{0,63})=(\d{1,3})$/.exec(part);
    if (!match) throw new Error(`OUTPOST_WARM_POOL: "${part}" is not <agent>=<count>`);
    targets.set(match[1]!, Number(match[2]));
  }
  return targets;
}
