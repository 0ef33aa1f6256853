package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/hashicorp/raft"

	"github.com/robib/robib/fsm"
)

// defaultApplyTimeout bounds a proposal whose ctx has no deadline.
const defaultApplyTimeout = 30 * time.Second

// proposeRaft is what the proposer needs of Raft on the leader.
type proposeRaft interface {
	Apply(cmd []byte, timeout time.Duration) raft.ApplyFuture
	LeadershipTransfer() raft.Future
}

// forwarder carries an encoded command to the leader's API (rpcClient).
type forwarder interface {
	apply(ctx context.Context, addr, origin string, data []byte) (*fsm.Result, time.Duration, error)
}

// appliedWaiter waits until this site's FSM applied an index (fsm.FSM).
type appliedWaiter interface {
	WaitApplied(ctx context.Context, index uint64) error
}

// originCounter counts write batches by the site they came from
// (placement.go).
type originCounter interface {
	note(site string)
}

// proposer gets commands committed: it appends them to the Raft log on the
// leader, or forwards them to the leader from any other site, and serves
// forwarded ones (handleApply). Its own state is the sequencer (its own
// lock) and stepDownOnce; everything else it reads through the interfaces.
type proposer struct {
	self    string
	log     *slog.Logger
	raft    proposeRaft
	leader  leadership
	book    addressBook
	changes leaderChanges
	fwd     forwarder
	applied appliedWaiter
	origins originCounter // nil: not counted (no LeaderFollowsWrites)
	leases  leaseReader   // nil: a forwarded batch's lease holder is not checked
	barrier barrierRaft   // applies every committed entry here before a lease check; nil: no wait
	stages  *Stages       // nil records nothing
	stop    <-chan struct{}

	seq          *sequencer
	stepDownOnce sync.Once
}

// leaseReader reads the replicated lease table (fsm.FSM).
type leaseReader interface {
	Lease(volume string) (fsm.Lease, bool)
}

// Apply implements Node.Apply.
func (p *proposer) Apply(ctx context.Context, cmd fsm.Command) (*fsm.Result, error) {
	data, err := fsm.Encode(cmd)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	return p.propose(ctx, cmd, data)
}

// ApplyAndWait implements Node.ApplyAndWait.
func (p *proposer) ApplyAndWait(ctx context.Context, cmd fsm.Command) (*fsm.Result, error) {
	data, err := fsm.Encode(cmd)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	backoff := 20 * time.Millisecond
	for {
		res, err := p.propose(ctx, cmd, data)
		if err == nil {
			if res.Err != nil {
				return res, res.Err
			}
			return res, p.applied.WaitApplied(ctx, res.Index)
		}
		if !errors.Is(err, ErrRetry) {
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w (last: %v)", ctx.Err(), err)
		case <-p.stop:
			return nil, ErrClosed
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, time.Second)
	}
}

// Commit implements Node.Commit.
func (p *proposer) Commit(ctx context.Context, b *fsm.WriteBatch) (uint64, error) {
	res, err := p.Apply(ctx, b)
	if err != nil {
		return 0, err
	}
	return res.Index, res.Err
}

// WaitApplied implements Node.WaitApplied.
func (p *proposer) WaitApplied(ctx context.Context, index uint64) error {
	return p.applied.WaitApplied(ctx, index)
}

// propose applies encoded data on the leader, locally or by forwarding.
func (p *proposer) propose(ctx context.Context, cmd fsm.Command, data []byte) (*fsm.Result, error) {
	select {
	case <-p.stop:
		return nil, ErrClosed
	default:
	}
	if p.leader.IsLeader() {
		return p.applyLocal(ctx, cmd, data, p.self)
	}
	leader, api, err := leaderAPI(p.leader, p.book)
	if err != nil {
		return nil, err
	}
	// Abandon the forward when the leader changes: the old one may be
	// dead or cut off and never answer. The entry may still have been
	// committed; writers resend and the FSM deduplicates.
	changed := p.changes.change()
	if p.leader.Leader() != leader {
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
	res, leaderTook, err := p.fwd.apply(fctx, api, p.self, data)
	if err != nil && ctx.Err() == nil && fctx.Err() != nil {
		return nil, fmt.Errorf("%w: leader %s replaced while a request to it was in flight", ErrNotLeader, leader)
	}
	if err == nil && leaderTook > 0 {
		if _, ok := cmd.(*fsm.WriteBatch); ok {
			p.stages.Record("forward", max(time.Since(start)-leaderTook, 0))
		}
	}
	return res, err
}

// applyLocal appends data to the Raft log on this (leader) site and waits
// for it to be committed and applied. Write batches pass the sequencer so a
// session's pipelined batches enter the log in Seq order, and are counted
// by origin, the site that sent them (leader placement).
func (p *proposer) applyLocal(ctx context.Context, cmd fsm.Command, data []byte, origin string) (*fsm.Result, error) {
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
		if p.origins != nil {
			p.origins.note(origin)
		}
		// A forward whose sender gave up (leader change, timeout) while it
		// waited here is dropped before it reaches the log: the sender
		// resends it, and a copy appended after the resend would reach the
		// FSM late. (Safety does not depend on it, see "Late copies of a
		// batch" in fsm/DESIGN.md, but it keeps them out of the log.)
		p.seq.append(c.Session, c.Seq, func() {
			if ctx.Err() == nil {
				fut = p.raft.Apply(data, timeout)
			}
		})
		if fut == nil {
			return nil, ctx.Err()
		}
	case *fsm.EndSession:
		p.seq.forget(c.Session)
		fut = p.raft.Apply(data, timeout)
	default:
		fut = p.raft.Apply(data, timeout)
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
		p.stages.Record("leader.propose", time.Since(proposed))
	}
	if errors.Is(res.Err, fsm.ErrFailed) {
		p.stepDownOnce.Do(func() {
			p.log.Error("this site's copy failed to apply a committed entry; handing over leadership", "err", res.Err)
			go p.raft.LeadershipTransfer()
		})
	}
	return res, nil
}

// handleApply serves a forwarded proposal: on the leader it proposes it
// (never forwarding it again), elsewhere it answers "retry".
func (p *proposer) handleApply(w http.ResponseWriter, r *http.Request) {
	data, err := readBody(w, r, maxForwardBody)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, applyReply{Code: "invalid", Error: err.Error()})
		return
	}
	if !p.leader.IsLeader() {
		writeJSON(w, http.StatusOK, applyReply{Retry: true, Error: "not the leader"})
		return
	}
	cmd, err := fsm.Decode(data)
	if err != nil {
		writeJSON(w, http.StatusOK, applyReply{Code: fsm.ErrorCode(err), Error: err.Error()})
		return
	}
	origin := r.Header.Get(headerOrigin)
	if peer, ok := requestPeer(r); ok {
		if err := p.checkSender(r, origin, cmd); IsRetryable(err) {
			writeJSON(w, http.StatusOK, applyReply{Retry: true, Error: err.Error()})
			return
		} else if err != nil {
			writeJSON(w, statusFor(err), applyReply{Error: err.Error()})
			return
		}
		origin = peer
	}
	start := time.Now()
	res, err := p.applyLocal(r.Context(), cmd, data, origin)
	if err != nil {
		writeJSON(w, http.StatusOK, applyReply{Retry: IsRetryable(err) || errors.Is(err, ErrClosed), Error: err.Error()})
		return
	}
	rep := applyReply{Index: res.Index, Duplicate: res.Duplicate, LeaderNanos: int64(time.Since(start))}
	if res.Err != nil {
		rep.Code, rep.Error = fsm.ErrorCode(res.Err), res.Err.Error()
	}
	writeJSON(w, http.StatusOK, rep)
}

// checkSender refuses a forwarded command that acts for another site than
// the one that sent it (peer binding, see DESIGN.md): the origin header
// and a lease command's Site must name the sender, and a write batch at a
// lease epoch must come from that epoch's holder. When this leader's state
// does not show the batch's epoch yet (a new leader still applying, or a
// forged epoch), a barrier first applies every committed entry here: a
// granted epoch was committed before its holder learned it. Whatever is
// still not the current epoch then goes on, for the FSM to reject (stale
// epoch, unknown volume).
func (p *proposer) checkSender(r *http.Request, origin string, cmd fsm.Command) error {
	if origin != "" {
		if err := checkClaim(r, origin, "forward proposals"); err != nil {
			return err
		}
	}
	switch c := cmd.(type) {
	case *fsm.AcquireLease:
		return checkClaim(r, c.Site, "take a volume lease")
	case *fsm.ReleaseLease:
		return checkClaim(r, c.Site, "release a volume lease")
	case *fsm.WriteBatch:
		if c.Epoch == 0 || p.leases == nil {
			return nil
		}
		l, ok := p.leases.Lease(c.Volume)
		if (!ok || l.Epoch < c.Epoch) && p.barrier != nil {
			if err := p.barrier.Barrier(leaseBarrierTimeout).Error(); err != nil {
				return raftErr(err)
			}
			l, ok = p.leases.Lease(c.Volume)
		}
		if ok && l.Epoch == c.Epoch && l.Holder != "" {
			return checkClaim(r, l.Holder, fmt.Sprintf("write volume %s under lease epoch %d", c.Volume, c.Epoch))
		}
	}
	return nil
}

// leaseBarrierTimeout bounds the barrier of checkSender.
const leaseBarrierTimeout = 5 * time.Second

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
