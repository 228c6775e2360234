/**
 * Exports every agent's circuit state (SPEC D8) as the `outpost_circuit_state` gauge (0 closed,
 * 1 half-open, 2 open; label `circuit="agent:<name>"`) and logs each change. The gauge is read
 * at scrape time, as fleet status reads it: an open circuit whose wait has passed is half-open
 * before any call moves it there.
 */
import { CIRCUIT_STATE, gauge, type Logger } from "@outpost/platform";
import type { AgentCircuits } from "../core/resilience.ts";

const METRIC_STATE = { CLOSED: "closed", OPEN: "open", HALF_OPEN: "halfOpen" } as const;

/** The circuits the gauge reads; the last exported wins (one per process outside tests). */
let exported: AgentCircuits | undefined;

export function exportCircuitStates(circuits: AgentCircuits, logger: Logger): void {
  exported = circuits;
  circuits.onStateChange((agent, state) => logger.warn({ agent, circuit: state }, "agent circuit changed"));
  gauge("outpost_circuit_state", "Circuit breaker state by circuit: 0 closed, 1 half-open, 2 open.", ["circuit"], (g) => {
    for (const agent of exported?.agents() ?? []) g.set({ circuit: `agent:${agent}` }, CIRCUIT_STATE[METRIC_STATE[exported!.state(agent)]]);
  });
}
