/**
 * Loopback ports for processes the tests, benchmarks and scripts are about to start.
 *
 * Asking the kernel for port 0 and closing it again hands out a port from the ephemeral range,
 * which the kernel also hands to outgoing connections, docker-proxy's published ports and every
 * in-process test server: between that call and the service's own bind, something else can take
 * it, and a client then talks to a stranger (it happened in CI: a gateway port answered by
 * another server, `HTTP 404`). So ports come from below the ephemeral range, where nothing is
 * handed out unasked; each vitest worker has its own block (in case files ever run in parallel
 * again; today vitest.config.ts runs them one at a time); within a process they are handed out
 * in turn and probed before use.
 */
import net from "node:net";

/** Below Linux's default ephemeral range (32768–60999) and above the well-known ports. */
const FIRST_PORT = 10_000;
const BLOCK_SIZE = 1_000;
const BLOCKS = 20;

function canBind(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = net.createServer();
    probe.once("error", () => resolve(false));
    probe.listen(port, "127.0.0.1", () => probe.close(() => resolve(true)));
  });
}

/** Hands out ports of `[first, first + size)` in turn from `start`, skipping ones in use. */
export function portAllocator(first: number, size: number, start = 0): () => Promise<number> {
  let cursor = start;
  return async () => {
    for (let tried = 0; tried < size; tried++) {
      const port = first + (cursor++ % size);
      if (await canBind(port)) return port;
    }
    throw new Error(`no free loopback port in ${first}-${first + size - 1}`);
  };
}

// VITEST_POOL_ID is 1..workers inside a test worker and is inherited by processes it spawns; a
// child of a worker starts elsewhere in the same block so parent and child do not meet.
const poolId = Number.parseInt(process.env.VITEST_POOL_ID ?? "0", 10) || 0;

/** A loopback port that nothing listens on and that this process has not handed out recently (its last thousand). */
export const freePort = portAllocator(FIRST_PORT + (poolId % BLOCKS) * BLOCK_SIZE, BLOCK_SIZE, (process.pid * 389) % BLOCK_SIZE);
