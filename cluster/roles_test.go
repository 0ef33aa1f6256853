package cluster

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"

	"github.com/robib/robib/fsm"
	"github.com/robib/robib/volume"
)

// Test harness for the roles: real Raft servers on Raft's in-memory
// transport, each over a real fsm.FSM, with the roles wired as Node wires
// them, and the internal endpoints served over loopback HTTP so forwards
// take the real wire path.

// countingFSM wraps the FSM and counts, per entry payload, how many log
// entries carrying it were applied and how many took effect (neither a
// verdict nor a duplicate).
type countingFSM struct {
	*fsm.FSM
	mu        sync.Mutex
	copies    map[string]int
	effective map[string]int
}

func (c *countingFSM) Apply(l *raft.Log) interface{} {
	out := c.FSM.Apply(l)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.copies[string(l.Data)]++
	if res, ok := out.(*fsm.Result); ok && res.Err == nil && !res.Duplicate {
		c.effective[string(l.Data)]++
	}
	return out
}

func (c *countingFSM) counts(data []byte) (copies, effective int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.copies[string(data)], c.effective[string(data)]
}

// manualClock is a clock the test steps (lease timing).
type manualClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *manualClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *manualClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// roleSite is one site of a roleCluster.
type roleSite struct {
	name   string
	addr   raft.ServerAddress
	trans  *raft.InmemTransport
	raft   *raft.Raft
	fsm    *countingFSM
	store  *volume.Store
	watch  *leaderWatch
	prop   *proposer
	leases *leaseArbiter
	heal   *healer
	verify *verifier
	repair *repairer
	api    string // host:port of its internal endpoints
}

// roleCluster is a few roleSites; book resolves a site's API address.
type roleCluster struct {
	t     testing.TB
	sites map[string]*roleSite
	order []*roleSite
	clock *manualClock
	stop  chan struct{}
	wg    sync.WaitGroup
}

// memberMeta is the cluster's address book (addressBook).
func (c *roleCluster) memberMeta(site string) (siteMeta, bool) {
	s, ok := c.sites[site]
	if !ok {
		return siteMeta{}, false
	}
	return siteMeta{Raft: string(s.addr), API: s.api}, true
}

const testLeaseTTL = time.Second

// newRoleCluster starts len(names) bootstrapped voters and waits for a
// leader.
func newRoleCluster(t testing.TB, names ...string) *roleCluster {
	t.Helper()
	c := &roleCluster{t: t, sites: map[string]*roleSite{}, clock: &manualClock{now: time.Unix(1_000_000, 0)}, stop: make(chan struct{})}
	log := slog.New(slog.DiscardHandler)
	var servers []raft.Server
	for _, name := range names {
		s := &roleSite{name: name}
		s.addr, s.trans = raft.NewInmemTransportWithTimeout(raft.ServerAddress(name), 500*time.Millisecond)
		dir := t.TempDir()
		st, err := volume.Open(filepath.Join(dir, "volumes"), log)
		if err != nil {
			t.Fatal(err)
		}
		f, err := fsm.New(st, filepath.Join(dir, "state"), fsm.Options{Logger: log})
		if err != nil {
			t.Fatal(err)
		}
		s.store = st
		s.fsm = &countingFSM{FSM: f, copies: map[string]int{}, effective: map[string]int{}}
		rc := raft.DefaultConfig()
		rc.LocalID = raft.ServerID(name)
		rc.HeartbeatTimeout = 100 * time.Millisecond
		rc.ElectionTimeout = 100 * time.Millisecond
		rc.LeaderLeaseTimeout = 100 * time.Millisecond
		rc.CommitTimeout = 5 * time.Millisecond
		rc.SnapshotThreshold = 1 << 20
		rc.Logger = hclog.New(&hclog.LoggerOptions{Name: name, Level: hclog.Off, Output: io.Discard})
		mem := raft.NewInmemStore()
		r, err := raft.NewRaft(rc, s.fsm, mem, mem, raft.NewInmemSnapshotStore(), s.trans)
		if err != nil {
			t.Fatal(err)
		}
		s.raft = r
		servers = append(servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(name), Address: s.addr})
		c.sites[name] = s
		c.order = append(c.order, s)
	}
	c.heal()
	for _, s := range c.order {
		c.wire(s, log)
	}
	if err := c.order[0].raft.BootstrapCluster(raft.Configuration{Servers: servers}).Error(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		close(c.stop)
		c.wg.Wait()
		for _, s := range c.order {
			_ = s.raft.Shutdown().Error()
			_ = s.fsm.Close()
			s.store.Close()
		}
	})
	c.leader()
	return c
}

// wire builds s's roles as Node.wire does and serves its endpoints.
func (c *roleCluster) wire(s *roleSite, log *slog.Logger) {
	srv := httptest.NewServer(nil)
	c.t.Cleanup(srv.Close)
	s.api = srv.Listener.Addr().String()
	rpc := &rpcClient{http: srv.Client()}
	lead := raftLeader{s.raft}
	s.watch = newLeaderWatch()
	s.watch.run(s.raft, c.stop, &c.wg)
	s.prop = &proposer{self: s.name, log: log, raft: s.raft, leader: lead, book: c, changes: s.watch,
		fwd: rpc, applied: s.fsm, stop: c.stop, seq: newSequencer(500 * time.Millisecond)}
	s.leases = &leaseArbiter{self: s.name, ttl: testLeaseTTL, log: log, raft: s.raft, state: s.fsm, prop: s.prop,
		leader: lead, book: c, rpc: rpc, stop: c.stop, now: c.clock.Now}
	s.verify = &verifier{self: s.name, prop: s.prop, config: s.raft, fsm: s.fsm, book: c, rpc: rpc}
	s.heal = &healer{self: s.name, log: log, fsm: s.fsm, vols: storeVolumes{s.store},
		sources: voterSources{self: s.name, config: s.raft, leader: lead, book: c}, rpc: rpc,
		interval: DefaultRebuildInterval, stop: c.stop, kick: make(chan struct{}, 1),
		readSlots: make(chan struct{}, peerReadSlots), catchUp: peerCatchUpWait}
	s.repair = &repairer{self: s.name, log: log, verify: s.verify, heal: s.heal, book: c, rpc: rpc}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+pathVerify+"{id}", s.verify.handleVerify)
	mux.HandleFunc("GET "+pathRead, s.heal.handleRead)
	mux.HandleFunc("POST "+pathRepair, s.heal.handleRepair)
	mux.HandleFunc("POST "+pathApply, s.prop.handleApply)
	mux.HandleFunc("POST "+pathLeaseAcquire, s.leases.handleLease)
	mux.HandleFunc("POST "+pathLeaseRenew, s.leases.handleLease)
	mux.HandleFunc("POST "+pathReadIndex, s.leases.handleLease)
	srv.Config.Handler = mux
}

// heal connects every pair of sites.
func (c *roleCluster) heal() {
	for _, a := range c.order {
		for _, b := range c.order {
			if a != b {
				a.trans.Connect(b.addr, b.trans)
			}
		}
	}
}

// isolate cuts s off from every other site (Raft traffic only).
func (c *roleCluster) isolate(s *roleSite) {
	s.trans.DisconnectAll()
	for _, o := range c.order {
		if o != s {
			o.trans.Disconnect(s.addr)
		}
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// leader waits until exactly one site leads and every other site knows it.
func (c *roleCluster) leader(among ...*roleSite) *roleSite {
	c.t.Helper()
	if len(among) == 0 {
		among = c.order
	}
	var l *roleSite
	waitFor(c.t, "a leader known to every site", 10*time.Second, func() bool {
		l = nil
		for _, s := range among {
			if s.raft.State() == raft.Leader {
				if l != nil {
					return false
				}
				l = s
			}
		}
		if l == nil {
			return false
		}
		for _, s := range among {
			if _, id := s.raft.LeaderWithID(); string(id) != l.name {
				return false
			}
		}
		return true
	})
	return l
}

// follower returns a site other than l.
func (c *roleCluster) follower(l *roleSite) *roleSite {
	for _, s := range c.order {
		if s != l {
			return s
		}
	}
	c.t.Fatal("no follower")
	return nil
}

// waitApplied waits until every site applied index.
func (c *roleCluster) waitApplied(index uint64) {
	c.t.Helper()
	for _, s := range c.order {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := s.fsm.WaitApplied(ctx, index)
		cancel()
		if err != nil {
			c.t.Fatalf("site %s did not apply %d: %v", s.name, index, err)
		}
	}
}

const testVolume = "vol"

// createVolume creates testVolume through the leader and returns its
// incarnation stamp.
func (c *roleCluster) createVolume() int64 {
	c.t.Helper()
	created := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC).UnixNano()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := c.leader().prop.ApplyAndWait(ctx, &fsm.CreateVolume{Name: testVolume, Size: 1 << 20, Created: created})
	if err != nil {
		c.t.Fatal(err)
	}
	c.waitApplied(res.Index)
	return created
}

// freePort is an address nothing listens on.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}
