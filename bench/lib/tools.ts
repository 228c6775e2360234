/**
 * Load generators the benchmarks drive: h2load (Debian's nghttp2-client) for gRPC over h2c,
 * autocannon for HTTP/1.1. Both report the same figures so Outpost and its baseline are
 * compared on equal terms; latencies are kept per request at sub-millisecond resolution.
 */
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import autocannon from "autocannon";
import { percentile } from "./types.ts";

export interface LoadFigures {
  /** Completed requests per second. */
  rps: number;
  requests: number;
  /** Requests that failed (transport errors, non-2xx, timeouts). */
  failed: number;
  p50Ms: number;
  p99Ms: number;
}

export interface H2loadOptions {
  /** Full URL of the method, e.g. http://127.0.0.1:7100/outpost.dispatch.v1.DispatchService/GetDispatch */
  url: string;
  /** Request body (for gRPC: the length-prefixed message). */
  body: Buffer;
  headers: Record<string, string>;
  clients: number;
  /** Concurrent streams per connection. */
  streams: number;
  durationS: number;
  /**
   * Fixed rate per client (open loop, evenly paced); unset = as fast as possible. Paced runs
   * start their connections 1 ms apart (h2load's finest), so the clients' request timers are
   * spread out instead of firing together: otherwise every tick is a burst of one request per
   * client, i.e. short saturation, and "half load" would measure queueing in bursts.
   */
  rpsPerClient?: number;
  /** HTTP/1.1 instead of HTTP/2 (one request at a time per connection). */
  http1?: boolean;
}

/** gRPC framing of one message: a zero compression flag, the length (big endian), the bytes. */
export function grpcFrame(message: Uint8Array): Buffer {
  const frame = Buffer.alloc(5 + message.length);
  frame.writeUInt32BE(message.length, 1);
  frame.set(message, 5);
  return frame;
}

/** Whether `command --version` runs (the command is on the PATH and works). */
export function hasTool(command: string): boolean {
  return spawnSync(command, ["--version"], { stdio: "ignore" }).status === 0;
}

export function hasH2load(): boolean {
  return hasTool("h2load");
}

/** The command-line tools benchmarks run, and the Debian package each comes from. */
export const TOOL_PACKAGES = {
  h2load: "nghttp2-client",
  "redis-server": "redis-server",
  "redis-cli": "redis-tools",
  docker: "docker.io",
} as const;

/** Throws, naming the tool and its Debian package, unless every tool is on the PATH. */
export function requireTools(bench: string, ...tools: (keyof typeof TOOL_PACKAGES)[]): void {
  const missing = tools.filter((t) => !hasTool(t));
  if (missing.length) {
    throw new Error(`${bench} needs ${missing.map((t) => `${t} (Debian package ${TOOL_PACKAGES[t]})`).join(", ")}, not found on the PATH`);
  }
}

export async function runH2load(options: H2loadOptions): Promise<LoadFigures> {
  const dir = mkdtempSync(path.join(os.tmpdir(), "outpost-h2load-"));
  try {
    const bodyFile = path.join(dir, "body");
    const logFile = path.join(dir, "requests.tsv");
    writeFileSync(bodyFile, options.body);
    // h2load takes either a duration or a connection rate: a paced run asks for its duration's
    // worth of requests instead.
    const span = options.rpsPerClient
      ? ["-n", String(options.rpsPerClient * options.clients * options.durationS), "-r", "1", "--rate-period=1ms", `--rps=${options.rpsPerClient}`]
      : ["-D", String(options.durationS), "--warm-up-time=1"];
    const args = [
      "-c", String(options.clients),
      "-m", String(options.streams),
      ...span,
      "-d", bodyFile,
      `--log-file=${logFile}`,
      ...Object.entries(options.headers).flatMap(([k, v]) => ["-H", `${k}: ${v}`]),
    ];
    if (options.http1) args.push("--h1");
    args.push(options.url);
    const output = await run("h2load", args);
    const finished = /finished in ([\d.]+)(m?s), ([\d.]+) req\/s/.exec(output);
    const counts = /requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout/.exec(output);
    if (!finished || !counts) throw new Error(`h2load output not understood:\n${output}`);
    // Columns: start (µs since epoch), HTTP status, µs until the end of the response. Status 0
    // marks a stream still open when the timed run ended: h2load cuts it off and counts it
    // neither done nor failed (the bare server gets the same few per connection), so it is
    // neither a failure nor a latency.
    const latencies: number[] = [];
    let non2xx = 0;
    for (const line of readFileSync(logFile, "utf8").split("\n")) {
      const [, status, micros] = line.split("\t");
      if (!micros || status === "0") continue;
      if (!status?.startsWith("2")) non2xx++;
      latencies.push(Number(micros) / 1000);
    }
    const done = Number(counts[3]);
    return {
      rps: Number(finished[3]),
      requests: done,
      failed: Number(counts[5]) + Number(counts[6]) + Number(counts[7]) + non2xx,
      p50Ms: percentile(latencies, 50),
      p99Ms: percentile(latencies, 99),
    };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

export interface HttpLoadOptions {
  url: string;
  method?: "GET" | "POST";
  headers?: Record<string, string>;
  body?: string;
  connections: number;
  durationS: number;
  /** Fixed overall rate (open loop); unset = as fast as possible. */
  overallRate?: number;
}

export async function runAutocannon(options: HttpLoadOptions): Promise<LoadFigures> {
  const latencies: number[] = [];
  const instance = autocannon({
    url: options.url,
    method: options.method ?? "GET",
    headers: options.headers ?? {},
    body: options.body,
    connections: options.connections,
    duration: options.durationS,
    overallRate: options.overallRate,
    timeout: 10,
  });
  // autocannon's own histogram keeps whole milliseconds; the per-response event has the exact time.
  instance.on("response", (_client, statusCode, _bytes, responseTimeMs) => {
    if (statusCode >= 200 && statusCode < 300) latencies.push(responseTimeMs);
  });
  const result = await instance;
  return {
    rps: result["2xx"] / result.duration,
    requests: result.requests.total,
    failed: result.errors + result.timeouts + result.non2xx,
    p50Ms: percentile(latencies, 50),
    p99Ms: percentile(latencies, 99),
  };
}

function run(command: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr.on("data", (d: Buffer) => (out += d.toString()));
    child.on("error", reject);
    child.on("exit", (code) => (code === 0 ? resolve(out) : reject(new Error(`${command} exited with ${code}:\n${out}`))));
  });
}
