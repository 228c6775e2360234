/**
 * `npm run scale-out [-- --redis redis://127.0.0.1:6379] [--data-dir DIR]`: the scale-out
 * topology on one machine — 2 gateways, 2 dispatchers, 2 telemetry, 2 executors, 1 tenant —
 * sharing one Redis (a private redis-server unless --redis is given) and one SQLite store.
 * Provisions a tenant, prints the endpoints and the key, and runs until Ctrl-C.
 */
import { randomBytes } from "node:crypto";
import { mkdtempSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { outpostClients } from "@outpost/cli";
import { startScaleOut } from "./lib/scale-out.ts";

const { values } = parseArgs({ options: { redis: { type: "string" }, "data-dir": { type: "string" } } });
const dir = values["data-dir"] ?? mkdtempSync(path.join(os.tmpdir(), "outpost-scale-out-"));
const adminToken = randomBytes(32).toString("hex");
const say = (line: string) => process.stderr.write(`${line}\n`);

const topology = await startScaleOut({
  dataDir: path.join(dir, "data"),
  logDir: path.join(dir, "logs"),
  adminToken,
  redisUrl: values.redis,
  env: { OUTPOST_EXECUTOR_ID: `scale-${process.pid}` },
});
let stopping = false;
const shutdown = async () => {
  if (stopping) return;
  stopping = true;
  await topology.stop();
  process.exit(0);
};
process.on("SIGINT", () => void shutdown());
process.on("SIGTERM", () => void shutdown());

const created = await outpostClients(topology.mesh.urls.gateway, adminToken).tenants.createTenant({ name: "Scale-out", contactEmail: "ops@localhost.localdomain" });
say(`outpost scale-out: redis ${topology.redisUrl}; data and logs in ${dir}`);
for (const i of topology.mesh.instances()) say(`  ${i.service}-${i.index}  ${i.url}  pid ${i.process?.pid ?? "-"}`);
say(`  balanced: gateway ${topology.mesh.urls.gateway}, dispatcher ${topology.mesh.urls.dispatcher}, telemetry ${topology.mesh.urls.telemetry}`);
say(`\nAPI key (shown once): ${created.apiKeyPlaintext}`);
say(`admin token: ${adminToken}`);
say(`\n  OUTPOST_GATEWAY_URL=${topology.mesh.urls.gateway} OUTPOST_API_KEY=${created.apiKeyPlaintext} npx outpost dispatch --agent demo --task "hello" --follow\n`);
say("Ctrl-C stops every replica");
