package cluster

import (
	"fmt"
	"sync"

	"github.com/hashicorp/raft"
)

// Narrow views of Raft and of gossip that the roles consume. *raft.Raft
// (through raftLeader) and membership implement them; the roles' tests
// fake them or use Raft's in-memory transport.

// leadership tells whether this site leads and who does.
type leadership interface {
	IsLeader() bool
	Leader() string // the leader's site name, "" when unknown
}

// addressBook returns the gossiped addresses of a site.
type addressBook interface {
	memberMeta(site string) (siteMeta, bool)
}

// leaderChanges hands out a channel closed at the next leader change.
type leaderChanges interface {
	change() <-chan struct{}
}

// configReader reads the latest Raft configuration (lock-free in Raft).
type configReader interface {
	GetConfiguration() raft.ConfigurationFuture
}

// raftLeader is leadership read from Raft.
type raftLeader struct{ r *raft.Raft }

func (l raftLeader) IsLeader() bool { return l.r.State() == raft.Leader }

func (l raftLeader) Leader() string {
	_, id := l.r.LeaderWithID()
	return string(id)
}

// leaderAPI returns the leader's name and API address; ErrNoLeader (which
// is retryable) while either is unknown.
func leaderAPI(l leadership, book addressBook) (leader, api string, err error) {
	leader = l.Leader()
	if leader == "" {
		return "", "", ErrNoLeader
	}
	meta, ok := book.memberMeta(leader)
	if !ok || meta.API == "" {
		return leader, "", fmt.Errorf("%w: leader %s has no known API address yet", ErrNoLeader, leader)
	}
	return leader, meta.API, nil
}

// leaderWatch follows Raft's leader observations so that requests
// forwarded to a leader that went away are abandoned as soon as this site
// learns of the change, instead of waiting for their timeout (a dead host
// never answers). mu guards changed, which is closed and replaced at each
// observed change.
type leaderWatch struct {
	mu      sync.Mutex
	changed chan struct{}
}

func newLeaderWatch() *leaderWatch { return &leaderWatch{changed: make(chan struct{})} }

// change returns a channel that is closed at the next change of the known
// leader.
func (w *leaderWatch) change() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.changed
}

// changedNow wakes everyone waiting on the current channel.
func (w *leaderWatch) changedNow() {
	w.mu.Lock()
	close(w.changed)
	w.changed = make(chan struct{})
	w.mu.Unlock()
}

// observer is what leaderWatch needs of Raft to follow it.
type observer interface {
	RegisterObserver(*raft.Observer)
	DeregisterObserver(*raft.Observer)
}

// run follows r's leader observations until stop is closed; wg counts it.
func (w *leaderWatch) run(r observer, stop <-chan struct{}, wg *sync.WaitGroup) {
	ch := make(chan raft.Observation, 16)
	obs := raft.NewObserver(ch, false, func(o *raft.Observation) bool {
		_, ok := o.Data.(raft.LeaderObservation)
		return ok
	})
	r.RegisterObserver(obs)
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer r.DeregisterObserver(obs)
		for {
			select {
			case <-stop:
				return
			case <-ch:
				w.changedNow()
			}
		}
	}()
}
