package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/raft"
)

// siteMeta is what each site gossips about itself.
type siteMeta struct {
	Raft string `json:"raft"`
	API  string `json:"api"`
	NBD  string `json:"nbd"`
	// Cluster is the cluster ID this site's state holds ("" until it
	// knows one): a member of another cluster is never added to Raft and
	// gossip does not merge with it.
	Cluster string `json:"cluster,omitempty"`
	// Fresh: the site joined with an empty Raft directory and has not yet
	// been a non-voter; it takes no part in elections (identity.go).
	Fresh bool `json:"fresh,omitempty"`
}

// delegate answers memberlist's questions about this site, keeps this
// site's own copy of the member table, and turns membership events into
// reconcile nudges. memberlist calls it from its own goroutines.
//
// The copy exists because memberlist.Members returns pointers into
// memberlist's internal state, whose fields it keeps changing: reading them
// outside its lock is a data race. Events hand over a node while
// memberlist holds that lock, so copying there is safe.
type delegate struct {
	n *Node

	mu    sync.Mutex // guards meta and nodes
	meta  []byte     // this site's encoded siteMeta
	nodes map[string]gossipNode
}

// gossipNode is a copy of what this site needs of a gossip member.
type gossipNode struct {
	Addr string // gossip address, host:port
	Meta []byte
}

func (d *delegate) set(n *memberlist.Node) {
	var meta siteMeta
	if json.Unmarshal(n.Meta, &meta) == nil {
		d.n.refused.advertised(n.Name, meta.Cluster)
	}
	d.mu.Lock()
	d.nodes[n.Name] = gossipNode{Addr: n.Address(), Meta: slices.Clone(n.Meta)}
	d.mu.Unlock()
	d.n.nudge()
}

// snapshot returns a copy of the live member table.
func (d *delegate) snapshot() map[string]gossipNode {
	d.mu.Lock()
	defer d.mu.Unlock()
	return maps.Clone(d.nodes)
}

func (d *delegate) NodeMeta(limit int) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.meta) > limit {
		return nil
	}
	return d.meta
}

// setMeta replaces this site's metadata; it reports whether it changed.
func (d *delegate) setMeta(b []byte) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if string(b) == string(d.meta) {
		return false
	}
	d.meta = b
	return true
}

// NotifyAlive (memberlist.AliveDelegate) refuses a member of another
// cluster, so it never enters this site's member table.
func (d *delegate) NotifyAlive(peer *memberlist.Node) error {
	return d.checkPeer(peer, "gossip")
}

// NotifyMerge (memberlist.MergeDelegate) refuses a state exchange (join or
// push/pull) with a pool that holds a member of another cluster.
func (d *delegate) NotifyMerge(peers []*memberlist.Node) error {
	var first error
	for _, p := range peers {
		if err := d.checkPeer(p, "gossip merge"); err != nil && first == nil {
			first = err // check them all: each is remembered (and logged)
		}
	}
	return first
}

func (d *delegate) checkPeer(peer *memberlist.Node, by string) error {
	if peer.Name == d.n.cfg.Name {
		return nil
	}
	var meta siteMeta
	if json.Unmarshal(peer.Meta, &meta) != nil {
		return nil // not a robib site's metadata (yet): members() skips it
	}
	d.n.refused.advertised(peer.Name, meta.Cluster)
	ours := d.n.fsm.ClusterID()
	if foreign(ours, meta.Cluster) {
		d.n.refused.once(d.n.log, peer.Name, meta.Cluster, ours, by)
		return fmt.Errorf("%w: %s is in cluster %s, this is %s", ErrForeignCluster, peer.Name, meta.Cluster, ours)
	}
	return nil
}
func (d *delegate) NotifyMsg([]byte)                {}
func (d *delegate) GetBroadcasts(int, int) [][]byte { return nil }
func (d *delegate) LocalState(bool) []byte          { return nil }
func (d *delegate) MergeRemoteState([]byte, bool)   {}
func (d *delegate) NotifyJoin(n *memberlist.Node)   { d.set(n) }
func (d *delegate) NotifyLeave(n *memberlist.Node) {
	d.mu.Lock()
	delete(d.nodes, n.Name)
	d.mu.Unlock()
	d.n.nudge()
}
func (d *delegate) NotifyUpdate(n *memberlist.Node) { d.set(n) }

func (n *Node) nudge() {
	select {
	case n.events <- struct{}{}:
	default:
	}
}

func (n *Node) openGossip() error {
	host, portStr, err := net.SplitHostPort(n.cfg.GossipAddr)
	if err != nil {
		return fmt.Errorf("%w: gossip address %q: %v", ErrInvalidRequest, n.cfg.GossipAddr, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return fmt.Errorf("%w: gossip port %q", ErrInvalidRequest, portStr)
	}
	meta, err := json.Marshal(n.ownMeta())
	if err != nil {
		return err
	}
	mc := memberlist.DefaultLANConfig()
	mc.Name = n.cfg.Name
	mc.BindAddr = host
	mc.BindPort = port
	mc.AdvertiseAddr = host
	mc.AdvertisePort = port
	d := &delegate{meta: meta, n: n, nodes: map[string]gossipNode{}}
	n.gossip = d
	mc.Delegate = d
	mc.Events = d
	mc.Alive = d
	mc.Merge = d
	mc.Logger = log.New(&logWriter{log: n.log, component: "gossip"}, "", 0)
	// Faster failure detection than the LAN default: sites are few.
	mc.ProbeInterval = 500 * time.Millisecond
	mc.ProbeTimeout = 250 * time.Millisecond
	mc.GossipInterval = 100 * time.Millisecond
	// A full state exchange is also how a site that restarted within the
	// others' failure-detection window (they never saw it die) learns of
	// them when it has no address to join through; sites are few, so it is
	// cheap to do it often.
	mc.PushPullInterval = 5 * time.Second
	mc.TCPTimeout = 3 * time.Second // bounds each join attempt, and so shutdown
	ml, err := memberlist.Create(mc)
	if err != nil {
		return fmt.Errorf("starting gossip on %s: %w", n.cfg.GossipAddr, err)
	}
	n.ml = ml
	n.loadPeers()
	n.wg.Add(1)
	go n.gossipLoop()
	return nil
}

// ownMeta is what this site gossips about itself now.
func (n *Node) ownMeta() siteMeta {
	return siteMeta{Raft: n.cfg.RaftAddr, API: n.cfg.APIAddr, NBD: n.cfg.NBDAddr, Cluster: n.fsm.ClusterID(), Fresh: n.fresh.Load()}
}

// refreshMeta gossips this site's metadata again when it changed (the
// cluster ID became known, the site stopped being fresh).
func (n *Node) refreshMeta() {
	b, err := json.Marshal(n.ownMeta())
	if err != nil || !n.gossip.setMeta(b) {
		return
	}
	if err := n.ml.UpdateNode(2 * time.Second); err != nil {
		n.log.Warn("gossiping updated site metadata", "err", err)
	}
}

// gossipLoop keeps this site in the gossip pool. Gossip alone forgets a
// peer that stayed unreachable for a while, so a site restarting after a
// long outage (or a cluster whose --join target is down) would otherwise
// never find the others again. The loop remembers every peer's gossip
// address on disk and, whenever a Raft voter is missing from gossip, joins
// through the --join addresses and the remembered addresses of the missing
// sites.
func (n *Node) gossipLoop() {
	defer n.wg.Done()
	joined := len(n.cfg.Join) == 0 // with --join, first reach one of them
	wait := 100 * time.Millisecond
	warned := false
	for {
		select {
		case <-n.stop:
			return
		case <-time.After(wait):
		}
		if n.hasLeft() {
			return // a site that left must not find its way back
		}
		n.rememberPeers()
		targets := n.rejoinTargets(!joined)
		if len(targets) == 0 {
			wait = 2 * time.Second
			continue
		}
		if _, err := n.ml.Join(targets); err != nil {
			if !warned {
				n.log.Warn("cannot reach other sites through gossip; retrying", "via", targets, "err", err)
				warned = true
			}
			wait = min(2*wait, 5*time.Second)
			continue
		}
		if !joined || warned {
			n.log.Info("joined gossip", "via", targets)
		}
		joined, warned = true, false
		wait = 2 * time.Second
	}
}

// rejoinTargets lists gossip addresses to join: all known ones when
// initial is set, else those of Raft voters missing from gossip (plus the
// --join addresses), or nothing when every voter gossips.
func (n *Node) rejoinTargets(initial bool) []string {
	alive := map[string]bool{}
	for name := range n.gossip.snapshot() {
		alive[name] = true
	}
	missing := initial
	if !initial {
		if fut := n.raft.GetConfiguration(); fut.Error() == nil {
			for _, s := range fut.Configuration().Servers {
				if !alive[string(s.ID)] {
					missing = true
				}
			}
		}
	}
	if !missing {
		return nil
	}
	set := map[string]bool{}
	for _, a := range n.cfg.Join {
		set[a] = true
	}
	n.peersMu.Lock()
	for name, addr := range n.peers {
		if !alive[name] {
			set[addr] = true
		}
	}
	n.peersMu.Unlock()
	delete(set, n.cfg.GossipAddr)
	out := make([]string, 0, len(set))
	for a := range set {
		out = append(out, a)
	}
	slices.Sort(out)
	return out
}

// peersFile holds the gossip addresses of the sites this one has seen.
func (n *Node) peersFile() string { return filepath.Join(n.cfg.DataDir, "raft", "gossip-peers.json") }

// loadPeers reads the remembered gossip addresses; a missing or unreadable
// file only costs the automatic rejoin, so it is logged, not fatal.
func (n *Node) loadPeers() {
	n.peers = map[string]string{}
	b, err := os.ReadFile(n.peersFile())
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			n.log.Warn("reading remembered gossip peers", "err", err)
		}
		return
	}
	if err := json.Unmarshal(b, &n.peers); err != nil {
		n.log.Warn("ignoring corrupt gossip peers file", "file", n.peersFile(), "err", err)
		n.peers = map[string]string{}
	}
}

// rememberPeers records the gossip address of every live member and saves
// the list when it changed (write to a temporary file, then rename).
func (n *Node) rememberPeers() {
	changed := false
	n.peersMu.Lock()
	defer n.peersMu.Unlock()
	for name, g := range n.gossip.snapshot() {
		if name == n.cfg.Name {
			continue
		}
		if n.peers[name] != g.Addr {
			n.peers[name] = g.Addr
			changed = true
		}
	}
	if !changed {
		return
	}
	b, err := json.MarshalIndent(n.peers, "", "  ")
	if err == nil {
		tmp := n.peersFile() + ".tmp"
		if err = os.WriteFile(tmp, b, 0o600); err == nil {
			err = os.Rename(tmp, n.peersFile())
		}
	}
	if err != nil {
		n.log.Warn("saving gossip peers", "err", err)
	}
}

// member is one gossiping site with its decoded metadata.
type member struct {
	Name string
	Meta siteMeta
}

// members lists the sites gossip currently knows as alive (or suspect).
func (n *Node) members() []member {
	var out []member
	for name, g := range n.gossip.snapshot() {
		var meta siteMeta
		if err := json.Unmarshal(g.Meta, &meta); err != nil || meta.Raft == "" {
			continue
		}
		out = append(out, member{Name: name, Meta: meta})
	}
	slices.SortFunc(out, func(a, b member) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// memberMeta returns the gossiped addresses of a site.
func (n *Node) memberMeta(name string) (siteMeta, bool) {
	if name == n.cfg.Name {
		return n.ownMeta(), true
	}
	for _, m := range n.members() {
		if m.Name == name {
			return m.Meta, true
		}
	}
	return siteMeta{}, false
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
		ms := n.members()
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
		n.log.Info("bootstrapping cluster", "sites", len(servers))
		// A founding voter: its empty vote record and log are the truth.
		if err := n.clearFresh("founding voter"); err != nil {
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
		case <-n.events:
		}
		// Remember new peers' gossip addresses at once (membership events
		// nudge this loop): a site restarted soon after it first joined must
		// still find them, or it waits for the others' next push/pull.
		if !n.hasLeft() {
			n.rememberPeers()
		}
		n.checkFresh()
		n.refreshMeta()
		if n.raft.State() != raft.Leader {
			continue
		}
		n.ensureClusterID()
		if err := n.reconcile(); err != nil {
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
//   - a changed address is updated, keeping the suffrage.
func (n *Node) reconcile() error {
	fut := n.raft.GetConfiguration()
	if err := fut.Error(); err != nil {
		return err
	}
	known := map[raft.ServerID]raft.Server{}
	for _, s := range fut.Configuration().Servers {
		known[s.ID] = s
	}
	ours := n.fsm.ClusterID()
	for _, m := range n.members() {
		id, addr := raft.ServerID(m.Name), raft.ServerAddress(m.Meta.Raft)
		if m.Name == n.cfg.Name {
			continue
		}
		if foreign(ours, m.Meta.Cluster) {
			n.refused.once(n.log, m.Name, m.Meta.Cluster, ours, "raft membership")
			continue
		}
		if ours == "" && m.Meta.Cluster != "" {
			continue // cannot tell yet whether it is ours
		}
		cur, inConfig := known[id]
		switch {
		case !inConfig:
			n.log.Info("adding site as non-voter; it becomes a voter once caught up", "site", m.Name, "raft", m.Meta.Raft, "fresh", m.Meta.Fresh)
			if err := n.raft.AddNonvoter(id, addr, 0, 10*time.Second).Error(); err != nil {
				return fmt.Errorf("adding %s: %w", m.Name, err)
			}
		case m.Meta.Fresh && cur.Suffrage == raft.Voter:
			// Gossip may still carry the metadata of a founding voter's
			// first moments (fresh until it bootstrapped): the site's own
			// answer decides.
			if s, err := n.memberStatus(m); err != nil || !s.Fresh {
				continue
			}
			n.log.Error("site restarted with an empty raft directory but is listed as a voter: demoting it to non-voter "+
				"until it caught up (its old votes and log are gone)", "site", m.Name)
			if err := n.raft.DemoteVoter(id, 0, 10*time.Second).Error(); err != nil {
				return fmt.Errorf("demoting %s: %w", m.Name, err)
			}
		case cur.Address != addr && cur.Suffrage == raft.Voter:
			n.log.Info("updating a voter's address", "site", m.Name, "raft", m.Meta.Raft)
			if err := n.raft.AddVoter(id, addr, 0, 10*time.Second).Error(); err != nil {
				return fmt.Errorf("updating %s: %w", m.Name, err)
			}
		case cur.Address != addr:
			n.log.Info("updating a non-voter's address", "site", m.Name, "raft", m.Meta.Raft)
			if err := n.raft.AddNonvoter(id, addr, 0, 10*time.Second).Error(); err != nil {
				return fmt.Errorf("updating %s: %w", m.Name, err)
			}
		case cur.Suffrage == raft.Nonvoter && !m.Meta.Fresh:
			lag, err := n.nonvoterLag(m)
			if err != nil {
				n.log.Debug("non-voter progress unknown", "site", m.Name, "err", err)
				continue
			}
			if lag > promoteMaxLag {
				continue
			}
			n.log.Info("promoting caught-up non-voter to voter", "site", m.Name, "lag", lag)
			if err := n.raft.AddVoter(id, addr, 0, 10*time.Second).Error(); err != nil {
				return fmt.Errorf("promoting %s: %w", m.Name, err)
			}
		}
	}
	return nil
}

// memberStatus asks a member for its own status (its local view).
func (n *Node) memberStatus(m member) (SiteStatus, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var s SiteStatus
	if err := n.rpc.getJSON(ctx, m.Meta.API, pathLocalStatus, &s); err != nil {
		return SiteStatus{}, err
	}
	if s.Name != m.Name || foreign(n.fsm.ClusterID(), s.ClusterID) {
		return SiteStatus{}, fmt.Errorf("%w: %s answers as %s of cluster %q", ErrForeignCluster, m.Meta.API, s.Name, s.ClusterID)
	}
	return s, nil
}

// nonvoterLag asks a member how far it has applied and returns how many
// entries that is behind this leader's commit index.
func (n *Node) nonvoterLag(m member) (uint64, error) {
	s, err := n.memberStatus(m)
	if err != nil {
		return 0, err
	}
	if s.Fresh {
		return 0, fmt.Errorf("%s is still fresh", m.Name)
	}
	commit, err := strconv.ParseUint(n.raft.Stats()["commit_index"], 10, 64)
	if err != nil {
		return 0, err
	}
	if s.AppliedIndex >= commit {
		return 0, nil
	}
	return commit - s.AppliedIndex, nil
}
