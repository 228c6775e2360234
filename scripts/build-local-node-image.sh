#!/usr/bin/env bash
# Makes a local stand-in for the official node:24-bookworm-slim image, from Debian packages and
# npm only (no Docker Hub), so deploy/Dockerfile can be built where no base image can be pulled:
#   bash scripts/build-local-node-image.sh   # prints the image name: outpost-local/node:24-bookworm-slim
#   DOCKER_BUILDKIT=1 docker build --build-arg NODE_IMAGE=outpost-local/node:24-bookworm-slim -f deploy/Dockerfile .
# For the other architecture (arm64 on an amd64 engine, run through qemu binfmt emulation):
#   OUTPOST_LOCAL_ARCH=arm64 bash scripts/build-local-node-image.sh   # outpost-local/node:24-bookworm-slim-arm64
#   DOCKER_BUILDKIT=1 docker build --platform linux/arm64 --build-arg NODE_IMAGE=outpost-local/node:24-bookworm-slim-arm64 \
#     --build-arg BUILDER_NODE_IMAGE=outpost-local/node:24-bookworm-slim -f deploy/Dockerfile .
# (one local tag holds one architecture in this engine's image store, hence the tag suffix; the
# builder stage runs on the engine's own architecture, so it takes the engine's stand-in).
#
# 1. outpost-local/debian:bookworm[-<arch>]: `debootstrap --variant=minbase bookworm` from the
#    Debian mirror (for another architecture: `--foreign`, then the second stage in a chroot,
#    its binaries run by qemu), trimmed like debian:bookworm-slim, then made an image
#    `FROM scratch` with `ADD rootfs.tar` and `--platform linux/<arch>` (made once, kept):
#    `docker import` would label it with the engine's architecture whatever the rootfs holds.
# 2. outpost-local/node:24-bookworm-slim[-<arch>], FROM that, laid out like the official image: the Node
#    binary at /usr/local/bin/node (the version the repo's `node` devDependency pins, from the
#    npm package node-linux-<arch>), npm at /usr/local/lib/node_modules/npm (the npm package of
#    the version that Node release bundles, read from its changelog), a `node` user and group
#    with uid/gid 1000 and home /home/node, ENV NODE_VERSION, CMD ["node"]. Like the official
#    slim image it has no ca-certificates package: Node and npm use Node's built-in CA store.
#    One difference, only where the build host needs it: when NODE_EXTRA_CA_CERTS (or the host
#    npm's `cafile`) names a CA bundle on this host (a TLS-intercepting egress proxy), that bundle
#    is copied in and set as npm's `cafile` in npm's global config (/usr/local/etc/npmrc), so npm
#    inside a build reaches the registry as the host's npm does; nothing else in the image uses it.
#    Not mirrored (the Outpost image needs none): yarn, corepack, docker-entrypoint.sh.
#
# Idempotent: skips in well under a second when the image exists with the same inputs (label
# dev.outpost.local-base-hash). Non-interactive (no stdin, CI=true); runs as root when it has to
# install debootstrap or bootstrap Debian. Both images are checked to be of the architecture
# asked for, and the Node image to run (`node --version`, `dpkg --print-architecture`). Measured
# cold on 2 amd64 cores with debootstrap installed: amd64 46 s; arm64 103-111 s, the difference
# being debootstrap's second stage under emulation.
# Settings: OUTPOST_LOCAL_ARCH (amd64 or arm64; default the engine's own), OUTPOST_LOCAL_NODE_IMAGE,
# OUTPOST_LOCAL_DEBIAN_IMAGE, OUTPOST_DEBIAN_MIRROR, OUTPOST_LOCAL_NODE_VERSION (default:
# package-lock's node), OUTPOST_LOCAL_NPM_VERSION, OUTPOST_LOCAL_EXTRA_CA (a CA bundle file; empty
# disables it).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MIRROR="${OUTPOST_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Unset: NODE_EXTRA_CA_CERTS, else the cafile the host's npm is configured with.
if [ -n "${OUTPOST_LOCAL_EXTRA_CA+set}" ]; then EXTRA_CA="$OUTPOST_LOCAL_EXTRA_CA"
elif [ -n "${NODE_EXTRA_CA_CERTS:-}" ]; then EXTRA_CA="$NODE_EXTRA_CA_CERTS"
else EXTRA_CA=$(npm config get cafile 2>/dev/null || true); case "$EXTRA_CA" in /*) ;; *) EXTRA_CA="" ;; esac
fi
HASH_LABEL="dev.outpost.local-base-hash"

log() { printf 'local-node-image: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

timeout 20 docker info >/dev/null 2>&1 || die "the Docker engine does not answer (run: bash scripts/setup-docker.sh)"

# One build at a time on this machine; a second caller waits, then finds the image made.
exec 9>"${TMPDIR:-/tmp}/outpost-local-node-image.lock"
flock 9

# --- Inputs -------------------------------------------------------------------------------
node_version="${OUTPOST_LOCAL_NODE_VERSION:-$(sed -n '/"node_modules\/node": {/,/}/s/.*"version": "\([^"]*\)".*/\1/p' "$REPO/package-lock.json" | head -n 1)}"
[ -n "$node_version" ] || die "no node version in package-lock.json (packages[\"node_modules/node\"])"
case "$node_version" in 24.*) ;; *) die "node $node_version is not Node 24 (the image stands in for node:24-bookworm-slim)" ;; esac

debian_arch() {
  case "$1" in
    x86_64 | amd64) echo amd64 ;;
    aarch64 | arm64) echo arm64 ;;
    *) return 1 ;;
  esac
}
engine_arch=$(debian_arch "$(docker info --format '{{.Architecture}}')") \
  || die "unsupported engine architecture $(docker info --format '{{.Architecture}}')"
deb_arch=$(debian_arch "${OUTPOST_LOCAL_ARCH:-$engine_arch}") \
  || die "unsupported OUTPOST_LOCAL_ARCH=$OUTPOST_LOCAL_ARCH (amd64 or arm64)"
case "$deb_arch" in amd64) node_arch=x64 ;; arm64) node_arch=arm64 ;; esac
platform="linux/$deb_arch"
# The engine's own architecture keeps the plain names; another gets a suffix (a local tag holds
# one architecture) and needs the engine to run its binaries (qemu binfmt: scripts/setup-docker.sh).
suffix=""
[ "$deb_arch" = "$engine_arch" ] || suffix="-$deb_arch"
IMAGE="${OUTPOST_LOCAL_NODE_IMAGE:-outpost-local/node:24-bookworm-slim$suffix}"
DEBIAN_IMAGE="${OUTPOST_LOCAL_DEBIAN_IMAGE:-outpost-local/debian:bookworm$suffix}"

if [ -n "$EXTRA_CA" ] && [ ! -f "$EXTRA_CA" ]; then
  log "no CA bundle at $EXTRA_CA; building without one"
  EXTRA_CA=""
fi
ca_hash=none
[ -z "$EXTRA_CA" ] || ca_hash=$(sha256sum "$EXTRA_CA" | cut -c1-16)

hash=$(printf '%s\n' "$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-64)" "$node_version" "$node_arch" \
  "${OUTPOST_LOCAL_NPM_VERSION:-}" "$ca_hash" "$DEBIAN_IMAGE" | sha256sum | cut -c1-16)
current=$(docker image inspect -f "{{ index .Config.Labels \"$HASH_LABEL\" }}" "$IMAGE" 2>/dev/null || true)
if [ "$current" = "$hash" ]; then
  log "$IMAGE is up to date ($hash)"
  echo "$IMAGE"
  exit 0
fi

WORK=""
cleanup() {
  [ -n "$WORK" ] && [ -d "$WORK" ] || return 0
  # debootstrap mounts /proc and /sys (and may bind /dev) in the target; never delete through them.
  findmnt -rn -o TARGET | awk -v w="$WORK/" 'index($0, w) == 1' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/outpost-local-node.XXXXXX")

# BuildKit needs the buildx plugin, which this client may not have; the classic builder does.
if ! docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=0; fi

# --- 1. Debian bookworm (minbase) ---------------------------------------------------------
if docker image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
  log "$DEBIAN_IMAGE exists"
else
  [ "$(id -u)" -eq 0 ] || die "bootstrapping Debian needs root"
  if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    apt-get update -qq </dev/null
    apt-get install -y -qq --no-install-recommends debootstrap debian-archive-keyring gpgv wget </dev/null >/dev/null
  fi
  root="$WORK/rootfs"
  debootstrap_failed() {
    tail -n 30 "$WORK/debootstrap.log" >&2 || true
    tail -n 30 "$root/debootstrap/debootstrap.log" >&2 2>/dev/null || true
    die "$1"
  }
  if [ -z "$suffix" ]; then
    log "debootstrap --variant=minbase --arch=$deb_arch bookworm from $MIRROR (a minute or two)"
    debootstrap --variant=minbase --arch="$deb_arch" bookworm "$root" "$MIRROR" </dev/null >"$WORK/debootstrap.log" 2>&1 \
      || debootstrap_failed "debootstrap failed"
  else
    # Another architecture: unpack here, then configure inside the tree, its binaries run by qemu.
    log "debootstrap --foreign --variant=minbase --arch=$deb_arch bookworm from $MIRROR"
    debootstrap --foreign --variant=minbase --arch="$deb_arch" bookworm "$root" "$MIRROR" </dev/null >"$WORK/debootstrap.log" 2>&1 \
      || debootstrap_failed "debootstrap --foreign failed"
    chroot "$root" /bin/true 2>/dev/null \
      || die "this host cannot run $deb_arch binaries (no qemu binfmt handler; run: bash scripts/setup-docker.sh)"
    log "debootstrap --second-stage in the $deb_arch tree, under emulation (several minutes)"
    chroot "$root" /debootstrap/debootstrap --second-stage </dev/null >>"$WORK/debootstrap.log" 2>&1 \
      || debootstrap_failed "debootstrap --second-stage failed"
  fi
  # Trim like debian:bookworm-slim: no docs, man pages or apt caches, and keep them out later.
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  find "$root/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || true
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
  rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/lib/apt/lists/* \
    "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*.log
  # The engine provides these per container.
  rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
  log "making $DEBIAN_IMAGE ($platform)"
  mkdir -p "$WORK/debian"
  tar --numeric-owner -C "$root" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf "$WORK/debian/rootfs.tar" .
  findmnt -rn -o TARGET | awk -v w="$root/" 'index($0, w) == 1' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf --one-file-system "$root"
  printf '%s\n' 'FROM scratch' 'ADD rootfs.tar /' 'LABEL dev.outpost.local-base=debian-bookworm-minbase' 'CMD ["bash"]' >"$WORK/debian/Dockerfile"
  docker build -q --platform "$platform" -t "$DEBIAN_IMAGE" "$WORK/debian" </dev/null >/dev/null
  rm -rf "$WORK/debian"
fi

# --- 2. Node and npm ----------------------------------------------------------------------
ctx="$WORK/context"
mkdir -p "$ctx/usr/local/bin" "$ctx/usr/local/lib/node_modules" "$ctx/usr/local/etc"
pkg="node-linux-$node_arch"
installed="$REPO/node_modules/node/node_modules/$pkg"
if [ -f "$installed/package.json" ] && grep -q "\"version\": \"$node_version\"" "$installed/package.json"; then
  log "node $node_version from $installed"
  node_dir="$installed"
else
  log "node $node_version: npm pack $pkg@$node_version"
  (cd "$WORK" && npm pack --silent "$pkg@$node_version" </dev/null >/dev/null)
  mkdir -p "$WORK/node" && tar -xzf "$WORK/$pkg-$node_version.tgz" -C "$WORK/node"
  node_dir="$WORK/node/package"
fi
cp "$node_dir/bin/node" "$ctx/usr/local/bin/node"
chmod 0755 "$ctx/usr/local/bin/node"
ln -s node "$ctx/usr/local/bin/nodejs"
for d in include share; do [ ! -d "$node_dir/$d" ] || cp -R "$node_dir/$d" "$ctx/usr/local/"; done

npm_version="${OUTPOST_LOCAL_NPM_VERSION:-$(grep -m1 -oE '(upgrade|update) npm to [0-9]+\.[0-9]+\.[0-9]+' "$node_dir/CHANGELOG.md" 2>/dev/null | awk '{print $4}' || true)}"
[ -n "$npm_version" ] || die "cannot tell which npm Node $node_version bundles; set OUTPOST_LOCAL_NPM_VERSION"
log "npm $npm_version: npm pack npm@$npm_version"
(cd "$WORK" && npm pack --silent "npm@$npm_version" </dev/null >/dev/null)
tar -xzf "$WORK/npm-$npm_version.tgz" -C "$ctx/usr/local/lib/node_modules"
mv "$ctx/usr/local/lib/node_modules/package" "$ctx/usr/local/lib/node_modules/npm"
ln -s ../lib/node_modules/npm/bin/npm-cli.js "$ctx/usr/local/bin/npm"
ln -s ../lib/node_modules/npm/bin/npx-cli.js "$ctx/usr/local/bin/npx"
: >"$ctx/usr/local/etc/npmrc"
if [ -n "$EXTRA_CA" ]; then
  log "npm trusts this host's CA bundle $EXTRA_CA (cafile in /usr/local/etc/npmrc)"
  mkdir -p "$ctx/usr/local/share/outpost-local"
  cp "$EXTRA_CA" "$ctx/usr/local/share/outpost-local/ca-bundle.crt"
  echo "cafile=/usr/local/share/outpost-local/ca-bundle.crt" >"$ctx/usr/local/etc/npmrc"
fi
chmod -R u=rwX,go=rX "$ctx/usr/local"

cat >"$ctx/Dockerfile" <<EOF
FROM $DEBIAN_IMAGE
RUN groupadd --gid 1000 node && useradd --uid 1000 --gid node --shell /bin/bash --create-home node
ENV NODE_VERSION=$node_version
COPY usr/local/ /usr/local/
RUN node --version && npm --version
CMD ["node"]
EOF

log "building $IMAGE (node $node_version, npm $npm_version, $deb_arch)"
docker build -q --platform "$platform" --label "$HASH_LABEL=$hash" -t "$IMAGE" "$ctx" </dev/null >/dev/null

for image in "$DEBIAN_IMAGE" "$IMAGE"; do
  got=$(docker image inspect -f '{{.Os}}/{{.Architecture}}' "$image")
  [ "$got" = "$platform" ] || die "$image is $got, expected $platform"
done
got=$(docker run --rm --platform "$platform" "$IMAGE" sh -c 'echo "$(node --version) npm $(npm --version) $(id -u node):$(id -g node) $(dpkg --print-architecture)"')
want="v$node_version npm $npm_version 1000:1000 $deb_arch"
[ "$got" = "$want" ] || die "$IMAGE answers '$got', expected '$want'"
log "built $IMAGE: $got"
echo "$IMAGE"
