/**
 * What unfinished request bodies cost the gateway (README, "Known issues"; docs/edge.md,
 * "Request bodies"): a client opens `--calls` gRPC calls on one HTTP/2 connection, sends each
 * a ~1 MiB message but its last KiB, never finishes them and sets no deadline. Prints the
 * gateway's resident memory before, while they are held, and after the client left; how many
 * calls the gateway held and how many it refused (RESOURCE_EXHAUSTED); and the buffered bytes
 * it reports. One fresh gateway per scenario (its upstreams are nowhere: no call reaches them):
 *
 *   default        the body budget as shipped (64 MiB, a quarter of it per client IP)
 *   per-ip=total   the same total, no per-IP share
 *   no budget      a budget no client reaches (what the gateway did before it had one)
 *
 *   node --disable-warning=ExperimentalWarning bench/unfinished-bodies.ts [--calls 200] [--only default]
 */
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import http2 from "node:http2";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { create, toBinary } from "@bufbuild/protobuf";
import { GetDispatchRequestSchema } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { startMesh } from "../scripts/lib/mesh.ts";
import { grpcFrame } from "./lib/tools.ts";

const { values } = parseArgs({ options: { calls: { type: "string", default: "200" }, only: { type: "string" } } });
const CALLS = Number(values.calls);
const MIB = 1024 * 1024;
const SCENARIOS: Record<string, Record<string, string>> = {
  default: {},
  "per-ip=total": { OUTPOST_GATEWAY_BODY_BUDGET_PER_IP_BYTES: String(64 * MIB) },
  "no budget": { OUTPOST_GATEWAY_BODY_BUDGET_BYTES: String(1024 * 1024 * MIB) },
};

/** A metric of the gateway's, summed over its labels (0 when it has no sample yet). */
async function metric(url: string, name: string): Promise<number> {
  const text = await (await fetch(`${url}/metrics`)).text();
  return [...text.matchAll(new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, "gm"))].reduce((sum, m) => sum + Number(m[1]), 0);
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** The gateway's RSS once it has been steady for a moment (after a GC has had its chance). */
async function settledRss(url: string): Promise<number> {
  let last = 0;
  for (let i = 0; i < 20; i++) {
    await sleep(500);
    const rss = await metric(url, "process_resident_memory_bytes");
    if (Math.abs(rss - last) < MIB) return rss;
    last = rss;
  }
  return last;
}

async function measure(name: string, env: Record<string, string>) {
  const dir = mkdtempSync(path.join(os.tmpdir(), "outpost-unfinished-"));
  const adminToken = randomBytes(32).toString("hex");
  const mesh = await startMesh({
    dataDir: path.join(dir, "data"),
    logDir: path.join(dir, "logs"),
    adminToken,
    only: ["gateway"],
    ports: { tenant: 9, dispatcher: 9, telemetry: 9 },
    env: { OUTPOST_RATE_LIMIT: "off", ...env },
  });
  const url = mesh.urls.gateway;
  try {
    const before = await settledRss(url);
    // A message just under the 1 MiB limit; all but its last KiB is sent.
    const body = grpcFrame(toBinary(GetDispatchRequestSchema, create(GetDispatchRequestSchema, { dispatchId: "x".repeat(MIB - 64) })));
    const session = http2.connect(url);
    session.on("error", () => {});
    let written = 0;
    for (let i = 0; i < CALLS; i++) {
      const stream = session.request({
        ":method": "POST",
        ":path": "/outpost.dispatch.v1.DispatchService/GetDispatch",
        "content-type": "application/grpc",
        te: "trailers",
        authorization: `Bearer ${adminToken}`,
      });
      stream.on("error", () => {});
      stream.resume();
      stream.write(body.subarray(0, body.length - 1024), (err) => {
        if (!err) written++;
      });
    }
    // Until every call's bytes are in or it was refused; at most a minute.
    const refusals = () => metric(url, "outpost_request_body_budget_refusals_total");
    for (let i = 0; i < 600 && written + (await refusals()) < CALLS; i++) await sleep(100);
    const refused = await refusals();
    const buffered = await metric(url, "outpost_request_body_buffered_bytes");
    const held = await settledRss(url);
    session.destroy();
    for (let i = 0; i < 50 && (await metric(url, "outpost_request_body_buffered_bytes")) > 0; i++) await sleep(100);
    const left = await settledRss(url);
    const bufferedAfter = await metric(url, "outpost_request_body_buffered_bytes");
    const mib = (n: number) => `${(n / MIB).toFixed(0)} MiB`;
    process.stdout.write(
      `${name.padEnd(14)} RSS before ${mib(before)}, holding ${mib(held)} (+${mib(held - before)}), after the client left ${mib(left)}; ` +
        `${CALLS - refused} calls held, ${refused} refused RESOURCE_EXHAUSTED; buffered ${mib(buffered)} while held, ${bufferedAfter} bytes after\n`,
    );
  } finally {
    await mesh.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

for (const [name, env] of Object.entries(SCENARIOS)) {
  if (values.only && values.only !== name) continue;
  await measure(name, env);
}
