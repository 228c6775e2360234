#!/bin/sh
# Outpost agent contract -> OpenAI Codex CLI (@openai/codex) (services/executor/README.md, "Agent contract").
# In: OUTPOST_TASK (prompt), OUTPOST_MODEL, OUTPOST_WORKSPACE (working directory, the repository
# checkout when the dispatch named one), OUTPOST_RESULT_PATH; secrets arrive as environment
# variables of their own names (e.g. OPENAI_API_KEY). Out: the CLI's output as the live log, its final
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
# exec: non-interactive; --full-auto lets it edit the workspace without asking;
# --output-last-message keeps its final answer for the result.
outpost_run "$output" codex exec ${OUTPOST_MODEL:+--model "$OUTPOST_MODEL"} --full-auto --skip-git-repo-check \
  --cd "$workspace" --output-last-message "$tmp"/outpost-last-message.txt "$OUTPOST_TASK"
[ -s "$tmp"/outpost-last-message.txt ] && output="$tmp"/outpost-last-message.txt
node "${OUTPOST_AGENT_LIB:-/opt/outpost}"/outpost-result.mjs codex "$status" "$output"
exit "$status"
