package cluster

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/raft"

	"github.com/robib/robib/fsm"
)

// defaultApplyTimeout bounds a proposal whose ctx has no deadline.
const defaultApplyTimeout = 30 * time.Second

// Apply proposes one command and returns once it is committed on a majority
// of sites and applied by the leader, with its log index. It makes one
// attempt: on the leader it appends to Raft, elsewhere it forwards to the
// leader. Retryable failures wrap ErrRetry; the FSM's verdict comes back as
// its own error (fsm.ErrUnknownVolume, ...).
func (n *Node) Apply(ctx context.Context, cmd fsm.Command) (*fsm.Result, error) {
	data, err := fsm.Encode(cmd)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	return n.propose(ctx, cmd, data)
}

// ApplyAndWait is Apply followed by waiting until this site has applied the
// command too, so the caller's next local read sees it. It retries
// transient conditions (no leader, leader change) until ctx ends; use it for
// admin commands, never for write batches (their retries need the writer's
// ordering, see dcd).
func (n *Node) ApplyAndWait(ctx context.Context, cmd fsm.Command) (*fsm.Result, error) {
	data, err := fsm.Encode(cmd)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	backoff := 20 * time.Millisecond
	for {
		res, err := n.propose(ctx, cmd, data)
		if err == nil {
			if res.Err != nil {
				return res, res.Err
			}
			return res, n.fsm.WaitApplied(ctx, res.Index)
		}
		if !errors.Is(err, ErrRetry) {
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w (last: %v)", ctx.Err(), err)
		case <-n.stop:
			return nil, ErrClosed
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, time.Second)
	}
}

// Commit replicates a write batch (dcd.Committer). It returns once the
// batch is committed on a majority, with the index where it took effect.
func (n *Node) Commit(ctx context.Context, b *fsm.WriteBatch) (uint64, error) {
	res, err := n.Apply(ctx, b)
	if err != nil {
		return 0, err
	}
	return res.Index, res.Err
}

// WaitApplied blocks until this site's FSM applied index (dcd.Committer).
func (n *Node) WaitApplied(ctx context.Context, index uint64) error {
	return n.fsm.WaitApplied(ctx, index)
}

// propose applies encoded data on the leader, locally or by forwarding.
func (n *Node) propose(ctx context.Context, cmd fsm.Command, data []byte) (*fsm.Result, error) {
	select {
	case <-n.stop:
		return nil, ErrClosed
	default:
	}
	if n.raft.State() == raft.Leader {
		return n.applyLocal(ctx, cmd, data, n.cfg.Name)
	}
	leader := n.Leader()
	if leader == "" {
		return nil, ErrNoLeader
	}
	meta, ok := n.memberMeta(leader)
	if !ok || meta.API == "" {
		return nil, fmt.Errorf("%w: leader %s has no known API address yet", ErrNoLeader, leader)
	}
	// Abandon the forward when the leader changes: the old one may be
	// dead or cut off and never answer. The entry may still have been
	// committed; writers resend and the FSM deduplicates.
	changed := n.leaderChange()
	if n.Leader() != leader {
		return nil, fmt.Errorf("%w: leader changed", ErrNotLeader)
	}
	fctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-changed:
			cancel()
		case <-fctx.Done():
		}
	}()
	start := time.Now()
	res, leaderTook, err := n.rpc.apply(fctx, meta.API, n.cfg.Name, data)
	if err != nil && ctx.Err() == nil && fctx.Err() != nil {
		return nil, fmt.Errorf("%w: leader %s replaced while a request to it was in flight", ErrNotLeader, leader)
	}
	if err == nil && leaderTook > 0 {
		if _, ok := cmd.(*fsm.WriteBatch); ok {
			n.cfg.Stages.Record("forward", max(time.Since(start)-leaderTook, 0))
		}
	}
	return res, err
}

// applyLocal appends data to the Raft log on this (leader) site and waits
// for it to be committed and applied. Write batches pass the sequencer so a
// session's pipelined batches enter the log in Seq order, and are counted
// by origin, the site that sent them (leader placement).
func (n *Node) applyLocal(ctx context.Context, cmd fsm.Command, data []byte, origin string) (*fsm.Result, error) {
	timeout := defaultApplyTimeout
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
		if timeout <= 0 {
			return nil, context.DeadlineExceeded
		}
	}
	proposed := time.Now()
	var fut raft.ApplyFuture
	switch c := cmd.(type) {
	case *fsm.WriteBatch:
		if n.cfg.LeaderFollowsWrites {
			n.origins.note(origin)
		}
		// A forward whose sender gave up (leader change, timeout) while it
		// waited here is dropped before it reaches the log: the sender
		// resends it, and a copy appended after the resend would reach the
		// FSM late. (Safety does not depend on it, see "Late copies of a
		// batch" in fsm/DESIGN.md, but it keeps them out of the log.)
		n.seq.append(c.Session, c.Seq, func() {
			if ctx.Err() == nil {
				fut = n.raft.Apply(data, timeout)
			}
		})
		if fut == nil {
			return nil, ctx.Err()
		}
	case *fsm.EndSession:
		n.seq.forget(c.Session)
		fut = n.raft.Apply(data, timeout)
	default:
		fut = n.raft.Apply(data, timeout)
	}
	done := make(chan error, 1)
	go func() { done <- fut.Error() }()
	select {
	case err := <-done:
		if err != nil {
			return nil, raftErr(err)
		}
	case <-ctx.Done():
		// The entry may still commit; writers resend and the FSM dedupes.
		return nil, ctx.Err()
	}
	res, ok := fut.Response().(*fsm.Result)
	if !ok {
		return nil, fmt.Errorf("unexpected FSM response %T", fut.Response())
	}
	if _, ok := cmd.(*fsm.WriteBatch); ok {
		n.cfg.Stages.Record("leader.propose", time.Since(proposed))
	}
	if errors.Is(res.Err, fsm.ErrFailed) {
		n.stepDownOnce.Do(func() {
			n.log.Error("this site's copy failed to apply a committed entry; handing over leadership", "err", res.Err)
			go n.raft.LeadershipTransfer()
		})
	}
	return res, nil
}

// raftErr marks Raft's transient errors as retryable.
func raftErr(err error) error {
	switch {
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipLost),
		errors.Is(err, raft.ErrLeadershipTransferInProgress), errors.Is(err, raft.ErrEnqueueTimeout),
		errors.Is(err, raft.ErrAbortedByRestore):
		return fmt.Errorf("%w: %v", ErrNotLeader, err)
	case errors.Is(err, raft.ErrRaftShutdown):
		return fmt.Errorf("%w: %v", ErrClosed, err)
	}
	return err
}
