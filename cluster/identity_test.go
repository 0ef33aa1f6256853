package cluster

import (
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

// countFSM counts applied commands.
type countFSM struct {
	mu sync.Mutex
	n  int
}

func (f *countFSM) Apply(*raft.Log) interface{} { f.mu.Lock(); f.n++; f.mu.Unlock(); return nil }
func (f *countFSM) Snapshot() (raft.FSMSnapshot, error) {
	return nil, fmt.Errorf("no snapshots in this test")
}
func (f *countFSM) Restore(io.ReadCloser) error { return nil }

// memSite is one in-memory Raft server for the vote-guard tests.
type memSite struct {
	id    raft.ServerID
	addr  raft.ServerAddress
	trans *raft.InmemTransport
	guard *voteGuard // nil: unguarded
	fresh atomic.Bool
	raft  *raft.Raft
}

func startMemSite(t *testing.T, id string, addr raft.ServerAddress, guarded, fresh bool) *memSite {
	return startGuardedMemSite(t, id, addr, guarded, fresh, nil)
}

func startGuardedMemSite(t *testing.T, id string, addr raft.ServerAddress, guarded, fresh bool, foreign func(string) bool) *memSite {
	t.Helper()
	s := &memSite{id: raft.ServerID(id)}
	s.addr, s.trans = raft.NewInmemTransportWithTimeout(addr, 200*time.Millisecond)
	var tr raft.Transport = s.trans
	if guarded {
		s.fresh.Store(fresh)
		s.guard = newVoteGuard(s.trans, &s.fresh, foreign, slog.New(slog.DiscardHandler))
		tr = s.guard
	}
	c := raft.DefaultConfig()
	c.LocalID = s.id
	c.HeartbeatTimeout = 50 * time.Millisecond
	c.ElectionTimeout = 50 * time.Millisecond
	c.LeaderLeaseTimeout = 50 * time.Millisecond
	c.CommitTimeout = 5 * time.Millisecond
	c.Logger = hclog.New(&hclog.LoggerOptions{Name: id, Level: hclog.Off})
	store := raft.NewInmemStore()
	r, err := raft.NewRaft(c, &countFSM{}, store, store, raft.NewInmemSnapshotStore(), tr)
	if err != nil {
		t.Fatal(err)
	}
	s.raft = r
	t.Cleanup(func() {
		_ = r.Shutdown().Error()
		if s.guard != nil {
			s.guard.Close()
		}
	})
	return s
}

func connect(sites ...*memSite) {
	for _, a := range sites {
		for _, b := range sites {
			if a != b {
				a.trans.Connect(b.addr, b.trans)
			}
		}
	}
}

func isolate(s *memSite, others ...*memSite) {
	s.trans.DisconnectAll()
	for _, o := range others {
		o.trans.Disconnect(s.addr)
	}
}

func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// wipedSiteScenario builds the defect of issue 11: a, b, c; b is cut off
// while entries commit on a and c; c's data directory is wiped and c
// restarts under its name (guarded or not); then a is cut off, leaving b
// (stale log) and the wiped c. It returns b, the new c and a, and the
// number of entries committed on a and c that b lacks.
func wipedSiteScenario(t *testing.T, guarded bool) (b, c2, a *memSite, missing uint64) {
	a = startMemSite(t, "a", "a", false, false)
	b = startMemSite(t, "b", "b", false, false)
	c := startMemSite(t, "c", "c", false, false)
	connect(a, b, c)
	cfg := raft.Configuration{Servers: []raft.Server{
		{Suffrage: raft.Voter, ID: a.id, Address: a.addr},
		{Suffrage: raft.Voter, ID: b.id, Address: b.addr},
		{Suffrage: raft.Voter, ID: c.id, Address: c.addr},
	}}
	if err := a.raft.BootstrapCluster(cfg).Error(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "a to lead", func() bool { return a.raft.State() == raft.Leader })
	if err := a.raft.Apply([]byte("1"), time.Second).Error(); err != nil {
		t.Fatal(err)
	}
	if err := a.raft.Barrier(time.Second).Error(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "b to have the first entry", func() bool { return b.raft.LastIndex() >= a.raft.LastIndex() })
	isolate(b, a, c)
	for i := range 10 {
		if err := a.raft.Apply([]byte(fmt.Sprint(i)), time.Second).Error(); err != nil {
			t.Fatalf("committing on a and c: %v", err)
		}
	}
	missing = a.raft.LastIndex() - b.raft.LastIndex()
	if missing < 10 {
		t.Fatalf("b lacks only %d entries", missing)
	}
	// c's data directory is wiped: it restarts with nothing, under its name
	// and address.
	if err := c.raft.Shutdown().Error(); err != nil {
		t.Fatal(err)
	}
	isolate(c, a, b)
	c2 = startMemSite(t, "c", "c", guarded, true)
	connect(a, b, c2)
	// a, the only site with every committed entry, goes away.
	isolate(a, b, c2)
	return b, c2, a, missing
}

// TestWipedSiteWithoutGuardLosesCommittedEntries shows the defect the
// vote guard fixes: without it the wiped site grants its vote (an empty
// configuration grants every vote) and b, missing committed entries,
// becomes leader.
func TestWipedSiteWithoutGuardLosesCommittedEntries(t *testing.T) {
	b, _, _, missing := wipedSiteScenario(t, false)
	waitUntil(t, 10*time.Second, "b to be elected with the wiped site's vote", func() bool { return b.raft.State() == raft.Leader })
	t.Logf("b leads while missing %d committed entries: the defect", missing)
}

// TestFreshSiteGrantsNoVote: with the guard, the wiped (fresh) site
// refuses every vote, so b cannot be elected without a; once a is back,
// the leader has every committed entry.
func TestFreshSiteGrantsNoVote(t *testing.T) {
	b, c2, a, _ := wipedSiteScenario(t, true)
	want := a.raft.LastIndex()
	// b campaigns again and again; each attempt is refused by the guard.
	waitUntil(t, 10*time.Second, "the fresh site to refuse 5 election requests", func() bool { return c2.guard.refusals.Load() >= 5 })
	if b.raft.State() == raft.Leader || c2.raft.State() == raft.Leader {
		t.Fatalf("a leader was elected with a fresh site's vote (b %v, c %v)", b.raft.State(), c2.raft.State())
	}
	connect(a, b, c2)
	waitUntil(t, 10*time.Second, "a leader with every committed entry", func() bool {
		for _, s := range []*memSite{a, b} {
			if s.raft.State() == raft.Leader {
				return true
			}
		}
		return false
	})
	for _, s := range []*memSite{a, b, c2} {
		if s.raft.State() == raft.Leader && s.raft.LastIndex() < want {
			t.Fatalf("leader %s has %d entries, %d were committed", s.id, s.raft.LastIndex(), want)
		}
	}
	// The fresh site catches up; it still never campaigns or votes.
	waitUntil(t, 10*time.Second, "the fresh site to catch up", func() bool { return c2.raft.LastIndex() >= want })
}

// TestFreshSiteNeverCampaigns: a fresh site listed as a voter (it has the
// configuration from the leader's log) asks nobody for a vote, so its own
// vote for itself is never counted with another site's; once it is not
// fresh, it campaigns normally.
func TestFreshSiteNeverCampaigns(t *testing.T) {
	a := startMemSite(t, "a", "a", false, false)
	c := startMemSite(t, "c", "c", true, true)
	connect(a, c)
	cfg := raft.Configuration{Servers: []raft.Server{
		{Suffrage: raft.Voter, ID: a.id, Address: a.addr},
		{Suffrage: raft.Voter, ID: c.id, Address: c.addr},
	}}
	// Both hold the configuration (c as if it had received it from a
	// leader's log), so both campaign.
	for _, s := range []*memSite{a, c} {
		if err := s.raft.BootstrapCluster(cfg).Error(); err != nil {
			t.Fatal(err)
		}
	}
	// c refuses a's requests and sends none of its own, so neither (each
	// needing 2 of 2) can be elected.
	waitUntil(t, 10*time.Second, "the fresh site to refuse a's requests and suppress its own", func() bool {
		return c.guard.refusals.Load() >= 3 && c.guard.suppressed.Load() >= 3
	})
	if a.raft.State() == raft.Leader || c.raft.State() == raft.Leader {
		t.Fatalf("a leader was elected with the fresh site's vote (a %v, c %v)", a.raft.State(), c.raft.State())
	}
	c.fresh.Store(false)
	waitUntil(t, 10*time.Second, "a leader once c is no longer fresh", func() bool {
		return a.raft.State() == raft.Leader || c.raft.State() == raft.Leader
	})
}

// TestForeignLeaderLogIsRefused: a site that knows the leader to be of
// another cluster (gossip showed its cluster ID) refuses its log and its
// heartbeats; once the leader is not foreign any more, replication works.
func TestForeignLeaderLogIsRefused(t *testing.T) {
	var isForeign atomic.Bool
	isForeign.Store(true)
	a := startMemSite(t, "a", "a", false, false)
	c := startGuardedMemSite(t, "c", "c", true, false, func(id string) bool { return id == "a" && isForeign.Load() })
	connect(a, c)
	if err := a.raft.BootstrapCluster(raft.Configuration{Servers: []raft.Server{{Suffrage: raft.Voter, ID: a.id, Address: a.addr}}}).Error(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "a to lead", func() bool { return a.raft.State() == raft.Leader })
	if err := a.raft.AddNonvoter(c.id, c.addr, 0, time.Second).Error(); err != nil {
		t.Fatal(err)
	}
	if err := a.raft.Apply([]byte("x"), time.Second).Error(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "c to refuse the foreign leader's replication", func() bool { return c.guard.foreignRefusals.Load() >= 3 })
	if n := c.raft.LastIndex(); n != 0 {
		t.Fatalf("c took %d entries from a foreign leader", n)
	}
	isForeign.Store(false)
	waitUntil(t, 10*time.Second, "c to replicate once the leader is not foreign", func() bool { return c.raft.LastIndex() >= a.raft.LastIndex() })
}
