package cluster

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// reconcileRaft is what the reconciler needs of Raft on the leader.
type reconcileRaft interface {
	configReader
	AddNonvoter(id raft.ServerID, address raft.ServerAddress, prevIndex uint64, timeout time.Duration) raft.IndexFuture
	AddVoter(id raft.ServerID, address raft.ServerAddress, prevIndex uint64, timeout time.Duration) raft.IndexFuture
	DemoteVoter(id raft.ServerID, prevIndex uint64, timeout time.Duration) raft.IndexFuture
	Stats() map[string]string
}

// memberLister lists the live gossip members (membership).
type memberLister interface {
	members() []member
}

// jsonGetter fetches another site's internal endpoint (rpcClient).
type jsonGetter interface {
	getJSON(ctx context.Context, addr, path string, out any) error
}

// reconciler is the leader's membership policy: it brings the Raft
// configuration in line with the live gossip members. Its only state is
// two log-once sets, each under its own lock (refused, checks).
type reconciler struct {
	self    string
	log     *slog.Logger
	raft    reconcileRaft
	ids     clusterIDs
	members memberLister
	refused *refusals
	rpc     jsonGetter
	// verify is Config.VerifyPeer (nil: no check): a member is added,
	// readdressed or promoted only after it passed.
	verify func(ctx context.Context, site, raftAddr string) error
	checks peerChecks
}

// verifyPeerTimeout bounds one VerifyPeer call.
const verifyPeerTimeout = 5 * time.Second

// verified runs VerifyPeer for m (at its gossiped Raft address) and
// reports whether it passed. A failure is logged once per member and
// distinct error until the member passes.
func (c *reconciler) verified(m member) bool {
	if c.verify == nil {
		return true
	}
	ctx, cancel := context.WithTimeout(context.Background(), verifyPeerTimeout)
	defer cancel()
	err := c.verify(ctx, m.Name, m.Meta.Raft)
	c.checks.note(c.log, m, err)
	return err == nil
}

// peerChecks remembers, per member, the VerifyPeer errors already logged
// since it last passed.
type peerChecks struct {
	mu     sync.Mutex
	failed map[string]map[string]bool
}

// maxPeerErrorsLogged bounds the distinct errors logged per member (an
// error text may carry an ephemeral port); further ones are logged at
// debug level.
const maxPeerErrorsLogged = 8

func (p *peerChecks) note(log *slog.Logger, m member, err error) {
	p.mu.Lock()
	if err == nil {
		_, had := p.failed[m.Name]
		delete(p.failed, m.Name)
		p.mu.Unlock()
		if had {
			log.Info("site passed verification", "site", m.Name, "raft", m.Meta.Raft)
		}
		return
	}
	if p.failed == nil {
		p.failed = map[string]map[string]bool{}
	}
	seen := p.failed[m.Name]
	if seen == nil {
		seen = map[string]bool{}
		p.failed[m.Name] = seen
	}
	msg := err.Error()
	first := !seen[msg] && len(seen) < maxPeerErrorsLogged
	if first {
		seen[msg] = true
	}
	p.mu.Unlock()
	lvl := slog.LevelDebug
	if first {
		lvl = slog.LevelError
	}
	log.Log(context.Background(), lvl, "site failed verification: not adding it to the raft configuration (retrying)",
		"site", m.Name, "raft", m.Meta.Raft, "err", err)
}

// bootstrapExpectLoop waits until BootstrapExpect sites gossip, then
// bootstraps Raft with exactly those sites. Every starting site does the same
// with the same sorted list, which Raft accepts as one configuration.
func (n *Node) bootstrapExpectLoop() {
	defer n.wg.Done()
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-n.stop:
			return
		case <-t.C:
		}
		if n.Leader() != "" {
			return // someone else bootstrapped and we were added
		}
		ms := n.gossip.members()
		if i := slices.IndexFunc(ms, func(m member) bool { return m.Meta.Cluster != "" }); i >= 0 {
			// A cluster exists already: this site (with no Raft state) is
			// a new or wiped one, and joins it as a fresh non-voter.
			n.log.Warn("a cluster exists already; joining it instead of bootstrapping",
				"member", ms[i].Name, "cluster_id", ms[i].Meta.Cluster)
			return
		}
		if len(ms) < n.cfg.BootstrapExpect {
			continue
		}
		var servers []raft.Server
		for _, m := range ms[:n.cfg.BootstrapExpect] {
			servers = append(servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(m.Name), Address: raft.ServerAddress(m.Meta.Raft)})
		}
		if !slices.ContainsFunc(servers, func(s raft.Server) bool { return s.ID == raft.ServerID(n.cfg.Name) }) {
			n.log.Warn("more sites than --bootstrap-expect are gossiping; waiting to be added by the leader")
			return
		}
		// Founding voters are added without the reconciler: each must
		// pass the same verification first.
		if slices.ContainsFunc(ms[:n.cfg.BootstrapExpect], func(m member) bool { return m.Name != n.cfg.Name && !n.rec.verified(m) }) {
			continue
		}
		n.log.Info("bootstrapping cluster", "sites", len(servers))
		// A founding voter: its empty vote record and log are the truth.
		if err := n.id.clearFresh("founding voter"); err != nil {
			n.log.Error("bootstrap failed", "err", err)
			return
		}
		if err := n.bootstrap(servers); err != nil {
			n.log.Error("bootstrap failed", "err", err)
		}
		return
	}
}

// reconcileLoop keeps this site's gossip metadata current and ends its
// fresh state when due; on the leader it fixes the cluster ID and
// reconciles the Raft configuration with the live gossip members. A site
// that dies stays a voter: it is a backup, and only an operator removes it
// (cluster leave / cluster remove).
func (n *Node) reconcileLoop() {
	defer n.wg.Done()
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-n.stop:
			return
		case <-t.C:
		case <-n.gossip.events:
		}
		// Remember new peers' gossip addresses at once (membership events
		// nudge this loop): a site restarted soon after it first joined must
		// still find them, or it waits for the others' next push/pull.
		if !n.admin.hasLeft() {
			n.gossip.rememberPeers()
		}
		n.id.checkFresh()
		n.gossip.refreshMeta()
		if n.raft.State() != raft.Leader {
			continue
		}
		n.id.ensureClusterID()
		if err := n.rec.reconcile(); err != nil {
			n.log.Warn("reconciling members", "err", err)
		}
	}
}

// reconcile, on the leader, brings the Raft configuration in line with the
// live gossip members, one change per member and round:
//
//   - a member of another cluster (another cluster ID) is never added;
//     neither is any member advertising an ID while this site knows none;
//   - a member not in the configuration joins as a non-voter;
//   - a fresh member listed as a voter (its data directory was wiped) is
//     demoted to non-voter first;
//   - a non-voter that is not fresh and is caught up (applied within
//     promoteMaxLag entries of the leader's commit index) becomes a voter;
//   - a changed address is updated, keeping the suffrage;
//   - nobody is added, readdressed or promoted before passing VerifyPeer
//     (demoting needs no proof); a member of another cluster is skipped
//     before it is ever verified.
func (c *reconciler) reconcile() error {
	fut := c.raft.GetConfiguration()
	if err := fut.Error(); err != nil {
		return err
	}
	known := map[raft.ServerID]raft.Server{}
	for _, s := range fut.Configuration().Servers {
		known[s.ID] = s
	}
	ours := c.ids.ClusterID()
	for _, m := range c.members.members() {
		id, addr := raft.ServerID(m.Name), raft.ServerAddress(m.Meta.Raft)
		if m.Name == c.self {
			continue
		}
		if foreign(ours, m.Meta.Cluster) {
			c.refused.once(c.log, m.Name, m.Meta.Cluster, ours, "raft membership")
			continue
		}
		if ours == "" && m.Meta.Cluster != "" {
			continue // cannot tell yet whether it is ours
		}
		cur, inConfig := known[id]
		switch {
		case !inConfig:
			if !c.verified(m) {
				continue
			}
			c.log.Info("adding site as non-voter; it becomes a voter once caught up", "site", m.Name, "raft", m.Meta.Raft, "fresh", m.Meta.Fresh)
			if err := c.raft.AddNonvoter(id, addr, 0, 10*time.Second).Error(); err != nil {
				return fmt.Errorf("adding %s: %w", m.Name, err)
			}
		case m.Meta.Fresh && cur.Suffrage == raft.Voter:
			// Gossip may still carry the metadata of a founding voter's
			// first moments (fresh until it bootstrapped): the site's own
			// answer decides.
			if s, err := c.memberStatus(m); err != nil || !s.Fresh {
				continue
			}
			c.log.Error("site restarted with an empty raft directory but is listed as a voter: demoting it to non-voter "+
				"until it caught up (its old votes and log are gone)", "site", m.Name)
			if err := c.raft.DemoteVoter(id, 0, 10*time.Second).Error(); err != nil {
				return fmt.Errorf("demoting %s: %w", m.Name, err)
			}
		case cur.Address != addr && cur.Suffrage == raft.Voter:
			if !c.verified(m) {
				continue
			}
			c.log.Info("updating a voter's address", "site", m.Name, "raft", m.Meta.Raft)
			if err := c.raft.AddVoter(id, addr, 0, 10*time.Second).Error(); err != nil {
				return fmt.Errorf("updating %s: %w", m.Name, err)
			}
		case cur.Address != addr:
			if !c.verified(m) {
				continue
			}
			c.log.Info("updating a non-voter's address", "site", m.Name, "raft", m.Meta.Raft)
			if err := c.raft.AddNonvoter(id, addr, 0, 10*time.Second).Error(); err != nil {
				return fmt.Errorf("updating %s: %w", m.Name, err)
			}
		case cur.Suffrage == raft.Nonvoter && !m.Meta.Fresh:
			lag, err := c.nonvoterLag(m)
			if err != nil {
				c.log.Debug("non-voter progress unknown", "site", m.Name, "err", err)
				continue
			}
			if lag > promoteMaxLag || !c.verified(m) {
				continue
			}
			c.log.Info("promoting caught-up non-voter to voter", "site", m.Name, "lag", lag)
			if err := c.raft.AddVoter(id, addr, 0, 10*time.Second).Error(); err != nil {
				return fmt.Errorf("promoting %s: %w", m.Name, err)
			}
		}
	}
	return nil
}

// memberStatus asks a member for its own status (its local view).
func (c *reconciler) memberStatus(m member) (SiteStatus, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var s SiteStatus
	if err := c.rpc.getJSON(ctx, m.Meta.API, pathLocalStatus, &s); err != nil {
		return SiteStatus{}, err
	}
	if s.Name != m.Name || foreign(c.ids.ClusterID(), s.ClusterID) {
		return SiteStatus{}, fmt.Errorf("%w: %s answers as %s of cluster %q", ErrForeignCluster, m.Meta.API, s.Name, s.ClusterID)
	}
	return s, nil
}

// nonvoterLag asks a member how far it has applied and returns how many
// entries that is behind this leader's commit index.
func (c *reconciler) nonvoterLag(m member) (uint64, error) {
	s, err := c.memberStatus(m)
	if err != nil {
		return 0, err
	}
	if s.Fresh {
		return 0, fmt.Errorf("%s is still fresh", m.Name)
	}
	commit, err := strconv.ParseUint(c.raft.Stats()["commit_index"], 10, 64)
	if err != nil {
		return 0, err
	}
	if s.AppliedIndex >= commit {
		return 0, nil
	}
	return commit - s.AppliedIndex, nil
}
