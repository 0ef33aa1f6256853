#!/usr/bin/env bash
# Installs the third-party NBD clients and tools robib's tests drive, if any
# is missing, including the docker CLI and docker-compose for the container
# tests (the Docker engine itself must already run). Needs root (apt-get);
# does nothing when everything is present.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have nbdinfo   || need+=(libnbd-bin)
have nbdfuse   || need+=(nbdfuse)
have qemu-io   || need+=(qemu-utils)
have fio       || need+=(fio)
have nbdkit    || need+=(nbdkit)
have mkfs.ext4 || need+=(e2fsprogs)
have losetup   || need+=(mount)
have fusermount3 || have fusermount || need+=(fuse3)
have curl      || need+=(curl)
have jq        || need+=(jq)          # ops/scripts/compose-smoke.sh
have docker    || need+=(docker.io)   # tests/dockerh, fault-injection suite
have docker-compose || need+=(docker-compose)
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || need+=(python3-libnbd)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "missing test tools (${need[*]}); run as root or: apt-get install ${need[*]}" >&2
  exit 1
fi
echo "installing test tools: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
