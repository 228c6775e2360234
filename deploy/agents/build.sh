#!/usr/bin/env bash
# Builds (and with --push, pushes) the Outpost agent images for linux/arm64 and linux/amd64,
# named as the dispatcher's built-in agents name them (services/dispatcher/src/core/agents.ts):
#   <repository>-<agent>:<tag>, by default ghcr.io/outpost-dev/agent-claude:latest and so on.
#   deploy/agents/build.sh [--repository R] [--tag T] [--push] [agent...]
# e.g. deploy/agents/build.sh --push claude codex          # ghcr.io/outpost-dev/agent-{claude,codex}:latest
#      deploy/agents/build.sh --repository registry.example.com/outpost/agent --tag 2026.11 --push
# The built-in agents use the default repository and tag; images under another name must be
# registered as agents of their own (or mirrored to the default names).
# Needs docker buildx with a builder that can target both platforms (QEMU binfmt or native nodes)
# and network access to Docker Hub, npm and PyPI: it does not run on the offline CI machines.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repository="${OUTPOST_AGENT_REPOSITORY:-ghcr.io/outpost-dev/agent}"
tag="${OUTPOST_AGENT_TAG:-latest}"
push=(--load)
agents=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --push) push=(--push) ;;
    --repository) repository="${2:?--repository needs a value, e.g. ghcr.io/outpost-dev/agent}"; shift ;;
    --repository=*) repository="${1#--repository=}" ;;
    --tag) tag="${2:?--tag needs a value}"; shift ;;
    --tag=*) tag="${1#--tag=}" ;;
    -*) echo "usage: $0 [--repository R] [--tag T] [--push] [claude|codex|gemini|aider|grok...]" >&2; exit 64 ;;
    *)
      [ -f "$HERE/$1/Dockerfile" ] || { echo "no agent $1 (deploy/agents/$1/Dockerfile)" >&2; exit 64; }
      agents+=("$1")
      ;;
  esac
  shift
done
[ "${#agents[@]}" -gt 0 ] || agents=(claude codex gemini aider grok)
platforms=linux/arm64,linux/amd64
# --load can only hold one platform in the local engine.
[ "${push[0]}" = --push ] || platforms=linux/arm64
for agent in "${agents[@]}"; do
  docker buildx build --platform "$platforms" -f "$HERE/$agent/Dockerfile" \
    -t "$repository-$agent:$tag" "${push[@]}" "$HERE"
done
