#!/usr/bin/env node
import { runCli } from "./cli.ts";

// A reader that went away (`outpost logs D1 | head -2`) makes writes fail with EPIPE. While
// runCli runs it handles that itself (stops and returns 0); a write that fails after it returned
// ends the process with its code instead of an unhandled 'error' event and a stack trace.
const finished: { code?: number } = {};
const afterOutputError = () => {
  if (finished.code !== undefined) process.exit(finished.code);
};
process.stdout.on("error", afterOutputError);
process.stderr.on("error", afterOutputError);

const code = await runCli(process.argv.slice(2), {
  out: process.stdout,
  err: process.stderr,
  env: process.env,
  stdin: process.stdin,
  // While a run is followed, Ctrl-C stops following and says how to resume; otherwise it ends the process as usual.
  onInterrupt: (handler) => {
    process.on("SIGINT", handler);
    return () => process.off("SIGINT", handler);
  },
});
finished.code = code;
// Exit once output is flushed rather than waiting for idle keep-alive connections to time out.
process.stdout.write("", () => process.exit(code));
