/**
 * Deployment artifacts (issue #7, SPEC O2), checked offline: every Kubernetes manifest
 * validates against the vendored schema subset (deploy/k8s/schemas; ajv, strict about unknown
 * fields), and the properties the operations design relies on hold — probes on the health
 * endpoints, limits, non-root read-only containers, PDBs, only the gateway exposed, executors
 * on arm64 and scaled on queue depth. The compose file parses and names real entry points;
 * the image's entry script picks a service and refuses anything else.
 */
import { spawnSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { Ajv2020 } from "ajv/dist/2020.js";
import { parseAllDocuments, parse } from "yaml";
import { REPO_ROOT, SERVICE_NODE_OPTIONS, SERVICES, serviceNodeOptions } from "../scripts/lib/mesh.ts";

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

const ajv = new Ajv2020({ allErrors: true, strict: true });
ajv.addSchema(schema, "k8s");

/** Every OUTPOST_* variable some service's configuration declares. */
function declaredSettings(): Set<string> {
  const names = new Set<string>();
  const roots = [path.join(REPO_ROOT, "gateway/src"), ...SERVICES.filter((s) => s !== "gateway").map((s) => path.join(REPO_ROOT, "services", s, "src"))];
  for (const root of roots) {
    for (const m of readFileSync(path.join(root, "config.ts"), "utf8").matchAll(/\b(OUTPOST_[A-Z0-9_]+|DOCKER_HOST)\b/g)) names.add(m[1]!);
  }
  return names;
}

describe("Kubernetes manifests (deploy/k8s)", () => {
  it("all validate against the Kubernetes schemas, and a wrong field is caught", () => {
    expect(docs.length).toBeGreaterThan(10);
    for (const { file, doc } of docs) {
      const validate = ajv.getSchema(`k8s#/$defs/${doc.kind}`);
      expect(validate, `${file}: kind ${doc.kind} has no schema`).toBeDefined();
      const ok = validate!(doc);
      expect(ok, `${file} ${doc.kind}/${doc.metadata?.name}: ${ajv.errorsText(validate!.errors)}`).toBe(true);
    }
    // The validator is not a rubber stamp: a misspelt probe field and a bad port fail.
    const deployment = structuredClone(ofKind("Deployment")[0]!);
    deployment.spec.template.spec.containers[0].livenessProbe.httpGett = deployment.spec.template.spec.containers[0].livenessProbe.httpGet;
    expect(ajv.getSchema("k8s#/$defs/Deployment")!(deployment)).toBe(false);
    const service = structuredClone(ofKind("Service")[0]!);
    service.spec.ports[0].port = 70000;
    expect(ajv.getSchema("k8s#/$defs/Service")!(service)).toBe(false);
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
      expect(env.get("OUTPOST_INTERNAL_SECRET")?.valueFrom?.secretKeyRef, name).toBeDefined();
      for (const key of env.keys()) expect(settings.has(key), `${name}: ${key} is not a setting any service reads`).toBe(true);
      if (name !== "executor") expect(d.spec.replicas, `${name} runs replicated`).toBeGreaterThanOrEqual(2);
    }
  });

  it("schedules executors on arm64 nodes with an engine, and autoscales them on queue depth", () => {
    const executor = ofKind("Deployment").find((d) => d.metadata.name === "executor")!;
    expect(executor.spec.template.spec.nodeSelector).toEqual({ "kubernetes.io/arch": "arm64" });
    const containers = executor.spec.template.spec.containers as Doc[];
    const dockerHost = containers[0]!.env.find((e: Doc) => e.name === "DOCKER_HOST").value as string;
    const dind = containers.find((c) => c.name === "dind")!;
    // The executor's engine address is the socket the sidecar listens on, in a shared volume.
    expect(dind.args).toContain(`--host=${dockerHost}`);
    const socketDir = path.posix.dirname(dockerHost.replace("unix://", ""));
    expect(containers[0]!.volumeMounts.some((m: Doc) => m.mountPath === socketDir)).toBe(true);
    expect(dind.volumeMounts.some((m: Doc) => m.mountPath === socketDir)).toBe(true);

    const scaled = ofKind("ScaledObject");
    expect(scaled).toHaveLength(1);
    expect(scaled[0]!.spec.scaleTargetRef).toMatchObject({ kind: "Deployment", name: "executor" });
    expect(scaled[0]!.spec.triggers[0]).toMatchObject({ type: "prometheus" });
    // The query must name a gauge the dispatcher really exports, or the scaler never fires.
    const queried = /outpost_[a-z_]+/.exec(scaled[0]!.spec.triggers[0].metadata.query as string)?.[0];
    const dispatcherGauges = [...readFileSync(path.join(REPO_ROOT, "services/dispatcher/src/service.ts"), "utf8").matchAll(/gauge\(\s*"(outpost_[a-z_]+)"/g)].map((m) => m[1]);
    expect(dispatcherGauges).toContain("outpost_dispatch_queue_depth");
    expect(queried).toBe("outpost_dispatch_queue_depth");
    // The executor is not also scaled by an HPA (two controllers would fight).
    expect(ofKind("HorizontalPodAutoscaler").map((h) => h.spec.scaleTargetRef.name)).not.toContain("executor");
  });

  it("exposes only the gateway: default-deny ingress, the gateway alone open to all, no other external Service", () => {
    const policies = ofKind("NetworkPolicy");
    const deny = policies.find((p) => Object.keys(p.spec.podSelector).length === 0 || Object.keys(p.spec.podSelector.matchLabels ?? {}).length === 0);
    expect(deny?.spec.policyTypes).toEqual(["Ingress"]);
    expect(deny?.spec.ingress ?? []).toEqual([]);
    const open = policies.filter((p) => (p.spec.ingress ?? []).some((rule: Doc) => !rule.from));
    expect(open.map((p) => p.spec.podSelector.matchLabels["app.kubernetes.io/name"])).toEqual(["gateway"]);
    for (const service of SERVICES.filter((s) => s !== "gateway")) {
      const own = policies.filter((p) => p.spec.podSelector.matchLabels?.["app.kubernetes.io/name"] === service);
      expect(own.length, `${service} has a policy naming its callers`).toBe(1);
      const from = own[0]!.spec.ingress.flatMap((r: Doc) => r.from.map((f: Doc) => f.podSelector?.matchLabels?.["app.kubernetes.io/name"]).filter(Boolean));
      expect(from, service).not.toContain(undefined);
    }
    const external = ofKind("Service").filter((s) => s.spec.type === "LoadBalancer" || s.spec.type === "NodePort");
    expect(external.map((s) => s.metadata.name)).toEqual(["gateway"]);
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

  it("compose parses, wires every service by environment to MongoDB and Redis, and publishes only the gateway", () => {
    const compose = parse(readFileSync(path.join(REPO_ROOT, "deploy/compose.yaml"), "utf8"), { merge: true }) as Doc;
    const services = compose.services as Record<string, Doc>;
    expect(Object.keys(services).sort()).toEqual(["mongo", "redis", ...SERVICES].sort());
    const settings = declaredSettings();
    for (const name of SERVICES) {
      const s = services[name]!;
      expect(s.command, name).toEqual([name]);
      expect(s.read_only, name).toBe(true);
      expect(s.environment.OUTPOST_REDIS_URL, name).toBe("redis://redis:6379");
      expect(s.environment.OUTPOST_MONGO_URL, name).toMatch(/^mongodb:\/\/mongo:27017\//);
      for (const key of Object.keys(s.environment)) expect(settings.has(key), `${name}: ${key}`).toBe(true);
      for (const peer of ["TENANT", "DISPATCHER", "TELEMETRY"]) {
        const url = new URL(s.environment[`OUTPOST_${peer}_URL`]);
        expect(services[url.hostname], `${name} -> ${url.hostname}`).toBeDefined();
      }
      expect(Boolean(s.ports), name).toBe(name === "gateway");
    }
    expect(services.executor!.volumes).toContain("/var/run/docker.sock:/var/run/docker.sock");
  });
});
