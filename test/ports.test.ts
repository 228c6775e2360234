import net from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { freePort, portAllocator } from "../scripts/lib/ports.ts";

const listeners: net.Server[] = [];
afterEach(async () => {
  await Promise.all(listeners.splice(0).map((s) => new Promise((resolve) => s.close(resolve))));
});

function occupy(port: number): Promise<void> {
  const server = net.createServer();
  listeners.push(server);
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, "127.0.0.1", () => resolve());
  });
}

describe("freePort", () => {
  it("hands out distinct ports below the ephemeral range, in this worker's block", async () => {
    const ports = await Promise.all(Array.from({ length: 40 }, () => freePort()));
    expect(new Set(ports).size).toBe(40);
    const pool = Number(process.env.VITEST_POOL_ID ?? 0) % 20;
    for (const port of ports) {
      expect(port).toBeGreaterThanOrEqual(10_000 + pool * 1_000);
      expect(port).toBeLessThan(10_000 + (pool + 1) * 1_000);
    }
  });

  it("skips a port something listens on, and says so when the whole block is taken", async () => {
    const first = await freePort();
    const next = portAllocator(first, 2);
    await occupy(first);
    expect(await next()).toBe(first + 1);
    await occupy(first + 1);
    await expect(next()).rejects.toThrow(`no free loopback port in ${first}-${first + 1}`);
  });
});
