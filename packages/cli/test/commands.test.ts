/**
 * Commands against a stand-in gateway, in process: where the key goes (never to a gateway named
 * by the credentials file unless the key came from it), `list` (bounded, printed page by page, and
 * what it says when rows remain or a later page fails), --timeout in whole
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
import { AuditEventSchema, AuditService } from "@outpost/proto/outpost/dispatch/v1/audit_service_pb.js";
import { Code, ConnectError } from "@connectrpc/connect";
import { RetryInfoSchema } from "@outpost/proto/google/rpc/error_details_pb.js";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { DEFAULT_GATEWAY_URL, runCli, type CliIo } from "../src/index.ts";
import { resolveTarget } from "../src/cli.ts";
import { Capture } from "./capture.ts";
import { recordSecrets, startStandIn, type StandIn } from "./stand-in.ts";

const ENV_KEY = `otp_${"e".repeat(64)}`;
const FILE_KEY = `otp_${"f".repeat(64)}`;

let dir: string;
let gateway: StandIn;
const listRequests: { pageSize: number; pageToken: string; state: Dispatch_State; agent: string }[] = [];
const auditRequests: { pageSize: number; pageToken: string; tenantId: string; authorization: string | null }[] = [];
const timeouts: (Duration | undefined)[] = [];
const secrets: { name: string; value: string }[] = [];

/**
 * How many dispatches the stand-in holds, by the --agent filter: D1, D2, … in the order listed,
 * paged like the dispatcher (page_size rows, 50 when 0, at most 1000; the token is a cursor).
 * "rate-limited" answers its first page, then RESOURCE_EXHAUSTED with RetryInfo, like the
 * gateway when the tenant's read budget runs out; "slow" holds each later page until
 * `releaseSlowPages` is called.
 */
const DISPATCHES: Record<string, number> = { "": 5, many: 250, "rate-limited": 250, slow: 250 };
let releaseSlowPages = () => {};
let slowPages = Promise.resolve();
const ids = (from: number, to: number) => Array.from({ length: to - from + 1 }, (_, i) => `D${from + i}`);

beforeAll(async () => {
  dir = mkdtempSync(path.join(tmpdir(), "outpost-cli-commands-"));
  gateway = await startStandIn((router) => {
    router.service(DispatchService, {
      async listDispatches(req) {
        listRequests.push({ pageSize: req.pageSize, pageToken: req.pageToken, state: req.state, agent: req.agent });
        if (req.pageSize > 1000) throw new ConnectError("page_size: must be at most 1000", Code.InvalidArgument);
        const from = req.pageToken ? Number(/^after-(\d+)$/.exec(req.pageToken)![1]) : 0;
        if (req.agent === "rate-limited" && from > 0) {
          const retry = create(RetryInfoSchema, { retryDelay: { seconds: 41n, nanos: 500_000_000 } });
          throw new ConnectError("read rate limit exceeded (300 per minute)", Code.ResourceExhausted, undefined, [{ desc: RetryInfoSchema, value: retry }]);
        }
        if (req.agent === "slow" && from > 0) await slowPages;
        const total = DISPATCHES[req.agent] ?? 0;
        const to = Math.min(total, from + (req.pageSize || 50));
        return {
          dispatches: Array.from({ length: to - from }, (_, i) => `D${from + i + 1}`).map((id) =>
            create(DispatchSchema, { id, state: Dispatch_State.SUCCEEDED, agent: req.agent || "demo", task: `task ${id}` }),
          ),
          nextPageToken: to < total ? `after-${to}` : "",
        };
      },
      createDispatch(req) {
        timeouts.push(req.timeout);
        return { dispatch: create(DispatchSchema, { id: "D1", state: Dispatch_State.QUEUED, agent: req.agent }) };
      },
      getDispatch(req) {
        return { dispatch: create(DispatchSchema, { id: req.dispatchId, state: Dispatch_State.RUNNING }) };
      },
    });
    router.service(AuditService, {
      // Seven events, E7 (newest) to E1, paged like the dispatcher.
      listAuditEvents(req, ctx) {
        auditRequests.push({ pageSize: req.pageSize, pageToken: req.pageToken, tenantId: req.tenantId, authorization: ctx.requestHeader.get("authorization") });
        const from = req.pageToken ? Number(/^after-(\d+)$/.exec(req.pageToken)![1]) : 0;
        const to = Math.min(7, from + (req.pageSize || 50));
        return {
          events: Array.from({ length: to - from }, (_, i) => 7 - from - i).map((n) =>
            create(AuditEventSchema, { id: `E${n}`, tenantId: req.tenantId || "T1", principal: "key/K1", method: "outpost.tenant.v1.SecretService/PutSecret", target: `secret/S${n}`, outcome: n === 3 ? "PERMISSION_DENIED" : "OK", time: { seconds: BigInt(1_800_000_000 + n), nanos: 0 } }),
          ),
          nextPageToken: to < 7 ? `after-${to}` : "",
        };
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
  const firstWords = (out: string) => out.trim().split("\n").filter(Boolean).map((l) => l.split(" ")[0]);
  /** What `--json` must print: the response's proto JSON form, as JSON.stringify(…, null, 2) puts it. */
  const jsonOf = (dispatchIds: string[], agent: string, nextPageToken?: string) =>
    `${JSON.stringify(
      { dispatches: dispatchIds.map((id) => ({ id, agent, task: `task ${id}`, state: "STATE_SUCCEEDED" })), ...(nextPageToken ? { nextPageToken } : {}) },
      null,
      2,
    )}\n`;

  it("with --all shows every page, asking for --page-size at a time", async () => {
    listRequests.length = 0;
    const text = await outpost(["list", "--all", "--gateway", gateway.url, "--page-size", "2", "--state", "succeeded"]);
    expect(text.code, text.err).toBe(0);
    expect(text.err).toBe("");
    expect(firstWords(text.out)).toEqual(ids(1, 5));
    expect(listRequests).toEqual(["", "after-2", "after-4"].map((pageToken) => ({ pageSize: 2, pageToken, state: Dispatch_State.SUCCEEDED, agent: "" })));

    const json = await outpost(["list", "--gateway", gateway.url, "--json"]);
    expect(json.code, json.err).toBe(0);
    expect(json.out).toBe(jsonOf(ids(1, 5), "demo")); // all of it: no nextPageToken
    expect(json.err).toBe("");

    const none = await outpost(["list", "--gateway", gateway.url, "--json", "--agent", "nobody"]);
    expect(none.out).toBe('{\n  "dispatches": []\n}\n');
  });

  it("stops after 100 rows by default, asking for no more, and says how to go on", async () => {
    listRequests.length = 0;
    const first = await outpost(["list", "--gateway", gateway.url, "--agent", "many"]);
    expect(first.code, first.err).toBe(0);
    expect(firstWords(first.out)).toEqual(ids(1, 100));
    expect(listRequests).toEqual([{ pageSize: 100, pageToken: "", state: Dispatch_State.UNSPECIFIED, agent: "many" }]);
    expect(first.err).toBe(
      "outpost: 100 shown, more remain; for the next 100: outpost list --page-token after-100 --agent many (--limit <n> for more at once, --all for every one)\n",
    );

    // The command it suggests carries on after the last row shown.
    const next = await outpost(["list", "--gateway", gateway.url, "--page-token", "after-100", "--agent", "many"]);
    expect(firstWords(next.out)).toEqual(ids(101, 200));

    listRequests.length = 0;
    const some = await outpost(["list", "--gateway", gateway.url, "--agent", "many", "--limit", "230", "--page-size", "100"]);
    expect(firstWords(some.out)).toEqual(ids(1, 230));
    expect(listRequests.map((r) => r.pageSize)).toEqual([100, 100, 30]);
    expect(some.err).toContain("for the next 230: outpost list --page-token after-230 --agent many --limit 230 (");

    const all = await outpost(["list", "--gateway", gateway.url, "--agent", "many", "--all"]);
    expect(all.code, all.err).toBe(0);
    expect(firstWords(all.out)).toEqual(ids(1, 250));
    expect(all.err).toBe("");

    const json = await outpost(["list", "--gateway", gateway.url, "--agent", "many", "--limit", "3", "--json"]);
    expect(json.code, json.err).toBe(0);
    expect(json.out).toBe(jsonOf(ids(1, 3), "many", "after-3"));
  });

  it("prints each page as it arrives", async () => {
    slowPages = new Promise((resolve) => (releaseSlowPages = resolve));
    const out = new Capture();
    const err = new Capture();
    const running = runCli(["list", "--gateway", gateway.url, "--agent", "slow", "--all", "--page-size", "10"], {
      out,
      err,
      env: { OUTPOST_HOME: path.join(dir, "empty-home"), OUTPOST_API_KEY: ENV_KEY },
    });
    // The first page is on standard output while the second is still on its way.
    await vi.waitFor(() => expect(firstWords(out.text)).toEqual(ids(1, 10)));
    expect(listRequests.at(-1)).toMatchObject({ agent: "slow", pageToken: "after-10" });
    releaseSlowPages();
    expect(await running, err.text).toBe(0);
    expect(firstWords(out.text)).toEqual(ids(1, 250));
  });

  it("keeps what it printed when a later page fails, and says how to continue (exit 1)", async () => {
    const res = await outpost(["list", "--gateway", gateway.url, "--agent", "rate-limited", "--limit", "150", "--page-size", "100"]);
    expect(res.code).toBe(1);
    expect(firstWords(res.out)).toEqual(ids(1, 100));
    expect(res.err).toBe(
      [
        "outpost: ResourceExhausted: read rate limit exceeded (300 per minute)",
        "outpost: stopped after 100 dispatches (the rows printed are complete); for the rest, in 42 s or later: outpost list --page-token after-100 --agent rate-limited --limit 50",
        "",
      ].join("\n"),
    );

    // --json: the document printed so far is closed, with where to go on.
    const json = await outpost(["list", "--gateway", gateway.url, "--agent", "rate-limited", "--all", "--json"]);
    expect(json.code).toBe(1);
    expect(json.out).toBe(jsonOf(ids(1, 100), "rate-limited", "after-100"));
    expect(json.err).toContain("for the rest, in 42 s or later: outpost list --page-token after-100 --agent rate-limited --all\n");

    // A first page that fails is the usual one-line error, with nothing on standard output.
    const first = await outpost(["list", "--gateway", gateway.url, "--agent", "rate-limited", "--page-token", "after-100", "--json"]);
    expect(first.code).toBe(1);
    expect(first.out).toBe("");
    expect(first.err).toBe("outpost: ResourceExhausted: read rate limit exceeded (300 per minute)\n");
  });
});

describe("outpost audit", () => {
  it("prints the tenant's trail newest first, paged as list is, and says how to go on", async () => {
    auditRequests.length = 0;
    const res = await outpost(["audit", "--gateway", gateway.url, "--limit", "3"]);
    expect(res.code, res.err).toBe(0);
    expect(res.out.split("\n").filter(Boolean)).toEqual([
      "2027-01-15T08:00:07.000Z  OK                  key/K1  outpost.tenant.v1.SecretService/PutSecret  secret/S7",
      "2027-01-15T08:00:06.000Z  OK                  key/K1  outpost.tenant.v1.SecretService/PutSecret  secret/S6",
      "2027-01-15T08:00:05.000Z  OK                  key/K1  outpost.tenant.v1.SecretService/PutSecret  secret/S5",
    ]);
    expect(res.err).toBe("outpost: 3 shown, more remain; for the next 3: outpost audit --page-token after-3 --limit 3 (--limit <n> for more at once, --all for every one)\n");
    expect(auditRequests).toEqual([{ pageSize: 3, pageToken: "", tenantId: "", authorization: `Bearer ${ENV_KEY}` }]);
    const json = await outpost(["audit", "--gateway", gateway.url, "--all", "--json", "--page-size", "4"]);
    const events = (JSON.parse(json.out) as { events: { id: string; outcome: string }[] }).events;
    expect(events.map((e) => e.id)).toEqual(["E7", "E6", "E5", "E4", "E3", "E2", "E1"]);
    expect(events.find((e) => e.id === "E3")?.outcome).toBe("PERMISSION_DENIED");
  });

  it("admin audit takes the admin token and --tenant; a tenant's key cannot choose a tenant (exit 2, no call)", async () => {
    auditRequests.length = 0;
    const res = await outpost(["admin", "audit", "--tenant", "T9", "--limit", "1", "--gateway", gateway.url], { OUTPOST_API_KEY: undefined, OUTPOST_ADMIN_TOKEN: "admin-token" });
    expect(res.code, res.err).toBe(0);
    expect(res.out).toBe("2027-01-15T08:00:07.000Z  OK                  T9                         key/K1  outpost.tenant.v1.SecretService/PutSecret  secret/S7\n");
    expect(res.err).toContain("for the next 1: outpost admin audit --page-token after-1 --tenant T9 --limit 1 (");
    expect(auditRequests).toEqual([{ pageSize: 1, pageToken: "", tenantId: "T9", authorization: "Bearer admin-token" }]);
    const refused = await outpost(["audit", "--tenant", "T9", "--gateway", gateway.url]);
    expect(refused.code).toBe(2);
    expect(refused.err).toContain("--tenant is for admin audit: a tenant's key lists its own trail");
    const empty = await outpost(["admin", "audit", "--tenant", "", "--gateway", gateway.url], { OUTPOST_API_KEY: undefined, OUTPOST_ADMIN_TOKEN: "admin-token" });
    expect(empty.code).toBe(2);
    expect(empty.err).toContain("--tenant takes a tenant id");
    expect(auditRequests).toHaveLength(1);
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
