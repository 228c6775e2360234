/**
 * Resilience policies of the dispatcher, on cockatiel (a well-kept policy library):
 * - `InfraRetry`: how long an infrastructure-failed run waits before it is queued again
 *   (exponential backoff with jitter, a bounded number of attempts). Agent failures are never
 *   retried: only ReleaseLease with infrastructure_failure uses this.
 * - `AgentCircuits`: one circuit breaker per agent. Opens after 5 agent failures within
 *   2 minutes, half-opens after 60 s, closes after 3 successful runs (a failure while half-open
 *   opens it again). While open, creates for that agent fail fast with UNAVAILABLE CIRCUIT_OPEN.
 *   The circuit is shared by every tenant, and a tenant decides what its runs do (a task that
 *   exits 1, a 1 ms timeout), so one tenant's run failures count up to one fewer than the
 *   threshold: opening it takes failures from at least two tenants. Runtime failures (the
 *   agent's image or container, before the run starts) are the agent's alone and count in full.
 *
 * A run's outcome arrives long after its create, through ReportRunState (possibly on another
 * replica's lease call), so outcomes are fed to cockatiel's CircuitBreakerPolicy as instant
 * calls that succeed or fail; the creates only read the breaker's state. Each replica keeps its
 * own breakers, and the dispatcher core feeds them every replica's outcomes (the Notifier
 * carries them over Redis), so they agree on an agent's state. A replica that starts later
 * (or restarts) would begin with every circuit closed; so the replica that handles a run's end
 * saves the agent's circuit (cockatiel's own serialised form, plus when it opened) to a
 * `CircuitStateStore` (Redis), and a starting replica restores them before it serves.
 */
import {
  CircuitBreakerPolicy,
  CircuitState,
  ExponentialBackoff,
  circuitBreaker,
  halfJitterGenerator,
  handleAll,
  type IBackoff,
  type IBreaker,
} from "cockatiel";
import { unavailable } from "@outpost/platform";

export interface InfraRetryOptions {
  /** Delay before the second attempt (before jitter). */
  initialDelayMs: number;
  maxDelayMs: number;
  /** Leases a run may get in all; the next infrastructure failure fails it. */
  maxAttempts: number;
}

export const DEFAULT_INFRA_RETRY: InfraRetryOptions = { initialDelayMs: 1000, maxDelayMs: 60_000, maxAttempts: 5 };

export class InfraRetry {
  readonly options: InfraRetryOptions;
  private readonly backoff: ExponentialBackoff<number>;

  constructor(options: InfraRetryOptions = DEFAULT_INFRA_RETRY) {
    this.options = options;
    // Half jitter: a delay in [d/2, d] with d doubling per attempt, so replicas retrying the
    // same failing engine spread out, yet the delay still grows.
    this.backoff = new ExponentialBackoff({
      initialDelay: options.initialDelayMs,
      maxDelay: options.maxDelayMs,
      exponent: 2,
      generator: halfJitterGenerator,
    });
  }

  /**
   * The delay before the run is leased again after its `attempt`-th lease failed for an
   * infrastructure reason, or undefined when its attempts are used up.
   */
  delayAfter(attempt: number): number | undefined {
    if (attempt >= this.options.maxAttempts) return undefined;
    let step: IBackoff<unknown> = this.backoff.next();
    for (let i = 1; i < attempt; i++) step = step.next(undefined);
    return step.duration;
  }
}

export interface CircuitOptions {
  /** Failures within `windowMs` that open the circuit. */
  failureThreshold: number;
  /** A tenant's run failures counted within `windowMs` (default: `failureThreshold` − 1). */
  maxFailuresPerTenant?: number;
  windowMs: number;
  /** How long the circuit stays open before it half-opens. */
  halfOpenAfterMs: number;
  /** Successes while half-open that close it. */
  successesToClose: number;
}

export const DEFAULT_CIRCUIT: CircuitOptions = { failureThreshold: 5, windowMs: 120_000, halfOpenAfterMs: 60_000, successesToClose: 3 };

export type CircuitStateName = "CLOSED" | "OPEN" | "HALF_OPEN";

/** Opens after `threshold` failures within a sliding window (cockatiel ships count and rate breakers, not this one). */
class WindowedFailureBreaker implements IBreaker {
  state: number[] = [];
  private readonly threshold: number;
  private readonly windowMs: number;
  private readonly now: () => number;

  constructor(threshold: number, windowMs: number, now: () => number) {
    this.threshold = threshold;
    this.windowMs = windowMs;
    this.now = now;
  }

  success(): void {
    // Successes do not forgive failures inside the window: "5 failures in 2 minutes".
  }

  failure(state: CircuitState): boolean {
    if (state === CircuitState.HalfOpen) return true;
    const now = this.now();
    this.state = [...this.state.filter((t) => now - t < this.windowMs), now];
    if (this.state.length >= this.threshold) {
      this.state = [];
      return true;
    }
    return false;
  }
}

class AgentFailure extends Error {}

interface AgentCircuit {
  policy: CircuitBreakerPolicy;
  openedAt: number;
  /** Tenant -> when its counted run failures happened (within the window). */
  tenantFailures: Map<string, number[]>;
}

/** A run's end as the circuit breakers see it. */
export interface RunOutcome {
  succeeded: boolean;
  tenantId: string;
  /** The agent's image or container failed before the run started: counted whoever's run it was. */
  runtimeFailure: boolean;
}

/** Where every replica saves its circuits' states and a starting one reads them (agent -> saved state). */
export interface CircuitStateStore {
  load(): Promise<Record<string, string>>;
  save(agent: string, state: string): Promise<void>;
}

/** A circuit as saved: cockatiel's serialised policy, when it last opened, and each tenant's counted failures. */
interface SavedCircuit {
  policy: unknown;
  openedAt: number;
  tenantFailures?: Record<string, number[]>;
}

/**
 * A saved circuit, if it is one `record` could have written: closed, or open with when and how
 * often (cockatiel's toJSON never writes half-open or isolated). Anything else is refused; an
 * isolated state, say, would never open again, and every replica would save it on.
 */
function parseSaved(text: string): SavedCircuit | undefined {
  const finite = (v: unknown): v is number => typeof v === "number" && Number.isFinite(v);
  try {
    const saved = JSON.parse(text) as Partial<SavedCircuit>;
    const policy = saved.policy as { ownState?: Record<string, unknown>; breakerState?: unknown } | undefined;
    const own = policy?.ownState;
    const validOwn =
      own?.value === CircuitState.Closed ||
      (own?.value === CircuitState.Open && finite(own.openedAt) && Number.isInteger(own.attemptNo) && (own.attemptNo as number) >= 1);
    const tenants = saved.tenantFailures;
    const validTenants =
      tenants === undefined || (typeof tenants === "object" && tenants !== null && Object.values(tenants).every((times) => Array.isArray(times) && times.every(finite)));
    const valid = finite(saved.openedAt) && validOwn && Array.isArray(policy?.breakerState) && policy.breakerState.every(finite) && validTenants;
    return valid ? (saved as SavedCircuit) : undefined;
  } catch {
    return undefined;
  }
}

export class AgentCircuits {
  private readonly options: CircuitOptions;
  private readonly now: () => number;
  private readonly circuits = new Map<string, AgentCircuit>();
  private readonly listeners: ((agent: string, state: CircuitStateName) => void)[] = [];

  private readonly stateStore: CircuitStateStore | undefined;

  /**
   * cockatiel times the open period with Date.now(), so the same clock is used here; tests
   * shorten the durations instead of faking the clock.
   */
  constructor(options: CircuitOptions = DEFAULT_CIRCUIT, stateStore?: CircuitStateStore) {
    this.options = options;
    this.now = Date.now;
    this.stateStore = stateStore;
  }

  /**
   * Takes up the states other replicas saved (before this one records anything). A saved state
   * that does not parse is skipped; a circuit this replica already has is left as it is.
   * Returns the agents whose circuits were restored.
   */
  restore(saved: Record<string, string>): string[] {
    const restored: string[] = [];
    for (const [agent, text] of Object.entries(saved)) {
      const circuit = parseSaved(text);
      if (!circuit || this.circuits.has(agent)) continue;
      this.circuitOf(agent, circuit);
      restored.push(agent);
    }
    return restored;
  }

  /** Called on every state change (metrics, logs). */
  onStateChange(listener: (agent: string, state: CircuitStateName) => void): void {
    this.listeners.push(listener);
  }

  /** Agents that have a circuit (those that were called at least once). */
  agents(): string[] {
    return [...this.circuits.keys()];
  }

  /** The circuit's state as a create would see it: an open circuit past its wait counts as half-open. */
  state(agent: string): CircuitStateName {
    const circuit = this.circuits.get(agent);
    if (!circuit) return "CLOSED";
    switch (circuit.policy.state) {
      case CircuitState.Closed:
        return "CLOSED";
      case CircuitState.HalfOpen:
        return "HALF_OPEN";
      default:
        return this.now() - circuit.openedAt >= this.options.halfOpenAfterMs ? "HALF_OPEN" : "OPEN";
    }
  }

  /** Throws UNAVAILABLE CIRCUIT_OPEN while the agent's circuit is open. */
  assertAccepting(agent: string): void {
    if (this.state(agent) !== "OPEN") return;
    const circuit = this.circuits.get(agent);
    const retryAfterMs = circuit ? Math.max(0, circuit.openedAt + this.options.halfOpenAfterMs - this.now()) : undefined;
    throw unavailable(
      "CIRCUIT_OPEN",
      `agent "${agent}" failed ${this.options.failureThreshold} times within ${this.options.windowMs / 1000} s (circuit open); new dispatches are refused for now, retry later`,
      retryAfterMs,
    );
  }

  /**
   * Records a run's outcome. A run failure of a tenant that has had its share of counted
   * failures within the window is not counted (see the header). `own`: this replica handled
   * the run's end (and saves the circuit's state); `peer`: another replica did and saves it,
   * so each outcome is saved once, by the replica that saw it first.
   */
  async record(agent: string, outcome: RunOutcome, source: "own" | "peer" = "own"): Promise<void> {
    const circuit = this.circuitOf(agent);
    // While open (before its half-open time) the breaker counts nothing; a failure then must not
    // use up its tenant's share either, or a failed trial of that tenant's later goes uncounted.
    const counted = this.state(agent) !== "OPEN";
    if (!outcome.succeeded && !outcome.runtimeFailure && counted && !this.countTenantFailure(circuit, outcome.tenantId)) return;
    try {
      await circuit.policy.execute(() => {
        if (!outcome.succeeded) throw new AgentFailure(agent);
      });
    } catch {
      // The outcome is recorded; a BrokenCircuitError only says the circuit is open.
    }
    if (this.stateStore && source === "own") {
      const saved: SavedCircuit = { policy: circuit.policy.toJSON(), openedAt: circuit.openedAt, tenantFailures: Object.fromEntries(circuit.tenantFailures) };
      // Best effort: the adapter keeps a failed save for when Redis is back.
      this.stateStore.save(agent, JSON.stringify(saved)).catch(() => undefined);
    }
  }

  /** Notes a tenant's run failure; false when the tenant's failures within the window are already at its limit. */
  private countTenantFailure(circuit: AgentCircuit, tenantId: string): boolean {
    const now = this.now();
    const limit = this.options.maxFailuresPerTenant ?? this.options.failureThreshold - 1;
    // Forget tenants whose failures have all left the window (the map stays as small as the window's tenants).
    for (const [tenant, times] of circuit.tenantFailures) {
      const recent = times.filter((t) => now - t < this.options.windowMs);
      if (recent.length === 0) circuit.tenantFailures.delete(tenant);
      else circuit.tenantFailures.set(tenant, recent);
    }
    const times = circuit.tenantFailures.get(tenantId) ?? [];
    if (times.length >= limit) return false;
    circuit.tenantFailures.set(tenantId, [...times, now]);
    return true;
  }

  private circuitOf(agent: string, saved?: SavedCircuit): AgentCircuit {
    const circuit = this.circuits.get(agent);
    if (circuit) return circuit;
    const policy = circuitBreaker(handleAll, {
      halfOpenAfter: this.options.halfOpenAfterMs,
      breaker: new WindowedFailureBreaker(this.options.failureThreshold, this.options.windowMs, this.now),
      // Close only after this many trial outcomes, all successful (threshold 0: any failure re-opens).
      halfOpenSampling: { calls: this.options.successesToClose, threshold: 0 },
      // A half-open circuit is saved as open since 0 (cockatiel's form): it restores half-open,
      // with its trial successes counted from zero again.
      initialState: saved?.policy,
    });
    const created: AgentCircuit = { policy, openedAt: saved?.openedAt ?? 0, tenantFailures: new Map(Object.entries(saved?.tenantFailures ?? {})) };
    policy.onStateChange((state) => {
      if (state === CircuitState.Open) created.openedAt = this.now();
      const name = this.state(agent);
      for (const listener of this.listeners) listener(agent, name);
    });
    this.circuits.set(agent, created);
    return created;
  }
}
