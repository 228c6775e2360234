import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["packages/*/test/**/*.test.ts", "services/*/test/**/*.test.ts", "gateway/test/**/*.test.ts", "test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // Mesh tests start real processes and containers; two cores do not like them in parallel.
    fileParallelism: false,
    // Prints mesh process logs when a test fails (CI keeps only the test output).
    setupFiles: ["test/support/mesh-logs-on-failure.ts"],
  },
});
