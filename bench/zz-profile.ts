import { startBenchMesh } from "./lib/fixtures.ts";
const bench = await startBenchMesh(["tenant", "telemetry", "dispatcher", "gateway"], { NODE_OPTIONS: "--cpu-prof --cpu-prof-dir=/tmp/prof" });
const tenant = await bench.newTenant("p");
const { dispatch } = await tenant.clients.dispatches.createDispatch({ agent: "demo", task: "x" });
const { writeFileSync } = await import("node:fs");
writeFileSync("/tmp/prof/target.json", JSON.stringify({ url: bench.mesh.urls.gateway, key: tenant.apiKey, id: dispatch!.id, gw: bench.mesh.processes.get("gateway")!.pid, disp: bench.mesh.processes.get("dispatcher")!.pid }));
await new Promise((r) => setTimeout(r, Number(process.argv[2] ?? 40) * 1000));
await bench.stop();
