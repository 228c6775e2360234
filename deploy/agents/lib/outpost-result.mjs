// Writes the Outpost result document for a CLI agent (the agent contract, services/executor/README.md):
//   node outpost-result.mjs <agent> <exit-code> <output-file>
// The result is {"agent","model","exit_code","summary"}: the summary is the CLI's final
// answer (its last output, bounded), so the dispatch carries it without reading the log.
import fs from "node:fs";
import path from "node:path";

const [agent, exitCode, outputFile] = process.argv.slice(2);
const resultPath = process.env.OUTPOST_RESULT_PATH ?? "/workspace/.outpost/result.json";
let output = "";
try {
  output = fs.readFileSync(outputFile, "utf8");
} catch {
  // no output: an empty summary
}
const MAX = 16 * 1024;
const summary = (output.length > MAX ? output.slice(-MAX) : output).trim();
fs.mkdirSync(path.dirname(resultPath), { recursive: true });
fs.writeFileSync(
  resultPath,
  JSON.stringify({ agent, model: process.env.OUTPOST_MODEL ?? "", exit_code: Number(exitCode), summary }) + "\n",
);
