package cluster

// Cluster identity and site incarnation: see DESIGN.md, "Cluster identity
// and fresh sites".

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"

	"github.com/robib/robib/fsm"
	"github.com/robib/robib/volume"
)

// ErrForeignCluster: a site of another cluster (it advertises another
// cluster ID) was refused.
var ErrForeignCluster = errors.New("site belongs to another cluster")

// freshFileName marks a site that started with no Raft state and joins an
// existing cluster (it is not one of the founding voters). Until the marker
// is gone the site grants no vote and never campaigns.
const freshFileName = "fresh"

// promoteMaxLag is how many entries a non-voter may be behind the leader's
// commit index to be promoted to voter. Safety does not depend on it (the
// non-voter's log matches the leader's up to what it acknowledged); it only
// keeps a far-behind site from counting in the quorum. It is generous
// enough that a site keeping up with a busy writer (entries in flight) is
// still promoted.
const promoteMaxLag = 256

// identity is this site's incarnation and its cluster's identity: the
// fresh state (the marker file, and the atomic that the vote guard, gossip
// and status read), the refusals of other clusters' sites (refused, under
// its own lock), ending the fresh state, and fixing the cluster ID on the
// leader. The fields after the blank line are set by Node.wire once Raft
// runs; only the reconcile and bootstrap loops, started after that, use
// them.
type identity struct {
	self    string
	dir     string // DataDir/raft
	log     *slog.Logger
	ids     clusterIDs
	fresh   atomic.Bool
	refused refusals

	config  configReader
	barrier barrierRaft
	prop    applier
	meta    metaRefresher // nil until gossip is wired
}

// barrierRaft commits a barrier (Raft).
type barrierRaft interface {
	Barrier(timeout time.Duration) raft.Future
}

// applier proposes one command (proposer).
type applier interface {
	Apply(ctx context.Context, cmd fsm.Command) (*fsm.Result, error)
}

// metaRefresher gossips this site's metadata again (membership).
type metaRefresher interface {
	refreshMeta()
}

func (i *identity) freshFile() string { return filepath.Join(i.dir, freshFileName) }

// markFresh records, durably and before Raft starts, that this site has no
// Raft history it could vouch for: its votes and its log are empty.
func (i *identity) markFresh() error {
	if err := volume.WriteFileSync(i.freshFile(), []byte("this site joined with an empty raft directory; it votes once it was a non-voter\n")); err != nil {
		return fmt.Errorf("writing the fresh-site marker: %w", err)
	}
	if err := volume.SyncDir(filepath.Dir(i.freshFile())); err != nil {
		return fmt.Errorf("writing the fresh-site marker: %w", err)
	}
	i.fresh.Store(true)
	return nil
}

// clearFresh removes the marker (durably) and lets this site vote.
func (i *identity) clearFresh(why string) error {
	if err := os.Remove(i.freshFile()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing the fresh-site marker: %w", err)
	}
	if err := volume.SyncDir(filepath.Dir(i.freshFile())); err != nil {
		return fmt.Errorf("removing the fresh-site marker: %w", err)
	}
	if i.fresh.Swap(false) {
		i.log.Info("site is no longer fresh: it votes from now on", "site", i.self, "why", why)
		if i.meta != nil {
			i.meta.refreshMeta() // tell the leader at once
		}
	}
	return nil
}

// checkFresh, on a fresh site, ends the fresh state once the site sees
// itself as a non-voter in its latest Raft configuration: that entry (a
// demotion or the non-voter join) is in its log, and so is everything
// before it.
func (i *identity) checkFresh() {
	if !i.fresh.Load() {
		return
	}
	fut := i.config.GetConfiguration()
	if fut.Error() != nil {
		return
	}
	for _, s := range fut.Configuration().Servers {
		if s.ID == raft.ServerID(i.self) && s.Suffrage == raft.Nonvoter {
			if err := i.clearFresh("listed as a non-voter"); err != nil {
				i.log.Warn("leaving the fresh state", "err", err)
			}
			return
		}
	}
}

// Fresh reports whether this site is fresh (joined with an empty Raft
// directory and not yet accepted as a non-voter).
func (n *Node) Fresh() bool { return n.id.fresh.Load() }

// ClusterID is the cluster's ID as this site's state holds it ("" until
// known).
func (n *Node) ClusterID() string { return n.fsm.ClusterID() }

// newClusterID returns a random cluster ID (32 hex digits).
func newClusterID() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	return hex.EncodeToString(b[:]), nil
}

// ensureClusterID, on the leader, fixes the cluster ID if the state has
// none yet: after a barrier (so this FSM has applied every earlier entry)
// it proposes SetClusterID, a compare-and-set. Two leaders racing both
// propose; the first entry wins everywhere, the second gets a verdict.
func (i *identity) ensureClusterID() {
	if i.ids.ClusterID() != "" {
		return
	}
	if err := i.barrier.Barrier(5 * time.Second).Error(); err != nil {
		return // not the leader any more, or slow: the next round tries again
	}
	if i.ids.ClusterID() != "" {
		return
	}
	id, err := newClusterID()
	if err != nil {
		i.log.Warn("generating a cluster ID", "err", err)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res, err := i.prop.Apply(ctx, &fsm.SetClusterID{ID: id})
	switch {
	case err != nil:
		i.log.Warn("proposing the cluster ID", "err", err)
	case res.Err != nil && !errors.Is(res.Err, fsm.ErrClusterIDSet):
		i.log.Warn("proposing the cluster ID", "err", res.Err)
	case res.Err == nil:
		i.log.Info("cluster ID fixed", "cluster_id", id)
	}
}

// foreign reports whether a member's advertised cluster ID makes it a site
// of another cluster: both IDs known and different.
func foreign(ours, theirs string) bool { return ours != "" && theirs != "" && ours != theirs }

// refusals logs each refused (site, cluster ID) once, and remembers the
// cluster ID each gossiping site last advertised (so Raft traffic from a
// foreign leader can be refused too).
type refusals struct {
	mu   sync.Mutex
	seen map[string]bool
	last map[string]string // site name -> cluster ID it last advertised
}

// advertised records the cluster ID a site advertises.
func (r *refusals) advertised(site, id string) {
	r.mu.Lock()
	if r.last == nil {
		r.last = map[string]string{}
	}
	r.last[site] = id
	r.mu.Unlock()
}

// clusterOf is the cluster ID site last advertised ("" if unknown).
func (r *refusals) clusterOf(site string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.last[site]
}

func (r *refusals) once(log *slog.Logger, site, theirs, ours, by string) {
	key := site + "\x00" + theirs
	r.mu.Lock()
	if r.seen == nil {
		r.seen = map[string]bool{}
	}
	first := !r.seen[key]
	r.seen[key] = true
	r.mu.Unlock()
	if first {
		log.Error("refusing a site of another cluster", "site", site, "its_cluster_id", theirs,
			"cluster_id", ours, "by", by, "err", ErrForeignCluster)
	}
}

// voteGuard wraps the Raft transport so that a fresh site takes no part in
// elections: it answers every RequestVote and RequestPreVote with a
// refusal, refuses TimeoutNow (a leadership transfer to it), and, as a
// candidate, asks nobody for a vote (the request is answered locally with
// a refusal). Its own vote for itself can therefore never be counted with
// another site's.
type voteGuard struct {
	guardedTransport
	fresh *atomic.Bool
	log   *slog.Logger
	// foreign, if set, reports whether a site (by Raft ID) is known to be
	// of another cluster: its log replication and snapshots are refused.
	foreign func(id string) bool

	ch            chan raft.RPC
	done          chan struct{}
	closeOnce     sync.Once
	warned        atomic.Bool
	warnedForeign atomic.Bool

	refusals   atomic.Int64 // election requests refused while fresh
	suppressed atomic.Int64 // own vote requests not sent while fresh

	foreignRefusals atomic.Int64 // replication RPCs refused from foreign sites
}

// guardedTransport is what voteGuard wraps (raft's network and in-memory
// transports both are one).
type guardedTransport interface {
	raft.Transport
	raft.WithPreVote
	raft.WithClose
}

var errFreshSite = errors.New("fresh site: takes no part in elections until it caught up as a non-voter")

func newVoteGuard(t guardedTransport, fresh *atomic.Bool, foreign func(id string) bool, log *slog.Logger) *voteGuard {
	g := &voteGuard{guardedTransport: t, fresh: fresh, foreign: foreign, log: log, ch: make(chan raft.RPC), done: make(chan struct{})}
	go g.forward()
	return g
}

// forward passes every RPC to Raft except the election RPCs of a fresh
// site, which it answers itself.
func (g *voteGuard) forward() {
	in := g.guardedTransport.Consumer()
	for {
		var rpc raft.RPC
		select {
		case rpc = <-in:
		case <-g.done:
			return
		}
		if g.refuseForeign(rpc) {
			continue
		}
		if g.fresh.Load() {
			switch req := rpc.Command.(type) {
			case *raft.RequestVoteRequest:
				g.refusals.Add(1)
				g.refused("vote", req.ID)
				rpc.Respond(&raft.RequestVoteResponse{Term: req.Term, Granted: false}, nil)
				continue
			case *raft.RequestPreVoteRequest:
				g.refusals.Add(1)
				g.refused("pre-vote", req.ID)
				rpc.Respond(&raft.RequestPreVoteResponse{Term: req.Term, Granted: false}, nil)
				continue
			case *raft.TimeoutNowRequest:
				g.refused("leadership transfer", req.ID)
				rpc.Respond(&raft.TimeoutNowResponse{}, errFreshSite)
				continue
			}
		}
		select {
		case g.ch <- rpc:
		case <-g.done:
			return
		}
	}
}

var errForeignLeader = fmt.Errorf("%w: refusing its log", ErrForeignCluster)

// refuseForeign answers log replication, heartbeats and snapshots from a
// site known to be of another cluster with an error, and reports whether
// it did. Best effort: it knows a site as foreign only once gossip showed
// its cluster ID.
func (g *voteGuard) refuseForeign(rpc raft.RPC) bool {
	if g.foreign == nil {
		return false
	}
	var from []byte
	switch req := rpc.Command.(type) {
	case *raft.AppendEntriesRequest:
		from = req.ID
		if !g.foreign(string(from)) {
			return false
		}
		rpc.Respond(&raft.AppendEntriesResponse{}, errForeignLeader)
	case *raft.InstallSnapshotRequest:
		from = req.ID
		if !g.foreign(string(from)) {
			return false
		}
		rpc.Respond(&raft.InstallSnapshotResponse{}, errForeignLeader)
	default:
		return false
	}
	g.foreignRefusals.Add(1)
	if !g.warnedForeign.Swap(true) {
		g.log.Error("refusing raft replication from a site of another cluster", "from", string(from), "err", ErrForeignCluster)
	}
	return true
}

// SetHeartbeatHandler passes heartbeats on, except a foreign leader's.
func (g *voteGuard) SetHeartbeatHandler(cb func(raft.RPC)) {
	if cb == nil {
		g.guardedTransport.SetHeartbeatHandler(nil)
		return
	}
	g.guardedTransport.SetHeartbeatHandler(func(rpc raft.RPC) {
		if !g.refuseForeign(rpc) {
			cb(rpc)
		}
	})
}

func (g *voteGuard) refused(what string, from []byte) {
	if !g.warned.Swap(true) {
		g.log.Warn("fresh site: refusing to take part in an election until it caught up as a non-voter",
			"request", what, "from", string(from))
	}
}

// Consumer is the guarded RPC channel Raft reads.
func (g *voteGuard) Consumer() <-chan raft.RPC { return g.ch }

// RequestVote asks target for its vote, unless this site is fresh.
func (g *voteGuard) RequestVote(id raft.ServerID, target raft.ServerAddress, args *raft.RequestVoteRequest, resp *raft.RequestVoteResponse) error {
	if g.fresh.Load() {
		g.suppressed.Add(1)
		g.refused("own candidacy", []byte(id))
		*resp = raft.RequestVoteResponse{Term: args.Term, Granted: false}
		return nil
	}
	return g.guardedTransport.RequestVote(id, target, args, resp)
}

// RequestPreVote asks target for its pre-vote, unless this site is fresh.
func (g *voteGuard) RequestPreVote(id raft.ServerID, target raft.ServerAddress, args *raft.RequestPreVoteRequest, resp *raft.RequestPreVoteResponse) error {
	if g.fresh.Load() {
		g.suppressed.Add(1)
		g.refused("own pre-candidacy", []byte(id))
		*resp = raft.RequestPreVoteResponse{Term: args.Term, Granted: false}
		return nil
	}
	return g.guardedTransport.RequestPreVote(id, target, args, resp)
}

// Close stops the forwarder and closes the transport.
func (g *voteGuard) Close() error {
	g.closeOnce.Do(func() { close(g.done) })
	return g.guardedTransport.Close()
}
