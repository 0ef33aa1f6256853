// Package config holds the agent's configuration: one struct, filled from a
// config file, ROBIB_* environment variables and command-line flags (in
// rising order of precedence) through viper, and validated in one place.
// All of it is made from one table of settings (settings.go); the CLI's
// few settings (Client) come from a second table the same way.
package config

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"github.com/spf13/viper"

	"github.com/robib/robib/cluster"
	"github.com/robib/robib/cmd/internal/pki"
)

// ErrInvalidConfig is returned (wrapped, with the offending key) for any
// configuration that does not validate.
var ErrInvalidConfig = errors.New("invalid configuration")

// Config is the whole agent configuration. Each field is filled by one entry
// of the settings table (settings.go), which names its flag, config-file key
// and environment variable (ROBIB_, then the key upper-cased with '-' as
// '_'), gives its default and validates it.
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
	RaftTransport     string        // Raft transport: "wire" (default, also "") or "msgpack"; the same at every site
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
	// ScrubInterval: how often each local volume is read whole and checked
	// against its block checksums; 0 turns the periodic scrub off.
	ScrubInterval time.Duration

	// LinkDelay is a testing/benchmark knob: a one-way delay added in each
	// direction of every site-to-site connection this agent dials (Raft
	// and API forwarding), emulating a WAN between sites on one machine.
	LinkDelay time.Duration

	// Security. TLS is the default: without Insecure the three TLS files
	// are required (see cmd/internal/pki); Insecure runs every link
	// plaintext and unauthenticated, and excludes them.
	TLSCA    string // the cluster CA certificate (PEM)
	TLSCert  string // this site's certificate (PEM), reloaded when it changes
	TLSKey   string // its private key (PEM)
	Insecure bool
	// NBDTLS is NBD's STARTTLS: "off", "on" (the client chooses) or
	// "require"; "" means the default (NBDTLSMode).
	NBDTLS string
	// NBDTLSVerifyPeer: NBD clients must present a client certificate of
	// the cluster CA.
	NBDTLSVerifyPeer bool
	// GossipKeyFile holds the base64 gossip encryption key; "" means the
	// gossip.key next to TLSCert, if there is one (GossipKeyPath).
	GossipKeyFile string
	// AuthPolicy is the authorization policy file ("" = none).
	AuthPolicy string
}

// NBD TLS modes (--nbd-tls).
const (
	NBDTLSOff     = "off"
	NBDTLSOn      = "on"
	NBDTLSRequire = "require"
)

// NBDTLSMode is the NBD TLS mode in effect: NBDTLS, or when it is not set,
// "require" with TLS and "off" with Insecure.
func (c Config) NBDTLSMode() string {
	switch {
	case c.NBDTLS != "":
		return c.NBDTLS
	case c.Insecure:
		return NBDTLSOff
	default:
		return NBDTLSRequire
	}
}

// GossipKeyPath is the gossip key file in effect: GossipKeyFile, or when it
// is not set, gossip.key in TLSCert's directory if that file exists (robib
// cert issue --kind site puts it there); "" for none.
func (c Config) GossipKeyPath() string {
	if c.GossipKeyFile != "" || c.TLSCert == "" {
		return c.GossipKeyFile
	}
	p := filepath.Join(filepath.Dir(c.TLSCert), pki.GossipKeyFile)
	if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
		return p
	}
	return ""
}

// The agent's own defaults; every other default comes from the package that
// owns the setting (see agentSettings).
const (
	DefaultNBDAddr    = ":10809"
	DefaultAPIAddr    = "127.0.0.1:10810"
	DefaultRaftAddr   = "127.0.0.1:10811"
	DefaultGossipAddr = "127.0.0.1:10812"
	// DefaultAPI is the admin API the CLI talks to unless --api or
	// ROBIB_API say otherwise.
	DefaultAPI = "http://" + DefaultAPIAddr
)

// Raft log stores (--raft-log-store).
const (
	LogStoreDCD    = cluster.LogStoreDCD
	LogStoreBoltDB = cluster.LogStoreBoltDB
	LogStoreWAL    = cluster.LogStoreWAL
)

// Keys used for flags, the config file and (see Settings) the environment.
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
	KeyRaftTransport     = "raft-transport"
	KeyLinkDelay         = "link-delay"
	KeyLeaderFollows     = "leader-follows-writes"
	KeyLeaderOverlap     = "raft-leader-overlap"
	KeyScrubInterval     = "scrub-interval"

	KeyTLSCA            = "tls-ca"
	KeyTLSCert          = "tls-cert"
	KeyTLSKey           = "tls-key"
	KeyInsecure         = "insecure"
	KeyNBDTLS           = "nbd-tls"
	KeyNBDTLSVerifyPeer = "nbd-tls-verify-peer"
	KeyGossipKey        = "gossip-key"
	KeyAuthPolicy       = "auth-policy"

	// KeyAPI is the CLI's --api (ROBIB_API); the CLI's --tls-ca,
	// --tls-cert and --tls-key share the agent's keys (and variables).
	KeyAPI = "api"
	// KeyToken is the CLI's --token (ROBIB_TOKEN).
	KeyToken = "token"
)

// RegisterFlags declares the agent flags on fs.
func RegisterFlags(fs *pflag.FlagSet) {
	register(fs, agentSettings(&Config{}))
}

// Load builds the Config from flags (already parsed), the environment and
// the config file named by --config or ROBIB_CONFIG, then validates it.
func Load(fs *pflag.FlagSet) (Config, error) {
	var c Config
	table := agentSettings(&c)
	v, err := bind(fs, table)
	if err != nil {
		return Config{}, err
	}
	if path := v.GetString(KeyConfig); path != "" {
		v.SetConfigFile(path)
		if err := v.ReadInConfig(); err != nil {
			return Config{}, fmt.Errorf("%w: reading config file %s: %v", ErrInvalidConfig, path, err)
		}
		if err := checkFileKeys(path, table); err != nil {
			return Config{}, err
		}
	}
	if err := readAll(v, table); err != nil {
		return c, err
	}
	return c, c.Validate()
}

// checkFileKeys rejects keys in the config file that robib does not know, so
// that a typo is an error rather than a silently ignored setting.
func checkFileKeys(path string, table []setting) error {
	f := viper.New()
	f.SetConfigFile(path)
	if err := f.ReadInConfig(); err != nil {
		return fmt.Errorf("%w: reading config file %s: %v", ErrInvalidConfig, path, err)
	}
	var known []string
	for _, s := range table {
		if s.inFile {
			known = append(known, s.key)
		}
	}
	for _, k := range f.AllKeys() {
		if !slices.Contains(known, k) {
			return fmt.Errorf("%w: config file %s: unknown key %q (known: %s)", ErrInvalidConfig, path, k, strings.Join(known, ", "))
		}
	}
	return nil
}

// Validate checks every field, in the order of the settings table, and
// returns the first problem found.
func (c Config) Validate() error {
	for _, s := range agentSettings(&c) {
		if s.check == nil {
			continue
		}
		if err := s.check(); err != nil {
			return fmt.Errorf("%w: %w", ErrInvalidConfig, err)
		}
	}
	return nil
}

// Client is the configuration of the CLI (every command but agent).
type Client struct {
	API string // the agent's admin API, http(s)://host:port
	// TLSCA, if set, is the cluster CA: the API is reached over https and
	// must present a site certificate of it. TLSCert and TLSKey (both or
	// neither, only with TLSCA) are the certificate the CLI presents.
	TLSCA, TLSCert, TLSKey string
	Token                  string // sent as "Authorization: Bearer TOKEN" if set
}

// RegisterClientFlags declares the CLI's flags on fs (the root command's
// persistent flags).
func RegisterClientFlags(fs *pflag.FlagSet) {
	register(fs, clientSettings(&Client{}))
}

// LoadClient reads the CLI's configuration from its flags (already parsed)
// and ROBIB_* variables.
func LoadClient(fs *pflag.FlagSet) (Client, error) {
	var c Client
	table := clientSettings(&c)
	v, err := bind(fs, table)
	if err != nil {
		return Client{}, err
	}
	if err := readAll(v, table); err != nil {
		return c, err
	}
	for _, s := range table {
		if s.check == nil {
			continue
		}
		if err := s.check(); err != nil {
			return c, fmt.Errorf("%w: %w", ErrInvalidConfig, err)
		}
	}
	return c, nil
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
