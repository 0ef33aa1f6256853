package cluster

import (
	"sync"

	"github.com/hashicorp/raft"
)

// relayPipeline passes an AppendPipeline's finished futures on to Raft in
// order, each once pass has seen it (and returned true; false stops the
// relay). The transport wrappers use it to time replication (stages.go)
// and to hold answers until the leader's copy is durable (leadersync.go).
type relayPipeline struct {
	raft.AppendPipeline
	pass      func(raft.AppendFuture) bool
	out       chan raft.AppendFuture
	done      chan struct{}
	closeOnce sync.Once
}

func newRelayPipeline(p raft.AppendPipeline, pass func(raft.AppendFuture) bool) *relayPipeline {
	r := &relayPipeline{AppendPipeline: p, pass: pass, out: make(chan raft.AppendFuture, 128), done: make(chan struct{})}
	go r.relay()
	return r
}

func (r *relayPipeline) relay() {
	in := r.AppendPipeline.Consumer()
	for {
		select {
		case f, ok := <-in:
			if !ok || !r.pass(f) {
				return
			}
			select {
			case r.out <- f:
			case <-r.done:
				return
			}
		case <-r.done:
			return
		}
	}
}

func (r *relayPipeline) Consumer() <-chan raft.AppendFuture { return r.out }

func (r *relayPipeline) Close() error {
	err := r.AppendPipeline.Close()
	r.closeOnce.Do(func() { close(r.done) })
	return err
}
