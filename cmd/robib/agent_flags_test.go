package main

import (
	"bytes"
	"flag"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/robib/robib/cmd/internal/config"
	"github.com/robib/robib/cmd/internal/pki"
)

var update = flag.Bool("update", false, "rewrite testdata/agent-help.golden from robib agent --help")

// agentFlag records one `robib agent` flag as it was when the settings
// table replaced the hand-written flags: name, type and default as --help
// shows them, the environment variable, and a valid value other than the
// default (so that setting it changes the loaded Config).
type agentFlag struct {
	name, typ, def, env, alt string
}

// hostDefault stands for the host name, the default of --name.
const hostDefault = "<hostname>"

var recordedAgentFlags = []agentFlag{
	{"api-addr", "string", "127.0.0.1:10810", "ROBIB_API_ADDR", "127.0.0.2:7000"},
	{"auth-policy", "string", "", "ROBIB_AUTH_POLICY", "<policy>"},
	{"bootstrap-expect", "int", "0", "ROBIB_BOOTSTRAP_EXPECT", "3"},
	{"config", "string", "", "ROBIB_CONFIG", "<file>"},
	{"data-dir", "string", "", "ROBIB_DATA_DIR", "/other/dir"},
	{"dcd-buffer", "string", "64MiB", "ROBIB_DCD_BUFFER", "32MiB"},
	{"dcd-inflight", "int", "16", "ROBIB_DCD_INFLIGHT", "4"},
	{"election-timeout", "duration", "500ms", "ROBIB_ELECTION_TIMEOUT", "1s"},
	{"flush-timeout", "duration", "30s", "ROBIB_FLUSH_TIMEOUT", "1m0s"},
	{"gossip-addr", "string", "127.0.0.1:10812", "ROBIB_GOSSIP_ADDR", "127.0.0.2:7001"},
	{"gossip-key", "string", "", "ROBIB_GOSSIP_KEY", "<gossip>"},
	{"heartbeat-timeout", "duration", "500ms", "ROBIB_HEARTBEAT_TIMEOUT", "1s"},
	{"insecure", "bool", "false", "ROBIB_INSECURE", "true"},
	{"join", "stringSlice", "[]", "ROBIB_JOIN", "10.0.0.1:10812"},
	{"leader-follows-writes", "bool", "true", "ROBIB_LEADER_FOLLOWS_WRITES", "false"},
	{"leader-lease-timeout", "duration", "250ms", "ROBIB_LEADER_LEASE_TIMEOUT", "100ms"},
	{"link-delay", "duration", "0s", "ROBIB_LINK_DELAY", "10ms"},
	{"log-format", "string", "text", "ROBIB_LOG_FORMAT", "json"},
	{"log-level", "string", "info", "ROBIB_LOG_LEVEL", "debug"},
	{"name", "string", hostDefault, "ROBIB_NAME", "other-site"},
	{"nbd-addr", "string", ":10809", "ROBIB_NBD_ADDR", ":7002"},
	{"nbd-tls", "string", "", "ROBIB_NBD_TLS", "on"},
	{"nbd-tls-verify-peer", "bool", "false", "ROBIB_NBD_TLS_VERIFY_PEER", "true"},
	{"raft-addr", "string", "127.0.0.1:10811", "ROBIB_RAFT_ADDR", "127.0.0.2:7003"},
	{"raft-leader-overlap", "bool", "true", "ROBIB_RAFT_LEADER_OVERLAP", "false"},
	{"raft-log-store", "string", "dcd", "ROBIB_RAFT_LOG_STORE", "wal"},
	{"raft-transport", "string", "wire", "ROBIB_RAFT_TRANSPORT", "msgpack"},
	{"scrub-interval", "duration", "168h0m0s", "ROBIB_SCRUB_INTERVAL", "24h0m0s"},
	{"snapshot-interval", "duration", "2s", "ROBIB_SNAPSHOT_INTERVAL", "5s"},
	{"snapshot-threshold", "uint64", "128", "ROBIB_SNAPSHOT_THRESHOLD", "1024"},
	{"tls-ca", "string", "", "ROBIB_TLS_CA", "<ca>"},
	{"tls-cert", "string", "", "ROBIB_TLS_CERT", "<cert>"},
	{"tls-key", "string", "", "ROBIB_TLS_KEY", "<key>"},
	{"trailing-logs", "uint64", "256", "ROBIB_TRAILING_LOGS", "512"},
	{"volume-lease-ttl", "duration", "4s", "ROBIB_VOLUME_LEASE_TTL", "8s"},
}

// agentCmd returns the agent command inside a fresh root, as main builds it.
func agentCmd(t *testing.T) (root, agent *cobra.Command) {
	t.Helper()
	root = newRootCmd()
	agent, _, err := root.Find([]string{"agent"})
	if err != nil || agent.Name() != "agent" {
		t.Fatalf("no agent command: %v", err)
	}
	return root, agent
}

func hostName(t *testing.T) string {
	t.Helper()
	h, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// TestAgentFlagsAsRecorded: the agent's flags, their types and defaults are
// the ones recorded above (none lost, none renamed, no default changed).
func TestAgentFlagsAsRecorded(t *testing.T) {
	_, agent := agentCmd(t)
	got := map[string]agentFlag{}
	agent.LocalFlags().VisitAll(func(f *pflag.Flag) {
		got[f.Name] = agentFlag{name: f.Name, typ: f.Value.Type(), def: f.DefValue}
	})
	for _, want := range recordedAgentFlags {
		f, ok := got[want.name]
		if !ok {
			t.Errorf("flag --%s is gone", want.name)
			continue
		}
		delete(got, want.name)
		def := want.def
		if def == hostDefault {
			def = hostName(t)
		}
		if f.typ != want.typ || f.def != def {
			t.Errorf("--%s: type %s default %q; recorded %s %q", want.name, f.typ, f.def, want.typ, def)
		}
	}
	for name := range got {
		if name != "help" {
			t.Errorf("flag --%s is not recorded: add it to recordedAgentFlags (and the README table)", name)
		}
	}
}

// TestAgentHelpGolden: `robib agent --help` prints what it printed when
// the flags were written by hand (go test -run AgentHelpGolden -update
// rewrites the file after a deliberate change).
func TestAgentHelpGolden(t *testing.T) {
	t.Setenv("ROBIB_API", "") // the printed default of --api must not depend on the caller's environment
	root, _ := agentCmd(t)
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs([]string{"agent", "--help"})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(out.String(), "\n")
	for i, l := range lines {
		if strings.HasPrefix(strings.TrimSpace(l), "--name ") {
			lines[i] = strings.Replace(l, `(default "`+hostName(t)+`")`, `(default "`+hostDefault+`")`, 1)
		}
	}
	got := strings.Join(lines, "\n")
	golden := filepath.Join("testdata", "agent-help.golden")
	if *update {
		if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Fatalf("robib agent --help changed:\n--- got\n%s\n--- want (%s)\n%s", got, golden, want)
	}
}

// loadAgent loads the agent's Config from args and env the way the agent
// command does.
func loadAgent(t *testing.T, args []string, env map[string]string) (config.Config, error) {
	t.Helper()
	for k, v := range env {
		t.Setenv(k, v)
	}
	_, agent := agentCmd(t)
	fs := agent.Flags()
	if err := fs.Parse(args); err != nil {
		return config.Config{}, err
	}
	return config.Load(fs)
}

// TestAgentSettingsFromEveryChannel: each recorded setting is read from its
// flag, from its ROBIB_* variable and (all but --config) from the config
// file key of the same name: setting it to another valid value changes the
// loaded Config.
func TestAgentSettingsFromEveryChannel(t *testing.T) {
	dir := t.TempDir()
	// The variables a baseline needs; cleared so the caller's environment
	// does not leak in.
	for _, f := range recordedAgentFlags {
		t.Setenv(f.env, "")
	}
	// The baseline has TLS (a site of one CA); the alternative files are
	// a second site's of the same CA, with its own gossip.key.
	ca := filepath.Join(dir, "ca")
	if err := pki.CreateCA(ca, pki.CAOptions{}); err != nil {
		t.Fatal(err)
	}
	siteDir := func(name string) string {
		out := filepath.Join(dir, name)
		if err := pki.Issue(ca, pki.IssueRequest{Name: "s1", Kind: pki.KindSite, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, OutDir: out}); err != nil {
			t.Fatal(err)
		}
		return out
	}
	site, altDir := siteDir("site"), siteDir("alt")
	baseEnv := map[string]string{"ROBIB_NAME": "s1", "ROBIB_DATA_DIR": dir,
		"ROBIB_TLS_CA": filepath.Join(site, pki.CACertFile), "ROBIB_TLS_CERT": filepath.Join(site, pki.ServerCertFile), "ROBIB_TLS_KEY": filepath.Join(site, pki.ServerKeyFile)}
	base, err := loadAgent(t, nil, baseEnv)
	if err != nil {
		t.Fatal(err)
	}
	cfgFile := filepath.Join(dir, "alt.yaml")
	if err := os.WriteFile(cfgFile, []byte("nbd-addr: \":7009\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	policy := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(policy, []byte("{}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	alts := map[string]string{"<file>": cfgFile, "<policy>": policy, "<gossip>": filepath.Join(altDir, pki.GossipKeyFile),
		"<ca>": filepath.Join(altDir, pki.CACertFile), "<cert>": filepath.Join(altDir, pki.ServerCertFile), "<key>": filepath.Join(altDir, pki.ServerKeyFile)}
	for _, f := range recordedAgentFlags {
		alt := f.alt
		if a, ok := alts[alt]; ok {
			alt = a
		}
		baseEnv := baseEnv
		if f.name == "insecure" {
			// --insecure excludes the TLS files: its baseline has none.
			baseEnv = map[string]string{"ROBIB_NAME": "s1", "ROBIB_DATA_DIR": dir, "ROBIB_TLS_CA": "", "ROBIB_TLS_CERT": "", "ROBIB_TLS_KEY": ""}
		}
		t.Run(f.name, func(t *testing.T) {
			check := func(how string, c config.Config, err error) {
				t.Helper()
				if err != nil {
					t.Fatalf("%s: %v", how, err)
				}
				if reflect.DeepEqual(c, base) {
					t.Fatalf("%s = %q changed nothing: %+v", how, alt, c)
				}
			}
			env := map[string]string{f.env: alt}
			for k, v := range baseEnv {
				if k != f.env {
					env[k] = v
				}
			}
			c, err := loadAgent(t, nil, env)
			check(f.env, c, err)
			t.Setenv(f.env, "")
			c, err = loadAgent(t, []string{"--" + f.name + "=" + alt}, baseEnv)
			check("--"+f.name, c, err)
			if f.name == "config" {
				return
			}
			file := filepath.Join(t.TempDir(), "site.yaml")
			if err := os.WriteFile(file, []byte(f.name+": \""+alt+"\"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			delete(env, f.env) // the file's value, not the baseline's, for name and data-dir
			t.Setenv(f.env, "")
			c, err = loadAgent(t, []string{"--config", file}, env)
			check("config file key "+f.name, c, err)
		})
	}
}
