package cluster

import (
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// slowSyncStore is an in-memory DeferredSyncStore whose Sync takes a while
// and which knows which indexes are durable.
type slowSyncStore struct {
	*raft.InmemStore
	delay   time.Duration
	mu      sync.Mutex
	written uint64
	durable uint64
	syncs   atomic.Int64
}

func (s *slowSyncStore) StoreLogsNoSync(logs []*raft.Log) error {
	if err := s.InmemStore.StoreLogs(logs); err != nil {
		return err
	}
	s.mu.Lock()
	s.written = max(s.written, logs[len(logs)-1].Index)
	s.mu.Unlock()
	return nil
}

func (s *slowSyncStore) StoreLogs(logs []*raft.Log) error {
	if err := s.StoreLogsNoSync(logs); err != nil {
		return err
	}
	return s.Sync()
}

func (s *slowSyncStore) Sync() error {
	s.mu.Lock()
	target := s.written
	s.mu.Unlock()
	time.Sleep(s.delay)
	s.syncs.Add(1)
	s.mu.Lock()
	s.durable = max(s.durable, target)
	s.mu.Unlock()
	return nil
}

func (s *slowSyncStore) isDurable(index uint64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return index <= s.durable
}

// durableCheckFSM fails the test if an entry is applied (so: committed)
// while this site's copy of it is not durable.
type durableCheckFSM struct {
	store      *slowSyncStore
	applied    atomic.Uint64
	violations atomic.Int64
}

func (f *durableCheckFSM) Apply(l *raft.Log) interface{} {
	if !f.store.isDurable(l.Index) {
		f.violations.Add(1)
	}
	f.applied.Store(l.Index)
	return nil
}
func (f *durableCheckFSM) Snapshot() (raft.FSMSnapshot, error) {
	return nil, fmt.Errorf("no snapshots")
}
func (f *durableCheckFSM) Restore(io.ReadCloser) error { return fmt.Errorf("no snapshots") }

// TestLeaderSyncNeverCommitsAnUnsyncedLeaderCopy: three sites on Raft's
// in-memory transport, every log store's Sync slow (20 ms). With the
// leader's append overlapping replication, no entry may be applied
// anywhere (so: committed) while the applying site's copy, the leader's
// included, is not durable; and the leader must really have synced in the
// background (the overlap is on).
func TestLeaderSyncNeverCommitsAnUnsyncedLeaderCopy(t *testing.T) {
	const n = 3
	var (
		trans  [n]*raft.InmemTransport
		addrs  [n]raft.ServerAddress
		rafts  [n]*raft.Raft
		stores [n]*slowSyncStore
		syncs  [n]*leaderSync
		fsms   [n]*durableCheckFSM
	)
	for i := range trans {
		addrs[i], trans[i] = raft.NewInmemTransport("")
	}
	for i := range trans {
		for j := range trans {
			if i != j {
				trans[i].Connect(addrs[j], trans[j])
			}
		}
	}
	var servers []raft.Server
	for i := range trans {
		servers = append(servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(fmt.Sprint("s", i)), Address: addrs[i]})
	}
	var fatal atomic.Value
	for i := range trans {
		stores[i] = &slowSyncStore{InmemStore: raft.NewInmemStore(), delay: 20 * time.Millisecond}
		fsms[i] = &durableCheckFSM{store: stores[i]}
		var running atomic.Pointer[raft.Raft]
		state := func() raft.RaftState {
			if r := running.Load(); r != nil {
				return r.State()
			}
			return raft.Follower
		}
		voters := func() int {
			if r := running.Load(); r != nil {
				return countVoters(r)
			}
			return 0
		}
		syncs[i] = newLeaderSync(stores[i], state, voters, func(f string, a ...any) { fatal.Store(fmt.Sprintf(f, a...)) }, nil)
		cfg := raft.DefaultConfig()
		cfg.LocalID = servers[i].ID
		cfg.HeartbeatTimeout, cfg.ElectionTimeout, cfg.LeaderLeaseTimeout = 500*time.Millisecond, 500*time.Millisecond, 250*time.Millisecond
		cfg.CommitTimeout = 5 * time.Millisecond
		cfg.LogLevel = "error"
		tr := &syncedTransport{guardedTransport: trans[i], sync: syncs[i]}
		r, err := raft.NewRaft(cfg, fsms[i], syncs[i], raft.NewInmemStore(), raft.NewInmemSnapshotStore(), tr)
		if err != nil {
			t.Fatal(err)
		}
		running.Store(r)
		rafts[i] = r
	}
	defer func() {
		for i := range rafts {
			rafts[i].Shutdown().Error()
			syncs[i].Close()
		}
	}()
	if err := rafts[0].BootstrapCluster(raft.Configuration{Servers: servers}).Error(); err != nil {
		t.Fatal(err)
	}
	var leader *raft.Raft
	var li int
	deadline := time.Now().Add(10 * time.Second)
	for leader == nil && time.Now().Before(deadline) {
		for i, r := range rafts {
			if r.State() == raft.Leader {
				leader, li = r, i
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	if leader == nil {
		t.Fatal("no leader")
	}
	before := stores[li].syncs.Load()
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ { // concurrent proposals: batches in flight
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := 0; k < 20; k++ {
				if err := leader.Apply([]byte("x"), 5*time.Second).Error(); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if v, ok := fatal.Load().(string); ok {
		t.Fatal(v)
	}
	for i, f := range fsms {
		if v := f.violations.Load(); v > 0 {
			t.Errorf("site %d applied %d entries before its copy was durable", i, v)
		}
	}
	if fsms[li].applied.Load() < 160 {
		t.Fatalf("leader applied up to %d, want the 160 proposals", fsms[li].applied.Load())
	}
	if stores[li].syncs.Load() == before {
		t.Fatal("the leader never synced in the background: the overlap was off")
	}
}
