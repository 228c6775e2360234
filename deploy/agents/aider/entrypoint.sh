#!/bin/sh
# Outpost agent contract -> Aider (aider-chat) (services/executor/README.md, "Agent contract").
# In: OUTPOST_TASK (prompt), OUTPOST_MODEL, OUTPOST_WORKSPACE (working directory, the repository
# checkout when the dispatch named one), OUTPOST_RESULT_PATH; secrets arrive as environment
# variables of their own names (e.g. OPENAI_API_KEY, DEEPSEEK_API_KEY). Out: the CLI's output as the live log, its final
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
# --message: one instruction, then exit; --yes-always: no prompts; plain output for the log.
outpost_run "$output" aider ${OUTPOST_MODEL:+--model "$OUTPOST_MODEL"} --message "$OUTPOST_TASK" --yes-always \
  --no-pretty --no-stream --no-check-update --no-show-model-warnings --no-analytics
python3 "${OUTPOST_AGENT_LIB:-/opt/outpost}"/outpost_result.py aider "$status" "$output"
exit "$status"
