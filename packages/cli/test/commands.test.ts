/**
 * Commands against a stand-in gateway, in process: where the key goes (never to a gateway named
 * by the credentials file unless the key came from it), every page of `list`, --timeout in whole
 * milliseconds, and the ways `secret put` takes a value (--value-file, a pipe, a terminal
 * without echo).
 */
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { PassThrough } from "node:stream";
import { create } from "@bufbuild/protobuf";
import type { Duration } from "@bufbuild/protobuf/wkt";
import { DispatchSchema, Dispatch_State } from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { DispatchService } from "@outpost/proto/outpost/dispatch/v1/dispatch_service_pb.js";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { DEFAULT_GATEWAY_URL, runCli, type CliIo } from "../src/index.ts";
import { resolveTarget } from "../src/cli.ts";
import { Capture } from "./capture.ts";
import { recordSecrets, startStandIn, type StandIn } from "./stand-in.ts";

const ENV_KEY = `otp_${"e".repeat(64)}`;
const FILE_KEY = `otp_${"f".repeat(64)}`;

let dir: string;
let gateway: StandIn;
const listRequests: { pageSize: number; pageToken: string; state: Dispatch_State }[] = [];
const timeouts: (Duration | undefined)[] = [];
const secrets: { name: string; value: string }[] = [];

/** Five dispatches over three pages. */
const PAGES: Record<string, { ids: string[]; next: string }> = { "": { ids: ["D1", "D2"], next: "p2" }, p2: { ids: ["D3", "D4"], next: "p3" }, p3: { ids: ["D5"], next: "" } };

beforeAll(async () => {
  dir = mkdtempSync(path.join(tmpdir(), "outpost-cli-commands-"));
  gateway = await startStandIn((router) => {
    router.service(DispatchService, {
      listDispatches(req) {
        listRequests.push({ pageSize: req.pageSize, pageToken: req.pageToken, state: req.state });
        const page = PAGES[req.pageToken]!;
        return { dispatches: page.ids.map((id) => create(DispatchSchema, { id, state: Dispatch_State.SUCCEEDED, agent: "demo", task: `task ${id}` })), nextPageToken: page.next };
      },
      createDispatch(req) {
        timeouts.push(req.timeout);
        return { dispatch: create(DispatchSchema, { id: "D1", state: Dispatch_State.QUEUED, agent: req.agent }) };
      },
      getDispatch(req) {
        return { dispatch: create(DispatchSchema, { id: req.dispatchId, state: Dispatch_State.RUNNING }) };
      },
    });
    recordSecrets(router, secrets);
  });
});
afterAll(async () => {
  await gateway?.close();
  rmSync(dir, { recursive: true, force: true });
});

async function outpost(argv: string[], env: NodeJS.ProcessEnv = {}, stdin?: CliIo["stdin"]) {
  const out = new Capture();
  const err = new Capture();
  const code = await runCli(argv, { out, err, env: { OUTPOST_HOME: path.join(dir, "empty-home"), OUTPOST_API_KEY: ENV_KEY, ...env }, stdin });
  return { code, out: out.text, err: err.text };
}

/** An Outpost home whose 0600 credentials file names `gatewayUrl` and holds FILE_KEY. */
function homeNaming(name: string, gatewayUrl: string): string {
  const home = path.join(dir, name);
  mkdirSync(home, { mode: 0o700 });
  writeFileSync(path.join(home, "credentials.json"), JSON.stringify({ gatewayUrl, apiKey: FILE_KEY, adminToken: "file-admin-token", tenantId: "T1" }), { mode: 0o600 });
  return home;
}

describe("where the key goes", () => {
  it("a key from the environment or --api-key never goes to the gateway the credentials file names", async () => {
    const planted = await startStandIn();
    try {
      const home = homeNaming("home-planted", planted.url);
      expect(resolveTarget({}, { OUTPOST_HOME: home, OUTPOST_API_KEY: ENV_KEY }, false)).toEqual({ gatewayUrl: DEFAULT_GATEWAY_URL, credential: ENV_KEY });
      expect(resolveTarget({ "api-key": ENV_KEY }, { OUTPOST_HOME: home }, false)).toEqual({ gatewayUrl: DEFAULT_GATEWAY_URL, credential: ENV_KEY });
      expect(resolveTarget({}, { OUTPOST_HOME: home, OUTPOST_ADMIN_TOKEN: "env-admin" }, true)).toEqual({ gatewayUrl: DEFAULT_GATEWAY_URL, credential: "env-admin" });
      // The user's own gateway setting still applies to the user's own key.
      expect(resolveTarget({}, { OUTPOST_HOME: home, OUTPOST_API_KEY: ENV_KEY, OUTPOST_GATEWAY_URL: gateway.url }, false).gatewayUrl).toBe(gateway.url);

      const res = await outpost(["get", "D9"], { OUTPOST_HOME: home, OUTPOST_GATEWAY_URL: gateway.url });
      expect(res.code, res.err).toBe(0);
      expect(planted.requests).toEqual([]);
      expect(gateway.requests.at(-1)?.authorization).toBe(`Bearer ${ENV_KEY}`);
    } finally {
      await planted.close();
    }
  });

  it("a key from the credentials file goes to the file's gateway", async () => {
    const home = homeNaming("home-own", gateway.url);
    expect(resolveTarget({}, { OUTPOST_HOME: home }, false)).toEqual({ gatewayUrl: gateway.url, credential: FILE_KEY });
    expect(resolveTarget({}, { OUTPOST_HOME: home }, true)).toEqual({ gatewayUrl: gateway.url, credential: "file-admin-token" });
    const res = await outpost(["get", "D9"], { OUTPOST_HOME: home, OUTPOST_API_KEY: undefined });
    expect(res.code, res.err).toBe(0);
    expect(gateway.requests.at(-1)?.authorization).toBe(`Bearer ${FILE_KEY}`);
  });

  it("a credentials file others can read is refused with exit 2 before any call", async () => {
    const home = homeNaming("home-loose", gateway.url);
    const file = path.join(home, "credentials.json");
    chmodSync(file, 0o644);
    const before = gateway.requests.length;
    const res = await outpost(["get", "D9"], { OUTPOST_HOME: home, OUTPOST_API_KEY: undefined });
    expect(res.code).toBe(2);
    expect(res.err).toBe(`outpost: ${file} can be read by other users (mode 0644): refusing to use it; run chmod 600 ${file}\n`);
    expect(gateway.requests.length).toBe(before);
  });
});

describe("outpost list", () => {
  it("shows every page, asking for --page-size at a time", async () => {
    listRequests.length = 0;
    const text = await outpost(["list", "--gateway", gateway.url, "--page-size", "2", "--state", "succeeded"]);
    expect(text.code, text.err).toBe(0);
    expect(text.out.trim().split("\n").map((l) => l.split(" ")[0])).toEqual(["D1", "D2", "D3", "D4", "D5"]);
    expect(listRequests).toEqual(["", "p2", "p3"].map((pageToken) => ({ pageSize: 2, pageToken, state: Dispatch_State.SUCCEEDED })));

    const json = await outpost(["list", "--gateway", gateway.url, "--json"]);
    expect((JSON.parse(json.out) as { dispatches: { id: string }[]; nextPageToken?: string }).dispatches.map((d) => d.id)).toEqual(["D1", "D2", "D3", "D4", "D5"]);
    expect(JSON.parse(json.out)).not.toHaveProperty("nextPageToken");
    expect(listRequests.at(-1)?.pageSize).toBe(0); // the server's default
  });
});

describe("dispatch --timeout", () => {
  it("sends seconds to the millisecond as an exact Duration", async () => {
    const cases: [string, bigint, number][] = [
      ["300", 300n, 0],
      ["1.5", 1n, 500_000_000],
      ["0.001", 0n, 1_000_000],
      ["2.250000", 2n, 250_000_000],
      ["1.001", 1n, 1_000_000], // 1.001 * 1000 is 1000.9999999999999 in floating point
    ];
    for (const [flag, seconds, nanos] of cases) {
      const res = await outpost(["dispatch", "--agent", "demo", "--task", "t", "--timeout", flag, "--gateway", gateway.url]);
      expect(res.code, res.err).toBe(0);
      expect(timeouts.at(-1)).toMatchObject({ seconds, nanos });
    }
  });
});

describe("secret put", () => {
  it("reads --value-file, dropping one trailing newline", async () => {
    const file = path.join(dir, "token");
    writeFileSync(file, "from-a-file\n", { mode: 0o600 });
    const res = await outpost(["secret", "put", "FILE_TOKEN", "--value-file", file, "--gateway", gateway.url]);
    expect(res.code, res.err).toBe(0);
    expect(secrets.at(-1)).toEqual({ name: "FILE_TOKEN", value: "from-a-file" });
  });

  it("reads a pipe on standard input whole", async () => {
    const stdin = new PassThrough();
    stdin.end("piped\nvalue\n");
    const res = await outpost(["secret", "put", "PIPED", "--gateway", gateway.url], {}, stdin);
    expect(res.code, res.err).toBe(0);
    expect(secrets.at(-1)).toEqual({ name: "PIPED", value: "piped\nvalue" });
  });

  it("prompts at a terminal, in raw mode and without echoing what is typed", async () => {
    const setRawMode = vi.fn();
    const tty = Object.assign(new PassThrough(), { isTTY: true, setRawMode });
    const running = outpost(["secret", "put", "TYPED", "--gateway", gateway.url], {}, tty);
    await vi.waitFor(() => expect(setRawMode).toHaveBeenCalledWith(true));
    tty.write("typed-s3cret\r");
    const res = await running;
    expect(res.code, res.err).toBe(0);
    expect(secrets.at(-1)).toEqual({ name: "TYPED", value: "typed-s3cret" });
    expect(res.err).toContain("value for TYPED (not echoed): ");
    expect(res.err + res.out).not.toContain("typed-s3cret");
    expect(setRawMode).toHaveBeenLastCalledWith(false);
  });

  it("ends with 130 and stores nothing when the prompt is interrupted", async () => {
    const before = secrets.length;
    const tty = Object.assign(new PassThrough(), { isTTY: true, setRawMode: vi.fn() });
    const running = outpost(["secret", "put", "TYPED", "--gateway", gateway.url], {}, tty);
    await vi.waitFor(() => expect(tty.setRawMode).toHaveBeenCalledWith(true));
    tty.write("half\u0003"); // Ctrl-C
    const res = await running;
    expect(res.code).toBe(130);
    expect(res.err).toContain("outpost: interrupted");
    expect(secrets.length).toBe(before);
  });
});
