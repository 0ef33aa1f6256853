#!/usr/bin/env bash
# A database on the replicated block device (issue 5): PostgreSQL with
# pgbench on ext4, on three setups that share one client path, and a
# markdown table comparing them (written with a JSON copy to
# tests/bench/results/pgbench-YYYYmmdd-HHMMSS.{md,json}).
#
# The client path is the same in every setup: an NBD export is turned into a
# file by nbdfuse, the file into a block device by losetup, and the block
# device carries ext4 (mkfs.ext4 with the inode tables and journal written
# up front, so no lazy initialisation runs during the benchmark) with
# PostgreSQL's data directory on it. Only what serves the NBD export, and
# what copies the data elsewhere, differs:
#
#   nbd     (1) no backup: `nbdkit file` on a sparse file; nothing is copied
#   robib   (2) block-level backup: a robib volume in a three-site robib
#               cluster on this machine (three agents, --bootstrap-expect 3),
#               attached at a site that is a FOLLOWER when PostgreSQL
#               starts; with --leader-follows-writes (the default) the
#               leader moves there within seconds of sustained writes (the
#               report names the leader at attach and at the end). Every
#               flush is committed on two of three sites
#   pgsync  (3) application-level backup: PostgreSQL synchronous streaming
#               replication (synchronous_commit=on, synchronous_standby_names
#               naming the standby, a physical replication slot) to a standby
#               started from pg_basebackup of the primary; the primary's and
#               the standby's data directories each sit on their own
#               nbdkit-file export attached as in (1)
#
# For each setup (one after another; each is built, measured and torn down
# before the next starts): initdb, `pgbench -i -s SCALE` (timed), then per
# client count N in PGBENCH_CLIENTS a timed run `pgbench -n -c N -j min(N,4)
# -T PGBENCH_TIME -P 1`. Before each timed run: VACUUM of pgbench_branches
# and pgbench_tellers and TRUNCATE pgbench_history (what pgbench does itself
# without -n), CHECKPOINT on every instance, sync(1), and for robib a wait
# until every site has applied the whole Raft log; for pgsync a wait until
# the standby has replayed everything. Caches are not dropped.
#
# PostgreSQL keeps its durability settings: fsync=on, synchronous_commit=on,
# full_page_writes=on, wal_sync_method=fdatasync; every instance has the
# same postgresql.conf. Per instance, an included instance.conf holds the
# port and socket directory, and in setup (3) the replication settings.
# pgbench connects over the Unix socket; PostgreSQL listens on 127.0.0.1 only.
# Scale 10 (the default) is 1,000,000 pgbench_accounts rows, about 150 MiB
# on disk; its initialisation takes well under a minute on every setup here.
#
# Environment:
#   PGBENCH_TIME     seconds per timed run (default 30)
#   PGBENCH_SCALE    pgbench scale factor (default 10)
#   PGBENCH_SETUPS   subset of "nbd robib pgsync" (default all three)
#   PGBENCH_CLIENTS  client counts (default "1 20"); threads are min(N, 4)
#   PGBENCH_DISK_GIB size of every disk in GiB (default 4)
#   PGBIN            PostgreSQL binaries (default: found from pg_ctl, or
#                    the newest /usr/lib/postgresql/*/bin; the Debian package
#                    postgresql is installed with apt-get if there is none)
#   ROBIB_BIN        robib binary (default: `make build` into the temp root)
#
# Needs root (losetup, mount), FUSE and loop devices. Everything lives under
# the fixed directory /tmp/robib-pgbench: a run first removes whatever an
# aborted earlier run left there (PostgreSQL instances, mounts, loop
# devices, nbdfuse mounts, nbdkit and robib processes whose command line or
# working directory is under it), and the exit trap does the same however
# the script ends (short of SIGKILL). Logs are copied next to the results
# (pgbench-STAMP.logs/).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
ROOT=/tmp/robib-pgbench
time_s=${PGBENCH_TIME:-30}
scale=${PGBENCH_SCALE:-10}
setups=${PGBENCH_SETUPS:-"nbd robib pgsync"}
clients=${PGBENCH_CLIENTS:-"1 20"}
disk_gib=${PGBENCH_DISK_GIB:-4}
disk_bytes=$((disk_gib * 1024 * 1024 * 1024))
t_start=$(date +%s)
stamp=$(date +%Y%m%d-%H%M%S)
git_rev=$(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)
cd /  # nothing of ours keeps the caller's directory busy; postgres may not enter it

log() { echo "pgbench: $*" >&2; }
die() { log "$*"; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is missing ($2)"; }

# --- arguments and tools -----------------------------------------------------
[[ $time_s =~ ^[1-9][0-9]*$ ]] || die "PGBENCH_TIME must be a positive number of seconds, not '$time_s'"
[[ $scale =~ ^[1-9][0-9]*$ ]] || die "PGBENCH_SCALE must be a positive integer, not '$scale'"
[[ $disk_gib =~ ^[1-9][0-9]*$ ]] || die "PGBENCH_DISK_GIB must be a positive integer, not '$disk_gib'"
[ -n "${setups// /}" ] || die "PGBENCH_SETUPS is empty"
[ -n "${clients// /}" ] || die "PGBENCH_CLIENTS is empty"
for s in $setups; do [[ " nbd robib pgsync " == *" $s "* ]] || die "unknown setup '$s' (nbd robib pgsync)"; done
for c in $clients; do [[ $c =~ ^[1-9][0-9]*$ ]] || die "PGBENCH_CLIENTS: '$c' is not a client count"; done
has_setup() { [[ " $setups " == *" $1 "* ]]; }

[ "$(id -u)" = 0 ] || die "needs root (losetup, mount, running PostgreSQL as user postgres)"
need python3 "apt-get install python3"
need nbdkit "ops/scripts/install-test-tools.sh"
need nbdfuse "ops/scripts/install-test-tools.sh"
need nbdinfo "ops/scripts/install-test-tools.sh"
need fusermount3 "apt-get install fuse3"
for t in losetup mkfs.ext4 mount umount runuser timeout sync; do need "$t" "util-linux / e2fsprogs / coreutils"; done
[ -e /dev/fuse ] || die "/dev/fuse is missing (no FUSE)"
[ -e /dev/loop-control ] || die "/dev/loop-control is missing (no loop devices)"

py=$(command -v python3)
ctl() { "$py" "$here/benchctl.py" "$@"; }
rep() { "$py" "$here/pgbench_report.py" "$@"; }

find_pgbin() {
  local d c
  if [ -n "${PGBIN:-}" ]; then echo "$PGBIN"; return 0; fi
  if c=$(command -v pg_ctl 2>/dev/null); then
    d=$(dirname "$(readlink -f "$c")")
    if [ -x "$d/initdb" ] && [ -x "$d/pgbench" ]; then echo "$d"; return 0; fi
  fi
  d=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pgbench" ]; then echo "$d"; return 0; fi
  return 1
}
if ! pgbin=$(find_pgbin); then
  need apt-get "install PostgreSQL, or set PGBIN"
  log "installing PostgreSQL (apt-get install postgresql)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2 || die "apt-get install postgresql failed"
  pgbin=$(find_pgbin) || die "no PostgreSQL binaries after installing postgresql"
fi
for t in initdb pg_ctl pgbench psql pg_basebackup createdb; do
  [ -x "$pgbin/$t" ] || die "$pgbin/$t is missing"
done
id postgres >/dev/null 2>&1 || die "there is no user postgres (the postgresql package creates it)"
pg_version=$("$pgbin/postgres" --version | awk '{print $3}')

# Runs a command as postgres, from / (postgres may not enter the caller's directory).
as_pg() { (cd / && runuser -u postgres -- "$@"); }

# --- processes, mounts, cleanup ---------------------------------------------
# shellcheck source=tests/bench/lib.sh
. "$here/lib.sh"

# Processes started by this script or an earlier run of it: their command
# line or working directory is under $ROOT (postgres runs in its data
# directory; nbdkit, nbdfuse and robib name files under $ROOT). Prints PIDs,
# without this shell and its ancestors. Argument: "pg" = only PostgreSQL and
# its clients (what keeps the file systems busy), "all" = everything.
root_procs() {
  local kind=$1 d pid cwd cmd comm self=" $$ $BASHPID " a=$$
  while [ "$a" -gt 1 ] 2>/dev/null; do
    a=$(awk '/^PPid:/ {print $2}' "/proc/$a/status" 2>/dev/null || echo 0)
    self+="$a "
  done
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    [[ $self == *" $pid "* ]] && continue
    cwd=$(readlink "$d/cwd" 2>/dev/null || true)
    cmd=$(tr '\0' ' ' 2>/dev/null <"$d/cmdline" || true)
    [[ $cwd == "$ROOT"/* || $cmd == *"$ROOT/"* ]] || continue
    comm=$(cat "$d/comm" 2>/dev/null || true)
    if [ "$kind" = pg ]; then
      case $comm in postgres | pgbench | psql | pg_basebackup | runuser | timeout | createdb) ;; *) continue ;; esac
    fi
    echo "$pid"
  done
}

mounts_under() { # TYPE-GLOB: mount points under $ROOT of that file system type, deepest first
  awk -v r="$ROOT/" -v t="$1" '
    index($2, r) == 1 { if (t == "*" || $3 ~ t) print $2 }' /proc/self/mounts | sort -r
}

# Takes down everything under $ROOT, gently first: PostgreSQL instances
# (pg_ctl stop -m fast, then immediate, then signals), the ext4 mounts, the
# loop devices, the nbdfuse mounts, then the NBD servers (robib agents: the
# site a disk was attached at first, while the other two still form a
# majority, as tests/bench/run.sh does). Used at start (for leftovers of an
# aborted run), between setups and at exit.
sweep() {
  local d m l p left
  for d in "$ROOT"/run/*/*/mnt/pgdata; do
    [ -f "$d/postmaster.pid" ] || continue
    timeout 90 runuser -u postgres -- "$pgbin/pg_ctl" -D "$d" -m fast -t 60 stop >/dev/null 2>&1 ||
      timeout 60 runuser -u postgres -- "$pgbin/pg_ctl" -D "$d" -m immediate -t 30 stop >/dev/null 2>&1 ||
      log "pg_ctl stop $d failed"
  done
  mapfile -t left < <(root_procs pg)
  if [ ${#left[@]} -gt 0 ]; then
    log "stopping leftover PostgreSQL processes ${left[*]}"
    stop_pids "${left[@]}"
  fi
  for m in $(mounts_under '^ext4$'); do
    sync -f "$m" 2>/dev/null || true
    umount "$m" 2>/dev/null || { log "umount $m failed; lazy unmount"; umount -l "$m" || true; }
  done
  while read -r l p; do
    [[ $p == "$ROOT"/* ]] || continue
    losetup -d "$l" 2>/dev/null || log "losetup -d $l failed"
  done < <(losetup -n -l -O NAME,BACK-FILE 2>/dev/null || true)
  for m in $(mounts_under '^fuse'); do
    fusermount3 -u "$m" 2>/dev/null || { log "fusermount3 -u $m failed; lazy unmount"; fusermount3 -uz "$m" || true; }
  done
  # nbdfuse exits by itself once unmounted; then the attached robib site, then the rest.
  for p in $(cat "$ROOT"/run/*/nbdfuse.pids "$ROOT"/run/*/first.pids 2>/dev/null || true); do
    if alive "$p" && [[ $(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline") == *"$ROOT/"* ]]; then stop_pids "$p"; fi
  done
  mapfile -t left < <(root_procs all)
  if [ ${#left[@]} -gt 0 ]; then stop_pids "${left[@]}"; fi
}

remove_run() { # DIR: removes DIR unless something is still mounted under it
  if awk -v r="$1/" 'index($2, r) == 1 {found=1} END {exit !found}' /proc/self/mounts; then
    log "not removing $1: still mounted: $(awk -v r="$1/" 'index($2, r) == 1 {print $2}' /proc/self/mounts | tr '\n' ' ')"
    return 1
  fi
  rm -rf "$1"
}

run_pid=""   # pgbench (or another long command) running in the background
logs_saved=""
save_logs() {
  [ -z "$logs_saved" ] || return 0
  logs_saved=1
  if [ -d "$ROOT/logs" ]; then
    mkdir -p "$here/results"
    cp -r "$ROOT/logs" "$here/results/pgbench-$stamp.logs" 2>/dev/null || true
  fi
}
cleanup() {
  local rc=$?
  set +eu
  trap - EXIT
  trap "" INT TERM HUP  # finish the cleanup even if signalled again
  if [ -n "$run_pid" ]; then kill -TERM "$run_pid" 2>/dev/null; wait "$run_pid" 2>/dev/null; fi
  sweep
  save_logs
  remove_run "$ROOT"
  exit "$rc"
}

if [ -e "$ROOT" ]; then
  log "cleaning up after an earlier run ($ROOT)"
  sweep
  remove_run "$ROOT" || die "cannot clean up $ROOT; unmount what is listed and run again"
fi
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
mkdir -p "$ROOT/logs" "$ROOT/run" "$ROOT/sock" "$ROOT/bin"
chmod 755 "$ROOT" "$ROOT/run"
chown postgres: "$ROOT/sock" "$ROOT/logs"  # PostgreSQL writes its logs there too
runs=$ROOT/runs.jsonl
notes=$ROOT/setups.jsonl
: >"$runs"
: >"$notes"
note() { rep note --file "$notes" "$@"; }

# Starts CMD in the background with its output in LOG; its pid in $last_pid
# and appended to PIDFILE (the sweep stops those first).
start_proc() { # LOG PIDFILE CMD...
  local out=$1 pidfile=$2
  shift 2
  "$@" >"$out" 2>&1 &
  last_pid=$!
  echo "$last_pid" >>"$pidfile"
}

# Runs CMD in the background and waits for it, so a signal to the script is
# handled at once; returns CMD's status.
run_wait() {
  local rc=0
  "$@" &
  run_pid=$!
  wait "$run_pid" || rc=$?
  run_pid=""
  return "$rc"
}

bin=""
if has_setup robib; then
  bin=${ROBIB_BIN:-}
  if [ -z "$bin" ]; then
    log "building robib (make build into $ROOT/bin)"
    make -C "$repo" --no-print-directory build BIN="$ROOT/bin/robib" >&2 || die "make build failed"
    bin=$ROOT/bin/robib
  fi
  [ -x "$bin" ] || die "ROBIB_BIN $bin is not executable"
fi

# --- disks ---------------------------------------------------------------------
# attach_disk DIR URI: nbdfuse DIR/fuse/disk URI, a loop device on it, ext4,
# mounted on DIR/mnt with an empty DIR/mnt/pgdata owned by postgres.
attach_disk() {
  local d=$1 uri=$2 name i loop size
  name=$(basename "$d")
  mkdir -p "$d/fuse" "$d/mnt"
  start_proc "$ROOT/logs/$setup-$name-nbdfuse.log" "$ROOT/run/$setup/nbdfuse.pids" \
    nbdfuse -P "$d/nbdfuse.pid" "$d/fuse/disk" "$uri"
  local nf=$last_pid
  for i in $(seq 300); do
    if [ -s "$d/nbdfuse.pid" ]; then
      size=$(stat -c %s "$d/fuse/disk" 2>/dev/null || echo 0)
      [ "$size" = "$disk_bytes" ] && break
    fi
    alive "$nf" || { cat "$ROOT/logs/$setup-$name-nbdfuse.log" >&2; die "$setup: nbdfuse for $uri exited"; }
    sleep 0.1
  done
  [ "${size:-0}" = "$disk_bytes" ] || die "$setup: nbdfuse did not expose $d/fuse/disk with $disk_bytes bytes within 30 s"
  loop=$(losetup --find --show "$d/fuse/disk") || die "$setup: losetup on $d/fuse/disk failed"
  echo "$loop" >"$d/loop"
  # No discard (it would trim the whole disk) and no lazy init (it would
  # write inode tables in the background during the benchmark).
  mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 "$loop" >&2 || die "$setup: mkfs.ext4 $loop failed"
  mount -t ext4 "$loop" "$d/mnt" || die "$setup: mount $loop failed"
  install -d -o postgres -g postgres -m 700 "$d/mnt/pgdata"
  log "$setup: $uri -> nbdfuse $d/fuse/disk -> $loop -> ext4 on $d/mnt"
}

start_nbdkit() { # DIR: nbdkit file on a sparse DIR.img; sets nbd_uri
  local d=$1 port i
  port=$(ctl ports 1)
  truncate -s "$disk_bytes" "$d.img"
  start_proc "$ROOT/logs/$setup-$(basename "$d")-nbdkit.log" "$ROOT/run/$setup/servers.pids" \
    nbdkit -f -i 127.0.0.1 -p "$port" file "$d.img"
  nbd_uri="nbd://127.0.0.1:$port/"
  for i in $(seq 300); do
    nbdinfo --size "$nbd_uri" >/dev/null 2>&1 && return 0
    alive "$last_pid" || die "$setup: nbdkit exited: $(cat "$ROOT/logs/$setup-$(basename "$d")-nbdkit.log")"
    sleep 0.1
  done
  die "$setup: nbdkit did not answer within 30 s"
}

# --- PostgreSQL --------------------------------------------------------------
# The one postgresql.conf of every instance (appended to initdb's); the
# per-instance part is instance.conf.
common_conf() {
  cat <<'CONF'

# --- tests/bench/pgbench.sh: the same for every instance ---
listen_addresses = '127.0.0.1'
max_connections = 100
shared_buffers = 128MB
fsync = on
synchronous_commit = on
full_page_writes = on
wal_sync_method = fdatasync
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
checkpoint_timeout = 5min
max_wal_size = 1GB
log_checkpoints = on
log_line_prefix = '%m [%p] '
include_if_exists = 'instance.conf'
CONF
}

instance_conf() { # DATADIR PORT NAME [EXTRA-LINE...]: writes DATADIR/instance.conf
  local dd=$1 port=$2 name=$3
  shift 3
  {
    echo "port = $port"
    echo "unix_socket_directories = '$ROOT/sock'"
    echo "cluster_name = '$name'"
    local l
    for l in "$@"; do echo "$l"; done
  } | as_pg tee "$dd/instance.conf" >/dev/null
}

pg_initdb() { # DATADIR PORT NAME
  as_pg "$pgbin/initdb" -D "$1" -U postgres --auth=trust --no-locale -E UTF8 >"$ROOT/logs/$setup-$3-initdb.log" 2>&1 ||
    die "$setup: initdb $1 failed: $(tail -n 20 "$ROOT/logs/$setup-$3-initdb.log")"
  common_conf | as_pg tee -a "$1/postgresql.conf" >/dev/null
  instance_conf "$1" "$2" "$3"
}

pg_start() { # DATADIR NAME
  as_pg "$pgbin/pg_ctl" -D "$1" -l "$ROOT/logs/$setup-$2-postgres.log" -w -t 120 start >/dev/null ||
    die "$setup: PostgreSQL $2 did not start: $(tail -n 30 "$ROOT/logs/$setup-$2-postgres.log")"
}

psql_at() { # PORT SQL [DB]: one value out
  as_pg "$pgbin/psql" -X -A -t -q -v ON_ERROR_STOP=1 -h "$ROOT/sock" -p "$1" -d "${3:-postgres}" -c "$2"
}

# --- setups ------------------------------------------------------------------
# Each sets: pg_port (where pgbench connects), pg_ports (every instance, for
# CHECKPOINT), and for robib api/attached; for pgsync standby_port.
pg_port="" pg_ports=() api="" attached="" standby_port="" robib_urls=() nbd_uri=""
declare -A site_nbd=() site_pid=()

setup_nbd() {
  local d=$ROOT/run/nbd uri
  start_nbdkit "$d/disk0"
  uri=$nbd_uri
  attach_disk "$d/disk0" "$uri"
  pg_port=$(ctl ports 1)
  pg_initdb "$d/disk0/mnt/pgdata" "$pg_port" pg-nbd
  pg_start "$d/disk0/mnt/pgdata" pg-nbd
  pg_ports=("$pg_port")
  note nbd description "nbdkit $(nbdkit --version | awk '{print $2}') file plugin (defaults) on a sparse ${disk_gib} GiB file, $uri"
}

leader_now() {
  "$bin" --api "$api" cluster status --json 2>/dev/null |
    "$py" -c 'import json,sys; print(json.load(sys.stdin).get("leader") or "")' 2>/dev/null || true
}

setup_robib() {
  local d=$ROOT/run/robib i st leader s uri
  mkdir -p "$d"
  read -r -a p <<<"$(ctl ports 12)"
  robib_urls=()
  for i in 1 2 3; do
    local o=$(((i - 1) * 4))
    local args=(agent --name "site$i" --data-dir "$d/site$i"
      --nbd-addr "127.0.0.1:${p[o]}" --api-addr "127.0.0.1:${p[o + 1]}"
      --raft-addr "127.0.0.1:${p[o + 2]}" --gossip-addr "127.0.0.1:${p[o + 3]}"
      --bootstrap-expect 3)
    [ "$i" -gt 1 ] && args+=(--join "127.0.0.1:${p[3]}")
    start_proc "$ROOT/logs/robib-site$i.log" "$d/servers.pids" "$bin" "${args[@]}"
    site_nbd[site$i]="127.0.0.1:${p[o]}"
    site_pid[site$i]=$last_pid
    robib_urls+=("http://127.0.0.1:${p[o + 1]}")
  done
  api=${robib_urls[0]}
  log "robib: waiting for a leader and 3 voters"
  st=$(ctl cluster-wait --bin "$bin" --sites 3 --timeout 60 "${robib_urls[@]}") || {
    tail -n 20 "$ROOT"/logs/robib-site*.log >&2
    die "robib: the cluster did not form"
  }
  leader=$(leader_now)
  [ -n "$leader" ] || die "robib: no leader"
  "$bin" --api "$api" volume create pg --size "${disk_gib}GiB" >/dev/null || die "robib: volume create failed"
  attached=""
  for s in site1 site2 site3; do
    if [ "$s" != "$leader" ]; then attached=$s; break; fi
  done
  # The attached site is stopped first at teardown (while the other two
  # still form a majority).
  echo "${site_pid[$attached]}" >"$d/first.pids"
  uri="nbd://${site_nbd[$attached]}/pg"
  log "robib: leader $leader; attaching at $attached, a follower for now ($uri)"
  note robib leader_at_attach "$leader"
  note robib attached "$attached"
  attach_disk "$d/disk0" "$uri"
  pg_port=$(ctl ports 1)
  pg_initdb "$d/disk0/mnt/pgdata" "$pg_port" pg-robib
  pg_start "$d/disk0/mnt/pgdata" pg-robib
  pg_ports=("$pg_port")
  note robib description "robib $("$bin" --version 2>/dev/null | awk '{print $NF}') three agents on 127.0.0.1 (default flags: flush-timeout 30s, dcd-buffer 64MiB), volume pg ${disk_gib} GiB, $uri"
}

setup_pgsync() {
  local d=$ROOT/run/pgsync u0 u1 pdata sdata i st
  start_nbdkit "$d/disk0"
  u0=$nbd_uri
  start_nbdkit "$d/disk1"
  u1=$nbd_uri
  attach_disk "$d/disk0" "$u0"
  attach_disk "$d/disk1" "$u1"
  pdata=$d/disk0/mnt/pgdata
  sdata=$d/disk1/mnt/pgdata
  read -r pg_port standby_port <<<"$(ctl ports 2)"
  pg_initdb "$pdata" "$pg_port" pg-primary
  pg_start "$pdata" pg-primary
  # The standby: a base backup of the primary (WAL streamed along, a
  # physical slot created for it) into the empty pgdata, then its own port
  # and the connection back to the primary.
  as_pg "$pgbin/pg_basebackup" -h 127.0.0.1 -p "$pg_port" -U postgres -D "$sdata" \
    -X stream -c fast -C -S standby1_slot >"$ROOT/logs/pgsync-basebackup.log" 2>&1 ||
    die "pgsync: pg_basebackup failed: $(tail -n 20 "$ROOT/logs/pgsync-basebackup.log")"
  instance_conf "$sdata" "$standby_port" pg-standby \
    "primary_conninfo = 'host=127.0.0.1 port=$pg_port user=postgres application_name=standby1'" \
    "primary_slot_name = 'standby1_slot'"
  as_pg touch "$sdata/standby.signal"
  pg_start "$sdata" pg-standby
  # Only now make the primary wait for it, so nothing blocked meanwhile.
  instance_conf "$pdata" "$pg_port" pg-primary "synchronous_standby_names = 'standby1'"
  as_pg "$pgbin/pg_ctl" -D "$pdata" reload >/dev/null
  for i in $(seq 600); do
    st=$(psql_at "$pg_port" "select sync_state from pg_stat_replication where application_name = 'standby1' and state = 'streaming'" 2>/dev/null || true)
    [ "$st" = sync ] && break
    sleep 0.1
  done
  [ "$st" = sync ] || die "pgsync: the standby is not a synchronous streaming standby after 60 s (sync_state '$st')"
  log "pgsync: standby1 streaming, sync_state=sync"
  note pgsync standby_name standby1
  note pgsync sync_state "$st"
  pg_ports=("$pg_port" "$standby_port")
  note pgsync description "primary on $u0 and standby (pg_basebackup, physical slot) on $u1, both nbdkit file on sparse ${disk_gib} GiB files; synchronous_commit=on, synchronous_standby_names='standby1', streaming over 127.0.0.1"
}

# Waits until the setup has nothing left in flight: robib applied on every
# site, the standby replayed everything.
quiesce() {
  local st i lag
  case $setup in
    robib)
      st=$(ctl settle --bin "$bin" --timeout 300 "$api")
      case $st in *'"ok": true'*) ;; *) log "robib: the cluster did not settle within 300 s: $st" ;; esac
      echo "$st"
      ;;
    pgsync)
      for i in $(seq 600); do
        lag=$(psql_at "$pg_port" "select pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn) from pg_stat_replication where application_name = 'standby1'" 2>/dev/null || true)
        [ "$lag" = 0 ] && break
        sleep 0.1
      done
      echo "{\"standby_replay_lag_bytes\": \"${lag:-unknown}\"}"
      ;;
    *) echo '{}' ;;
  esac
}

prepare_run() { # before every timed run
  local p
  psql_at "$pg_port" "VACUUM pgbench_branches" bench >/dev/null
  psql_at "$pg_port" "VACUUM pgbench_tellers" bench >/dev/null
  psql_at "$pg_port" "TRUNCATE pgbench_history" bench >/dev/null
  for p in "${pg_ports[@]}"; do psql_at "$p" "CHECKPOINT" >/dev/null; done
  sync
}

server_samples() { # LABEL=PID of the NBD servers of this setup
  local p c
  for p in $(cat "$ROOT/run/$setup/servers.pids" 2>/dev/null || true); do
    alive "$p" || continue
    c=$(cat "/proc/$p/comm" 2>/dev/null || echo proc)
    echo "$c-$p=$p"
  done
}

# place_leader (robib): with --leader-follows-writes the leader moves to the
# site PostgreSQL writes at after a few seconds of sustained writes; the
# initial load may end before that. Untimed pgbench runs keep writing until
# it has moved (at most a minute), so every timed run measures the same
# placement. The runs' records name the leader before and after each.
place_leader() {
  local i l
  for i in $(seq 12); do
    l=$(leader_now)
    if [ "$l" = "$attached" ]; then
      log "robib: the leader is the writing site $attached"
      note robib leader_placed "$attached"
      return 0
    fi
    runuser -u postgres -- "$pgbin/pgbench" -n -c 4 -j 4 -T 5 -h "$ROOT/sock" -p "$pg_port" bench >/dev/null 2>&1 || true
  done
  log "robib: warning: the leader ($(leader_now)) did not move to the writing site $attached; flushes are forwarded"
}

failed=()

run_setup() {
  local c j out t0 t1 rc q before after leader_before leader_after dead
  setup=$1
  pg_port="" pg_ports=() api="" attached="" standby_port=""
  site_nbd=() site_pid=()
  mkdir -p "$ROOT/run/$setup"
  log "=== $setup ==="
  local since
  since=$(cut -d' ' -f1 /proc/uptime)
  "setup_$setup"
  psql_at "$pg_port" "select 1" >/dev/null
  as_pg "$pgbin/createdb" -h "$ROOT/sock" -p "$pg_port" bench
  log "$setup: pgbench -i -s $scale"
  t0=$(date +%s.%N)
  run_wait as_pg "$pgbin/pgbench" -i -s "$scale" -q -h "$ROOT/sock" -p "$pg_port" bench \
    >"$ROOT/logs/$setup-init.log" 2>&1 || die "$setup: pgbench -i failed: $(tail -n 20 "$ROOT/logs/$setup-init.log")"
  t1=$(date +%s.%N)
  note "$setup" init_s "$("$py" -c "print(round($t1-$t0,1))")"
  note "$setup" db_size "$(psql_at "$pg_port" "select pg_size_pretty(pg_database_size('bench'))")"
  if [ "$setup" = robib ]; then place_leader; fi
  for c in $clients; do
    j=$((c < 4 ? c : 4))
    prepare_run
    q=$(quiesce)
    leader_before=""
    [ "$setup" = robib ] && leader_before=$(leader_now)
    mapfile -t samp < <(server_samples)
    before=$(ctl sample "${samp[@]}")
    out=$ROOT/logs/$setup-c$c
    log "$setup: pgbench -c $c -j $j -T $time_s$([ -n "$attached" ] && echo " (attached at $attached, leader $leader_before)")"
    rc=0
    t0=$(date +%s.%N)
    run_wait timeout --kill-after=10 $((time_s + 180)) \
      runuser -u postgres -- "$pgbin/pgbench" -n -c "$c" -j "$j" -T "$time_s" -P 1 \
      -h "$ROOT/sock" -p "$pg_port" bench >"$out.out" 2>"$out.err" || rc=$?
    t1=$(date +%s.%N)
    after=$(ctl sample "${samp[@]}")
    leader_after=""
    [ "$setup" = robib ] && leader_after=$(leader_now)
    if [ "$rc" != 0 ]; then
      log "$setup: pgbench -c $c exited $rc:"
      tail -n 20 "$out.err" >&2
      failed+=("$setup: pgbench -c $c exited $rc")
    fi
    rep parse --stdout "$out.out" --stderr "$out.err" \
      --set "setup=\"$setup\"" --set "clients=$c" --set "threads=$j" --set "rc=$rc" \
      --set "elapsed_s=$("$py" -c "print(round($t1-$t0,2))")" \
      --set "loadavg1_after=$(cut -d' ' -f1 /proc/loadavg)" \
      --set "quiesce_before=$q" --set "servers_before=$before" --set "servers_after=$after" \
      --set "leader_before=\"$leader_before\"" --set "leader_after=\"$leader_after\"" \
      --set "attached=\"$attached\"" >>"$runs"
    tail -n 1 "$runs" | "$py" -c 'import json,sys; r=json.load(sys.stdin); print("pgbench: %s: %s clients: %s tps, %s ms average latency, %s s without a commit" % (r["setup"], r["clients"], r["tps"], r["latency_avg_ms"], r["seconds_without_commit"]))' >&2
    dead=""
    for p in $(cat "$ROOT/run/$setup/servers.pids" 2>/dev/null || true); do alive "$p" || dead+="$p "; done
    if [ -n "$dead" ]; then
      failed+=("$setup: server process(es) $dead died")
      log "$setup: server process(es) $dead died"
      break
    fi
  done
  if [ "$setup" = robib ]; then
    note robib leader_at_end "$(leader_now)"
    # The agents' own complaints while they served the benchmark.
    note robib agent_log "$(rep log-scan "$ROOT"/logs/robib-site*.log)"
  fi
  if [ "$setup" = pgsync ]; then
    note pgsync sync_state_end "$(psql_at "$pg_port" "select sync_state from pg_stat_replication where application_name = 'standby1'" || true)"
  fi
  log "$setup: tearing down"
  sweep
  # What went wrong underneath: PostgreSQL's complaints (a failed fsync is
  # a PANIC) and the kernel's I/O errors on the loop devices since the
  # setup started.
  note "$setup" pg_log_problems "$(cat "$ROOT/logs/$setup"-pg-*-postgres.log 2>/dev/null |
    grep -c -E 'PANIC|could not fsync|could not write|I/O error' || true)"
  note "$setup" kernel_io_errors "$(dmesg 2>/dev/null | awk -v t="$since" '
    { s = $0; sub(/^\[ */, "", s); split(s, a, "]") }
    a[1] + 0 >= t + 0 && /I\/O error|EXT4-fs error|blk_update_request|Buffer I\/O/' |
    "$py" -c 'import json,sys; print(json.dumps([l.rstrip() for l in sys.stdin][:20]))')"
  # Stopping the sites one by one makes the others log connection errors:
  # counted apart from those of the benchmark.
  [ "$setup" = robib ] && note robib agent_log_with_teardown "$(rep log-scan "$ROOT"/logs/robib-site*.log)"
  remove_run "$ROOT/run/$setup" || die "$setup: could not tear down"
  sync
}

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average at start: $load_start ($(nproc) CPUs)"
for s in nbd robib pgsync; do
  has_setup "$s" || continue
  run_setup "$s"
done

mkdir -p "$here/results"
elapsed=$(($(date +%s) - t_start))
quiesce_note=""
has_setup robib && quiesce_note+=", for robib a wait until every site applied the Raft log"
has_setup pgsync && quiesce_note+=", for PG sync replication a wait until the standby replayed all WAL"
meta=$("$py" -c 'import json,sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
  date "$(date -d "@$t_start" '+%Y-%m-%d %H:%M:%S %Z')" \
  time_s "$time_s" scale "$scale" setups "$setups" clients "$clients" disk_gib "$disk_gib" \
  git "$git_rev" pg_version "$pg_version" pgbin "$pgbin" \
  robib_version "$([ -n "$bin" ] && "$bin" --version 2>/dev/null || echo n/a)" \
  nbdkit_version "$(nbdkit --version 2>/dev/null | head -n 1)" \
  nbdfuse_version "$(nbdfuse --version 2>/dev/null | head -n 1)" \
  host_cpus "$(nproc)" mem_total "$(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)" \
  kernel "$(uname -r)" filesystem_of_tmp "$(stat -f -c %T "$ROOT")" \
  mkfs "mkfs.ext4 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0" \
  loadavg_start "$load_start" loadavg_end "$(cut -d' ' -f1-3 /proc/loadavg)" \
  quiesce_note "$quiesce_note" elapsed_s "$elapsed" \
  failures "$([ ${#failed[@]} = 0 ] || printf '%s; ' "${failed[@]}")")
rep report --runs "$runs" --setups "$notes" --meta "$meta" \
  --markdown "$here/results/pgbench-$stamp.md" --json "$here/results/pgbench-$stamp.json"
save_logs
echo >&2
log "results in tests/bench/results/pgbench-$stamp.{md,json} (logs in pgbench-$stamp.logs/); the run took ${elapsed}s"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'pgbench: FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
