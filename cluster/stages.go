package cluster

import (
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// Where a write's time goes: Stages keeps the newest durations of each stage
// of the write path at this site, so `robib volume stats` and `cluster
// status` can show p50/p99 per stage. The stages, in the order a forwarded
// write+flush meets them:
//
//	nbd.recv        the NBD server reads a request's payload (nbdfront)
//	nbd.queue       ... hands it to a worker
//	nbd.write       the device's WriteAt (buffering in dcd)
//	nbd.flush       the device's Flush: waiting for the commit of what it covers
//	                (`robib volume stats` also shows the write-back stage's
//	                own commit latency: one Commit call, propose or forward)
//	forward         a forwarded proposal's round trip minus the leader's time
//	leader.propose  on the leader: sequencer, Raft append, commit, FSM apply
//	leader.store    on the leader: the log store's durable append (or, with
//	                the append overlapping replication, leader.write and,
//	                in the background, leader.sync)
//	replicate       on the leader: an AppendEntries round trip with entries
//	follower.store  on a follower: the log store's durable append
//	fsm.apply       applying one entry to the state machine
//	nbd.reply       the NBD server writes the reply
//
// The NBD stages (also nbd.read, nbd.trim, ... for the other commands) are
// recorded by the agent, which wires nbdfront; the others by this package. Recording costs a mutex and a slot
// write; the rings hold stageWindow durations each.
type Stages struct {
	mu    sync.Mutex
	rings map[string]*stageRing
}

// StageLatency is one stage's percentiles over its newest durations.
type StageLatency struct {
	Stage string        `json:"stage"`
	Count uint64        `json:"count"` // durations recorded since start (NBD stages but nbd.flush: one request in 16)
	P50   time.Duration `json:"p50_ns"`
	P99   time.Duration `json:"p99_ns"`
}

// StageOrder is the order stages are shown in.
var StageOrder = []string{
	"nbd.recv", "nbd.queue", "nbd.write", "nbd.flush", "forward",
	"leader.propose", "leader.store", "leader.write", "leader.sync", "replicate", "follower.store", "fsm.apply", "nbd.reply",
}

const stageWindow = 1024

type stageRing struct {
	d     [stageWindow]time.Duration
	next  int
	n     int
	total uint64
}

// NewStages returns an empty recorder.
func NewStages() *Stages { return &Stages{rings: map[string]*stageRing{}} }

// Record adds one duration of stage. A nil *Stages records nothing.
func (s *Stages) Record(stage string, d time.Duration) {
	if s == nil {
		return
	}
	s.mu.Lock()
	r := s.rings[stage]
	if r == nil {
		r = &stageRing{}
		s.rings[stage] = r
	}
	r.d[r.next] = d
	r.next = (r.next + 1) % stageWindow
	r.n = min(r.n+1, stageWindow)
	r.total++
	s.mu.Unlock()
}

// Snapshot returns the percentiles of every stage recorded so far, in
// StageOrder (stages not listed there last, by name).
func (s *Stages) Snapshot() []StageLatency {
	if s == nil {
		return nil
	}
	type copied struct {
		ds    []time.Duration
		total uint64
	}
	s.mu.Lock()
	all := make(map[string]copied, len(s.rings))
	for name, r := range s.rings {
		all[name] = copied{slices.Clone(r.d[:r.n]), r.total}
	}
	s.mu.Unlock()
	names := make([]string, 0, len(all))
	for name := range all {
		names = append(names, name)
	}
	rank := func(name string) int {
		if i := slices.Index(StageOrder, name); i >= 0 {
			return i
		}
		return len(StageOrder)
	}
	slices.SortFunc(names, func(a, b string) int {
		if ra, rb := rank(a), rank(b); ra != rb {
			return ra - rb
		}
		if a < b {
			return -1
		}
		return 1
	})
	out := make([]StageLatency, 0, len(names))
	for _, name := range names {
		c := all[name]
		slices.Sort(c.ds)
		out = append(out, StageLatency{Stage: name, Count: c.total, P50: quantile(c.ds, 0.50), P99: quantile(c.ds, 0.99)})
	}
	return out
}

// quantile is the nearest-rank q-quantile of sorted ds (0 when empty).
func quantile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	i := int(q*float64(len(ds))+0.5) - 1
	return ds[min(max(i, 0), len(ds)-1)]
}

// timedLogStore records the durable appends of the Raft log store, as
// leader.store or follower.store by the site's Raft state at the time
// (Raft's main goroutine both changes the state and calls StoreLogs, so the
// two agree).
type timedLogStore struct {
	raft.LogStore
	stages *Stages
	state  func() raft.RaftState
}

func (t *timedLogStore) StoreLogs(logs []*raft.Log) error {
	start := time.Now()
	err := t.LogStore.StoreLogs(logs)
	stage := "follower.store"
	if t.state() == raft.Leader {
		stage = "leader.store"
	}
	t.stages.Record(stage, time.Since(start))
	return err
}

func (t *timedLogStore) StoreLog(l *raft.Log) error { return t.StoreLogs([]*raft.Log{l}) }

// IsMonotonic forwards the wrapped store's answer (raft-wal is monotonic;
// raft refuses to truncate the tail of a monotonic store out of order).
func (t *timedLogStore) IsMonotonic() bool {
	m, ok := t.LogStore.(raft.MonotonicLogStore)
	return ok && m.IsMonotonic()
}

// timedFSM records fsm.apply around the state machine's Apply.
type timedFSM struct {
	raft.FSM
	stages *Stages
}

func (f timedFSM) Apply(l *raft.Log) interface{} {
	start := time.Now()
	res := f.FSM.Apply(l)
	f.stages.Record("fsm.apply", time.Since(start))
	return res
}

// timedTransport records replicate: the round trip of every AppendEntries
// that carries entries, sent directly or pipelined.
type timedTransport struct {
	guardedTransport
	stages *Stages
}

func (t *timedTransport) AppendEntries(id raft.ServerID, target raft.ServerAddress, args *raft.AppendEntriesRequest, resp *raft.AppendEntriesResponse) error {
	start := time.Now()
	err := t.guardedTransport.AppendEntries(id, target, args, resp)
	if err == nil && len(args.Entries) > 0 {
		t.stages.Record("replicate", time.Since(start))
	}
	return err
}

func (t *timedTransport) AppendEntriesPipeline(id raft.ServerID, target raft.ServerAddress) (raft.AppendPipeline, error) {
	p, err := t.guardedTransport.AppendEntriesPipeline(id, target)
	if err != nil {
		return nil, err
	}
	// AppendFuture.Start is when the request was sent.
	return newRelayPipeline(p, func(f raft.AppendFuture) bool {
		if f.Error() == nil && len(f.Request().Entries) > 0 {
			t.stages.Record("replicate", time.Since(f.Start()))
		}
		return true
	}), nil
}
