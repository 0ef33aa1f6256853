package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/robib/robib/cluster"
	"github.com/robib/robib/dcd"
)

// TestDefaultsFromOwningPackages: a Config loaded with nothing set carries
// the defaults of cluster.DefaultConfig and dcd.DefaultConfig.
func TestDefaultsFromOwningPackages(t *testing.T) {
	c, err := load(t, []string{"--name", "s1", "--data-dir", t.TempDir(), "--insecure"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	cl, wb := cluster.DefaultConfig(), dcd.DefaultConfig()
	checks := []struct {
		key       string
		got, want any
	}{
		{KeySnapshotThreshold, c.SnapshotThreshold, cl.SnapshotThreshold},
		{KeySnapshotInterval, c.SnapshotInterval, cl.SnapshotInterval},
		{KeyTrailingLogs, c.TrailingLogs, cl.TrailingLogs},
		{KeyHeartbeatTimeout, c.HeartbeatTimeout, cl.HeartbeatTimeout},
		{KeyElectionTimeout, c.ElectionTimeout, cl.ElectionTimeout},
		{KeyLeaderLease, c.LeaderLease, cl.LeaderLeaseTimeout},
		{KeyVolumeLeaseTTL, c.VolumeLeaseTTL, cl.LeaseTTL},
		{KeyRaftLogStore, c.RaftLogStore, cl.LogStore},
		{KeyRaftTransport, c.RaftTransport, cl.RaftTransport},
		{KeyLeaderFollows, c.LeaderFollowsWrites, cl.LeaderFollowsWrites},
		{KeyLeaderOverlap, c.LeaderOverlap, cl.LeaderOverlap},
		{KeyDCDBuffer, c.DCDBuffer, wb.MaxBufferBytes},
		{KeyDCDInflight, c.DCDInflight, wb.MaxInflight},
		{KeyFlushTimeout, c.FlushTimeout, wb.FlushTimeout},
		{KeyScrubInterval, c.ScrubInterval, cl.ScrubInterval},
	}
	for _, ch := range checks {
		if ch.got != ch.want {
			t.Errorf("%s: default %v, the owning package says %v", ch.key, ch.got, ch.want)
		}
	}
	if cl.LogStore != cluster.DefaultLogStore || cl.LeaseTTL != cluster.DefaultLeaseTTL || wb.MaxInflight != dcd.DefaultMaxInflight {
		t.Errorf("DefaultConfig disagrees with the package constants: %+v %+v", cl, wb)
	}
}

// TestSettingsDescribeTheFlags: Settings lists every flag with its
// variable, type and default as pflag has them.
func TestSettingsDescribeTheFlags(t *testing.T) {
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	RegisterFlags(fs)
	seen := map[string]bool{}
	for _, s := range Settings() {
		if seen[s.Key] {
			t.Errorf("%s listed twice", s.Key)
		}
		seen[s.Key] = true
		f := fs.Lookup(s.Key)
		if f == nil {
			t.Errorf("%s: no flag", s.Key)
			continue
		}
		if s.Env != "ROBIB_"+strings.ToUpper(strings.ReplaceAll(s.Key, "-", "_")) || s.Type != f.Value.Type() || s.Default != f.DefValue || s.Help != f.Usage {
			t.Errorf("%s: described as %+v; flag %+v", s.Key, s, f)
		}
	}
	if n := len(seen); n != 35 {
		t.Errorf("%d settings", n)
	}
}

func loadClient(t *testing.T, args []string, env string) (Client, error) {
	t.Helper()
	t.Setenv("ROBIB_API", env)
	for _, v := range []string{"ROBIB_TLS_CA", "ROBIB_TLS_CERT", "ROBIB_TLS_KEY", "ROBIB_TOKEN"} {
		t.Setenv(v, "")
	}
	fs := pflag.NewFlagSet("robib", pflag.ContinueOnError)
	RegisterClientFlags(fs)
	if err := fs.Parse(args); err != nil {
		return Client{}, err
	}
	return LoadClient(fs)
}

// TestLoadClientAPI: --api wins over ROBIB_API, which wins over the
// default; an empty ROBIB_API counts as unset.
func TestLoadClientAPI(t *testing.T) {
	for _, tc := range []struct {
		args []string
		env  string
		want string
	}{
		{nil, "", DefaultAPI},
		{nil, "http://10.0.0.1:10810", "http://10.0.0.1:10810"},
		{[]string{"--api", "http://flag:1"}, "http://10.0.0.1:10810", "http://flag:1"},
		{[]string{"--api=http://flag:1"}, "", "http://flag:1"},
	} {
		c, err := loadClient(t, tc.args, tc.env)
		if err != nil || c.API != tc.want {
			t.Errorf("args %q, ROBIB_API=%q: %+v, %v; want %q", tc.args, tc.env, c, err, tc.want)
		}
	}
	if DefaultAPI != "http://127.0.0.1:10810" {
		t.Errorf("DefaultAPI = %q", DefaultAPI)
	}
	if _, err := LoadClient(pflag.NewFlagSet("empty", pflag.ContinueOnError)); err == nil {
		t.Error("LoadClient without the flags registered: no error")
	}
}

// TestShippedConfigsLoad: the example config files in ops/config load and
// validate (every key known, every value valid), and their values arrive.
func TestShippedConfigsLoad(t *testing.T) {
	files, err := filepath.Glob("../../../ops/config/*.yaml")
	if err != nil || len(files) < 2 {
		t.Fatalf("ops/config: %v, %v", files, err)
	}
	// They name the TLS files where a deploy installs them
	// (/etc/robib/tls); here the same names in a scratch directory stand
	// in, given as flags, which win over the file.
	dir := t.TempDir()
	for _, name := range []string{"ca-cert.pem", "server-cert.pem", "server-key.pem", "gossip.key"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(raw), "tls-cert: /etc/robib/tls/server-cert.pem") || strings.Contains(string(raw), "insecure: true") {
			t.Errorf("%s: not secure by default (no tls-cert in /etc/robib/tls, or insecure)", f)
		}
		c, err := load(t, []string{"--config", f, "--tls-ca", filepath.Join(dir, "ca-cert.pem"),
			"--tls-cert", filepath.Join(dir, "server-cert.pem"), "--tls-key", filepath.Join(dir, "server-key.pem")}, nil)
		if err != nil {
			t.Errorf("%s: %v", f, err)
			continue
		}
		if c.Name == "" || c.DataDir != "/var/lib/robib" || len(c.Join) != 2 || c.BootstrapExpect != 3 || c.Insecure {
			t.Errorf("%s: loaded %+v", f, c)
		}
	}
}

// TestLoadClientTLSAndToken: the CLI's TLS files and token come from flags
// or variables; a certificate needs its key and the CA.
func TestLoadClientTLSAndToken(t *testing.T) {
	c, err := loadClient(t, []string{"--tls-ca", "/ca.pem", "--tls-cert", "/c.pem", "--tls-key", "/k.pem", "--token", "t0k"}, "")
	if err != nil || c.TLSCA != "/ca.pem" || c.TLSCert != "/c.pem" || c.TLSKey != "/k.pem" || c.Token != "t0k" {
		t.Fatalf("flags: %+v, %v", c, err)
	}
	t.Setenv("ROBIB_TLS_CA", "/env-ca.pem")
	t.Setenv("ROBIB_TOKEN", "from-env")
	fs := pflag.NewFlagSet("robib", pflag.ContinueOnError)
	RegisterClientFlags(fs)
	if c, err = LoadClient(fs); err != nil || c.TLSCA != "/env-ca.pem" || c.Token != "from-env" || c.TLSCert != "" {
		t.Fatalf("variables: %+v, %v", c, err)
	}
	for args, want := range map[string]string{
		"--tls-cert=/c.pem --tls-key=/k.pem": "invalid configuration: tls-cert needs tls-ca",
		"--tls-ca=/ca --tls-cert=/c.pem":     "invalid configuration: tls-cert and tls-key go together",
		"--tls-ca=/ca --tls-key=/k.pem":      "invalid configuration: tls-cert and tls-key go together",
	} {
		_, err := loadClient(t, strings.Fields(args), "")
		if err == nil || err.Error() != want {
			t.Errorf("%s: %v, want %q", args, err, want)
		}
	}
}

// TestLoadTLSDefaults: with TLS files NBD TLS is required and the gossip
// key is the one next to the certificate; with --insecure both are off;
// given values win.
func TestLoadTLSDefaults(t *testing.T) {
	dir := t.TempDir()
	site := tlsFiles(t, dir)
	secure := []string{"--name", "s1", "--data-dir", dir, "--tls-ca", filepath.Join(site, "ca-cert.pem"),
		"--tls-cert", filepath.Join(site, "server-cert.pem"), "--tls-key", filepath.Join(site, "server-key.pem")}
	c, err := load(t, secure, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.Insecure || c.NBDTLS != "" || c.NBDTLSMode() != NBDTLSRequire || c.GossipKeyPath() != filepath.Join(site, "gossip.key") || c.NBDTLSVerifyPeer {
		t.Fatalf("TLS defaults: %+v, NBD TLS %q, gossip key %q", c, c.NBDTLSMode(), c.GossipKeyPath())
	}
	other := filepath.Join(dir, "other.key")
	os.WriteFile(other, []byte("x"), 0o600)
	policy := filepath.Join(dir, "policy.yaml")
	os.WriteFile(policy, []byte("x"), 0o600)
	c, err = load(t, append(secure, "--nbd-tls", "on", "--nbd-tls-verify-peer", "--gossip-key", other, "--auth-policy", policy), nil)
	if err != nil {
		t.Fatal(err)
	}
	if c.NBDTLSMode() != NBDTLSOn || !c.NBDTLSVerifyPeer || c.GossipKeyPath() != other || c.AuthPolicy != policy {
		t.Fatalf("given values: %+v", c)
	}
	c, err = load(t, []string{"--name", "s1", "--data-dir", dir, "--insecure"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !c.Insecure || c.NBDTLSMode() != NBDTLSOff || c.GossipKeyPath() != "" {
		t.Fatalf("insecure: %+v, NBD TLS %q, gossip key %q", c, c.NBDTLSMode(), c.GossipKeyPath())
	}
	// A plaintext site may still encrypt gossip.
	if c, err = load(t, []string{"--name", "s1", "--data-dir", dir, "--insecure", "--gossip-key", other, "--nbd-tls", "off"}, nil); err != nil || c.GossipKeyPath() != other {
		t.Fatalf("insecure with a gossip key: %+v, %v", c, err)
	}
}
