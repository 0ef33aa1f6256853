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

	// LogStore is the Raft log and stable store: LogStoreDCD (the
	// default, DefaultLogStore; also ""), LogStoreBoltDB or LogStoreWAL.
	// It is fixed when DataDir/raft is created (see logstore.go).
	LogStore string

	// RaftTransport is how Raft messages travel between sites:
	// TransportWire (the default, DefaultRaftTransport; also ""), robib's
	// own framing (cluster/wire: no payload copies), or TransportMsgpack,
	// hashicorp/raft's NetworkTransport. The two cannot talk to each
	// other: every site of a cluster must use the same.
	RaftTransport string

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

	// Transport security (see DESIGN.md, "Gossip encryption and peer
	// identity"). Every field's zero value is insecure mode: the agent
	// decides which it allows.
	//
	// GossipKeys are the AES keys (16, 24 or 32 bytes) that encrypt and
	// authenticate gossip; the first is the primary (it encrypts, all
	// decrypt). They seed DataDir/gossip-keyring on the first start; from
	// then on the persisted ring, which the Keyring* methods change, wins.
	// Empty with no persisted ring: gossip travels in plain text.
	GossipKeys [][]byte
	// VerifyPeer, if set, checks that site is who it claims to be (the
	// agent dials raftAddr with mTLS and checks that the certificate
	// names site) before the leader adds it to the Raft configuration,
	// changes its address or promotes it, and before a --bootstrap-expect
	// site bootstraps with it. A failure keeps the site out until a later
	// round passes. nil: no check.
	VerifyPeer func(ctx context.Context, site, raftAddr string) error
	// PeerName, if set, names the site an internal request (Handler)
	// comes from, e.g. from its verified client certificate; ok=false:
	// unknown. A request acting for another site than its sender is
	// refused with ErrForbidden. nil: no check.
	PeerName func(r *http.Request) (site string, ok bool)
	// RequirePeer refuses (ErrForbidden) every internal request that
	// PeerName does not name a site for. It needs PeerName.
	RequirePeer bool
	// RaftPeerName, if set, names the site an inbound Raft connection
	// comes from (asked once per connection, after its first frame, so a
	// TLS handshake is complete); the wire transport refuses requests
	// naming another server (wire.Config.PeerName). The msgpack transport
	// cannot check it (Open logs a warning).
	RaftPeerName func(conn net.Conn) (site string, ok bool)
	// Security reports how this site's links are protected, for status:
	// "mtls" or "insecure", and when its certificate expires (zero: none).
	// Nil reports "insecure".
	Security func() (mode string, certNotAfter time.Time)

	// RebuildInterval is how often the background rebuild walks every
	// local volume's damaged ranges and repairs them from other sites
	// (also right after a read found damage); RebuildRate caps it, in
	// bytes per second.
	RebuildInterval time.Duration
	RebuildRate     int64
	// ScrubInterval is how often the background rebuild reads every local
	// volume whole and checks it against its block checksums
	// (volume.Scrub), at RebuildRate, so damage nobody reads is found and
	// repaired too; a volume where a read found damage is scrubbed at the
	// next pass. Negative: no periodic scrub (damage found by reads is
	// still followed by one).
	ScrubInterval time.Duration

	// Stages, if set, records where a write's time goes at this site
	// (see stages.go); nil records nothing.
	Stages *Stages

	Logger *slog.Logger
}

// DefaultConfig returns the recommended settings, one number per setting:
// Open fills every zero field of a Config from it (setDefaults), and the
// agent's flags take their defaults from it. The site-specific fields
// (names, addresses, listener, dialer) are empty. The two booleans are on
// here, as the agent runs, but a zero Config leaves them off: false is a
// choice, not a missing value.
func DefaultConfig() Config {
	return Config{
		LogStore:            DefaultLogStore,
		RaftTransport:       DefaultRaftTransport,
		SnapshotThreshold:   128,
		SnapshotInterval:    2 * time.Second,
		TrailingLogs:        256,
		SnapshotRetain:      2,
		HeartbeatTimeout:    500 * time.Millisecond,
		ElectionTimeout:     500 * time.Millisecond,
		LeaderLeaseTimeout:  250 * time.Millisecond,
		CommitTimeout:       5 * time.Millisecond,
		LeaseTTL:            DefaultLeaseTTL,
		LeaderFollowsWrites: true,
		LeaderOverlap:       true,
		RebuildInterval:     DefaultRebuildInterval,
		RebuildRate:         DefaultRebuildRate,
		ScrubInterval:       DefaultScrubInterval,
		HTTPClient:          &http.Client{Timeout: 2 * time.Minute},
		Logger:              slog.Default(),
	}
}

// setDefaults fills the zero fields from DefaultConfig (LogStore stays ""
// if unset: openLogStore reads "" as DefaultLogStore).
func (c *Config) setDefaults() {
	d := DefaultConfig()
	orDefault(&c.SnapshotThreshold, d.SnapshotThreshold)
	orDefault(&c.SnapshotInterval, d.SnapshotInterval)
	orDefault(&c.TrailingLogs, d.TrailingLogs)
	orDefault(&c.SnapshotRetain, d.SnapshotRetain)
	orDefault(&c.HeartbeatTimeout, d.HeartbeatTimeout)
	orDefault(&c.ElectionTimeout, d.ElectionTimeout)
	orDefault(&c.LeaderLeaseTimeout, d.LeaderLeaseTimeout)
	orDefault(&c.CommitTimeout, d.CommitTimeout)
	orDefault(&c.LeaseTTL, d.LeaseTTL)
	orDefault(&c.RebuildInterval, d.RebuildInterval)
	orDefault(&c.RebuildRate, d.RebuildRate)
	orDefault(&c.ScrubInterval, d.ScrubInterval)
	orDefault(&c.HTTPClient, d.HTTPClient)
	orDefault(&c.Logger, d.Logger)
}

// orDefault sets *p to def if *p is its type's zero value.
func orDefault[T comparable](p *T, def T) {
	var zero T
	if *p == zero {
		*p = def
	}
}
