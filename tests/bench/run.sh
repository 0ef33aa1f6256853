#!/usr/bin/env bash
# Benchmarks robib against nbdkit's file plugin with the same fio jobs, both
# through fio's libnbd engine (--ioengine=nbd), on the same disk, in one run,
# and prints a side-by-side markdown table (written with a JSON copy to
# tests/bench/results/).
#
# Targets:
#   robib   `robib agent` with one 1 GiB volume (data dir under $BENCH_DIR)
#   nbdkit  `nbdkit file` on a sparse 1 GiB file in the same directory, with
#           the plugin's defaults (cache=default: through the page cache,
#           fadvise=normal, 16 threads, multi-conn) — the reference for "a
#           plain file behind a mature NBD server"
#
# Jobs (each time-based, BENCH_RUNTIME seconds, default 10; one connection
# each; the whole volume is written once beforehand so reads hit data):
#   seq-write-1M       sequential 1 MiB writes, iodepth 8
#   rand-write-4k      4 KiB random writes, iodepth 32
#   rand-write-4k-sync 4 KiB random writes, iodepth 1, fsync=1 (an NBD
#                      flush after every write): flush latency p50/p99
#   seq-read-1M        sequential 1 MiB reads, iodepth 8
#   rand-read-4k       4 KiB random reads, iodepth 32
#
# Environment:
#   BENCH_RUNTIME  seconds per job and target (default 10)
#   BENCH_SIZE     volume size (default 1GiB; a size fio and robib both read)
#   BENCH_DIR      working directory (default: a new one under /var/tmp)
#   ROBIB_BIN      robib binary (default: build ./cmd/robib into BENCH_DIR)
#   BENCH_JOBS     space-separated subset of the job names above
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
runtime=${BENCH_RUNTIME:-10}
size=${BENCH_SIZE:-1GiB}
jobs=${BENCH_JOBS:-"seq-write-1M rand-write-4k rand-write-4k-sync seq-read-1M rand-read-4k"}
py=$(command -v python3 || echo /usr/bin/python3)

for tool in fio nbdkit curl; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (ops/scripts/install-test-tools.sh)" >&2; exit 1; }
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "bench: fio has no nbd engine" >&2; exit 1; }

work=${BENCH_DIR:-$(mktemp -d /var/tmp/robib-bench.XXXXXX)}
mkdir -p "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -z "${BENCH_DIR:-}" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT

freeport() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

bin=${ROBIB_BIN:-}
if [ -z "$bin" ]; then
  echo "bench: building robib" >&2
  (cd "$root" && CGO_ENABLED=0 go build -trimpath -o "$work/robib" ./cmd/robib)
  bin=$work/robib
fi

# robib
rnbd=$(freeport); rapi=$(freeport)
mkdir -p "$work/robib-data"
"$bin" agent --name bench --data-dir "$work/robib-data" \
  --nbd-addr "127.0.0.1:$rnbd" --api-addr "127.0.0.1:$rapi" --log-level warn \
  >"$work/robib.log" 2>&1 &
pids+=($!)
for i in $(seq 300); do
  curl -fsS "http://127.0.0.1:$rapi/v1/health" >/dev/null 2>&1 && break
  kill -0 "${pids[0]}" 2>/dev/null || { echo "bench: robib agent exited:" >&2; cat "$work/robib.log" >&2; exit 1; }
  sleep 0.1
done
"$bin" --api "http://127.0.0.1:$rapi" volume create bench --size "$size" >/dev/null
bytes=$("$bin" --api "http://127.0.0.1:$rapi" volume list --json | "$py" -c 'import json,sys; print([v["size"] for v in json.load(sys.stdin) if v["name"]=="bench"][0])')

# nbdkit, on a sparse file of the same size in the same directory
knbd=$(freeport)
mkdir -p "$work/nbdkit-data"
truncate -s "$bytes" "$work/nbdkit-data/disk.img"
nbdkit --exit-with-parent -f -i 127.0.0.1 -p "$knbd" file "$work/nbdkit-data/disk.img" \
  >"$work/nbdkit.log" 2>&1 &
pids+=($!)
for i in $(seq 300); do
  nbdinfo --size "nbd://127.0.0.1:$knbd/" >/dev/null 2>&1 && break
  kill -0 "${pids[1]}" 2>/dev/null || { echo "bench: nbdkit exited:" >&2; cat "$work/nbdkit.log" >&2; exit 1; }
  sleep 0.1
done

declare -A uri=([robib]="nbd://127.0.0.1:$rnbd/bench" [nbdkit]="nbd://127.0.0.1:$knbd/")
out=$work/fio
mkdir -p "$out"

job_args() {
  case $1 in
    seq-write-1M)       echo "--rw=write --bs=1M --iodepth=8" ;;
    rand-write-4k)      echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    rand-write-4k-sync) echo "--rw=randwrite --bs=4k --iodepth=1 --fsync=1" ;;
    seq-read-1M)        echo "--rw=read --bs=1M --iodepth=8" ;;
    rand-read-4k)       echo "--rw=randread --bs=4k --iodepth=32" ;;
    *) echo "bench: unknown job $1" >&2; exit 1 ;;
  esac
}

common=(--ioengine=nbd --size="$bytes" --numjobs=1 --group_reporting --randrepeat=0 --output-format=json)

echo "bench: prefilling both volumes ($bytes bytes)" >&2
for target in robib nbdkit; do
  fio --name=prefill "${common[@]}" --uri="${uri[$target]}" --rw=write --bs=1M --iodepth=8 \
    --output="$out/prefill-$target.json" >/dev/null
done

for job in $jobs; do
  for target in robib nbdkit; do
    echo "bench: $job on $target (${runtime}s)" >&2
    # shellcheck disable=SC2046
    fio --name="$job" "${common[@]}" --uri="${uri[$target]}" $(job_args "$job") \
      --time_based --runtime="$runtime" --output="$out/$job-$target.json" >/dev/null
  done
done

mkdir -p "$here/results"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
meta=$("$py" -c 'import json,sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
  runtime_s "$runtime" size_bytes "$bytes" robib_version "$("$bin" --version 2>/dev/null || echo unknown)" \
  nbdkit_version "$(nbdkit --version)" fio_version "$(fio --version)" host_cpus "$(nproc)" \
  work_dir "$work" filesystem "$(stat -f -c %T "$work")")
"$py" "$here/report.py" --dir "$out" --jobs "$jobs" --meta "$meta" \
  --markdown "$here/results/bench-$stamp.md" --json "$here/results/bench-$stamp.json"
echo >&2
echo "bench: results in tests/bench/results/bench-$stamp.{md,json}" >&2
