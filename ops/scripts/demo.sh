#!/usr/bin/env bash
# Starts a three-site robib cluster on this machine (loopback, fixed ports),
# creates a volume and prints how to attach it at each site. Ctrl-C stops
# all three sites. Data lives in $DEMO_DIR (default /tmp/robib-demo) and is
# kept between runs; DEMO_FRESH=1 starts from empty.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-bin/robib}
DIR=${DEMO_DIR:-/tmp/robib-demo}
VOL=${DEMO_VOLUME:-demo}
SIZE=${DEMO_SIZE:-1GiB}
[ -x "$BIN" ] || { echo "build first: make build" >&2; exit 1; }
[ "${DEMO_FRESH:-0}" = 1 ] && rm -rf "$DIR"
mkdir -p "$DIR"

# site  nbd    api    raft   gossip
SITES=(
  "site1 10809 10810 10811 10812"
  "site2 10819 10820 10821 10822"
  "site3 10829 10830 10831 10832"
)
pids=()
stop() {
  trap - INT TERM EXIT
  echo; echo "stopping the three sites..."
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped; data kept in $DIR"
}
trap stop INT TERM EXIT

for s in "${SITES[@]}"; do
  read -r name nbd api raft gossip <<<"$s"
  # All three start together: each waits until three sites gossip, then
  # they bootstrap one cluster. Sites 2 and 3 find the others through site1.
  join=(--bootstrap-expect 3)
  [ "$name" != site1 ] && join+=(--join 127.0.0.1:10812)
  "$BIN" agent --name "$name" --data-dir "$DIR/$name" \
    --nbd-addr "127.0.0.1:$nbd" --api-addr "127.0.0.1:$api" \
    --raft-addr "127.0.0.1:$raft" --gossip-addr "127.0.0.1:$gossip" \
    "${join[@]}" >"$DIR/$name.log" 2>&1 &
  pids+=($!)
done

api="http://127.0.0.1:10810"
echo "waiting for the cluster to elect a leader..."
for _ in $(seq 1 300); do
  leader=$("$BIN" --api "$api" cluster status --json 2>/dev/null | sed -n 's/^  "leader": "\(.*\)",$/\1/p' || true)
  [ -n "$leader" ] && break
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || { echo "a site exited; see $DIR/*.log" >&2; tail -n 20 "$DIR"/*.log >&2; exit 1; }; done
  sleep 0.1
done
[ -n "${leader:-}" ] || { echo "no leader after 30s; see $DIR/*.log" >&2; exit 1; }

if ! "$BIN" --api "$api" volume list --json | grep -q "\"name\": \"$VOL\""; then
  "$BIN" --api "$api" volume create "$VOL" --size "$SIZE"
fi
"$BIN" --api "$api" cluster status
echo
"$BIN" --api "$api" volume list
cat <<TXT

robib demo: three sites are running (logs in $DIR/*.log). Volume "$VOL" is
served by every site; attach it at any of them (read-write at one site at a
time: the site holding the volume's lease; "$VOL@ro" reads it anywhere):

  site1  nbd://127.0.0.1:10809/$VOL   (admin API http://127.0.0.1:10810)
  site2  nbd://127.0.0.1:10819/$VOL   (admin API http://127.0.0.1:10820)
  site3  nbd://127.0.0.1:10829/$VOL   (admin API http://127.0.0.1:10830)

  nbdinfo nbd://127.0.0.1:10819/$VOL
  nbd-client 127.0.0.1 10819 /dev/nbd0 -N $VOL          # Linux host with the nbd module
  mkdir -p /tmp/robib-fuse && nbdfuse /tmp/robib-fuse/disk nbd://127.0.0.1:10819/$VOL &   # without it
  qemu-img info nbd://127.0.0.1:10829/$VOL
  nbdinfo nbd://127.0.0.1:10829/$VOL@ro                 # read-only, while another site writes
  $BIN --api http://127.0.0.1:10820 volume verify $VOL
  $BIN --api http://127.0.0.1:10830 cluster status

Press Ctrl-C to stop all three sites.
TXT
wait
