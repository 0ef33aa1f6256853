package cluster

import (
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// DeferredSyncStore is a Raft log store that can append without waiting for
// the data to be durable, and make everything appended so far durable later
// (the DCD log, cluster/dcdlog). StoreLogs on it is both at once.
type DeferredSyncStore interface {
	raft.LogStore
	// StoreLogsNoSync appends like StoreLogs, but returns before the
	// entries are durable. They are readable at once.
	StoreLogsNoSync(logs []*raft.Log) error
	// Sync makes every entry appended so far durable.
	Sync() error
}

// leaderSync lets the leader's durable append overlap with replication,
// without ever counting a copy that is not durable (see DESIGN.md,
// "Overlapping the leader's append with replication").
//
// hashicorp/raft counts the leader's own copy of new entries as soon as
// StoreLogs returns, then sends them to the followers. With leaderSync the
// leader's StoreLogs only writes (StoreLogsNoSync) and a background
// goroutine syncs; the transport (syncedTransport) holds every follower's
// successful answer to an AppendEntries until the leader's durable index
// covers that request's entries. A commit needs a majority of voters and,
// with two voters or more, at least one follower's answer: by the time Raft
// sees it, the leader's copy is durable too, and the follower's was before
// it answered. With one voter the leader's copy is the majority: StoreLogs
// then syncs before it returns. A follower always syncs before it returns
// (it answers the leader right after). A failed sync is fatal: the leader
// may have counted itself already, so the process must not go on.
type leaderSync struct {
	inner  DeferredSyncStore
	state  func() raft.RaftState
	voters func() int                       // voters in the latest configuration (0: unknown)
	fatal  func(format string, args ...any) // a sync failed: stop the process
	stages *Stages

	mu      sync.Mutex
	synced  sync.Cond // durable or failed changed
	kick    sync.Cond // written changed, or closing
	written uint64    // last index appended (durable or not)
	durable uint64    // every index <= durable is durable
	failed  error
	closed  bool
	done    chan struct{}
}

func newLeaderSync(inner DeferredSyncStore, state func() raft.RaftState, voters func() int, fatal func(string, ...any), stages *Stages) *leaderSync {
	l := &leaderSync{inner: inner, state: state, voters: voters, fatal: fatal, stages: stages, done: make(chan struct{})}
	l.synced.L, l.kick.L = &l.mu, &l.mu
	if last, err := inner.LastIndex(); err == nil {
		l.written, l.durable = last, last // what is in the store at open is durable
	}
	go l.syncLoop()
	return l
}

func (l *leaderSync) FirstIndex() (uint64, error)              { return l.inner.FirstIndex() }
func (l *leaderSync) LastIndex() (uint64, error)               { return l.inner.LastIndex() }
func (l *leaderSync) GetLog(index uint64, log *raft.Log) error { return l.inner.GetLog(index, log) }
func (l *leaderSync) StoreLog(log *raft.Log) error             { return l.StoreLogs([]*raft.Log{log}) }

// IsMonotonic forwards the wrapped store's answer.
func (l *leaderSync) IsMonotonic() bool {
	m, ok := l.inner.(raft.MonotonicLogStore)
	return ok && m.IsMonotonic()
}

// StoreLogs appends logs: without waiting for the sync on a leader with
// other voters, durably otherwise.
func (l *leaderSync) StoreLogs(logs []*raft.Log) error {
	if len(logs) == 0 {
		return nil
	}
	last := logs[len(logs)-1].Index
	start := time.Now()
	if l.state() == raft.Leader && l.voters() >= 2 {
		if err := l.inner.StoreLogsNoSync(logs); err != nil {
			return err
		}
		l.stages.Record("leader.write", time.Since(start))
		l.mu.Lock()
		l.written = max(l.written, last)
		l.kick.Signal()
		l.mu.Unlock()
		return nil
	}
	if err := l.inner.StoreLogs(logs); err != nil {
		return err
	}
	stage := "follower.store"
	if l.state() == raft.Leader {
		stage = "leader.store"
	}
	l.stages.Record(stage, time.Since(start))
	l.mu.Lock()
	l.written = max(l.written, last)
	l.durable = max(l.durable, last) // StoreLogs synced everything before too
	l.synced.Broadcast()
	l.mu.Unlock()
	return nil
}

// DeleteRange first makes what was written durable, so a truncation never
// races a pending sync.
func (l *leaderSync) DeleteRange(min, max uint64) error {
	if err := l.syncNow(); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.inner.DeleteRange(min, max); err != nil {
		return err
	}
	last, err := l.inner.LastIndex()
	if err != nil {
		return err
	}
	// A tail truncation lowers the last index; nothing above it exists.
	l.written, l.durable = last, last
	l.synced.Broadcast()
	return nil
}

// syncNow makes everything written so far durable.
func (l *leaderSync) syncNow() error {
	l.mu.Lock()
	target := l.written
	l.mu.Unlock()
	return l.waitDurable(target)
}

// syncLoop syncs whatever was written and not yet durable, one Sync at a
// time (a sync covers every write before it).
func (l *leaderSync) syncLoop() {
	defer close(l.done)
	l.mu.Lock()
	defer l.mu.Unlock()
	for {
		for !l.closed && l.written <= l.durable {
			l.kick.Wait()
		}
		if l.closed {
			return
		}
		target := l.written
		l.mu.Unlock()
		start := time.Now()
		err := l.inner.Sync()
		l.stages.Record("leader.sync", time.Since(start))
		l.mu.Lock()
		if err != nil {
			l.failed = fmt.Errorf("syncing the raft log: %w", err)
			l.synced.Broadcast()
			l.mu.Unlock()
			// The leader may have counted its own copy already.
			l.fatal("raft log sync failed on the leader; stopping so that no unsynced entry counts: %v", err)
			l.mu.Lock()
			return
		}
		l.durable = max(l.durable, target)
		l.synced.Broadcast()
	}
}

// waitDurable blocks until every index <= index is durable.
func (l *leaderSync) waitDurable(index uint64) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for l.durable < index && l.failed == nil && !l.closed {
		if l.written < index {
			// Not written by this site (a follower's answer to entries
			// this leader does not have cannot happen); nothing to wait for.
			return nil
		}
		l.synced.Wait()
	}
	return l.failed
}

// Close stops the sync goroutine after a last sync.
func (l *leaderSync) Close() error {
	err := l.syncNow()
	l.mu.Lock()
	l.closed = true
	l.kick.Broadcast()
	l.synced.Broadcast()
	l.mu.Unlock()
	<-l.done
	return err
}

// syncedTransport holds a follower's successful answer to an AppendEntries
// with entries until the leader's own copy of them is durable.
type syncedTransport struct {
	guardedTransport
	sync *leaderSync
}

func lastEntry(req *raft.AppendEntriesRequest) uint64 {
	if n := len(req.Entries); n > 0 {
		return req.Entries[n-1].Index
	}
	return 0
}

func (t *syncedTransport) AppendEntries(id raft.ServerID, target raft.ServerAddress, args *raft.AppendEntriesRequest, resp *raft.AppendEntriesResponse) error {
	err := t.guardedTransport.AppendEntries(id, target, args, resp)
	if err == nil && resp.Success {
		if last := lastEntry(args); last > 0 {
			if werr := t.sync.waitDurable(last); werr != nil {
				return werr
			}
		}
	}
	return err
}

func (t *syncedTransport) AppendEntriesPipeline(id raft.ServerID, target raft.ServerAddress) (raft.AppendPipeline, error) {
	p, err := t.guardedTransport.AppendEntriesPipeline(id, target)
	if err != nil {
		return nil, err
	}
	return newRelayPipeline(p, func(f raft.AppendFuture) bool {
		if f.Error() == nil && f.Response().Success {
			if last := lastEntry(f.Request()); last > 0 {
				return t.sync.waitDurable(last) == nil // on failure fatal was called
			}
		}
		return true
	}), nil
}

// countVoters counts the voters of r's latest configuration (read without
// going through Raft's main loop, so StoreLogs may call it).
func countVoters(r *raft.Raft) int {
	fut := r.GetConfiguration()
	if fut.Error() != nil {
		return 0
	}
	n := 0
	for _, s := range fut.Configuration().Servers {
		if s.Suffrage == raft.Voter {
			n++
		}
	}
	return n
}
