/**
 * Whether a load run passed, and the final states of its runs by kind. `npm run load` exits 1
 * when verdict() gives any reason, so a run that failed cannot pass for a measurement.
 */
import { Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import type { CreatedRun, RunKind, SettleOutcome } from "./workload.ts";

/** Default of --max-error-rate: every profile has run without errors (docs/performance.md). */
export const DEFAULT_MAX_ERROR_RATE = 0.01;

export const RUN_KIND_LABEL: Record<RunKind, string> = { run: "left to run", cancel: "cancelled by the creator" };

export interface RunKindStates {
  kind: RunKind;
  created: number;
  /** Final state name (SUCCEEDED, FAILED, TIMED_OUT, CANCELLED, or QUEUED/STARTING/RUNNING/UNSPECIFIED when not terminal) → runs. */
  states: Record<string, number>;
  /** Of these, cancelled by settling because they had not ended in time. */
  cancelledBySettling: number;
}

export function runStatesByKind(created: readonly CreatedRun[], settled: SettleOutcome): RunKindStates[] {
  const bySettling = new Set(settled.cancelledBySettling);
  return (["run", "cancel"] as const).map((kind) => {
    const runs = created.filter((c) => c.kind === kind);
    const states: Record<string, number> = {};
    for (const c of runs) {
      const name = Dispatch_State[settled.states.get(c.id) ?? Dispatch_State.UNSPECIFIED] ?? "UNSPECIFIED";
      states[name] = (states[name] ?? 0) + 1;
    }
    return { kind, created: runs.length, states, cancelledBySettling: runs.filter((c) => bySettling.has(c.id)).length };
  });
}

export interface VerdictInput {
  /** Every call made, measured or not (warm-up and after the end included). */
  calls: number;
  errors: number;
  maxErrorRate: number;
  /** Whether the profile creates runs (creates per minute > 0). */
  createsExpected: boolean;
  created: number;
  runs: RunKindStates[];
  /** Runs not terminal after settling. */
  open: number;
}

/** Why the run failed; empty when it passed. */
export function verdict(input: VerdictInput): string[] {
  const reasons: string[] = [];
  const pct = (x: number) => `${(x * 100).toFixed(2)}%`;
  if (input.calls === 0) reasons.push("no call was made");
  else if (input.errors / input.calls > input.maxErrorRate) {
    reasons.push(`error rate ${pct(input.errors / input.calls)} (${input.errors} of ${input.calls} calls) is above --max-error-rate ${pct(input.maxErrorRate)}`);
  }
  if (input.createsExpected && input.created === 0) reasons.push("no run was created");
  const bySettling = input.runs.reduce((n, r) => n + r.cancelledBySettling, 0);
  if (bySettling > 0) {
    reasons.push(`${bySettling} run(s) had not ended when settling gave up waiting and were cancelled (is the Docker engine reachable? see the executor's log)`);
  }
  if (input.open > 0) reasons.push(`${input.open} run(s) were not in a terminal state after settling`);
  // Runs left to run should succeed: the demo agent's task exits 0. (Those cancelled by
  // settling, or still open, are reported above.)
  const kept = input.runs.find((r) => r.kind === "run");
  if (kept) {
    const s = kept.states;
    const unsuccessful = (s.FAILED ?? 0) + (s.TIMED_OUT ?? 0) + Math.max(0, (s.CANCELLED ?? 0) - kept.cancelledBySettling);
    if (unsuccessful > 0) {
      reasons.push(`${unsuccessful} run(s) left to run did not succeed (${Object.entries(s).map(([state, n]) => `${state}=${n}`).join(" ")})`);
    }
  }
  return reasons;
}
