#!/usr/bin/env bash
# Starts a three-site robib cluster on this machine (loopback, fixed ports),
# creates a volume and prints how to attach it at each site. Ctrl-C stops
# all three sites. Data lives in $DEMO_DIR (default /tmp/robib-demo) and is
# kept between runs; DEMO_FRESH=1 starts from empty.
#
# Secure by default, like any robib deploy: the first run makes a cluster CA
# and certificates with `robib cert` ($DEMO_DIR/pki: one per site, and the
# client "admin" for the CLI and NBD clients), and every link runs TLS with
# mutual authentication (Raft, forwarding, gossip encryption, the admin API
# over HTTPS, NBD with STARTTLS required). DEMO_INSECURE=1 runs plaintext.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-bin/robib}
DIR=${DEMO_DIR:-/tmp/robib-demo}
VOL=${DEMO_VOLUME:-demo}
SIZE=${DEMO_SIZE:-1GiB}
[ -x "$BIN" ] || { echo "build first: make build" >&2; exit 1; }
[ "${DEMO_FRESH:-0}" = 1 ] && rm -rf "$DIR"
mkdir -p "$DIR"
PKI=$DIR/pki
insecure=${DEMO_INSECURE:-0}
if [ "$insecure" != 1 ] && [ ! -e "$PKI/ca/ca-cert.pem" ]; then
  echo "making a cluster CA and certificates in $PKI (robib cert)..."
  "$BIN" cert ca --out "$PKI/ca" >/dev/null
  for n in site1 site2 site3; do
    "$BIN" cert issue --ca "$PKI/ca" --name "$n" --kind site --ip 127.0.0.1 --dns localhost --out "$PKI/$n" >/dev/null
  done
  "$BIN" cert issue --ca "$PKI/ca" --name admin --kind client --out "$PKI/admin" >/dev/null
  # nbdfuse and fio may not name the certificate directory in their URI;
  # their libnbd looks in $HOME/.pki/libnbd, so a HOME of their own:
  mkdir -p "$PKI/home/.pki" && cp -r "$PKI/admin" "$PKI/home/.pki/libnbd"
fi
if [ "$insecure" = 1 ]; then
  scheme=http nbds=nbd q="" fusehome=""
else
  scheme=https nbds=nbds q="?tls-certificates=$PKI/admin" fusehome="HOME=$PKI/home "
  # The CLI authenticates as the client "admin" (an admin: no policy file).
  export ROBIB_TLS_CA=$PKI/admin/ca-cert.pem ROBIB_TLS_CERT=$PKI/admin/client-cert.pem ROBIB_TLS_KEY=$PKI/admin/client-key.pem
fi

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
  if [ "$insecure" = 1 ]; then
    sec=(--insecure)
  else
    sec=(--tls-ca "$PKI/$name/ca-cert.pem" --tls-cert "$PKI/$name/server-cert.pem" --tls-key "$PKI/$name/server-key.pem")
  fi
  "$BIN" agent --name "$name" --data-dir "$DIR/$name" \
    --nbd-addr "127.0.0.1:$nbd" --api-addr "127.0.0.1:$api" \
    --raft-addr "127.0.0.1:$raft" --gossip-addr "127.0.0.1:$gossip" \
    "${join[@]}" "${sec[@]}" >"$DIR/$name.log" 2>&1 &
  pids+=($!)
done

api="$scheme://127.0.0.1:10810"
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

  site1  $nbds://127.0.0.1:10809/$VOL   (admin API $scheme://127.0.0.1:10810)
  site2  $nbds://127.0.0.1:10819/$VOL   (admin API $scheme://127.0.0.1:10820)
  site3  $nbds://127.0.0.1:10829/$VOL   (admin API $scheme://127.0.0.1:10830)

TXT
if [ "$insecure" = 1 ]; then
  echo "  PLAINTEXT (DEMO_INSECURE=1): every link is unauthenticated and unencrypted."
  echo
else
  cat <<TXT
Every link runs TLS with mutual authentication. Clients authenticate with
the client certificate in $PKI/admin (the GnuTLS layout libnbd, qemu and
nbd-client read); for the CLI:

  export ROBIB_TLS_CA=$PKI/admin/ca-cert.pem ROBIB_TLS_CERT=$PKI/admin/client-cert.pem ROBIB_TLS_KEY=$PKI/admin/client-key.pem

TXT
fi
cat <<TXT
  nbdinfo '$nbds://127.0.0.1:10819/$VOL$q'
  mkdir -p /tmp/robib-fuse && ${fusehome}nbdfuse /tmp/robib-fuse/disk $nbds://127.0.0.1:10819/$VOL &
  nbdinfo '$nbds://127.0.0.1:10829/$VOL@ro$q'        # read-only, while another site writes
  $BIN --api $scheme://127.0.0.1:10820 volume verify $VOL
  $BIN --api $scheme://127.0.0.1:10830 cluster status
TXT
if [ "$insecure" != 1 ]; then
  cat <<TXT
  qemu-img info --object tls-creds-x509,id=tls0,dir=$PKI/admin,endpoint=client \\
    --image-opts driver=nbd,host=127.0.0.1,port=10829,export=$VOL,tls-creds=tls0
  nbd-client 127.0.0.1 10819 /dev/nbd0 -N $VOL -cacertfile $PKI/admin/ca-cert.pem \\
    -certfile $PKI/admin/client-cert.pem -keyfile $PKI/admin/client-key.pem   # Linux host with the nbd module
TXT
else
  cat <<TXT
  qemu-img info nbd://127.0.0.1:10829/$VOL
  nbd-client 127.0.0.1 10819 /dev/nbd0 -N $VOL          # Linux host with the nbd module
TXT
fi
cat <<TXT

Press Ctrl-C to stop all three sites.
TXT
wait
