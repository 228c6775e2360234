/**
 * When a test fails while a mesh is up, print the tail of each of its process logs, so a
 * failure in CI (where the temporary log directory is gone afterwards) can be diagnosed from
 * the test output alone.
 */
import { existsSync, readdirSync, readFileSync } from "node:fs";
import path from "node:path";
import { beforeEach } from "vitest";

const logDirs = new Set<string>();

/** Called by the test harness for each mesh it starts. */
export function watchLogDir(dir: string): void {
  logDirs.add(dir);
}

export function unwatchLogDir(dir: string): void {
  logDirs.delete(dir);
}

const TAIL_LINES = 25;
const LINE_CHARS = 800;

beforeEach((context) => {
  context.onTestFailed(() => {
    for (const dir of logDirs) {
      if (!existsSync(dir)) continue;
      for (const file of readdirSync(dir).sort()) {
        const lines = readFileSync(path.join(dir, file), "utf8").trimEnd().split("\n");
        console.error(`--- ${file} (last ${Math.min(TAIL_LINES, lines.length)} of ${lines.length} lines) ---\n${lines.slice(-TAIL_LINES).map((l) => l.slice(0, LINE_CHARS)).join("\n")}`);
      }
    }
  });
});
