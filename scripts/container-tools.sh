#!/usr/bin/env bash
# Container tooling for machines with no Docker engine and no image registry (CI, the test suite).
#
#   scripts/container-tools.sh install        install podman, runc and debootstrap with apt if missing (root)
#   scripts/container-tools.sh base           build the registry-free base image once: $FROZEN_BN_BASE_IMAGE
#   scripts/container-tools.sh build [TAG]    build ./Dockerfile FROM the base as TAG (default $FROZEN_BN_IMAGE)
#   scripts/container-tools.sh run [OPTS...]  run the image in the foreground on the host network (podman run OPTS)
#   scripts/container-tools.sh ci             install + base, never failing: the container tests skip instead
#
# With a Docker engine and a registry none of this is needed: `docker build -t frozen-bn .` uses the
# Dockerfile's default base, python:3.11-slim.
#
# The base is Debian bookworm made by debootstrap (its python3 is 3.11, as in python:3.11-slim) and
# imported into podman's local store, where it stays between runs; rebuilding the application image then
# reuses every cached layer that its inputs did not change.
# Defaults: FROZEN_BN_BASE_IMAGE=localhost/py-base:bookworm, FROZEN_BN_IMAGE=localhost/frozen-bn:test.
set -euo pipefail

BASE_IMAGE=${FROZEN_BN_BASE_IMAGE:-localhost/py-base:bookworm}
IMAGE=${FROZEN_BN_IMAGE:-localhost/frozen-bn:test}
DEBIAN_MIRROR=${FROZEN_BN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${FROZEN_BN_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

log() { printf 'container-tools: %s\n' "$*" >&2; }

install_tools() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if ((${#missing[@]} == 0)); then
        log "podman, runc and debootstrap are installed"
        return 0
    fi
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        log "missing ${missing[*]}; installing needs root and apt-get"
        return 1
    fi
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q "${missing[@]}" >/dev/null
}

# A subshell, so that its EXIT trap removes the scratch root filesystem however the function ends.
build_base() (
    if podman image exists "$BASE_IMAGE"; then
        log "$BASE_IMAGE is cached"
        exit 0
    fi
    rootfs=$(mktemp -d /var/tmp/py-base.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap bookworm into $rootfs (about a minute)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >/dev/null
    # Package lists, caches and documentation are dead weight under every image built on top.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    log "imported $BASE_IMAGE"
)

# pip inside the build reaches the package index through the host network. Pass the host's index
# settings through (its config files are not in the build context); file:// indexes and find-links are
# host paths the build cannot see, so they are left out.
pip_build_args() {
    local key value
    for key in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_DEFAULT_TIMEOUT; do
        value=${!key:-}
        if [[ -z $value ]]; then
            value=$(python3 -m pip config get "global.$(tr '[:upper:]_' '[:lower:]-' <<<"${key#PIP_}")" 2>/dev/null || true)
        fi
        value=$(tr ' ' '\n' <<<"$value" | grep -v '^file:' | paste -sd' ' || true)
        [[ -n $value ]] && printf -- '--build-arg=%s=%s\n' "$key" "$value"
    done
    return 0
}

build_image() {
    local tag=${1:-$IMAGE}
    local args=(--isolation=chroot --network=host --format docker --build-arg "BASE=$BASE_IMAGE" -t "$tag")
    # pip in the build must trust the same certificates as the host (an intercepting proxy's CA included).
    if [[ -f $CA_BUNDLE ]]; then
        args+=(-v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
        args+=(--build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt)
    fi
    mapfile -t pip_args < <(pip_build_args)
    log "building $tag from $BASE_IMAGE"
    podman build "${args[@]}" "${pip_args[@]}" "$ROOT"
}

# runc, because this kernel's cgroup setup rejects crun; explicit ulimits, because podman's default open-files
# limit is above the hard limit a CI sandbox allows, and the container would fail to start.
run_image() {
    podman --runtime runc --cgroup-manager cgroupfs run --rm --network=host \
        --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 "$@" "$IMAGE"
}

case ${1:-} in
    install) install_tools ;;
    base) build_base ;;
    build) build_image "${2:-}" ;;
    run) run_image "${@:2}" ;;
    ci)
        # CI must still run the rest of the suite when this machine cannot run containers.
        if install_tools && build_base; then
            log "container tests will run"
        else
            log "container tools unavailable; the container tests will skip"
        fi
        ;;
    *)
        sed -n '2,16p' "$0" >&2
        exit 64
        ;;
esac
