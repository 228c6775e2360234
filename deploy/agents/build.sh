#!/usr/bin/env bash
# Builds (and with --push, pushes) the Outpost agent images for linux/arm64 and linux/amd64.
#   deploy/agents/build.sh <registry-prefix> [tag] [--push] [agent...]
# e.g. deploy/agents/build.sh ghcr.io/acme/outpost 2026.11 --push claude codex
# Needs docker buildx with a builder that can target both platforms (QEMU binfmt or native nodes)
# and network access to Docker Hub, npm and PyPI: it does not run on the offline CI machines.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix="${1:?registry prefix, e.g. ghcr.io/acme/outpost}"
tag="${2:-latest}"
shift $(( $# >= 2 ? 2 : $# ))
push=(--load)
agents=()
for arg in "$@"; do
  case "$arg" in
    --push) push=(--push) ;;
    *) agents+=("$arg") ;;
  esac
done
[ "${#agents[@]}" -gt 0 ] || agents=(claude codex gemini aider grok)
platforms=linux/arm64,linux/amd64
# --load can only hold one platform in the local engine.
[ "${push[0]}" = --push ] || platforms=linux/arm64
for agent in "${agents[@]}"; do
  docker buildx build --platform "$platforms" -f "$HERE/$agent/Dockerfile" \
    -t "$prefix/$agent-agent:$tag" "${push[@]}" "$HERE"
done
