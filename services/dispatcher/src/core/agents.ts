/**
 * The agent registry (SPEC D4). Built-in agents ship with Outpost; operators register, update
 * and disable agents (admin only), persisted in the dispatcher store.
 * The five coding agents' images are built from deploy/agents (issue #5); `demo` is the
 * offline test agent built from Debian's busybox-static:arm64 (test/fixtures/agents).
 */
import { clone, create, fromJsonString, toJsonString } from "@bufbuild/protobuf";
import { durationFromMs, durationMs } from "@bufbuild/protobuf/wkt";
import { Code } from "@connectrpc/connect";
import {
  type Agent,
  Agent_State,
  AgentSchema,
  ModelTier,
  NetworkPolicy,
  RiskLevel,
} from "@outpost/proto/outpost/dispatch/v1/dispatch_pb.js";
import {
  checkLength,
  compileJsonSchema,
  failedPrecondition,
  invalidArgument,
  notFound,
  outpostError,
  requireEnum,
  requireNonEmpty,
} from "@outpost/platform";
import type { AgentStore } from "../store/store.ts";


const MIB = 1024 * 1024;
const AGENT_IMAGE_REPOSITORY = "ghcr.io/outpost-dev/agent";

interface AgentDefinition {
  name: string;
  description: string;
  image: string;
  models: [ModelTier, string][];
  defaultTier: ModelTier;
  network: NetworkPolicy;
  cpuMillis: number;
  memoryMiB: number;
  defaultTimeoutS: number;
}

function agent(def: AgentDefinition): Agent {
  return create(AgentSchema, {
    name: def.name,
    description: def.description,
    image: def.image,
    resources: { cpuMillis: BigInt(def.cpuMillis), memoryBytes: BigInt(def.memoryMiB * MIB), pidsLimit: 256n },
    models: def.models.map(([tier, modelId]) => ({ tier, modelId })),
    defaultModelTier: def.defaultTier,
    defaultTimeout: durationFromMs(def.defaultTimeoutS * 1000),
    riskLevel: RiskLevel.AUTO,
    networkPolicy: def.network,
    state: Agent_State.ENABLED,
    builtin: true,
  });
}

const { FLAGSHIP, BALANCED, FAST } = ModelTier;

export function builtinAgents(demoImage: string): Agent[] {
  const coding = (name: string, description: string, models: [ModelTier, string][], defaultTier: ModelTier) =>
    agent({
      name,
      description,
      image: `${AGENT_IMAGE_REPOSITORY}-${name}:latest`,
      models,
      defaultTier,
      network: NetworkPolicy.EGRESS,
      cpuMillis: 2000,
      memoryMiB: 4096,
      defaultTimeoutS: 1800,
    });
  return [
    coding(
      "claude",
      "Anthropic Claude Code",
      [
        [FLAGSHIP, "claude-opus-4-5"],
        [BALANCED, "claude-sonnet-4-5"],
        [FAST, "claude-haiku-4-5"],
      ],
      BALANCED,
    ),
    coding("codex", "OpenAI Codex CLI", [[FLAGSHIP, "gpt-5.2-codex"]], FLAGSHIP),
    coding("gemini", "Google Gemini CLI", [[FLAGSHIP, "gemini-3-pro-preview"]], FLAGSHIP),
    coding("aider", "Aider", [[BALANCED, "deepseek/deepseek-coder"]], BALANCED),
    coding("grok", "xAI Grok CLI", [[FLAGSHIP, "grok-4.1"]], FLAGSHIP),
    agent({
      name: "demo",
      description: "Offline demo agent: prints a few lines and `uname -m`; `exit=N` in the task sets its exit code",
      image: demoImage,
      models: [[FAST, "demo-1"]],
      defaultTier: FAST,
      network: NetworkPolicy.NONE,
      cpuMillis: 500,
      memoryMiB: 64,
      defaultTimeoutS: 300,
    }),
  ];
}

/** Agent names: lower-case, as used in API calls and container labels. */
const AGENT_NAME = /^[a-z][a-z0-9-]{1,62}$/;
/** Models one agent may offer. */
const MAX_MODELS = 32;
/** How stale a replica's view of operator-registered agents may get before a create re-reads it. */
const REFRESH_AFTER_MS = 2000;

/**
 * Built-in agents plus the agents operators registered (kept in the dispatcher store, where an
 * operator's update or disable of a built-in is stored too, and wins). Reads are synchronous
 * from a cached view; `refresh` re-reads the store so agents registered through another replica
 * appear within REFRESH_AFTER_MS.
 */
export class AgentRegistry {
  private readonly builtins: Map<string, Agent>;
  private readonly store: AgentStore | undefined;
  private readonly now: () => number;
  private agents: Map<string, Agent>;
  private versions = new Map<string, number>();
  private loadedAt = 0;

  constructor(agents: Agent[], store?: AgentStore, now: () => number = Date.now) {
    this.builtins = new Map(agents.map((a) => [a.name, a]));
    this.agents = new Map(this.builtins);
    this.store = store;
    this.now = now;
  }

  /** Re-reads operator agents from the store. */
  async refresh(): Promise<void> {
    if (!this.store) return;
    const stored = await this.store.listAgents();
    const merged = new Map(this.builtins);
    const versions = new Map<string, number>();
    for (const entry of stored) {
      merged.set(entry.name, fromJsonString(AgentSchema, entry.agentJson));
      versions.set(entry.name, entry.version);
    }
    this.agents = merged;
    this.versions = versions;
    this.loadedAt = this.now();
  }

  async refreshIfStale(): Promise<void> {
    if (this.store && this.now() - this.loadedAt >= REFRESH_AFTER_MS) await this.refresh();
  }

  list(): Agent[] {
    return [...this.agents.values()].sort((a, b) => a.name.localeCompare(b.name));
  }

  get(name: string): Agent | undefined {
    return this.agents.get(name);
  }

  /** The enabled agent of that name, or INVALID_ARGUMENT listing the available ones. */
  requireEnabled(field: string, name: string): Agent {
    const found = this.agents.get(name);
    if (found && found.state === Agent_State.ENABLED) return found;
    const available = this.list()
      .filter((a) => a.state === Agent_State.ENABLED)
      .map((a) => a.name)
      .join(", ");
    throw invalidArgument(field, `unknown or disabled agent "${name}"; available: ${available}`, "AGENT_UNKNOWN");
  }

  /** Resolves the model: an explicit id, a tier the agent offers, or the agent's default tier. */
  resolveModel(agentDef: Agent, modelId: string | undefined, tier: ModelTier | undefined): { model: string; tier: ModelTier } {
    if (modelId !== undefined) return { model: modelId, tier: ModelTier.UNSPECIFIED };
    const wanted = tier ?? agentDef.defaultModelTier;
    const option = agentDef.models.find((m) => m.tier === wanted);
    if (!option) {
      const offered = agentDef.models.map((m) => ModelTier[m.tier]).join(", ");
      throw invalidArgument("model_tier", `agent "${agentDef.name}" does not offer ${ModelTier[wanted]}; it offers ${offered}`, "MODEL_TIER_UNAVAILABLE");
    }
    return { model: option.modelId, tier: option.tier };
  }

  /** Registers a new agent (admin). Its name must not be taken, by a built-in or another agent. */
  async register(input: Agent): Promise<Agent> {
    const store = this.requireStore();
    await this.refresh();
    const agent = this.validate(input);
    agent.state = Agent_State.ENABLED;
    agent.builtin = false;
    if (this.agents.has(agent.name)) throw alreadyExists(agent.name);
    const stored = await store.putAgent(agent.name, toJsonString(AgentSchema, agent), 0, this.now());
    if (!stored) throw alreadyExists(agent.name);
    await this.refresh();
    return agent;
  }

  /** Replaces an agent's definition (admin); built-ins can be updated too. Keeps its state. */
  async update(input: Agent): Promise<Agent> {
    await this.refresh();
    const current = this.agents.get(input.name);
    if (!current) throw notFound("agent", input.name);
    const agent = this.validate(input);
    agent.state = current.state;
    agent.builtin = current.builtin;
    return this.write(agent);
  }

  /** Disables an agent (admin): new dispatches are refused; queued and running ones go on. */
  async disable(name: string): Promise<Agent> {
    return this.setState(name, Agent_State.DISABLED);
  }

  /** Enables a disabled agent again (admin); enabling an enabled one changes nothing. */
  async enable(name: string): Promise<Agent> {
    return this.setState(name, Agent_State.ENABLED);
  }

  private async setState(name: string, state: Agent_State): Promise<Agent> {
    await this.refresh();
    const current = this.agents.get(name);
    if (!current) throw notFound("agent", name);
    if (current.state === state) return current;
    const agent = clone(AgentSchema, current);
    agent.state = state;
    return this.write(agent);
  }

  private async write(agent: Agent): Promise<Agent> {
    const store = this.requireStore();
    const stored = await store.putAgent(agent.name, toJsonString(AgentSchema, agent), this.versions.get(agent.name) ?? 0, this.now());
    if (!stored) throw outpostError(Code.Aborted, "CONCURRENT_UPDATE", `agent "${agent.name}" was changed concurrently; retry`);
    await this.refresh();
    return agent;
  }

  private requireStore(): AgentStore {
    if (!this.store) throw failedPrecondition("NO_AGENT_STORE", "this dispatcher has no agent store");
    return this.store;
  }

  /** Checks an operator's agent definition; INVALID_ARGUMENT names the first bad field. */
  private validate(input: Agent): Agent {
    const agent = clone(AgentSchema, input);
    if (!AGENT_NAME.test(agent.name)) throw invalidArgument("agent.name", "must match ^[a-z][a-z0-9-]{1,62}$");
    checkLength("agent.description", agent.description, 1024);
    requireNonEmpty("agent.image", agent.image, 512);
    if (/\s/.test(agent.image)) throw invalidArgument("agent.image", "must be an image reference without spaces");
    if (agent.command.length > 64) throw invalidArgument("agent.command", "at most 64 arguments");
    agent.command.forEach((arg, i) => checkLength(`agent.command[${i}]`, arg, 4096));
    if (agent.models.length === 0) throw invalidArgument("agent.models", "at least one model is required");
    // Every create, lease and ListAgents page carries the definition: bounded like the rest of it.
    if (agent.models.length > MAX_MODELS) throw invalidArgument("agent.models", `at most ${MAX_MODELS} models`);
    agent.models.forEach((m, i) => {
      requireEnum(`agent.models[${i}].tier`, m.tier, ModelTier);
      requireNonEmpty(`agent.models[${i}].model_id`, m.modelId, 200);
    });
    if (agent.defaultModelTier === ModelTier.UNSPECIFIED) agent.defaultModelTier = agent.models[0]!.tier;
    if (!agent.models.some((m) => m.tier === agent.defaultModelTier)) {
      throw invalidArgument("agent.default_model_tier", "must be the tier of one of the agent's models");
    }
    if (agent.defaultTimeout) {
      const ms = durationMs(agent.defaultTimeout);
      if (!(ms > 0)) throw invalidArgument("agent.default_timeout", "must be positive");
    }
    const r = agent.resources;
    if (r && (r.cpuMillis < 0n || r.memoryBytes < 0n || r.pidsLimit < 0n)) throw invalidArgument("agent.resources", "must not be negative");
    agent.riskLevel = requireEnum("agent.risk_level", agent.riskLevel, RiskLevel);
    agent.networkPolicy = requireEnum("agent.network_policy", agent.networkPolicy, NetworkPolicy);
    if (agent.outputSchema !== "") this.checkSchema(agent.outputSchema);
    return agent;
  }

  /** The output schema must be JSON and a valid JSON Schema that ajv can compile. */
  private checkSchema(text: string): void {
    checkLength("agent.output_schema", text, 64 * 1024);
    let schema: unknown;
    try {
      schema = JSON.parse(text);
    } catch {
      throw invalidArgument("agent.output_schema", "is not JSON");
    }
    if (typeof schema !== "object" || schema === null || Array.isArray(schema)) {
      throw invalidArgument("agent.output_schema", "must be a JSON Schema object");
    }
    try {
      // The executor validates results with this same compiler (RE2 patterns: no lookaround).
      compileJsonSchema(schema as object);
    } catch (err) {
      throw invalidArgument("agent.output_schema", `is not a valid JSON Schema: ${(err as Error).message}`);
    }
  }
}

function alreadyExists(name: string) {
  return outpostError(Code.AlreadyExists, "AGENT_EXISTS", `agent "${name}" already exists`, { agent: name });
}
