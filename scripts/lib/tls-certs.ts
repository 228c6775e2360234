/**
 * A private CA and a certificate per Outpost process, for internal TLS on the dev mesh, in tests
 * and for trying it out (`npm run tls-certs`). Made with the `openssl` command line, which every
 * machine that runs Outpost has, rather than an X.509 library in the product: in production the
 * certificates come from the operator's own CA or cert-manager (docs/operations.md).
 *
 * Keys are ECDSA P-256; each certificate is good for both ends of a connection (serverAuth and
 * clientAuth) and names localhost, 127.0.0.1, ::1, the process's own name and any extra hosts.
 */
import { execFileSync } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import path from "node:path";

export interface TlsCertPaths {
  cert: string;
  key: string;
}

export interface TlsCertSet {
  /** The CA's certificate (OUTPOST_TLS_CA_FILE of every process). */
  ca: string;
  /** The CA's key: kept to sign more certificates (`issue`), never given to a process. */
  caKey: string;
  /** Each name's certificate and key. */
  certs: Record<string, TlsCertPaths>;
  /** Whether the CA was already in the directory (and signed these), rather than made now. */
  reusedCa: boolean;
  /** Signs one more certificate under the set's CA (a renewal, another replica). */
  issue(name: string, options?: { hosts?: readonly string[]; days?: number; file?: string }): TlsCertPaths;
}

function openssl(args: string[]): void {
  try {
    execFileSync("openssl", args, { stdio: ["ignore", "ignore", "pipe"] });
  } catch (err) {
    const stderr = (err as { stderr?: Buffer }).stderr?.toString().trim();
    throw new Error(`openssl ${args[0]} failed${stderr ? `: ${stderr}` : ""}`, { cause: err });
  }
}

/** A name as it may appear in a DNS subject alternative name (the rest is dropped). */
function dnsName(name: string): string {
  return name.replace(/[^A-Za-z0-9.*-]/g, "-");
}

/**
 * Writes one certificate per name into `dir` (<name>.crt, <name>.key; keys readable by their
 * owner only), signed by the CA there (ca.crt, ca.key), which is made first when the directory
 * has none: so running it again renews the certificates under the CA the services already trust.
 * `hosts`: more names or addresses every certificate carries.
 */
export function makeTlsCerts(dir: string, names: readonly string[], options: { hosts?: readonly string[]; days?: number; caName?: string } = {}): TlsCertSet {
  mkdirSync(dir, { recursive: true });
  const ca = path.join(dir, "ca.crt");
  const caKey = path.join(dir, "ca.key");
  const reusedCa = existsSync(ca) && existsSync(caKey);
  if (!reusedCa) makeCa(dir, ca, caKey, options);

  const issue = (name: string, issueOptions: { hosts?: readonly string[]; days?: number; file?: string } = {}): TlsCertPaths => {
    const base = path.join(dir, issueOptions.file ?? name);
    const cert = `${base}.crt`;
    const key = `${base}.key`;
    const csr = `${base}.csr`;
    const extensions = `${base}.ext`;
    const hosts = [...new Set(["localhost", "127.0.0.1", "::1", name, ...(options.hosts ?? []), ...(issueOptions.hosts ?? [])])];
    const altNames = hosts.map((h) => (/^[\d.]+$/.test(h) || h.includes(":") ? `IP:${h}` : `DNS:${dnsName(h)}`));
    writeFileSync(
      extensions,
      [
        "basicConstraints = critical, CA:FALSE",
        "keyUsage = critical, digitalSignature",
        "extendedKeyUsage = serverAuth, clientAuth",
        `subjectAltName = ${altNames.join(", ")}`,
        "",
      ].join("\n"),
    );
    openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", csr, "-subj", `/CN=${dnsName(name)}`]);
    chmodSync(key, 0o600);
    openssl([
      "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", caKey, "-set_serial", `0x${Date.now().toString(16)}${Math.floor(Math.random() * 0xffff).toString(16)}`,
      "-days", String(issueOptions.days ?? options.days ?? 825), "-extfile", extensions, "-out", cert,
    ]);
    rmSync(csr);
    rmSync(extensions);
    return { cert, key };
  };
  const certs: Record<string, TlsCertPaths> = {};
  for (const name of names) certs[name] = issue(name);
  return { ca, caKey, certs, reusedCa, issue };
}

/** A self-signed CA for ten years that signs certificates only, no deeper CAs (pathlen 0). */
function makeCa(dir: string, ca: string, caKey: string, options: { caName?: string }): void {
  const caConfig = path.join(dir, "ca.cnf");
  writeFileSync(
    caConfig,
    [
      "[req]",
      "distinguished_name = dn",
      "x509_extensions = ca",
      "[dn]",
      "[ca]",
      "basicConstraints = critical, CA:TRUE, pathlen:0",
      "keyUsage = critical, keyCertSign, cRLSign",
      "subjectKeyIdentifier = hash",
      "",
    ].join("\n"),
  );
  openssl([
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
    "-keyout", caKey, "-out", ca, "-days", "3650",
    "-subj", `/CN=${options.caName ?? "Outpost internal CA"}`, "-config", caConfig,
  ]);
  rmSync(caConfig);
  chmodSync(caKey, 0o600);
}
