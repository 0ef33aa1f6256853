#!/usr/bin/env bash
# Builds the robib container image (ops/Dockerfile) around a static robib
# binary. No Go toolchain or base image is needed inside docker: the image is
# FROM scratch, and the binary is built on the host first (`make build`).
#
#   ROBIB_BIN    binary to package (default bin/robib); must be static
#   ROBIB_IMAGE  image tag (default robib:dev)
#   VERSION      recorded in the image label (default: git describe)
set -euo pipefail
BIN=${ROBIB_BIN:-}
if [ -n "$BIN" ]; then BIN=$(realpath "$BIN"); fi
cd "$(dirname "$0")/../.."
BIN=${BIN:-bin/robib}
IMAGE=${ROBIB_IMAGE:-robib:dev}
VERSION=${VERSION:-$(git describe --always --dirty 2>/dev/null || echo dev)}

[ -x "$BIN" ] || { echo "build-image: $BIN missing or not executable; run: make build" >&2; exit 1; }
# The image has no libc and no dynamic loader: refuse a dynamic binary (e.g.
# a -race build) instead of producing an image that cannot start.
if command -v readelf >/dev/null 2>&1 && readelf -lW "$BIN" 2>/dev/null | grep -q 'program interpreter'; then
  echo "build-image: $BIN is dynamically linked; build it with CGO_ENABLED=0 (make build)" >&2
  exit 1
fi

ctx=$(mktemp -d "${TMPDIR:-/tmp}/robib-image.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
cp "$BIN" "$ctx/robib"
chmod 0755 "$ctx/robib"
mkdir -m 0700 "$ctx/data"
# Quiet unless it fails (the legacy builder also warns about itself).
if ! out=$(docker build -f ops/Dockerfile --build-arg "VERSION=$VERSION" -t "$IMAGE" "$ctx" 2>&1); then
  printf '%s\n' "$out" >&2
  echo "build-image: docker build failed" >&2
  exit 1
fi
echo "built image $IMAGE ($VERSION) from $BIN"
