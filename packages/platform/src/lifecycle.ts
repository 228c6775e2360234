/**
 * Process lifecycle for a service's main.ts: configuration errors stop the process with a
 * message naming the setting (exit 78, EX_CONFIG); SIGTERM and SIGINT drain and exit 0.
 */
import { ConfigError } from "./config.ts";
import { createLogger, type Logger } from "./logger.ts";

export interface Stoppable {
  close(): Promise<void>;
}

export async function runProcess(name: string, start: (logger: Logger) => Promise<Stoppable>): Promise<void> {
  let logger: Logger;
  try {
    logger = createLogger(name);
  } catch (err) {
    // No logger yet: the level itself is the bad setting.
    if (!(err instanceof ConfigError)) throw err;
    process.stderr.write(`${name}: ${err.message}\n`);
    process.exit(78);
  }
  let service: Stoppable;
  try {
    service = await start(logger);
  } catch (err) {
    if (err instanceof ConfigError) {
      logger.fatal(err.message);
      process.stderr.write(`${name}: ${err.message}\n`);
      process.exit(78);
    }
    logger.fatal({ err }, "failed to start");
    process.exit(1);
  }
  let stopping = false;
  const stop = (signal: string) => {
    if (stopping) return;
    stopping = true;
    logger.info({ signal }, "stopping");
    // Held until the close is done: the drain waits on unref'd timers (so they never keep a
    // healthy process up), and once the last connection is gone nothing else may be left to
    // keep the event loop alive — the process would end with its close half done (stores not
    // closed, "closed" never logged).
    const keepAlive = setInterval(() => {}, 1000);
    service.close().finally(() => clearInterval(keepAlive)).then(
      () => process.exit(0),
      (err: unknown) => {
        logger.error({ err }, "shutdown failed");
        process.exit(1);
      },
    );
  };
  process.on("SIGTERM", () => stop("SIGTERM"));
  process.on("SIGINT", () => stop("SIGINT"));
}
