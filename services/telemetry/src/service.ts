/** Wires the telemetry service: store, live feed (Redis or in-process), core, metrics, retention sweep, server. */
import { connectRedis, counter, gauge, internalTlsOf, SigningKeys, startServer, type Logger, type Redis } from "@outpost/platform";
import { RedisLiveFeed } from "./adapters/redis-live-feed.ts";
import type { TelemetryConfig } from "./config.ts";
import { InProcessLiveFeed, type LiveFeed } from "./core/live-feed.ts";
import { RetentionSweeper } from "./core/retention.ts";
import { TelemetryCore, type TelemetryObserver } from "./core/telemetry-core.ts";
import { telemetryRoutes } from "./routes.ts";
import { MongoTelemetryStore } from "./store/mongo-store.ts";
import { SqliteTelemetryStore } from "./store/sqlite-store.ts";
import type { TelemetryStore } from "./store/store.ts";

export interface RunningTelemetry {
  url: string;
  port: number;
  close(): Promise<void>;
}

/** Optional replacements (tests, and later MongoDB / Redis adapters). */
export interface TelemetryDeps {
  store?: TelemetryStore;
  feed?: LiveFeed;
}

const STREAM_LABEL: Record<number, string> = { 1: "stdout", 2: "stderr" };

/** Prometheus metrics of the telemetry domain (SPEC L4): lines and bytes ingested, subscribers, overflows. */
function telemetryMetrics(): TelemetryObserver {
  const lines = counter("outpost_log_lines_ingested_total", "Log lines stored by ingest (resends excluded), by stream.", ["stream"]);
  const bytes = counter("outpost_log_bytes_ingested_total", "UTF-8 bytes of log lines stored by ingest, by stream.", ["stream"]);
  const subscribers = gauge("outpost_log_subscribers", "Open SubscribeLogs streams on this replica.");
  const overflows = counter(
    "outpost_log_subscriber_overflows_total",
    "Times a slow subscriber's live buffer was dropped and it continued from storage.",
  );
  return {
    ingested(chunks) {
      for (const chunk of chunks) {
        const stream = STREAM_LABEL[chunk.stream] ?? "other";
        lines.inc({ stream });
        bytes.inc({ stream }, Buffer.byteLength(chunk.text));
      }
    },
    subscriptionOpened: () => subscribers.inc(),
    subscriptionClosed: () => subscribers.dec(),
    subscriberOverflowed: () => overflows.inc(),
  };
}

export async function startTelemetry(config: TelemetryConfig, logger: Logger, deps: TelemetryDeps = {}): Promise<RunningTelemetry> {
  // Read before any store is opened: a bad file stops start-up at once.
  const tls = internalTlsOf(config);
  // MongoDB when configured (several replicas in production); the embedded SQLite file otherwise.
  const defaultRetentionMs = config.OUTPOST_TELEMETRY_DEFAULT_RETENTION_MS;
  const store =
    deps.store ??
    (config.OUTPOST_MONGO_URL
      ? await MongoTelemetryStore.connect(config.OUTPOST_MONGO_URL, { defaultRetentionMs })
      : new SqliteTelemetryStore(config.OUTPOST_DATA_DIR, { defaultRetentionMs }));
  let redis: Redis | undefined;
  let feed = deps.feed;
  if (!feed && config.OUTPOST_REDIS_URL) {
    redis = connectRedis(config.OUTPOST_REDIS_URL, logger);
    feed = new RedisLiveFeed(redis, logger);
  }
  feed ??= new InProcessLiveFeed();
  const core = new TelemetryCore(store, feed, {
    subscriberBufferChunks: config.OUTPOST_TELEMETRY_SUBSCRIBER_BUFFER,
    endGraceMs: config.OUTPOST_TELEMETRY_END_GRACE_MS,
    idlePollMs: config.OUTPOST_TELEMETRY_IDLE_POLL_MS,
    maxSubscriptionsPerTenant: config.OUTPOST_TELEMETRY_MAX_SUBSCRIPTIONS_PER_TENANT,
    observer: telemetryMetrics(),
  });
  // MongoDB's TTL monitor deletes expired runs and chunks itself (TTL indexes on expireAt).
  const sweeper = store instanceof MongoTelemetryStore ? undefined : new RetentionSweeper(store, logger, config.OUTPOST_TELEMETRY_RETENTION_SWEEP_MS);
  const signingKeys = SigningKeys.fromSettings("telemetry", config.OUTPOST_SIGNING_KEY, config.OUTPOST_TRUSTED_SIGNERS);
  let server;
  try {
    server = await startServer({
      name: "telemetry",
      host: config.OUTPOST_TELEMETRY_HOST,
      port: config.OUTPOST_TELEMETRY_PORT,
      metricsPort: config.OUTPOST_TELEMETRY_METRICS_PORT,
      logger,
      routes: telemetryRoutes(core, signingKeys),
      signingKeys,
      tls,
    });
  } catch (err) {
    await feed.close();
    redis?.disconnect();
    await store.close();
    throw err;
  }
  sweeper?.start();
  const running = server;
  return {
    url: running.url,
    port: running.port,
    async close() {
      await running.close();
      await sweeper?.stop();
      await feed.close();
      redis?.disconnect();
      await store.close();
    },
  };
}
