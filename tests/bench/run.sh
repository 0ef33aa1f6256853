#!/usr/bin/env bash
# Benchmarks robib against plain NBD servers and the raw file system with the
# same fio workloads, all on this machine's one disk and 127.0.0.1, in one
# run, and prints markdown tables with ratios (written with a JSON copy of
# every raw number to tests/bench/results/bench-YYYYmmdd-HHMMSS.{md,json},
# UTC; that directory is gitignored). `make bench` runs it after the Go
# micro-benchmarks.
#
# Targets (BENCH_TARGETS, run one after another in this order; each target
# is started, prefilled, benchmarked with every job, then stopped and its
# data removed before the next one starts, so no two targets share the
# machine at once):
#   robib-3site          three `robib agent`s (site1..3, --bootstrap-expect 3,
#                        sites 2 and 3 --join site1's gossip address), one
#                        volume created once, product defaults. The write
#                        jobs run at one site, the WRITER: a follower when
#                        the target starts. With --leader-follows-writes
#                        (the default) the leader moves to the writer during
#                        the prefill; the script waits for that (writing
#                        more if needed) before the first job, and reports
#                        it. The read jobs run at a site that is not the
#                        leader
#   robib-3site-fwd      the same with --leader-follows-writes=false: fio at
#                        a follower (re-chosen before a job if leadership
#                        moved), so every write is forwarded to a remote
#                        leader. Runs BENCH_WAN_JOBS (the write jobs)
#   robib-3site-wan2ms   the same with an emulated WAN between the sites: every
#   robib-3site-wan10ms  agent runs with --link-delay 2ms / 10ms (a one-way
#                        delay on every site-to-site connection it dials, so a
#                        round trip between sites costs 4 / 20 ms; NBD is not
#                        delayed). Skipped, with a message, when the agent has
#                        no --link-delay flag. They run BENCH_WAN_JOBS: by
#                        default the write jobs only, as reads at a follower
#                        are served from its own copy and cross no link.
#                        The writer and leader as in robib-3site
#   robib-3site-tls      robib-3site with TLS and mutual authentication on
#                        every link, the product's default (the other robib
#                        targets run --insecure): certificates made with
#                        `robib cert`, fio over nbds:// with a client
#                        certificate, the CLI over HTTPS. Runs
#                        BENCH_TLS_JOBS (default rand-write-4k-flush
#                        rand-write-4k-qd32 seq-write-1M, those also in
#                        BENCH_JOBS) and is compared with robib-3site
#   robib-1site          one `robib agent`, a one-site cluster
#   nbdkit               `nbdkit file` on a sparse file, with the plugin's
#                        defaults (cache=default: through the page cache, 16
#                        threads, multi-conn) — "a plain file behind a mature
#                        NBD server"
#   nbdkit-tls           nbdkit as above with --tls=require and a certificate
#                        made with `robib cert`, fio over nbds:// with a client
#                        certificate: what NBD over TLS costs a mature server
#                        and this machine's NBD clients (fio's libnbd and
#                        GnuTLS share the same CPUs), the floor for
#                        robib-3site-tls's NBD link. Runs BENCH_TLS_JOBS
#   qemu-nbd             `qemu-nbd --format=raw --cache=writeback --aio=threads
#                        --shared=8 --persistent` on a sparse file: qemu's own
#                        defaults for a raw image (through the page cache, a
#                        flush is fdatasync(2), a thread pool for I/O), written
#                        out, plus room for the multi-conn job's connections
#                        (qemu-nbd then advertises multi-conn) — a plain NBD
#                        disk with no backup, like nbdkit
#   raw                  fio on a plain file, no NBD: the physical limit.
#                        ioengine psync (so iodepth 1) for the sequential 1 MiB
#                        jobs and every job listed with iodepth 1, libaio
#                        (iodepth as listed) for the others; through the page
#                        cache like the others (--direct=0, set
#                        BENCH_RAW_DIRECT=1 for O_DIRECT) and --invalidate=0 so
#                        fio does not drop the file's cache before a job (it
#                        cannot do that to the NBD targets either). After
#                        seq-write-1M it also runs seq-write-1M-direct (the same
#                        with O_DIRECT: the disk itself, for the 3-site limit)
#
# Jobs (BENCH_JOBS; each time-based, BENCH_RUNTIME seconds; one NBD connection
# unless stated; every target is written whole once beforehand, the
# "prefill", so reads hit data and writes overwrite allocated blocks):
#   seq-write-1M         sequential 1 MiB writes, iodepth 8
#   rand-write-4k-qd1    4 KiB random writes, iodepth 1
#   rand-write-4k-qd32   4 KiB random writes, iodepth 32 (was rand-write-4k)
#   rand-write-4k-flush  4 KiB random writes, iodepth 1, fsync=1 (an NBD flush,
#                        or fsync(2) on raw, after every write): flush latency
#                        p50/p99 (fio's sync latency) and flushes/s (was
#                        rand-write-4k-sync)
#   write-64k-flush-1M   sequential 64 KiB writes, iodepth 8, fsync=16 (a flush
#                        after every 1 MiB written). With the asynchronous nbd
#                        engine fio keeps issuing flushes, up to the queue
#                        depth, until the first completes, so an NBD target
#                        sees more than one flush per MiB (raw: fio waits for
#                        the queue, then fsync(2)s once); compare MiB/s and
#                        flush latency, not flushes/s
#   seq-read-1M          sequential 1 MiB reads, iodepth 8
#   rand-read-4k         4 KiB random reads, iodepth 32
#   multi-conn           4 KiB random writes from 4 fio jobs (numjobs=4,
#                        group_reporting), each with its own NBD connection,
#                        iodepth 8 each
# Reads go to a site that is not the leader. The old names rand-write-4k and rand-write-4k-sync are accepted
# in BENCH_JOBS for the renamed jobs.
#
# After every fio run of a robib target the script waits until the cluster
# has settled (the commit index is stable and every site has applied it), so
# write-back left over from one job never runs under the next; the wait is
# reported ("settle"), and it counts in the agents' CPU per GiB written.
# After every fio run it calls sync(1) so dirty pages of one job are not
# written back during the next.
#
# Besides fio's numbers the report has, per robib agent (and nbdkit and
# qemu-nbd, for reference): peak RSS (VmHWM from /proc/PID/status when the
# target is stopped), CPU seconds (utime+stime from /proc/PID/stat) in total
# and during the write phases (prefill and write jobs, each with its settle
# wait), and the latter per GiB the client wrote. The ratio columns are
# robib-3site and robib-1site over the better of nbdkit and qemu-nbd, and the
# WAN targets over robib-3site. The derived "3-site sequential write limit"
# is raw seq-write bandwidth / 6 (each of three sites writes every byte
# twice, Raft log then volume, all on this one disk). Last, the issue's goals
# as PASS/FAIL/SKIP lines (informational: they do not change the exit code);
# see report.py.
#
# Environment:
#   BENCH_TARGETS    space-separated targets (default: all of the above, in
#                    that order)
#   BENCH_JOBS       space-separated subset of the job names above (default all)
#   BENCH_WAN_JOBS   jobs for the robib-3site-wan* targets (default: the write
#                    jobs of BENCH_JOBS); only jobs also in BENCH_JOBS run
#   BENCH_RUNTIME    seconds per job and target (default 10)
#   BENCH_SIZE       volume/file size (default 1GiB; a multiple of 1 MiB)
#   BENCH_DIR        working directory, kept afterwards (default: a new one
#                    under /var/tmp, removed at exit)
#   BENCH_RAW_DIRECT 1 = raw target uses O_DIRECT (default 0)
#   BENCH_TLS_JOBS   jobs for robib-3site-tls (see above)
#   BENCH_TLS_NBD    0: robib-3site-tls runs its agents with --nbd-tls off and
#                    fio over plain nbd:// (TLS on the site links only), to
#                    tell the NBD link's share of the cost from the rest
#   BENCH_ROBIB_ARGS extra flags for every robib agent (word-split), e.g.
#                    "--dcd-buffer 128MiB"
#   ROBIB_BIN        robib binary (default: build ./cmd/robib into the working dir)
#
# It prints an estimate of its total run time at the start. With the defaults
# (7 targets, 10 s per job, 1 GiB) that is about 14 minutes on a 2-CPU VM;
# `make bench` adds a minute or two of Go micro-benchmarks.
#
# Every process the script starts is stopped when it exits, however it exits
# (SIGTERM, then SIGKILL after 30 s); only a SIGKILL of the script itself
# can leave agents behind.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
all_jobs=" seq-write-1M rand-write-4k-qd1 rand-write-4k-qd32 rand-write-4k-flush write-64k-flush-1M seq-read-1M rand-read-4k multi-conn "
all_targets=" robib-3site robib-3site-tls robib-3site-fwd robib-3site-wan2ms robib-3site-wan10ms robib-1site nbdkit nbdkit-tls qemu-nbd raw "
runtime=${BENCH_RUNTIME:-10}
size=${BENCH_SIZE:-1GiB}
jobs=${BENCH_JOBS:-$all_jobs}
targets=${BENCH_TARGETS:-$all_targets}
raw_direct=${BENCH_RAW_DIRECT:-0}
read -r -a robib_args <<<"${BENCH_ROBIB_ARGS:-}"
t_start=$(date +%s)
stamp=$(date -u +%Y%m%d-%H%M%S)   # names the results: tests/bench/results/bench-$stamp.*
results=$here/results
# The tree as built (the repo may change while the benchmark runs).
git_rev=$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)

die() { echo "bench: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is missing ($2)"; }

# --- arguments and tools, checked before anything starts -------------------
[[ $runtime =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNTIME must be a positive number of seconds, not '$runtime'"
[[ $raw_direct =~ ^[01]$ ]] || die "BENCH_RAW_DIRECT must be 0 or 1"
canon_jobs() { # JOB...: the job names, old names mapped to new ones, checked, deduplicated
  local j list=()
  for j in "$@"; do
    case $j in
      rand-write-4k) j=rand-write-4k-qd32 ;;
      rand-write-4k-sync) j=rand-write-4k-flush ;;
    esac
    [[ $all_jobs == *" $j "* ]] || die "unknown job '$j' (jobs:$all_jobs)"
    [[ " ${list[*]} " == *" $j "* ]] || list+=("$j")
  done
  echo "${list[*]}"
}
# shellcheck disable=SC2086 # word-splitting the lists is intended
jobs=$(canon_jobs $jobs)
[ -n "$jobs" ] || die "BENCH_JOBS is empty"
read -r -a tl <<<"$targets"
targets=${tl[*]}
[ -n "$targets" ] || die "BENCH_TARGETS is empty"
for t in $targets; do [[ $all_targets == *" $t "* ]] || die "unknown target '$t' (targets:$all_targets)"; done
if [ -n "${BENCH_WAN_JOBS:-}" ]; then
  # shellcheck disable=SC2086
  wan_jobs=$(canon_jobs $BENCH_WAN_JOBS)
else
  wan_jobs=""
  for j in $jobs; do
    if [[ $j != *read* ]]; then wan_jobs+="$j "; fi
  done
fi
wan_list=""   # BENCH_JOBS in its order, restricted to the WAN jobs
for j in $jobs; do
  if [[ " $wan_jobs " == *" $j "* ]]; then wan_list+="$j "; fi
done
wan_list=${wan_list% }
tls_list=""   # BENCH_JOBS in its order, restricted to BENCH_TLS_JOBS
read -r -a tls_wanted <<<"${BENCH_TLS_JOBS:-rand-write-4k-flush rand-write-4k-qd32 seq-write-1M}"
tls_jobs=$(canon_jobs "${tls_wanted[@]}")
for j in $jobs; do
  if [[ " $tls_jobs " == *" $j "* ]]; then tls_list+="$j "; fi
done
tls_list=${tls_list% }
has_target() { [[ " $targets " == *" $1 "* ]]; }
has_robib() { [[ " $targets " == *" robib-"* ]]; }
is_3site() { [[ $1 == robib-3site* ]]; }
follows() { [[ $1 == robib-3site* && $1 != robib-3site-fwd ]]; } # leadership follows the writer
link_delay() { # TARGET: its --link-delay ("" for none)
  case $1 in
    robib-3site-wan2ms) echo 2ms ;;
    robib-3site-wan10ms) echo 10ms ;;
  esac
}
target_jobs() { # TARGET: the jobs it runs
  if [ "$1" = robib-3site-tls ] || [ "$1" = nbdkit-tls ]; then echo "$tls_list";
  elif [ -n "$(link_delay "$1")" ] || [ "$1" = robib-3site-fwd ]; then echo "$wan_list"; else echo "$jobs"; fi
}
tls_target() { [ "$1" = robib-3site-tls ]; }
nbd_uri() { # HOST:PORT: the URI of the bench volume there (nbds:// for the TLS target)
  if [ -n "$tls_client" ] && [ "${BENCH_TLS_NBD:-1}" = 1 ]; then echo "nbds://$1/bench"; else echo "nbd://$1/bench"; fi
}
make_pki() { # DIR: a cluster CA, site1..3 and the client "bench" (robib cert), in DIR
  local i
  "$bin" cert ca --out "$1/ca" >/dev/null || die "robib cert ca failed"
  for i in 1 2 3; do
    "$bin" cert issue --ca "$1/ca" --name "site$i" --kind site --ip 127.0.0.1 --out "$1/site$i" >/dev/null ||
      die "robib cert issue site$i failed"
  done
  "$bin" cert issue --ca "$1/ca" --name bench --kind client --out "$1/bench" >/dev/null || die "robib cert issue bench failed"
  # fio's nbd engine may not name a certificate directory in its URI
  # (libnbd refuses local files there), so libnbd finds the client's in
  # its default place, $HOME/.pki/libnbd, with HOME pointed here while the
  # TLS target runs.
  mkdir -p "$1/home/.pki"
  cp -r "$1/bench" "$1/home/.pki/libnbd"
}

need python3 "apt-get install python3"
py=$(command -v python3)
ctl() { "$py" "$here/benchctl.py" "$@"; }
need fio "ops/scripts/install-test-tools.sh"
if has_robib || has_target nbdkit || has_target qemu-nbd; then
  fio --enghelp=nbd >/dev/null 2>&1 || die "fio has no nbd engine (fio built without libnbd; ops/scripts/install-test-tools.sh)"
  need nbdinfo "ops/scripts/install-test-tools.sh"
fi
if has_target raw; then
  fio --enghelp=libaio >/dev/null 2>&1 || die "fio has no libaio engine"
fi
if has_target nbdkit || has_target nbdkit-tls; then
  need nbdkit "ops/scripts/install-test-tools.sh"
fi
if has_target qemu-nbd; then
  need qemu-nbd "qemu-utils; ops/scripts/install-test-tools.sh"
fi
need sync coreutils
bytes=$(ctl size "$size")

# --- working directory, processes, cleanup ----------------------------------
work=${BENCH_DIR:-$(mktemp -d /var/tmp/robib-bench.XXXXXX)}
mkdir -p "$work"
out=$work/fio
rm -rf "$out"
mkdir -p "$out"
phases=$out/phases.jsonl
pids=()    # every process started (agents, nbdkit, qemu-nbd)
fio_pid=""
current="" # the target being run
# Per-target state, set by the setup_* functions.
target_pids=()   # this target's processes
samples=()       # LABEL=PID of the processes whose CPU/RSS we record
api=""           # robib admin API used for settle/leader queries ("" = not robib)
tls_client=""    # the bench client certificate directory of robib-3site-tls ("" = plaintext)
home=${HOME:-/root} # HOME as the script started (robib-3site-tls points it at its client certificate)
uri=""           # NBD URI fio uses
raw_file=""
attached=""      # robib-3site*: the site fio is attached to
writer=""        # robib-3site (not -fwd): the site the write jobs run at
declare -A site_nbd=() site_pid=() site_api=()

# shellcheck source=tests/bench/lib.sh
. "$here/lib.sh"

cleanup() {
  local rc=$?
  set +eu
  trap - EXIT
  trap "" INT TERM HUP  # finish the cleanup even if signalled again
  if [ -n "$fio_pid" ]; then kill -TERM "$fio_pid" 2>/dev/null; wait "$fio_pid" 2>/dev/null; fi
  stop_target
  stop_pids "${pids[@]}"
  if [ -n "$current" ]; then keep_logs "$current"; fi
  if [ -z "${BENCH_DIR:-}" ]; then rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

stop_target() {
  # The site fio wrote through stops first, while the others still form a
  # majority: an agent commits its buffered writes before it exits and
  # waits for a quorum to do so, so stopping its peers first would hold it
  # until stop_pids gives up on it.
  if [ -n "$attached" ] && [ -n "${site_pid[$attached]:-}" ]; then stop_pids "${site_pid[$attached]}"; fi
  stop_pids "${target_pids[@]}"
}

start_proc() { # LOG CMD...: starts CMD in the background, records its pid in $last_pid
  local log=$1; shift
  "$@" >"$log" 2>&1 &
  last_pid=$!
  pids+=("$last_pid")
}

bin=""
skipped=()   # "target: reason", targets left out of this run
drop_target() { # TARGET REASON
  local t keep=""
  for t in $targets; do [ "$t" = "$1" ] || keep+="$t "; done
  targets=${keep% }
  skipped+=("$1: $2")
  echo "bench: skipping $1: $2" >&2
}
if has_robib || has_target nbdkit-tls; then # nbdkit-tls: robib cert makes its certificates
  bin=${ROBIB_BIN:-}
  if [ -z "$bin" ]; then
    need go "Go toolchain, or set ROBIB_BIN"
    echo "bench: building robib" >&2
    (cd "$root" && CGO_ENABLED=0 go build -trimpath -o "$work/robib" ./cmd/robib) || die "building robib failed"
    bin=$work/robib
  fi
  [ -x "$bin" ] || die "ROBIB_BIN $bin is not executable"
  # Plaintext targets run --insecure (an agent from before TLS has no such
  # flag, and needs none); robib-3site-tls needs an agent with TLS.
  insecure=()
  if "$bin" agent --help 2>&1 | grep -q -- --insecure; then
    insecure=(--insecure)
  elif has_target robib-3site-tls; then
    drop_target robib-3site-tls "this robib agent has no TLS (no --insecure flag)"
  fi
  for t in $targets; do
    [ -n "$(link_delay "$t")" ] || continue
    if ! "$bin" agent --help 2>&1 | grep -q -- --link-delay; then
      drop_target "$t" "this robib agent has no --link-delay flag (no WAN emulation)"
    elif [ -z "$wan_list" ]; then
      drop_target "$t" "none of BENCH_JOBS is in BENCH_WAN_JOBS"
    fi
  done
  if has_target nbdkit-tls && [ -z "$tls_list" ]; then
    drop_target nbdkit-tls "none of BENCH_JOBS is in BENCH_TLS_JOBS"
  fi
  if has_target robib-3site-tls && [ -z "$tls_list" ]; then
    drop_target robib-3site-tls "none of BENCH_JOBS is in BENCH_TLS_JOBS"
  fi
  if has_target robib-3site-fwd && [ -z "$wan_list" ]; then
    drop_target robib-3site-fwd "none of BENCH_JOBS is in BENCH_WAN_JOBS"
  fi
  [ -n "$targets" ] || die "no target left to run"
fi

# --- expected run time --------------------------------------------------------
# fio time is exact; the rest (start, prefill, settle waits, stop) is a rough
# per-target figure from runs on a busy 2-CPU VM: 10-15 s to start and stop
# a robib target, its prefill at ~150 MiB/s (3-site ~40 MiB/s, with a 10 ms
# WAN ~25 MiB/s) and a settle wait of a few seconds after every write job.
estimate=0
for t in $targets; do
  n=0
  for j in $(target_jobs "$t"); do n=$((n + 1)); done
  [ "$t" = raw ] && n=$((n + 1))   # seq-write-1M-direct
  mib=$((bytes >> 20))
  case $t in
    robib-3site-wan10ms) extra=$((15 + mib / 25 + 5 * n)) ;;
    robib-3site*) extra=$((15 + mib / 40 + 4 * n)) ;;
    robib-1site) extra=$((10 + mib / 150 + 2 * n)) ;;
    *) extra=$((2 + mib / 300 + n)) ;;
  esac
  estimate=$((estimate + n * runtime + extra))
done
echo "bench: targets: $targets" >&2
echo "bench: jobs: $jobs${wan_list:+ (WAN targets: $wan_list)}; ${runtime}s each, $size" >&2
echo "bench: expected run time about $(((estimate + 59) / 60)) min (${estimate}s)" >&2

# --- jobs -------------------------------------------------------------------
job_args() { # JOB TARGET: fio arguments of JOB for TARGET
  local rw bs qd nj=1 extra=() eng
  case $1 in
    prefill)             rw=write     bs=1M  qd=8 ;;
    seq-write-1M*)       rw=write     bs=1M  qd=8 ;;
    rand-write-4k-qd1)   rw=randwrite bs=4k  qd=1 ;;
    rand-write-4k-qd32)  rw=randwrite bs=4k  qd=32 ;;
    rand-write-4k-flush) rw=randwrite bs=4k  qd=1 extra=(--fsync=1) ;;
    write-64k-flush-1M)  rw=write     bs=64k qd=8 extra=(--fsync=16) ;;
    seq-read-1M)         rw=read      bs=1M  qd=8 ;;
    rand-read-4k)        rw=randread  bs=4k  qd=32 ;;
    multi-conn)          rw=randwrite bs=4k  qd=8 nj=4 ;;
    *) die "unknown job $1" ;;
  esac
  if [ "$2" = raw ]; then
    if [ "$bs" != 1M ] && [ "$qd" -gt 1 ]; then eng=libaio; else eng=psync qd=1; fi
    echo "--ioengine=$eng --filename=$raw_file --direct=$raw_direct --invalidate=0 --rw=$rw --bs=$bs --iodepth=$qd --numjobs=$nj ${extra[*]}"
  else
    # numjobs > 1: every fio job opens its own NBD connection.
    echo "--ioengine=nbd --uri=$uri --rw=$rw --bs=$bs --iodepth=$qd --numjobs=$nj ${extra[*]}"
  fi
}

common=(--size="$bytes" --group_reporting --randrepeat=0 --output-format=json)

leader_now() {
  "$bin" --api "$api" cluster status --json 2>/dev/null |
    "$py" -c 'import json,sys; print(json.load(sys.stdin).get("leader") or "")' 2>/dev/null || true
}

target_dead() { # prints the labels of this target's dead processes
  local s
  for s in "${samples[@]}"; do alive "${s#*=}" || echo "${s%%=*}"; done
}

show_logs() { # tails the logs of this target
  local f
  for f in "$work/$1"/*.log; do
    [ -e "$f" ] || continue
    echo "--- $f (last 30 lines)" >&2
    tail -n 30 "$f" >&2
  done
}

setup_robib_3site() { # TARGET: robib-3site or one of its WAN variants
  local t=$1 d=$work/$1 i st delay scheme=http
  delay=$(link_delay "$t")
  mkdir -p "$d"
  read -r -a p <<<"$(ctl ports 12)"
  local urls=()
  if tls_target "$t"; then
    make_pki "$d/pki"
    scheme=https
    tls_client=$d/pki/bench
    export HOME=$d/pki/home
    # The CLI (and benchctl.py's calls of it) authenticate as "bench".
    export ROBIB_TLS_CA=$tls_client/ca-cert.pem ROBIB_TLS_CERT=$tls_client/client-cert.pem ROBIB_TLS_KEY=$tls_client/client-key.pem
  fi
  for i in 1 2 3; do
    local o=$(((i - 1) * 4))
    local args=(agent --name "site$i" --data-dir "$d/site$i"
      --nbd-addr "127.0.0.1:${p[o]}" --api-addr "127.0.0.1:${p[o + 1]}"
      --raft-addr "127.0.0.1:${p[o + 2]}" --gossip-addr "127.0.0.1:${p[o + 3]}"
      --bootstrap-expect 3 --log-level warn)
    [ "$i" -gt 1 ] && args+=(--join "127.0.0.1:${p[3]}")
    [ -n "$delay" ] && args+=(--link-delay "$delay")
    [ "$t" = robib-3site-fwd ] && args+=(--leader-follows-writes=false)
    if tls_target "$t"; then
      args+=(--tls-ca "$d/pki/site$i/ca-cert.pem" --tls-cert "$d/pki/site$i/server-cert.pem" --tls-key "$d/pki/site$i/server-key.pem")
      [ "${BENCH_TLS_NBD:-1}" = 1 ] || args+=(--nbd-tls off)
    else
      args+=("${insecure[@]}")
    fi
    args+=("${robib_args[@]}")
    start_proc "$d/site$i.log" "$bin" "${args[@]}"
    target_pids+=("$last_pid")
    samples+=("site$i=$last_pid")
    site_nbd[site$i]="127.0.0.1:${p[o]}"
    site_pid[site$i]=$last_pid
    site_api[site$i]="$scheme://127.0.0.1:${p[o + 1]}"
    urls+=("$scheme://127.0.0.1:${p[o + 1]}")
  done
  api=${urls[0]}
  echo "bench: $t: waiting for a leader and 3 voters${delay:+ (link delay $delay one way)}" >&2
  if ! st=$(ctl cluster-wait --bin "$bin" --sites 3 --timeout 60 "${urls[@]}"); then
    show_logs "$t"
    die "$t: the cluster did not form"
  fi
  echo "bench: $t: leader $(leader_now)" >&2
  "$bin" --api "$api" volume create bench --size "$bytes" >/dev/null
  check_volume
}

setup_robib_1site() {
  local d=$work/robib-1site
  mkdir -p "$d"
  read -r -a p <<<"$(ctl ports 4)"
  start_proc "$d/solo.log" "$bin" agent --name solo --data-dir "$d/solo" \
    --nbd-addr "127.0.0.1:${p[0]}" --api-addr "127.0.0.1:${p[1]}" \
    --raft-addr "127.0.0.1:${p[2]}" --gossip-addr "127.0.0.1:${p[3]}" --log-level warn "${insecure[@]}" "${robib_args[@]}"
  target_pids+=("$last_pid")
  samples+=("solo=$last_pid")
  api="http://127.0.0.1:${p[1]}"
  if ! ctl cluster-wait --bin "$bin" --sites 1 --timeout 60 "$api" >/dev/null; then
    show_logs robib-1site
    die "robib-1site: the agent did not become leader"
  fi
  "$bin" --api "$api" volume create bench --size "$bytes" >/dev/null
  check_volume
  uri="nbd://127.0.0.1:${p[0]}/bench"
}

check_volume() {
  local got
  got=$("$bin" --api "$api" volume list --json |
    "$py" -c 'import json,sys; print([v["size"] for v in json.load(sys.stdin) if v["name"]=="bench"][0])')
  [ "$got" = "$bytes" ] || die "volume bench has $got bytes, want $bytes"
}

setup_nbdkit() {
  local d=$work/nbdkit
  mkdir -p "$d"
  read -r -a p <<<"$(ctl ports 1)"
  truncate -s "$bytes" "$d/disk.img"
  start_proc "$d/nbdkit.log" nbdkit --exit-with-parent -f -i 127.0.0.1 -p "${p[0]}" file "$d/disk.img"
  target_pids+=("$last_pid")
  samples+=("nbdkit=$last_pid")
  uri="nbd://127.0.0.1:${p[0]}/"
  wait_nbd nbdkit "$last_pid"
}

wait_nbd() { # TARGET PID: waits until the server at $uri answers with the right size
  local i got
  for i in $(seq 300); do
    if got=$(nbdinfo --size "$uri" 2>/dev/null); then
      [ "$got" = "$bytes" ] || die "$1: $uri has $got bytes, want $bytes"
      return 0
    fi
    alive "$2" || { show_logs "$1"; die "$1 exited"; }
    sleep 0.1
  done
  show_logs "$1"
  die "$1 did not answer within 30 s"
}

setup_nbdkit_tls() {
  local d=$work/nbdkit-tls
  mkdir -p "$d"
  read -r -a p <<<"$(ctl ports 1)"
  make_pki "$d/pki"
  tls_client=$d/pki/bench
  export HOME=$d/pki/home # fio's and nbdinfo's libnbd find the client certificate there
  truncate -s "$bytes" "$d/disk.img"
  start_proc "$d/nbdkit.log" nbdkit --exit-with-parent -f -i 127.0.0.1 -p "${p[0]}" --tls=require \
    --tls-certificates="$d/pki/site1" file "$d/disk.img"
  target_pids+=("$last_pid")
  samples+=("nbdkit=$last_pid")
  uri="nbds://127.0.0.1:${p[0]}/"
  wait_nbd nbdkit-tls "$last_pid"
}

setup_qemu_nbd() {
  local d=$work/qemu-nbd
  mkdir -p "$d"
  read -r -a p <<<"$(ctl ports 1)"
  truncate -s "$bytes" "$d/disk.img"
  start_proc "$d/qemu-nbd.log" qemu-nbd --format=raw --cache=writeback --aio=threads \
    --shared=8 --persistent --bind=127.0.0.1 --port="${p[0]}" --export-name=bench "$d/disk.img"
  target_pids+=("$last_pid")
  samples+=("qemu-nbd=$last_pid")
  uri="nbd://127.0.0.1:${p[0]}/bench"
  wait_nbd qemu-nbd "$last_pid"
}

setup_raw() {
  mkdir -p "$work/raw"
  raw_file=$work/raw/disk.img
  truncate -s "$bytes" "$raw_file"
}

pick_site() { # TARGET JOB (3-site): sets $attached for JOB and $uri
  local leader s
  leader=$(leader_now)
  [ -n "$leader" ] || die "$1: no leader known at $api"
  if follows "$1" && [[ $2 != *read* ]]; then
    # Writes: always at the writer site, a follower when the target started.
    if [ -z "$writer" ]; then
      for s in site1 site2 site3; do
        if [ "$s" != "$leader" ]; then writer=$s; break; fi
      done
    fi
    attached=$writer
  elif [ -z "$attached" ] || [ "$attached" = "$leader" ]; then
    if [ -n "$attached" ] && ! follows "$1"; then echo "bench: $1: $attached became leader; moving fio to another follower" >&2; fi
    attached=""
    for s in site1 site2 site3; do
      if [ "$s" != "$leader" ]; then attached=$s; break; fi
    done
  fi
  uri=$(nbd_uri "${site_nbd[$attached]}")
  leader_before=$leader
}

place_leader() { # TARGET: after the prefill, waits until the leader is the writer
  local t=$1 i leader t0
  follows "$t" || return 0
  t0=$(date +%s)
  for i in $(seq 12); do
    leader=$(leader_now)
    if [ "$leader" = "$writer" ]; then
      echo "bench: $t: the leader is the writer site $writer ($(($(date +%s) - t0)) s after the prefill)" >&2
      return 0
    fi
    # Keep writing at the writer (not recorded) so the leader sees it.
    fio --name=place "${common[@]}" --ioengine=nbd --uri="$uri" --rw=randwrite --bs=64k --iodepth=8 \
      --time_based --runtime=5 --output=/dev/null >/dev/null 2>&1 || true
  done
  echo "bench: $t: warning: leadership did not move to the writer $writer (leader $(leader_now)); write jobs are forwarded" >&2
}

sample() { if [ ${#samples[@]} -gt 0 ]; then ctl sample "${samples[@]}"; else echo '{}'; fi; }

failed=()   # "target: reason"

run_phase() { # TARGET PHASE: one fio run (+ settle, sync) and its record; non-zero if the target died
  local t=$1 job=$2 before after settle="" rc=0 t0 t1 dead
  leader_before=""
  if is_3site "$t"; then pick_site "$t" "$job"; fi
  echo "bench: $t: $job${attached:+ at $attached (leader $leader_before)}$([ "$job" = prefill ] || echo " (${runtime}s)")" >&2
  before=$(sample)
  local tb=()
  [ "$job" = prefill ] || tb=(--time_based --runtime="$runtime")
  t0=$(date +%s.%N)
  # shellcheck disable=SC2046
  fio --name="$job" "${common[@]}" $(job_args "$job" "$t") "${tb[@]}" \
    --output="$out/$job-$t.json" >/dev/null 2>"$out/$job-$t.err" &
  fio_pid=$!
  local stage_pid=""
  if [ -n "$api" ] && [ "$job" = rand-write-4k-flush ]; then
    # The write-back stage's own view of a replicated commit (its latency
    # percentiles), sampled at the attached site just before fio ends:
    # the stage lives as long as fio's connection.
    local stage_api=$api
    [ -n "$attached" ] && stage_api=${site_api[$attached]}
    (sleep "$((runtime > 2 ? runtime - 1 : 1))"
     "$bin" --api "$stage_api" volume stats bench --json >"$out/stage-$job-$t.json" 2>/dev/null || true) &
    stage_pid=$!
  fi
  wait "$fio_pid" || rc=$?
  if [ -n "$stage_pid" ]; then wait "$stage_pid" || true; fi
  fio_pid=""
  t1=$(date +%s.%N)
  if [ "$rc" != 0 ]; then
    echo "bench: $t: fio $job exited $rc:" >&2
    tail -n 20 "$out/$job-$t.err" >&2
  fi
  if [ -n "$api" ]; then
    settle=$(ctl settle --bin "$bin" --timeout 300 "$api")
    case $settle in *'"ok": true'*) ;; *) echo "bench: $t: cluster did not settle within 300 s after $job: $settle" >&2 ;; esac
  fi
  sync
  after=$(sample)
  ctl record --file "$phases" --target "$t" --phase "$job" --fio-rc "$rc" \
    --elapsed "$("$py" -c "print(round($t1-$t0,2))")" --attached "$attached" --leader-before "$leader_before" \
    --before "$before" --after "$after" --settle "$settle"
  dead=$(target_dead)
  if [ -n "$dead" ]; then
    echo "bench: $t: process(es) died during $job: $dead" >&2
    show_logs "$t"
    failed+=("$t: $(echo "$dead" | tr '\n' ' ')died during $job")
    return 1
  fi
  [ "$rc" = 0 ] || failed+=("$t: fio $job exited $rc")
  return 0
}

run_target() { # TARGET
  local t=$1 job
  target_pids=() samples=() api="" uri="" raw_file="" attached="" writer="" tls_client=""
  site_nbd=() site_pid=() site_api=()
  unset ROBIB_TLS_CA ROBIB_TLS_CERT ROBIB_TLS_KEY
  export HOME=$home
  echo "bench: === $t ===" >&2
  current=$t
  case $t in
    robib-3site*) setup_robib_3site "$t" ;;
    robib-1site) setup_robib_1site ;;
    nbdkit) setup_nbdkit ;;
    nbdkit-tls) setup_nbdkit_tls ;;
    qemu-nbd) setup_qemu_nbd ;;
    raw) setup_raw ;;
  esac
  if [ -n "$api" ]; then ctl settle --bin "$bin" --timeout 60 "$api" >/dev/null; fi
  if run_phase "$t" prefill; then
    place_leader "$t"
    for job in $(target_jobs "$t"); do
      run_phase "$t" "$job" || break
      # The disk's own sequential write rate for the derived 3-site limit:
      # buffered raw writes of a file that fits in the dirty page cache
      # measure memcpy, not the disk.
      if [ "$t" = raw ] && [ "$job" = seq-write-1M ] && [ "$raw_direct" = 0 ]; then
        raw_direct=1
        run_phase "$t" seq-write-1M-direct || true
        raw_direct=0
      fi
    done
  fi
  # VmHWM and CPU at the end, just before the processes stop.
  ctl record --file "$phases" --target "$t" --phase end --after "$(sample)" \
    --leader-before "$( [ -n "$api" ] && leader_now)" --attached "$attached"
  mark_logs "$t"
  stop_target
  target_pids=() attached=""
  keep_logs "$t"
  current=""
  if [ -z "${BENCH_DIR:-}" ]; then
    rm -rf "${work:?}/$t"
  else
    rm -f "$work/$t"/*.img
    rm -rf "$work/$t"/site[0-9] "$work/$t/solo"
  fi
  sync
}

log_notes=()   # "TARGET/LOG: what it holds", for the report
declare -A log_mark=()   # log file -> its line count when the target was stopped
mark_logs() { # TARGET: notes how long its logs are before it is stopped
  local f
  for f in "$work/$1"/*.log; do
    if [ -e "$f" ]; then log_mark[$f]=$(wc -l <"$f"); fi
  done
}
keep_logs() { # TARGET: copies its server logs next to the results and counts what they hold
  local t=$1 f n m e w dst=$results/bench-$stamp.logs/$1
  for f in "$work/$t"/*.log; do
    [ -s "$f" ] || continue
    mkdir -p "$dst"
    cp "$f" "$dst/"
    n=$(wc -l <"$f")
    m=${log_mark[$f]:-$n}   # lines written before the stop (peers complain while others exit)
    if [[ $t == robib-* ]]; then
      e=$(head -n "$m" "$f" | grep -c 'level=ERROR' || true)
      w=$(head -n "$m" "$f" | grep -c 'level=WARN' || true)
      log_notes+=("$t/$(basename "$f"): $e ERROR, $w WARN while running, $((n - m)) lines while stopping")
    else
      log_notes+=("$t/$(basename "$f"): $m lines while running, $((n - m)) while stopping")
    fi
  done
}

# Anything else running here skews every number: say so in the report.
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
others=$(pgrep -c -x robib 2>/dev/null || true)
[ "${others:-0}" = 0 ] || echo "bench: warning: $others robib process(es) not started by this benchmark are running" >&2
for t in $targets; do
  run_target "$t"
done

mkdir -p "$results"
elapsed=$(($(date +%s) - t_start))
meta=$("$py" -c 'import json,sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
  runtime_s "$runtime" size_bytes "$bytes" targets "$targets" jobs "$jobs" wan_jobs "$wan_list" \
  skipped "$([ ${#skipped[@]} = 0 ] || printf '%s; ' "${skipped[@]}")" robib_args "${robib_args[*]}" \
  estimate_s "$estimate" stamp_utc "$stamp" \
  server_logs "$([ ${#log_notes[@]} = 0 ] || printf '%s; ' "${log_notes[@]}")" \
  server_logs_dir "$([ ${#log_notes[@]} = 0 ] || echo "tests/bench/results/bench-$stamp.logs")" \
  robib_version "$([ -n "$bin" ] && "$bin" --version 2>/dev/null || echo n/a)" \
  git "$git_rev" \
  nbdkit_version "$(nbdkit --version 2>/dev/null || echo n/a)" fio_version "$(fio --version)" \
  qemu_nbd_version "$(qemu-nbd --version 2>/dev/null | head -n 1 || echo n/a)" \
  host_cpus "$(nproc)" mem_total "$(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)" \
  kernel "$(uname -r)" work_dir "$work" filesystem "$(stat -f -c %T "$work")" \
  raw_direct "$raw_direct" elapsed_s "$elapsed" failures "$([ ${#failed[@]} = 0 ] || printf '%s; ' "${failed[@]}")" \
  loadavg_start "$load_start" loadavg_end "$(cut -d' ' -f1-3 /proc/loadavg)" \
  other_robib_processes "$others")
"$py" "$here/report.py" --dir "$out" --phases "$phases" --targets "$targets" --jobs "$jobs" \
  --wan-jobs "$wan_list" --meta "$meta" \
  --markdown "$results/bench-$stamp.md" --json "$results/bench-$stamp.json"
echo >&2
echo "bench: results in tests/bench/results/bench-$stamp.{md,json}$([ ${#log_notes[@]} = 0 ] || echo ", server logs in bench-$stamp.logs/"); the run took ${elapsed}s (estimated ${estimate}s)" >&2
if [ ${#skipped[@]} -gt 0 ]; then printf 'bench: skipped %s\n' "${skipped[@]}" >&2; fi
if [ ${#failed[@]} -gt 0 ]; then
  printf 'bench: FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
