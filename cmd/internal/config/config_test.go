package config

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

func TestParseSize(t *testing.T) {
	good := map[string]int64{
		"4096": 4096, "1B": 1, "10GiB": 10 << 30, "10G": 10 << 30, "10g": 10 << 30, "512M": 512 << 20,
		"512MiB": 512 << 20, "1T": 1 << 40, "4K": 4096, "4KiB": 4096, "1KB": 1000, "1MB": 1e6, "2GB": 2e9,
		" 8 MiB ": 8 << 20, "1.5G": 3 << 29, "0.5KiB": 512, "1P": 1 << 50,
	}
	for in, want := range good {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	bad := []string{"", " ", "abc", "-1", "0", "0G", "10XB", "1.5", "1.2.3G", "G", "1e9", "9223372036854775807K",
		"99999999999999999999", "1.0000001KiB", "+5", "5 5", "1..5M", "NaNG", "Inf"}
	for _, in := range bad {
		if n, err := ParseSize(in); err == nil || !errors.Is(err, ErrBadSize) {
			t.Errorf("ParseSize(%q) = %d, %v; want ErrBadSize", in, n, err)
		}
	}
}

func TestFormatSizeRoundTrips(t *testing.T) {
	for _, n := range []int64{1, 511, 4096, 10 << 30, 3 << 29, 1 << 50, 1<<40 + 4096} {
		if got, err := ParseSize(FormatSize(n)); err != nil || got != n {
			t.Errorf("round trip of %d via %q = %d, %v", n, FormatSize(n), got, err)
		}
	}
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"10GiB", "1.5G", "4096", "1KB", "0", "-1", "9223372036854775807", "1e3"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseSize(s)
		if err != nil {
			if !errors.Is(err, ErrBadSize) {
				t.Fatalf("ParseSize(%q): error %v does not wrap ErrBadSize", s, err)
			}
			return
		}
		if n <= 0 {
			t.Fatalf("ParseSize(%q) = %d, not positive", s, n)
		}
		if back, err := ParseSize(FormatSize(n)); err != nil || back != n {
			t.Fatalf("FormatSize(%d) = %q does not parse back: %d, %v", n, FormatSize(n), back, err)
		}
	})
}

func load(t *testing.T, args []string, env map[string]string) (Config, error) {
	t.Helper()
	for k, v := range env {
		t.Setenv(k, v)
	}
	fs := pflag.NewFlagSet("agent", pflag.ContinueOnError)
	RegisterFlags(fs)
	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	return Load(fs)
}

func TestLoadDefaultsAndPrecedence(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "site.yaml")
	if err := os.WriteFile(file, []byte("name: fromfile\ndata-dir: /from/file\njoin: [\"10.0.0.1:1\"]\ndcd-buffer: 32MiB\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := load(t, []string{"--config", file, "--name", "fromflag", "--insecure"}, map[string]string{"ROBIB_DATA_DIR": "/from/env"})
	if err != nil {
		t.Fatal(err)
	}
	if c.Name != "fromflag" || c.DataDir != "/from/env" || len(c.Join) != 1 || c.Join[0] != "10.0.0.1:1" || c.DCDBuffer != 32<<20 {
		t.Fatalf("precedence flag > env > file broken: %+v", c)
	}
	if c.NBDAddr != DefaultNBDAddr || c.RaftAddr != DefaultRaftAddr || c.ElectionTimeout != 500*time.Millisecond || c.VolumeLeaseTTL != 4*time.Second || c.FlushTimeout != 30*time.Second ||
		c.RaftLogStore != LogStoreDCD || !c.LeaderOverlap || c.LinkDelay != 0 {
		t.Fatalf("defaults: %+v", c)
	}
}

func TestLoadLogStoreAndLinkDelay(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "site.yaml")
	if err := os.WriteFile(file, []byte("raft-log-store: wal\nlink-delay: 25ms\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := load(t, []string{"--name", "s1", "--data-dir", dir, "--config", file, "--insecure"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.RaftLogStore != LogStoreWAL || c.LinkDelay != 25*time.Millisecond {
		t.Fatalf("from file: %q, %v", c.RaftLogStore, c.LinkDelay)
	}
	c, err = load(t, []string{"--name", "s1", "--data-dir", dir, "--config", file, "--link-delay", "1s", "--insecure"},
		map[string]string{"ROBIB_RAFT_LOG_STORE": "boltdb"})
	if err != nil {
		t.Fatal(err)
	}
	if c.RaftLogStore != LogStoreBoltDB || c.LinkDelay != time.Second {
		t.Fatalf("env and flag over file: %q, %v", c.RaftLogStore, c.LinkDelay)
	}
}

func TestLoadRejectsBadInput(t *testing.T) {
	dir := t.TempDir()
	typo := filepath.Join(dir, "typo.yaml")
	os.WriteFile(typo, []byte("data-dir: /x\ndata_dri: /y\n"), 0o600)
	garbage := filepath.Join(dir, "garbage.yaml")
	os.WriteFile(garbage, []byte("{{{ not yaml"), 0o600)
	base := []string{"--name", "s1", "--data-dir", dir, "--insecure"}
	cases := map[string][]string{
		"missing data dir":     {"--name", "s1", "--insecure"},
		"bad name":             {"--name", "../x", "--data-dir", dir, "--insecure"},
		"name with space":      {"--name", "a b", "--data-dir", dir, "--insecure"},
		"bad nbd addr":         append(base, "--nbd-addr", "nonsense"),
		"bad api port":         append(base, "--api-addr", "127.0.0.1:99999"),
		"wildcard raft":        append(base, "--raft-addr", "0.0.0.0:10811"),
		"wildcard api":         append(base, "--api-addr", "0.0.0.0:10810"),
		"gossip host name":     append(base, "--gossip-addr", "localhost:10812"),
		"api without host":     append(base, "--api-addr", ":10810"),
		"raft port 0":          append(base, "--raft-addr", "127.0.0.1:0"),
		"raft equals gossip":   append(base, "--raft-addr", "127.0.0.1:7000", "--gossip-addr", "127.0.0.1:7000"),
		"bad join":             append(base, "--join", "nohostport"),
		"bootstrap negative":   append(base, "--bootstrap-expect", "-1"),
		"bootstrap huge":       append(base, "--bootstrap-expect", "99"),
		"tiny threshold":       append(base, "--snapshot-threshold", "1"),
		"tiny interval":        append(base, "--snapshot-interval", "1ms"),
		"lease over heartbeat": append(base, "--leader-lease-timeout", "5s"),
		"tiny election":        append(base, "--election-timeout", "1ms"),
		"bad buffer":           append(base, "--dcd-buffer", "lots"),
		"tiny buffer":          append(base, "--dcd-buffer", "4KiB"),
		"bad inflight":         append(base, "--dcd-inflight", "0"),
		"lease ttl too short":  append(base, "--volume-lease-ttl", "500ms"),
		"lease ttl negative":   append(base, "--volume-lease-ttl", "-4s"),
		"lease ttl not a time": append(base, "--volume-lease-ttl", "soon"),
		"flush timeout tiny":   append(base, "--flush-timeout", "10ms"),
		"flush timeout huge":   append(base, "--flush-timeout", "1000h"),
		"unknown log store":    append(base, "--raft-log-store", "rocksdb"),
		"log store wrong case": append(base, "--raft-log-store", "WAL"),
		"negative link delay":  append(base, "--link-delay", "-1ms"),
		"huge link delay":      append(base, "--link-delay", "1.5s"),
		"link delay not time":  append(base, "--link-delay", "far"),
		"bad log level":        append(base, "--log-level", "loud"),
		"bad log format":       append(base, "--log-format", "xml"),
		"unknown config key":   append(base, "--config", typo),
		"unreadable config":    append(base, "--config", garbage),
		"missing config":       append(base, "--config", filepath.Join(dir, "nope.yaml")),
		"plaintext by default": {"--name", "s1", "--data-dir", dir},
		"unknown nbd-tls":      append(base, "--nbd-tls", "yes"),
		"bad auth policy":      append(base, "--auth-policy", dir),
	}
	for name, args := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := load(t, args, nil)
			if err == nil {
				t.Fatalf("%v: accepted", args)
			}
			if !errors.Is(err, ErrInvalidConfig) && !strings.Contains(err.Error(), "invalid") {
				t.Fatalf("%v: error %q does not say what is invalid", args, err)
			}
		})
	}
}

// TestEveryFlagIsAFileKey: a setting that works as a flag must also work in
// the config file (the file loader rejects keys it does not know), and
// every flag is a setting of the table.
func TestEveryFlagIsAFileKey(t *testing.T) {
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	RegisterFlags(fs)
	inFile := map[string]bool{}
	for _, s := range Settings() {
		inFile[s.Key] = s.InFile
	}
	n := 0
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Name == KeyConfig {
			if inFile[f.Name] {
				t.Errorf("--config can be set in a config file")
			}
			return
		}
		n++
		if !inFile[f.Name] {
			t.Errorf("flag --%s cannot be set in a config file", f.Name)
		}
	})
	if n < 20 || n+1 != len(inFile) {
		t.Fatalf("%d flags registered besides --config, %d settings", n, len(inFile))
	}
}
