#!/usr/bin/env bash
# CPU per GiB and CPU profiles of a three-site cluster under one fio job
# (docs/performance.md, "CPU per byte"): starts three agents on 127.0.0.1
# (ports 20010-20033), creates a 1 GiB volume, prefills it with 1 MiB
# writes at site1, then runs the fio job at site1 for 12 s while taking a
# 12 s CPU profile of every agent (/debug/pprof/profile on the admin API).
#
#   tests/bench/profile.sh BIN OUTDIR "FIO ARGS" [AGENT FLAGS...]
#   e.g. tests/bench/profile.sh bin/robib /tmp/seq "--rw=write --bs=1M --iodepth=8" --raft-transport msgpack
#
# OUTDIR gets siteN.pprof, fio.json and cpu.txt (CPU ticks of each agent
# during the job, minor page faults, fio's MiB/s and bytes). The cluster
# lives in /var/tmp/robib-profile and is removed at the start of a run.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,13p' "$0" >&2; exit 2; }
# shellcheck source=tests/bench/lib.sh
. "$(dirname "$0")/lib.sh"
bin=$1 out=$2 fioargs=$3
shift 3
work=/var/tmp/robib-profile
rm -rf "$work"
mkdir -p "$work" "$out"
pids=()
trap 'stop_pids "${pids[@]}"' EXIT
for i in 1 2 3; do
  o=$((i * 10))
  args=(agent --name "site$i" --data-dir "$work/site$i" --nbd-addr "127.0.0.1:$((20000 + o))"
    --api-addr "127.0.0.1:$((20001 + o))" --raft-addr "127.0.0.1:$((20002 + o))"
    --gossip-addr "127.0.0.1:$((20003 + o))" --bootstrap-expect 3 --log-level warn "$@")
  [ "$i" -gt 1 ] && args+=(--join 127.0.0.1:20013)
  "$bin" "${args[@]}" >"$work/site$i.log" 2>&1 &
  pids+=($!)
done
api=http://127.0.0.1:20011
for _ in $(seq 100); do
  "$bin" --api "$api" volume create bench --size 1GiB >/dev/null 2>&1 && break
  sleep 0.3
done
read -r -a fa <<<"$fioargs"
fio --name=prefill --ioengine=nbd --uri=nbd://127.0.0.1:20010/bench --rw=write --bs=1M --iodepth=8 \
  --size=1GiB --output-format=terse >/dev/null
sleep 3
cpu0=() flt0=()
for p in "${pids[@]}"; do
  cpu0+=("$(awk '{print $14+$15}' "/proc/$p/stat")")
  flt0+=("$(awk '{print $10}' "/proc/$p/stat")")
done
cp=()
for i in 1 2 3; do
  curl -s -o "$out/site$i.pprof" "http://127.0.0.1:$((20001 + i * 10))/debug/pprof/profile?seconds=12" &
  cp+=($!)
done
fio --name=job --ioengine=nbd --uri=nbd://127.0.0.1:20010/bench "${fa[@]}" --size=1GiB \
  --time_based --runtime=12 --output-format=json >"$out/fio.json"
wait "${cp[@]}"
: >"$out/cpu.txt"
for k in 0 1 2; do
  p=${pids[$k]}
  c=$(awk '{print $14+$15}' "/proc/$p/stat")
  f=$(awk '{print $10}' "/proc/$p/stat")
  echo "site$((k + 1)) cpu_ticks=$((c - cpu0[k])) minflt=$((f - flt0[k]))" | tee -a "$out/cpu.txt"
done
python3 - "$out/fio.json" <<'PY' | tee -a "$out/cpu.txt"
import json, sys
s = open(sys.argv[1]).read()
w = json.loads(s[s.index("{"):])["jobs"][0]["write"]
print("MiB/s %.1f iops %.0f bytes %d" % (w["bw_bytes"] / 2**20, w["iops"], w["io_bytes"]))
PY
