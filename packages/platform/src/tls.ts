/**
 * TLS between Outpost's processes, and on the gateway's public port (docs/operations.md,
 * "Internal TLS"). Off by default: internal traffic is then plain h2c, as on the dev mesh.
 *
 * Each process names PEM files: its certificate and key (OUTPOST_TLS_CERT_FILE,
 * OUTPOST_TLS_KEY_FILE), served on its port and presented as its client certificate on the calls
 * it makes, and the CA that signs the mesh's certificates (OUTPOST_TLS_CA_FILE). With the CA set
 * the mesh is mutual TLS: every internal URL must be https://, a process verifies the services
 * it calls against that CA (and their host names), and a service answers RPCs only from callers
 * whose client certificate that CA signed. Liveness, readiness and metrics stay open to callers
 * without one, so probes and scrapers need no certificate.
 *
 * Signed identities (identity.ts) still say who a call is for; TLS keeps what travels between
 * the processes (secret values to executors, log lines, identities) from being read or replayed
 * off the wire, and keeps a process without a certificate from speaking to a service at all.
 *
 * Certificates are short-lived where a tool such as cert-manager renews them: the files are
 * read again when they change (checked every few seconds), new connections use the new ones,
 * and a change that does not load (a key written before its certificate) keeps the old ones
 * until the pair matches.
 */
import { X509Certificate, createPrivateKey } from "node:crypto";
import { readFileSync, statSync } from "node:fs";
import tls from "node:tls";
import { ConfigError, setting } from "./config.ts";

/** PEM bytes of one process's TLS material. */
export interface TlsMaterial {
  /** Its certificate (chain), served and presented as client certificate. */
  cert?: Buffer;
  key?: Buffer;
  /** The CA(s) it trusts for its peers; absent: the system's. */
  ca?: Buffer;
}

/** Which setting holds each file, for messages that name it. */
export interface TlsSettingNames {
  cert: string;
  key: string;
  ca?: string;
}

/** How often the files are checked for a change (a renewed certificate). */
export const TLS_RELOAD_CHECK_MS = 5_000;

/** The internal TLS settings every process reads (module comment). */
export const internalTlsShape = {
  OUTPOST_TLS_CERT_FILE: setting.file(),
  OUTPOST_TLS_KEY_FILE: setting.file(),
  OUTPOST_TLS_CA_FILE: setting.file(),
};

/** The gateway's public port's certificate and key; no client certificate is asked for there. */
export const publicTlsShape = {
  OUTPOST_GATEWAY_TLS_CERT_FILE: setting.file(),
  OUTPOST_GATEWAY_TLS_KEY_FILE: setting.file(),
};

const INTERNAL_NAMES: TlsSettingNames = { cert: "OUTPOST_TLS_CERT_FILE", key: "OUTPOST_TLS_KEY_FILE", ca: "OUTPOST_TLS_CA_FILE" };
const PUBLIC_NAMES: TlsSettingNames = { cert: "OUTPOST_GATEWAY_TLS_CERT_FILE", key: "OUTPOST_GATEWAY_TLS_KEY_FILE" };

/**
 * A process's TLS files, read at start-up and again whenever they change. Throws ConfigError
 * naming the setting when a file cannot be read, is not PEM of the right kind, or the key does
 * not belong to the certificate, or the certificate has expired.
 */
export class TlsFiles {
  readonly paths: { cert?: string; key?: string; ca?: string };
  private readonly names: TlsSettingNames;
  private material: TlsMaterial;
  private context: tls.SecureContext;
  /** The files' change times when last read, to see a renewal. */
  private stamps: string;
  private checkedAt = 0;

  /** `now`: the time the certificate must still be valid at (tests). */
  constructor(paths: { cert?: string; key?: string; ca?: string }, names: TlsSettingNames = INTERNAL_NAMES, now = Date.now()) {
    this.paths = paths;
    this.names = names;
    this.stamps = this.stampsNow();
    this.material = readMaterial(paths, names, now);
    this.context = tls.createSecureContext(this.material);
  }

  /** Whether peers must present a certificate the CA signed (mutual TLS). */
  get mutual(): boolean {
    return this.paths.ca !== undefined;
  }

  /** The current material (after reading changed files again; at most every TLS_RELOAD_CHECK_MS). */
  current(now = Date.now()): TlsMaterial {
    this.reloadIfChanged(now);
    return this.material;
  }

  /** For outgoing connections: a secure context of the current files. */
  secureContext(now = Date.now()): tls.SecureContext {
    this.reloadIfChanged(now);
    return this.context;
  }

  /**
   * Options for `http2.connect` and connect-node's `nodeOptions`: each new connection reads
   * `secureContext` afresh (Node copies the options when it connects), so a renewed certificate
   * is used from the next connection on.
   */
  clientOptions(): { readonly secureContext: tls.SecureContext } {
    const current = () => this.secureContext();
    return {
      get secureContext() {
        return current();
      },
    };
  }

  /**
   * Reads the files again if their change times moved (at most every TLS_RELOAD_CHECK_MS unless
   * `force`): "reloaded" when new material is in use, "unchanged", or the problem of files that
   * changed but do not load (the previous material stays in use; tried again at the next check).
   */
  reloadIfChanged(now = Date.now(), options: { force?: boolean } = {}): "reloaded" | "unchanged" | { problem: string } {
    if (!options.force && now - this.checkedAt < TLS_RELOAD_CHECK_MS) return "unchanged";
    this.checkedAt = now;
    const stamps = this.stampsNow();
    if (stamps === this.stamps) return "unchanged";
    try {
      const material = readMaterial(this.paths, this.names, now);
      this.context = tls.createSecureContext(material);
      this.material = material;
      this.stamps = stamps;
      return "reloaded";
    } catch (err) {
      // Half renewed (the key written, the certificate not yet): the old pair until both are in.
      return { problem: (err as Error).message };
    }
  }

  private stampsNow(): string {
    return [this.paths.cert, this.paths.key, this.paths.ca].map((p) => (p === undefined ? "-" : statStamp(p))).join("|");
  }
}

function statStamp(path: string): string {
  try {
    const stat = statSync(path);
    return `${stat.mtimeMs}:${stat.size}:${stat.ino}`;
  } catch {
    return "missing";
  }
}

function readFile(path: string, name: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new ConfigError(`${name}: cannot read ${path} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
  }
}

function readMaterial(paths: { cert?: string; key?: string; ca?: string }, names: TlsSettingNames, now = Date.now()): TlsMaterial {
  const material: TlsMaterial = {};
  if (paths.cert !== undefined) {
    material.cert = readFile(paths.cert, names.cert);
    let cert: X509Certificate;
    try {
      cert = new X509Certificate(material.cert);
    } catch {
      throw new ConfigError(`${names.cert}: ${paths.cert} is not a PEM certificate`);
    }
    if (Date.parse(cert.validTo) < now) throw new ConfigError(`${names.cert}: the certificate in ${paths.cert} expired on ${new Date(cert.validTo).toISOString()}`);
    if (paths.key === undefined) throw new ConfigError(`${names.key}: is required when ${names.cert} is set`);
    material.key = readFile(paths.key, names.key);
    let key;
    try {
      key = createPrivateKey(material.key);
    } catch {
      throw new ConfigError(`${names.key}: ${paths.key} is not a PEM private key (unencrypted)`);
    }
    if (!cert.checkPrivateKey(key)) throw new ConfigError(`${names.key}: the key in ${paths.key} does not belong to the certificate in ${paths.cert} (${names.cert})`);
  } else if (paths.key !== undefined) {
    throw new ConfigError(`${names.cert}: is required when ${names.key} is set`);
  }
  if (paths.ca !== undefined && names.ca !== undefined) {
    material.ca = readFile(paths.ca, names.ca);
    try {
      new X509Certificate(material.ca);
    } catch {
      throw new ConfigError(`${names.ca}: ${paths.ca} is not a PEM certificate`);
    }
  }
  try {
    tls.createSecureContext(material);
  } catch (err) {
    throw new ConfigError(`${names.cert}: the TLS files do not load (${(err as Error).message})`);
  }
  return material;
}

/** The certificates of a PEM bundle (a CA file may hold several, while CAs change). */
export function certificatesOf(pem: Buffer | undefined): X509Certificate[] {
  if (pem === undefined) return [];
  const blocks = pem.toString("latin1").match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  return blocks.flatMap((block) => {
    try {
      return [new X509Certificate(block)];
    } catch {
      return [];
    }
  });
}

/**
 * Whether a peer's chain (its certificate first, then what it sent with it) still leads, through
 * certificates valid at `now`, to one of `cas`: what a handshake checked, checked again for a
 * connection that outlives its peer's certificate or a CA taken out of the bundle.
 */
export function chainStillTrusted(chain: readonly X509Certificate[], cas: readonly X509Certificate[], now = Date.now()): boolean {
  const valid = (c: X509Certificate) => Date.parse(c.validFrom) <= now && now <= Date.parse(c.validTo);
  const issues = (issuer: X509Certificate, subject: X509Certificate) => subject.checkIssued(issuer) && subject.verify(issuer.publicKey);
  let current = chain[0];
  for (let depth = 0; current !== undefined && depth < 8; depth++) {
    if (!valid(current)) return false;
    const subject: X509Certificate = current;
    if (cas.some((ca) => valid(ca) && issues(ca, subject))) return true;
    current = chain.find((c) => c !== subject && c.fingerprint256 !== subject.fingerprint256 && issues(c, subject));
  }
  return false;
}

/** Whether `url` is an https:// URL (the scheme in any case, as URL parsing takes it). */
export function isHttpsUrl(url: string): boolean {
  return URL.canParse(url) && new URL(url).protocol === "https:";
}

/**
 * This process's internal TLS from its settings: undefined when none is set (plain h2c; an
 * https:// URL is then verified against the system's CAs). With the CA set, `urls` (setting
 * name → URL of a service this process calls) must all be https://, and the process needs a
 * certificate of its own to present. Throws ConfigError naming the setting.
 */
export function internalTlsOf(
  config: { OUTPOST_TLS_CERT_FILE?: string; OUTPOST_TLS_KEY_FILE?: string; OUTPOST_TLS_CA_FILE?: string },
  urls: Record<string, string | undefined> = {},
): TlsFiles | undefined {
  const paths = { cert: config.OUTPOST_TLS_CERT_FILE, key: config.OUTPOST_TLS_KEY_FILE, ca: config.OUTPOST_TLS_CA_FILE };
  if (paths.cert === undefined && paths.key === undefined && paths.ca === undefined) return undefined;
  if (paths.ca !== undefined) {
    if (paths.cert === undefined) throw new ConfigError(`OUTPOST_TLS_CERT_FILE: is required when OUTPOST_TLS_CA_FILE is set (mutual TLS: this process presents its certificate to the services it calls, and serves it)`);
    for (const [name, url] of Object.entries(urls)) {
      if (url !== undefined && !isHttpsUrl(url)) {
        throw new ConfigError(`${name}: must be an https:// URL when OUTPOST_TLS_CA_FILE is set (internal calls go over TLS), got ${url}`);
      }
    }
  }
  return new TlsFiles(paths, INTERNAL_NAMES);
}

/** The gateway's public port's TLS from its settings; undefined when none is set (plain HTTP). */
export function publicTlsOf(config: { OUTPOST_GATEWAY_TLS_CERT_FILE?: string; OUTPOST_GATEWAY_TLS_KEY_FILE?: string }): TlsFiles | undefined {
  const paths = { cert: config.OUTPOST_GATEWAY_TLS_CERT_FILE, key: config.OUTPOST_GATEWAY_TLS_KEY_FILE };
  if (paths.cert === undefined && paths.key === undefined) return undefined;
  return new TlsFiles(paths, PUBLIC_NAMES);
}
