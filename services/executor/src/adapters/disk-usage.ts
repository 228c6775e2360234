/**
 * How much of the host's disk a directory tree takes, for the workspace disk quota
 * (core/disk-quota.ts). The agent controls the tree, so the walk:
 * - never follows a symbolic link (lstat; a link counts as itself, not as what it names);
 * - counts allocated blocks, not apparent sizes (a sparse file takes what it really uses),
 *   and every entry at least MIN_ENTRY_BYTES, so a quota also bounds the number of files and
 *   with it the walk's own cost;
 * - counts a file with several hard links once, and each further name of it one
 *   MIN_ENTRY_BYTES: a name costs a directory entry, and a name that cost nothing would let an
 *   agent make the walk (one lstat per name) as long as it likes within its quota — millions of
 *   hard links to one file — while it writes past the quota between two measurements;
 * - stops once past `stopAboveBytes`, reads directories as a stream (a directory of millions
 *   of names is never held in memory) and lstats a bounded batch at a time;
 * - skips what vanished while it walked (the agent deletes as it goes), and raises
 *   WorkspaceUnmeasurableError for what it cannot see (a directory it may not read, a path
 *   longer than the system can name): the tree might hide anything there.
 * A directory swapped for a link between its lstat and its opendir is walked where the link
 * points (Node has no O_NOFOLLOW opendir): that only counts more against the agent's own
 * quota, bounded like any walk, and reads no file's content.
 */
import type { Stats } from "node:fs";
import fs from "node:fs/promises";
import path from "node:path";
import { WorkspaceUnmeasurableError } from "../core/ports.ts";

/** What one file, directory or link counts at least (one filesystem block). */
export const MIN_ENTRY_BYTES = 4096;
const LSTAT_BATCH = 64;
/** Errors that mean part of the tree cannot be seen, whatever the next attempt does. */
const UNMEASURABLE = new Set(["EACCES", "EPERM", "ENAMETOOLONG", "ELOOP"]);

export async function diskUsageOf(root: string, stopAboveBytes: number, signal?: AbortSignal): Promise<number> {
  let total = 0;
  const linked = new Set<string>();
  const count = (stat: Stats) => {
    if (stat.nlink > 1 && !stat.isDirectory()) {
      const key = `${stat.dev}:${stat.ino}`;
      if (linked.has(key)) {
        total += MIN_ENTRY_BYTES;
        return;
      }
      linked.add(key);
    }
    total += Math.max(stat.blocks * 512, MIN_ENTRY_BYTES);
  };
  const rootStat = await lstatOrGone(root);
  if (!rootStat) return 0;
  count(rootStat);
  const dirs = rootStat.isDirectory() ? [root] : [];
  while (dirs.length > 0 && total <= stopAboveBytes) {
    signal?.throwIfAborted();
    const dir = dirs.pop()!;
    let handle;
    try {
      handle = await fs.opendir(dir, { bufferSize: LSTAT_BATCH });
    } catch (err) {
      if (gone(err)) continue;
      throw classify(err);
    }
    let batch: string[] = [];
    const flush = async () => {
      const stats = await Promise.all(batch.map((name) => lstatOrGone(name)));
      stats.forEach((stat, i) => {
        if (!stat) return;
        count(stat);
        if (stat.isDirectory()) dirs.push(batch[i]!);
      });
      batch = [];
    };
    try {
      // Breaking out of the loop closes the directory handle.
      for await (const entry of handle) {
        batch.push(path.join(dir, entry.name));
        if (batch.length >= LSTAT_BATCH) {
          await flush();
          if (total > stopAboveBytes) break;
          signal?.throwIfAborted();
        }
      }
    } catch (err) {
      if (err instanceof WorkspaceUnmeasurableError || signal?.aborted) throw err;
      if (!gone(err)) throw classify(err);
    }
    await flush();
  }
  return total;
}

async function lstatOrGone(file: string): Promise<Stats | undefined> {
  try {
    return await fs.lstat(file);
  } catch (err) {
    if (gone(err)) return undefined;
    throw classify(err);
  }
}

function gone(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException).code;
  return code === "ENOENT" || code === "ENOTDIR";
}

/** The agent names the files: the reason says what went wrong, never which path. */
function classify(err: unknown): Error {
  const code = (err as NodeJS.ErrnoException).code ?? "";
  if (UNMEASURABLE.has(code)) {
    const what = code === "ENAMETOOLONG" ? "a path in it is too long to measure" : code === "ELOOP" ? "a path in it loops" : "a part of it is not readable by the executor";
    return new WorkspaceUnmeasurableError(`${what} (${code})`, { cause: err });
  }
  return err instanceof Error ? err : new Error(String(err));
}
