/**
 * Internal TLS over real sockets (tls.ts): a service with a certificate serves gRPC, Connect and
 * health over TLS; under mutual TLS it answers RPCs only to callers whose certificate its CA
 * signed, while probes need none; renewed files are served to new connections; bad settings
 * stop start-up naming the setting. Certificates come from openssl (scripts/lib/tls-certs.ts).
 */
import { X509Certificate } from "node:crypto";
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import https from "node:https";
import os from "node:os";
import path from "node:path";
import tls from "node:tls";
import { Code, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import {
  certificatesOf,
  chainStillTrusted,
  ConfigError,
  errorInfoOf,
  internalClient,
  internalTlsOf,
  publicTlsOf,
  TLS_RELOAD_CHECK_MS,
  TlsFiles,
  type RunningServer,
} from "@outpost/platform";
import { Health, HealthCheckResponse_ServingStatus as Status } from "@outpost/proto/grpc/health/v1/health_pb.js";
import { LogService } from "@outpost/proto/outpost/telemetry/v1/log_service_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { makeTlsCerts, type TlsCertSet } from "../../../scripts/lib/tls-certs.ts";
import { keysOf } from "../../../test/support/signing.ts";
import { sleep, startTestServer } from "./helpers.ts";
import { errorOf } from "../../../test/support/rpc.ts";

const caller = { signingKeys: keysOf("dispatcher"), identity: { kind: "service", principal: "dispatcher" } as const };

/** The serial number of the certificate `url` presents on a new connection. */
function servedSerial(url: string, ca: string): Promise<string> {
  const { hostname, port } = new URL(url);
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ host: hostname, port: Number(port), ca: readPem(ca), ALPNProtocols: ["h2"] }, () => {
      resolve(socket.getPeerCertificate().serialNumber);
      socket.end();
    });
    socket.once("error", reject);
  });
}

function readPem(file: string): Buffer {
  return readFileSync(file);
}

describe("internal TLS", () => {
  let dir: string;
  let certs: TlsCertSet;
  let other: TlsCertSet;
  let server: RunningServer;
  let serverFiles: TlsFiles;
  const filesOf = (set: TlsCertSet, name: string, ca = set.ca) => new TlsFiles({ ...set.certs[name], ca });

  beforeAll(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), "outpost-tls-"));
    certs = makeTlsCerts(path.join(dir, "mesh"), ["telemetry", "dispatcher"]);
    other = makeTlsCerts(path.join(dir, "other"), ["dispatcher"], { caName: "Someone else's CA" });
    // The served pair lives in files of its own, which the renewal test overwrites.
    copyFileSync(certs.certs.telemetry!.cert, path.join(dir, "served.crt"));
    copyFileSync(certs.certs.telemetry!.key, path.join(dir, "served.key"));
    serverFiles = new TlsFiles({ cert: path.join(dir, "served.crt"), key: path.join(dir, "served.key"), ca: certs.ca });
    server = await startTestServer({ signingKeys: keysOf("telemetry"), tls: serverFiles });
  });
  afterAll(async () => {
    await server?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it("serves gRPC to a caller holding a certificate the CA signed, and says https in its URL", async () => {
    expect(server.url).toMatch(/^https:\/\/127\.0\.0\.1:\d+$/);
    const client = internalClient(LogService, { baseUrl: server.url, ...caller, tls: filesOf(certs, "dispatcher") });
    const res = await client.getLogs({ dispatchId: "over-tls" });
    expect(res.chunks.map((c) => c.text)).toEqual(["over-tls"]);
    // Server streaming too.
    for await (const msg of client.subscribeLogs({ dispatchId: "s" })) {
      expect(msg.chunks[0]?.text).toBe("first");
      break;
    }
  });

  it("serves Connect over HTTP/1.1 and HTTP/2 on the same port (ALPN)", async () => {
    const { cert, key } = certs.certs.dispatcher!;
    const nodeOptions = { ca: readPem(certs.ca), cert: readPem(cert), key: readPem(key) };
    for (const httpVersion of ["1.1", "2"] as const) {
      const transport = createConnectTransport({ baseUrl: server.url, httpVersion, nodeOptions, interceptors: [(next) => (req) => (caller.signingKeys.writeIdentity(req.header, caller.identity, req.service.typeName), next(req))] });
      const res = await createClient(LogService, transport).getLogs({ dispatchId: `connect-${httpVersion}` });
      expect(res.chunks.map((c) => c.text)).toEqual([`connect-${httpVersion}`]);
    }
  });

  it("refuses an RPC from a caller without a client certificate, or with one from another CA: UNAUTHENTICATED with ErrorInfo", async () => {
    const withoutCert = internalClient(LogService, { baseUrl: server.url, ...caller, tls: new TlsFiles({ ca: certs.ca }) });
    const noCert = await errorOf(withoutCert.getLogs({ dispatchId: "x" }));
    expect(noCert.code).toBe(Code.Unauthenticated);
    expect(errorInfoOf(noCert)?.reason).toBe("CLIENT_CERTIFICATE_REQUIRED");
    expect(noCert.rawMessage).toContain("OUTPOST_TLS_CA_FILE");

    // Trusts the right CA for the server, but presents a certificate another CA signed.
    const stranger = internalClient(LogService, { baseUrl: server.url, ...caller, tls: new TlsFiles({ ...other.certs.dispatcher, ca: certs.ca }) });
    const strangerErr = await errorOf(stranger.getLogs({ dispatchId: "x" }));
    expect(strangerErr.code).toBe(Code.Unauthenticated);
    expect(errorInfoOf(strangerErr)?.reason).toBe("CLIENT_CERTIFICATE_REQUIRED");
  });

  it("a caller that does not trust the server's certificate does not call it, and says why at once", async () => {
    const misled = internalClient(LogService, { baseUrl: server.url, ...caller, tls: filesOf(other, "dispatcher") });
    const err = await errorOf(misled.getLogs({ dispatchId: "x" }, { timeoutMs: 5000 }));
    expect(err.code).not.toBe(Code.DeadlineExceeded);
    expect(err.message).toMatch(/certificate/i);
  });

  it("a cleartext client gets no answer in the clear: its call fails at once", async () => {
    const cleartext = createClient(LogService, createGrpcTransport({ baseUrl: server.url.replace("https:", "http:") }));
    const err = await errorOf(cleartext.getLogs({ dispatchId: "x" }, { timeoutMs: 5000 }));
    expect(err.code).not.toBe(Code.DeadlineExceeded);
  });

  it("answers liveness, readiness and gRPC health to a probe without a client certificate", async () => {
    for (const probe of ["/healthz", "/readyz"]) {
      const status = await new Promise<number>((resolve, reject) => {
        https.get(`${server.url}${probe}`, { ca: readPem(certs.ca) }, (res) => {
          res.resume();
          resolve(res.statusCode ?? 0);
        }).once("error", reject);
      });
      expect(status, probe).toBe(200);
    }
    const health = createClient(Health, createGrpcTransport({ baseUrl: server.url, nodeOptions: { ca: readPem(certs.ca) } }));
    expect((await health.check({})).status).toBe(Status.SERVING);
  });

  it("serves a renewed certificate to new connections once its files change, and keeps serving the old one while the pair does not match", async () => {
    const before = await servedSerial(server.url, certs.ca);
    const renewed = certs.issue("telemetry", { file: "telemetry-renewed" });
    // Half renewed: the new certificate beside the old key does not load; the old pair is kept.
    copyFileSync(renewed.cert, path.join(dir, "served.crt"));
    await sleep(TLS_RELOAD_CHECK_MS + 1500);
    expect(await servedSerial(server.url, certs.ca)).toBe(before);
    copyFileSync(renewed.key, path.join(dir, "served.key"));
    // A client of the same process (which shares the files) opens a connection first and loads
    // the renewal: the listener must take it up all the same.
    expect(serverFiles.reloadIfChanged(Date.now(), { force: true })).toBe("reloaded");
    await sleep(TLS_RELOAD_CHECK_MS + 1500);
    const after = await servedSerial(server.url, certs.ca);
    expect(after).not.toBe(before);
    // Calls go on over the renewed certificate.
    const client = internalClient(LogService, { baseUrl: server.url, ...caller, tls: filesOf(certs, "dispatcher") });
    expect((await client.getLogs({ dispatchId: "renewed" })).chunks[0]?.text).toBe("renewed");
  }, 30_000);

  it("a client whose own certificate is renewed presents the new one on its next connection", async () => {
    const first = certs.issue("dispatcher", { file: "client" });
    const files = new TlsFiles({ ...first, ca: certs.ca });
    const firstSerial = new X509Certificate(readFileSync(first.cert)).serialNumber;
    // The serial of the client certificate each call came with, as the server saw it.
    const seen: string[] = [];
    const serverOptions = {
      signingKeys: keysOf("telemetry"),
      tls: new TlsFiles({ ...certs.certs.telemetry!, ca: certs.ca }),
      contextValues: (req: { socket: unknown }) => void seen.push((req.socket as tls.TLSSocket).getPeerCertificate().serialNumber),
    };
    let target = await startTestServer(serverOptions);
    const client = internalClient(LogService, { baseUrl: target.url, ...caller, tls: files });
    try {
      await client.getLogs({ dispatchId: "before" });
      // Renewed: the key first (which does not load with the old certificate), then the certificate.
      const renewed = certs.issue("dispatcher", { file: "client-renewed" });
      copyFileSync(renewed.key, first.key);
      expect(files.reloadIfChanged(Date.now(), { force: true })).toEqual({ problem: expect.stringMatching(/does not belong to the certificate/) });
      copyFileSync(renewed.cert, first.cert);
      expect(files.reloadIfChanged(Date.now(), { force: true })).toBe("reloaded");
      // The open connection keeps its handshake; the server going away makes the client connect anew.
      const port = target.port;
      await target.close();
      target = await startTestServer({ ...serverOptions, port });
      await client.getLogs({ dispatchId: "after" });
      expect(seen[0]?.toUpperCase()).toBe(firstSerial.toUpperCase());
      expect(seen.at(-1)?.toUpperCase()).toBe(new X509Certificate(readFileSync(renewed.cert)).serialNumber.toUpperCase());
    } finally {
      await target.close();
    }
  }, 30_000);

  it("negotiates HTTP/2 or HTTP/1.1 by ALPN", async () => {
    for (const protocol of ["h2", "http/1.1"]) {
      const { hostname, port } = new URL(server.url);
      const negotiated = await new Promise<string | false>((resolve, reject) => {
        const socket = tls.connect({ host: hostname, port: Number(port), ca: readPem(certs.ca), ALPNProtocols: [protocol] }, () => {
          resolve(socket.alpnProtocol ?? false);
          socket.end();
        });
        socket.once("error", reject);
      });
      expect(negotiated).toBe(protocol);
    }
  });

  it("refuses a caller without a certificate on every path: streams, Connect over HTTP/1.1, gRPC-Web", async () => {
    const sign: Interceptor = (next) => (req) => {
      caller.signingKeys.writeIdentity(req.header, caller.identity, req.service.typeName);
      return next(req);
    };
    const nodeOptions = { ca: readPem(certs.ca) };
    const transports = {
      "gRPC stream": createGrpcTransport({ baseUrl: server.url, nodeOptions, interceptors: [sign] }),
      "Connect HTTP/1.1": createConnectTransport({ baseUrl: server.url, httpVersion: "1.1", nodeOptions, interceptors: [sign] }),
      "gRPC-Web HTTP/2": createGrpcWebTransport({ baseUrl: server.url, httpVersion: "2", nodeOptions, interceptors: [sign] }),
    };
    for (const [name, transport] of Object.entries(transports)) {
      const client = createClient(LogService, transport);
      const err = await errorOf(
        name.includes("stream")
          ? (async () => {
              for await (const _ of client.subscribeLogs({ dispatchId: "s" })) break;
            })()
          : client.getLogs({ dispatchId: "x" }),
      );
      expect(err.code, name).toBe(Code.Unauthenticated);
      expect(errorInfoOf(err)?.reason, name).toBe("CLIENT_CERTIFICATE_REQUIRED");
    }
  });

  it("closes a connection that does not finish its handshake in time, however slowly its bytes trickle in, and one still in it at shutdown", async () => {
    const quick = await startTestServer({ signingKeys: keysOf("telemetry"), tls: serverFiles, firstBytesTimeoutMs: 400 });
    try {
      const { port } = new URL(quick.url);
      const closedAfter = (trickle: boolean) =>
        new Promise<number>((resolve) => {
          const started = performance.now();
          const socket = net.connect(Number(port), "127.0.0.1");
          // A TLS record header, one byte every 100 ms: each keeps an idle timer alive.
          const header = Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00]);
          let i = 0;
          const ticker = trickle ? setInterval(() => i < header.length && socket.write(header.subarray(i, ++i)), 100) : undefined;
          socket.on("error", () => {});
          socket.once("close", () => {
            clearInterval(ticker);
            resolve(performance.now() - started);
          });
        });
      for (const trickle of [false, true]) {
        const ms = await closedAfter(trickle);
        expect(ms, trickle ? "trickling" : "silent").toBeGreaterThanOrEqual(350);
        expect(ms, trickle ? "trickling" : "silent").toBeLessThan(3000);
      }
    } finally {
      await quick.close();
    }
    // Shutdown closes a connection still in its handshake rather than wait for its deadline.
    const patient = await startTestServer({ signingKeys: keysOf("telemetry"), tls: serverFiles, firstBytesTimeoutMs: 60_000 });
    const socket = net.connect(Number(new URL(patient.url).port), "127.0.0.1");
    socket.on("error", () => {});
    await new Promise((resolve) => socket.once("connect", resolve));
    await sleep(100);
    const closed = new Promise((resolve) => socket.once("close", resolve));
    const started = performance.now();
    await patient.close();
    await closed;
    expect(performance.now() - started).toBeLessThan(5000);
  }, 30_000);

  it("closes the open connections of a peer whose CA is taken out of the bundle: its next call needs a new handshake, which fails", async () => {
    // The server trusts both CAs at first; the client's certificate is the other CA's.
    const bundle = path.join(dir, "bundle.crt");
    writeFileSync(bundle, Buffer.concat([readFileSync(certs.ca), readFileSync(other.ca)]));
    const bundled = await startTestServer({ signingKeys: keysOf("telemetry"), tls: new TlsFiles({ ...certs.certs.telemetry!, ca: bundle }) });
    try {
      const client = internalClient(LogService, { baseUrl: bundled.url, ...caller, tls: new TlsFiles({ ...other.certs.dispatcher, ca: certs.ca }) });
      expect((await client.getLogs({ dispatchId: "while-trusted" })).chunks[0]?.text).toBe("while-trusted");
      writeFileSync(bundle, readFileSync(certs.ca));
      await sleep(TLS_RELOAD_CHECK_MS + 1500);
      const err = await errorOf(client.getLogs({ dispatchId: "after" }));
      expect(err.code).toBe(Code.Unauthenticated);
      expect(errorInfoOf(err)?.reason).toBe("CLIENT_CERTIFICATE_REQUIRED");
    } finally {
      await bundled.close();
    }
  }, 30_000);

  it("judges a peer's chain as a handshake would: issued by a CA of the bundle, every link valid now", () => {
    const x509 = (file: string) => new X509Certificate(readFileSync(file));
    const leaf = x509(certs.certs.dispatcher!.cert);
    expect(chainStillTrusted([leaf], certificatesOf(readFileSync(certs.ca)))).toBe(true);
    expect(chainStillTrusted([leaf], certificatesOf(Buffer.concat([readFileSync(other.ca), readFileSync(certs.ca)])))).toBe(true);
    expect(chainStillTrusted([leaf], certificatesOf(readFileSync(other.ca)))).toBe(false);
    expect(chainStillTrusted([], certificatesOf(readFileSync(certs.ca)))).toBe(false);
    // 825 days on, the leaf has expired.
    expect(chainStillTrusted([leaf], certificatesOf(readFileSync(certs.ca)), Date.now() + 900 * 86_400_000)).toBe(false);
  });

  it("will not ask for client certificates it would not check: mutual TLS needs signing keys", async () => {
    await expect(startTestServer({ tls: serverFiles })).rejects.toThrow(/mutual TLS needs signing keys/);
  });
});

describe("TLS settings", () => {
  let dir: string;
  let certs: TlsCertSet;
  beforeAll(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), "outpost-tls-settings-"));
    certs = makeTlsCerts(dir, ["tenant", "gateway"]);
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const configError = (fn: () => unknown): string => {
    try {
      fn();
    } catch (err) {
      expect(err).toBeInstanceOf(ConfigError);
      return (err as Error).message;
    }
    throw new Error("expected a ConfigError");
  };

  it("is off when nothing is set", () => {
    expect(internalTlsOf({}, { OUTPOST_TENANT_URL: "http://127.0.0.1:1" })).toBeUndefined();
    expect(publicTlsOf({})).toBeUndefined();
  });

  it("names the setting that is wrong", () => {
    const { cert, key } = certs.certs.tenant!;
    expect(configError(() => internalTlsOf({ OUTPOST_TLS_CERT_FILE: cert }))).toMatch(/^OUTPOST_TLS_KEY_FILE: is required when OUTPOST_TLS_CERT_FILE is set/);
    expect(configError(() => internalTlsOf({ OUTPOST_TLS_KEY_FILE: key }))).toMatch(/^OUTPOST_TLS_CERT_FILE: is required when OUTPOST_TLS_KEY_FILE is set/);
    expect(configError(() => internalTlsOf({ OUTPOST_TLS_CA_FILE: certs.ca }))).toMatch(/^OUTPOST_TLS_CERT_FILE: is required when OUTPOST_TLS_CA_FILE is set/);
    expect(configError(() => internalTlsOf({ OUTPOST_TLS_CERT_FILE: path.join(dir, "nope.crt"), OUTPOST_TLS_KEY_FILE: key }))).toMatch(/^OUTPOST_TLS_CERT_FILE: cannot read .*nope\.crt \(ENOENT\)/);
    expect(configError(() => internalTlsOf({ OUTPOST_TLS_CERT_FILE: key, OUTPOST_TLS_KEY_FILE: key }))).toMatch(/^OUTPOST_TLS_CERT_FILE: .* is not a PEM certificate/);
    expect(configError(() => internalTlsOf({ OUTPOST_TLS_CERT_FILE: cert, OUTPOST_TLS_KEY_FILE: cert }))).toMatch(/^OUTPOST_TLS_KEY_FILE: .* is not a PEM private key/);
    expect(configError(() => internalTlsOf({ OUTPOST_TLS_CERT_FILE: cert, OUTPOST_TLS_KEY_FILE: certs.certs.gateway!.key }))).toMatch(/^OUTPOST_TLS_KEY_FILE: the key in .* does not belong to the certificate/);
    const garbage = path.join(dir, "garbage.pem");
    writeFileSync(garbage, "not a certificate\n");
    expect(configError(() => internalTlsOf({ OUTPOST_TLS_CERT_FILE: cert, OUTPOST_TLS_KEY_FILE: key, OUTPOST_TLS_CA_FILE: garbage }))).toMatch(/^OUTPOST_TLS_CA_FILE: .* is not a PEM certificate/);
    expect(configError(() => publicTlsOf({ OUTPOST_GATEWAY_TLS_CERT_FILE: cert }))).toMatch(/^OUTPOST_GATEWAY_TLS_KEY_FILE: is required/);
  });

  it("under mutual TLS every internal URL must be https://", () => {
    const { cert, key } = certs.certs.tenant!;
    const settings = { OUTPOST_TLS_CERT_FILE: cert, OUTPOST_TLS_KEY_FILE: key, OUTPOST_TLS_CA_FILE: certs.ca };
    expect(configError(() => internalTlsOf(settings, { OUTPOST_DISPATCHER_URL: "http://127.0.0.1:7102" }))).toMatch(
      /^OUTPOST_DISPATCHER_URL: must be an https:\/\/ URL when OUTPOST_TLS_CA_FILE is set/,
    );
    const files = internalTlsOf(settings, { OUTPOST_DISPATCHER_URL: "https://dispatcher:7102", OUTPOST_TELEMETRY_URL: undefined });
    expect(files?.mutual).toBe(true);
  });

  it("refuses a certificate that has expired", () => {
    const oneDay = certs.issue("tenant", { file: "one-day", days: 1 });
    expect(new TlsFiles(oneDay).mutual).toBe(false);
    // Two days on, the one-day certificate has expired.
    expect(configError(() => new TlsFiles(oneDay, undefined, Date.now() + 2 * 86_400_000))).toMatch(/^OUTPOST_TLS_CERT_FILE: the certificate in .*one-day\.crt expired on 20/);
  });
});
