package cluster

import (
	"context"
	"slices"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/hashicorp/raft"
)

// statsRaft is a statusRaft with fixed answers.
type statsRaft struct {
	servers []raft.Server
	stats   map[string]string
	applied uint64
}

func (r statsRaft) GetConfiguration() raft.ConfigurationFuture {
	return servedConfig{raft.Configuration{Servers: r.servers}}
}
func (r statsRaft) Stats() map[string]string { return r.stats }
func (r statsRaft) State() raft.RaftState    { return raft.Leader }
func (r statsRaft) AppliedIndex() uint64     { return r.applied }

type statusIDs struct{}

func (statusIDs) AppliedIndex() uint64 { return 90 }
func (statusIDs) ClusterID() string    { return "c1" }

// Status lists the voters and the gossiping sites, each from its own view
// when it answers, and says why when it does not.
func TestStatusCollectsEverySite(t *testing.T) {
	fresh := &atomic.Bool{}
	fresh.Store(true)
	members := fixedMembers{
		{Name: "a", Meta: siteMeta{Raft: "a:1", API: "a:api"}},
		{Name: "b", Meta: siteMeta{Raft: "b:1", API: "b:api", Cluster: "c1"}},
		{Name: "d", Meta: siteMeta{Raft: "d:1", API: "d:api"}},                // unreachable, not in Raft
		{Name: "e", Meta: siteMeta{Raft: "e:1", API: "e:api", Cluster: "c2"}}, // another cluster's
		{Name: "n", Meta: siteMeta{Raft: "n:1", API: "n:api"}},                // a non-voter, answering
	}
	r := &statusReporter{
		cfg: Config{Name: "a", RaftAddr: "a:1", APIAddr: "a:api"},
		raft: statsRaft{
			servers: []raft.Server{voter("a", "a:1"), voter("b", "b:7"), voter("c", "c:1"), nonvoter("n", "n:1")},
			stats:   map[string]string{"term": "3", "commit_index": "100", "last_log_index": "101"},
			applied: 99,
		},
		leader:  &fakeLeadership{leading: true, leaders: []string{"a"}},
		fsm:     statusIDs{},
		fresh:   fresh,
		members: members,
		rpc: statusBook{
			"b:api": {Name: "b", State: "Follower", AppliedIndex: 60, CommitIndex: 100},
			"e:api": {Name: "e", State: "Leader", CommitIndex: 5},
			"n:api": {Name: "n", State: "Follower", AppliedIndex: 100},
		},
	}
	st, err := r.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st.Leader != "a" || st.ClusterID != "c1" || st.CommitIndex != 100 {
		t.Fatalf("status %+v", st)
	}
	by := map[string]SiteStatus{}
	var order []string
	for _, s := range st.Sites {
		by[s.Name] = s
		order = append(order, s.Name)
	}
	if strings.Join(order, ",") != "a,b,c,d,e,n" {
		t.Fatalf("sites %v, want a..n sorted", order)
	}
	a := by["a"]
	if a.State != "Leader" || !a.Voter || a.Suffrage != "voter" || a.Term != 3 || a.AppliedIndex != 99 || a.FSMIndex != 90 || !a.Fresh || a.ClusterID != "c1" || a.Lag != 1 {
		t.Errorf("own view %+v", a)
	}
	if b := by["b"]; b.State != "Follower" || b.RaftAddr != "b:7" || b.Lag != 40 || b.Gossip != "alive" {
		t.Errorf("b %+v (the configuration's address, lag 40)", b)
	}
	if c := by["c"]; c.State != "unreachable" || c.Gossip != "gone" || !c.Voter || c.Error == "" {
		t.Errorf("c %+v, want an unreachable voter gone from gossip", c)
	}
	if d := by["d"]; d.State != "unreachable" || d.Suffrage != "" || d.Error == "" || d.Lag != 0 {
		t.Errorf("d %+v, want unreachable, not in the configuration", d)
	}
	if e := by["e"]; e.State != "refused" || !strings.Contains(e.Error, "c2") {
		t.Errorf("e %+v, want refused (cluster c2)", e)
	}
	if n := by["n"]; n.State != "Follower" || n.Suffrage != "non-voter" || n.Voter {
		t.Errorf("n %+v, want a non-voter", n)
	}
}

// A site with damaged blocks says so in its own status: which volumes,
// how many bytes, the first ranges, and what it read and repaired.
func TestLocalStatusShowsDegradedVolumes(t *testing.T) {
	s := newHealSites(t, 64<<10, "a")[0]
	s.vol.corrupt(5000, 10)
	s.vol.corrupt(20000, 10000)
	s.heal.remoteBytes.Store(123)
	s.heal.repairedBytes.Store(45)
	r := &statusReporter{cfg: Config{Name: "a"}, raft: statsRaft{stats: map[string]string{}}, leader: &fakeLeadership{leaders: []string{"a"}},
		fsm: statusIDs{}, fresh: &atomic.Bool{}, heal: s.heal}
	st := r.LocalStatus()
	if len(st.Degraded) != 1 || st.RemoteReadBytes != 123 || st.RepairedBytes != 45 {
		t.Fatalf("status %+v", st)
	}
	d := st.Degraded[0]
	want := []ByteRange{{Offset: 4096, Length: 4096}, {Offset: 16384, Length: 16384}}
	if d.Volume != "v" || d.DamagedBytes != 20480 || d.Ranges != 2 || !slices.Equal(d.First, want) {
		t.Fatalf("degraded %+v", d)
	}
	s.vol.corrupt(0, 1)
	s.heal.rebuildPass(testCtx(t)) // no peers: stays degraded
	if st := r.LocalStatus(); len(st.Degraded) != 1 {
		t.Fatalf("status %+v", st)
	}
}
