#!/usr/bin/env bash
# Builds berth's image from the repo: vendors the crates (from cargo's cache when it holds them,
# so a second build needs no network), then `docker build` with the repo as context. Extra
# arguments go to docker build (for example --build-arg BUILDER=rust:1-bookworm).
#
#   bash packaging/container/build.sh [TAG] [DOCKER-BUILD-ARGS...]    # TAG: berth:local
set -euo pipefail
cd "$(dirname "$0")/../.."
tag=${1:-berth:local}
shift || true
# `cargo vendor` rewrites vendor/ whole; --offline first, since the crates are usually cached.
cargo vendor --locked --offline --quiet vendor >/dev/null 2>&1 || cargo vendor --locked --quiet vendor >/dev/null
docker build --file packaging/container/Dockerfile --tag "$tag" "$@" .
