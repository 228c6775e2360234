/**
 * `outpost` commands (SPEC C2). Exit codes: 0 success; for a followed run, the agent's own
 * exit code when it FAILED with one, else 1; 1 for API errors; 2 for usage errors and an
 * unusable credentials file; 130 when a secret prompt or a followed run is interrupted.
 * Standard output closed by its reader (`outpost logs D1 | head -2`) ends the command quietly
 * with 0 — not 141 (SIGPIPE's status), which `set -o pipefail` would count as a failure; the
 * run itself goes on.
 */
import { existsSync, readFileSync } from "node:fs";
import path from "node:path";
import { createInterface } from "node:readline";
import { Writable } from "node:stream";
import { parseArgs } from "node:util";
import { Code, ConnectError } from "@connectrpc/connect";
import { fromJson, toJson, type JsonValue } from "@bufbuild/protobuf";
import { type Duration, durationFromMs, timestampDate } from "@bufbuild/protobuf/wkt";
import { parse as parseYaml } from "yaml";
import {
  type Agent,
  Agent_State,
  AgentSchema,
  type Dispatch,
  Dispatch_State,
  DispatchSchema,
  ModelTier,
} from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import { type AuditEvent, AuditEventSchema } from "@outpost/proto/outpost/dispatch/v1/audit_service_pb.js";
import { RetryInfoSchema } from "@outpost/proto/google/rpc/error_details_pb.js";
import { AgentStatus_CircuitState, type GetFleetStatusResponse, GetFleetStatusResponseSchema } from "@outpost/proto/outpost/dispatch/v1/fleet_service_pb.js";
import {
  type ApiKey,
  ApiKeySchema,
  SecretSchema,
  type Tenant,
  TenantSchema,
  Tenant_State,
  Tier,
} from "@outpost/proto/outpost/tenant/v1/tenant_pb.js";
import { CreateApiKeyResponseSchema, CreateTenantResponseSchema } from "@outpost/proto/outpost/tenant/v1/tenant_service_pb.js";
import type { RunEnd } from "@outpost/proto/outpost/telemetry/v1/log_pb.js";
import { outpostClients, type OutpostClients } from "./client.ts";
import { CredentialsError, DEFAULT_GATEWAY_URL, devCredentialsPath, readDevCredentials } from "./credentials.ts";
import { followLogs, writeChunk } from "./follow.ts";

export interface CliIo {
  out: NodeJS.WritableStream;
  err: NodeJS.WritableStream;
  env: NodeJS.ProcessEnv;
  /** Where `secret put` reads a value given neither --value nor --value-file; a terminal is prompted without echo. */
  stdin?: NodeJS.ReadableStream & { isTTY?: boolean };
  /**
   * Registers what to do on Ctrl-C (SIGINT) while a run is followed, and returns how to undo it;
   * without it Ctrl-C does what it would anyway (the process ends, 130).
   */
  onInterrupt?: (handler: () => void) => () => void;
  /** How long a followed run may go without output or a state change before the CLI says it is still waiting (15 s). */
  progressEveryMs?: number;
}

const USAGE = `usage: outpost <command> [options]

  dispatch --agent <name> --task "<text>" [--follow] [--model <id> | --model-tier fast|balanced|flagship]
           [--timeout <seconds>] [--env KEY=VALUE]... [--label key=value]... [--secret NAME]... [--request-id <id>]
           --timeout: seconds, to the millisecond at most (300, 1.5)
  get <dispatch-id>             show a dispatch
  list [--state <state>] [--agent <name>] [--limit <n> | --all] [--page-token <token>] [--page-size <n>]
                                newest first, printed page by page: the first 100 (--limit), or every
                                one (--all); --page-token continues where an earlier list stopped
  cancel <dispatch-id>
  logs <dispatch-id> [--follow] [--after <seq>] [--timestamps]
                                --timestamps (-t): each line after the time it was read (RFC 3339, UTC);
                                also with dispatch --follow
  agents                        list the agents you can dispatch
  audit [--limit <n> | --all] [--page-token <token>] [--page-size <n>]   your tenant's audit trail: every mutating call
                                (who, what, on what, the outcome), newest first, paged as list is
  key create [--name <label>] | key list | key revoke <key-id>     your own API keys
  secret put <NAME> [--value-file <path>]   value from the file, else standard input: piped, or typed
                                    at a terminal without echo (--value <v> also works, but other
                                    users see it in ps and it stays in your shell history)
  secret list                       names only
  secret delete <NAME>

admin commands (credential: $OUTPOST_ADMIN_TOKEN):
  admin tenant create "<name>" <email> [--tier free|pro|enterprise]   prints the new API key once
  admin tenant list [--page-size <n>]
  admin tenant get <tenant-id>
  admin tenant set-tier <tenant-id> free|pro|enterprise
  admin tenant suspend <tenant-id> --reason "<why>"
  admin tenant reactivate <tenant-id>
  admin key create <tenant-id> [--name <label>]                      prints the new API key once
  admin key list <tenant-id>
  admin key revoke <key-id>
  admin agent register --file agent.json|agent.yaml   an Agent in proto JSON form (as printed by --json)
  admin agent update --file agent.json|agent.yaml
  admin agent disable <name>
  admin agent enable <name>
  admin audit [--tenant <tenant-id>] [--limit <n> | --all] [--page-token <token>] [--page-size <n>]
                                the audit trail of every tenant (and of platform operations), or one's
  fleet                         agents (availability, circuit), executors (slots, warm containers),
                                queue depth, runs by state over 24 h, degraded parts

global options: --api-key <key> (default $OUTPOST_API_KEY, then $OUTPOST_HOME/credentials.json — ~/.outpost
                                 by default, written by npm start; never the working directory's .outpost).
                                 A key given here is visible to other users in ps: prefer the variable
                --gateway <url> (default $OUTPOST_GATEWAY_URL, then the credentials file's only when the key
                                 came from that file, then ${DEFAULT_GATEWAY_URL})
                --json          print JSON instead of text (not with logs or dispatch --follow, which print the run's lines)
admin commands and fleet take the admin token from $OUTPOST_ADMIN_TOKEN (then the credentials file), never --api-key.
--follow says when a run waits long (queued, no output); Ctrl-C stops following, not the run (exit 130).`;

class UsageError extends Error {}

/** An error reported as one line (no usage text) with its own exit code. */
class CliError extends Error {
  readonly exitCode: number;
  constructor(message: string, exitCode: number) {
    super(message);
    this.exitCode = exitCode;
  }
}

const OPTIONS = {
  gateway: { type: "string" },
  "api-key": { type: "string" },
  json: { type: "boolean" },
  agent: { type: "string" },
  task: { type: "string" },
  follow: { type: "boolean", short: "f" },
  model: { type: "string" },
  "model-tier": { type: "string" },
  timeout: { type: "string" },
  env: { type: "string", multiple: true },
  label: { type: "string", multiple: true },
  secret: { type: "string", multiple: true },
  "request-id": { type: "string" },
  state: { type: "string" },
  "page-size": { type: "string" },
  "page-token": { type: "string" },
  limit: { type: "string" },
  all: { type: "boolean" },
  after: { type: "string" },
  timestamps: { type: "boolean", short: "t" },
  tier: { type: "string" },
  reason: { type: "string" },
  value: { type: "string" },
  "value-file": { type: "string" },
  name: { type: "string" },
  file: { type: "string" },
  tenant: { type: "string" },
  help: { type: "boolean", short: "h" },
} as const;

/**
 * Where the calls go and with which credential. The credential comes from --api-key or
 * OUTPOST_API_KEY (OUTPOST_ADMIN_TOKEN for admin commands), else from the credentials file in the
 * Outpost home. The gateway comes from --gateway or OUTPOST_GATEWAY_URL, else from that file only
 * when the credential came from it too, else the default: a key the user gave is never sent to
 * a gateway named by a file.
 */
export function resolveTarget(
  values: { gateway?: string; "api-key"?: string },
  env: NodeJS.ProcessEnv,
  admin: boolean,
): { gatewayUrl: string; credential: string | undefined } {
  const given = admin ? env.OUTPOST_ADMIN_TOKEN : (values["api-key"] ?? env.OUTPOST_API_KEY);
  const gateway = values.gateway ?? env.OUTPOST_GATEWAY_URL;
  if (given) return { gatewayUrl: gateway ?? DEFAULT_GATEWAY_URL, credential: given };
  const saved = readDevCredentials(env);
  const fromFile = admin ? saved.adminToken : saved.apiKey;
  const credential = typeof fromFile === "string" && fromFile ? fromFile : undefined;
  const savedGateway = credential && typeof saved.gatewayUrl === "string" && saved.gatewayUrl ? saved.gatewayUrl : undefined;
  return { gatewayUrl: gateway ?? savedGateway ?? DEFAULT_GATEWAY_URL, credential };
}

/** A gateway that is not an http(s) URL is a usage error naming it, not an API error ("Invalid URL"). */
function checkGatewayUrl(url: string): void {
  let protocol = "";
  try {
    protocol = new URL(url).protocol;
  } catch {
    // not a URL at all
  }
  if (protocol !== "http:" && protocol !== "https:") {
    throw new UsageError(`the gateway must be an http:// or https:// URL, e.g. ${DEFAULT_GATEWAY_URL} (got "${url}" from --gateway, OUTPOST_GATEWAY_URL or the credentials file)`);
  }
}

function missingCredential(env: NodeJS.ProcessEnv, admin: boolean): UsageError {
  const file = devCredentialsPath(env);
  const wanted = admin
    ? `no admin token: set OUTPOST_ADMIN_TOKEN (npm start writes one to ${file})`
    : `no API key: set OUTPOST_API_KEY or pass --api-key (npm start writes a development key to ${file})`;
  // Older versions read .outpost/credentials.json in the working directory; say why it is ignored.
  const old = path.resolve(".outpost", "credentials.json");
  const note = old !== file && existsSync(old) ? `; ${old} is no longer read (only ${file} is): see "CLI" in the README` : "";
  return new UsageError(`${wanted}${note}`);
}

/**
 * Watches the output streams while a command runs: an error on standard output (EPIPE when the
 * reader went away) aborts the returned signal, so paging and following stop; errors on standard
 * error are ignored (nowhere left to report them).
 */
function watchOutput(io: CliIo): { signal: AbortSignal; dispose: () => void } {
  const closed = new AbortController();
  const onOut = (err: Error) => closed.abort(err);
  const onErr = () => {};
  io.out.on("error", onOut);
  io.err.on("error", onErr);
  return {
    signal: closed.signal,
    dispose: () => {
      io.out.off("error", onOut);
      io.err.off("error", onErr);
    },
  };
}

export async function runCli(argv: string[], io: CliIo): Promise<number> {
  const output = watchOutput(io);
  try {
    return await runCommand(argv, io, output.signal);
  } catch (err) {
    if (output.signal.aborted) {
      const reason = output.signal.reason as NodeJS.ErrnoException;
      if (reason.code === "EPIPE") return 0; // the reader has all it wanted: stop quietly
      io.err.write(`outpost: cannot write the output: ${reason.message}\n`);
      return 1;
    }
    if (err instanceof UsageError || (err instanceof TypeError && "code" in err && String(err.code).startsWith("ERR_PARSE_ARGS"))) {
      io.err.write(`outpost: ${err.message}\n\n${USAGE}\n`);
      return 2;
    }
    if (err instanceof CredentialsError) {
      io.err.write(`outpost: ${err.message}\n`);
      return 2;
    }
    if (err instanceof CliError) {
      io.err.write(`outpost: ${err.message}\n`);
      return err.exitCode;
    }
    reportApiError(err, io);
    return 1;
  } finally {
    output.dispose();
  }
}

/** An API error as one line (code and message), with a hint when the gateway is unreachable. */
function reportApiError(err: unknown, io: CliIo): ConnectError {
  const connectError = ConnectError.from(err);
  io.err.write(`outpost: ${Code[connectError.code]}: ${connectError.rawMessage}\n`);
  if (connectError.code === Code.Unavailable) io.err.write("outpost: is the mesh running? start it with `npm start`\n");
  return connectError;
}

async function runCommand(argv: string[], io: CliIo, outputClosed: AbortSignal): Promise<number> {
  const { values, positionals } = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true });
  const [command, ...rest] = positionals;
  if (values.help || !command) {
    io.out.write(`${USAGE}\n`);
    return command || values.help ? 0 : 2;
  }
  // Fleet status is for operators: it needs the admin token like the admin commands.
  const admin = command === "admin" || command === "fleet";
  // The admin token never comes from --api-key (a tenant key): say so rather than quietly using another credential.
  if (admin && values["api-key"] !== undefined) throw new UsageError(`--api-key is a tenant's key; ${command === "fleet" ? "fleet takes" : "admin commands take"} the admin token from OUTPOST_ADMIN_TOKEN`);
  // The output of logs and of a followed run is the run's own lines: there is no JSON form to print.
  if (values.json && (command === "logs" || (command === "dispatch" && values.follow))) {
    throw new UsageError(`--json is not available with ${command === "logs" ? "logs" : "dispatch --follow"}: the output is the run's own lines${command === "dispatch" ? " (dispatch --json without --follow prints the new dispatch)" : ""}`);
  }
  const { gatewayUrl, credential } = resolveTarget(values, io.env, admin);
  if (!credential) throw missingCredential(io.env, admin);
  checkGatewayUrl(gatewayUrl);
  const clients = outpostClients(gatewayUrl, credential);
  // --json prints the proto JSON form (toJson with the message's schema): enum names, int64
  // as strings, RFC 3339 timestamps — the same shape `admin agent register --file` reads.
  const print: Print = (json, text) => io.out.write(values.json ? `${JSON.stringify(json, null, 2)}\n` : `${text}\n`);

  switch (command) {
    case "dispatch": {
      const dispatch = await createDispatch(clients, values);
      if (!values.follow) {
        print(toJson(DispatchSchema, dispatch), dispatch.id);
        return 0;
      }
      io.err.write(`outpost: dispatch ${dispatch.id} ${stateName(dispatch.state)} (agent ${dispatch.agent}, model ${dispatch.model})\n`);
      return await follow(clients, dispatch.id, 0n, io, outputClosed, values.timestamps);
    }
    case "get": {
      const { dispatch } = await clients.dispatches.getDispatch({ dispatchId: requireArg(rest[0], "dispatch id") });
      print(toJson(DispatchSchema, dispatch!), describe(dispatch!));
      return 0;
    }
    case "list":
      return await listDispatches(clients, values, io, outputClosed);
    case "audit":
      return await listAuditEvents(clients, values, io, outputClosed, false);
    case "cancel": {
      const { dispatch } = await clients.dispatches.cancelDispatch({ dispatchId: requireArg(rest[0], "dispatch id") });
      print(toJson(DispatchSchema, dispatch!), `${dispatch!.id} ${stateName(dispatch!.state)}${dispatch!.state === Dispatch_State.CANCELLED ? "" : " (stop requested)"}`);
      return 0;
    }
    case "logs": {
      const id = requireArg(rest[0], "dispatch id");
      if (values.after !== undefined && !/^\d+$/.test(values.after)) throw new UsageError("--after takes a sequence number, e.g. --after 42");
      const after = BigInt(values.after ?? "0");
      if (values.follow) return await follow(clients, id, after, io, outputClosed, values.timestamps);
      let pageToken = "";
      do {
        const page = await clients.logs.getLogs({ dispatchId: id, afterSeq: after, pageToken }, { signal: outputClosed });
        for (const chunk of page.chunks) writeChunk(chunk, io.out, io.err, { timestamps: values.timestamps });
        pageToken = page.nextPageToken;
      } while (pageToken && !outputClosed.aborted);
      outputClosed.throwIfAborted(); // stopped because the reader went away, not because the logs ended
      return 0;
    }
    case "agents": {
      const { agents } = await clients.agents.listAgents({});
      print(
        agents.map((a) => toJson(AgentSchema, a)),
        agents.map(agentLine).join("\n"),
      );
      return 0;
    }
    case "fleet": {
      const status = await clients.fleet.getFleetStatus({});
      print(toJson(GetFleetStatusResponseSchema, status), describeFleet(status));
      return 0;
    }
    case "admin":
      if (rest[0] === "audit") return await listAuditEvents(clients, values, io, outputClosed, true);
      return await adminCommand(clients, rest, values, print);
    case "key":
      return await keyCommand(clients, rest, values, print, undefined);
    case "secret":
      return await secretCommand(clients, rest, values, print, io);
    default:
      throw new UsageError(`unknown command "${command}"`);
  }
}

type Print = (json: JsonValue, text: string) => void;
type Values = Record<string, unknown>;

const TENANT_USAGE = "admin tenant create|list|get|set-tier|suspend|reactivate (see --help)";

async function adminCommand(clients: OutpostClients, rest: string[], values: Values, print: Print): Promise<number> {
  const [area, action, ...args] = rest;
  if (area === "key") return keyCommand(clients, [action ?? "", ...args], values, print, "admin");
  if (area === "agent") return agentCommand(clients, [action ?? "", ...args], values, print);
  if (area !== "tenant") throw new UsageError(`admin commands: ${TENANT_USAGE}; admin key create|list|revoke; ${AGENT_USAGE}; admin audit [--tenant <tenant-id>]`);
  const tenants = clients.tenants;
  switch (action) {
    case "create": {
      const res = await tenants.createTenant({
        name: requireArg(args[0], "tenant name"),
        contactEmail: requireArg(args[1], "contact email"),
        tier: values.tier ? parseEnum(Tier, values.tier as string, "--tier") : Tier.UNSPECIFIED,
      });
      print(toJson(CreateTenantResponseSchema, res), `tenant ${res.tenant!.id} (${res.tenant!.name}, ${tierName(res.tenant!.tier)})\napi key (shown once): ${res.apiKeyPlaintext}`);
      return 0;
    }
    case "list": {
      const pageSize = pageSizeOption(values);
      const all = await allPages((pageToken) => tenants.listTenants({ pageSize, pageToken }), (page) => page.tenants);
      print(
        all.map((t) => toJson(TenantSchema, t)),
        all.map(tenantLine).join("\n"),
      );
      return 0;
    }
    case "get": {
      const { tenant } = await tenants.getTenant({ tenantId: requireArg(args[0], "tenant id") });
      print(toJson(TenantSchema, tenant!), describeTenant(tenant!));
      return 0;
    }
    case "set-tier": {
      const tenantId = requireArg(args[0], "tenant id");
      const tier = parseEnum(Tier, requireArg(args[1] ?? (values.tier as string | undefined), "tier (free, pro or enterprise)"), "tier");
      const { tenant } = await tenants.updateTenant({ tenantId, tier });
      print(toJson(TenantSchema, tenant!), tenantLine(tenant!));
      return 0;
    }
    case "suspend": {
      const tenantId = requireArg(args[0], "tenant id");
      const reason = requireArg(values.reason as string | undefined, '--reason "<why>"');
      const { tenant } = await tenants.suspendTenant({ tenantId, reason });
      print(toJson(TenantSchema, tenant!), tenantLine(tenant!));
      return 0;
    }
    case "reactivate": {
      const { tenant } = await tenants.reactivateTenant({ tenantId: requireArg(args[0], "tenant id") });
      print(toJson(TenantSchema, tenant!), tenantLine(tenant!));
      return 0;
    }
    default:
      throw new UsageError(`admin tenant commands: ${TENANT_USAGE}`);
  }
}

/** `key …` for a tenant's own keys; `admin key …` names the tenant (create, list) explicitly. */
async function keyCommand(clients: OutpostClients, rest: string[], values: Values, print: Print, admin: "admin" | undefined): Promise<number> {
  const [action, ...args] = rest;
  const tenantArg = () => (admin ? requireArg(args[0], "tenant id") : "");
  switch (action) {
    case "create": {
      const res = await clients.apiKeys.createApiKey({ tenantId: tenantArg(), displayName: (values.name as string | undefined) ?? "" });
      print(toJson(CreateApiKeyResponseSchema, res), `key ${res.apiKey!.id} (${res.apiKey!.displayName || "unnamed"}) for tenant ${res.apiKey!.tenantId}\napi key (shown once): ${res.apiKeyPlaintext}`);
      return 0;
    }
    case "list": {
      const tenantId = tenantArg();
      const pageSize = pageSizeOption(values);
      const all = await allPages((pageToken) => clients.apiKeys.listApiKeys({ tenantId, pageSize, pageToken }), (page) => page.apiKeys);
      print(
        all.map((k) => toJson(ApiKeySchema, k)),
        all.map(keyLine).join("\n"),
      );
      return 0;
    }
    case "revoke": {
      const { apiKey } = await clients.apiKeys.revokeApiKey({ apiKeyId: requireArg(args[0], "key id") });
      print(toJson(ApiKeySchema, apiKey!), `revoked ${keyLine(apiKey!)}`);
      return 0;
    }
    default:
      throw new UsageError(admin ? "admin key commands: admin key create <tenant-id> [--name <label>] | list <tenant-id> | revoke <key-id>" : "key commands: key create [--name <label>] | list | revoke <key-id>");
  }
}

async function secretCommand(clients: OutpostClients, rest: string[], values: Values, print: Print, io: CliIo): Promise<number> {
  const [action, name] = rest;
  switch (action) {
    case "put": {
      const secretName = requireArg(name, "secret name, e.g. GITHUB_TOKEN");
      const value = await secretValue(values, io, secretName);
      if (!value) throw new UsageError("no value: pass --value-file <path>, pipe it on standard input, or type it at the prompt");
      const { secret } = await clients.secrets.putSecret({ name: secretName, value });
      print(toJson(SecretSchema, secret!), `secret ${secret!.name} stored`);
      return 0;
    }
    case "list": {
      const pageSize = pageSizeOption(values);
      const all = await allPages((pageToken) => clients.secrets.listSecrets({ pageSize, pageToken }), (page) => page.secrets);
      print(all.map((s) => toJson(SecretSchema, s)), all.map((s) => `${s.name.padEnd(32)} updated ${s.updateTime ? timestampDate(s.updateTime).toISOString() : "-"}`).join("\n"));
      return 0;
    }
    case "delete": {
      const secretName = requireArg(name, "secret name");
      await clients.secrets.deleteSecret({ name: secretName });
      print({ deleted: secretName }, `secret ${secretName} deleted`);
      return 0;
    }
    default:
      throw new UsageError("secret commands: secret put <NAME> [--value-file <path>] | list | delete <NAME>");
  }
}

/**
 * A secret's value: --value (visible in ps and shell history, so not advertised first), else the
 * file --value-file names, else standard input — piped, read whole; a terminal, prompted on
 * standard error and typed without echo. A file's or a pipe's one trailing newline is dropped.
 */
async function secretValue(values: Values, io: CliIo, name: string): Promise<string> {
  const inline = values.value as string | undefined;
  const file = values["value-file"] as string | undefined;
  if (inline !== undefined && file !== undefined) throw new UsageError("pass --value or --value-file, not both");
  if (inline !== undefined) return inline;
  if (file !== undefined) return withoutTrailingNewline(readTextFile(file));
  const stdin = io.stdin;
  if (!stdin) return "";
  if (stdin.isTTY) return await promptHidden(stdin, io.err, `value for ${name} (not echoed): `);
  let text = "";
  for await (const chunk of stdin) text += typeof chunk === "string" ? chunk : (chunk as Buffer).toString("utf8");
  return withoutTrailingNewline(text);
}

function withoutTrailingNewline(text: string): string {
  return text.replace(/\r?\n$/, "");
}

/**
 * One line typed at a terminal, not echoed: readline puts the terminal in raw mode (so the
 * terminal itself echoes nothing) and its own echo goes to a sink. Ctrl-D gives an empty value;
 * Ctrl-C ends the command with 130, as a shell reports an interrupt.
 */
async function promptHidden(input: NonNullable<CliIo["stdin"]>, err: NodeJS.WritableStream, prompt: string): Promise<string> {
  err.write(prompt);
  const sink = new Writable({ write: (_chunk, _encoding, callback) => callback() });
  const rl = createInterface({ input, output: sink, terminal: true });
  try {
    return await new Promise<string>((resolve, reject) => {
      rl.once("line", resolve);
      rl.once("close", () => resolve(""));
      rl.once("SIGINT", () => reject(new CliError("interrupted", 130)));
    });
  } finally {
    rl.close();
    err.write("\n");
  }
}

const DEFAULT_LIST_LIMIT = 100;
/** Rows per list request unless --page-size says otherwise (the servers allow 1000). */
const DEFAULT_LIST_PAGE = 100;

/** One paged list command (`outpost list`, `outpost audit`) for printPagedList. */
interface PagedList<Page extends { nextPageToken: string }> {
  /** What a row is, for the messages: "dispatch"/"dispatches". */
  noun: { one: string; many: string };
  /** The field of the response's proto JSON form that holds the rows. */
  field: string;
  /** The command and its filters, which a --page-token continues (the token is only a cursor). */
  command: string;
  filters: string[];
  fetch(request: { pageSize: number; pageToken: string }, signal: AbortSignal): Promise<Page>;
  rows(page: Page): { json: JsonValue; text: string }[];
}

/** `outpost list`: dispatches, newest first, filtered by state and agent (printPagedList). */
function listDispatches(clients: OutpostClients, values: Values, io: CliIo, outputClosed: AbortSignal): Promise<number> {
  const state = values.state ? parseEnum(Dispatch_State, values.state as string, "--state") : Dispatch_State.UNSPECIFIED;
  const agent = (values.agent as string | undefined) ?? "";
  return printPagedList(
    {
      noun: { one: "dispatch", many: "dispatches" },
      field: "dispatches",
      command: "outpost list",
      filters: [values.state ? `--state ${shellWord(values.state as string)}` : "", agent ? `--agent ${shellWord(agent)}` : ""],
      fetch: (request, signal) => clients.dispatches.listDispatches({ state, agent, ...request }, { signal }),
      rows: (page) => page.dispatches.map((d) => ({ json: toJson(DispatchSchema, d), text: dispatchLine(d) })),
    },
    values,
    io,
    outputClosed,
  );
}

/**
 * `outpost audit` (the caller's own trail) and `outpost admin audit [--tenant <id>]` (every
 * tenant's, or one's): mutating calls newest first, as printPagedList pages them.
 */
function listAuditEvents(clients: OutpostClients, values: Values, io: CliIo, outputClosed: AbortSignal, admin: boolean): Promise<number> {
  const tenantId = (values.tenant as string | undefined) ?? "";
  if (values.tenant !== undefined && !admin) throw new UsageError("--tenant is for admin audit: a tenant's key lists its own trail");
  // An empty id would quietly list every tenant's trail.
  if (values.tenant !== undefined && !tenantId.trim()) throw new UsageError("--tenant takes a tenant id (leave it out for every tenant's trail)");
  return printPagedList(
    {
      noun: { one: "audit event", many: "audit events" },
      field: "events",
      command: admin ? "outpost admin audit" : "outpost audit",
      filters: [tenantId ? `--tenant ${shellWord(tenantId)}` : ""],
      fetch: (request, signal) => clients.audit.listAuditEvents({ tenantId, ...request }, { signal }),
      rows: (page) => page.events.map((e) => ({ json: toJson(AuditEventSchema, e), text: auditLine(e, admin) })),
    },
    values,
    io,
    outputClosed,
  );
}

function auditLine(e: AuditEvent, withTenant: boolean): string {
  const time = e.time ? timestampDate(e.time).toISOString() : "-".padEnd(24);
  const target = e.target ? `  ${e.target}` : "";
  return `${time}  ${e.outcome.padEnd(19)} ${withTenant ? `${(e.tenantId || "-").padEnd(26)} ` : ""}${e.principal}  ${e.method}${target}`;
}

/**
 * A paged list, bounded: a tenant can have tens of thousands of rows, and each page is a read
 * against its rate limit (300 a minute on the free tier), so it prints the first --limit rows
 * (100 by default), or every one with --all, each page as it arrives, asking for no more rows
 * than are still wanted. When rows remain, or a later page fails (RESOURCE_EXHAUSTED when the
 * rate limit runs out), standard error says how to go on: the same command with --page-token,
 * which carries on after the last row printed. A failure keeps what was printed (with --json,
 * the document is closed, with nextPageToken) and exits 1.
 */
async function printPagedList<Page extends { nextPageToken: string }>(list: PagedList<Page>, values: Values, io: CliIo, outputClosed: AbortSignal): Promise<number> {
  const limit = listLimitOption(values);
  const perRequest = pageSizeOption(values) || DEFAULT_LIST_PAGE;
  const out = values.json ? jsonListOutput(io.out, list.field) : textListOutput(io.out);
  const continueWith = (token: string) => [list.command, `--page-token ${shellWord(token)}`, ...list.filters].filter(Boolean).join(" ");
  let pageToken = (values["page-token"] as string | undefined) ?? "";
  let pages = 0;
  let shown = 0;
  do {
    const pageSize = limit === undefined ? perRequest : Math.min(perRequest, limit - shown);
    let page: Page;
    try {
      page = await list.fetch({ pageSize, pageToken }, outputClosed);
    } catch (err) {
      if (outputClosed.aborted || pages === 0) throw err; // nothing printed yet: the usual one-line error
      out.end(pageToken);
      const failure = reportApiError(err, io);
      const retryDelay = failure.findDetails(RetryInfoSchema)[0]?.retryDelay;
      const wait = retryDelay ? `, in ${Math.max(1, Math.ceil(Number(retryDelay.seconds) + retryDelay.nanos / 1e9))} s or later` : "";
      const bound = limit === undefined ? "--all" : `--limit ${limit - shown}`;
      io.err.write(`outpost: stopped after ${shown} ${shown === 1 ? list.noun.one : list.noun.many} (the rows printed are complete); for the rest${wait}: ${continueWith(pageToken)} ${bound}\n`);
      return 1;
    }
    pages++;
    const rows = list.rows(page);
    out.page(rows);
    shown += rows.length;
    pageToken = page.nextPageToken;
  } while (pageToken && (limit === undefined || shown < limit) && !outputClosed.aborted);
  outputClosed.throwIfAborted(); // stopped because the reader went away, not because the list ended
  out.end(pageToken);
  if (pageToken) {
    const same = limit === DEFAULT_LIST_LIMIT ? "" : ` --limit ${limit}`;
    io.err.write(`outpost: ${shown} shown, more remain; for the next ${limit}: ${continueWith(pageToken)}${same} (--limit <n> for more at once, --all for every one)\n`);
  }
  return 0;
}

function dispatchLine(d: Dispatch): string {
  return `${d.id}  ${stateName(d.state).padEnd(10)} ${d.agent.padEnd(8)} ${d.task.slice(0, 60)}`;
}

function listLimitOption(values: Values): number | undefined {
  const raw = values.limit as string | undefined;
  if (values.all) {
    if (raw !== undefined) throw new UsageError("pass --limit <n> or --all, not both");
    return undefined;
  }
  if (raw === undefined) return DEFAULT_LIST_LIMIT;
  if (!/^\d+$/.test(raw) || Number(raw) === 0) throw new UsageError("--limit takes a number above 0, e.g. --limit 500 (--all for every one)");
  return Number(raw);
}

/** A word as the shell reads it back: as is when it is plain, else in single quotes. */
function shellWord(word: string): string {
  return /^[\w.,:=/+@%-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

/** A list written page by page, as the pages arrive. */
interface ListOutput {
  page(items: { json: JsonValue; text: string }[]): void;
  /** After the last page: `nextPageToken` is where the list would go on ("" at its end). */
  end(nextPageToken: string): void;
}

/** One line per item. */
function textListOutput(out: NodeJS.WritableStream): ListOutput {
  return {
    page: (items) => {
      if (items.length > 0) out.write(items.map((item) => `${item.text}\n`).join(""));
    },
    end: () => {},
  };
}

/**
 * The list response's proto JSON form, `{"<field>": [...], "nextPageToken": "..."}`, written a
 * page at a time yet byte for byte as `JSON.stringify(response, null, 2)` prints it: the list is
 * always there (empty too), nextPageToken only when the list goes on. Nothing is written before
 * the first page, so a list that fails at once prints no half document.
 */
function jsonListOutput(out: NodeJS.WritableStream, field: string): ListOutput {
  let opened = false;
  let items = 0;
  const open = () => {
    if (!opened) out.write(`{\n  ${JSON.stringify(field)}: [`);
    opened = true;
  };
  return {
    page: (page) => {
      open();
      if (page.length === 0) return;
      const indented = page.map((item) => `    ${JSON.stringify(item.json, null, 2).replace(/\n/g, "\n    ")}`);
      out.write(`${items === 0 ? "\n" : ",\n"}${indented.join(",\n")}`);
      items += page.length;
    },
    end: (nextPageToken) => {
      open();
      const token = nextPageToken ? `,\n  "nextPageToken": ${JSON.stringify(nextPageToken)}` : "";
      out.write(`${items === 0 ? "]" : "\n  ]"}${token}\n}\n`);
    },
  };
}

/** Every page of a paged list, in order: the list commands show the whole list. */
async function allPages<Page extends { nextPageToken: string }, Item>(
  fetchPage: (pageToken: string) => Promise<Page>,
  items: (page: Page) => Item[],
): Promise<Item[]> {
  const all: Item[] = [];
  let pageToken = "";
  do {
    const page = await fetchPage(pageToken);
    all.push(...items(page));
    pageToken = page.nextPageToken;
  } while (pageToken);
  return all;
}

function pageSizeOption(values: Values): number {
  const raw = values["page-size"] as string | undefined;
  if (raw === undefined) return 0;
  if (!/^\d+$/.test(raw)) throw new UsageError("--page-size takes a number, e.g. --page-size 50");
  return Number(raw);
}

function tierName(tier: Tier): string {
  return (Tier[tier] ?? String(tier)).toLowerCase();
}

function tenantLine(t: Tenant): string {
  const state = (Tenant_State[t.state] ?? String(t.state)).toLowerCase();
  const why = t.suspendReason ? ` (${t.suspendReason})` : "";
  return `${t.id}  ${tierName(t.tier).padEnd(10)} ${state}${why}  ${t.name} <${t.contactEmail}>`;
}

function describeTenant(t: Tenant): string {
  return [
    `id:      ${t.id}`,
    `name:    ${t.name}`,
    `email:   ${t.contactEmail}`,
    `tier:    ${tierName(t.tier)}`,
    `state:   ${(Tenant_State[t.state] ?? String(t.state)).toLowerCase()}${t.suspendReason ? ` — ${t.suspendReason}` : ""}`,
    `created: ${t.createTime ? timestampDate(t.createTime).toISOString() : "-"}`,
  ].join("\n");
}

function keyLine(k: ApiKey): string {
  const used = k.lastUsedTime ? `last used ${timestampDate(k.lastUsedTime).toISOString()}` : "never used";
  const revoked = k.revokeTime ? `  REVOKED ${timestampDate(k.revokeTime).toISOString()}` : "";
  return `${k.id}  ${k.prefix}…${k.lastFour}  ${(k.displayName || "-").padEnd(12)} ${used}${revoked}`;
}

async function createDispatch(clients: OutpostClients, values: Record<string, unknown>): Promise<Dispatch> {
  requireArg(values.agent as string | undefined, "--agent <name> (outpost agents lists them)");
  requireArg(values.task as string | undefined, '--task "<text>"');
  const modelTier = values["model-tier"] as string | undefined;
  const model = values.model as string | undefined;
  const timeout = timeoutOption(values.timeout as string | undefined);
  const { dispatch } = await clients.dispatches.createDispatch({
    agent: (values.agent as string | undefined) ?? "",
    task: (values.task as string | undefined) ?? "",
    model: model
      ? { case: "modelId", value: model }
      : modelTier
        ? { case: "modelTier", value: parseEnum(ModelTier, modelTier, "--model-tier") }
        : { case: undefined },
    timeout,
    env: pairs((values.env as string[] | undefined) ?? [], "--env"),
    labels: pairs((values.label as string[] | undefined) ?? [], "--label"),
    secretNames: (values.secret as string[] | undefined) ?? [],
    requestId: (values["request-id"] as string | undefined) ?? "",
  });
  return dispatch!;
}

/**
 * --timeout in seconds, to the millisecond at most (the dispatcher keeps milliseconds): "300",
 * "1.5", "0.25". Counted in whole milliseconds, so no float rounding reaches the Duration.
 */
function timeoutOption(raw: string | undefined): Duration | undefined {
  if (raw === undefined) return undefined;
  const match = /^(\d+)(?:\.(\d{1,3})0*)?$/.exec(raw);
  const ms = match ? Number(match[1]) * 1000 + Number((match[2] ?? "").padEnd(3, "0")) : NaN;
  if (!(ms > 0) || !Number.isSafeInteger(ms)) {
    throw new UsageError(`--timeout takes seconds above 0, to the millisecond at most, e.g. --timeout 300 or --timeout 1.5 (got "${raw}")`);
  }
  return durationFromMs(ms);
}

/**
 * Streams the run's output, shows its state changes on stderr, and maps its end to an exit code.
 * `stop` (standard output closed) ends the subscription and the watch at once.
 */
async function follow(clients: OutpostClients, dispatchId: string, afterSeq: bigint, io: CliIo, stop: AbortSignal, timestamps = false): Promise<number> {
  // Ctrl-C stops following (not the run): say how to pick it up again, and end with 130.
  const interrupted = new AbortController();
  const stopFollowing = AbortSignal.any([stop, interrupted.signal]);
  const undoInterrupt = io.onInterrupt?.(() => interrupted.abort());
  const stopWatching = new AbortController();
  const onStop = () => stopWatching.abort();
  stopFollowing.addEventListener("abort", onStop);
  // Long waits (queued behind other runs, a run that prints nothing) are said, every progressEveryMs.
  const every = io.progressEveryMs ?? 15_000;
  let state: Dispatch_State | undefined;
  let stateSince = Date.now();
  let quietSince = Date.now();
  let lastSeq = afterSeq;
  const progress = setInterval(() => {
    const now = Date.now();
    if (now - quietSince < every) return;
    const secs = (ms: number) => `${Math.round(ms / 1000)} s`;
    if (state === Dispatch_State.QUEUED) io.err.write(`outpost: still QUEUED after ${secs(now - stateSince)}, waiting for a free executor\n`);
    else if (state !== undefined) io.err.write(`outpost: still ${stateName(state)} after ${secs(now - stateSince)}, no output for ${secs(now - quietSince)}\n`);
    else io.err.write(`outpost: no output for ${secs(now - quietSince)}\n`);
    quietSince = now;
  }, Math.max(10, Math.min(every, 1000)));
  const watching = (async () => {
    for await (const { dispatch } of clients.dispatches.watchDispatch({ dispatchId }, { signal: stopWatching.signal })) {
      if (!dispatch || dispatch.state === state) continue;
      if (state !== undefined) io.err.write(`outpost: ${stateName(dispatch.state)}\n`);
      state = dispatch.state;
      stateSince = quietSince = Date.now();
    }
  })().catch(() => {
    // Progress display only; the log stream decides the outcome.
  });
  let end: RunEnd;
  try {
    end = await followLogs(
      clients.logs,
      dispatchId,
      (chunk) => {
        lastSeq = chunk.seq;
        quietSince = Date.now();
        writeChunk(chunk, io.out, io.err, { timestamps });
      },
      {
        afterSeq,
        signal: stopFollowing,
        onRetry: (failure, attempt, max) => {
          if (attempt === 1 || attempt % 5 === 0) io.err.write(`outpost: log stream: ${Code[failure.code]}: ${failure.rawMessage}; retrying (attempt ${attempt} of ${max})\n`);
        },
      },
    );
  } catch (err) {
    if (!interrupted.signal.aborted || stop.aborted) throw err;
    const resume = lastSeq > 0n ? ` --after ${lastSeq}` : "";
    io.err.write(`\noutpost: stopped following; dispatch ${dispatchId} goes on (outpost logs ${dispatchId} --follow${resume} to follow it again, outpost cancel ${dispatchId} to stop it)\n`);
    return 130;
  } finally {
    clearInterval(progress);
    undoInterrupt?.();
    stopFollowing.removeEventListener("abort", onStop);
    stopWatching.abort();
    await watching;
  }
  const code = end.exitCode === undefined ? "" : ` (exit code ${end.exitCode})`;
  const reason = end.failureReason ? `: ${end.failureReason}` : "";
  io.err.write(`outpost: dispatch ${dispatchId} ${stateName(end.state)}${code}${reason}\n`);
  if (end.state === Dispatch_State.SUCCEEDED) return 0;
  // The agent's own exit code only when it failed with one: a timed-out or cancelled run's 143 is
  // the SIGTERM that stopped it, not the agent's answer.
  return end.state === Dispatch_State.FAILED && end.exitCode !== undefined && end.exitCode > 0 ? Math.min(end.exitCode, 125) : 1;
}

function describe(d: Dispatch): string {
  const lines = [
    `id:        ${d.id}`,
    `agent:     ${d.agent} (model ${d.model})`,
    `state:     ${stateName(d.state)}${d.failureReason ? ` — ${d.failureReason}` : ""}`,
    `attempt:   ${d.attempt}`,
    `created:   ${d.createTime ? timestampDate(d.createTime).toISOString() : "-"}`,
  ];
  if (d.exitCode !== undefined) lines.push(`exit code: ${d.exitCode}`);
  if (d.result) lines.push(`result:    ${JSON.stringify(d.result)}`);
  return lines.join("\n");
}

function stateName(state: Dispatch_State): string {
  return Dispatch_State[state] ?? String(state);
}

function parseEnum<E extends Record<string, string | number>>(enumObject: E, value: string, flag: string): number {
  const found = enumObject[value.toUpperCase() as keyof E];
  if (typeof found !== "number" || found === 0) {
    const names = Object.keys(enumObject).filter((k) => isNaN(Number(k)) && k !== "UNSPECIFIED").map((k) => k.toLowerCase());
    throw new UsageError(`${flag} must be one of ${names.join(", ")}`);
  }
  return found;
}

function pairs(items: string[], flag: string): Record<string, string> {
  const result: Record<string, string> = {};
  for (const item of items) {
    const at = item.indexOf("=");
    if (at <= 0) throw new UsageError(`${flag} takes KEY=VALUE, got "${item}"`);
    result[item.slice(0, at)] = item.slice(at + 1);
  }
  return result;
}

function requireArg(value: string | undefined, what: string): string {
  if (!value) throw new UsageError(`missing ${what}`);
  return value;
}

const AGENT_USAGE = "admin agent register --file <agent.json|yaml> | update --file <…> | disable <name> | enable <name>";

/** `admin agent …`: the operator's side of the agent registry (AgentService). */
async function agentCommand(clients: OutpostClients, rest: string[], values: Values, print: Print): Promise<number> {
  const [action, ...args] = rest;
  switch (action) {
    case "register": {
      const { agent } = await clients.agents.registerAgent({ agent: readAgentFile(values.file as string | undefined) });
      print(toJson(AgentSchema, agent!), `registered ${agentLine(agent!)}`);
      return 0;
    }
    case "update": {
      const { agent } = await clients.agents.updateAgent({ agent: readAgentFile(values.file as string | undefined) });
      print(toJson(AgentSchema, agent!), `updated ${agentLine(agent!)}`);
      return 0;
    }
    case "disable": {
      const { agent } = await clients.agents.disableAgent({ name: requireArg(args[0], "agent name") });
      print(toJson(AgentSchema, agent!), `disabled ${agentLine(agent!)}`);
      return 0;
    }
    case "enable": {
      const { agent } = await clients.agents.enableAgent({ name: requireArg(args[0], "agent name") });
      print(toJson(AgentSchema, agent!), `enabled ${agentLine(agent!)}`);
      return 0;
    }
    default:
      throw new UsageError(`admin agent commands: ${AGENT_USAGE}`);
  }
}

/**
 * Reads an Agent in proto JSON form from a .json, .yaml or .yml file. A file that cannot be
 * read or is not an Agent is a usage error (exit 2) naming the file; whether the definition is
 * acceptable is the server's to say (INVALID_ARGUMENT naming the field, printed as is).
 */
export function readAgentFile(file: string | undefined): Agent {
  const name = requireArg(file, "--file <agent.json|agent.yaml>");
  const text = readTextFile(name);
  let parsed: unknown;
  try {
    parsed = /\.ya?ml$/i.test(name) ? parseYaml(text) : JSON.parse(text);
  } catch (err) {
    throw new UsageError(`${name} is not valid ${/\.ya?ml$/i.test(name) ? "YAML" : "JSON"}: ${(err as Error).message}`);
  }
  if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) throw new UsageError(`${name} must hold one Agent object`);
  try {
    return fromJson(AgentSchema, parsed as JsonValue);
  } catch (err) {
    throw new UsageError(`${name} is not an Agent in proto JSON form: ${(err as Error).message}`);
  }
}

/** A file the user named, as text; one that cannot be read is a usage error naming it. */
function readTextFile(name: string): string {
  try {
    return readFileSync(name, "utf8");
  } catch (err) {
    throw new UsageError(`cannot read ${name}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

function agentLine(a: Agent): string {
  const disabled = a.state === Agent_State.DISABLED ? "  (disabled)" : "";
  return `${a.name.padEnd(8)} ${a.image.padEnd(44)} ${a.models.map((m) => m.modelId).join(", ")}${disabled}`;
}

const CIRCUIT: Record<AgentStatus_CircuitState, string> = {
  [AgentStatus_CircuitState.UNSPECIFIED]: "unknown",
  [AgentStatus_CircuitState.CLOSED]: "closed",
  [AgentStatus_CircuitState.OPEN]: "open",
  [AgentStatus_CircuitState.HALF_OPEN]: "half-open",
};

/** The operator's text view of fleet status (SPEC D5); degraded parts are listed, never hidden. */
export function describeFleet(f: GetFleetStatusResponse): string {
  const lines = ["agents:"];
  if (f.agents.length === 0) lines.push("  (none)");
  for (const a of f.agents) {
    const image = a.imagePresent ? "image present" : "image missing";
    lines.push(`  ${a.agent.padEnd(10)} ${(a.available ? "available" : "unavailable").padEnd(12)} circuit ${(CIRCUIT[a.circuitState] ?? "unknown").padEnd(10)} ${image}`);
  }
  lines.push("executors:");
  if (f.executors.length === 0) lines.push("  (none)");
  for (const e of f.executors) {
    const seen = e.lastSeenTime ? timestampDate(e.lastSeenTime).toISOString() : "-";
    lines.push(
      `  ${e.executorId.padEnd(20)} slots ${e.slotsBusy}/${e.slotsTotal} busy  warm ${e.warmContainers}  engine ${e.engineReady ? "ready" : "NOT READY"}  last seen ${seen}`,
    );
  }
  lines.push(`warm containers: ${f.warmContainers}`);
  lines.push(`queue depth: ${f.queueDepth}`);
  const runs = f.runsLast24h.filter((r) => r.count > 0n).map((r) => `${stateName(r.state)} ${r.count}`);
  lines.push(`runs (24 h): ${runs.length > 0 ? runs.join(", ") : "none"}`);
  if (f.degraded.length > 0) {
    lines.push("degraded:");
    for (const note of f.degraded) lines.push(`  - ${note}`);
  }
  return lines.join("\n");
}
