/**
 * Ends the open server streams of a credential that stops being valid (SPEC G2, T2: a revoked
 * key, a suspended tenant). A call's credential is checked when the call starts; a log
 * subscription or a dispatch watch can then stay open for hours, and would outlive its key's
 * revocation. So each open stream's credential is checked again, the way a new call's would be
 * (Authenticator.authenticate: from its cache while that holds, else by the tenant service):
 *
 * - at once when the authenticator drops its trust in the credential (the tenant service
 *   published the key's revocation or its tenant's suspension; or the invalidation channel
 *   reconnected, when messages may have been lost, and every credential is checked);
 * - every `recheckMs` whatever happens, for a gateway without Redis (it hears no invalidations)
 *   and for a lost message.
 *
 * A credential the tenant service now refuses ends every stream it opened, with that refusal
 * (UNAUTHENTICATED API_KEY_REVOKED, PERMISSION_DENIED TENANT_SUSPENDED; only the refusals of
 * the key itself, KEY_REFUSALS). A credential that cannot be checked right now (the tenant
 * service unreachable, or refusing the gateway's own call) keeps its streams, as a new call on
 * a cached key would be let through; the next check asks again. The admin token is a setting
 * of the process and cannot be revoked while it runs, so admin streams are not watched.
 *
 * The credential is kept (in a Headers of its own) while a stream it opened is open, so it can
 * be asked about again; the stream's request holds it that long anyway.
 */
import { ConnectError } from "@connectrpc/connect";
import { counter, gauge, rpcCodeLabel, type Identity, type Logger } from "@outpost/platform";
import { type Authenticator, credentialHashOf, type Invalidation, isKeyRefusal } from "./authenticator.ts";

/** Credentials checked at once in a sweep, so a sweep never floods the tenant service. */
const SWEEP_BATCH = 16;
/** At most one warning per this long while credentials cannot be checked. */
const WARN_INTERVAL_MS = 60_000;

export interface OpenStreamsOptions {
  authenticator: Authenticator;
  /** How often every open stream's credential is checked again, invalidations or not. */
  recheckMs: number;
  logger: Pick<Logger, "info" | "warn">;
}

/** Instances in this process, for the gauge (in-process tests start several gateways). */
const live = new Set<OpenStreams>();

function registerMetrics() {
  gauge("outpost_gateway_watched_streams", "Open server streams of tenant keys whose credential the gateway re-checks.", [], (g) => {
    g.set([...live].reduce((sum, streams) => sum + streams.size, 0));
  });
  return counter("outpost_gateway_streams_revoked_total", "Open streams ended because their key was refused (revoked, tenant suspended), by status code.", ["code"]);
}

/** Ends one stream with the refusal of its credential. */
export type EndStream = (refusal: ConnectError) => void;

interface WatchedCredential {
  /** Only the credential's own headers. */
  readonly header: Headers;
  readonly tenantId: string;
  readonly streams: Set<EndStream>;
  /** The check under way; another asked for meanwhile runs after it (`again`). */
  checking?: Promise<void>;
  again: boolean;
}

export class OpenStreams {
  private readonly byCredential = new Map<string, WatchedCredential>();
  private readonly timer: NodeJS.Timeout;
  private sweeping = false;
  /** A sweep was asked for while one ran (after a reconnect): run another once it is done. */
  private sweepAgain = false;
  private lastWarnAt: number | undefined;
  private uncheckedSinceWarn = 0;
  private readonly revokedTotal = registerMetrics();

  private readonly options: OpenStreamsOptions;

  constructor(options: OpenStreamsOptions) {
    this.options = options;
    options.authenticator.onInvalidation((what) => this.invalidated(what));
    this.timer = setInterval(() => void this.sweep(), options.recheckMs);
    this.timer.unref();
    live.add(this);
  }

  /**
   * Watches a stream opened by `identity` with the credential in `header`; `end` is called at
   * most once, if that credential stops being valid. Call the returned function when the
   * stream ends, whichever way.
   */
  watch(header: Headers, identity: Identity, end: EndStream): () => void {
    if (identity.kind !== "tenant") return () => {};
    const keyHash = credentialHashOf(header);
    if (keyHash === undefined) return () => {};
    let watched = this.byCredential.get(keyHash);
    if (!watched) {
      watched = { header: credentialHeaderOf(header), tenantId: identity.tenantId, streams: new Set(), again: false };
      this.byCredential.set(keyHash, watched);
    }
    let ended = false;
    const endOnce: EndStream = (refusal) => {
      if (ended) return;
      ended = true;
      end(refusal);
    };
    watched.streams.add(endOnce);
    // The call was admitted a moment ago; if the cache no longer trusts its key, an
    // invalidation may have come in between (before this stream could hear of it).
    if (!this.options.authenticator.cachedIdentity(header)) void this.check(keyHash);
    return () => {
      ended = true;
      this.forget(keyHash, endOnce);
    };
  }

  /** Streams watched now (for metrics and tests). */
  get size(): number {
    let n = 0;
    for (const watched of this.byCredential.values()) n += watched.streams.size;
    return n;
  }

  close(): void {
    clearInterval(this.timer);
    live.delete(this);
  }

  private invalidated(what: Invalidation): void {
    if (what.kind === "key") {
      void this.check(what.keyHash);
      return;
    }
    if (what.kind === "all") {
      void this.sweep();
      return;
    }
    for (const [keyHash, watched] of this.byCredential) if (watched.tenantId === what.tenantId) void this.check(keyHash);
  }

  /**
   * Checks every watched credential, a batch at a time. One sweep at a time: one asked for
   * meanwhile (the invalidation channel reconnected) runs again from the start once it is done,
   * since the running one may have passed keys before what prompted it.
   */
  private async sweep(): Promise<void> {
    if (this.sweeping) {
      this.sweepAgain = true;
      return;
    }
    this.sweeping = true;
    try {
      do {
        this.sweepAgain = false;
        const keyHashes = [...this.byCredential.keys()];
        for (let i = 0; i < keyHashes.length; i += SWEEP_BATCH) {
          await Promise.all(keyHashes.slice(i, i + SWEEP_BATCH).map((keyHash) => this.check(keyHash)));
        }
      } while (this.sweepAgain);
    } finally {
      this.sweeping = false;
    }
  }

  /** Asks about one credential again; a refusal ends its streams. Settles without throwing. */
  private check(keyHash: string): Promise<void> {
    const watched = this.byCredential.get(keyHash);
    if (!watched) return Promise.resolve();
    if (watched.checking) {
      // Asked for while a check is under way (whose answer may predate what prompted this one).
      watched.again = true;
      return watched.checking;
    }
    watched.checking = this.refusalOf(watched.header).then((refusal) => {
      watched.checking = undefined;
      if (refusal) {
        this.byCredential.delete(keyHash);
        if (watched.streams.size === 0) return;
        this.options.logger.info({ tenantId: watched.tenantId, streams: watched.streams.size, reason: refusal.rawMessage }, "ending open streams of a credential no longer valid");
        this.revokedTotal.inc({ code: rpcCodeLabel(refusal.code) }, watched.streams.size);
        for (const end of watched.streams) end(refusal);
        return;
      }
      if (watched.streams.size === 0) this.byCredential.delete(keyHash);
      else if (watched.again) {
        watched.again = false;
        return this.check(keyHash);
      }
    });
    return watched.checking;
  }

  /** The credential's refusal by the tenant service, or undefined while it is valid or cannot be checked. */
  private async refusalOf(header: Headers): Promise<ConnectError | undefined> {
    try {
      await this.options.authenticator.authenticate(header);
      return undefined;
    } catch (err) {
      if (isKeyRefusal(err)) return err;
      this.warnUnchecked(ConnectError.from(err));
      return undefined;
    }
  }

  /** Logs that credentials could not be checked: once, then at most once a minute with a count. */
  private warnUnchecked(error: ConnectError): void {
    this.uncheckedSinceWarn++;
    const now = performance.now();
    if (this.lastWarnAt !== undefined && now - this.lastWarnAt < WARN_INTERVAL_MS) return;
    this.options.logger.warn(
      { reason: error.rawMessage, unchecked: this.uncheckedSinceWarn },
      "cannot check open streams' credentials right now; they stay open and are asked about again (logged at most once a minute)",
    );
    this.lastWarnAt = now;
    this.uncheckedSinceWarn = 0;
  }

  private forget(keyHash: string, end: EndStream): void {
    const watched = this.byCredential.get(keyHash);
    if (!watched) return;
    watched.streams.delete(end);
    // A credential being checked stays until the check is done (it then goes if nothing is left).
    if (watched.streams.size === 0 && !watched.checking) this.byCredential.delete(keyHash);
  }
}

/** The credential headers of `header` only, so the rest of the request is not kept. */
function credentialHeaderOf(header: Headers): Headers {
  const kept = new Headers();
  for (const name of ["authorization", "x-api-key"]) {
    const value = header.get(name);
    if (value !== null) kept.set(name, value);
  }
  return kept;
}
