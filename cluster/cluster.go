// Package cluster turns one site into a member of a robib cluster: it runs
// hashicorp/raft over the replicated state machine (package fsm), uses
// hashicorp/memberlist to discover sites and detect failures, turns gossip
// members into Raft voters, and proposes commands — locally on the leader,
// or forwarded to the leader from any other site.
//
// The package never opens a listener or dials by itself: the Raft listener
// and every dialer come from Config, so transport security is added in one
// place (the caller's network layer).
package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"

	"github.com/robib/robib/fsm"
)

// logCacheEntries is the number of newest Raft entries kept in memory.
const logCacheEntries = 32

// Node is this site's membership in the cluster. Its methods are safe for
// concurrent use. It owns Raft, the log store, the transport and the
// goroutines' lifetime (stop, wg); everything else is a role with its own
// state and lock, which Open wires together through narrow interfaces (see
// DESIGN.md, "Roles"). The exported methods delegate.
type Node struct {
	cfg   Config
	log   *slog.Logger
	fsm   *fsm.FSM
	raft  *raft.Raft
	store io.Closer  // the Raft log and stable store (openLogStore)
	trans *voteGuard // the Raft transport; keeps a fresh site out of elections
	// catchUp makes snapshot installs catch-ups (catchup.go); it learns
	// the peers' addresses once the roles are wired.
	catchUp *catchUpTransport

	id       *identity       // fresh state, refusals, cluster ID (identity.go)
	watch    *leaderWatch    // leader changes (leader.go)
	gossip   *membership     // gossip members and addresses (members.go)
	prop     *proposer       // propose and forward (propose.go)
	leases   *leaseArbiter   // volume leases and read index (lease.go)
	place    *placement      // leader placement (placement.go); nil unless LeaderFollowsWrites
	rec      *reconciler     // the leader's membership policy (reconcile.go)
	admin    *admin          // leave, remove, transfer (admin.go)
	reporter *statusReporter // cluster status (status.go)
	verify   *verifier       // verify coordination (verify.go)
	keys     *gossipKeyring  // gossip encryption keys (keyring.go)
	keyAdmin *keyAdmin       // cluster-wide keyring operations (keyring.go)
	heal     *healer         // reads and repairs damaged local copies from peers (heal.go)
	repair   *repairer       // volume repair by majority (repair.go)

	needBootstrap bool // set by openRaft: wait for BootstrapExpect sites
	stop          chan struct{}
	wg            sync.WaitGroup
	closeOnce     sync.Once
}

// Open starts Raft and gossip for this site over f. A site with no Raft
// state and no Join bootstraps a one-site cluster (so a lone agent is a
// complete robib); with BootstrapExpect N it waits for N gossiping sites and
// bootstraps them together; otherwise it waits for the leader to add it.
func Open(cfg Config, f *fsm.FSM) (*Node, error) {
	cfg.setDefaults()
	if cfg.RaftListener == nil || cfg.Dial == nil {
		return nil, fmt.Errorf("%w: RaftListener and Dial are required", ErrInvalidRequest)
	}
	if cfg.RequirePeer && cfg.PeerName == nil {
		return nil, fmt.Errorf("%w: RequirePeer needs PeerName", ErrInvalidRequest)
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}
	keys, err := openKeyring(cfg.DataDir, cfg.GossipKeys, cfg.Logger)
	if err != nil {
		return nil, err
	}
	if keys.memberlistRing() == nil {
		cfg.Logger.Warn("gossip is not encrypted: no gossip keys configured or persisted (insecure mode)")
	}
	n := &Node{
		cfg:   cfg,
		log:   cfg.Logger,
		fsm:   f,
		stop:  make(chan struct{}),
		watch: newLeaderWatch(),
		id:    &identity{self: cfg.Name, dir: filepath.Join(cfg.DataDir, "raft"), log: cfg.Logger, ids: f},
		keys:  keys,
	}
	if err := n.openRaft(); err != nil {
		return nil, err
	}
	n.wire()
	if err := n.gossip.open(); err != nil {
		n.shutdownRaft()
		return nil, err
	}
	if n.needBootstrap {
		n.wg.Add(1)
		go n.bootstrapExpectLoop()
	}
	n.wg.Add(1)
	go n.reconcileLoop()
	if n.place != nil {
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			n.place.loop(n.stop)
		}()
	}
	n.watch.run(n.raft, n.stop, &n.wg)
	n.wg.Add(1)
	go n.heal.run(&n.wg)
	return n, nil
}

// wire builds the roles over the running Raft; nothing runs yet.
func (n *Node) wire() {
	cfg := n.cfg
	rpc := &rpcClient{http: cfg.HTTPClient}
	lead := raftLeader{n.raft}
	n.admin = &admin{self: cfg.Name, log: n.log, raft: n.raft, leader: lead, rpc: rpc}
	n.gossip = &membership{cfg: cfg, log: n.log, ids: n.fsm, fresh: &n.id.fresh, refused: &n.id.refused, config: n.raft,
		left: n.admin, keyring: n.keys.memberlistRing(), events: make(chan struct{}, 1), stop: n.stop, wg: &n.wg}
	n.keyAdmin = &keyAdmin{self: cfg.Name, log: n.log, keys: n.keys, members: n.gossip, rpc: rpc}
	n.admin.book, n.admin.members, n.admin.gossip = n.gossip, n.gossip, n.gossip
	n.prop = &proposer{self: cfg.Name, log: n.log, raft: n.raft, leader: lead, book: n.gossip, changes: n.watch,
		fwd: rpc, applied: n.fsm, leases: n.fsm, barrier: n.raft, stages: cfg.Stages, stop: n.stop, seq: newSequencer(500 * time.Millisecond)}
	if cfg.LeaderFollowsWrites {
		n.place = &placement{self: cfg.Name, log: n.log, leader: lead, mover: n.admin}
		n.prop.origins = n.place
	}
	n.leases = &leaseArbiter{self: cfg.Name, ttl: cfg.LeaseTTL, log: n.log, raft: n.raft, state: n.fsm, prop: n.prop,
		leader: lead, book: n.gossip, rpc: rpc, stop: n.stop, now: time.Now}
	n.rec = &reconciler{self: cfg.Name, log: n.log, raft: n.raft, ids: n.fsm, members: n.gossip, refused: &n.id.refused, rpc: rpc,
		verify: cfg.VerifyPeer}
	n.reporter = &statusReporter{cfg: cfg, raft: n.raft, leader: lead, fsm: n.fsm, fresh: &n.id.fresh, stages: cfg.Stages,
		members: n.gossip, rpc: rpc}
	n.id.config, n.id.barrier, n.id.prop, n.id.meta = n.raft, n.raft, n.prop, n.gossip
	n.verify = &verifier{self: cfg.Name, prop: n.prop, config: n.raft, fsm: n.fsm, book: n.gossip, rpc: rpc}
	if n.catchUp != nil {
		n.catchUp.setPeers(n.gossip, rpc)
	}
	n.heal = &healer{self: cfg.Name, log: n.log, fsm: n.fsm, vols: storeVolumes{n.fsm.Store()},
		sources: voterSources{self: cfg.Name, config: n.raft, leader: lead, book: n.gossip}, rpc: rpc,
		interval: cfg.RebuildInterval, rate: cfg.RebuildRate, scrubEvery: cfg.ScrubInterval, stop: n.stop,
		kick: make(chan struct{}, 1), readSlots: make(chan struct{}, peerReadSlots), catchUp: peerCatchUpWait}
	n.reporter.heal = n.heal
	n.repair = &repairer{self: cfg.Name, log: n.log, verify: n.verify, heal: n.heal, book: n.gossip, rpc: rpc}
}

func (n *Node) openRaft() error {
	dir := filepath.Join(n.cfg.DataDir, "raft")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("raft dir: %w", err)
	}
	logs, stable, store, err := openLogStore(n.cfg.LogStore, dir, newHCLogger("raft-log", n.log))
	if err != nil {
		return err
	}
	// The leader sends each new entry to every follower right after
	// storing it: without a cache each send reads it back from the log
	// store (with raft-boltdb: a msgpack decode and copy of up to 512 KiB,
	// 15% of the leader's CPU in a sequential write). The cache holds the
	// newest entries: logCacheEntries × 512 KiB at most.
	var running atomic.Pointer[raft.Raft] // set once Raft runs
	state := func() raft.RaftState {
		if r := running.Load(); r != nil {
			return r.State()
		}
		return raft.Follower
	}
	var lsync *leaderSync
	if ds, ok := logs.(DeferredSyncStore); ok && n.cfg.LeaderOverlap {
		voters := func() int {
			if r := running.Load(); r != nil {
				return countVoters(r)
			}
			return 0
		}
		lsync = newLeaderSync(ds, state, voters, n.fatal, n.cfg.Stages)
		logs, store = lsync, closers{lsync, store}
	} else {
		logs = &timedLogStore{LogStore: logs, stages: n.cfg.Stages, state: state}
	}
	if logs, err = raft.NewLogCache(logCacheEntries, logs); err != nil {
		store.Close()
		return fmt.Errorf("raft log cache: %w", err)
	}
	snaps, err := n.fsm.SnapshotStore(filepath.Join(dir, "snapshots"), n.cfg.SnapshotRetain)
	if err != nil {
		store.Close()
		return fmt.Errorf("opening snapshot store: %w", err)
	}
	hlog := newHCLogger("raft", n.log)
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(n.cfg.Name)
	rc.Logger = hlog
	rc.HeartbeatTimeout = n.cfg.HeartbeatTimeout
	rc.ElectionTimeout = n.cfg.ElectionTimeout
	rc.LeaderLeaseTimeout = n.cfg.LeaderLeaseTimeout
	rc.CommitTimeout = n.cfg.CommitTimeout
	rc.SnapshotThreshold = n.cfg.SnapshotThreshold
	rc.SnapshotInterval = n.cfg.SnapshotInterval
	rc.TrailingLogs = n.cfg.TrailingLogs
	rc.BatchApplyCh = true
	rc.NoLegacyTelemetry = true
	// The FSM persists its own applied index and volumes are files on
	// disk: a restart replays the log tail instead of rewriting volumes
	// from the last snapshot (see fsm/DESIGN.md).
	rc.NoSnapshotRestoreOnStart = true
	if err := raft.ValidateConfig(rc); err != nil {
		store.Close()
		return fmt.Errorf("%w: raft config: %v", ErrInvalidRequest, err)
	}
	hasState, err := raft.HasExistingState(logs, stable, snaps)
	if err != nil {
		store.Close()
		return fmt.Errorf("reading raft state: %w", err)
	}
	// After a crash the volumes may hold effects of log entries past the
	// FSM's checkpoint; none is past the log's last index (fsm/DESIGN.md, I7).
	last, err := logs.LastIndex()
	if err != nil {
		store.Close()
		return fmt.Errorf("reading the raft log's last index: %w", err)
	}
	n.fsm.SetReplayBound(last)
	// A site with no Raft state that does not found a cluster by itself
	// joins one: it is fresh (no vote record, an empty log) until it has
	// been a non-voter; the marker survives restarts until then. A site
	// bootstrapping with others (--bootstrap-expect) is fresh until it
	// bootstraps (bootstrapExpectLoop), as it may instead join an existing
	// cluster.
	oneSite := !hasState && len(n.cfg.Join) == 0 && n.cfg.BootstrapExpect <= 1
	if _, err := os.Stat(n.id.freshFile()); err == nil {
		n.id.fresh.Store(true)
	}
	if !hasState && !oneSite {
		if err := n.id.markFresh(); err != nil {
			store.Close()
			return err
		}
	}
	switch {
	case n.id.fresh.Load() && n.cfg.BootstrapExpect > 1 && !hasState:
		n.log.Info("fresh site: no raft history; founding the cluster with the others, or joining an existing one as a non-voter", "site", n.cfg.Name)
	case n.id.fresh.Load():
		n.log.Warn("fresh site: no raft history; joining as a non-voter and voting only once caught up", "site", n.cfg.Name)
	}
	base, err := newTransport(&n.cfg, hlog, n.log)
	if err != nil {
		store.Close()
		return err
	}
	var tr guardedTransport = &timedTransport{stages: n.cfg.Stages, guardedTransport: base}
	if lsync != nil {
		tr = &syncedTransport{guardedTransport: tr, sync: lsync}
	}
	n.catchUp = &catchUpTransport{guardedTransport: tr, log: n.log, timeout: catchUpBaseTimeout}
	tr = n.catchUp
	n.trans = newVoteGuard(tr, &n.id.fresh, func(id string) bool { return foreign(n.fsm.ClusterID(), n.id.refused.clusterOf(id)) }, n.log)
	var machine raft.FSM = n.fsm
	if n.cfg.Stages != nil {
		machine = timedFSM{FSM: n.fsm, stages: n.cfg.Stages}
	}
	r, err := raft.NewRaft(rc, machine, logs, stable, snaps, n.trans)
	if err != nil {
		n.trans.Close()
		store.Close()
		return fmt.Errorf("starting raft: %w", err)
	}
	n.raft, n.store = r, store
	running.Store(r)
	if oneSite {
		n.log.Info("bootstrapping a new one-site cluster", "site", n.cfg.Name)
		if err := n.id.clearFresh("founding a one-site cluster"); err != nil { // a marker left behind
			n.shutdownRaft()
			return err
		}
		if err := n.bootstrap([]raft.Server{n.self()}); err != nil {
			n.shutdownRaft()
			return err
		}
	}
	n.needBootstrap = !hasState && n.cfg.BootstrapExpect > 1
	return nil
}

// fatal stops the process: the leader's log could not be synced after it
// may have counted its own copy (leadersync.go). Going on could commit an
// entry that is durable on fewer sites than a majority.
func (n *Node) fatal(format string, args ...any) {
	n.log.Error(fmt.Sprintf(format, args...))
	os.Exit(70)
}

func (n *Node) self() raft.Server {
	return raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(n.cfg.Name), Address: raft.ServerAddress(n.cfg.RaftAddr)}
}

func (n *Node) bootstrap(servers []raft.Server) error {
	err := n.raft.BootstrapCluster(raft.Configuration{Servers: servers}).Error()
	if err != nil && !errors.Is(err, raft.ErrCantBootstrap) {
		return fmt.Errorf("bootstrapping cluster: %w", err)
	}
	return nil
}

func (n *Node) shutdownRaft() {
	if n.raft != nil {
		if err := n.raft.Shutdown().Error(); err != nil {
			n.log.Warn("raft shutdown", "err", err)
		}
	}
	if n.trans != nil {
		n.trans.Close()
	}
	if n.store != nil {
		n.store.Close()
	}
}

// Close leaves nothing behind: stops gossip (without announcing a leave:
// a stopped site stays a voter) and Raft, and closes the log store.
func (n *Node) Close() error {
	n.closeOnce.Do(func() {
		close(n.stop)
		n.wg.Wait()
		if n.gossip != nil {
			n.gossip.shutdown()
		}
		n.shutdownRaft()
	})
	return nil
}

// SiteAt names the site that gossip says has addr as its Raft or API
// address ("" if none does, or before gossip started). The network layer
// uses it to check that a connection it dials reaches that site's
// certificate: members are encrypted gossip peers, and none becomes a
// voter before VerifyPeer checked its certificate against its name.
func (n *Node) SiteAt(addr string) string {
	if n == nil || n.gossip == nil {
		return ""
	}
	if addr == n.cfg.RaftAddr || addr == n.cfg.APIAddr {
		return n.cfg.Name
	}
	for _, m := range n.gossip.members() {
		if m.Meta.Raft == addr || m.Meta.API == addr {
			return m.Name
		}
	}
	return ""
}

// Name is this site's name.
func (n *Node) Name() string { return n.cfg.Name }

// FSM is the state machine this node replicates.
func (n *Node) FSM() *fsm.FSM { return n.fsm }

// IsLeader reports whether this site currently leads.
func (n *Node) IsLeader() bool { return raftLeader{n.raft}.IsLeader() }

// Leader returns the current leader's site name, or "" when unknown.
func (n *Node) Leader() string { return raftLeader{n.raft}.Leader() }

// WaitForLeader blocks until some site leads (this one or another), or ctx
// ends.
func (n *Node) WaitForLeader(ctx context.Context) (string, error) {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		if l := n.Leader(); l != "" {
			return l, nil
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("waiting for a leader: %w", ctx.Err())
		case <-n.stop:
			return "", ErrClosed
		case <-t.C:
		}
	}
}

// Apply proposes one command and returns once it is committed on a majority
// of sites and applied by the leader, with its log index. It makes one
// attempt: on the leader it appends to Raft, elsewhere it forwards to the
// leader. Retryable failures wrap ErrRetry; the FSM's verdict comes back as
// its own error (fsm.ErrUnknownVolume, ...).
func (n *Node) Apply(ctx context.Context, cmd fsm.Command) (*fsm.Result, error) {
	return n.prop.Apply(ctx, cmd)
}

// ApplyAndWait is Apply followed by waiting until this site has applied the
// command too, so the caller's next local read sees it. It retries
// transient conditions (no leader, leader change) until ctx ends; use it for
// admin commands, never for write batches (their retries need the writer's
// ordering, see dcd).
func (n *Node) ApplyAndWait(ctx context.Context, cmd fsm.Command) (*fsm.Result, error) {
	return n.prop.ApplyAndWait(ctx, cmd)
}

// Commit replicates a write batch (dcd.Committer). It returns once the
// batch is committed on a majority, with the index where it took effect.
func (n *Node) Commit(ctx context.Context, b *fsm.WriteBatch) (uint64, error) {
	return n.prop.Commit(ctx, b)
}

// WaitApplied blocks until this site's FSM applied index (dcd.Committer).
func (n *Node) WaitApplied(ctx context.Context, index uint64) error {
	return n.prop.WaitApplied(ctx, index)
}

// AcquireLease takes the read-write lease of volume (incarnation created)
// for this site. A lease this site already holds is taken again at a new
// epoch, which fences this site's own earlier writers. It fails with
// ErrLeaseHeld while another site holds the lease and renews it; transient
// conditions are retried until ctx ends.
func (n *Node) AcquireLease(ctx context.Context, volume string, created int64) (Grant, error) {
	return n.leases.AcquireLease(ctx, volume, created)
}

// RenewLease tells the leader this site still holds volume's lease at
// epoch. ErrLeaseLost means another site took it (or it was released):
// the caller must stop writing. Other errors are transient; it makes one
// attempt.
func (n *Node) RenewLease(ctx context.Context, volume string, epoch uint64) error {
	return n.leases.RenewLease(ctx, volume, epoch)
}

// ReleaseLease gives up this site's lease on volume at epoch (after its
// writes are committed). Releasing a lease that moved on is not an error.
func (n *Node) ReleaseLease(ctx context.Context, volume string, epoch uint64) error {
	return n.leases.ReleaseLease(ctx, volume, epoch)
}

// ReadIndex returns a log index that covers every command committed before
// the call: the leader's FSM applied index, read after a Raft barrier (an
// entry that commits only with a majority behind this leader, and returns
// once every entry before it is applied here). A site whose FSM has applied
// it reads nothing older than what was acknowledged before the call. The
// index is a command's (or 0), so every site's FSM reaches it: the leader's
// last log index may be a no-op or barrier entry, which FSMs never see.
// It fails (retryably) when no leader can be reached.
func (n *Node) ReadIndex(ctx context.Context) (uint64, error) { return n.leases.ReadIndex(ctx) }

// LocalStatus is this site's own view.
func (n *Node) LocalStatus() SiteStatus { return n.reporter.LocalStatus() }

// Status collects every site's view: the Raft voters plus any gossiping
// site not (yet) a voter. Unreachable sites are listed with State
// "unreachable".
func (n *Node) Status(ctx context.Context) (Status, error) { return n.reporter.Status(ctx) }

// RemoveSite removes a dead site from the cluster (an operator's decision:
// nothing removes a voter silently). A site that is alive must leave by
// itself with Leave, so that gossip does not add it back.
func (n *Node) RemoveSite(ctx context.Context, site string) error {
	return n.admin.RemoveSite(ctx, site)
}

// Leave removes this site from the cluster cleanly: it leaves gossip (so
// the leader does not add it back), then has the leader remove it from the
// Raft configuration. Its data stays on disk; the agent should be stopped
// afterwards.
func (n *Node) Leave(ctx context.Context) error { return n.admin.Leave(ctx) }

// TransferLeadership moves leadership to site ("" lets Raft pick) and
// waits until a new leader is known.
func (n *Node) TransferLeadership(ctx context.Context, site string) (string, error) {
	return n.admin.TransferLeadership(ctx, site)
}

// KeyringList shows every live site's gossip keyring, by key
// fingerprints (never the keys). A site that does not answer is listed
// with its error.
func (n *Node) KeyringList(ctx context.Context) (KeyringReport, error) { return n.keyAdmin.List(ctx) }

// KeyringInstall adds key (16, 24 or 32 bytes) to the gossip keyring of
// every live site (this one included), which then decrypts gossip with it;
// each site persists its ring. The error wraps ErrKeyringIncomplete when
// some sites failed (the report says which); running it again is safe.
func (n *Node) KeyringInstall(ctx context.Context, key []byte) (KeyringReport, error) {
	return n.keyAdmin.Install(ctx, key)
}

// KeyringUse makes key the primary (the one gossip is encrypted with) at
// every live site. It first checks that every live site holds key and
// refuses (ErrKeyringRefused, naming the sites lacking it or not
// answering) otherwise, changing nothing.
func (n *Node) KeyringUse(ctx context.Context, key []byte) (KeyringReport, error) {
	return n.keyAdmin.Use(ctx, key)
}

// KeyringRemove removes key from every live site's keyring. It refuses
// (ErrKeyringRefused) while key is the primary at any live site, or a site
// does not answer, changing nothing.
func (n *Node) KeyringRemove(ctx context.Context, key []byte) (KeyringReport, error) {
	return n.keyAdmin.Remove(ctx, key)
}

// ReadHealed reads [off, off+len(p)) of v, a local volume whose own read
// reported damage (volume.ErrDamaged): healthy blocks from the local copy,
// damaged ones from another voter's copy at an index this site has
// applied, repairing them here (DESIGN.md, "Repair from peers"). p then
// holds the volume's contents as of an applied index at or after the
// call. It fails (ErrNoHealthyCopy) rather than return other bytes; ctx
// bounds it, as does a timeout of its own.
func (n *Node) ReadHealed(ctx context.Context, v RepairableVolume, p []byte, off int64) error {
	ctx, cancel := context.WithTimeout(ctx, healReadTimeout)
	defer cancel()
	go func() { // Close ends it too
		select {
		case <-n.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	return n.heal.ReadAt(ctx, v, p, off)
}

// RepairRange verifies [off, off+length) of vol across the voters (as
// VerifyRange) and, for every chunk where a strict majority of the voters
// holds one hash, has each other site (only site only, if given) mark the
// chunk damaged and repair it from majority sites. Chunks without a strict
// majority are reported and left alone. off and chunk are multiples of
// RepairBlock.
func (n *Node) RepairRange(ctx context.Context, vol string, off, length, chunk int64, only string) (RepairResult, error) {
	return n.repair.RepairRange(ctx, vol, off, length, chunk, only)
}

// VerifyRange has every site hash [off, off+length) of vol in chunks at the
// same log index (the VerifyChunks command's), collects the hashes and
// reports every chunk that differs. Callers walk a volume range by range.
func (n *Node) VerifyRange(ctx context.Context, vol string, off, length, chunk int64) (VerifyResult, error) {
	return n.verify.VerifyRange(ctx, vol, off, length, chunk)
}
