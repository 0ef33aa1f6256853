package cluster

import (
	"encoding/json"
	"errors"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/raft"
)

// fakeIDs is a fixed cluster ID.
type fakeIDs string

func (f fakeIDs) ClusterID() string { return string(f) }

// fakeConfig is a fixed Raft configuration of voters.
type fakeConfig []string

func (f fakeConfig) GetConfiguration() raft.ConfigurationFuture { return configFuture(f) }

type configFuture []string

func (f configFuture) Error() error  { return nil }
func (f configFuture) Index() uint64 { return 1 }
func (f configFuture) Configuration() raft.Configuration {
	var c raft.Configuration
	for _, id := range f {
		c.Servers = append(c.Servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(id), Address: raft.ServerAddress(id + ":1")})
	}
	return c
}

type notLeft struct{}

func (notLeft) hasLeft() bool { return false }

// newTestMembership is a membership without memberlist: the test plays
// memberlist's part by calling the delegate.
func newTestMembership(t *testing.T, ours string, voters ...string) *membership {
	t.Helper()
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "raft"), 0o700); err != nil {
		t.Fatal(err)
	}
	m := &membership{
		cfg:     Config{Name: "a", DataDir: dir, GossipAddr: "10.0.0.1:7946", RaftAddr: "a:1", APIAddr: "a:2", NBDAddr: "a:3", Join: []string{"10.0.0.9:7946"}},
		log:     slog.New(slog.DiscardHandler),
		ids:     fakeIDs(ours),
		fresh:   &atomic.Bool{},
		refused: &refusals{},
		config:  fakeConfig(voters),
		left:    notLeft{},
		events:  make(chan struct{}, 1),
	}
	m.gossip = &delegate{m: m, nodes: map[string]gossipNode{}}
	m.loadPeers()
	return m
}

func gossipPeer(t *testing.T, name, ip string, meta any) *memberlist.Node {
	t.Helper()
	var b []byte
	switch v := meta.(type) {
	case []byte:
		b = v
	default:
		var err error
		if b, err = json.Marshal(v); err != nil {
			t.Fatal(err)
		}
	}
	return &memberlist.Node{Name: name, Addr: net.ParseIP(ip), Port: 7946, Meta: b}
}

func names(ms []member) []string {
	var out []string
	for _, m := range ms {
		out = append(out, m.Name)
	}
	return out
}

func TestMembershipMemberTable(t *testing.T) {
	m := newTestMembership(t, "c1", "a", "b")
	d := m.gossip
	d.NotifyJoin(gossipPeer(t, "c", "10.0.0.3", siteMeta{Raft: "c:1", API: "c:2", Cluster: "c1"}))
	select {
	case <-m.events:
	default:
		t.Fatal("a join did not nudge the reconcile loop")
	}
	d.NotifyJoin(gossipPeer(t, "b", "10.0.0.2", siteMeta{Raft: "b:1", API: "b:2"}))
	d.NotifyJoin(gossipPeer(t, "garbage", "10.0.0.4", []byte("{not json")))
	d.NotifyJoin(gossipPeer(t, "no-raft", "10.0.0.5", siteMeta{API: "x:2"}))
	if got := names(m.members()); !slices.Equal(got, []string{"b", "c"}) {
		t.Fatalf("members %v, want [b c] (sorted, robib sites only)", got)
	}
	if meta, ok := m.memberMeta("c"); !ok || meta.API != "c:2" {
		t.Fatalf("memberMeta(c) = %+v, %v", meta, ok)
	}
	if _, ok := m.memberMeta("garbage"); ok {
		t.Fatal("a member with unreadable metadata has an address")
	}
	m.fresh.Store(true)
	if meta, ok := m.memberMeta("a"); !ok || meta != (siteMeta{Raft: "a:1", API: "a:2", NBD: "a:3", Cluster: "c1", Fresh: true}) {
		t.Fatalf("own metadata %+v, %v", meta, ok)
	}
	if got := m.refused.clusterOf("c"); got != "c1" {
		t.Fatalf("c advertised cluster %q, recorded %q", "c1", got)
	}
	d.NotifyUpdate(gossipPeer(t, "c", "10.0.0.3", siteMeta{Raft: "c:1", API: "c:9", Cluster: "c1"}))
	if meta, _ := m.memberMeta("c"); meta.API != "c:9" {
		t.Fatalf("after an update: %+v", meta)
	}
	d.NotifyLeave(gossipPeer(t, "c", "10.0.0.3", nil))
	if got := names(m.members()); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("members after c left: %v", got)
	}
	if _, ok := m.memberMeta("c"); ok {
		t.Fatal("a member that left still has an address")
	}
	// memberlist drops metadata over its limit.
	if d.NodeMeta(1) != nil {
		t.Fatal("metadata over the limit was handed to memberlist")
	}
	if b := d.NodeMeta(1 << 10); b != nil {
		t.Fatalf("no metadata was set, got %q", b)
	}
	if !d.setMeta([]byte("x")) || d.setMeta([]byte("x")) || string(d.NodeMeta(10)) != "x" {
		t.Fatal("setMeta reports a change only when the metadata changed")
	}
}

func TestMembershipRefusesForeignSites(t *testing.T) {
	m := newTestMembership(t, "c1")
	d := m.gossip
	for _, tc := range []struct {
		peer    *memberlist.Node
		refused bool
	}{
		{gossipPeer(t, "same", "10.0.0.2", siteMeta{Raft: "x:1", Cluster: "c1"}), false},
		{gossipPeer(t, "new", "10.0.0.3", siteMeta{Raft: "x:1"}), false},
		{gossipPeer(t, "other", "10.0.0.4", siteMeta{Raft: "x:1", Cluster: "c2"}), true},
		{gossipPeer(t, "a", "10.0.0.5", siteMeta{Raft: "x:1", Cluster: "c2"}), false}, // this site's own name
		{gossipPeer(t, "garbage", "10.0.0.6", []byte("\x00")), false},
	} {
		err := d.NotifyAlive(tc.peer)
		if got := errors.Is(err, ErrForeignCluster); got != tc.refused || (err != nil && !tc.refused) {
			t.Errorf("%s: NotifyAlive = %v, refused want %v", tc.peer.Name, err, tc.refused)
		}
	}
	// A merge checks (and remembers) every member, and fails on the first
	// foreign one.
	err := d.NotifyMerge([]*memberlist.Node{
		gossipPeer(t, "ok", "10.0.0.7", siteMeta{Raft: "x:1", Cluster: "c1"}),
		gossipPeer(t, "f1", "10.0.0.8", siteMeta{Raft: "x:1", Cluster: "c2"}),
		gossipPeer(t, "f2", "10.0.0.9", siteMeta{Raft: "x:1", Cluster: "c3"}),
	})
	if !errors.Is(err, ErrForeignCluster) || !strings.Contains(err.Error(), "f1") {
		t.Fatalf("merge with foreign members: %v, want ErrForeignCluster naming f1", err)
	}
	if got := m.refused.clusterOf("f2"); got != "c3" {
		t.Fatalf("the second foreign member was not remembered: %q", got)
	}
	// A site that knows no cluster ID yet refuses nobody.
	m2 := newTestMembership(t, "")
	if err := m2.gossip.NotifyAlive(gossipPeer(t, "other", "10.0.0.4", siteMeta{Raft: "x:1", Cluster: "c2"})); err != nil {
		t.Fatalf("a site without an ID refused %v", err)
	}
}

func TestMembershipRejoinTargets(t *testing.T) {
	m := newTestMembership(t, "c1", "a", "b", "c")
	m.peers = map[string]string{"b": "10.0.0.2:7946", "c": "10.0.0.3:7946", "gone": "10.0.0.1:7946"} // "gone" reuses our address
	m.gossip.NotifyJoin(gossipPeer(t, "a", "10.0.0.1", siteMeta{Raft: "a:1"}))
	m.gossip.NotifyJoin(gossipPeer(t, "b", "10.0.0.2", siteMeta{Raft: "b:1"}))
	want := []string{"10.0.0.3:7946", "10.0.0.9:7946"} // c's remembered address and --join; never our own
	if got := m.rejoinTargets(true); !slices.Equal(got, want) {
		t.Fatalf("initial targets %v, want %v", got, want)
	}
	if got := m.rejoinTargets(false); !slices.Equal(got, want) {
		t.Fatalf("targets with voter c missing %v, want %v", got, want)
	}
	m.gossip.NotifyJoin(gossipPeer(t, "c", "10.0.0.3", siteMeta{Raft: "c:1"}))
	if got := m.rejoinTargets(false); got != nil {
		t.Fatalf("targets with every voter gossiping: %v, want none", got)
	}
}

func TestMembershipRemembersPeers(t *testing.T) {
	m := newTestMembership(t, "c1")
	m.gossip.NotifyJoin(gossipPeer(t, "a", "10.0.0.1", siteMeta{Raft: "a:1"})) // itself: not remembered
	m.gossip.NotifyJoin(gossipPeer(t, "b", "10.0.0.2", siteMeta{Raft: "b:1"}))
	m.gossip.NotifyJoin(gossipPeer(t, "c", "10.0.0.3", siteMeta{Raft: "c:1"}))
	m.rememberPeers()
	want := map[string]string{"b": "10.0.0.2:7946", "c": "10.0.0.3:7946"}
	again := &membership{cfg: m.cfg, log: m.log}
	again.loadPeers()
	if !maps.Equal(again.peers, want) {
		t.Fatalf("peers read back %v, want %v", again.peers, want)
	}
	// A peer that left gossip is still remembered (that is the point).
	m.gossip.NotifyLeave(gossipPeer(t, "c", "10.0.0.3", nil))
	m.rememberPeers()
	again.loadPeers()
	if !maps.Equal(again.peers, want) {
		t.Fatalf("after c left: %v, want %v", again.peers, want)
	}
	// A corrupt file costs only the automatic rejoin.
	if err := os.WriteFile(m.peersFile(), []byte("{corrupt"), 0o600); err != nil {
		t.Fatal(err)
	}
	again.loadPeers()
	if len(again.peers) != 0 {
		t.Fatalf("corrupt peers file read as %v", again.peers)
	}
	if err := os.Remove(m.peersFile()); err != nil {
		t.Fatal(err)
	}
	again.loadPeers()
	if again.peers == nil || len(again.peers) != 0 {
		t.Fatalf("missing peers file read as %v", again.peers)
	}
}
