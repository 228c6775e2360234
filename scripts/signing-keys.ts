/**
 * Prints a fresh set of signing keys for the services (packages/platform/src/identity.ts):
 * one Ed25519 key pair per role. Each process gets only its own private key; the public keys
 * (OUTPOST_TRUSTED_SIGNERS) go to every process.
 *
 *   npm run -s signing-keys                 env file lines, for docker compose (--env-file)
 *   npm run -s signing-keys -- --executors host-1,host-2
 *                                           the same, with a key per executor id instead of
 *                                           one for them all (OUTPOST_EXECUTOR_SIGNING_KEY_<ID>)
 *   npm run -s signing-keys -- --enroll     the same, with the executors' key trusted only for
 *                                           enrolling (executors run with OUTPOST_EXECUTOR_ENROLL=on)
 *   npm run -s signing-keys -- --format k8s the Secrets and the public keys' ConfigMap, for deploy/k8s
 *                                           (executors enroll: as --enroll)
 *   docker run --rm outpost/services:1.0.0 signing-keys   the same, from the image
 * `-s` (silent): without it npm prints its own banner lines to stdout, into any file the output
 * is redirected to.
 */
import { parseArgs } from "node:util";
import { generateSigningKeySet, SIGNER_ROLES } from "@outpost/platform";

function fail(message: string): never {
  process.stderr.write(`${message}\n`);
  process.exit(2);
}

let parsed;
try {
  parsed = parseArgs({
    options: { format: { type: "string", default: "env" }, executors: { type: "string", default: "" }, enroll: { type: "boolean", default: false } },
  });
} catch (err) {
  // An unknown or malformed option is a usage error (2) saying which, not a stack trace.
  fail(`signing-keys: ${(err as Error).message}\nusage: npm run -s signing-keys -- [--format env|k8s] [--executors id,id… | --enroll]`);
}
const { values } = parsed;
const executorIds = values.executors.split(",").map((id) => id.trim()).filter(Boolean);

if (values.format === "k8s" && executorIds.length > 0) {
  // Pods of one Deployment are alike and come and go with the autoscaler: none can be given a
  // key of its own by these manifests; they enroll one (docs/operations.md, "Enrolled executor keys").
  fail("--executors is for executors with fixed ids (--format env); the Kubernetes manifests' executors enroll keys of their own");
}
const envNameOf = (id: string) => `OUTPOST_EXECUTOR_SIGNING_KEY_${id.toUpperCase().replace(/[^A-Z0-9]/g, "_")}`;
const envNames = executorIds.map(envNameOf);
if (new Set(envNames).size !== envNames.length || new Set(executorIds).size !== executorIds.length) {
  fail(`--executors: ids must differ, also once upper-cased with '.' and '-' read as '_' (${envNames.join(", ")})`);
}
if (values.enroll && executorIds.length > 0) fail("--enroll and --executors are two ways of keying executors: choose one");
// Kubernetes executor pods come and go with the autoscaler: they enroll (OUTPOST_EXECUTOR_ENROLL=on
// in deploy/k8s/executor.yaml), so the role's key is trusted only as the enrollment key.
const executorEnrollment = values.enroll || values.format === "k8s";
let set;
try {
  set = generateSigningKeySet(executorIds.length > 0 ? SIGNER_ROLES.filter((role) => role !== "executor") : SIGNER_ROLES, executorIds, { executorEnrollment });
} catch (err) {
  fail(`--executors: ${(err as Error).message}`);
}

if (values.format === "env") {
  const lines = [
    "# Outpost signing keys: give each service only its own OUTPOST_<ROLE>_SIGNING_KEY (as",
    "# OUTPOST_SIGNING_KEY); OUTPOST_TRUSTED_SIGNERS holds public keys and goes to every service.",
    ...(executorIds.length > 0 ? ["# Each executor gets only the key of its id, with that id as OUTPOST_EXECUTOR_ID."] : []),
    ...(executorEnrollment ? ["# OUTPOST_EXECUTOR_SIGNING_KEY only enrolls: every executor runs with OUTPOST_EXECUTOR_ENROLL=on."] : []),
    `OUTPOST_TRUSTED_SIGNERS=${set.trustedSigners}`,
    ...Object.entries(set.signingKeys).map(([role, key]) => `OUTPOST_${role.toUpperCase()}_SIGNING_KEY=${key}`),
    ...executorIds.map((id, i) => `${envNames[i]}=${set.executorKeys[id]}`),
  ];
  process.stdout.write(`${lines.join("\n")}\n`);
} else if (values.format === "k8s") {
  // Applied once, apart from deploy/k8s (whose `kubectl apply -f deploy/k8s/` would otherwise put
  // placeholders back): `npm run -s signing-keys -- --format k8s | kubectl apply -f -`.
  // One Secret per role, in the namespace of that role's pods, so each Deployment can be given
  // (and RBAC can expose) only its own; the public keys as a ConfigMap in each namespace.
  const namespaceOf = (role: string) => (role === "executor" ? "outpost-executors" : "outpost");
  const configMaps = ["outpost", "outpost-executors"].map((namespace) =>
    [
      "apiVersion: v1",
      "kind: ConfigMap",
      "metadata:",
      "  name: outpost-trusted-signers",
      `  namespace: ${namespace}`,
      "data:",
      `  trusted-signers: ${set.trustedSigners}`,
    ].join("\n"),
  );
  const secrets = SIGNER_ROLES.map((role) =>
    [
      "apiVersion: v1",
      "kind: Secret",
      "metadata:",
      `  name: outpost-signing-${role}`,
      `  namespace: ${namespaceOf(role)}`,
      "type: Opaque",
      "stringData:",
      `  signing-key: ${set.signingKeys[role]}`,
    ].join("\n"),
  );
  process.stdout.write(`# Outpost signing keys (private: apply them, keep no copy): kubectl apply -f -\n${[...configMaps, ...secrets].join("\n---\n")}\n`);
} else {
  fail(`unknown --format ${values.format}: env or k8s`);
}
