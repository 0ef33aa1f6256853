package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/robib/robib/fsm"
)

// Volume leases: a read-write attach holds its volume's lease, recorded in
// the replicated state (fsm.AcquireLease) with an epoch that every write
// batch carries, so the FSM rejects the batches of a holder that lost it.
//
// Liveness is the leader's business and is not replicated: the holder
// renews its lease with the leader every LeaseTTL/4 (a small RPC, not a log
// entry), and the leader grants the lease to another site only when the
// holder has not renewed for LeaseTTL. A new leader knows nothing of past
// renewals, so it counts every lease as renewed when it took office: a
// holder behind a partition loses its lease at most one TTL after the
// majority side has a leader. Safety never depends on these clocks; the
// epoch check in the FSM fences the old holder whatever the timing.

const (
	pathLeaseAcquire = "/internal/v1/lease/acquire"
	pathLeaseRenew   = "/internal/v1/lease/renew"
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

// AcquireLease takes the read-write lease of volume (incarnation created)
// for this site and returns its epoch: batches written under it must carry
// it (dcd.Config.Epoch). A lease this site already holds is taken again at
// a new epoch, which fences this site's own earlier writers. It fails with
// ErrLeaseHeld while another site holds the lease and renews it; transient
// conditions are retried until ctx ends.
func (n *Node) AcquireLease(ctx context.Context, volume string, created int64) (uint64, error) {
	req := leaseRequest{Volume: volume, Site: n.cfg.Name, Created: created}
	var epoch uint64
	err := n.onLeaderCall(ctx, func() error {
		var err error
		epoch, err = n.acquireLocal(ctx, req)
		return err
	}, pathLeaseAcquire, req, func(rep leaseReply) { epoch = rep.Epoch })
	return epoch, err
}

// RenewLease tells the leader this site still holds volume's lease at
// epoch. ErrLeaseLost means another site took it (or it was released):
// the caller must stop writing. Other errors are transient; it makes one
// attempt.
func (n *Node) RenewLease(ctx context.Context, volume string, epoch uint64) error {
	req := leaseRequest{Volume: volume, Site: n.cfg.Name, Epoch: epoch}
	if n.IsLeader() {
		return n.renewLocal(req)
	}
	addr, err := n.leaderAPI()
	if err != nil {
		return err
	}
	_, err = n.rpc.lease(ctx, addr, pathLeaseRenew, req)
	return err
}

// ReleaseLease gives up this site's lease on volume at epoch (after its
// writes are committed). Releasing a lease that moved on is not an error.
func (n *Node) ReleaseLease(ctx context.Context, volume string, epoch uint64) error {
	_, err := n.ApplyAndWait(ctx, &fsm.ReleaseLease{Volume: volume, Site: n.cfg.Name, Epoch: epoch})
	if errors.Is(err, fsm.ErrLeaseConflict) || errors.Is(err, fsm.ErrUnknownVolume) {
		return nil
	}
	return err
}

// acquireLocal decides and proposes an acquisition; leader only.
func (n *Node) acquireLocal(ctx context.Context, req leaseRequest) (uint64, error) {
	if !n.IsLeader() {
		return 0, ErrNotLeader
	}
	term := n.raft.CurrentTerm()
	cur, _ := n.fsm.Lease(req.Volume)
	if cur.Holder != "" && cur.Holder != req.Site {
		now := time.Now()
		last := n.leases.lastRenewal(term, req.Volume, cur, now)
		if left := n.cfg.LeaseTTL - now.Sub(last); left > 0 {
			return 0, fmt.Errorf("%w: volume %s is attached read-write at site %s (lease epoch %d, expires in %v unless renewed)",
				ErrLeaseHeld, req.Volume, cur.Holder, cur.Epoch, left.Round(100*time.Millisecond))
		}
		n.log.Warn("volume lease expired; granting it to another site", "volume", req.Volume,
			"old_holder", cur.Holder, "epoch", cur.Epoch, "new_holder", req.Site, "unrenewed_for", now.Sub(last).Round(time.Millisecond))
	}
	cmd := &fsm.AcquireLease{Volume: req.Volume, Site: req.Site, Created: req.Created, Prev: cur.Epoch}
	data, err := fsm.Encode(cmd)
	if err != nil {
		return 0, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	// Proposed here, never forwarded: the expiry was judged by this
	// leader's view of renewals.
	res, err := n.applyLocal(ctx, cmd, data, n.cfg.Name)
	if err != nil {
		return 0, err
	}
	if errors.Is(res.Err, fsm.ErrLeaseConflict) {
		// Someone's acquisition was applied in between: decide again.
		return 0, fmt.Errorf("%w: %v", ErrRetry, res.Err)
	}
	if res.Err != nil {
		return 0, res.Err
	}
	epoch := cur.Epoch + 1
	n.leases.renewed(term, req.Volume, req.Site, epoch, time.Now())
	n.log.Info("volume lease granted", "volume", req.Volume, "holder", req.Site, "epoch", epoch)
	return epoch, nil
}

// renewLocal records a renewal; leader only.
func (n *Node) renewLocal(req leaseRequest) error {
	if !n.IsLeader() {
		return ErrNotLeader
	}
	term := n.raft.CurrentTerm()
	cur, _ := n.fsm.Lease(req.Volume)
	switch {
	case cur.Epoch > req.Epoch || cur.Epoch == req.Epoch && cur.Holder != req.Site:
		return fmt.Errorf("%w: volume %s: site %s held epoch %d; the lease is now at epoch %d (holder %q)",
			ErrLeaseLost, req.Volume, req.Site, req.Epoch, cur.Epoch, cur.Holder)
	case cur.Epoch < req.Epoch:
		// This leader has not applied the acquisition yet; it is
		// committed (the holder learned its epoch from a commit).
	}
	n.leases.renewed(term, req.Volume, req.Site, req.Epoch, time.Now())
	return nil
}

// leaderAPI returns the leader's API address.
func (n *Node) leaderAPI() (string, error) {
	leader := n.Leader()
	if leader == "" {
		return "", ErrNoLeader
	}
	meta, ok := n.memberMeta(leader)
	if !ok || meta.API == "" {
		return "", fmt.Errorf("%w: leader %s has no known API address yet", ErrNoLeader, leader)
	}
	return meta.API, nil
}

// onLeaderCall is onLeader for the lease endpoints, which answer a body.
func (n *Node) onLeaderCall(ctx context.Context, local func() error, path string, req leaseRequest, ok func(leaseReply)) error {
	backoff := 20 * time.Millisecond
	for {
		var err error
		if n.IsLeader() {
			err = local()
		} else if addr, aerr := n.leaderAPI(); aerr != nil {
			err = aerr
		} else {
			var rep leaseReply
			if rep, err = n.rpc.lease(ctx, addr, path, req); err == nil {
				ok(rep)
			}
		}
		if err == nil || !IsRetryable(err) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), err)
		case <-n.stop:
			return ErrClosed
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 500*time.Millisecond)
	}
}

func (n *Node) handleLease(w http.ResponseWriter, r *http.Request) {
	var req leaseRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4096)).Decode(&req); err != nil {
		writeJSON(w, http.StatusBadRequest, leaseReply{Code: "invalid", Error: err.Error()})
		return
	}
	var (
		rep leaseReply
		err error
	)
	switch r.URL.Path {
	case pathLeaseAcquire:
		rep.Epoch, err = n.acquireLocal(r.Context(), req)
	case pathLeaseRenew:
		err = n.renewLocal(req)
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
