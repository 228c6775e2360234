/**
 * Deployment artifacts (issue #7, SPEC O2), checked offline. Every Kubernetes manifest is
 * validated twice: by kubernetes-models (the upstream Kubernetes OpenAPI schemas, and KEDA's CRD
 * through @kubernetes-models/keda: types, required fields, enums, quantities), chosen by its
 * apiVersion and kind so an unknown type fails; and by the vendored strict subset
 * (deploy/k8s/schemas; ajv), which rejects the unknown fields the upstream schemas let through,
 * so a misspelt field fails. Then the properties the operations design relies on: probes on the
 * health endpoints, limits, non-root read-only containers, PDBs, only the gateway exposed,
 * executors on arm64, scaled on demand, and drained on scale-in for as long as their longest run.
 * The compose file parses and names real entry points; the image's entry script picks a service
 * and refuses anything else.
 */
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { Ajv2020 } from "ajv/dist/2020.js";
import { parseAllDocuments, parse } from "yaml";
import { Deployment } from "kubernetes-models/apps/v1/Deployment";
import { HorizontalPodAutoscaler } from "kubernetes-models/autoscaling/v2/HorizontalPodAutoscaler";
import { NetworkPolicy } from "kubernetes-models/networking.k8s.io/v1/NetworkPolicy";
import { PodDisruptionBudget } from "kubernetes-models/policy/v1/PodDisruptionBudget";
import { ConfigMap } from "kubernetes-models/v1/ConfigMap";
import { Namespace } from "kubernetes-models/v1/Namespace";
import { Secret } from "kubernetes-models/v1/Secret";
import { Service } from "kubernetes-models/v1/Service";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { SigningKeys, type SignerRole } from "@outpost/platform";
import { REPO_ROOT, SERVICE_NODE_OPTIONS, SERVICES, serviceNodeOptions } from "../scripts/lib/mesh.ts";
import { executorConfigShape } from "../services/executor/src/config.ts";
import { loadTiers, TIER_NAMES } from "../services/tenant/src/core/tiers.ts";

const K8S = path.join(REPO_ROOT, "deploy/k8s");
const schema = JSON.parse(readFileSync(path.join(K8S, "schemas/kubernetes-subset.schema.json"), "utf8")) as { $defs: Record<string, unknown> };

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Doc = Record<string, any>;
const docs: { file: string; doc: Doc }[] = readdirSync(K8S)
  .filter((f) => f.endsWith(".yaml"))
  .flatMap((file) =>
    parseAllDocuments(readFileSync(path.join(K8S, file), "utf8")).map((d) => {
      if (d.errors.length) throw new Error(`${file}: ${d.errors[0]!.message}`);
      return { file, doc: d.toJS() as Doc };
    }),
  )
  .filter((d) => d.doc);
const ofKind = (kind: string) => docs.filter((d) => d.doc.kind === kind).map((d) => d.doc);
const deployment = (name: string) => ofKind("Deployment").find((d) => d.metadata.name === name)!;
const envOf = (container: Doc) => new Map<string, Doc>((container.env ?? []).map((e: Doc) => [e.name, e]));

/**
 * The upstream layer: kubernetes-models' classes (validators compiled from the Kubernetes OpenAPI
 * definitions, KEDA's from its CRD), keyed by their own apiVersion and kind. A manifest of a type
 * not listed here fails: add its model, never skip it.
 */
type ModelClass = { apiVersion: string; kind: string; new (data: Doc): { validate(): void } };
const MODELS = new Map(
  ([Namespace, ConfigMap, Secret, Service, Deployment, PodDisruptionBudget, HorizontalPodAutoscaler, NetworkPolicy, ScaledObject] as unknown as ModelClass[]).map(
    (model) => [`${model.apiVersion} ${model.kind}`, model],
  ),
);
function upstreamErrors(doc: Doc): string[] {
  const model = MODELS.get(`${doc.apiVersion} ${doc.kind}`);
  if (!model) return [`no Kubernetes model for apiVersion ${doc.apiVersion} kind ${doc.kind}`];
  try {
    new model(doc).validate();
    return [];
  } catch (err) {
    return [(err as Error).message];
  }
}

/** The strict layer: the vendored subset, which names every field deploy/k8s may use. */
const ajv = new Ajv2020({ allErrors: true, strict: true });
ajv.addSchema(schema, "k8s");
function strictErrors(doc: Doc): string[] {
  const validate = ajv.getSchema(`k8s#/$defs/${doc.kind}`);
  if (!validate) return [`no strict schema for kind ${doc.kind}`];
  if (validate(doc)) return [];
  return validate.errors!.map((e) => `${e.instancePath || "/"} ${e.message}${e.params.additionalProperty ? `: ${e.params.additionalProperty}` : ""}`);
}

/** Every OUTPOST_* variable some service's configuration declares. */
function declaredSettings(): Set<string> {
  const names = new Set<string>();
  const roots = [path.join(REPO_ROOT, "gateway/src"), ...SERVICES.filter((s) => s !== "gateway").map((s) => path.join(REPO_ROOT, "services", s, "src"))];
  for (const root of roots) {
    for (const m of readFileSync(path.join(root, "config.ts"), "utf8").matchAll(/\b(OUTPOST_[A-Z0-9_]+|DOCKER_HOST)\b/g)) names.add(m[1]!);
  }
  return names;
}

/** The service the identities in these tests are signed for. */
const AUD = "outpost.dispatch.v1.DispatchService";

describe("Kubernetes manifests (deploy/k8s)", () => {
  it("every manifest validates against the upstream schemas (kubernetes-models) and the strict subset", () => {
    expect(docs.length).toBeGreaterThan(10);
    for (const { file, doc } of docs) {
      const label = `${file} ${doc.apiVersion} ${doc.kind}/${doc.metadata?.name}`;
      expect(upstreamErrors(doc).join("; "), `${label} (kubernetes-models)`).toBe("");
      expect(strictErrors(doc).join("; "), `${label} (strict subset)`).toBe("");
    }
  });

  it("fails a manifest of an unknown apiVersion or kind instead of skipping it", () => {
    const pdb = ofKind("PodDisruptionBudget")[0]!;
    // policy/v1beta1 was removed in Kubernetes 1.25; a typo'd kind is no type at all.
    const wrong: Doc[] = [{ ...pdb, apiVersion: "policy/v1beta1" }, { ...pdb, kind: "PodDisruptionBudgit" }, { ...pdb, apiVersion: undefined }];
    for (const doc of wrong) {
      expect(upstreamErrors(doc).join(), `${doc.apiVersion} ${doc.kind}`).toMatch(/^no Kubernetes model for/);
      expect(strictErrors(doc), `${doc.apiVersion} ${doc.kind}`).not.toEqual([]);
    }
  });

  it("rejects a wrong type, a missing required field and a misspelt field in copies of the real manifests", () => {
    const executor = () => structuredClone(deployment("executor"));
    const container = (d: Doc) => d.spec.template.spec.containers[0] as Doc;
    const scaled = () => structuredClone(ofKind("ScaledObject")[0]!);
    const change = <T extends Doc>(doc: T, edit: (doc: T) => void): T => (edit(doc), doc);

    // Wrong types and missing required fields: the upstream schemas reject them (and the subset too).
    const upstreamRejects: [string, Doc, RegExp][] = [
      ["replicas: \"two\"", change(executor(), (d) => (d.spec.replicas = "two")), /\/spec\/replicas must be integer/],
      ["an env value that is a number", change(executor(), (d) => (container(d).env[0].value = 7103)), /\/env\/0\/value must be string/],
      ["cpu: \"lots\"", change(executor(), (d) => (container(d).resources.limits.cpu = "lots")), /\/limits\/cpu must match format "quantity"/],
      ["protocol: TPC", change(executor(), (d) => (container(d).ports[0].protocol = "TPC")), /\/protocol must be equal to one of the allowed values/],
      ["a container without a name", change(executor(), (d) => delete container(d).name), /containers\/0 must have required property '?name'?/],
      ["a Deployment without a selector", change(executor(), (d) => delete d.spec.selector), /\/spec must have required property '?selector'?/],
      ["minReplicaCount: \"one\" (KEDA)", change(scaled(), (d) => (d.spec.minReplicaCount = "one")), /\/spec\/minReplicaCount must be integer/],
      ["a ScaledObject without triggers (KEDA)", change(scaled(), (d) => delete d.spec.triggers), /\/spec must have required property '?triggers'?/],
      ["a trigger threshold that is a number (KEDA)", change(scaled(), (d) => (d.spec.triggers[0].metadata.threshold = 4)), /\/threshold must be string/],
    ];
    for (const [what, doc, message] of upstreamRejects) {
      expect(upstreamErrors(doc).join("; "), what).toMatch(message);
      expect(strictErrors(doc), what).not.toEqual([]);
    }

    // What only the strict layer catches. The upstream schemas let unknown fields through (a
    // misspelt field would silently do nothing); the OpenAPI leaves a container's image optional
    // and has no port ranges, though the API server requires an image and a port below 65536.
    // If kubernetes-models starts rejecting these, the subset's field list may be dropped.
    const service = structuredClone(ofKind("Service")[0]!);
    const strictOnly: [string, Doc, RegExp][] = [
      ["livenessProbes (misspelt)", change(executor(), (d) => ((container(d).livenessProbes = container(d).livenessProbe), delete container(d).livenessProbe)), /must NOT have additional properties: livenessProbes/],
      ["httpGett (misspelt)", change(executor(), (d) => (container(d).livenessProbe.httpGett = container(d).livenessProbe.httpGet)), /must NOT have additional properties: httpGett/],
      ["coolDownPeriod (misspelt, KEDA)", change(scaled(), (d) => (d.spec.coolDownPeriod = d.spec.cooldownPeriod)), /must NOT have additional properties: coolDownPeriod/],
      [
        "stabilisationWindowSeconds (misspelt, KEDA's HPA behaviour)",
        change(scaled(), (d) => (d.spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleDown.stabilisationWindowSeconds = 600)),
        /must NOT have additional properties: stabilisationWindowSeconds/,
      ],
      ["a container without an image", change(executor(), (d) => delete container(d).image), /must have required property 'image'/],
      ["a Service port of 70000", change(service, (d) => (d.spec.ports[0].port = 70000)), /\/spec\/ports\/0\/port must be <= 65535/],
    ];
    for (const [what, doc, message] of strictOnly) {
      expect(upstreamErrors(doc).join("; "), `${what}: the upstream schemas accept it`).toBe("");
      expect(strictErrors(doc).join("; "), what).toMatch(message);
    }
  });

  it("runs every service, each with health probes, limits, a non-root read-only container and a PDB", () => {
    const deployments = ofKind("Deployment");
    expect(deployments.map((d) => d.metadata.name).sort()).toEqual([...SERVICES].sort());
    const pdbs = new Set(ofKind("PodDisruptionBudget").map((p) => p.spec.selector.matchLabels["app.kubernetes.io/name"]));
    const settings = declaredSettings();
    for (const d of deployments) {
      const name = d.metadata.name as string;
      expect(d.spec.selector.matchLabels).toEqual({ "app.kubernetes.io/name": name });
      expect(d.spec.template.metadata.labels).toMatchObject(d.spec.selector.matchLabels);
      const c = d.spec.template.spec.containers.find((x: Doc) => x.name === name);
      expect(c.args, name).toEqual([name]);
      const port = c.ports[0].containerPort;
      expect(c.livenessProbe.httpGet, name).toEqual({ path: "/healthz", port });
      expect(c.readinessProbe.grpc ?? c.readinessProbe.httpGet, name).toMatchObject({ port });
      expect(c.resources.requests.cpu && c.resources.requests.memory && c.resources.limits.cpu && c.resources.limits.memory, name).toBeTruthy();
      expect(c.securityContext, name).toMatchObject({ runAsNonRoot: true, readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: { drop: ["ALL"] } });
      expect(pdbs.has(name), `${name} has a PodDisruptionBudget`).toBe(true);
      const env = new Map<string, Doc>(c.env.map((e: Doc) => [e.name, e]));
      expect(env.get(`OUTPOST_${name.toUpperCase()}_PORT`)?.value, name).toBe(String(port));
      expect(env.get(`OUTPOST_${name.toUpperCase()}_HOST`)?.value, name).toBe("0.0.0.0");
      // Each service reads its own signing key from its own Secret, and (all but the gateway,
      // which verifies nothing) the public keys from the ConfigMap.
      expect(env.get("OUTPOST_SIGNING_KEY")?.valueFrom?.secretKeyRef, name).toEqual({ name: `outpost-signing-${name}`, key: "signing-key" });
      const trusted = env.get("OUTPOST_TRUSTED_SIGNERS")?.valueFrom?.configMapKeyRef;
      expect(trusted, name).toEqual(name === "gateway" ? undefined : { name: "outpost-config", key: "trusted-signers" });
      for (const key of env.keys()) expect(settings.has(key), `${name}: ${key} is not a setting any service reads`).toBe(true);
      if (name !== "executor") expect(d.spec.replicas, `${name} runs replicated`).toBeGreaterThanOrEqual(2);
    }
  });

  it("schedules executors on arm64 nodes with an engine, and autoscales them on demand, scaling in gradually", () => {
    const executor = deployment("executor");
    const pod = executor.spec.template.spec;
    expect(pod.nodeSelector).toEqual({ "kubernetes.io/arch": "arm64" });
    const main = pod.containers[0] as Doc;
    const dockerHost = envOf(main).get("DOCKER_HOST")!.value as string;
    const dind = (pod.initContainers as Doc[]).find((c) => c.name === "dind")!;
    // The executor's engine address is the socket the sidecar listens on, in a shared volume.
    expect(dind.args).toContain(`--host=${dockerHost}`);
    const socketDir = path.posix.dirname(dockerHost.replace("unix://", ""));
    expect(main.volumeMounts.some((m: Doc) => m.mountPath === socketDir)).toBe(true);
    expect(dind.volumeMounts.some((m: Doc) => m.mountPath === socketDir)).toBe(true);
    // The executor asks the engine to bind-mount run directories by the executor's own path: the
    // engine must see the same volume at the same path (the image's /data unless set).
    const dataDir = (envOf(main).get("OUTPOST_DATA_DIR")?.value as string | undefined) ?? "/data";
    const runs = (main.volumeMounts as Doc[]).find((m) => m.mountPath === dataDir);
    expect(runs, "the executor's data directory is a volume (the root filesystem is read-only)").toBeDefined();
    expect(dind.volumeMounts, "the engine sees the run directories at the executor's path").toContainEqual(expect.objectContaining({ name: runs!.name, mountPath: dataDir }));

    const scaled = ofKind("ScaledObject");
    expect(scaled).toHaveLength(1);
    const spec = scaled[0]!.spec;
    expect(spec.scaleTargetRef).toMatchObject({ kind: "Deployment", name: "executor" });
    expect(spec.triggers).toHaveLength(1);
    expect(spec.triggers[0]).toMatchObject({ type: "prometheus" });
    // The query must name only gauges the dispatcher really exports, or the scaler never fires;
    // and it counts leased runs as well as queued ones, or an empty queue scales in busy executors.
    const queried = [...(spec.triggers[0].metadata.query as string).matchAll(/outpost_[a-z_]+/g)].map((m) => m[0]);
    const dispatcherGauges = [...readFileSync(path.join(REPO_ROOT, "services/dispatcher/src/service.ts"), "utf8").matchAll(/gauge\(\s*"(outpost_[a-z_]+)"/g)].map((m) => m[1]);
    expect(dispatcherGauges).toEqual(expect.arrayContaining(["outpost_dispatch_queue_depth", "outpost_dispatch_active_leases"]));
    expect(queried.sort()).toEqual(["outpost_dispatch_active_leases", "outpost_dispatch_queue_depth"]);
    // One replica per OUTPOST_EXECUTOR_SLOTS runs; a lost metric holds the size instead of reading 0.
    expect(spec.triggers[0].metadata.threshold).toBe(envOf(main).get("OUTPOST_EXECUTOR_SLOTS")!.value);
    expect(spec.triggers[0].metadata.ignoreNullValues).toBe("false");
    // Scale-in is gradual: only after demand stayed low a while, one executor at a time.
    const scaleDown = spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleDown;
    expect(scaleDown.stabilizationWindowSeconds).toBeGreaterThanOrEqual(300);
    expect(scaleDown.policies.length).toBeGreaterThan(0);
    for (const policy of scaleDown.policies) expect(policy, "remove at most one executor per minute or longer").toMatchObject({ type: "Pods", value: 1, periodSeconds: expect.toSatisfy((s: number) => s >= 60) });
    expect(spec.minReplicaCount).toBeGreaterThanOrEqual(1);
    // The executor is not also scaled by an HPA (two controllers would fight).
    expect(ofKind("HorizontalPodAutoscaler").map((h) => h.spec.scaleTargetRef.name)).not.toContain("executor");
  });

  it("lets a scaled-in executor finish its longest run: pod grace > executor grace >= longest run, engine stopped last", () => {
    const pod = deployment("executor").spec.template.spec;
    const main = (pod.containers as Doc[]).find((c) => c.name === "executor")!;
    const env = envOf(main);
    /** A duration setting as the executor reads it: the manifest's value, else the config default. */
    const ms = (name: "OUTPOST_EXECUTOR_SHUTDOWN_GRACE_MS" | "OUTPOST_EXECUTOR_CHECKOUT_TIMEOUT_MS" | "OUTPOST_STOP_GRACE_MS") => {
      const entry = env.get(name);
      expect(entry === undefined || typeof entry.value === "string", `${name} is a literal value, so this test can read it`).toBe(true);
      return executorConfigShape[name].parse(entry?.value);
    };

    // The longest timeout any run may have: the largest tier's, from the table the tenant service
    // loads (its defaults, since tenant.yaml names no OUTPOST_TIERS_FILE).
    const tenantEnv = envOf(deployment("tenant").spec.template.spec.containers[0]);
    expect(tenantEnv.has("OUTPOST_TIERS_FILE"), "tenant.yaml now sets OUTPOST_TIERS_FILE: read the longest timeout from that file here").toBe(false);
    const tiers = loadTiers(undefined);
    const longestTimeoutMs = Math.max(...TIER_NAMES.map((tier) => tiers[tier].maxTimeoutMs));
    expect(longestTimeoutMs).toBeGreaterThanOrEqual(tiers.pro.maxTimeoutMs);

    // A slot leased just before SIGTERM: checkout (the run's timeout starts after it), the timeout,
    // SIGTERM-to-SIGKILL, then output drain (5 s), log acks (10 s) and the report's retries
    // (core/run.ts): 60 s for those. The image pull has no bound; the manifest adds headroom for it.
    const longestRunMs = ms("OUTPOST_EXECUTOR_CHECKOUT_TIMEOUT_MS") + longestTimeoutMs + ms("OUTPOST_STOP_GRACE_MS") + 60_000;
    const executorGraceMs = ms("OUTPOST_EXECUTOR_SHUTDOWN_GRACE_MS");
    expect(executorGraceMs, "OUTPOST_EXECUTOR_SHUTDOWN_GRACE_MS covers the longest run").toBeGreaterThanOrEqual(longestRunMs);
    // Then the executor exits (warm pool cleared, server drained in <= 10 s) and the engine stops:
    // the kubelet's SIGKILL must come after all of it.
    const podGraceMs = (pod.terminationGracePeriodSeconds as number) * 1000;
    expect(podGraceMs, "terminationGracePeriodSeconds exceeds the executor's grace by 30 s or more").toBeGreaterThanOrEqual(executorGraceMs + 30_000);

    // The engine outlives the executor: a native sidecar (Kubernetes >= 1.29), which the kubelet
    // stops only after the regular containers have exited, and which starts (engine answering) before them.
    const dockerHost = env.get("DOCKER_HOST")!.value as string;
    const engines = [...(pod.initContainers ?? []), ...pod.containers].filter((c: Doc) => (c.args ?? []).includes(`--host=${dockerHost}`));
    expect(engines).toHaveLength(1);
    expect(pod.initContainers, "the engine is an init container (a sidecar), not a regular container").toContain(engines[0]);
    expect(engines[0].restartPolicy, "restartPolicy: Always makes the init container a sidecar").toBe("Always");
    expect(engines[0].startupProbe?.exec?.command, "the executor starts once the engine answers").toContain(`--host=${dockerHost}`);
    expect(pod.containers.map((c: Doc) => c.name)).toEqual(["executor"]);
  });

  it("exposes only the gateway: default-deny ingress, the gateway alone open to all, no other external Service", () => {
    const policies = ofKind("NetworkPolicy");
    const deny = policies.find((p) => Object.keys(p.spec.podSelector).length === 0 || Object.keys(p.spec.podSelector.matchLabels ?? {}).length === 0);
    expect(deny?.spec.policyTypes).toEqual(["Ingress"]);
    expect(deny?.spec.ingress ?? []).toEqual([]);
    const open = policies.filter((p) => (p.spec.ingress ?? []).some((rule: Doc) => !rule.from));
    expect(open.map((p) => p.spec.podSelector.matchLabels["app.kubernetes.io/name"])).toEqual(["gateway"]);
    for (const service of SERVICES.filter((s) => s !== "gateway")) {
      const own = policies.filter((p) => p.spec.podSelector.matchLabels?.["app.kubernetes.io/name"] === service && p.spec.policyTypes.includes("Ingress"));
      expect(own.length, `${service} has a policy naming its callers`).toBe(1);
      const from = own[0]!.spec.ingress.flatMap((r: Doc) => r.from.map((f: Doc) => f.podSelector?.matchLabels?.["app.kubernetes.io/name"]).filter(Boolean));
      expect(from, service).not.toContain(undefined);
    }
    const external = ofKind("Service").filter((s) => s.spec.type === "LoadBalancer" || s.spec.type === "NodePort");
    expect(external.map((s) => s.metadata.name)).toEqual(["gateway"]);
  });

  it("lets executor pods (and the agents inside their engine) reach DNS, their three services and the internet only", () => {
    const egress = ofKind("NetworkPolicy").filter((p) => p.spec.policyTypes.includes("Egress"));
    expect(egress.map((p) => p.spec.podSelector.matchLabels?.["app.kubernetes.io/name"])).toEqual(["executor"]);
    const rules = egress[0]!.spec.egress as Doc[];
    const peers = rules.flatMap((rule) => (rule.to as Doc[]).map((to) => ({ to, ports: (rule.ports ?? []) as Doc[] })));
    // DNS: kube-dns in kube-system, port 53 only.
    const dns = peers.filter(({ to }) => to.podSelector?.matchLabels?.["k8s-app"] === "kube-dns");
    expect(dns).toHaveLength(1);
    expect(dns[0]!.to.namespaceSelector.matchLabels).toEqual({ "kubernetes.io/metadata.name": "kube-system" });
    expect(dns[0]!.ports.map((p) => `${p.protocol}/${p.port}`).sort()).toEqual(["TCP/53", "UDP/53"]);
    // The services the executor calls, each on its own port (the URLs the executor is given).
    const env = envOf(deployment("executor").spec.template.spec.containers.find((c: Doc) => c.name === "executor"));
    const services = peers.filter(({ to }) => to.podSelector?.matchLabels?.["app.kubernetes.io/name"] && !to.namespaceSelector);
    const allowed = services.map(({ to, ports }) => `${to.podSelector.matchLabels["app.kubernetes.io/name"]}:${ports.map((p) => p.port).join(",")}`).sort();
    const called = ["TENANT", "DISPATCHER", "TELEMETRY"].map((peer) => {
      const url = new URL(env.get(`OUTPOST_${peer}_URL`)!.value as string);
      return `${url.hostname}:${url.port}`;
    });
    expect(allowed).toEqual(called.sort());
    // The internet: every address but the private, link-local (cloud metadata) and CGNAT ranges.
    const blocks = peers.filter(({ to }) => to.ipBlock);
    const v4 = blocks.find(({ to }) => to.ipBlock.cidr === "0.0.0.0/0");
    expect(v4?.ports, "the internet on any port").toEqual([]);
    expect([...v4!.to.ipBlock.except].sort()).toEqual(["10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16"]);
    for (const { to } of blocks) expect(to.ipBlock.cidr === "0.0.0.0/0" || (to.ipBlock.cidr === "::/0" && to.ipBlock.except.includes("fc00::/7")), to.ipBlock.cidr).toBe(true);
    // Nothing else: no namespace-wide peer (Redis and MongoDB live in outpost-data), no other pod.
    expect(peers.length).toBe(dns.length + services.length + blocks.length);
    // The executor does not use Redis, so it is given no Redis URL (which carries the password).
    expect(env.has("OUTPOST_REDIS_URL")).toBe(false);
  });

  it("gives Redis a password: the URL comes from the Secret, never the ConfigMap", () => {
    const secret = ofKind("Secret").find((s) => s.metadata.name === "outpost-secrets")!;
    expect(new URL(secret.stringData["redis-url"] as string).password).not.toBe("");
    expect(ofKind("ConfigMap").some((c) => "redis-url" in (c.data ?? {}))).toBe(false);
    for (const d of ofKind("Deployment")) {
      const url = envOf(d.spec.template.spec.containers[0]).get("OUTPOST_REDIS_URL");
      if (url) expect(url.valueFrom, d.metadata.name).toEqual({ secretKeyRef: { name: "outpost-secrets", key: "redis-url" } });
    }
  });
});

describe("image and compose (deploy/)", () => {
  it("the entry script starts the named service and refuses an unknown one", () => {
    const script = readFileSync(path.join(REPO_ROOT, "deploy/entrypoint.sh"), "utf8");
    for (const service of SERVICES) {
      const entry = service === "gateway" ? "gateway/src/main.ts" : `services/${service}/src/main.ts`;
      expect(existsSync(path.join(REPO_ROOT, entry)), entry).toBe(true);
    }
    expect(script).toContain("services/$service/src/main.ts");
    const bad = spawnSync("sh", [path.join(REPO_ROOT, "deploy/entrypoint.sh"), "nonsense"], { encoding: "utf8" });
    expect(bad.status).toBe(64);
    expect(bad.stderr).toContain("gateway|tenant|dispatcher|executor|telemetry");
  });

  it("the Dockerfile is multi-stage on Node 24, non-root, and enters through the entry script", () => {
    const dockerfile = readFileSync(path.join(REPO_ROOT, "deploy/Dockerfile"), "utf8");
    const stages = [...dockerfile.matchAll(/^FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?/gm)];
    expect(stages.length).toBeGreaterThanOrEqual(2);
    expect(dockerfile).toMatch(/^ARG NODE_IMAGE=node:24[-\w.]*/m);
    expect(dockerfile).toMatch(/^FROM --platform=\$BUILDPLATFORM/m);
    expect(dockerfile).toMatch(/npm run generate/);
    expect(dockerfile).toMatch(/^USER 1000:1000$/m);
    expect(dockerfile).toContain('ENTRYPOINT ["/app/deploy/entrypoint.sh"]');
  });

  it("the image runs the services with the launcher's V8 flags, and an operator's young-generation size wins", () => {
    const dockerfile = readFileSync(path.join(REPO_ROOT, "deploy/Dockerfile"), "utf8");
    expect(dockerfile).toMatch(new RegExp(`^\\s*NODE_OPTIONS=${SERVICE_NODE_OPTIONS}\\b`, "m"));
    expect(serviceNodeOptions(undefined)).toBe(SERVICE_NODE_OPTIONS);
    expect(serviceNodeOptions("--enable-source-maps")).toBe(`--enable-source-maps ${SERVICE_NODE_OPTIONS}`);
    expect(serviceNodeOptions("--max-semi-space-size=32")).toBe("--max-semi-space-size=32");
  });

  it("npm run signing-keys prints a key per service that the services accept, in env and Kubernetes form", async () => {
    const run = (...args: string[]) =>
      execFileSync(process.execPath, ["--disable-warning=ExperimentalWarning", "scripts/signing-keys.ts", ...args], { cwd: REPO_ROOT, encoding: "utf8" });
    const lines = Object.fromEntries(run().split("\n").filter((l) => l.startsWith("OUTPOST_")).map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]));
    const keysOf = (role: SignerRole) => SigningKeys.fromSettings(role, lines[`OUTPOST_${role.toUpperCase()}_SIGNING_KEY`]!, lines.OUTPOST_TRUSTED_SIGNERS);
    // The gateway signs a tenant; every other service accepts it. An executor signing a tenant is refused.
    const tenant = { kind: "tenant", tenantId: "T1", principal: "key/k" } as const;
    const headers = new Headers();
    keysOf("gateway").writeIdentity(headers, tenant, AUD);
    for (const role of ["tenant", "dispatcher", "executor", "telemetry"] as const) expect(keysOf(role).readIdentity(headers, AUD), role).toEqual(tenant);
    const forged = new Headers();
    keysOf("executor").writeIdentity(forged, tenant, AUD);
    expect(() => keysOf("dispatcher").readIdentity(forged, AUD)).toThrow(/not signed by an Outpost service that may sign it/);
    // A fresh set each time.
    expect(run()).not.toContain(lines.OUTPOST_GATEWAY_SIGNING_KEY);
    const k8s = parseAllDocuments(run("--format", "k8s")).map((d) => d.toJS() as Doc);
    expect(k8s.map((d) => d.metadata.name)).toEqual(["gateway", "tenant", "dispatcher", "executor", "telemetry"].map((r) => `outpost-signing-${r}`));
    expect(k8s.every((d) => d.kind === "Secret" && SigningKeys.fromSettings("tenant", d.stringData["signing-key"]))).toBe(true);
  });

  it("npm run signing-keys -- --executors gives each executor a key that speaks for its id alone", () => {
    const run = (...args: string[]) =>
      spawnSync(process.execPath, ["--disable-warning=ExperimentalWarning", "scripts/signing-keys.ts", ...args], { cwd: REPO_ROOT, encoding: "utf8" });
    const out = run("--executors", "host-1,host.2");
    expect(out.status).toBe(0);
    const lines = Object.fromEntries(out.stdout.split("\n").filter((l) => l.startsWith("OUTPOST_")).map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]));
    expect(Object.keys(lines)).not.toContain("OUTPOST_EXECUTOR_SIGNING_KEY");
    const executor = (id: string, envName: string) => SigningKeys.fromSettings("executor", lines[envName]!, lines.OUTPOST_TRUSTED_SIGNERS, id);
    const dispatcher = SigningKeys.fromSettings("dispatcher", lines.OUTPOST_DISPATCHER_SIGNING_KEY!, lines.OUTPOST_TRUSTED_SIGNERS);
    const signed = (keys: SigningKeys, principal: string) => {
      const headers = new Headers();
      keys.writeIdentity(headers, { kind: "service", principal }, AUD);
      return headers;
    };
    expect(dispatcher.readIdentity(signed(executor("host-1", "OUTPOST_EXECUTOR_SIGNING_KEY_HOST_1"), "executor/host-1"), AUD)).toEqual({ kind: "service", principal: "executor/host-1" });
    expect(dispatcher.readIdentity(signed(executor("host.2", "OUTPOST_EXECUTOR_SIGNING_KEY_HOST_2"), "executor/host.2"), AUD).principal).toBe("executor/host.2");
    // host-1's key, claiming to be host.2, in either way it could.
    expect(() => dispatcher.readIdentity(signed(executor("host-1", "OUTPOST_EXECUTOR_SIGNING_KEY_HOST_1"), "executor/host.2"), AUD)).toThrow(/not signed by an Outpost service that may sign it/);
    expect(() => dispatcher.readIdentity(signed(executor("host.2", "OUTPOST_EXECUTOR_SIGNING_KEY_HOST_1"), "executor/host.2"), AUD)).toThrow(/not signed by an Outpost service that may sign it/);
    // Refusals: ids that collide as variable names, invalid ids, and the Kubernetes form.
    for (const [args, message] of [
      [["--executors", "a-1,a_1"], /ids must differ/],
      [["--executors", "bad id"], /executor id "bad id": letters, digits/],
      [["--executors", "a", "--format", "k8s"], /--executors is for executors with fixed ids/],
    ] as const) {
      const refused = run(...args);
      expect(refused.status, args.join(" ")).toBe(2);
      expect(refused.stderr).toMatch(message);
      expect(refused.stdout).toBe("");
    }
  });

  it("compose parses, wires every service by environment to MongoDB and Redis, and publishes only the gateway", () => {
    const compose = parse(readFileSync(path.join(REPO_ROOT, "deploy/compose.yaml"), "utf8"), { merge: true }) as Doc;
    const services = compose.services as Record<string, Doc>;
    expect(Object.keys(services).sort()).toEqual(["mongo", "redis", ...SERVICES].sort());
    const settings = declaredSettings();
    for (const name of SERVICES) {
      const s = services[name]!;
      expect(s.command, name).toEqual([name]);
      expect(s.read_only, name).toBe(true);
      // Redis requires a password; the executor does not use Redis and is not given it.
      if (name === "executor") expect(s.environment.OUTPOST_REDIS_URL, name).toBeUndefined();
      else expect(s.environment.OUTPOST_REDIS_URL, name).toMatch(/^redis:\/\/:\$\{OUTPOST_REDIS_PASSWORD:\?[^}]*\}@redis:6379$/);
      expect(s.environment.OUTPOST_MONGO_URL, name).toMatch(/^mongodb:\/\/mongo:27017\//);
      // Its own signing key (one variable per service, as `npm run signing-keys` prints them).
      expect(s.environment.OUTPOST_SIGNING_KEY, name).toMatch(new RegExp(`^\\$\\{OUTPOST_${name.toUpperCase()}_SIGNING_KEY:\\?`));
      for (const key of Object.keys(s.environment)) expect(settings.has(key), `${name}: ${key}`).toBe(true);
      for (const peer of ["TENANT", "DISPATCHER", "TELEMETRY"]) {
        const url = new URL(s.environment[`OUTPOST_${peer}_URL`]);
        expect(services[url.hostname], `${name} -> ${url.hostname}`).toBeDefined();
      }
      expect(Boolean(s.ports), name).toBe(name === "gateway");
    }
    expect(services.redis!.command.join(" ")).toMatch(/--requirepass \$\{OUTPOST_REDIS_PASSWORD:\?/);
    expect(services.executor!.volumes).toContain("/var/run/docker.sock:/var/run/docker.sock");
    // Run directories are bind-mounted into agent containers by the host's engine, by path: the
    // executor keeps them in a host directory mounted at that same path.
    const runDir = services.executor!.environment.OUTPOST_DATA_DIR as string;
    expect(runDir).toBeDefined();
    expect(services.executor!.volumes).toContain(`${runDir}:${runDir}`);
  });
});
