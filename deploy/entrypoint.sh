#!/bin/sh
# Chooses the service by its first argument; everything else comes from the environment.
set -eu
service="${1:-}"
case "$service" in
  gateway) entry=gateway/src/main.ts ;;
  tenant|dispatcher|executor|telemetry) entry="services/$service/src/main.ts" ;;
  *)
    echo "usage: <image> gateway|tenant|dispatcher|executor|telemetry" >&2
    exit 64
    ;;
esac
cd /app
exec node --disable-warning=ExperimentalWarning "$entry"
