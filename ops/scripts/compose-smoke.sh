#!/usr/bin/env bash
# Smoke test of the container deploy: builds the static binary and the
# image, starts ops/compose/docker-compose.yml (three sites), waits until the
# sites form one cluster, creates a volume, writes a random pattern at site1
# over NBD from the host, reads it back at every site through the published
# ports, runs `volume verify`, and tears everything down (containers,
# network, volumes) on success and on failure alike. Exits non-zero on any
# failure, after printing the containers' logs.
#
# Needs: docker (daemon answering), docker-compose (v1) or the compose
# plugin, nbdcopy, /usr/bin/python3 with the libnbd bindings (flush), jq,
# sha256sum, and make + go unless ROBIB_BIN names a static binary.
#
#   ROBIB_BIN              static robib binary to package (default: make build, bin/robib)
#   ROBIB_IMAGE            image tag to build and run (default robib:dev)
#   ROBIB_SMOKE_PROJECT    compose project name (default robib-smoke)
#   ROBIB_SMOKE_TIMEOUT    seconds for the cluster to form and catch up (default 120)
#   ROBIB_SMOKE_KEEP=1     leave the sites running at the end (tear down
#                          later with: docker-compose -p PROJECT -f ops/compose/docker-compose.yml down -v)
#
# The compose file fixes the sites' subnet (172.29.83.0/24) and host ports
# (127.0.0.1:11809-11830), so this cannot run next to a deploy started from
# the same file; it refuses to start then. Leftovers of an aborted earlier
# run of this script (same project name) are removed first.
set -euo pipefail
if [ -n "${ROBIB_BIN:-}" ]; then ROBIB_BIN=$(realpath "$ROBIB_BIN"); fi
cd "$(dirname "$0")/../.."

COMPOSE_FILE=ops/compose/docker-compose.yml
SUBNET=172.29.83.0/24
PROJECT=${ROBIB_SMOKE_PROJECT:-robib-smoke}
TIMEOUT=${ROBIB_SMOKE_TIMEOUT:-120}
VOLUME=smoke
SIZE_MIB=64
PYTHON=/usr/bin/python3 # the interpreter Debian's python3-libnbd serves
export ROBIB_IMAGE=${ROBIB_IMAGE:-robib:dev}

# The sites and their published host ports (see the compose file).
site_names=(site1 site2 site3)
declare -A NBD_PORT=([site1]=11809 [site2]=11819 [site3]=11829)
declare -A API_PORT=([site1]=11810 [site2]=11820 [site3]=11830)
# The deploy runs TLS on every link; the host's CLI and NBD clients
# authenticate as the client "admin" (ops/scripts/compose-certs.sh).
PKI=$PWD/ops/compose/pki
api_url() { echo "https://127.0.0.1:${API_PORT[$1]}"; }
nbd_uri() { echo "nbds://127.0.0.1:${NBD_PORT[$1]}/$VOLUME${2:-}?tls-certificates=$PKI/admin"; } # nbd_uri SITE [@ro]
export ROBIB_TLS_CA=$PKI/admin/ca-cert.pem ROBIB_TLS_CERT=$PKI/admin/client-cert.pem ROBIB_TLS_KEY=$PKI/admin/client-key.pem

# bounded SECONDS COMMAND...: COMMAND, killed after SECONDS. --foreground
# keeps it in this script's process group, so that Ctrl-C or a SIGTERM sent
# to the group (as the Go test does at its timeout) reaches it at once.
bounded() { local limit=$1; shift; timeout --foreground "$limit" "$@"; }

log() { printf '[%4ds] %s\n' "$SECONDS" "$*"; }
die() { echo "compose-smoke: $*" >&2; exit 1; }

if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
else
  die "neither docker-compose nor the docker compose plugin is installed"
fi
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f "$COMPOSE_FILE" "$@"; }

for tool in docker nbdcopy jq sha256sum timeout; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done
"$PYTHON" -c 'import nbd' 2>/dev/null || die "$PYTHON cannot import nbd (apt-get install python3-libnbd)"
bounded 20 docker info >/dev/null 2>&1 || die "the docker daemon does not answer (docker info)"
[ "$PROJECT" != robib ] || die "project name robib is the deploy's own; the smoke test deletes its project's volumes"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/robib-compose-smoke.XXXXXX")
started=0

# The script's own stderr: a trap may run while a command's output is
# redirected to a file, and the report must not end up there.
exec 3>&2
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  exec 1>&3 2>&3
  if [ "$rc" -ne 0 ] && [ "$started" = 1 ]; then
    echo "=== compose smoke FAILED (exit $rc) after ${SECONDS}s; containers and their logs:" >&2
    compose ps >&2
    compose logs --no-color --timestamps --tail=200 >&2
    [ -s "$tmp/last-status.json" ] && { echo "=== last cluster status:" >&2; cat "$tmp/last-status.json" >&2; }
  fi
  if [ "$started" = 1 ] && [ "${ROBIB_SMOKE_KEEP:-0}" = 1 ]; then
    echo "ROBIB_SMOKE_KEEP=1: left running; tear down with: ${COMPOSE[*]} -p $PROJECT -f $COMPOSE_FILE down -v" >&2
  elif [ "$started" = 1 ]; then
    if ! compose down --volumes --remove-orphans --timeout 60 >"$tmp/down.log" 2>&1; then
      echo "compose-smoke: tear-down failed:" >&2
      cat "$tmp/down.log" >&2
      [ "$rc" -eq 0 ] && rc=1
    fi
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- image -------------------------------------------------------------
if [ -z "${ROBIB_BIN:-}" ]; then
  log "building bin/robib (make build)"
  make --no-print-directory build >"$tmp/build.log" 2>&1 || { cat "$tmp/build.log" >&2; die "make build failed"; }
  export ROBIB_BIN=bin/robib
fi
[ -x "$ROBIB_BIN" ] || die "ROBIB_BIN=$ROBIB_BIN is not an executable"
log "building image $ROBIB_IMAGE from $ROBIB_BIN"
ops/scripts/build-image.sh >"$tmp/image.log" 2>&1 || { cat "$tmp/image.log" >&2; die "image build failed"; }
cli() { bounded 30 "$ROBIB_BIN" "$@"; }
ROBIB_BIN=$ROBIB_BIN ops/scripts/compose-certs.sh >"$tmp/certs.log" 2>&1 || { cat "$tmp/certs.log" >&2; die "making the certificates failed"; }
log "$(cat "$tmp/certs.log")"

# --- clean start ---------------------------------------------------------
# Leftovers of an aborted run of this script carry the same project name.
compose down --volumes --remove-orphans --timeout 10 >"$tmp/predown.log" 2>&1 ||
  { cat "$tmp/predown.log" >&2; die "removing leftovers of project $PROJECT failed"; }
# Anything else on the sites' subnet is someone's deploy: do not touch it.
while read -r net; do
  [ -n "$net" ] || continue
  info=$(docker network inspect --format '{{range .IPAM.Config}}{{.Subnet}} {{end}}|{{index .Labels "com.docker.compose.project"}}' "$net" 2>/dev/null) || continue
  case " ${info%%|*} " in
    *" $SUBNET "*) die "network $net (project '${info#*|}') already uses $SUBNET; stop that deploy first (${COMPOSE[*]} -p ${info#*|} -f $COMPOSE_FILE down)" ;;
  esac
done < <(docker network ls --format '{{.Name}}')

log "starting three sites (project $PROJECT)"
started=1
bounded 180 "${COMPOSE[@]}" -p "$PROJECT" -f "$COMPOSE_FILE" up -d >"$tmp/up.log" 2>&1 ||
  { cat "$tmp/up.log" >&2; die "compose up failed"; }

# --- waiting -------------------------------------------------------------
# containers_ok fails when a site's container stopped or was restarted (the
# agent exited): waiting longer would not help.
containers_ok() {
  local ids id state
  ids=$(compose ps -q) || return 1
  [ "$(wc -w <<<"$ids")" -eq ${#site_names[@]} ] || { echo "compose runs $(wc -w <<<"$ids") containers, want ${#site_names[@]}" >&2; return 1; }
  for id in $ids; do
    state=$(docker inspect --format '{{.Name}} running={{.State.Running}} restarts={{.RestartCount}} exit={{.State.ExitCode}}' "$id") || return 1
    case $state in
      *"running=true restarts=0 "*) ;;
      *) echo "container failed: $state" >&2; return 1 ;;
    esac
  done
}

# wait_until SECONDS WHAT COMMAND...: runs COMMAND until it succeeds, at
# most SECONDS long, failing early when a container died.
wait_until() {
  local limit=$1 what=$2 deadline=$((SECONDS + $1)) delay=0.1
  shift 2
  until "$@"; do
    containers_ok || die "a site's container died while waiting for $what"
    [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${limit}s waiting for $what"
    sleep "$delay"
    delay=0.5
  done
}

status() { # status SITE: the cluster status as SITE's API answers it
  local out
  if out=$(cli --api "$(api_url "$1")" cluster status --json 2>&1); then
    printf '%s\n' "$out" | tee "$tmp/last-status.json"
  else
    printf 'from %s: %s\n' "$1" "$out" >"$tmp/last-status.json"
    return 1
  fi
}

# formed: every site answers on its published API port, names the same
# leader, and sees the three sites as alive Raft voters.
formed() {
  local site st leader="" l
  for site in "${site_names[@]}"; do
    st=$(status "$site") || return 1
    l=$(jq -r --argjson n ${#site_names[@]} '
      select(.leader != "" and (.sites | length) == $n
             and all(.sites[]; .voter and .gossip == "alive" and (.state == "Leader" or .state == "Follower")))
      | .leader' <<<"$st") || return 1
    [ -n "$l" ] || return 1
    [ -z "$leader" ] || [ "$l" = "$leader" ] || return 1
    leader=$l
  done
  echo "$leader" >"$tmp/leader"
}

has_volume() { # has_volume SITE
  cli --api "$(api_url "$1")" volume list --json 2>/dev/null |
    jq -e --arg v "$VOLUME" --argjson size $((SIZE_MIB << 20)) 'any(.[]; .name == $v and .size == $size)' >/dev/null
}

fsm_index() { # fsm_index SITE: the command index SITE's state machine applied
  status "$1" | jq -er --arg s "$1" '.sites[] | select(.name == $s) | .fsm_index'
}

caught_up() { # caught_up TARGET: every site applied command index TARGET
  local site i
  for site in "${site_names[@]}"; do
    i=$(fsm_index "$site") || return 1
    [ "$i" -ge "$1" ] || return 1
  done
}

all_have_volume() {
  local site
  for site in "${site_names[@]}"; do has_volume "$site" || return 1; done
}

wait_until "$TIMEOUT" "a leader and ${#site_names[@]} voters seen alike from every site" formed
leader=$(cat "$tmp/leader")
log "cluster formed: leader $leader, voters ${site_names[*]}"

# --- volume, write, read back -------------------------------------------
# Created through a follower's API: forwarded to the leader over the sites'
# advertised API addresses (api-addr in ops/config/siteN.yaml).
for follower in "${site_names[@]}"; do [ "$follower" != "$leader" ] && break; done
cli --api "$(api_url "$follower")" volume create "$VOLUME" --size "${SIZE_MIB}MiB" >/dev/null
wait_until "$TIMEOUT" "volume $VOLUME at every site" all_have_volume
log "volume $VOLUME (${SIZE_MIB}MiB) created via follower $follower, exists at every site"

head -c $((SIZE_MIB << 20)) /dev/urandom >"$tmp/pattern.bin"
want=$(sha256sum <"$tmp/pattern.bin" | cut -d' ' -f1)
uri=$(nbd_uri site1)
bounded 300 nbdcopy --flush "$tmp/pattern.bin" "$uri"
# nbdcopy has disconnected. A FLUSH on a fresh connection covers everything
# the site buffered for the volume, whichever connection wrote it.
# (libnbd refuses the URI's certificate directory unless told it may read
# local files, which nbdsh does not say.)
bounded 120 "$PYTHON" -c 'import nbd, sys; h = nbd.NBD(); h.set_uri_allow_local_file(True); h.connect_uri(sys.argv[1]); h.flush(); h.shutdown()' "$uri"
log "wrote ${SIZE_MIB}MiB at site1 ($uri), flushed, sha256 ${want:0:16}..."

target=0
for site in "${site_names[@]}"; do
  i=$(fsm_index "$site") || die "cluster status at $site failed: $(cat "$tmp/last-status.json")"
  [ "$i" -gt "$target" ] && target=$i
done
wait_until "$TIMEOUT" "every site to apply command index $target" caught_up "$target"
log "every site applied command index $target"

# Read back at every site. site1 and site2 attach read-write (site2 takes
# the volume's write lease that site1 gave up when nbdcopy disconnected);
# site3 attaches read-only (export VOLUME@ro, no lease).
for read in site1: site2: site3:@ro; do
  site=${read%%:*}
  rm -f "$tmp/read.bin"
  bounded 300 nbdcopy "$(nbd_uri "$site" "${read#*:}")" "$tmp/read.bin"
  got=$(sha256sum <"$tmp/read.bin" | cut -d' ' -f1)
  [ "$got" = "$want" ] || die "$site returned different data: sha256 $got, want $want"
done
log "read back at site1, site2 (read-write) and site3 (read-only, $VOLUME@ro) over their published NBD ports: identical"

# Secure by default: a plaintext NBD client and an API call without
# credentials are refused.
if out=$(bounded 30 nbdinfo "nbd://127.0.0.1:${NBD_PORT[site1]}/$VOLUME" 2>&1); then
  die "a plaintext NBD client was served: $out"
fi
grep -qi "tls" <<<"$out" || die "plaintext NBD refusal does not mention TLS: $out"
nbd_refusal=$(head -c 100 <<<"$out" | tr '\n' ' ')
if out=$(env -u ROBIB_TLS_CERT -u ROBIB_TLS_KEY "$ROBIB_BIN" --api "$(api_url site1)" volume list 2>&1); then
  die "an API call without a client certificate was answered: $out"
fi
log "refused: plaintext NBD ($nbd_refusal...), API without credentials ($(head -c 100 <<<"$out" | tr '\n' ' ')...)"

cli --api "$(api_url site3)" volume verify "$VOLUME" --json >"$tmp/verify.json" ||
  { cat "$tmp/verify.json" >&2; die "volume verify failed"; }
jq -e --argjson n ${#site_names[@]} '.ok and (.sites | length) == $n' "$tmp/verify.json" >/dev/null ||
  { cat "$tmp/verify.json" >&2; die "volume verify did not compare all sites"; }
chunks=$(jq -r '.chunks' "$tmp/verify.json")
containers_ok || die "a site's container was restarted during the test"

cat <<EOF
compose smoke OK in ${SECONDS}s (project $PROJECT, image $ROBIB_IMAGE, ${COMPOSE[*]})
  cluster   leader $leader; voters ${site_names[*]}, each on its own container, address and volume
  volume    $VOLUME ${SIZE_MIB}MiB created via follower $follower, written at site1 over NBD (nbdcopy --flush)
  read back identical at ${site_names[*]} (sha256 $want), over TLS (nbds://, client certificate)
  refused   a plaintext NBD client, an API call without credentials
  verify    $chunks chunks identical at $(jq -r '.sites | join(", ")' "$tmp/verify.json")
EOF
