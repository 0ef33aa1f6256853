package cluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
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
	m *membership

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
		d.m.refused.advertised(n.Name, meta.Cluster)
	}
	d.mu.Lock()
	d.nodes[n.Name] = gossipNode{Addr: n.Address(), Meta: slices.Clone(n.Meta)}
	d.mu.Unlock()
	d.m.nudge()
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
	if peer.Name == d.m.cfg.Name {
		return nil
	}
	var meta siteMeta
	if json.Unmarshal(peer.Meta, &meta) != nil {
		return nil // not a robib site's metadata (yet): members() skips it
	}
	d.m.refused.advertised(peer.Name, meta.Cluster)
	ours := d.m.ids.ClusterID()
	if foreign(ours, meta.Cluster) {
		d.m.refused.once(d.m.log, peer.Name, meta.Cluster, ours, by)
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
	d.m.nudge()
}
func (d *delegate) NotifyUpdate(n *memberlist.Node) { d.set(n) }

// clusterIDs reads the cluster ID this site's state holds (fsm.FSM).
type clusterIDs interface {
	ClusterID() string
}

// leaveState tells whether this site left (or is leaving) the cluster.
type leaveState interface {
	hasLeft() bool
}

// membership is this site's part in gossip: it runs memberlist (with the
// delegate, which guards this site's metadata and its copy of the member
// table under its own lock), keeps the remembered peers (peersMu) and
// rejoins missing voters, and answers who is alive and where
// (members, memberMeta). Membership events nudge the reconcile loop
// through events.
type membership struct {
	cfg     Config // Name, the addresses, Join, DataDir
	log     *slog.Logger
	ids     clusterIDs
	fresh   *atomic.Bool // this site is fresh (identity.go); gossiped
	refused *refusals
	config  configReader
	left    leaveState
	keyring *memberlist.Keyring // gossip encryption (keyring.go); nil: plain text
	events  chan struct{}       // nudges the reconcile loop
	stop    <-chan struct{}
	wg      *sync.WaitGroup

	ml     *memberlist.Memberlist
	gossip *delegate

	peersMu sync.Mutex        // guards peers
	peers   map[string]string // site name -> gossip address, remembered on disk
}

func (m *membership) nudge() {
	select {
	case m.events <- struct{}{}:
	default:
	}
}

func (m *membership) open() error {
	host, portStr, err := net.SplitHostPort(m.cfg.GossipAddr)
	if err != nil {
		return fmt.Errorf("%w: gossip address %q: %v", ErrInvalidRequest, m.cfg.GossipAddr, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return fmt.Errorf("%w: gossip port %q", ErrInvalidRequest, portStr)
	}
	meta, err := json.Marshal(m.ownMeta())
	if err != nil {
		return err
	}
	mc := memberlist.DefaultLANConfig()
	mc.Name = m.cfg.Name
	mc.BindAddr = host
	mc.BindPort = port
	mc.AdvertiseAddr = host
	mc.AdvertisePort = port
	d := &delegate{meta: meta, m: m, nodes: map[string]gossipNode{}}
	m.gossip = d
	mc.Delegate = d
	mc.Events = d
	mc.Alive = d
	mc.Merge = d
	mc.Logger = log.New(&logWriter{log: m.log, component: "gossip"}, "", 0)
	if m.keyring != nil {
		// Every packet and stream is encrypted with the primary key and
		// authenticated (AES-GCM); anything that none of the ring's keys
		// decrypts, or that is not encrypted, is dropped.
		mc.Keyring = m.keyring
		mc.GossipVerifyIncoming = true
		mc.GossipVerifyOutgoing = true
	}
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
		return fmt.Errorf("starting gossip on %s: %w", m.cfg.GossipAddr, err)
	}
	m.ml = ml
	m.loadPeers()
	m.wg.Add(1)
	go m.gossipLoop()
	return nil
}

// ownMeta is what this site gossips about itself now.
func (m *membership) ownMeta() siteMeta {
	return siteMeta{Raft: m.cfg.RaftAddr, API: m.cfg.APIAddr, NBD: m.cfg.NBDAddr, Cluster: m.ids.ClusterID(), Fresh: m.fresh.Load()}
}

// refreshMeta gossips this site's metadata again when it changed (the
// cluster ID became known, the site stopped being fresh).
func (m *membership) refreshMeta() {
	if m.gossip == nil {
		return // gossip not started (yet)
	}
	b, err := json.Marshal(m.ownMeta())
	if err != nil || !m.gossip.setMeta(b) {
		return
	}
	if err := m.ml.UpdateNode(2 * time.Second); err != nil {
		m.log.Warn("gossiping updated site metadata", "err", err)
	}
}

// gossipLoop keeps this site in the gossip pool. Gossip alone forgets a
// peer that stayed unreachable for a while, so a site restarting after a
// long outage (or a cluster whose --join target is down) would otherwise
// never find the others again. The loop remembers every peer's gossip
// address on disk and, whenever a Raft voter is missing from gossip, joins
// through the --join addresses and the remembered addresses of the missing
// sites.
func (m *membership) gossipLoop() {
	defer m.wg.Done()
	joined := len(m.cfg.Join) == 0 // with --join, first reach one of them
	wait := 100 * time.Millisecond
	warned := false
	for {
		select {
		case <-m.stop:
			return
		case <-time.After(wait):
		}
		if m.left.hasLeft() {
			return // a site that left must not find its way back
		}
		m.rememberPeers()
		targets := m.rejoinTargets(!joined)
		if len(targets) == 0 {
			wait = 2 * time.Second
			continue
		}
		if _, err := m.ml.Join(targets); err != nil {
			if !warned {
				m.log.Warn("cannot reach other sites through gossip; retrying", "via", targets, "err", err)
				warned = true
			}
			wait = min(2*wait, 5*time.Second)
			continue
		}
		if !joined || warned {
			m.log.Info("joined gossip", "via", targets)
		}
		joined, warned = true, false
		wait = 2 * time.Second
	}
}

// rejoinTargets lists gossip addresses to join: all known ones when
// initial is set, else those of Raft voters missing from gossip (plus the
// --join addresses), or nothing when every voter gossips.
func (m *membership) rejoinTargets(initial bool) []string {
	alive := map[string]bool{}
	for name := range m.gossip.snapshot() {
		alive[name] = true
	}
	missing := initial
	if !initial {
		if fut := m.config.GetConfiguration(); fut.Error() == nil {
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
	for _, a := range m.cfg.Join {
		set[a] = true
	}
	m.peersMu.Lock()
	for name, addr := range m.peers {
		if !alive[name] {
			set[addr] = true
		}
	}
	m.peersMu.Unlock()
	delete(set, m.cfg.GossipAddr)
	out := make([]string, 0, len(set))
	for a := range set {
		out = append(out, a)
	}
	slices.Sort(out)
	return out
}

// peersFile holds the gossip addresses of the sites this one has seen.
func (m *membership) peersFile() string {
	return filepath.Join(m.cfg.DataDir, "raft", "gossip-peers.json")
}

// loadPeers reads the remembered gossip addresses; a missing or unreadable
// file only costs the automatic rejoin, so it is logged, not fatal.
func (m *membership) loadPeers() {
	m.peers = map[string]string{}
	b, err := os.ReadFile(m.peersFile())
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			m.log.Warn("reading remembered gossip peers", "err", err)
		}
		return
	}
	if err := json.Unmarshal(b, &m.peers); err != nil {
		m.log.Warn("ignoring corrupt gossip peers file", "file", m.peersFile(), "err", err)
		m.peers = map[string]string{}
	}
}

// rememberPeers records the gossip address of every live member and saves
// the list when it changed (write to a temporary file, then rename).
func (m *membership) rememberPeers() {
	changed := false
	m.peersMu.Lock()
	defer m.peersMu.Unlock()
	for name, g := range m.gossip.snapshot() {
		if name == m.cfg.Name {
			continue
		}
		if m.peers[name] != g.Addr {
			m.peers[name] = g.Addr
			changed = true
		}
	}
	if !changed {
		return
	}
	b, err := json.MarshalIndent(m.peers, "", "  ")
	if err == nil {
		tmp := m.peersFile() + ".tmp"
		if err = os.WriteFile(tmp, b, 0o600); err == nil {
			err = os.Rename(tmp, m.peersFile())
		}
	}
	if err != nil {
		m.log.Warn("saving gossip peers", "err", err)
	}
}

// member is one gossiping site with its decoded metadata.
type member struct {
	Name string
	Meta siteMeta
}

// members lists the sites gossip currently knows as alive (or suspect).
func (m *membership) members() []member {
	var out []member
	for name, g := range m.gossip.snapshot() {
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
func (m *membership) memberMeta(name string) (siteMeta, bool) {
	if name == m.cfg.Name {
		return m.ownMeta(), true
	}
	for _, x := range m.members() {
		if x.Name == name {
			return x.Meta, true
		}
	}
	return siteMeta{}, false
}

// leave announces this site's departure to gossip.
func (m *membership) leave(timeout time.Duration) error { return m.ml.Leave(timeout) }

// shutdown stops gossip without announcing a leave.
func (m *membership) shutdown() {
	if m.ml == nil {
		return
	}
	if err := m.ml.Shutdown(); err != nil {
		m.log.Warn("gossip shutdown", "err", err)
	}
}
