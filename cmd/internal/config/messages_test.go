package config

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/robib/robib/cmd/internal/pki"
)

// tlsFiles makes a CA in dir/ca and a site "s1" in dir/site (with its
// gossip.key) and returns dir/site.
func tlsFiles(t *testing.T, dir string) string {
	t.Helper()
	if err := pki.CreateCA(filepath.Join(dir, "ca"), pki.CAOptions{}); err != nil {
		t.Fatal(err)
	}
	site := filepath.Join(dir, "site")
	if err := pki.Issue(filepath.Join(dir, "ca"), pki.IssueRequest{Name: "s1", Kind: pki.KindSite, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, OutDir: site}); err != nil {
		t.Fatal(err)
	}
	return site
}

// TestValidationMessages: every bad input is refused with the message it
// got before the settings table (DIR stands for the test's directory).
func TestValidationMessages(t *testing.T) {
	dir := t.TempDir()
	typo := filepath.Join(dir, "typo.yaml")
	if err := os.WriteFile(typo, []byte("data-dir: /x\ndata_dri: /y\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The rules below TLS's run on a plaintext configuration.
	base := []string{"--name", "s1", "--data-dir", dir, "--insecure"}
	site := tlsFiles(t, dir)
	nogossip := filepath.Join(dir, "nogossip")
	os.Mkdir(nogossip, 0o700)
	for _, f := range []string{"ca-cert.pem", "server-cert.pem", "server-key.pem"} {
		b, _ := os.ReadFile(filepath.Join(site, f))
		os.WriteFile(filepath.Join(nogossip, f), b, 0o600)
	}
	ca, cert, key := filepath.Join(site, "ca-cert.pem"), filepath.Join(site, "server-cert.pem"), filepath.Join(site, "server-key.pem")
	plain := []string{"--name", "s1", "--data-dir", dir}
	secure := append(plain[:4:4], "--tls-ca", ca, "--tls-cert", cert, "--tls-key", key)
	secure = secure[:len(secure):len(secure)] // each case appends to its own copy
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--name", "s1", "--insecure"},
			"invalid configuration: data-dir is required"},
		{[]string{"--name", "../x", "--data-dir", dir, "--insecure"},
			"invalid configuration: name \"../x\": 1-63 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"},
		{[]string{"--name", "", "--data-dir", dir, "--insecure"},
			"invalid configuration: name \"\": 1-63 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"},
		{[]string{"--name", "s1", "--data-dir", "  ", "--insecure"},
			"invalid configuration: data-dir is required"},
		{append(base, "--nbd-addr", "nonsense"),
			"invalid configuration: nbd-addr: \"nonsense\": address nonsense: missing port in address"},
		{append(base, "--nbd-addr", "a b:1"),
			"invalid configuration: nbd-addr: \"a b:1\": bad host"},
		{append(base, "--api-addr", "127.0.0.1:99999"),
			"invalid configuration: api-addr: \"127.0.0.1:99999\": bad port \"99999\""},
		{append(base, "--api-addr", "0.0.0.0:10810"),
			"invalid configuration: api-addr: \"0.0.0.0:10810\": needs a host other sites can reach, not a wildcard"},
		{append(base, "--api-addr", ":10810"),
			"invalid configuration: api-addr: \":10810\": needs a host other sites can reach, not a wildcard"},
		{append(base, "--raft-addr", "[::]:10811"),
			"invalid configuration: raft-addr: \"[::]:10811\": needs a host other sites can reach, not a wildcard"},
		{append(base, "--raft-addr", "127.0.0.1:0"),
			"invalid configuration: raft-addr: \"127.0.0.1:0\": needs a fixed port"},
		{append(base, "--gossip-addr", "localhost:10812"),
			"invalid configuration: gossip-addr \"localhost:10812\": gossip needs an IP address, not a host name"},
		{append(base, "--gossip-addr", "127.0.0.1:x"),
			"invalid configuration: gossip-addr: \"127.0.0.1:x\": bad port \"x\""},
		{append(base, "--raft-addr", "127.0.0.1:7000", "--gossip-addr", "127.0.0.1:7000"),
			"invalid configuration: raft-addr and gossip-addr must differ"},
		{append(base, "--join", "10.0.0.1:1,nohostport"),
			"invalid configuration: join: \"nohostport\": address nohostport: missing port in address"},
		{append(base, "--bootstrap-expect", "-1"),
			"invalid configuration: bootstrap-expect -1: want 0..15"},
		{append(base, "--bootstrap-expect", "16"),
			"invalid configuration: bootstrap-expect 16: want 0..15"},
		{append(base, "--snapshot-threshold", "15"),
			"invalid configuration: snapshot-threshold 15: want at least 16"},
		{append(base, "--snapshot-interval", "99ms"),
			"invalid configuration: snapshot-interval 99ms: want at least 100ms"},
		{append(base, "--scrub-interval", "500ms"),
			"invalid configuration: scrub-interval 500ms: want 0 (off) or at least 1s"},
		{append(base, "--scrub-interval", "-1h"),
			"invalid configuration: scrub-interval -1h0m0s: want 0 (off) or at least 1s"},
		{append(base, "--trailing-logs", "0"),
			"invalid configuration: trailing-logs must be at least 1"},
		{append(base, "--heartbeat-timeout", "4ms"),
			"invalid configuration: heartbeat-timeout and election-timeout must be at least 5ms"},
		{append(base, "--election-timeout", "1ms"),
			"invalid configuration: heartbeat-timeout and election-timeout must be at least 5ms"},
		{append(base, "--leader-lease-timeout", "4ms"),
			"invalid configuration: leader-lease-timeout 4ms: want 5ms..heartbeat-timeout (500ms)"},
		{append(base, "--leader-lease-timeout", "501ms"),
			"invalid configuration: leader-lease-timeout 501ms: want 5ms..heartbeat-timeout (500ms)"},
		{append(base, "--dcd-buffer", "lots"),
			"invalid configuration: dcd-buffer: bad size: \"lots\" has no number"},
		{append(base, "--dcd-buffer", "1023KiB"),
			"invalid configuration: dcd-buffer 1047552: want 1MiB..16GiB"},
		{append(base, "--dcd-buffer", "17GiB"),
			"invalid configuration: dcd-buffer 18253611008: want 1MiB..16GiB"},
		{append(base, "--dcd-inflight", "0"),
			"invalid configuration: dcd-inflight 0: want 1..64"},
		{append(base, "--dcd-inflight", "65"),
			"invalid configuration: dcd-inflight 65: want 1..64"},
		{append(base, "--volume-lease-ttl", "999ms"),
			"invalid configuration: volume-lease-ttl 999ms: want 2×heartbeat-timeout (1s)..10m"},
		{append(base, "--volume-lease-ttl", "11m"),
			"invalid configuration: volume-lease-ttl 11m0s: want 2×heartbeat-timeout (1s)..10m"},
		{append(base, "--flush-timeout", "999ms"),
			"invalid configuration: flush-timeout 999ms: want 1s..1h"},
		{append(base, "--flush-timeout", "61m"),
			"invalid configuration: flush-timeout 1h1m0s: want 1s..1h"},
		{append(base, "--raft-log-store", "WAL"),
			"invalid configuration: raft-log-store \"WAL\": want dcd, boltdb or wal"},
		{append(base, "--link-delay", "-1ns"),
			"invalid configuration: link-delay -1ns: want 0..1s"},
		{append(base, "--link-delay", "1001ms"),
			"invalid configuration: link-delay 1.001s: want 0..1s"},
		{append(base, "--log-level", "loud"),
			"invalid configuration: log-level: unknown log level \"loud\" (debug, info, warn, error)"},
		{append(base, "--log-format", "xml"),
			"invalid configuration: log-format \"xml\": want text or json"},
		{append(base, "--config", typo),
			"invalid configuration: config file DIR/typo.yaml: unknown key \"data_dri\" (known: name, data-dir, nbd-addr, api-addr, log-level, log-format, raft-addr, gossip-addr, join, bootstrap-expect, snapshot-threshold, snapshot-interval, trailing-logs, heartbeat-timeout, election-timeout, leader-lease-timeout, dcd-buffer, dcd-inflight, volume-lease-ttl, flush-timeout, scrub-interval, raft-log-store, raft-transport, link-delay, leader-follows-writes, raft-leader-overlap, tls-ca, tls-cert, tls-key, insecure, nbd-tls, nbd-tls-verify-peer, gossip-key, auth-policy)"},

		// Secure by default.
		{plain,
			"invalid configuration: tls-ca is required: every link uses TLS (tls-ca, tls-cert and tls-key, from robib cert); plaintext needs --insecure"},
		{append(plain, "--tls-ca", ca),
			"invalid configuration: tls-cert is required: every link uses TLS (tls-ca, tls-cert and tls-key, from robib cert); plaintext needs --insecure"},
		{append(plain, "--tls-ca", ca, "--tls-cert", cert),
			"invalid configuration: tls-key is required: every link uses TLS (tls-ca, tls-cert and tls-key, from robib cert); plaintext needs --insecure"},
		{append(plain, "--tls-ca", filepath.Join(dir, "nope.pem"), "--tls-cert", cert, "--tls-key", key),
			"invalid configuration: tls-ca \"DIR/nope.pem\": no such file"},
		{append(plain, "--tls-ca", ca, "--tls-cert", site, "--tls-key", key),
			"invalid configuration: tls-cert \"DIR/site\": is a directory, want a file"},
		{append(plain, "--tls-ca", ca, "--tls-cert", cert, "--tls-key", filepath.Join(dir, "nope.pem")),
			"invalid configuration: tls-key \"DIR/nope.pem\": no such file"},
		{append(base, "--tls-ca", ca),
			"invalid configuration: insecure together with tls-ca: plaintext or TLS, not both"},
		{append(base, "--tls-ca", ca, "--tls-cert", cert, "--tls-key", key),
			"invalid configuration: insecure together with tls-ca, tls-cert, tls-key: plaintext or TLS, not both"},
		{append(secure, "--nbd-tls", "maybe"),
			"invalid configuration: nbd-tls \"maybe\": want off, on or require"},
		{append(base, "--nbd-tls", "on"),
			"invalid configuration: nbd-tls on needs TLS: not with --insecure"},
		{append(base, "--nbd-tls", "require"),
			"invalid configuration: nbd-tls require needs TLS: not with --insecure"},
		{append(base, "--nbd-tls-verify-peer"),
			"invalid configuration: nbd-tls-verify-peer needs TLS: not with --insecure"},
		{append(secure, "--nbd-tls", "off", "--nbd-tls-verify-peer"),
			"invalid configuration: nbd-tls-verify-peer needs nbd-tls on or require"},
		{append(plain, "--tls-ca", ca, "--tls-cert", filepath.Join(nogossip, "server-cert.pem"), "--tls-key", key),
			"invalid configuration: gossip-key is required with TLS: none given and DIR/nogossip has no gossip.key"},
		{append(secure, "--gossip-key", filepath.Join(dir, "nope.key")),
			"invalid configuration: gossip-key \"DIR/nope.key\": no such file"},
		{append(base, "--auth-policy", filepath.Join(dir, "nope.yaml")),
			"invalid configuration: auth-policy \"DIR/nope.yaml\": no such file"},
		{append(base, "--config", filepath.Join(dir, "nope.yaml")),
			"invalid configuration: reading config file DIR/nope.yaml: open DIR/nope.yaml: no such file or directory"},
	}
	for _, tc := range cases {
		_, err := load(t, tc.args, nil)
		if err == nil {
			t.Errorf("%q: accepted", tc.args)
			continue
		}
		got := strings.ReplaceAll(err.Error(), dir, "DIR")
		if !errors.Is(err, ErrInvalidConfig) || got != tc.want {
			t.Errorf("%q:\n got %q\nwant %q", tc.args, got, tc.want)
		}
	}
}
