/**
 * The load mix over the edge, as a tenant's users produce it: many readers (get, list, agent
 * catalogue, log pages, log subscriptions) and a few writers (creates of the demo agent, half
 * of them cancelled soon after). Every call goes through the gateway with an API key.
 */
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import type { OutpostClients } from "@outpost/cli";
import { READ_MIX, type ReadMethod } from "./profiles.ts";
import type { MethodStats } from "./stats.ts";

export interface LoadTenant {
  tenantId: string;
  clients: OutpostClients;
  /** Dispatch ids this tenant may read (its own; SPEC T4). Never empty. */
  ids: string[];
}

export interface WorkloadOptions {
  tenants: LoadTenant[];
  clients: number;
  durationMs: number;
  thinkMs: number;
  createsPerMinute: number;
  stats: MethodStats;
  /** Task text of created runs (the demo agent's directives). */
  task?: string;
  /** How long one log subscription is followed at most before the reader moves on. */
  subscribeForMs?: number;
}

export interface WorkloadOutcome {
  created: { tenant: LoadTenant; id: string }[];
  cancelled: number;
  /** Subscriptions that produced nothing before the reader moved on (queued runs). */
  idleSubscriptions: number;
}

const TOTAL_WEIGHT = READ_MIX.reduce((n, m) => n + m.weight, 0);

function pick<T>(items: readonly T[]): T {
  return items[Math.floor(Math.random() * items.length)]!;
}

function pickMethod(): ReadMethod {
  let r = Math.random() * TOTAL_WEIGHT;
  for (const m of READ_MIX) if ((r -= m.weight) < 0) return m.method;
  return READ_MIX[0].method;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

export async function runWorkload(options: WorkloadOptions): Promise<WorkloadOutcome> {
  const { stats } = options;
  const end = Date.now() + options.durationMs;
  const outcome: WorkloadOutcome = { created: [], cancelled: 0, idleSubscriptions: 0 };
  const subscribeForMs = options.subscribeForMs ?? 10_000;

  async function subscribe(tenant: LoadTenant, dispatchId: string) {
    const started = performance.now();
    const signal = AbortSignal.timeout(subscribeForMs);
    let first = true;
    try {
      for await (const _message of tenant.clients.logs.subscribeLogs({ dispatchId, afterSeq: 0n }, { signal })) {
        if (first) stats.record("SubscribeLogs", performance.now() - started);
        first = false;
      }
    } catch (err) {
      // Leaving a subscription on our own time bound is what a reader does, not a failure.
      if (!signal.aborted) return stats.fail("SubscribeLogs", err);
    }
    if (first) outcome.idleSubscriptions++;
  }

  async function reader(index: number) {
    const tenant = options.tenants[index % options.tenants.length]!;
    // Spread the clients' first calls over one think time.
    await sleep(Math.random() * options.thinkMs);
    while (Date.now() < end) {
      const id = pick(tenant.ids);
      switch (pickMethod()) {
        case "GetDispatch":
          await stats.time("GetDispatch", () => tenant.clients.dispatches.getDispatch({ dispatchId: id }));
          break;
        case "ListDispatches":
          await stats.time("ListDispatches", () => tenant.clients.dispatches.listDispatches({ pageSize: 20 }));
          break;
        case "ListAgents":
          await stats.time("ListAgents", () => tenant.clients.agents.listAgents({}));
          break;
        case "GetLogs":
          await stats.time("GetLogs", () => tenant.clients.logs.getLogs({ dispatchId: id, pageSize: 100 }));
          break;
        case "SubscribeLogs":
          await subscribe(tenant, id);
          break;
      }
      // Think time: uniform around the mean, so clients do not move in lock step.
      await sleep(options.thinkMs * (0.5 + Math.random()));
    }
  }

  async function creator() {
    if (options.createsPerMinute <= 0) return;
    const interval = 60_000 / options.createsPerMinute;
    const cancels: Promise<void>[] = [];
    for (let n = 0; Date.now() + interval / 2 < end; n++) {
      const tenant = options.tenants[n % options.tenants.length]!;
      const res = await stats.time("CreateDispatch", () =>
        tenant.clients.dispatches.createDispatch({ agent: "demo", task: options.task ?? "load lines=3", labels: { source: "load" } }),
      );
      const id = res?.dispatch?.id;
      if (id) {
        tenant.ids.push(id);
        outcome.created.push({ tenant, id });
        if (n % 2 === 1) {
          cancels.push(
            sleep(500).then(async () => {
              if (await stats.time("CancelDispatch", () => tenant.clients.dispatches.cancelDispatch({ dispatchId: id }))) outcome.cancelled++;
            }),
          );
        }
      }
      await sleep(interval);
    }
    await Promise.all(cancels);
  }

  await Promise.all([creator(), ...Array.from({ length: options.clients }, (_, i) => reader(i))]);
  return outcome;
}

const TERMINAL = new Set([Dispatch_State.SUCCEEDED, Dispatch_State.FAILED, Dispatch_State.TIMED_OUT, Dispatch_State.CANCELLED]);

export function isTerminal(state: Dispatch_State): boolean {
  return TERMINAL.has(state);
}

/**
 * Waits (bounded) until every created dispatch is terminal; returns the ids still open.
 * Runs still queued when `cancelAfterMs` passes are cancelled so the run ends cleanly.
 */
export async function settle(created: WorkloadOutcome["created"], timeoutMs: number, cancelAfterMs = timeoutMs / 2): Promise<string[]> {
  const started = Date.now();
  let open = created;
  let cancelled = false;
  while (open.length && Date.now() - started < timeoutMs) {
    const states = await Promise.all(
      open.map(async (c) => {
        try {
          return (await c.tenant.clients.dispatches.getDispatch({ dispatchId: c.id })).dispatch?.state ?? Dispatch_State.UNSPECIFIED;
        } catch {
          return Dispatch_State.UNSPECIFIED;
        }
      }),
    );
    open = open.filter((_, i) => !isTerminal(states[i]!));
    if (!cancelled && Date.now() - started >= cancelAfterMs) {
      cancelled = true;
      await Promise.allSettled(open.map((c) => c.tenant.clients.dispatches.cancelDispatch({ dispatchId: c.id })));
    }
    if (open.length) await sleep(500);
  }
  return open.map((c) => c.id);
}
