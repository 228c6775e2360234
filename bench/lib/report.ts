/** Formats benchmark results as plain-text tables (one per benchmark) and the run's conditions. */
import os from "node:os";
import type { BenchResult } from "./types.ts";

export interface MachineConditions {
  cores: number;
  cpu: string;
  memoryGiB: number;
  node: string;
  platform: string;
  load1: number;
}

export function machineConditions(): MachineConditions {
  return {
    cores: os.availableParallelism(),
    cpu: os.cpus()[0]?.model.trim() ?? "unknown",
    memoryGiB: Math.round((os.totalmem() / 1024 ** 3) * 10) / 10,
    node: process.version,
    platform: `${os.platform()}/${os.arch()}`,
    load1: Math.round(os.loadavg()[0]! * 100) / 100,
  };
}

export function formatMachine(m: MachineConditions): string {
  return `machine: ${m.cores} cores (${m.cpu}), ${m.memoryGiB} GiB, node ${m.node}, ${m.platform}, load average ${m.load1}`;
}

export const TABLE_HEADER = ["metric", "outpost", "baseline", "ratio", "goal", "unit"] as const;

function figure(n: number | undefined): string {
  if (n === undefined || Number.isNaN(n)) return "-";
  if (Math.abs(n) >= 100) return n.toFixed(0);
  if (Math.abs(n) >= 10) return n.toFixed(1);
  return n.toFixed(3);
}

export function formatTable(result: BenchResult): string {
  const rows = result.rows.map((r) => [r.metric, figure(r.value), figure(r.baseline), r.ratio === undefined ? "-" : r.ratio.toFixed(2), r.goal ?? "-", r.unit]);
  const all = [[...TABLE_HEADER], ...rows];
  const widths = TABLE_HEADER.map((_, i) => Math.max(...all.map((row) => row[i]!.length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => (i === 0 || i >= 4 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join(" | ")} |`;
  return [
    `## ${result.name}`,
    `conditions: ${result.conditions}`,
    line(all[0]!),
    `|${widths.map((w, i) => (i === 0 || i >= 4 ? `:${"-".repeat(w + 1)}` : `${"-".repeat(w + 1)}:`)).join("|")}|`,
    ...rows.map(line),
    ...(result.warnings ?? []).map((w) => `warning: ${w}`),
  ].join("\n");
}
