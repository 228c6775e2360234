/**
 * Deployment artifacts (issue #7, SPEC O2), checked offline. Every Kubernetes manifest is
 * validated twice: by kubernetes-models (the upstream Kubernetes OpenAPI schemas, and KEDA's CRD
 * through @kubernetes-models/keda: types, required fields, enums, quantities), chosen by its
 * apiVersion and kind so an unknown type fails; and by the vendored strict subset
 * (deploy/k8s/schemas; ajv), which rejects the unknown fields the upstream schemas let through,
 * so a misspelt field fails. Then the properties the operations design relies on: probes on the
 * health endpoints, limits, non-root read-only containers, PDBs, only the gateway exposed,
 * executors on arm64, scaled on demand, and drained on scale-in for as long as their longest run;
 * Pod Security levels that admit every pod of their namespace; every peer URL a Deployment is
 * given reachable through the NetworkPolicies; no Secret or generated value in the directory
 * `kubectl apply -f deploy/k8s/` re-applies. The compose file parses, names real entry points and
 * gives each service only settings it reads; the image's entry script picks a service and refuses
 * anything else; the build context leaves key material out; the agent images' entrypoints pass a
 * stop on to their CLI, and their build script names the images as the built-in agents do.
 */
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { randomBytes, X509Certificate } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import os from "node:os";
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
import { Certificate } from "@kubernetes-models/cert-manager/cert-manager.io/v1/Certificate";
import { ClusterIssuer } from "@kubernetes-models/cert-manager/cert-manager.io/v1/ClusterIssuer";
import { ENROLLMENT_AUDIENCE, internalTlsOf, SigningKeys, type SignerRole } from "@outpost/platform";
import { REPO_ROOT, SERVICE_NODE_OPTIONS, SERVICES, serviceNodeOptions, type ServiceName } from "../scripts/lib/mesh.ts";
import { gatewayConfigShape } from "../gateway/src/config.ts";
import { builtinAgents } from "../services/dispatcher/src/core/agents.ts";
import { dispatcherConfigShape } from "../services/dispatcher/src/config.ts";
import { executorConfigShape } from "../services/executor/src/config.ts";
import { telemetryConfigShape } from "../services/telemetry/src/config.ts";
import { tenantConfigShape } from "../services/tenant/src/config.ts";
import { SecretBox } from "../services/tenant/src/core/secret-box.ts";
import { loadTiers, TIER_NAMES } from "../services/tenant/src/core/tiers.ts";

const K8S = path.join(REPO_ROOT, "deploy/k8s");
const schema = JSON.parse(readFileSync(path.join(K8S, "schemas/kubernetes-subset.schema.json"), "utf8")) as { $defs: Record<string, unknown> };

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Doc = Record<string, any>;
/** The YAML documents of one file's text, failing on a parse error. */
function yamlDocs(file: string, text: string): { file: string; doc: Doc }[] {
  return parseAllDocuments(text)
    .map((d) => {
      if (d.errors.length) throw new Error(`${file}: ${d.errors[0]!.message}`);
      return { file, doc: d.toJS() as Doc };
    })
    .filter((d) => d.doc);
}
const yamlFiles = (dir: string) => readdirSync(dir).filter((f) => f.endsWith(".yaml"));
/** What `kubectl apply -f deploy/k8s/` applies, again on every update: the directory's own files (apply is not recursive). */
const docs = yamlFiles(K8S).flatMap((file) => yamlDocs(file, readFileSync(path.join(K8S, file), "utf8")));

/** scripts/signing-keys.ts, as `npm run -s signing-keys -- <args>` runs it. */
const signingKeys = (...args: string[]) =>
  execFileSync(process.execPath, ["--disable-warning=ExperimentalWarning", "scripts/signing-keys.ts", ...args], { cwd: REPO_ROOT, encoding: "utf8" });
/**
 * What the operator makes once, apart from that directory, so that re-applying it never puts a
 * placeholder back over a real value: the signing keys' Secrets and ConfigMaps
 * (`npm run -s signing-keys -- --format k8s | kubectl apply -f -`) and outpost-secrets (made with
 * `kubectl create secret`; its shape in deploy/k8s/secrets/, which apply does not reach).
 */
const SECRETS_DIR = path.join(K8S, "secrets");
const madeOnce = [
  ...yamlDocs("signing-keys --format k8s", signingKeys("--format", "k8s")),
  ...yamlFiles(SECRETS_DIR).flatMap((file) => yamlDocs(`secrets/${file}`, readFileSync(path.join(SECRETS_DIR, file), "utf8"))),
];
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
  ([Namespace, ConfigMap, Secret, Service, Deployment, PodDisruptionBudget, HorizontalPodAutoscaler, NetworkPolicy, ScaledObject, Certificate, ClusterIssuer] as unknown as ModelClass[]).map(
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

const CONFIG_SHAPES: Record<ServiceName, Record<string, unknown>> = {
  gateway: gatewayConfigShape,
  tenant: tenantConfigShape,
  dispatcher: dispatcherConfigShape,
  executor: executorConfigShape,
  telemetry: telemetryConfigShape,
};
/** Every variable one service reads: its configuration's, and the platform logger's level. */
const settingsOf = (service: ServiceName) => new Set([...Object.keys(CONFIG_SHAPES[service]), "OUTPOST_LOG_LEVEL"]);
/** Connections a service is given exactly when its configuration reads them: its peers, MongoDB, Redis. */
const CONNECTIONS = ["OUTPOST_TENANT_URL", "OUTPOST_DISPATCHER_URL", "OUTPOST_TELEMETRY_URL", "OUTPOST_MONGO_URL", "OUTPOST_REDIS_URL"];

/**
 * Pod Security Admission (https://kubernetes.io/docs/concepts/security/pod-security-standards/),
 * the controls these manifests can touch: what a pod template breaks at a namespace's enforce level.
 */
type PodSecurityLevel = "privileged" | "baseline" | "restricted";
const BASELINE_CAPABILITIES = new Set(["AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"]);
const RESTRICTED_VOLUMES = new Set(["configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"]);
function podSecurityViolations(pod: Doc, level: PodSecurityLevel): string[] {
  if (level === "privileged") return [];
  const found: string[] = [];
  const podContext = (pod.securityContext ?? {}) as Doc;
  const containers = [...(pod.initContainers ?? []), ...(pod.containers ?? []), ...(pod.ephemeralContainers ?? [])] as Doc[];
  // Baseline.
  for (const host of ["hostNetwork", "hostPID", "hostIPC"]) if (pod[host]) found.push(`${host}: true`);
  for (const volume of pod.volumes ?? []) if (volume.hostPath) found.push(`hostPath volume ${volume.name}`);
  if ((podContext.sysctls ?? []).length) found.push("sysctls (name the safe ones here before using any)");
  for (const c of containers) {
    const sc = (c.securityContext ?? {}) as Doc;
    if (sc.privileged) found.push(`${c.name}: privileged: true`);
    for (const cap of sc.capabilities?.add ?? []) if (!BASELINE_CAPABILITIES.has(cap)) found.push(`${c.name}: adds capability ${cap}`);
    for (const port of c.ports ?? []) if (port.hostPort) found.push(`${c.name}: hostPort ${port.hostPort}`);
    if (sc.procMount && sc.procMount !== "Default") found.push(`${c.name}: procMount ${sc.procMount}`);
    if (sc.windowsOptions?.hostProcess) found.push(`${c.name}: hostProcess`);
    if ((sc.seccompProfile ?? podContext.seccompProfile)?.type === "Unconfined") found.push(`${c.name}: seccomp Unconfined`);
    if ((sc.appArmorProfile ?? podContext.appArmorProfile)?.type === "Unconfined") found.push(`${c.name}: AppArmor Unconfined`);
  }
  if (level === "baseline") return found;
  // Restricted, on top.
  for (const volume of pod.volumes ?? []) {
    const type = Object.keys(volume).find((k) => k !== "name");
    if (!RESTRICTED_VOLUMES.has(type ?? "")) found.push(`volume ${volume.name} of type ${type}`);
  }
  for (const c of containers) {
    const sc = (c.securityContext ?? {}) as Doc;
    if (sc.allowPrivilegeEscalation !== false) found.push(`${c.name}: allowPrivilegeEscalation is not false`);
    if ((sc.runAsNonRoot ?? podContext.runAsNonRoot) !== true) found.push(`${c.name}: runAsNonRoot is not true`);
    if ((sc.runAsUser ?? podContext.runAsUser) === 0) found.push(`${c.name}: runAsUser 0`);
    const seccomp = (sc.seccompProfile ?? podContext.seccompProfile)?.type;
    if (seccomp !== "RuntimeDefault" && seccomp !== "Localhost") found.push(`${c.name}: seccompProfile ${seccomp ?? "unset"}`);
    if (!(sc.capabilities?.drop ?? []).includes("ALL")) found.push(`${c.name}: does not drop ALL capabilities`);
    for (const cap of sc.capabilities?.add ?? []) if (cap !== "NET_BIND_SERVICE") found.push(`${c.name}: adds capability ${cap}`);
  }
  return found;
}

/** A namespace's labels as the API server keeps them (it adds kubernetes.io/metadata.name itself). */
function namespaceLabels(all: Doc[], namespace: string): Record<string, string> {
  const defined = all.find((d) => d.kind === "Namespace" && d.metadata.name === namespace);
  return { ...(defined?.metadata.labels ?? {}), "kubernetes.io/metadata.name": namespace };
}
/** The Pod Security level a namespace of these manifests enforces; each must say (no reliance on the cluster's default). */
function enforcedLevel(all: Doc[], namespace: string): PodSecurityLevel {
  const level = namespaceLabels(all, namespace)["pod-security.kubernetes.io/enforce"];
  expect(["privileged", "baseline", "restricted"], `namespace ${namespace} sets pod-security.kubernetes.io/enforce`).toContain(level);
  return level as PodSecurityLevel;
}

/** Whether a label selector selects these labels (matchLabels only: a matchExpressions would need evaluating here). */
function selects(selector: Doc | undefined, labels: Record<string, string>): boolean {
  if (!selector) return true;
  if ((selector.matchExpressions ?? []).length) throw new Error("matchExpressions: teach this test to evaluate them");
  return Object.entries(selector.matchLabels ?? {}).every(([k, v]) => labels[k] === v);
}
interface PodRef {
  namespace: string;
  labels: Record<string, string>;
}
/** Whether a NetworkPolicy peer (in a policy of `policyNamespace`) is this pod. ipBlocks are for traffic leaving the cluster. */
function peerIs(all: Doc[], peer: Doc, policyNamespace: string, pod: PodRef): boolean {
  if (peer.ipBlock) return false;
  const namespaceOk = peer.namespaceSelector ? selects(peer.namespaceSelector, namespaceLabels(all, pod.namespace)) : pod.namespace === policyNamespace;
  return namespaceOk && selects(peer.podSelector, pod.labels);
}
const portMatches = (ports: Doc[] | undefined, port: { number: number; name?: string }) =>
  !ports?.length || ports.some((p) => (p.protocol ?? "TCP") === "TCP" && (p.port === undefined || p.port === port.number || (port.name !== undefined && p.port === port.name)));
/**
 * Whether the NetworkPolicies let `from` open a TCP connection to `to` on `port`: the ingress
 * policies selecting `to` (none: all allowed) and the egress policies selecting `from`.
 */
function networkAllows(all: Doc[], from: PodRef, to: PodRef, port: { number: number; name?: string }): string | undefined {
  const policies = all.filter((d) => d.kind === "NetworkPolicy");
  const direction = (pod: PodRef, type: "Ingress" | "Egress") =>
    policies.filter((p) => p.metadata.namespace === pod.namespace && selects(p.spec.podSelector, pod.labels) && (p.spec.policyTypes ?? ["Ingress"]).includes(type));
  const ingress = direction(to, "Ingress");
  const admitted = ingress.length === 0 || ingress.some((p) => (p.spec.ingress ?? []).some((r: Doc) => (!r.from?.length || r.from.some((peer: Doc) => peerIs(all, peer, p.metadata.namespace, from))) && portMatches(r.ports, port)));
  if (!admitted) return `no ingress rule of ${ingress.map((p) => p.metadata.name).join(", ")} admits it`;
  const egress = direction(from, "Egress");
  const leaves = egress.length === 0 || egress.some((p) => (p.spec.egress ?? []).some((r: Doc) => (!r.to?.length || r.to.some((peer: Doc) => peerIs(all, peer, p.metadata.namespace, to))) && portMatches(r.ports, port)));
  if (!leaves) return `no egress rule of ${egress.map((p) => p.metadata.name).join(", ")} lets it out`;
  return undefined;
}
/**
 * Follows a peer URL given to a Deployment as the cluster would: the Service it names (by name in
 * the caller's namespace, or <name>.<namespace>[.svc[.cluster.local]]), that Service's port, the
 * Deployment behind it, and the NetworkPolicies on the way. Undefined when reachable, else why not.
 */
function urlUnreachable(all: Doc[], caller: Doc, url: URL): string | undefined {
  const [name, namespaceOrNone, ...rest] = url.hostname.split(".");
  const namespace = namespaceOrNone ?? caller.metadata.namespace;
  if (rest.length && rest.join(".") !== "svc" && rest.join(".") !== "svc.cluster.local") return `${url.hostname} is not a Service name`;
  const service = all.find((d) => d.kind === "Service" && d.metadata.name === name && d.metadata.namespace === namespace);
  if (!service) return `no Service ${name} in namespace ${namespace}`;
  const servicePort = (service.spec.ports as Doc[]).find((p) => p.port === Number(url.port || (url.protocol === "https:" ? 443 : 80)));
  if (!servicePort) return `Service ${namespace}/${name} has no port ${url.port}`;
  const callees = all.filter((d) => d.kind === "Deployment" && d.metadata.namespace === namespace && selects({ matchLabels: service.spec.selector }, d.spec.template.metadata.labels));
  if (callees.length === 0) return `Service ${namespace}/${name} selects no Deployment`;
  for (const callee of callees) {
    const target = servicePort.targetPort ?? servicePort.port;
    const containerPort = (callee.spec.template.spec.containers as Doc[]).flatMap((c) => c.ports ?? []).find((p: Doc) => p.name === target || p.containerPort === target);
    if (!containerPort) return `${callee.metadata.name} has no container port ${target}`;
    const denied = networkAllows(
      all,
      { namespace: caller.metadata.namespace, labels: caller.spec.template.metadata.labels },
      { namespace, labels: callee.spec.template.metadata.labels },
      { number: containerPort.containerPort, name: containerPort.name },
    );
    if (denied) return `${caller.metadata.namespace}/${caller.metadata.name} -> ${namespace}/${callee.metadata.name}:${containerPort.containerPort}: ${denied}`;
  }
  return undefined;
}
/** Every peer URL (OUTPOST_<PEER>_URL with a literal http(s) value) each Deployment is given. */
function peerUrls(all: Doc[]): { caller: Doc; variable: string; url: URL }[] {
  return all
    .filter((d) => d.kind === "Deployment")
    .flatMap((caller) =>
      (caller.spec.template.spec.containers as Doc[]).flatMap((c) =>
        (c.env ?? [])
          .filter((e: Doc) => /^OUTPOST_[A-Z]+_URL$/.test(e.name) && typeof e.value === "string" && /^https?:/.test(e.value))
          .map((e: Doc) => ({ caller, variable: e.name as string, url: new URL(e.value) })),
      ),
    );
}

/** The service the identities in these tests are signed for. */
const AUD = "outpost.dispatch.v1.DispatchService";

describe("Kubernetes manifests (deploy/k8s)", () => {
  it("every manifest validates against the upstream schemas (kubernetes-models) and the strict subset", () => {
    expect(docs.length).toBeGreaterThan(10);
    // Also what the operator makes once: the signing keys' output and outpost-secrets' shape.
    expect(madeOnce.length).toBeGreaterThan(5);
    for (const { file, doc } of [...docs, ...madeOnce]) {
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
    for (const d of deployments) {
      const name = d.metadata.name as ServiceName;
      const settings = settingsOf(name);
      expect(d.spec.selector.matchLabels).toEqual({ "app.kubernetes.io/name": name });
      expect(d.spec.template.metadata.labels).toMatchObject(d.spec.selector.matchLabels);
      const c = d.spec.template.spec.containers.find((x: Doc) => x.name === name);
      expect(c.args, name).toEqual([name]);
      const port = c.ports[0].containerPort;
      // The services' ports speak TLS (the gateway's public one does not: TLS ends before it).
      const scheme = name === "gateway" ? {} : { scheme: "HTTPS" };
      expect(c.livenessProbe.httpGet, name).toEqual({ path: "/healthz", port, ...scheme });
      expect(c.startupProbe.httpGet, name).toEqual({ path: "/healthz", port, ...scheme });
      // Readiness checks the real dependencies: grpc.health.v1 on the gateway's plain port, /readyz
      // over HTTPS on the services (the kubelet's gRPC probe speaks no TLS).
      if (name === "gateway") expect(c.readinessProbe.grpc, name).toEqual({ port });
      else expect(c.readinessProbe.httpGet, name).toEqual({ path: "/readyz", port, ...scheme });
      expect(c.resources.requests.cpu && c.resources.requests.memory && c.resources.limits.cpu && c.resources.limits.memory, name).toBeTruthy();
      expect(c.securityContext, name).toMatchObject({ runAsNonRoot: true, readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: { drop: ["ALL"] } });
      expect(pdbs.has(name), `${name} has a PodDisruptionBudget`).toBe(true);
      const env = new Map<string, Doc>(c.env.map((e: Doc) => [e.name, e]));
      expect(env.get(`OUTPOST_${name.toUpperCase()}_PORT`)?.value, name).toBe(String(port));
      expect(env.get(`OUTPOST_${name.toUpperCase()}_HOST`)?.value, name).toBe("0.0.0.0");
      // Each service reads its own signing key from its own Secret, and (all but the gateway,
      // which verifies nothing) the public keys from the ConfigMap the signing-keys script makes.
      expect(env.get("OUTPOST_SIGNING_KEY")?.valueFrom?.secretKeyRef, name).toEqual({ name: `outpost-signing-${name}`, key: "signing-key" });
      const trusted = env.get("OUTPOST_TRUSTED_SIGNERS")?.valueFrom?.configMapKeyRef;
      expect(trusted, name).toEqual(name === "gateway" ? undefined : { name: "outpost-trusted-signers", key: "trusted-signers" });
      // Only settings this service reads (e.g. no MongoDB URL for the gateway or the executor), and
      // every connection it reads (e.g. the tenant service's dispatcher, for the audit trail).
      for (const key of env.keys()) expect(settings.has(key), `${name}: ${key} is not a setting ${name} reads`).toBe(true);
      for (const key of CONNECTIONS) expect(env.has(key), `${name} ${settings.has(key) ? "reads" : "does not read"} ${key}`).toBe(settings.has(key));
      if (name !== "executor") expect(d.spec.replicas, `${name} runs replicated`).toBeGreaterThanOrEqual(2);
    }
  });

  it("runs the services over mutual TLS: each mounts its own cert-manager certificate, from the mesh's CA, naming every host its callers use", () => {
    const certificates = ofKind("Certificate");
    const issuers = new Map(ofKind("ClusterIssuer").map((i) => [i.metadata.name as string, i]));
    // The chain: a self-signed issuer makes the CA's certificate in cert-manager's namespace,
    // whose Secret the CA issuer signs with.
    const ca = certificates.find((c) => c.spec.isCA)!;
    expect(ca.metadata.namespace).toBe("cert-manager");
    expect(issuers.get(ca.spec.issuerRef.name)?.spec.selfSigned).toEqual({});
    const caIssuer = [...issuers.values()].find((i) => i.spec.ca?.secretName === ca.spec.secretName);
    expect(caIssuer, "a ClusterIssuer signs with the CA's Secret").toBeDefined();
    const hostsCalled = new Map<string, Set<string>>();
    for (const { caller, url } of peerUrls(docs.map((d) => d.doc))) {
      // Every peer is called over TLS.
      expect(url.protocol, `${caller.metadata.name} -> ${url.host}`).toBe("https:");
      const service = url.hostname.split(".")[0]!;
      hostsCalled.set(service, new Set([...(hostsCalled.get(service) ?? []), url.hostname]));
    }
    for (const d of ofKind("Deployment")) {
      const name = d.metadata.name as ServiceName;
      const pod = d.spec.template.spec;
      const c = (pod.containers as Doc[]).find((x) => x.name === name)!;
      const env = envOf(c);
      const files = ["OUTPOST_TLS_CERT_FILE", "OUTPOST_TLS_KEY_FILE", "OUTPOST_TLS_CA_FILE"].map((v) => env.get(v)?.value as string);
      expect(files.every(Boolean), `${name} sets all three TLS files`).toBe(true);
      const mount = (c.volumeMounts as Doc[]).find((m) => files.every((f) => path.posix.dirname(f) === m.mountPath))!;
      expect(mount, `${name}: the TLS files lie in one mount`).toBeDefined();
      expect(mount.readOnly, name).toBe(true);
      const volume = (pod.volumes as Doc[]).find((v) => v.name === mount.name)!;
      expect(files.map((f) => path.posix.basename(f))).toEqual(["tls.crt", "tls.key", "ca.crt"]);
      // Its own certificate's Secret, made by a Certificate in its namespace, from the CA.
      const certificate = certificates.find((x) => x.spec.secretName === volume.secret?.secretName && x.metadata.namespace === d.metadata.namespace);
      expect(certificate, `${name}: a Certificate makes Secret ${volume.secret?.secretName} in ${d.metadata.namespace}`).toBeDefined();
      expect(volume.secret.secretName).toBe(`outpost-${name}-tls`);
      expect(certificate!.spec.issuerRef).toMatchObject({ kind: "ClusterIssuer", name: caIssuer!.metadata.name });
      expect(certificate!.spec.usages).toEqual(expect.arrayContaining(["server auth", "client auth"]));
      for (const host of hostsCalled.get(name) ?? []) expect(certificate!.spec.dnsNames, `${name} is called as ${host}`).toContain(host);
      // The key is readable by the container's user: by group under the pod's fsGroup, else by all.
      const mode = volume.secret.defaultMode as number;
      const group = pod.securityContext?.fsGroup;
      if (group !== undefined) {
        expect(group, name).toBe(c.securityContext.runAsGroup);
        expect(mode & 0o040, `${name}: group-readable`).toBe(0o040);
        expect(mode & 0o007, `${name}: not world-readable`).toBe(0);
      } else expect(mode & 0o004, `${name}: readable without an fsGroup`).toBe(0o004);
      // Prometheus scrapes a plain metrics port of each pod's own (no TLS set-up, no certificate
      // naming a pod IP), which the service serves and the monitoring namespace may reach.
      const annotations = d.spec.template.metadata.annotations;
      const metrics = (c.ports as Doc[]).find((p) => p.name === "metrics")!;
      expect(metrics, `${name} has a metrics port`).toBeDefined();
      expect(annotations["prometheus.io/port"], name).toBe(String(metrics.containerPort));
      expect(annotations["prometheus.io/scheme"] ?? "http", name).toBe("http");
      expect(env.get(`OUTPOST_${name.toUpperCase()}_METRICS_PORT`)?.value, name).toBe(String(metrics.containerPort));
      const all = docs.map((x) => x.doc);
      const scraper = { namespace: "monitoring", labels: {} };
      const target = { namespace: d.metadata.namespace as string, labels: d.spec.template.metadata.labels as Record<string, string> };
      expect(networkAllows(all, scraper, target, { number: metrics.containerPort, name: "metrics" }), `${name}: Prometheus reaches the metrics port`).toBeUndefined();
      // …and only that one: the RPC port admits the service's callers alone.
      if (name !== "gateway") expect(networkAllows(all, scraper, target, { number: c.ports[0].containerPort, name: "rpc" }), `${name}: Prometheus kept off the RPC port`).toBeDefined();
    }
    // The CA keeps its key when renewed (every leaf's ca.crt would otherwise stop matching its
    // peers' until each was reissued); the services' certificates renew themselves with a new key.
    expect(ca.spec.privateKey.rotationPolicy).toBe("Never");
    for (const cert of certificates.filter((x) => !x.spec.isCA)) {
      expect(cert.spec.renewBefore, cert.metadata.name).toBeDefined();
      expect(cert.spec.privateKey.rotationPolicy, cert.metadata.name).toBe("Always");
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

  it("exposes only the gateway: default-deny ingress in every namespace, the gateway alone open to all, no other external Service", () => {
    const policies = ofKind("NetworkPolicy");
    const namespaces = [...new Set(ofKind("Deployment").map((d) => d.metadata.namespace as string))];
    for (const namespace of namespaces) {
      const deny = policies.filter((p) => p.metadata.namespace === namespace && Object.keys(p.spec.podSelector.matchLabels ?? {}).length === 0);
      expect(deny.map((p) => p.spec.policyTypes), `default deny in ${namespace}`).toEqual([["Ingress"]]);
      expect(deny[0]!.spec.ingress ?? []).toEqual([]);
    }
    const open = policies.filter((p) => (p.spec.ingress ?? []).some((rule: Doc) => !rule.from));
    expect(open.map((p) => p.spec.podSelector.matchLabels["app.kubernetes.io/name"])).toEqual(["gateway"]);
    for (const service of SERVICES.filter((s) => s !== "gateway")) {
      const own = policies.filter((p) => p.spec.podSelector.matchLabels?.["app.kubernetes.io/name"] === service && p.spec.policyTypes.includes("Ingress"));
      expect(own.length, `${service} has a policy naming its callers`).toBe(1);
      expect(own[0]!.metadata.namespace, service).toBe(deployment(service).metadata.namespace);
      // Every peer names pods (a podSelector) or the monitoring namespace; never a whole other namespace of Outpost.
      for (const peer of own[0]!.spec.ingress.flatMap((r: Doc) => r.from as Doc[])) {
        const namespace = peer.namespaceSelector?.matchLabels?.["kubernetes.io/metadata.name"];
        expect(peer.podSelector?.matchLabels?.["app.kubernetes.io/name"] ?? namespace, `${service}: ${JSON.stringify(peer)}`).toBeDefined();
        if (!peer.podSelector) expect(namespace, service).toBe("monitoring");
      }
    }
    const external = ofKind("Service").filter((s) => s.spec.type === "LoadBalancer" || s.spec.type === "NodePort");
    expect(external.map((s) => s.metadata.name)).toEqual(["gateway"]);
  });

  it("admits no pod its namespace's Pod Security level forbids: executors (privileged engine) apart, the rest restricted", () => {
    const all = docs.map((d) => d.doc);
    for (const d of ofKind("Deployment")) {
      const namespace = d.metadata.namespace as string;
      const level = enforcedLevel(all, namespace);
      expect(podSecurityViolations(d.spec.template.spec, level), `${d.metadata.name} in ${namespace} (enforce: ${level})`).toEqual([]);
    }
    // Every service but the executor under the strictest level; the executors' namespace holds
    // nothing else, and its one privileged container is the engine: without it the pod is restricted.
    for (const service of SERVICES.filter((s) => s !== "executor")) expect(enforcedLevel(all, deployment(service).metadata.namespace), service).toBe("restricted");
    const executor = deployment("executor");
    const executorNamespace = executor.metadata.namespace as string;
    expect(ofKind("Deployment").filter((d) => d.metadata.namespace === executorNamespace).map((d) => d.metadata.name)).toEqual(["executor"]);
    const pod = executor.spec.template.spec as Doc;
    expect(podSecurityViolations(pod, "baseline")).toEqual(["dind: privileged: true"]);
    const engineVolumes = new Set(["dind-storage"]);
    const withoutEngine = { ...pod, initContainers: [], volumes: (pod.volumes as Doc[]).filter((v) => !engineVolumes.has(v.name)) };
    expect(podSecurityViolations(withoutEngine, "restricted"), "the executor container itself").toEqual([]);
    // Everything the executor Deployment's namespace-bound references need lives in that namespace too.
    for (const kind of ["Service", "PodDisruptionBudget", "ScaledObject"]) {
      for (const d of ofKind(kind).filter((x) => x.metadata.name === "executor")) expect(d.metadata.namespace, kind).toBe(executorNamespace);
    }

    // The check fails where it should: the engine in a baseline namespace (as it once was), and a
    // restricted service that allows privilege escalation.
    const baselineOutpost = all.map((d) => (d.kind === "Namespace" && d.metadata.name === executorNamespace ? { ...d, metadata: { ...d.metadata, labels: { "pod-security.kubernetes.io/enforce": "baseline" } } } : d));
    expect(podSecurityViolations(pod, enforcedLevel(baselineOutpost, executorNamespace))).toContain("dind: privileged: true");
    const gateway = structuredClone(deployment("gateway").spec.template.spec) as Doc;
    gateway.containers[0].securityContext.allowPrivilegeEscalation = true;
    expect(podSecurityViolations(gateway, "restricted")).toEqual(["gateway: allowPrivilegeEscalation is not false"]);
    expect(podSecurityViolations(gateway, "baseline")).toEqual([]);
  });

  it("reaches every peer URL a Deployment is given: the Service exists in that namespace and the NetworkPolicies let the caller through", () => {
    const all = docs.map((d) => d.doc);
    const urls = peerUrls(all);
    // gateway 3, tenant 1 (the dispatcher's audit trail), dispatcher 2, executor 3 (across namespaces).
    expect(urls.map(({ caller, variable }) => `${caller.metadata.name} ${variable}`).sort()).toEqual(
      [
        "gateway OUTPOST_TENANT_URL", "gateway OUTPOST_DISPATCHER_URL", "gateway OUTPOST_TELEMETRY_URL",
        "tenant OUTPOST_DISPATCHER_URL",
        "dispatcher OUTPOST_TENANT_URL", "dispatcher OUTPOST_TELEMETRY_URL",
        "executor OUTPOST_TENANT_URL", "executor OUTPOST_DISPATCHER_URL", "executor OUTPOST_TELEMETRY_URL",
      ].sort(),
    );
    for (const { caller, variable, url } of urls) {
      expect(urlUnreachable(all, caller, url), `${caller.metadata.name} ${variable}=${url.href}`).toBeUndefined();
      // It names the service the variable is for.
      expect(url.hostname.split(".")[0], variable).toBe(variable.replace(/^OUTPOST_|_URL$/g, "").toLowerCase());
    }

    // The check fails where it should: the tenant left out of the dispatcher's callers (as it once
    // was: audit events lost), an executor peer without its namespace, a URL without the namespace.
    const without = (edit: (policy: Doc) => void) =>
      all.map((d) => {
        if (d.kind !== "NetworkPolicy" || d.metadata.name !== "dispatcher-callers") return d;
        const copy = structuredClone(d);
        edit(copy);
        return copy;
      });
    const tenantCall = urls.find(({ caller, variable }) => caller.metadata.name === "tenant" && variable === "OUTPOST_DISPATCHER_URL")!;
    const noTenant = without((p) => (p.spec.ingress[0].from = p.spec.ingress[0].from.filter((f: Doc) => f.podSelector?.matchLabels?.["app.kubernetes.io/name"] !== "tenant")));
    expect(urlUnreachable(noTenant, tenantCall.caller, tenantCall.url)).toMatch(/tenant -> outpost\/dispatcher:7102: no ingress rule of .*dispatcher-callers admits it/);
    const executorCall = urls.find(({ caller, variable }) => caller.metadata.name === "executor" && variable === "OUTPOST_DISPATCHER_URL")!;
    const sameNamespaceOnly = without((p) => {
      for (const f of p.spec.ingress[0].from as Doc[]) if (f.podSelector?.matchLabels?.["app.kubernetes.io/name"] === "executor") delete f.namespaceSelector;
    });
    expect(urlUnreachable(sameNamespaceOnly, executorCall.caller, executorCall.url)).toMatch(/executor -> outpost\/dispatcher:7102: no ingress rule of .*dispatcher-callers admits it/);
    expect(urlUnreachable(all, executorCall.caller, new URL("http://dispatcher:7102"))).toMatch(/no Service dispatcher in namespace outpost-executors/);
  });

  it("lets executor pods (and the agents inside their engine) reach DNS, their three services and the internet only", () => {
    const egress = ofKind("NetworkPolicy").filter((p) => p.spec.policyTypes.includes("Egress"));
    expect(egress.map((p) => p.spec.podSelector.matchLabels?.["app.kubernetes.io/name"])).toEqual(["executor"]);
    expect(egress[0]!.metadata.namespace).toBe(deployment("executor").metadata.namespace);
    const rules = egress[0]!.spec.egress as Doc[];
    const peers = rules.flatMap((rule) => (rule.to as Doc[]).map((to) => ({ to, ports: (rule.ports ?? []) as Doc[] })));
    // DNS: kube-dns in kube-system, port 53 only.
    const dns = peers.filter(({ to }) => to.podSelector?.matchLabels?.["k8s-app"] === "kube-dns");
    expect(dns).toHaveLength(1);
    expect(dns[0]!.to.namespaceSelector.matchLabels).toEqual({ "kubernetes.io/metadata.name": "kube-system" });
    expect(dns[0]!.ports.map((p) => `${p.protocol}/${p.port}`).sort()).toEqual(["TCP/53", "UDP/53"]);
    // The services the executor calls, each on its own port, in their own namespace (the URLs the
    // executor is given; the previous test follows them through these rules).
    const env = envOf(deployment("executor").spec.template.spec.containers.find((c: Doc) => c.name === "executor"));
    const services = peers.filter(({ to }) => to.podSelector?.matchLabels?.["app.kubernetes.io/name"]);
    const allowed = services.map(({ to, ports }) => `${to.podSelector.matchLabels["app.kubernetes.io/name"]}.${to.namespaceSelector?.matchLabels?.["kubernetes.io/metadata.name"]}:${ports.map((p) => p.port).join(",")}`).sort();
    const called = ["TENANT", "DISPATCHER", "TELEMETRY"].map((peer) => {
      const url = new URL(env.get(`OUTPOST_${peer}_URL`)!.value as string);
      const [name, namespace] = url.hostname.split(".");
      return `${name}.${namespace}:${url.port}`;
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

  it("keeps every Secret and generated value out of the re-applied directory, and provides every one a Deployment reads", () => {
    const kinds = (list: { doc: Doc }[]) => list.map(({ doc }) => `${doc.kind} ${doc.metadata.namespace}/${doc.metadata.name}`);
    // `kubectl apply -f deploy/k8s/` on an update must not put a placeholder back over a real key.
    expect(ofKind("Secret").map((s) => s.metadata.name), "Secrets in deploy/k8s/*.yaml").toEqual([]);
    const reapplied = new Set(kinds(docs));
    const overlap = kinds(madeOnce).filter((k) => reapplied.has(k));
    expect(overlap, "objects both made once and re-applied with deploy/k8s").toEqual([]);
    // What the signing-keys script makes is complete for the manifests, in the right namespaces,
    // and what is written by hand has its documented shape.
    const provided = new Map<string, Set<string>>();
    for (const { doc } of [...docs, ...madeOnce]) {
      if (doc.kind !== "Secret" && doc.kind !== "ConfigMap") continue;
      provided.set(`${doc.kind} ${doc.metadata.namespace}/${doc.metadata.name}`, new Set(Object.keys(doc.data ?? doc.stringData ?? {})));
    }
    for (const d of ofKind("Deployment")) {
      for (const c of [...(d.spec.template.spec.initContainers ?? []), ...d.spec.template.spec.containers] as Doc[]) {
        for (const e of c.env ?? []) {
          const ref = e.valueFrom?.secretKeyRef ?? e.valueFrom?.configMapKeyRef;
          if (!ref) continue;
          const what = `${e.valueFrom.secretKeyRef ? "Secret" : "ConfigMap"} ${d.metadata.namespace}/${ref.name}`;
          expect(provided.get(what)?.has(ref.key), `${d.metadata.name} ${e.name}: ${what} key ${ref.key}`).toBe(true);
        }
      }
    }
  });

  it("gives Redis a password: the URL comes from the Secret, never the ConfigMap", () => {
    // outpost-secrets is made once by the operator (its shape: deploy/k8s/secrets/).
    const secret = madeOnce.map((d) => d.doc).find((s) => s.kind === "Secret" && s.metadata.name === "outpost-secrets")!;
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
    const run = signingKeys;
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
    const secrets = k8s.filter((d) => d.kind === "Secret");
    expect(secrets.map((d) => d.metadata.name)).toEqual(["gateway", "tenant", "dispatcher", "executor", "telemetry"].map((r) => `outpost-signing-${r}`));
    expect(secrets.every((d) => SigningKeys.fromSettings("tenant", d.stringData["signing-key"]))).toBe(true);
    // Each role's Secret in its Deployment's namespace, the public keys in every namespace that runs a service.
    for (const d of secrets) expect(d.metadata.namespace, d.metadata.name).toBe(deployment(d.metadata.name.replace("outpost-signing-", "")).metadata.namespace);
    const configMaps = k8s.filter((d) => d.kind === "ConfigMap");
    expect(configMaps.map((d) => d.metadata.namespace).sort()).toEqual([...new Set(ofKind("Deployment").map((d) => d.metadata.namespace as string))].sort());
    for (const d of configMaps) expect(d.metadata.name).toBe("outpost-trusted-signers");
    const keys = Object.fromEntries(secrets.map((d) => [d.metadata.name.replace("outpost-signing-", ""), d.stringData["signing-key"] as string]));
    const signedByGateway = new Headers();
    SigningKeys.fromSettings("gateway", keys.gateway!).writeIdentity(signedByGateway, tenant, AUD);
    expect(SigningKeys.fromSettings("executor", keys.executor!, configMaps[0]!.data["trusted-signers"]).readIdentity(signedByGateway, AUD)).toEqual(tenant);
    // The executor pods enroll: their shared key is trusted only for EnrollmentService.
    const trusted = configMaps[0]!.data["trusted-signers"] as string;
    expect(trusted).toMatch(/(^|,)executor-enroll:/);
    expect(trusted).not.toMatch(/(^|,)executor:/);
    expect(envOf(deployment("executor").spec.template.spec.containers[0]).get("OUTPOST_EXECUTOR_ENROLL")?.value).toBe("on");
    const pod = { kind: "service", principal: "executor/pod-1" } as const;
    const signedByPod = (audience: string) => {
      const headers = new Headers();
      SigningKeys.fromSettings("executor", keys.executor!, trusted, "pod-1").writeIdentity(headers, pod, audience);
      return headers;
    };
    const dispatcherKeys = SigningKeys.fromSettings("dispatcher", keys.dispatcher!, trusted);
    expect(dispatcherKeys.readIdentity(signedByPod(ENROLLMENT_AUDIENCE), ENROLLMENT_AUDIENCE)).toEqual(pod);
    expect(() => dispatcherKeys.readIdentity(signedByPod(AUD), AUD)).toThrow(/not signed by an Outpost service that may sign it/);
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
      // An unknown option is a usage error saying which, not a stack trace.
      [["--bogus"], /Unknown option '--bogus'\nusage: npm run -s signing-keys/],
    ] as const) {
      const refused = run(...args);
      expect(refused.status, args.join(" ")).toBe(2);
      expect(refused.stderr).toMatch(message);
      expect(refused.stdout).toBe("");
    }
  });

  it("npm run tls-certs makes a CA and a certificate per service that the services load for mutual TLS", () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "outpost-tls-certs-"));
    try {
      const run = (...args: string[]) =>
        spawnSync(process.execPath, ["--disable-warning=ExperimentalWarning", "scripts/tls-certs.ts", ...args], { cwd: REPO_ROOT, encoding: "utf8" });
      const out = run("--out", dir, "--hosts", "outpost.example.com,10.0.0.5");
      expect(out.status, out.stderr).toBe(0);
      for (const name of SERVICES) {
        expect(out.stdout).toContain(`OUTPOST_TLS_CERT_FILE=${path.join(dir, `${name}.crt`)}`);
        const files = internalTlsOf(
          { OUTPOST_TLS_CERT_FILE: path.join(dir, `${name}.crt`), OUTPOST_TLS_KEY_FILE: path.join(dir, `${name}.key`), OUTPOST_TLS_CA_FILE: path.join(dir, "ca.crt") },
          { OUTPOST_DISPATCHER_URL: "https://dispatcher:7102" },
        );
        expect(files?.mutual, name).toBe(true);
        // Signed by the CA, for both ends of a connection, naming the service and the extra hosts.
        const cert = new X509Certificate(readFileSync(path.join(dir, `${name}.crt`)));
        expect(cert.verify(new X509Certificate(readFileSync(path.join(dir, "ca.crt"))).publicKey), name).toBe(true);
        expect(cert.subjectAltName).toContain(`DNS:${name}`);
        expect(cert.subjectAltName).toContain("DNS:outpost.example.com");
        expect(cert.subjectAltName).toContain("IP Address:10.0.0.5");
        expect(cert.checkHost(name)).toBe(name);
        // serverAuth and clientAuth: it serves the service's port and speaks for it to its peers.
        expect(cert.keyUsage).toEqual(expect.arrayContaining(["1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"]));
      }
      // Only the owner reads a key.
      for (const key of ["ca.key", "gateway.key"]) expect(statSync(path.join(dir, key)).mode & 0o077, key).toBe(0);
      // Run again on the directory, it renews the certificates under the same CA.
      const ca = readFileSync(path.join(dir, "ca.crt"), "utf8");
      const before = new X509Certificate(readFileSync(path.join(dir, "tenant.crt"))).serialNumber;
      const again = run("--out", dir);
      expect(again.status, again.stderr).toBe(0);
      expect(again.stdout).toContain("renewed the certificates under the CA already in");
      expect(readFileSync(path.join(dir, "ca.crt"), "utf8")).toBe(ca);
      const renewed = new X509Certificate(readFileSync(path.join(dir, "tenant.crt")));
      expect(renewed.serialNumber).not.toBe(before);
      expect(renewed.verify(new X509Certificate(ca).publicKey)).toBe(true);
      // Usage errors say what is wrong, exit 2.
      const missing = run("--hosts", "a");
      expect(missing.status).toBe(2);
      expect(missing.stderr).toContain("--out is required");
      const badHost = run("--out", dir, "--hosts", "a b");
      expect(badHost.status).toBe(2);
      expect(badHost.stderr).toContain('"a b" is not a host name or address');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("compose parses, wires every service by environment to what it reads (MongoDB, Redis, its peers), and publishes only the gateway", () => {
    const compose = parse(readFileSync(path.join(REPO_ROOT, "deploy/compose.yaml"), "utf8"), { merge: true }) as Doc;
    const services = compose.services as Record<string, Doc>;
    expect(Object.keys(services).sort()).toEqual(["mongo", "redis", ...SERVICES].sort());
    for (const name of SERVICES) {
      const s = services[name]!;
      const settings = settingsOf(name);
      expect(s.command, name).toEqual([name]);
      expect(s.read_only, name).toBe(true);
      // Redis requires a password; the executor does not use Redis and is not given it.
      if (!settings.has("OUTPOST_REDIS_URL")) expect(s.environment.OUTPOST_REDIS_URL, name).toBeUndefined();
      else expect(s.environment.OUTPOST_REDIS_URL, name).toMatch(/^redis:\/\/:\$\{OUTPOST_REDIS_PASSWORD:\?[^}]*\}@redis:6379$/);
      if (settings.has("OUTPOST_MONGO_URL")) expect(s.environment.OUTPOST_MONGO_URL, name).toMatch(/^mongodb:\/\/mongo:27017\//);
      // Its own signing key (one variable per service, as `npm run -s signing-keys` prints them).
      expect(s.environment.OUTPOST_SIGNING_KEY, name).toMatch(new RegExp(`^\\$\\{OUTPOST_${name.toUpperCase()}_SIGNING_KEY:\\?`));
      // Only settings this service reads, and every connection it reads.
      for (const key of Object.keys(s.environment)) expect(settings.has(key), `${name}: ${key} is not a setting ${name} reads`).toBe(true);
      for (const key of CONNECTIONS) expect(key in s.environment, `${name} ${settings.has(key) ? "reads" : "does not read"} ${key}`).toBe(settings.has(key));
      for (const peer of ["TENANT", "DISPATCHER", "TELEMETRY"]) {
        const value = s.environment[`OUTPOST_${peer}_URL`];
        if (value === undefined) continue;
        const url = new URL(value);
        expect(services[url.hostname], `${name} -> ${url.hostname}`).toBeDefined();
        expect(url.hostname, name).toBe(peer.toLowerCase());
      }
      // A variable left unset must not become an empty value: the services refuse empty settings
      // (exit 78), so a `${X:-}` stops the stack. Required ones say so (`:?`), optional ones default.
      for (const [key, value] of Object.entries(s.environment)) expect(String(value), `${name} ${key}`).not.toMatch(/\$\{[A-Z0-9_]+(:?-)\}/);
      expect(Boolean(s.ports), name).toBe(name === "gateway");
    }
    // The gateway's metrics on a port of their own, which is not the published one.
    const metricsPort = services.gateway!.environment.OUTPOST_GATEWAY_METRICS_PORT as string;
    expect(Number(metricsPort)).toBeGreaterThan(0);
    expect((services.gateway!.ports as string[]).join(" ")).not.toContain(`:${metricsPort}`);
    expect(services.redis!.command.join(" ")).toMatch(/--requirepass \$\{OUTPOST_REDIS_PASSWORD:\?/);
    expect(services.executor!.volumes).toContain("/var/run/docker.sock:/var/run/docker.sock");
    // Run directories are bind-mounted into agent containers by the host's engine, by path: the
    // executor keeps them in a host directory mounted at that same path.
    const runDir = services.executor!.environment.OUTPOST_DATA_DIR as string;
    expect(runDir).toBeDefined();
    expect(services.executor!.volumes).toContain(`${runDir}:${runDir}`);
  });

  it("compose requires the secrets' master keys (an empty value stops the tenant service) and says how to make them", () => {
    const compose = parse(readFileSync(path.join(REPO_ROOT, "deploy/compose.yaml"), "utf8"), { merge: true }) as Doc;
    const value = compose.services.tenant.environment.OUTPOST_SECRETS_MASTER_KEYS as string;
    // Why: what `${OUTPOST_SECRETS_MASTER_KEYS:-}` passed when unset is refused by the tenant service.
    expect(tenantConfigShape.OUTPOST_SECRETS_MASTER_KEYS.safeParse("").success).toBe(false);
    const required = /^\$\{OUTPOST_SECRETS_MASTER_KEYS:\?([^}]*)\}$/.exec(value);
    expect(required, value).not.toBeNull();
    expect(required![1]).toContain("openssl rand -base64 32");
    // What the documented command makes is a valid setting.
    const made = `k1:${randomBytes(32).toString("base64")}`;
    expect(tenantConfigShape.OUTPOST_SECRETS_MASTER_KEYS.safeParse(made).success).toBe(true);
    expect(() => SecretBox.fromSetting(made)).not.toThrow();
  });

  it("compose gives the executor a stable id, so a recreated executor adopts its runs' containers", () => {
    const compose = parse(readFileSync(path.join(REPO_ROOT, "deploy/compose.yaml"), "utf8"), { merge: true }) as Doc;
    const value = compose.services.executor.environment.OUTPOST_EXECUTOR_ID as string | undefined;
    // Unset, the executor takes the container's hostname, which compose changes on every recreate.
    expect(value, "OUTPOST_EXECUTOR_ID").toBeDefined();
    expect(compose.services.executor.deploy?.replicas ?? 1, "one executor per id").toBe(1);
    const withDefault = /^\$\{OUTPOST_EXECUTOR_ID:-([^}]+)\}$/.exec(value!);
    const id = withDefault ? withDefault[1]! : value!;
    expect(id).not.toMatch(/\$/);
    expect(executorConfigShape.OUTPOST_EXECUTOR_ID.parse(id)).toBe(id);
  });

  it("the runtime image has git (and CA certificates) for the executor's repository checkouts", () => {
    const dockerfile = readFileSync(path.join(REPO_ROOT, "deploy/Dockerfile"), "utf8");
    const runtime = dockerfile.slice(dockerfile.search(/^FROM \$\{NODE_IMAGE\} AS runtime$/m));
    expect(runtime.length).toBeLessThan(dockerfile.length);
    // The executor really runs git (services/executor/src/adapters/host-workspaces.ts).
    expect(readFileSync(path.join(REPO_ROOT, "services/executor/src/adapters/host-workspaces.ts"), "utf8")).toMatch(/spawn\("git"/);
    const install = /^RUN apt-get update(?:[^\n]*\\\n)*[^\n]*/m.exec(runtime)?.[0] ?? "";
    expect(install, "an apt-get install in the runtime stage").toMatch(/apt-get install -y --no-install-recommends /);
    const packages = /--no-install-recommends ([a-z0-9 .+-]+)/.exec(install)![1]!.trim().split(/\s+/);
    expect(packages).toEqual(expect.arrayContaining(["git", "ca-certificates"]));
    expect(install, "no apt lists left in the image").toMatch(/rm -rf \/var\/lib\/apt\/lists\/\*/);
    // Installed before the image drops to the service user.
    expect(runtime.indexOf("apt-get install")).toBeLessThan(runtime.indexOf("USER 1000:1000"));
  });

  it("the build context leaves out environment files and key material, and nothing the image needs", () => {
    const patterns = readFileSync(path.join(REPO_ROOT, "deploy/Dockerfile.dockerignore"), "utf8")
      .split("\n")
      .map((l) => l.trim())
      .filter((l) => l && !l.startsWith("#"));
    const excluded = (file: string) => dockerignoreExcludes(patterns, file);
    // outpost.env (every private signing key) wherever an operator may have left it, and its kin.
    for (const file of [
      "outpost.env", "deploy/outpost.env", "ops/prod/outpost.env", "outpost.env.bak", ".env", ".env.production", "deploy/.env",
      "keys/signing.pem", "tls.key", "id_ed25519", "id_rsa.pub", "outpost-signing.yaml", "my-secrets.yaml", ".npmrc", "cert.p12",
    ]) {
      expect(excluded(file), file).toBe(true);
    }
    // Every file of the repository the image is built from stays (only deploy/k8s, which the image never holds, is left out).
    const files = execFileSync("git", ["ls-files", "--cached", "--others", "--exclude-standard"], { cwd: REPO_ROOT, encoding: "utf8" }).split("\n").filter(Boolean);
    expect(files).toEqual(expect.arrayContaining(["services/tenant/src/core/secrets.ts", "scripts/signing-keys.ts", "deploy/entrypoint.sh", "package-lock.json"]));
    expect(files.filter((f) => existsSync(path.join(REPO_ROOT, f)) && excluded(f) && !f.startsWith("deploy/k8s/"))).toEqual([]);
    // The matcher itself: directories exclude their contents; a later "!" pattern re-includes.
    expect(dockerignoreExcludes(["**/node_modules"], "packages/x/node_modules/a/index.js")).toBe(true);
    expect(dockerignoreExcludes(["*.env", "!keep.env"], "keep.env")).toBe(false);
    expect(dockerignoreExcludes(["*.env"], "deploy/outpost.env")).toBe(false);
  });

  it("the docs capture `npm run signing-keys` output silently (-s), so no npm banner lands in the keys file", () => {
    const texts = [
      "docs/operations.md",
      "README.md",
      "scripts/signing-keys.ts",
      ...["deploy/README.md", "deploy/compose.yaml", "deploy/agents/README.md"],
      ...yamlFiles(K8S).map((f) => `deploy/k8s/${f}`),
      ...yamlFiles(SECRETS_DIR).map((f) => `deploy/k8s/secrets/${f}`),
    ];
    const captured: string[] = [];
    for (const file of texts) {
      for (const line of readFileSync(path.join(REPO_ROOT, file), "utf8").split("\n")) {
        // `npm run signing-keys … > file` or `… | cmd`: without -s npm prints "> outpost@… signing-keys" lines first.
        if (/npm run signing-keys\b[^`\n]*\s(?:>|\|)/.test(line)) captured.push(`${file}: ${line.trim()}`);
      }
    }
    expect(captured).toEqual([]);
    // What `npm run -s` captures is the script's output alone: every line a comment or a setting.
    const env = signingKeys();
    expect(env.split("\n").filter(Boolean).every((l) => l.startsWith("#") || /^OUTPOST_[A-Z0-9_]+=\S+$/.test(l)), env).toBe(true);
  });
});

describe("agent images (deploy/agents)", () => {
  const AGENTS_DIR = path.join(REPO_ROOT, "deploy/agents");
  const CLI: Record<string, string> = { claude: "claude", codex: "codex", gemini: "gemini", aider: "aider", grok: "grok" };
  const hasPython = spawnSync("python3", ["--version"]).status === 0;

  for (const [agent, cli] of Object.entries(CLI)) {
    it.skipIf(agent === "aider" && !hasPython)(`${agent}: a SIGTERM to the entrypoint reaches the CLI, which gets to finish its output and exit status`, async () => {
      const dir = mkdtempSync(path.join(os.tmpdir(), `outpost-agent-stop-${agent}-`));
      let pid: number | undefined;
      try {
        const bin = path.join(dir, "bin");
        const workspace = path.join(dir, "workspace");
        const tmp = path.join(dir, "tmp");
        for (const d of [bin, workspace, tmp]) mkdirSync(d);
        // A CLI that takes a moment to stop on SIGTERM, printing as it does, then exits 42.
        writeFileSync(
          path.join(bin, cli),
          `#!/bin/sh\ntrap 'echo "stopping on SIGTERM"; sleep 0.3; echo "stopped cleanly"; exit 42' TERM\necho "cli started"\n: > "${dir}/started"\nwhile :; do sleep 0.05; done\n`,
          { mode: 0o755 },
        );
        const child = spawn("sh", [path.join(AGENTS_DIR, agent, "entrypoint.sh")], {
          detached: true, // its own process group, so whatever a broken entrypoint leaves behind can be killed
          stdio: ["ignore", "pipe", "pipe"],
          env: {
            PATH: `${bin}:${path.dirname(process.execPath)}:/usr/local/bin:/usr/bin:/bin:${process.env.PATH}`,
            TMPDIR: tmp,
            OUTPOST_TASK: "a long task",
            OUTPOST_MODEL: "model-x",
            OUTPOST_WORKSPACE: workspace,
            OUTPOST_RESULT_PATH: path.join(workspace, ".outpost/result.json"),
            OUTPOST_AGENT_LIB: path.join(AGENTS_DIR, "lib"),
          },
        });
        pid = child.pid;
        let stdout = "";
        child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
        child.stderr.on("data", (d: Buffer) => (stdout += d.toString()));
        const ended = new Promise<number | string | null>((resolve) => child.on("close", (code, signal) => resolve(code ?? signal)));
        const deadline = Date.now() + 10_000;
        while (!existsSync(path.join(dir, "started"))) {
          expect(Date.now(), `the CLI did not start: ${stdout}`).toBeLessThan(deadline);
          await new Promise((r) => setTimeout(r, 20));
        }
        // What the container's init does on a stop: SIGTERM to the entrypoint's shell only.
        process.kill(child.pid!, "SIGTERM");
        const code = await Promise.race([ended, new Promise<string>((r) => setTimeout(() => r("still running 10 s after SIGTERM"), 10_000))]);
        expect(code, stdout).toBe(42);
        expect(stdout).toContain("stopping on SIGTERM");
        expect(stdout).toContain("stopped cleanly");
        const result = JSON.parse(readFileSync(path.join(workspace, ".outpost/result.json"), "utf8"));
        expect(result).toMatchObject({ agent, exit_code: 42 });
        expect(result.summary).toContain("stopped cleanly");
      } finally {
        if (pid) {
          try {
            process.kill(-pid, "SIGKILL");
          } catch {
            // already gone
          }
        }
        rmSync(dir, { recursive: true, force: true });
      }
    });
  }

  it("build.sh names the images exactly as the dispatcher's built-in agents do", () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "outpost-agent-build-"));
    try {
      // A stand-in docker that records each call's arguments.
      writeFileSync(path.join(dir, "docker"), `#!/bin/sh\nprintf '%s\\n' "$@" >> "${dir}/calls"\necho --- >> "${dir}/calls"\n`, { mode: 0o755 });
      const tags = (...args: string[]) => {
        rmSync(path.join(dir, "calls"), { force: true });
        execFileSync("bash", [path.join(AGENTS_DIR, "build.sh"), ...args], { env: { ...process.env, PATH: `${dir}:${process.env.PATH}` }, encoding: "utf8" });
        const words = readFileSync(path.join(dir, "calls"), "utf8").split("\n");
        return words.flatMap((w, i) => (w === "-t" ? [words[i + 1]!] : [])).sort();
      };
      const builtin = builtinAgents("demo-image")
        .filter((a) => a.name !== "demo")
        .map((a) => a.image)
        .sort();
      expect(builtin).toHaveLength(Object.keys(CLI).length);
      expect(tags("--push")).toEqual(builtin);
      expect(tags("--repository", "registry.example.com/outpost/agent", "--tag", "2026.11", "claude")).toEqual(["registry.example.com/outpost/agent-claude:2026.11"]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

/**
 * Whether a .dockerignore excludes a path of the build context, as BuildKit reads it (moby's
 * patternmatcher): patterns are relative to the context root, `*` and `?` stop at "/", `**` spans
 * directories, a pattern matching a directory excludes what is inside, and the last matching
 * pattern wins ("!" re-includes).
 */
function dockerignoreExcludes(patterns: string[], file: string): boolean {
  const toRegExp = (pattern: string) => {
    let re = "";
    for (let i = 0; i < pattern.length; i++) {
      const ch = pattern[i]!;
      if (ch === "*" && pattern[i + 1] === "*") {
        i++;
        if (pattern[i + 1] === "/") {
          i++;
          re += "(?:.*/)?";
        } else re += ".*";
      } else if (ch === "*") re += "[^/]*";
      else if (ch === "?") re += "[^/]";
      else re += ch.replace(/[.+^${}()|[\]\\]/g, "\\$&");
    }
    return new RegExp(`^${re}$`);
  };
  const parts = file.split("/");
  let excluded = false;
  for (const raw of patterns) {
    const negate = raw.startsWith("!");
    const re = toRegExp(path.posix.normalize(negate ? raw.slice(1) : raw).replace(/^\/+/, ""));
    if (parts.some((_, i) => re.test(parts.slice(0, i + 1).join("/")))) excluded = !negate;
  }
  return excluded;
}
