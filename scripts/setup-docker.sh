#!/usr/bin/env bash
# Brings up a Docker engine that can run linux/arm64 containers (SPEC E1) on a Debian 12 host,
# from nothing: installs the engine and qemu emulation when missing, starts dockerd when the
# engine does not answer, and registers the aarch64 binfmt handler. Idempotent and
# non-interactive; runs as root (CI and development machines).
set -euo pipefail

log() { printf 'setup-docker: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"

BINFMT_DIR=/proc/sys/fs/binfmt_misc
DOCKERD_LOG=/var/log/dockerd.log
WAIT_SECONDS=60

have_dockerd() { command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ]; }
have_qemu() { [ -x /usr/bin/qemu-aarch64-static ] || [ -x /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] \
  || command -v qemu-aarch64-static >/dev/null 2>&1; }
have_binfmt_tools() { command -v update-binfmts >/dev/null 2>&1; }
engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

# 1. Packages: the engine, qemu user emulation and the binfmt registration tool; also when the
#    aarch64 handler is not registered (installing qemu-user-static registers it).
if [ ! -e "$BINFMT_DIR/register" ]; then
  log "mounting binfmt_misc"
  mount -t binfmt_misc binfmt_misc "$BINFMT_DIR"
fi
if ! have_dockerd || ! have_qemu || ! have_binfmt_tools || ! command -v docker >/dev/null 2>&1 \
  || [ ! -e "$BINFMT_DIR/qemu-aarch64" ]; then
  log "installing docker.io qemu-user-static binfmt-support"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io qemu-user-static binfmt-support
else
  log "docker engine and qemu already installed"
fi

# 2. binfmt_misc: register qemu-aarch64 so the kernel runs arm64 binaries through qemu.
if [ ! -e "$BINFMT_DIR/qemu-aarch64" ]; then
  log "enabling qemu-aarch64 binfmt handler"
  update-binfmts --enable qemu-aarch64 || true
fi
if [ ! -e "$BINFMT_DIR/qemu-aarch64" ] && have_binfmt_tools; then
  # Some hosts need the qemu-user-static format imported first.
  update-binfmts --import qemu-aarch64 >/dev/null 2>&1 || true
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
fi
[ -e "$BINFMT_DIR/qemu-aarch64" ] || die "qemu-aarch64 binfmt handler is not registered ($BINFMT_DIR/qemu-aarch64 missing)"
grep -q '^enabled' "$BINFMT_DIR/qemu-aarch64" || die "qemu-aarch64 binfmt handler is registered but disabled"
log "qemu-aarch64 binfmt handler enabled"

# 3. The engine: start dockerd when nothing answers, then wait for it.
if engine_answers; then
  log "docker engine already answering"
else
  DOCKERD=$(command -v dockerd || echo /usr/sbin/dockerd)
  log "starting $DOCKERD (log: $DOCKERD_LOG)"
  nohup "$DOCKERD" >>"$DOCKERD_LOG" 2>&1 </dev/null &
  for _ in $(seq 1 "$WAIT_SECONDS"); do
    if engine_answers; then break; fi
    sleep 1
  done
  engine_answers || { tail -n 20 "$DOCKERD_LOG" >&2 || true; die "docker engine did not answer within ${WAIT_SECONDS}s"; }
  log "docker engine is up"
fi

docker version --format 'engine {{.Server.Version}} api {{.Server.APIVersion}}' >&2 || true
log "done"
