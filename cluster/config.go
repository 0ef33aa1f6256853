package cluster

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"time"
)

// Config configures a Node. Addresses are host:port as other sites reach
// them.
type Config struct {
	Name       string // site name: Raft server ID and gossip node name
	DataDir    string // Raft log, stable store and snapshots live in DataDir/raft
	RaftAddr   string // advertised Raft address (RaftListener listens on it)
	GossipAddr string // memberlist bind and advertise address
	APIAddr    string // advertised admin API address (leader forwarding goes there)
	NBDAddr    string // advertised NBD address (shown to users)

	// LogStore is the Raft log and stable store: LogStoreBoltDB (default)
	// or LogStoreWAL. It is fixed when DataDir/raft is created.
	LogStore string

	Join            []string // gossip addresses of existing members
	BootstrapExpect int      // start a new cluster once this many sites gossip (0: see Open)

	SnapshotThreshold  uint64        // Raft entries between snapshots
	SnapshotInterval   time.Duration // how often Raft checks the threshold
	TrailingLogs       uint64        // entries kept after a snapshot for slow followers
	SnapshotRetain     int
	HeartbeatTimeout   time.Duration
	ElectionTimeout    time.Duration
	LeaderLeaseTimeout time.Duration
	CommitTimeout      time.Duration
	// LeaseTTL is how long a volume lease survives without renewal (the
	// holder renews every LeaseTTL/8). Every site should use the same.
	LeaseTTL time.Duration
	// LeaderFollowsWrites lets the leader hand leadership to the site that
	// sends it (nearly) all write batches, so that site's commits skip the
	// forward (see placement.go).
	LeaderFollowsWrites bool
	// LeaderOverlap lets the leader's durable append overlap replication
	// when the log store supports it (the dcd store; leadersync.go).
	LeaderOverlap bool

	// RaftListener is the listener for Raft traffic (built by the caller's
	// network layer); Dial opens connections for Raft and gossip-adjacent
	// RPC. HTTPClient carries forwarded requests to other sites' APIs.
	RaftListener net.Listener
	Dial         func(ctx context.Context, addr string) (net.Conn, error)
	HTTPClient   *http.Client

	// Stages, if set, records where a write's time goes at this site
	// (see stages.go); nil records nothing.
	Stages *Stages

	Logger *slog.Logger
}

func (c *Config) setDefaults() {
	if c.SnapshotThreshold == 0 {
		c.SnapshotThreshold = 128
	}
	if c.SnapshotInterval == 0 {
		c.SnapshotInterval = 2 * time.Second
	}
	if c.TrailingLogs == 0 {
		c.TrailingLogs = 256
	}
	if c.SnapshotRetain == 0 {
		c.SnapshotRetain = 2
	}
	if c.HeartbeatTimeout == 0 {
		c.HeartbeatTimeout = 500 * time.Millisecond
	}
	if c.ElectionTimeout == 0 {
		c.ElectionTimeout = 500 * time.Millisecond
	}
	if c.LeaderLeaseTimeout == 0 {
		c.LeaderLeaseTimeout = 250 * time.Millisecond
	}
	if c.CommitTimeout == 0 {
		c.CommitTimeout = 5 * time.Millisecond
	}
	if c.LeaseTTL == 0 {
		c.LeaseTTL = DefaultLeaseTTL
	}
	if c.HTTPClient == nil {
		c.HTTPClient = &http.Client{Timeout: 2 * time.Minute}
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}
