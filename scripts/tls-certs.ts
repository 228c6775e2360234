/**
 * Makes a private CA and a certificate per service for internal mutual TLS
 * (docs/operations.md, "Internal TLS"), with the `openssl` command line. Run again on the same
 * directory, it keeps the CA there and renews the certificates under it:
 *
 *   npm run -s tls-certs -- --out ~/.config/outpost/tls
 *   npm run -s tls-certs -- --out DIR --hosts outpost.example.com,10.0.0.5
 *
 * Each certificate names localhost, 127.0.0.1, ::1, its service's name (the host name compose
 * gives it) and every --hosts entry, and is good as server and as client certificate. The CA's
 * key (ca.key) stays with the operator: it signs renewals and new replicas, and no process
 * needs it. Prints each process's settings.
 */
import path from "node:path";
import { parseArgs } from "node:util";
import { SERVICES } from "./lib/mesh.ts";
import { makeTlsCerts } from "./lib/tls-certs.ts";

const USAGE = "usage: npm run -s tls-certs -- --out DIR [--hosts name,address,…] [--days N]";

function fail(message: string): never {
  process.stderr.write(`${message}\n${USAGE}\n`);
  process.exit(2);
}

let parsed;
try {
  parsed = parseArgs({ options: { out: { type: "string" }, hosts: { type: "string", default: "" }, days: { type: "string", default: "825" } } });
} catch (err) {
  fail(`tls-certs: ${(err as Error).message}`);
}
const { values } = parsed;
if (!values.out) fail("tls-certs: --out is required (the directory to write the CA and certificates to)");
const days = Number(values.days);
if (!Number.isInteger(days) || days < 1 || days > 3650) fail(`tls-certs: --days must be a whole number from 1 to 3650 (got ${values.days})`);
const hosts = values.hosts.split(",").map((h) => h.trim()).filter(Boolean);
const bad = hosts.find((h) => !/^[A-Za-z0-9.:*-]+$/.test(h));
if (bad !== undefined) fail(`tls-certs: --hosts: "${bad}" is not a host name or address`);

const dir = path.resolve(values.out);
let set;
try {
  set = makeTlsCerts(dir, SERVICES, { hosts, days });
} catch (err) {
  fail(`tls-certs: ${(err as Error).message}`);
}
const lines = [
  set.reusedCa
    ? `# renewed the certificates under the CA already in ${dir} (${set.ca})`
    : `# CA ${set.ca} (its key ${set.caKey} signs renewals: run this again on ${dir}; no process needs it)`,
];
for (const name of SERVICES) {
  const own = set.certs[name]!;
  lines.push(`# ${name}: OUTPOST_TLS_CA_FILE=${set.ca} OUTPOST_TLS_CERT_FILE=${own.cert} OUTPOST_TLS_KEY_FILE=${own.key}`);
}
lines.push("# and every internal URL (OUTPOST_TENANT_URL, OUTPOST_DISPATCHER_URL, OUTPOST_TELEMETRY_URL) https://");
process.stdout.write(`${lines.join("\n")}\n`);
