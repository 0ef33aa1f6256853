package cluster

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/robib/robib/fsm"
)

// transferTo moves leadership from the current leader to s and waits until
// every site knows it.
func (c *roleCluster) transferTo(s *roleSite) {
	c.t.Helper()
	from := c.leader()
	if err := from.raft.LeadershipTransferToServer(raft.ServerID(s.name), s.addr).Error(); err != nil {
		c.t.Fatalf("transfer %s -> %s: %v", from.name, s.name, err)
	}
	if l := c.leader(); l != s {
		c.t.Fatalf("leader is %s after a transfer to %s", l.name, s.name)
	}
}

func acquire(t *testing.T, s *roleSite, site string, created int64) (Grant, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return s.leases.acquireLocal(ctx, leaseRequest{Volume: testVolume, Site: site, Created: created})
}

func renew(s *roleSite, site string, epoch uint64) error {
	return s.leases.renewLocal(leaseRequest{Volume: testVolume, Site: site, Epoch: epoch})
}

// A lease granted under one leader survives the leader change: the new
// leader counts it as renewed when it took office, however long ago the
// holder's last renewal with the old leader was; it expires LeaseTTL after
// the holder's last renewal with the new leader, and not before. The
// deposed leader refuses renewals retryably; the old holder, once its
// lease moved on, hears ErrLeaseLost (final).
func TestLeaseExpiryAcrossTermChange(t *testing.T) {
	c := newRoleCluster(t, "a", "b", "c")
	created := c.createVolume()
	clock := c.clock
	l1 := c.leader()
	term1 := l1.raft.CurrentTerm()

	g, err := acquire(t, l1, "x", created)
	if err != nil {
		t.Fatal(err)
	}
	if g.Epoch != 1 || g.Index == 0 {
		t.Fatalf("first grant %+v, want epoch 1 at a log index", g)
	}
	// (A new leader that has not applied the grant yet answers a
	// retryable conflict, see TestRetryClassificationLeases.)
	c.waitApplied(g.Index)
	// Under the first leader: held while renewed.
	clock.Advance(testLeaseTTL / 2)
	if err := renew(l1, "x", 1); err != nil {
		t.Fatalf("renewal with the leader: %v", err)
	}
	clock.Advance(testLeaseTTL - 100*time.Millisecond)
	if _, err := acquire(t, l1, "y", created); !errors.Is(err, ErrLeaseHeld) || IsRetryable(err) {
		t.Fatalf("acquire of a renewed lease: %v, want ErrLeaseHeld (final)", err)
	}

	// The leader changes. By the old leader's clock the lease expires in
	// 100 ms; the new leader knows nothing of that renewal.
	l2 := c.follower(l1)
	c.transferTo(l2)
	if term2 := l2.raft.CurrentTerm(); term2 <= term1 {
		t.Fatalf("term %d after the leader change, want more than %d", term2, term1)
	}
	clock.Advance(200 * time.Millisecond) // past the old leader's expiry
	if _, err := acquire(t, l2, "y", created); !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("acquire right after the leader change: %v, want ErrLeaseHeld (never early)", err)
	}

	// The deposed leader takes no renewal and makes no decision.
	if err := renew(l1, "x", 1); !IsRetryable(err) {
		t.Fatalf("renewal at the deposed leader: %v, want a retryable error", err)
	}
	if _, err := acquire(t, l1, "y", created); !errors.Is(err, ErrNotLeader) {
		t.Fatalf("acquire at the deposed leader: %v, want ErrNotLeader", err)
	}

	// The holder renews with the new leader: the TTL counts from there.
	clock.Advance(testLeaseTTL / 2)
	if err := renew(l2, "x", 1); err != nil {
		t.Fatalf("renewal with the new leader: %v", err)
	}
	clock.Advance(testLeaseTTL - 100*time.Millisecond)
	if _, err := acquire(t, l2, "y", created); !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("acquire %v after the last renewal: %v, want ErrLeaseHeld", testLeaseTTL-100*time.Millisecond, err)
	}
	clock.Advance(200 * time.Millisecond)
	g2, err := acquire(t, l2, "y", created)
	if err != nil {
		t.Fatalf("acquire of a lease unrenewed for longer than its TTL: %v", err)
	}
	if g2.Epoch != 2 || g2.Index <= g.Index {
		t.Fatalf("takeover grant %+v, want epoch 2 after index %d", g2, g.Index)
	}
	if err := renew(l2, "x", 1); !errors.Is(err, ErrLeaseLost) || IsRetryable(err) {
		t.Fatalf("renewal by the old holder: %v, want ErrLeaseLost (final)", err)
	}
	if err := renew(l2, "y", 2); err != nil {
		t.Fatalf("renewal by the new holder: %v", err)
	}
	c.waitApplied(g2.Index)
	for _, s := range c.order {
		if l, ok := s.fsm.Lease(testVolume); !ok || l != (fsm.Lease{Holder: "y", Epoch: 2}) {
			t.Errorf("site %s: lease %+v (%v), want y at epoch 2", s.name, l, ok)
		}
	}
}

// A leader cut off from the majority that has not noticed yet never counts
// a renewal: it must confirm its leadership after the request arrived.
func TestLeaseRenewalAtCutOffLeader(t *testing.T) {
	c := newRoleCluster(t, "a", "b", "c")
	created := c.createVolume()
	l := c.leader()
	if _, err := acquire(t, l, "x", created); err != nil {
		t.Fatal(err)
	}
	term := l.raft.CurrentTerm() // an isolated site campaigns in later terms
	before := l.leases.table.lastRenewal(term, testVolume, fsm.Lease{Holder: "x", Epoch: 1}, c.clock.Now())
	// Raft's VerifyLeader counts any heartbeat answer that arrives after
	// it was called, even one sent before the cut (replication.go,
	// notifyAll): wait until a heartbeat to each peer failed, so none is
	// in flight any more.
	obs := make(chan raft.Observation, 64)
	o := raft.NewObserver(obs, false, func(o *raft.Observation) bool {
		_, ok := o.Data.(raft.FailedHeartbeatObservation)
		return ok
	})
	l.raft.RegisterObserver(o)
	defer l.raft.DeregisterObserver(o)
	c.isolate(l)
	failed := map[raft.ServerID]bool{}
	deadline := time.After(10 * time.Second)
	for len(failed) < len(c.order)-1 {
		select {
		case ob := <-obs:
			failed[ob.Data.(raft.FailedHeartbeatObservation).PeerID] = true
		case <-deadline:
			t.Fatalf("heartbeats failed only to %v", failed)
		}
	}
	c.clock.Advance(testLeaseTTL / 2)
	stillLeads := l.raft.State() == raft.Leader
	err := renew(l, "x", 1)
	t.Logf("leader still believed it led: %v; renewal: %v", stillLeads, err)
	if err == nil || !IsRetryable(err) {
		t.Fatalf("renewal at a cut-off leader: %v, want a retryable error", err)
	}
	after := l.leases.table.lastRenewal(term, testVolume, fsm.Lease{Holder: "x", Epoch: 1}, c.clock.Now())
	if after.After(before) {
		t.Fatalf("the cut-off leader counted the renewal: last renewal %v, was %v", after, before)
	}
}

// Renewing, acquiring and reading the index through a follower reach the
// leader over the internal endpoints and keep their meaning.
func TestLeaseCallsThroughFollower(t *testing.T) {
	c := newRoleCluster(t, "a", "b", "c")
	created := c.createVolume()
	l := c.leader()
	f := c.follower(l)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	g, err := f.leases.AcquireLease(ctx, testVolume, created)
	if err != nil {
		t.Fatal(err)
	}
	if g.Epoch != 1 || g.Index == 0 || !g.Sent.Equal(c.clock.Now()) {
		t.Fatalf("grant %+v, want epoch 1 at an index, sent at %v", g, c.clock.Now())
	}
	if err := f.leases.RenewLease(ctx, testVolume, g.Epoch); err != nil {
		t.Fatalf("renew through a follower: %v", err)
	}
	if err := f.leases.RenewLease(ctx, testVolume, g.Epoch+1); err != nil {
		t.Fatalf("renew of an epoch the leader has not applied: %v", err)
	}
	var other *roleSite // the third site
	for _, s := range c.order {
		if s != l && s != f {
			other = s
		}
	}
	if _, err := other.leases.AcquireLease(ctx, testVolume, created); !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("acquire of a held lease through a follower: %v, want ErrLeaseHeld", err)
	}
	idx, err := f.leases.ReadIndex(ctx)
	if err != nil || idx < g.Index {
		t.Fatalf("read index %d, %v; want at least the grant's index %d", idx, err, g.Index)
	}
	if err := f.leases.ReleaseLease(ctx, testVolume, g.Epoch); err != nil {
		t.Fatal(err)
	}
	// Releasing again, or a lease that moved on, is not an error.
	if err := f.leases.ReleaseLease(ctx, testVolume, g.Epoch); err != nil {
		t.Fatalf("second release: %v", err)
	}
	if err := f.leases.ReleaseLease(ctx, "no-such-volume", 1); err != nil {
		t.Fatalf("release on an unknown volume: %v", err)
	}
	rel, _ := l.fsm.Lease(testVolume)
	if rel.Holder != "" {
		t.Fatalf("lease after release: %+v, want no holder", rel)
	}
	// A free lease is granted at once, at the next epoch.
	g2, err := other.leases.AcquireLease(ctx, testVolume, created)
	if err != nil || g2.Epoch != 2 {
		t.Fatalf("acquire of a released lease: %+v, %v; want epoch 2", g2, err)
	}
	// A wrong incarnation is the FSM's final verdict.
	if _, err := other.leases.AcquireLease(ctx, testVolume, created+1); !errors.Is(err, fsm.ErrUnknownVolume) || IsRetryable(err) {
		t.Fatalf("acquire of another incarnation: %v, want fsm.ErrUnknownVolume", err)
	}
}

// The leader's renewal table starts afresh each term, at the leader's first
// look in that term, and only counts the exact (holder, epoch).
func TestLeaseTableTerms(t *testing.T) {
	t0 := time.Unix(100, 0)
	var tab leaseTable
	l := fsm.Lease{Holder: "x", Epoch: 3}
	if got := tab.lastRenewal(5, "v", l, t0); !got.Equal(t0) {
		t.Fatalf("first look: %v, want the start in office %v", got, t0)
	}
	tab.renewed(5, "v", "x", 3, t0.Add(time.Second))
	if got := tab.lastRenewal(5, "v", l, t0.Add(2*time.Second)); !got.Equal(t0.Add(time.Second)) {
		t.Fatalf("after a renewal: %v", got)
	}
	for _, other := range []fsm.Lease{{Holder: "y", Epoch: 3}, {Holder: "x", Epoch: 4}} {
		if got := tab.lastRenewal(5, "v", other, t0.Add(2*time.Second)); !got.Equal(t0) {
			t.Fatalf("lease %+v counted x@3's renewal: %v", other, got)
		}
	}
	// A new term: everything counts as renewed at the new start.
	t1 := t0.Add(time.Hour)
	if got := tab.lastRenewal(6, "v", l, t1); !got.Equal(t1) {
		t.Fatalf("new term: %v, want %v", got, t1)
	}
	if got := tab.lastRenewal(6, "v", l, t1.Add(time.Minute)); !got.Equal(t1) {
		t.Fatalf("same term later: %v, want the term's start %v", got, t1)
	}
}
