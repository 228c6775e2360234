/**
 * The SDK in a real browser (SPEC C1, G1): `test/browser/sdk-page.ts`, bundled by Vite, runs in
 * Debian's Chromium (driven by playwright-core) on a page served from its own loopback origin,
 * and calls the real mesh's gateway cross-origin over Connect (JSON and binary) and gRPC-Web:
 * it creates a dispatch, follows its output live to the end, and reads errors with their
 * ErrorInfo details and the headers CORS exposes. A page from an origin the gateway does not
 * allow gets nothing. Chromium is required (`.ci/run` installs it): a machine without it fails
 * here, as it does without Docker; `OUTPOST_TEST_SKIP_BROWSER=1` skips this file on purpose.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium, type Browser, type Page } from "playwright-core";
import { build } from "vite";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { FollowedRun, PageCall, PageError, PageProtocol } from "../browser/sdk-page.ts";
import { startTestMesh, type TestMesh } from "./harness.ts";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const CHROMIUM = process.env.OUTPOST_TEST_CHROMIUM ?? "/usr/bin/chromium";
const skip = process.env.OUTPOST_TEST_SKIP_BROWSER === "1";

let t: TestMesh;
let tenant: Awaited<ReturnType<TestMesh["newTenant"]>>;
let pages: http.Server;
let browser: Browser;
/** The page's origin, which the gateway allows, and the same page at an origin it does not. */
let allowedUrl: string;
let refusedUrl: string;

/** Bundles the page's script for the browser (ES module, every dependency inside). */
async function bundlePage(): Promise<string> {
  const outDir = mkdtempSync(path.join(os.tmpdir(), "outpost-browser-"));
  try {
    await build({
      configFile: false,
      logLevel: "warn",
      root: ROOT,
      build: {
        outDir,
        emptyOutDir: true,
        minify: false,
        lib: { entry: path.join(ROOT, "test/browser/sdk-page.ts"), formats: ["es"], fileName: () => "sdk-page.js" },
      },
    });
    return readFileSync(path.join(outDir, "sdk-page.js"), "utf8");
  } finally {
    rmSync(outDir, { recursive: true, force: true });
  }
}

/** Serves the page and its script on a loopback port of its own: another origin than the gateway's. */
async function servePage(script: string): Promise<http.Server> {
  const html = `<!doctype html><html><head><meta charset="utf-8"><title>Outpost SDK</title><script type="module" src="/sdk-page.js"></script></head><body></body></html>`;
  const server = http.createServer((req, res) => {
    if (req.url === "/sdk-page.js") res.writeHead(200, { "content-type": "text/javascript" }).end(script);
    else if (req.url === "/") res.writeHead(200, { "content-type": "text/html" }).end(html);
    else res.writeHead(404).end();
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return server;
}

async function openPage(url: string): Promise<Page> {
  const page = await browser.newPage();
  await page.goto(url);
  await page.waitForFunction(() => "outpostPage" in globalThis, undefined, { timeout: 10_000 });
  return page;
}

function callFor(protocol: PageProtocol, apiKey = tenant.apiKey): PageCall {
  return { protocol, gatewayUrl: t.mesh.urls.gateway, apiKey };
}

interface PageApi {
  dispatchAndFollow(call: PageCall, task: string): Promise<FollowedRun>;
  failingCall(call: PageCall): Promise<PageError>;
}

const inPage = {
  dispatchAndFollow: (page: Page, call: PageCall, task: string) =>
    page.evaluate(([c, tk]) => (globalThis as unknown as { outpostPage: PageApi }).outpostPage.dispatchAndFollow(c, tk), [call, task] as const),
  failingCall: (page: Page, call: PageCall) => page.evaluate((c) => (globalThis as unknown as { outpostPage: PageApi }).outpostPage.failingCall(c), call),
};

beforeAll(async () => {
  if (skip) return;
  if (!existsSync(CHROMIUM)) throw new Error(`Chromium not found at ${CHROMIUM}: apt-get install chromium (or set OUTPOST_TEST_CHROMIUM; OUTPOST_TEST_SKIP_BROWSER=1 skips these tests)`);
  pages = await servePage(await bundlePage());
  const port = (pages.address() as AddressInfo).port;
  allowedUrl = `http://127.0.0.1:${port}/`;
  refusedUrl = `http://localhost:${port}/`;
  // Loopback is not allow-listed here, so the page's calls are rate limited and carry RateLimit-*.
  t = await startTestMesh({ serviceEnv: { gateway: { OUTPOST_CORS_ORIGINS: `http://127.0.0.1:${port}`, OUTPOST_RATE_LIMIT_ALLOW: "" } } });
  tenant = await t.newTenant("Browser");
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true });
});

afterAll(async () => {
  // Each goes whatever the others do: a browser that fails to close must not leave the mesh running.
  const closing = await Promise.allSettled([
    browser?.close(),
    pages && new Promise<void>((resolve) => pages.close(() => resolve())),
    t?.mesh.stop(),
  ]);
  for (const outcome of closing) if (outcome.status === "rejected") throw outcome.reason;
});

describe.skipIf(skip)("the SDK in Chromium, cross-origin (SPEC C1, G1)", () => {
  it.each(["connect-json", "connect-binary", "grpc-web"] as const)("over %s: creates a dispatch and follows its output live to the end", async (protocol) => {
    const page = await openPage(allowedUrl);
    try {
      const run = await inPage.dispatchAndFollow(page, callFor(protocol), "lines=3 stderr exit=0");
      expect(run.endState).toBe("SUCCEEDED");
      // Every chunk once, in order, both streams marked; the agent ran on arm64.
      expect(run.lines.map((line) => Number(line.split(" ")[0]))).toEqual(run.lines.map((_, i) => i + 1));
      expect(run.lastSeq).toBe(run.lines.length);
      // A header the page can read only because the gateway exposes it to its origin.
      expect(Number(run.rateLimitLimit)).toBeGreaterThan(0);
      expect(run.lines).toContain(`1 STDOUT outpost demo agent starting`);
      expect(run.lines.some((line) => / STDOUT aarch64$/.test(line))).toBe(true);
      expect(run.lines.some((line) => / STDERR /.test(line))).toBe(true);
      for (const n of [1, 2, 3]) expect(run.lines.some((line) => line.endsWith(` STDOUT line ${n}`))).toBe(true);
      // The dispatch the page created is the tenant's, as any SDK client sees it.
      const { dispatch } = await tenant.clients.dispatches.getDispatch({ dispatchId: run.dispatchId });
      expect(dispatch!.tenantId).toBe(tenant.tenantId);
    } finally {
      await page.close();
    }
  });

  it.each(["connect-json", "grpc-web"] as const)("over %s: an error reaches the page with its code and ErrorInfo reason", async (protocol) => {
    const page = await openPage(allowedUrl);
    try {
      const missing = await inPage.failingCall(page, callFor(protocol));
      expect(missing).toMatchObject({ code: "NotFound", reason: "DISPATCH_NOT_FOUND" });
      const unknownKey = await inPage.failingCall(page, callFor(protocol, `otp_${"0".repeat(64)}`));
      expect(unknownKey.code).toBe("Unauthenticated");
      expect(unknownKey.reason).toBe("API_KEY_UNKNOWN");
    } finally {
      await page.close();
    }
  });

  it("a page from an origin the gateway does not allow gets nothing from it", async () => {
    const page = await openPage(refusedUrl);
    try {
      const refused = await inPage.failingCall(page, callFor("connect-json"));
      // The browser withholds the answer (no Access-Control-Allow-Origin): the SDK sees a failed fetch, not the gateway's NOT_FOUND.
      expect(refused.code).not.toBe("NotFound");
      expect(refused.reason).toBeUndefined();
      expect(refused.message).toMatch(/fetch/i);
    } finally {
      await page.close();
    }
  });
});
