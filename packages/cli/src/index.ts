export { runCli, type CliIo } from "./cli.ts";
export { outpostClients, type OutpostClients } from "./client.ts";
export { followLogs, writeChunk } from "./follow.ts";
export * from "./credentials.ts";
