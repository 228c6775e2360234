/** Redis connections: a Redis that never answers (a typo in the URL, say) is logged, once. */
import { describe, expect, it, vi } from "vitest";
import { connectRedis, type Logger } from "@outpost/platform";
import { freePort } from "../../../scripts/lib/ports.ts";

describe("connectRedis", () => {
  it("logs a Redis it never reached, once, with the password hidden", async () => {
    const warnings: [Record<string, unknown>, string][] = [];
    const logger = { info: () => {}, warn: (obj: Record<string, unknown>, msg: string) => void warnings.push([obj, msg]) } as unknown as Logger;
    const redis = connectRedis(`redis://:hunter2@127.0.0.1:${await freePort()}`, logger, { retryStrategy: () => 50 });
    try {
      await vi.waitFor(() => expect(warnings.length).toBeGreaterThan(0));
      await new Promise((resolve) => setTimeout(resolve, 300)); // several more failed attempts
      expect(warnings).toHaveLength(1);
      expect(warnings[0]![1]).toMatch(/redis unreachable/);
      expect(JSON.stringify(warnings)).not.toContain("hunter2");
    } finally {
      redis.disconnect();
    }
  });
});
