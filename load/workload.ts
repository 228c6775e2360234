/**
 * The load mix over the edge, as a tenant's users produce it: many readers (get, list, agent
 * catalogue, log pages, log subscriptions) and a few writers (creates of the demo agent, half
 * of them cancelled soon after). Every call goes through the gateway with an API key.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import type { OutpostClients } from "@outpost/cli";
import { READ_MIX, type ReadMethod } from "./profiles.ts";
import { deadlineError, type MethodStats } from "./stats.ts";

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
  /**
   * The first part of the run whose calls are made but not measured (stats.setMeasuredWindow),
   * so start-up effects (cold caches, connections being opened) stay out of the figures.
   */
  warmupMs?: number;
  /**
   * Deadline of every call (the stats' callTimeoutMs, default 10 s); a log subscription gets its
   * follow time plus this to end once its follow time is up.
   */
  callTimeoutMs?: number;
}

/** "run": left to run to its end; "cancel": cancelled by the creator soon after creation. */
export type RunKind = "run" | "cancel";

export interface CreatedRun {
  tenant: LoadTenant;
  id: string;
  kind: RunKind;
}

export interface WorkloadOutcome {
  created: CreatedRun[];
  /** CreateDispatch calls made (whether or not they succeeded). */
  createAttempts: number;
  cancelled: number;
  /** Subscriptions that produced nothing before the reader moved on (queued runs). */
  idleSubscriptions: number;
  /** Epoch ms: the measured window (after the warm-up, up to the nominal end). */
  measuredFrom: number;
  measuredUntil: number;
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

export const DEFAULT_CALL_TIMEOUT_MS = 10_000;

export async function runWorkload(options: WorkloadOptions): Promise<WorkloadOutcome> {
  const { stats } = options;
  const start = Date.now();
  const end = start + options.durationMs;
  const measuredFrom = Math.min(end, start + (options.warmupMs ?? 0));
  stats.setMeasuredWindow(measuredFrom, end);
  const outcome: WorkloadOutcome = { created: [], createAttempts: 0, cancelled: 0, idleSubscriptions: 0, measuredFrom, measuredUntil: end };
  const subscribeForMs = options.subscribeForMs ?? 10_000;
  const callTimeoutMs = options.callTimeoutMs ?? stats.callTimeoutMs ?? DEFAULT_CALL_TIMEOUT_MS;
  /** Every unary call has the deadline, whatever the stats were made with. */
  const time = <T>(method: string, call: (signal: AbortSignal) => Promise<T>) =>
    stats.callTimeoutMs === undefined ? stats.time(method, (signal) => withDeadline(callTimeoutMs, signal, call)) : stats.time(method, call);

  /**
   * One request however it goes: latency to the first message when one came; an error (once)
   * when the stream failed, before or after its first message; idle when nothing came before
   * the follow time ran out. A stream that does not end when it is left fails DeadlineExceeded.
   */
  async function subscribe(tenant: LoadTenant, dispatchId: string) {
    const startedAt = Date.now();
    const started = performance.now();
    const leave = new AbortController();
    const followTimer = setTimeout(() => leave.abort(), subscribeForMs);
    let hardTimer: NodeJS.Timeout | undefined;
    let firstMs: number | undefined;
    const follow = (async () => {
      for await (const _message of tenant.clients.logs.subscribeLogs({ dispatchId, afterSeq: 0n }, { signal: leave.signal })) {
        firstMs ??= performance.now() - started;
      }
    })();
    const hung = new Promise<never>((_, reject) => {
      hardTimer = setTimeout(() => reject(deadlineError(subscribeForMs + callTimeoutMs)), subscribeForMs + callTimeoutMs);
    });
    try {
      await Promise.race([follow, hung]);
    } catch (err) {
      // Leaving a subscription on our own time bound is what a reader does, not a failure; a
      // stream still open long after that, or one that failed before, is.
      if (!leave.signal.aborted || ConnectError.from(err).code === Code.DeadlineExceeded) {
        return stats.fail("SubscribeLogs", err, performance.now() - started, startedAt);
      }
    } finally {
      clearTimeout(followTimer);
      clearTimeout(hardTimer);
      leave.abort();
    }
    if (firstMs === undefined) {
      outcome.idleSubscriptions++;
      stats.recordIdle("SubscribeLogs", startedAt);
    } else {
      stats.record("SubscribeLogs", firstMs, startedAt);
    }
  }

  async function reader(index: number) {
    const tenant = options.tenants[index % options.tenants.length]!;
    // Spread the clients' first calls over one think time.
    await sleep(Math.random() * options.thinkMs);
    while (Date.now() < end) {
      const id = pick(tenant.ids);
      switch (pickMethod()) {
        case "GetDispatch":
          await time("GetDispatch", (signal) => tenant.clients.dispatches.getDispatch({ dispatchId: id }, { signal }));
          break;
        case "ListDispatches":
          await time("ListDispatches", (signal) => tenant.clients.dispatches.listDispatches({ pageSize: 20 }, { signal }));
          break;
        case "ListAgents":
          await time("ListAgents", (signal) => tenant.clients.agents.listAgents({}, { signal }));
          break;
        case "GetLogs":
          await time("GetLogs", (signal) => tenant.clients.logs.getLogs({ dispatchId: id, pageSize: 100 }, { signal }));
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
    // The first create goes out at once, so a run with creates configured always makes one.
    for (let n = 0; n === 0 || Date.now() + interval / 2 < end; n++) {
      const tenant = options.tenants[n % options.tenants.length]!;
      const kind: RunKind = n % 2 === 1 ? "cancel" : "run";
      outcome.createAttempts++;
      const res = await time("CreateDispatch", (signal) =>
        tenant.clients.dispatches.createDispatch({ agent: "demo", task: options.task ?? "load lines=3", labels: { source: "load" } }, { signal }),
      );
      const id = res?.dispatch?.id;
      if (id) {
        tenant.ids.push(id);
        outcome.created.push({ tenant, id, kind });
        if (kind === "cancel") {
          cancels.push(
            sleep(500).then(async () => {
              if (await time("CancelDispatch", (signal) => tenant.clients.dispatches.cancelDispatch({ dispatchId: id }, { signal }))) outcome.cancelled++;
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
 * Runs `call` with a signal that fires after `ms` (or with `outer`); rejects DeadlineExceeded at
 * that point even if the call ignores its signal.
 */
export async function withDeadline<T>(ms: number, outer: AbortSignal | undefined, call: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const controller = new AbortController();
  const onOuter = () => controller.abort(outer?.reason);
  outer?.addEventListener("abort", onOuter, { once: true });
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      call(controller.signal),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => {
          const err = deadlineError(ms);
          controller.abort(err);
          reject(err);
        }, ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
    outer?.removeEventListener("abort", onOuter);
  }
}

export interface SettleOutcome {
  /** Runs still not terminal when settling gave up. */
  open: string[];
  /** Runs settling had to cancel because they had not ended `cancelAfterMs` after it began. */
  cancelledBySettling: string[];
  /** The last state seen of every run (UNSPECIFIED when it could not be read). */
  states: Map<string, Dispatch_State>;
}

/**
 * Waits (bounded) until every created dispatch is terminal. Runs still not terminal when
 * `cancelAfterMs` passes are cancelled so the run ends cleanly, and reported as such: a run
 * that had to be cancelled did not finish (with the Docker engine unreachable, none starts).
 * Every call has a deadline (`callTimeoutMs`).
 */
export async function settle(
  created: readonly CreatedRun[],
  timeoutMs: number,
  cancelAfterMs = timeoutMs / 2,
  callTimeoutMs = DEFAULT_CALL_TIMEOUT_MS,
): Promise<SettleOutcome> {
  const started = Date.now();
  const states = new Map<string, Dispatch_State>(created.map((c) => [c.id, Dispatch_State.UNSPECIFIED]));
  const cancelledBySettling: string[] = [];
  let open = [...created];
  let cancelled = false;
  const poll = () =>
    Promise.all(
      open.map(async (c) => {
        try {
          const res = await withDeadline(callTimeoutMs, undefined, (signal) => c.tenant.clients.dispatches.getDispatch({ dispatchId: c.id }, { signal }));
          states.set(c.id, res.dispatch?.state ?? Dispatch_State.UNSPECIFIED);
        } catch {
          // read again on the next round
        }
      }),
    );
  while (open.length && Date.now() - started < timeoutMs) {
    await poll();
    open = open.filter((c) => !isTerminal(states.get(c.id)!));
    if (!cancelled && open.length && Date.now() - started >= cancelAfterMs) {
      cancelled = true;
      cancelledBySettling.push(...open.map((c) => c.id));
      await Promise.allSettled(
        open.map((c) => withDeadline(callTimeoutMs, undefined, (signal) => c.tenant.clients.dispatches.cancelDispatch({ dispatchId: c.id }, { signal }))),
      );
    }
    if (open.length) await sleep(500);
  }
  return { open: open.map((c) => c.id), cancelledBySettling, states };
}
