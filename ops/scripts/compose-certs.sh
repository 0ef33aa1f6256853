#!/usr/bin/env bash
# Makes the certificates of the three-site compose deploy with `robib cert`,
# once: a cluster CA and, in ops/compose/pki/ (gitignored, mounted read-only
# into the containers):
#   ca/                   the cluster CA (keep ca-key.pem offline in a real deploy)
#   siteN/                site certificates for 172.29.83.1N (+ localhost), and gossip.key
#   admin/                a client certificate for the CLI, the containers'
#                         health check and NBD clients on the host
# Existing files are kept (delete ops/compose/pki to start over). Run as
# root, it hands the files to uid 65532 (the image's user); they are 0600.
#
#   ROBIB_BIN   robib binary (default bin/robib)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${ROBIB_BIN:-bin/robib}
PKI=ops/compose/pki
[ -x "$BIN" ] || { echo "compose-certs: $BIN is missing: make build" >&2; exit 1; }
if [ ! -e "$PKI/ca/ca-cert.pem" ]; then
  "$BIN" cert ca --out "$PKI/ca" >/dev/null
fi
for i in 1 2 3; do
  [ -e "$PKI/site$i/server-cert.pem" ] ||
    "$BIN" cert issue --ca "$PKI/ca" --name "site$i" --kind site --ip "172.29.83.1$i" --ip 127.0.0.1 --dns localhost --out "$PKI/site$i" >/dev/null
done
[ -e "$PKI/admin/client-cert.pem" ] ||
  "$BIN" cert issue --ca "$PKI/ca" --name admin --kind client --out "$PKI/admin" >/dev/null
if [ "$(id -u)" = 0 ]; then
  chown -R 65532:65532 "$PKI/site1" "$PKI/site2" "$PKI/site3" "$PKI/admin"
  # The host's CLI, run as root, reads admin/ whatever its owner.
fi
echo "certificates in $PKI (CA $PKI/ca; sites site1..3; client admin)"
