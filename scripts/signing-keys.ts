/**
 * Prints a fresh set of signing keys for the services (packages/platform/src/identity.ts):
 * one Ed25519 key pair per role. Each process gets only its own private key; the public keys
 * (OUTPOST_TRUSTED_SIGNERS) go to every process.
 *
 *   npm run signing-keys                    env file lines, for docker compose (--env-file)
 *   npm run signing-keys -- --format k8s    Secrets and the ConfigMap entry, for deploy/k8s
 *   docker run --rm outpost/services:1.0.0 signing-keys   the same, from the image
 */
import { parseArgs } from "node:util";
import { generateSigningKeySet, SIGNER_ROLES } from "@outpost/platform";

const { values } = parseArgs({ options: { format: { type: "string", default: "env" } } });
const set = generateSigningKeySet();

if (values.format === "env") {
  const lines = [
    "# Outpost signing keys: give each service only its own OUTPOST_<ROLE>_SIGNING_KEY (as",
    "# OUTPOST_SIGNING_KEY); OUTPOST_TRUSTED_SIGNERS holds public keys and goes to every service.",
    `OUTPOST_TRUSTED_SIGNERS=${set.trustedSigners}`,
    ...SIGNER_ROLES.map((role) => `OUTPOST_${role.toUpperCase()}_SIGNING_KEY=${set.signingKeys[role]}`),
  ];
  process.stdout.write(`${lines.join("\n")}\n`);
} else if (values.format === "k8s") {
  // One Secret per role, so each Deployment can be given (and RBAC can expose) only its own.
  const docs = SIGNER_ROLES.map((role) =>
    [
      "apiVersion: v1",
      "kind: Secret",
      "metadata:",
      `  name: outpost-signing-${role}`,
      "  namespace: outpost",
      "type: Opaque",
      "stringData:",
      `  signing-key: ${set.signingKeys[role]}`,
    ].join("\n"),
  );
  process.stdout.write(`# outpost-config ConfigMap: trusted-signers: ${set.trustedSigners}\n${docs.join("\n---\n")}\n`);
} else {
  process.stderr.write(`unknown --format ${values.format}: env or k8s\n`);
  process.exit(2);
}
