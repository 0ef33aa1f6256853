package config

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"github.com/spf13/viper"

	"github.com/robib/robib/cluster"
	"github.com/robib/robib/cmd/internal/pki"
	"github.com/robib/robib/dcd"
)

// agentSettings is the table of the agent's settings, bound to c: one entry
// per setting, from which the flags (RegisterFlags), the config-file keys,
// the ROBIB_* variables (Load) and the validation (Validate) are all made.
// The flag name is the config-file key; the variable is envName(key).
// Defaults come from the packages that own them (cluster.DefaultConfig,
// dcd.DefaultConfig); only the agent's own (addresses, logging, the test
// knob) are written here. Entries are validated in this order and the first
// failure is reported, so a check may rely on the entries above it.
//
// Adding a setting: a Config field, an entry here, and the code that uses
// it; the README's flag table gets a row (TestREADMEFlagTable says which).
func agentSettings(c *Config) []setting {
	cl, wb := cluster.DefaultConfig(), dcd.DefaultConfig()
	host, _ := os.Hostname()
	var file string // --config is read before the rest, straight from viper
	return []setting{
		opt(KeyConfig, &file, "", "config file (yaml, toml or json); flags and ROBIB_* variables override it", nil).notInFile(),
		opt(KeyName, &c.Name, host, "site name, unique in the cluster", func(v string) error {
			if !pki.ValidName(v) {
				return fmt.Errorf("%s %q: 1-63 characters of letters, digits, '.', '_' or '-', starting with a letter or digit", KeyName, v)
			}
			return nil
		}).documented("host name"),
		opt(KeyDataDir, &c.DataDir, "", "data directory for volumes and cluster state (required)", func(v string) error {
			if strings.TrimSpace(v) == "" {
				return fmt.Errorf("%s is required", KeyDataDir)
			}
			return nil
		}).documented("(required)"),
		opt(KeyNBDAddr, &c.NBDAddr, DefaultNBDAddr, "NBD listen address", keyed(KeyNBDAddr, ValidateAddr)),
		// The API address is advertised too: other sites forward writes and
		// collect status and verify results there.
		opt(KeyAPIAddr, &c.APIAddr, DefaultAPIAddr, "admin HTTP API address, also where other sites forward writes: a concrete address they can reach, not a wildcard",
			keyed(KeyAPIAddr, ValidateAdvertiseAddr)),
		opt(KeyLogLevel, &c.LogLevel, "info", "log level: debug, info, warn, error", keyed(KeyLogLevel, func(v string) error {
			_, err := ParseLevel(v)
			return err
		})),
		opt(KeyLogFormat, &c.LogFormat, "text", "log format: text or json", func(v string) error {
			if v != "text" && v != "json" {
				return fmt.Errorf("%s %q: want text or json", KeyLogFormat, v)
			}
			return nil
		}),
		opt(KeyRaftAddr, &c.RaftAddr, DefaultRaftAddr, "Raft address, as other sites reach it", keyed(KeyRaftAddr, ValidateAdvertiseAddr)),
		opt(KeyGossipAddr, &c.GossipAddr, DefaultGossipAddr, "gossip (memberlist) address, as other sites reach it", func(v string) error {
			if err := ValidateAdvertiseAddr(v); err != nil {
				return fmt.Errorf("%s: %w", KeyGossipAddr, err)
			}
			if host, _, _ := net.SplitHostPort(v); net.ParseIP(host) == nil {
				return fmt.Errorf("%s %q: gossip needs an IP address, not a host name", KeyGossipAddr, v)
			}
			if c.RaftAddr == v {
				return fmt.Errorf("%s and %s must differ", KeyRaftAddr, KeyGossipAddr)
			}
			return nil
		}),
		opt(KeyJoin, &c.Join, nil, "gossip addresses of existing sites to join (host:port,...)", func(v []string) error {
			for _, j := range v {
				if err := ValidateAddr(j); err != nil {
					return fmt.Errorf("%s: %w", KeyJoin, err)
				}
			}
			return nil
		}),
		opt(KeyBootstrapExpect, &c.BootstrapExpect, 0, "start a new cluster once this many sites gossip (all starting sites give the same N)", func(v int) error {
			if v < 0 || v > 15 {
				return fmt.Errorf("%s %d: want 0..15", KeyBootstrapExpect, v)
			}
			return nil
		}),
		opt(KeySnapshotThreshold, &c.SnapshotThreshold, cl.SnapshotThreshold, "Raft log entries between snapshots (entries are up to 512KiB; snapshots are cheap: a checkpoint, no volume copy)", func(v uint64) error {
			if v < 16 {
				return fmt.Errorf("%s %d: want at least 16", KeySnapshotThreshold, v)
			}
			return nil
		}),
		opt(KeySnapshotInterval, &c.SnapshotInterval, cl.SnapshotInterval, "how often Raft checks whether to snapshot", func(v time.Duration) error {
			if v < 100*time.Millisecond {
				return fmt.Errorf("%s %v: want at least 100ms", KeySnapshotInterval, v)
			}
			return nil
		}),
		opt(KeyTrailingLogs, &c.TrailingLogs, cl.TrailingLogs, "Raft log entries kept after a snapshot for lagging sites", func(v uint64) error {
			if v < 1 {
				return fmt.Errorf("%s must be at least 1", KeyTrailingLogs)
			}
			return nil
		}),
		opt(KeyHeartbeatTimeout, &c.HeartbeatTimeout, cl.HeartbeatTimeout, "Raft heartbeat timeout: a follower that hears nothing from the leader for 1-2× this starts an election (failover time); raise it on slow or lossy WAN links",
			minTimeout),
		opt(KeyElectionTimeout, &c.ElectionTimeout, cl.ElectionTimeout, "Raft election timeout: how long a candidate waits for votes before retrying", minTimeout),
		opt(KeyLeaderLease, &c.LeaderLease, cl.LeaderLeaseTimeout, "Raft leader lease timeout: a leader that cannot reach a majority for this long steps down (at most heartbeat-timeout)", func(v time.Duration) error {
			if v < 5*time.Millisecond || v > c.HeartbeatTimeout {
				return fmt.Errorf("%s %v: want 5ms..%s (%v)", KeyLeaderLease, v, KeyHeartbeatTimeout, c.HeartbeatTimeout)
			}
			return nil
		}),
		sizeOpt(KeyDCDBuffer, &c.DCDBuffer, wb.MaxBufferBytes, "write-back buffer per attached volume (unreplicated writes)", func(v int64) error {
			if v < 1<<20 || v > 16<<30 {
				return fmt.Errorf("%s %d: want 1MiB..16GiB", KeyDCDBuffer, v)
			}
			return nil
		}),
		opt(KeyDCDInflight, &c.DCDInflight, wb.MaxInflight, "write batches committing at once per attached volume (at most; small writes gather into fuller batches while commits are in flight)", func(v int) error {
			if v < 1 || v > 64 {
				return fmt.Errorf("%s %d: want 1..64", KeyDCDInflight, v)
			}
			return nil
		}),
		opt(KeyVolumeLeaseTTL, &c.VolumeLeaseTTL, cl.LeaseTTL, "a read-write attach's volume lease expires this long after its site stops renewing it (same value on every site)", func(v time.Duration) error {
			if v < 2*c.HeartbeatTimeout || v > 10*time.Minute {
				return fmt.Errorf("%s %v: want 2×%s (%v)..10m", KeyVolumeLeaseTTL, v, KeyHeartbeatTimeout, 2*c.HeartbeatTimeout)
			}
			return nil
		}),
		opt(KeyFlushTimeout, &c.FlushTimeout, wb.FlushTimeout, "a flush not committed on a majority of sites within this fails with EIO", func(v time.Duration) error {
			if v < time.Second || v > time.Hour {
				return fmt.Errorf("%s %v: want 1s..1h", KeyFlushTimeout, v)
			}
			return nil
		}),
		opt(KeyScrubInterval, &c.ScrubInterval, cl.ScrubInterval, "how often every local volume is read whole and checked against its block checksums, damage repaired from other sites (0: never; a read that finds damage still starts one)", func(v time.Duration) error {
			if v != 0 && v < time.Second {
				return fmt.Errorf("%s %v: want 0 (off) or at least 1s", KeyScrubInterval, v)
			}
			return nil
		}),
		opt(KeyRaftLogStore, &c.RaftLogStore, cl.LogStore, "Raft log store: dcd (robib's DCD log), boltdb or wal (raft-wal); chosen when the data dir is created and fixed for it", func(v string) error {
			// Empty (a Config built in code) means the default, dcd.
			if v != "" && v != LogStoreDCD && v != LogStoreBoltDB && v != LogStoreWAL {
				return fmt.Errorf("%s %q: want %s, %s or %s", KeyRaftLogStore, v, LogStoreDCD, LogStoreBoltDB, LogStoreWAL)
			}
			return nil
		}),
		opt(KeyRaftTransport, &c.RaftTransport, cl.RaftTransport, "Raft transport between sites: wire (robib's framing, no payload copies) or msgpack (hashicorp/raft's); every site of a cluster must use the same", func(v string) error {
			if v != "" && v != cluster.TransportWire && v != cluster.TransportMsgpack {
				return fmt.Errorf("%s %q: want %s or %s", KeyRaftTransport, v, cluster.TransportWire, cluster.TransportMsgpack)
			}
			return nil
		}),
		opt(KeyLinkDelay, &c.LinkDelay, 0, "testing/benchmark knob: emulate a WAN between sites by delaying every site-to-site connection this agent dials (Raft, API forwarding) by this much in each direction (0..1s; a round trip costs twice this); NBD and gossip are not delayed", func(v time.Duration) error {
			if v < 0 || v > time.Second {
				return fmt.Errorf("%s %v: want 0..1s", KeyLinkDelay, v)
			}
			return nil
		}),
		opt(KeyLeaderFollows, &c.LeaderFollowsWrites, cl.LeaderFollowsWrites, "move Raft leadership to the site that sends nearly all writes (sustained for a few seconds), so its flushes skip the forward to a remote leader: one round trip instead of two across a WAN", nil),
		opt(KeyLeaderOverlap, &c.LeaderOverlap, cl.LeaderOverlap, "with the dcd log store, let the leader's durable append overlap replication (a follower's answer counts only once the leader's copy is durable); false: the leader syncs before it replicates", nil),

		// Security: TLS unless --insecure. The files are checked to exist
		// here and parsed when the agent starts (pki.Load).
		opt(KeyTLSCA, &c.TLSCA, "", "cluster CA certificate (PEM, from robib cert ca): the only root trusted on every link", tlsFile(KeyTLSCA, &c.Insecure)),
		opt(KeyTLSCert, &c.TLSCert, "", "this site's certificate (PEM, from robib cert issue --kind site) for Raft, API and NBD; read again when the file changes", tlsFile(KeyTLSCert, &c.Insecure)),
		opt(KeyTLSKey, &c.TLSKey, "", "the private key of tls-cert (PEM); read again with it", tlsFile(KeyTLSKey, &c.Insecure)),
		opt(KeyInsecure, &c.Insecure, false, "run without TLS: every link plaintext and unauthenticated (tests and demos only); excludes tls-ca, tls-cert and tls-key", func(v bool) error {
			var set []string
			for _, f := range []struct{ key, v string }{{KeyTLSCA, c.TLSCA}, {KeyTLSCert, c.TLSCert}, {KeyTLSKey, c.TLSKey}} {
				if f.v != "" {
					set = append(set, f.key)
				}
			}
			if v && len(set) > 0 {
				return fmt.Errorf("%s together with %s: plaintext or TLS, not both", KeyInsecure, strings.Join(set, ", "))
			}
			return nil
		}),
		opt(KeyNBDTLS, &c.NBDTLS, "", "NBD TLS (STARTTLS): off, on (clients choose) or require; default require with TLS, off with --insecure", func(v string) error {
			switch v {
			case "", NBDTLSOff:
			case NBDTLSOn, NBDTLSRequire:
				if c.Insecure {
					return fmt.Errorf("%s %s needs TLS: not with --%s", KeyNBDTLS, v, KeyInsecure)
				}
			default:
				return fmt.Errorf("%s %q: want %s, %s or %s", KeyNBDTLS, v, NBDTLSOff, NBDTLSOn, NBDTLSRequire)
			}
			return nil
		}).documented("require (off with --insecure)"),
		opt(KeyNBDTLSVerifyPeer, &c.NBDTLSVerifyPeer, false, "NBD clients must present a client certificate of the cluster CA (robib cert issue --kind client); a site's certificate is refused", func(v bool) error {
			switch {
			case !v:
			case c.Insecure:
				return fmt.Errorf("%s needs TLS: not with --%s", KeyNBDTLSVerifyPeer, KeyInsecure)
			case c.NBDTLSMode() == NBDTLSOff:
				return fmt.Errorf("%s needs %s on or require", KeyNBDTLSVerifyPeer, KeyNBDTLS)
			}
			return nil
		}),
		opt(KeyGossipKey, &c.GossipKeyFile, "", "file holding the base64 gossip encryption key (default: gossip.key next to tls-cert, as robib cert issue writes it); required with TLS", func(v string) error {
			if v != "" {
				return checkFile(KeyGossipKey, v)
			}
			if !c.Insecure && c.GossipKeyPath() == "" {
				return fmt.Errorf("%s is required with TLS: none given and %s has no %s", KeyGossipKey, filepath.Dir(c.TLSCert), pki.GossipKeyFile)
			}
			return nil
		}).documented("gossip.key next to tls-cert"),
		opt(KeyAuthPolicy, &c.AuthPolicy, "", "authorization policy file (optional)", func(v string) error {
			if v == "" {
				return nil
			}
			return checkFile(KeyAuthPolicy, v)
		}),
	}
}

// tlsFile is the rule of a TLS file setting: required unless insecure, and
// an existing file.
func tlsFile(key string, insecure *bool) func(string) error {
	return func(v string) error {
		if v == "" {
			if *insecure {
				return nil
			}
			return fmt.Errorf("%s is required: every link uses TLS (%s, %s and %s, from robib cert); plaintext needs --%s", key, KeyTLSCA, KeyTLSCert, KeyTLSKey, KeyInsecure)
		}
		return checkFile(key, v)
	}
}

// checkFile is the rule of a file setting: the file exists.
func checkFile(key, path string) error {
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("%s %q: no such file", key, path)
	case err != nil:
		return fmt.Errorf("%s %q: %v", key, path, err)
	case fi.IsDir():
		return fmt.Errorf("%s %q: is a directory, want a file", key, path)
	}
	return nil
}

// clientSettings is the CLI's table: the settings of every command but
// `robib agent`, from flags and ROBIB_* variables (there is no file).
func clientSettings(c *Client) []setting {
	return []setting{
		opt(KeyAPI, &c.API, DefaultAPI, "admin API of the agent to talk to (env ROBIB_API); https with --tls-ca", nil).notInFile(),
		opt(KeyTLSCA, &c.TLSCA, "", "cluster CA certificate (env ROBIB_TLS_CA): talk https to the agent and check it is a site of this CA", nil).notInFile(),
		opt(KeyTLSCert, &c.TLSCert, "", "certificate to present to the agent (env ROBIB_TLS_CERT; with --tls-key)", func(v string) error {
			if v != "" && c.TLSCA == "" {
				return fmt.Errorf("%s needs %s", KeyTLSCert, KeyTLSCA)
			}
			if (v == "") != (c.TLSKey == "") {
				return fmt.Errorf("%s and %s go together", KeyTLSCert, KeyTLSKey)
			}
			return nil
		}).notInFile(),
		opt(KeyTLSKey, &c.TLSKey, "", "private key of --tls-cert (env ROBIB_TLS_KEY)", nil).notInFile(),
		opt(KeyToken, &c.Token, "", "API token, sent as Authorization: Bearer (env ROBIB_TOKEN, which keeps it out of the process list)", nil).notInFile(),
	}
}

// minTimeout is the rule shared by the two Raft timeouts.
func minTimeout(v time.Duration) error {
	if v < 5*time.Millisecond {
		return fmt.Errorf("%s and %s must be at least 5ms", KeyHeartbeatTimeout, KeyElectionTimeout)
	}
	return nil
}

// keyed turns a value check into a setting's rule that names the key.
func keyed[T any](key string, check func(T) error) func(T) error {
	return func(v T) error {
		if err := check(v); err != nil {
			return fmt.Errorf("%s: %w", key, err)
		}
		return nil
	}
}

// setting is one row of a settings table, bound to the field it fills.
type setting struct {
	key    string                     // flag name and config-file key
	help   string                     // the flag's usage text
	doc    string                     // the default as the docs write it, if not as --help shows it
	inFile bool                       // may be set in the config file
	define func(fs *pflag.FlagSet)    // declares the flag with its default
	read   func(v *viper.Viper) error // fills the field from v
	check  func() error               // validates the field; nil: no rule
}

// flagValue is what a setting can hold.
type flagValue interface {
	string | []string | int | uint64 | time.Duration | bool
}

// opt makes a row for the field p: flag key (of T's type) with default def,
// read back with viper's getter for T; check, if not nil, is its rule.
func opt[T flagValue](key string, p *T, def T, help string, check func(T) error) setting {
	s := setting{key: key, help: help, inFile: true}
	s.define = func(fs *pflag.FlagSet) {
		switch d := any(def).(type) {
		case string:
			fs.String(key, d, help)
		case []string:
			fs.StringSlice(key, d, help)
		case int:
			fs.Int(key, d, help)
		case uint64:
			fs.Uint64(key, d, help)
		case time.Duration:
			fs.Duration(key, d, help)
		case bool:
			fs.Bool(key, d, help)
		}
	}
	s.read = func(v *viper.Viper) error {
		switch p := any(p).(type) {
		case *string:
			*p = v.GetString(key)
		case *[]string:
			*p = splitList(v.GetStringSlice(key))
		case *int:
			*p = v.GetInt(key)
		case *uint64:
			*p = v.GetUint64(key)
		case *time.Duration:
			*p = v.GetDuration(key)
		case *bool:
			*p = v.GetBool(key)
		}
		return nil
	}
	if check != nil {
		s.check = func() error { return check(*p) }
	}
	return s
}

// sizeOpt makes a row for a byte count: a string flag ("64MiB") read with
// ParseSize.
func sizeOpt(key string, p *int64, def int64, help string, check func(int64) error) setting {
	s := setting{key: key, help: help, inFile: true}
	s.define = func(fs *pflag.FlagSet) { fs.String(key, FormatSize(def), help) }
	s.read = func(v *viper.Viper) error {
		n, err := ParseSize(v.GetString(key))
		if err != nil {
			return fmt.Errorf("%w: %s: %w", ErrInvalidConfig, key, err)
		}
		*p = n
		return nil
	}
	if check != nil {
		s.check = func() error { return check(*p) }
	}
	return s
}

func (s setting) notInFile() setting { s.inFile = false; return s }

func (s setting) documented(doc string) setting { s.doc = doc; return s }

// envName is the environment variable of a key: ROBIB_, then the key in
// upper case with '-' as '_'.
func envName(key string) string {
	return "ROBIB_" + strings.ToUpper(strings.ReplaceAll(key, "-", "_"))
}

// register declares the flags of table on fs.
func register(fs *pflag.FlagSet, table []setting) {
	for _, s := range table {
		s.define(fs)
	}
}

// bind makes a viper reading each setting of table from its flag in fs
// (when set), else its variable, else (once a file is read) the file, else
// the flag's default.
func bind(fs *pflag.FlagSet, table []setting) (*viper.Viper, error) {
	v := viper.New()
	for _, s := range table {
		if err := v.BindPFlag(s.key, fs.Lookup(s.key)); err != nil {
			return nil, fmt.Errorf("binding flag --%s: %w", s.key, err)
		}
		if err := v.BindEnv(s.key, envName(s.key)); err != nil {
			return nil, fmt.Errorf("binding %s: %w", envName(s.key), err)
		}
	}
	return v, nil
}

// readAll fills the fields of table from v.
func readAll(v *viper.Viper, table []setting) error {
	for _, s := range table {
		if err := s.read(v); err != nil {
			return err
		}
	}
	return nil
}

// Setting describes one agent setting, for documentation and its tests.
type Setting struct {
	Key     string // flag name (--Key) and, if InFile, config-file key
	Env     string // environment variable
	InFile  bool
	Type    string // the flag's type, as --help names it
	Default string // the flag's default as pflag records it (--help omits zero ones)
	Doc     string // the default as the docs write it: Default ("" for an empty list), or words ("host name", "(required)")
	Help    string
}

// Settings describes the agent's settings in table order.
func Settings() []Setting {
	return describe(agentSettings(&Config{}))
}

// ClientSettings describes the CLI's settings.
func ClientSettings() []Setting {
	return describe(clientSettings(&Client{}))
}

func describe(table []setting) []Setting {
	fs := pflag.NewFlagSet("describe", pflag.ContinueOnError)
	register(fs, table)
	out := make([]Setting, 0, len(table))
	for _, s := range table {
		f := fs.Lookup(s.key)
		d := Setting{Key: s.key, Env: envName(s.key), InFile: s.inFile, Type: f.Value.Type(), Default: f.DefValue, Doc: s.doc, Help: s.help}
		if d.Doc == "" && d.Default != "[]" { // an empty list is written as nothing
			d.Doc = d.Default
		}
		out = append(out, d)
	}
	return out
}
