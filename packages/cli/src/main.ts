#!/usr/bin/env node
import { runCli } from "./cli.ts";

const code = await runCli(process.argv.slice(2), { out: process.stdout, err: process.stderr, env: process.env, stdin: process.stdin });
// Exit once output is flushed rather than waiting for idle keep-alive connections to time out.
process.stdout.write("", () => process.exit(code));
