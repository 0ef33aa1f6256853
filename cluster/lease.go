package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"github.com/robib/robib/fsm"
)

// Volume leases: a read-write attach holds its volume's lease, recorded in
// the replicated state (fsm.AcquireLease) with an epoch that every write
// batch carries, so the FSM rejects the batches of a holder that lost it.
//
// Liveness is the leader's business and is not replicated: the holder
// renews its lease with the leader every LeaseTTL/8 (a small RPC, not a log
// entry), and the leader grants the lease to another site only when the
// holder has not renewed for LeaseTTL. A new leader knows nothing of past
// renewals, so it counts every lease as renewed when it took office: a
// holder behind a partition loses its lease at most one TTL after the
// majority side has a leader. Safety never depends on these clocks; the
// epoch check in the FSM fences the old holder whatever the timing.

const (
	pathLeaseAcquire = "/internal/v1/lease/acquire"
	pathLeaseRenew   = "/internal/v1/lease/renew"
	pathReadIndex    = "/internal/v1/read-index"
)

// DefaultLeaseTTL is how long a volume lease survives without renewal.
const DefaultLeaseTTL = 4 * time.Second

// leaseRequest is the body of the lease endpoints.
type leaseRequest struct {
	Volume  string `json:"volume"`
	Site    string `json:"site"`
	Created int64  `json:"created,omitempty"` // acquire: the volume incarnation
	Epoch   uint64 `json:"epoch,omitempty"`   // renew: the epoch held
}

// leaseReply is their answer.
type leaseReply struct {
	Epoch uint64 `json:"epoch,omitempty"`
	// Index: acquire: the log index of the AcquireLease entry; read-index:
	// the leader's read index.
	Index uint64 `json:"index,omitempty"`
	// Code: "" success, "held" (ErrLeaseHeld), "lost" (ErrLeaseLost),
	// "retry" (not the leader, ...), or an fsm error code.
	Code  string `json:"code,omitempty"`
	Error string `json:"error,omitempty"`
}

// leaseTable is the leader's view of lease liveness: when each holder last
// renewed. It is reset whenever this site starts a new term as leader.
type leaseTable struct {
	mu    sync.Mutex
	term  uint64    // the leader term the table belongs to
	since time.Time // when this site was first seen leading in term
	seen  map[string]leaseSeen
}

type leaseSeen struct {
	site  string
	epoch uint64
	at    time.Time
}

// lastRenewal returns when the holder of l on volume last renewed, as far
// as this leader knows (never earlier than its own start in office).
func (t *leaseTable) lastRenewal(term uint64, volume string, l fsm.Lease, now time.Time) time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.resetLocked(term, now)
	if s, ok := t.seen[volume]; ok && s.site == l.Holder && s.epoch == l.Epoch && s.at.After(t.since) {
		return s.at
	}
	return t.since
}

func (t *leaseTable) renewed(term uint64, volume, site string, epoch uint64, now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.resetLocked(term, now)
	t.seen[volume] = leaseSeen{site: site, epoch: epoch, at: now}
}

func (t *leaseTable) resetLocked(term uint64, now time.Time) {
	if t.seen == nil || t.term != term {
		t.term, t.since, t.seen = term, now, make(map[string]leaseSeen)
	}
}

// Grant is a lease acquisition's outcome: the epoch the writer's batches
// must carry (dcd.Config.Epoch) and the log index of the AcquireLease entry.
// Every entry committed before the grant has a smaller index, so a site
// that has applied Index holds every write acknowledged under earlier
// epochs: the new writer may serve reads from it (see WaitApplied).
type Grant struct {
	Epoch uint64
	Index uint64
	// Sent is when the request that won the lease was sent (this site's
	// clock): the leader counts the lease from a moment after it, so a
	// holder measuring its validity from Sent errs on the safe side.
	Sent time.Time
}

// leaseRaft is what lease arbitration needs of Raft on the leader.
type leaseRaft interface {
	CurrentTerm() uint64
	VerifyLeader() raft.Future
	Barrier(timeout time.Duration) raft.Future
}

// leaseState reads the replicated lease table and applied index (fsm.FSM).
type leaseState interface {
	Lease(volume string) (fsm.Lease, bool)
	AppliedIndex() uint64
}

// leaderProposer proposes on the leader without forwarding, and proposes
// admin commands with retries (proposer).
type leaderProposer interface {
	applyLocal(ctx context.Context, cmd fsm.Command, data []byte, origin string) (*fsm.Result, error)
	ApplyAndWait(ctx context.Context, cmd fsm.Command) (*fsm.Result, error)
}

// leaseCaller calls the leader's lease endpoints (rpcClient).
type leaseCaller interface {
	lease(ctx context.Context, addr, path string, req leaseRequest) (leaseReply, error)
}

// leaseArbiter is lease arbitration: on the leader it decides acquisitions
// and counts renewals (its leaseTable, under the table's own lock); on any
// site it sends this site's lease requests and read-index requests to the
// leader and serves them (handleLease).
type leaseArbiter struct {
	self   string
	ttl    time.Duration
	log    *slog.Logger
	raft   leaseRaft
	state  leaseState
	prop   leaderProposer
	leader leadership
	book   addressBook
	rpc    leaseCaller
	stop   <-chan struct{}
	now    func() time.Time // time.Now; tests step it

	table leaseTable // the leader's view of lease renewals
}

// AcquireLease implements Node.AcquireLease.
func (a *leaseArbiter) AcquireLease(ctx context.Context, volume string, created int64) (Grant, error) {
	req := leaseRequest{Volume: volume, Site: a.self, Created: created}
	var g Grant
	err := a.onLeaderCall(ctx, func(sent time.Time) error {
		var err error
		g, err = a.acquireLocal(ctx, req)
		g.Sent = sent
		return err
	}, pathLeaseAcquire, req, func(rep leaseReply, sent time.Time) { g = Grant{Epoch: rep.Epoch, Index: rep.Index, Sent: sent} })
	return g, err
}

// ReadIndex implements Node.ReadIndex.
func (a *leaseArbiter) ReadIndex(ctx context.Context) (uint64, error) {
	var idx uint64
	err := a.onLeaderCall(ctx, func(time.Time) error {
		var err error
		idx, err = a.readIndexLocal()
		return err
	}, pathReadIndex, leaseRequest{}, func(rep leaseReply, _ time.Time) { idx = rep.Index })
	return idx, err
}

// readIndexTimeout bounds the barrier of a read index.
const readIndexTimeout = 5 * time.Second

// readIndexLocal is ReadIndex on the leader.
func (a *leaseArbiter) readIndexLocal() (uint64, error) {
	if !a.leader.IsLeader() {
		return 0, ErrNotLeader
	}
	if err := a.raft.Barrier(readIndexTimeout).Error(); err != nil {
		return 0, raftErr(err)
	}
	return a.state.AppliedIndex(), nil
}

// RenewLease implements Node.RenewLease.
func (a *leaseArbiter) RenewLease(ctx context.Context, volume string, epoch uint64) error {
	req := leaseRequest{Volume: volume, Site: a.self, Epoch: epoch}
	if a.leader.IsLeader() {
		return a.renewLocal(req)
	}
	_, addr, err := leaderAPI(a.leader, a.book)
	if err != nil {
		return err
	}
	_, err = a.rpc.lease(ctx, addr, pathLeaseRenew, req)
	return err
}

// ReleaseLease implements Node.ReleaseLease.
func (a *leaseArbiter) ReleaseLease(ctx context.Context, volume string, epoch uint64) error {
	_, err := a.prop.ApplyAndWait(ctx, &fsm.ReleaseLease{Volume: volume, Site: a.self, Epoch: epoch})
	if errors.Is(err, fsm.ErrLeaseConflict) || errors.Is(err, fsm.ErrUnknownVolume) {
		return nil
	}
	return err
}

// acquireLocal decides and proposes an acquisition; leader only.
func (a *leaseArbiter) acquireLocal(ctx context.Context, req leaseRequest) (Grant, error) {
	if !a.leader.IsLeader() {
		return Grant{}, ErrNotLeader
	}
	term := a.raft.CurrentTerm()
	cur, _ := a.state.Lease(req.Volume)
	if cur.Holder != "" && cur.Holder != req.Site {
		now := a.now()
		last := a.table.lastRenewal(term, req.Volume, cur, now)
		if left := a.ttl - now.Sub(last); left > 0 {
			return Grant{}, fmt.Errorf("%w: volume %s is attached read-write at site %s (lease epoch %d, expires in %v unless renewed)",
				ErrLeaseHeld, req.Volume, cur.Holder, cur.Epoch, left.Round(100*time.Millisecond))
		}
		a.log.Warn("volume lease expired; granting it to another site", "volume", req.Volume,
			"old_holder", cur.Holder, "epoch", cur.Epoch, "new_holder", req.Site, "unrenewed_for", now.Sub(last).Round(time.Millisecond))
	}
	cmd := &fsm.AcquireLease{Volume: req.Volume, Site: req.Site, Created: req.Created, Prev: cur.Epoch}
	data, err := fsm.Encode(cmd)
	if err != nil {
		return Grant{}, fmt.Errorf("%w: %w", ErrInvalidRequest, err)
	}
	// Proposed here, never forwarded: the expiry was judged by this
	// leader's view of renewals.
	res, err := a.prop.applyLocal(ctx, cmd, data, a.self)
	if err != nil {
		return Grant{}, err
	}
	if errors.Is(res.Err, fsm.ErrLeaseConflict) {
		// Someone's acquisition was applied in between: decide again.
		return Grant{}, fmt.Errorf("%w: %v", ErrRetry, res.Err)
	}
	if res.Err != nil {
		return Grant{}, res.Err
	}
	g := Grant{Epoch: cur.Epoch + 1, Index: res.Index}
	a.table.renewed(term, req.Volume, req.Site, g.Epoch, a.now())
	a.log.Info("volume lease granted", "volume", req.Volume, "holder", req.Site, "epoch", g.Epoch, "index", g.Index)
	return g, nil
}

// renewLocal records a renewal; leader only. The renewal counts only once
// this site has confirmed with a majority that it still leads, after the
// request arrived: a deposed leader that has not noticed yet must not extend
// a lease its successor may already be expiring (see DESIGN.md, "Leases and
// self-fencing").
func (a *leaseArbiter) renewLocal(req leaseRequest) error {
	if !a.leader.IsLeader() {
		return ErrNotLeader
	}
	term := a.raft.CurrentTerm()
	at := a.now()
	if err := a.raft.VerifyLeader().Error(); err != nil {
		return raftErr(err)
	}
	if a.raft.CurrentTerm() != term {
		return fmt.Errorf("%w: term changed during renewal", ErrNotLeader)
	}
	cur, _ := a.state.Lease(req.Volume)
	switch {
	case cur.Epoch > req.Epoch || cur.Epoch == req.Epoch && cur.Holder != req.Site:
		return fmt.Errorf("%w: volume %s: site %s held epoch %d; the lease is now at epoch %d (holder %q)",
			ErrLeaseLost, req.Volume, req.Site, req.Epoch, cur.Epoch, cur.Holder)
	case cur.Epoch < req.Epoch:
		// This leader has not applied the acquisition yet; it is
		// committed (the holder learned its epoch from a commit).
	}
	a.table.renewed(term, req.Volume, req.Site, req.Epoch, at)
	return nil
}

// onLeaderCall is admin.onLeader for the lease endpoints, which answer a
// body. Both callbacks get the time the attempt was sent.
func (a *leaseArbiter) onLeaderCall(ctx context.Context, local func(sent time.Time) error, path string, req leaseRequest, ok func(rep leaseReply, sent time.Time)) error {
	backoff := 20 * time.Millisecond
	for {
		var err error
		sent := a.now()
		if a.leader.IsLeader() {
			err = local(sent)
		} else if _, addr, aerr := leaderAPI(a.leader, a.book); aerr != nil {
			err = aerr
		} else {
			var rep leaseReply
			if rep, err = a.rpc.lease(ctx, addr, path, req); err == nil {
				ok(rep, sent)
			}
		}
		if err == nil || !IsRetryable(err) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), err)
		case <-a.stop:
			return ErrClosed
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 500*time.Millisecond)
	}
}

func (a *leaseArbiter) handleLease(w http.ResponseWriter, r *http.Request) {
	var req leaseRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4096)).Decode(&req); err != nil {
		writeJSON(w, http.StatusBadRequest, leaseReply{Code: "invalid", Error: err.Error()})
		return
	}
	var (
		rep leaseReply
		err error
	)
	if r.URL.Path != pathReadIndex {
		if err := checkClaim(r, req.Site, "take or renew a volume lease"); err != nil {
			writeJSON(w, http.StatusForbidden, leaseReply{Code: "forbidden", Error: err.Error()})
			return
		}
	}
	switch r.URL.Path {
	case pathLeaseAcquire:
		var g Grant
		g, err = a.acquireLocal(r.Context(), req)
		rep.Epoch, rep.Index = g.Epoch, g.Index
	case pathLeaseRenew:
		err = a.renewLocal(req)
	case pathReadIndex:
		rep.Index, err = a.readIndexLocal()
	}
	if err != nil {
		rep.Code, rep.Error = leaseCode(err), err.Error()
	}
	writeJSON(w, http.StatusOK, rep)
}

// leaseCode is the wire code of a lease endpoint's error.
func leaseCode(err error) string {
	switch {
	case errors.Is(err, ErrLeaseHeld):
		return "held"
	case errors.Is(err, ErrLeaseLost):
		return "lost"
	case IsRetryable(err), errors.Is(err, ErrClosed):
		return "retry"
	}
	return fsm.ErrorCode(err)
}

// lease calls a lease endpoint on addr.
func (c *rpcClient) lease(ctx context.Context, addr, path string, req leaseRequest) (leaseReply, error) {
	var rep leaseReply
	if err := c.postJSONReply(ctx, addr, path, req, &rep); err != nil {
		return rep, err
	}
	switch rep.Code {
	case "":
		return rep, nil
	case "held":
		return rep, fmt.Errorf("%w: %s", ErrLeaseHeld, stripPrefix(rep.Error, ErrLeaseHeld))
	case "lost":
		return rep, fmt.Errorf("%w: %s", ErrLeaseLost, stripPrefix(rep.Error, ErrLeaseLost))
	case "retry":
		return rep, fmt.Errorf("%w: %s: %s", ErrNotLeader, addr, rep.Error)
	}
	return rep, fsm.ErrorFromCode(rep.Code, rep.Error)
}

// stripPrefix drops a sentinel's text from the front of a remote message,
// so rewrapping does not repeat it.
func stripPrefix(msg string, sentinel error) string {
	p := sentinel.Error() + ": "
	if len(msg) > len(p) && msg[:len(p)] == p {
		return msg[len(p):]
	}
	return msg
}
