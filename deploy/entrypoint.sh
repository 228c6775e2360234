#!/bin/sh
# Chooses the service by its first argument; everything else comes from the environment.
set -eu
service="${1:-}"
case "$service" in
  gateway) entry=gateway/src/main.ts ;;
  tenant|dispatcher|executor|telemetry) entry="services/$service/src/main.ts" ;;
  # Prints a fresh set of signing keys (one per role) and exits: `docker run --rm <image> signing-keys`.
  signing-keys) entry=scripts/signing-keys.ts ;;
  *)
    echo "usage: <image> gateway|tenant|dispatcher|executor|telemetry|signing-keys" >&2
    exit 64
    ;;
esac
shift
cd /app
exec node --disable-warning=ExperimentalWarning "$entry" "$@"
