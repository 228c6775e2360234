#!/bin/sh
# Outpost agent contract -> Claude Code (@anthropic-ai/claude-code) (services/executor/README.md, "Agent contract").
# In: OUTPOST_TASK (prompt), OUTPOST_MODEL, OUTPOST_WORKSPACE (working directory, the repository
# checkout when the dispatch named one), OUTPOST_RESULT_PATH; secrets arrive as environment
# variables of their own names (e.g. ANTHROPIC_API_KEY). Out: the CLI's output as the live log, its final
# answer in the result file, its exit code as the run's.
set -eu
: "${OUTPOST_TASK:?OUTPOST_TASK is required}"
workspace="${OUTPOST_WORKSPACE:-/workspace}"
export OUTPOST_RESULT_PATH="${OUTPOST_RESULT_PATH:-$workspace/.outpost/result.json}"
# The root filesystem is read-only: the CLI keeps its config and caches in the /tmp tmpfs.
tmp="${TMPDIR:-/tmp}"
export HOME="$tmp/home"
mkdir -p "$HOME"
cd "$workspace"
output="$tmp"/outpost-agent-output.txt
# Streams the CLI's output as the live log, copies it to $output, passes a stop (SIGTERM) on to
# the CLI and sets $status to its exit status (lib/outpost-run.sh).
. "${OUTPOST_AGENT_LIB:-/opt/outpost}"/outpost-run.sh
# -p: non-interactive; the sandbox is the container, so no permission prompts.
outpost_run "$output" claude -p "$OUTPOST_TASK" ${OUTPOST_MODEL:+--model "$OUTPOST_MODEL"} \
  --output-format text --dangerously-skip-permissions --add-dir "$workspace"
node "${OUTPOST_AGENT_LIB:-/opt/outpost}"/outpost-result.mjs claude "$status" "$output"
exit "$status"
