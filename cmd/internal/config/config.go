// Package config holds the agent's configuration: one struct, filled from a
// config file, ROBIB_* environment variables and command-line flags (in
// rising order of precedence) through viper, and validated in one place.
package config

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"github.com/spf13/viper"
)

// ErrInvalidConfig is returned (wrapped, with the offending key) for any
// configuration that does not validate.
var ErrInvalidConfig = errors.New("invalid configuration")

// Config is the whole agent configuration. Field tags name the flag, the
// config-file key and (upper-cased, '-' as '_', prefixed ROBIB_) the
// environment variable.
type Config struct {
	Name      string // site name, unique in the cluster
	DataDir   string // where volumes and cluster state live
	NBDAddr   string // NBD listener, host:port
	APIAddr   string // admin HTTP API listener, host:port
	LogLevel  string // debug, info, warn, error
	LogFormat string // text or json

	// Cluster.
	RaftAddr          string        // Raft listener, advertised to other sites: host:port
	GossipAddr        string        // memberlist bind and advertise address: host:port
	Join              []string      // gossip addresses of existing members
	BootstrapExpect   int           // start a new cluster once this many sites gossip
	SnapshotThreshold uint64        // Raft entries between snapshots
	SnapshotInterval  time.Duration // how often Raft checks the threshold
	TrailingLogs      uint64        // log entries kept after a snapshot
	HeartbeatTimeout  time.Duration // Raft heartbeat timeout
	ElectionTimeout   time.Duration // Raft election timeout
	LeaderLease       time.Duration // Raft leader lease timeout
	VolumeLeaseTTL    time.Duration // a read-write attach's volume lease lives this long without renewal
	RaftLogStore      string        // Raft log store: "dcd" (default, also ""), "boltdb" or "wal"; fixed per data dir
	// LeaderFollowsWrites: the leader hands leadership to a site that
	// sends it nearly all write batches (see cluster/placement.go).
	LeaderFollowsWrites bool
	// LeaderOverlap: with the dcd log store, the leader's durable append
	// overlaps replication (cluster/leadersync.go). Off: the leader syncs
	// before it replicates, as hashicorp/raft does on its own.
	LeaderOverlap bool

	// Write-back stage (DCD).
	DCDBuffer   int64 // bytes of unreplicated writes buffered per volume at this site
	DCDInflight int   // batches committing at once per volume
	// FlushTimeout: a FLUSH (or FUA write) not committed on a majority of
	// sites within it fails with EIO instead of waiting forever.
	FlushTimeout time.Duration

	// LinkDelay is a testing/benchmark knob: a one-way delay added in each
	// direction of every site-to-site connection this agent dials (Raft
	// and API forwarding), emulating a WAN between sites on one machine.
	LinkDelay time.Duration
}

// Defaults.
const (
	DefaultNBDAddr    = ":10809"
	DefaultAPIAddr    = "127.0.0.1:10810"
	DefaultRaftAddr   = "127.0.0.1:10811"
	DefaultGossipAddr = "127.0.0.1:10812"
)

// Raft log stores (--raft-log-store).
const (
	LogStoreDCD    = "dcd"
	LogStoreBoltDB = "boltdb"
	LogStoreWAL    = "wal"
)

// Keys used for flags, the config file and the environment.
const (
	KeyConfig    = "config"
	KeyName      = "name"
	KeyDataDir   = "data-dir"
	KeyNBDAddr   = "nbd-addr"
	KeyAPIAddr   = "api-addr"
	KeyLogLevel  = "log-level"
	KeyLogFormat = "log-format"

	KeyRaftAddr          = "raft-addr"
	KeyGossipAddr        = "gossip-addr"
	KeyJoin              = "join"
	KeyBootstrapExpect   = "bootstrap-expect"
	KeySnapshotThreshold = "snapshot-threshold"
	KeySnapshotInterval  = "snapshot-interval"
	KeyTrailingLogs      = "trailing-logs"
	KeyHeartbeatTimeout  = "heartbeat-timeout"
	KeyElectionTimeout   = "election-timeout"
	KeyLeaderLease       = "leader-lease-timeout"
	KeyDCDBuffer         = "dcd-buffer"
	KeyDCDInflight       = "dcd-inflight"
	KeyVolumeLeaseTTL    = "volume-lease-ttl"
	KeyFlushTimeout      = "flush-timeout"
	KeyRaftLogStore      = "raft-log-store"
	KeyLinkDelay         = "link-delay"
	KeyLeaderFollows     = "leader-follows-writes"
	KeyLeaderOverlap     = "raft-leader-overlap"
)

var fileKeys = []string{KeyName, KeyDataDir, KeyNBDAddr, KeyAPIAddr, KeyLogLevel, KeyLogFormat,
	KeyRaftAddr, KeyGossipAddr, KeyJoin, KeyBootstrapExpect, KeySnapshotThreshold, KeySnapshotInterval,
	KeyTrailingLogs, KeyHeartbeatTimeout, KeyElectionTimeout, KeyLeaderLease, KeyDCDBuffer, KeyDCDInflight,
	KeyVolumeLeaseTTL, KeyFlushTimeout, KeyRaftLogStore, KeyLinkDelay, KeyLeaderFollows, KeyLeaderOverlap}

// RegisterFlags declares the agent flags on fs.
func RegisterFlags(fs *pflag.FlagSet) {
	host, _ := os.Hostname()
	fs.String(KeyConfig, "", "config file (yaml, toml or json); flags and ROBIB_* variables override it")
	fs.String(KeyName, host, "site name, unique in the cluster")
	fs.String(KeyDataDir, "", "data directory for volumes and cluster state (required)")
	fs.String(KeyNBDAddr, DefaultNBDAddr, "NBD listen address")
	fs.String(KeyAPIAddr, DefaultAPIAddr, "admin HTTP API address, also where other sites forward writes: a concrete address they can reach, not a wildcard")
	fs.String(KeyLogLevel, "info", "log level: debug, info, warn, error")
	fs.String(KeyLogFormat, "text", "log format: text or json")
	fs.String(KeyRaftAddr, DefaultRaftAddr, "Raft address, as other sites reach it")
	fs.String(KeyGossipAddr, DefaultGossipAddr, "gossip (memberlist) address, as other sites reach it")
	fs.StringSlice(KeyJoin, nil, "gossip addresses of existing sites to join (host:port,...)")
	fs.Int(KeyBootstrapExpect, 0, "start a new cluster once this many sites gossip (all starting sites give the same N)")
	fs.Uint64(KeySnapshotThreshold, 128, "Raft log entries between snapshots (entries are up to 512KiB; snapshots are cheap: a checkpoint, no volume copy)")
	fs.Duration(KeySnapshotInterval, 2*time.Second, "how often Raft checks whether to snapshot")
	fs.Uint64(KeyTrailingLogs, 256, "Raft log entries kept after a snapshot for lagging sites")
	fs.Duration(KeyHeartbeatTimeout, 500*time.Millisecond, "Raft heartbeat timeout: a follower that hears nothing from the leader for 1-2× this starts an election (failover time); raise it on slow or lossy WAN links")
	fs.Duration(KeyElectionTimeout, 500*time.Millisecond, "Raft election timeout: how long a candidate waits for votes before retrying")
	fs.Duration(KeyLeaderLease, 250*time.Millisecond, "Raft leader lease timeout: a leader that cannot reach a majority for this long steps down (at most heartbeat-timeout)")
	fs.String(KeyDCDBuffer, "64MiB", "write-back buffer per attached volume (unreplicated writes)")
	fs.Int(KeyDCDInflight, 16, "write batches committing at once per attached volume (at most; small writes gather into fuller batches while commits are in flight)")
	fs.Duration(KeyVolumeLeaseTTL, 4*time.Second, "a read-write attach's volume lease expires this long after its site stops renewing it (same value on every site)")
	fs.Duration(KeyFlushTimeout, 30*time.Second, "a flush not committed on a majority of sites within this fails with EIO")
	fs.String(KeyRaftLogStore, LogStoreDCD, "Raft log store: dcd (robib's DCD log), boltdb or wal (raft-wal); chosen when the data dir is created and fixed for it")
	fs.Bool(KeyLeaderOverlap, true, "with the dcd log store, let the leader's durable append overlap replication (a follower's answer counts only once the leader's copy is durable); false: the leader syncs before it replicates")
	fs.Bool(KeyLeaderFollows, true, "move Raft leadership to the site that sends nearly all writes (sustained for a few seconds), so its flushes skip the forward to a remote leader: one round trip instead of two across a WAN")
	fs.Duration(KeyLinkDelay, 0, "testing/benchmark knob: emulate a WAN between sites by delaying every site-to-site connection this agent dials (Raft, API forwarding) by this much in each direction (0..1s; a round trip costs twice this); NBD and gossip are not delayed")
}

// Load builds the Config from flags (already parsed), the environment and
// the config file named by --config or ROBIB_CONFIG, then validates it.
func Load(fs *pflag.FlagSet) (Config, error) {
	v := viper.New()
	v.SetEnvPrefix("ROBIB")
	v.SetEnvKeyReplacer(strings.NewReplacer("-", "_"))
	v.AutomaticEnv()
	if err := v.BindPFlags(fs); err != nil {
		return Config{}, fmt.Errorf("binding flags: %w", err)
	}
	if path := v.GetString(KeyConfig); path != "" {
		v.SetConfigFile(path)
		if err := v.ReadInConfig(); err != nil {
			return Config{}, fmt.Errorf("%w: reading config file %s: %v", ErrInvalidConfig, path, err)
		}
		if err := checkFileKeys(path); err != nil {
			return Config{}, err
		}
	}
	c := Config{
		Name:      v.GetString(KeyName),
		DataDir:   v.GetString(KeyDataDir),
		NBDAddr:   v.GetString(KeyNBDAddr),
		APIAddr:   v.GetString(KeyAPIAddr),
		LogLevel:  v.GetString(KeyLogLevel),
		LogFormat: v.GetString(KeyLogFormat),

		RaftAddr:          v.GetString(KeyRaftAddr),
		GossipAddr:        v.GetString(KeyGossipAddr),
		Join:              splitList(v.GetStringSlice(KeyJoin)),
		BootstrapExpect:   v.GetInt(KeyBootstrapExpect),
		SnapshotThreshold: v.GetUint64(KeySnapshotThreshold),
		SnapshotInterval:  v.GetDuration(KeySnapshotInterval),
		TrailingLogs:      v.GetUint64(KeyTrailingLogs),
		HeartbeatTimeout:  v.GetDuration(KeyHeartbeatTimeout),
		ElectionTimeout:   v.GetDuration(KeyElectionTimeout),
		LeaderLease:       v.GetDuration(KeyLeaderLease),
		DCDInflight:       v.GetInt(KeyDCDInflight),
		VolumeLeaseTTL:    v.GetDuration(KeyVolumeLeaseTTL),
		FlushTimeout:      v.GetDuration(KeyFlushTimeout),
		RaftLogStore:      v.GetString(KeyRaftLogStore),
		LinkDelay:         v.GetDuration(KeyLinkDelay),

		LeaderFollowsWrites: v.GetBool(KeyLeaderFollows),
		LeaderOverlap:       v.GetBool(KeyLeaderOverlap),
	}
	buf, err := ParseSize(v.GetString(KeyDCDBuffer))
	if err != nil {
		return c, fmt.Errorf("%w: %s: %v", ErrInvalidConfig, KeyDCDBuffer, err)
	}
	c.DCDBuffer = buf
	return c, c.Validate()
}

// checkFileKeys rejects keys in the config file that robib does not know, so
// that a typo is an error rather than a silently ignored setting.
func checkFileKeys(path string) error {
	f := viper.New()
	f.SetConfigFile(path)
	if err := f.ReadInConfig(); err != nil {
		return fmt.Errorf("%w: reading config file %s: %v", ErrInvalidConfig, path, err)
	}
	for _, k := range f.AllKeys() {
		if !slices.Contains(fileKeys, k) {
			return fmt.Errorf("%w: config file %s: unknown key %q (known: %s)", ErrInvalidConfig, path, k, strings.Join(fileKeys, ", "))
		}
	}
	return nil
}

var siteName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// Validate checks every field and returns the first problem found.
func (c Config) Validate() error {
	if !siteName.MatchString(c.Name) {
		return fmt.Errorf("%w: %s %q: 1-63 characters of letters, digits, '.', '_' or '-', starting with a letter or digit", ErrInvalidConfig, KeyName, c.Name)
	}
	if strings.TrimSpace(c.DataDir) == "" {
		return fmt.Errorf("%w: %s is required", ErrInvalidConfig, KeyDataDir)
	}
	if err := ValidateAddr(c.NBDAddr); err != nil {
		return fmt.Errorf("%w: %s: %v", ErrInvalidConfig, KeyNBDAddr, err)
	}
	if _, err := ParseLevel(c.LogLevel); err != nil {
		return fmt.Errorf("%w: %s: %v", ErrInvalidConfig, KeyLogLevel, err)
	}
	if c.LogFormat != "text" && c.LogFormat != "json" {
		return fmt.Errorf("%w: %s %q: want text or json", ErrInvalidConfig, KeyLogFormat, c.LogFormat)
	}
	// The API address is advertised too: other sites forward writes and
	// collect status and verify results there.
	for key, addr := range map[string]string{KeyRaftAddr: c.RaftAddr, KeyGossipAddr: c.GossipAddr, KeyAPIAddr: c.APIAddr} {
		if err := ValidateAdvertiseAddr(addr); err != nil {
			return fmt.Errorf("%w: %s: %v", ErrInvalidConfig, key, err)
		}
	}
	if host, _, _ := net.SplitHostPort(c.GossipAddr); net.ParseIP(host) == nil {
		return fmt.Errorf("%w: %s %q: gossip needs an IP address, not a host name", ErrInvalidConfig, KeyGossipAddr, c.GossipAddr)
	}
	if c.RaftAddr == c.GossipAddr {
		return fmt.Errorf("%w: %s and %s must differ", ErrInvalidConfig, KeyRaftAddr, KeyGossipAddr)
	}
	for _, j := range c.Join {
		if err := ValidateAddr(j); err != nil {
			return fmt.Errorf("%w: %s: %v", ErrInvalidConfig, KeyJoin, err)
		}
	}
	if c.BootstrapExpect < 0 || c.BootstrapExpect > 15 {
		return fmt.Errorf("%w: %s %d: want 0..15", ErrInvalidConfig, KeyBootstrapExpect, c.BootstrapExpect)
	}
	if c.SnapshotThreshold < 16 {
		return fmt.Errorf("%w: %s %d: want at least 16", ErrInvalidConfig, KeySnapshotThreshold, c.SnapshotThreshold)
	}
	if c.SnapshotInterval < 100*time.Millisecond {
		return fmt.Errorf("%w: %s %v: want at least 100ms", ErrInvalidConfig, KeySnapshotInterval, c.SnapshotInterval)
	}
	if c.TrailingLogs < 1 {
		return fmt.Errorf("%w: %s must be at least 1", ErrInvalidConfig, KeyTrailingLogs)
	}
	if c.HeartbeatTimeout < 5*time.Millisecond || c.ElectionTimeout < 5*time.Millisecond {
		return fmt.Errorf("%w: %s and %s must be at least 5ms", ErrInvalidConfig, KeyHeartbeatTimeout, KeyElectionTimeout)
	}
	if c.LeaderLease < 5*time.Millisecond || c.LeaderLease > c.HeartbeatTimeout {
		return fmt.Errorf("%w: %s %v: want 5ms..%s (%v)", ErrInvalidConfig, KeyLeaderLease, c.LeaderLease, KeyHeartbeatTimeout, c.HeartbeatTimeout)
	}
	if c.DCDBuffer < 1<<20 || c.DCDBuffer > 16<<30 {
		return fmt.Errorf("%w: %s %d: want 1MiB..16GiB", ErrInvalidConfig, KeyDCDBuffer, c.DCDBuffer)
	}
	if c.DCDInflight < 1 || c.DCDInflight > 64 {
		return fmt.Errorf("%w: %s %d: want 1..64", ErrInvalidConfig, KeyDCDInflight, c.DCDInflight)
	}
	if c.VolumeLeaseTTL < 2*c.HeartbeatTimeout || c.VolumeLeaseTTL > 10*time.Minute {
		return fmt.Errorf("%w: %s %v: want 2×%s (%v)..10m", ErrInvalidConfig, KeyVolumeLeaseTTL, c.VolumeLeaseTTL, KeyHeartbeatTimeout, 2*c.HeartbeatTimeout)
	}
	if c.FlushTimeout < time.Second || c.FlushTimeout > time.Hour {
		return fmt.Errorf("%w: %s %v: want 1s..1h", ErrInvalidConfig, KeyFlushTimeout, c.FlushTimeout)
	}
	// Empty (a Config built in code) means the default, boltdb.
	if c.RaftLogStore != "" && c.RaftLogStore != LogStoreDCD && c.RaftLogStore != LogStoreBoltDB && c.RaftLogStore != LogStoreWAL {
		return fmt.Errorf("%w: %s %q: want %s, %s or %s", ErrInvalidConfig, KeyRaftLogStore, c.RaftLogStore, LogStoreDCD, LogStoreBoltDB, LogStoreWAL)
	}
	if c.LinkDelay < 0 || c.LinkDelay > time.Second {
		return fmt.Errorf("%w: %s %v: want 0..1s", ErrInvalidConfig, KeyLinkDelay, c.LinkDelay)
	}
	return nil
}

// ValidateAdvertiseAddr checks an address other sites dial: it needs a
// concrete host, not a wildcard.
func ValidateAdvertiseAddr(addr string) error {
	if err := ValidateAddr(addr); err != nil {
		return err
	}
	host, port, _ := net.SplitHostPort(addr)
	if host == "" || host == "0.0.0.0" || host == "::" {
		return fmt.Errorf("%q: needs a host other sites can reach, not a wildcard", addr)
	}
	if port == "0" {
		return fmt.Errorf("%q: needs a fixed port", addr)
	}
	return nil
}

// splitList accepts "a,b" as well as repeated flags, dropping blanks.
func splitList(in []string) []string {
	var out []string
	for _, s := range in {
		for _, p := range strings.Split(s, ",") {
			if p = strings.TrimSpace(p); p != "" {
				out = append(out, p)
			}
		}
	}
	return out
}

// ValidateAddr checks a host:port listen or dial address.
func ValidateAddr(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q: %v", addr, err)
	}
	if strings.ContainsAny(host, " /") {
		return fmt.Errorf("%q: bad host", addr)
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 0 || p > 65535 {
		return fmt.Errorf("%q: bad port %q", addr, port)
	}
	return nil
}

// ParseLevel reads a slog level name.
func ParseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("unknown log level %q (debug, info, warn, error)", s)
	}
	return l, nil
}
