// Package faults is robib's fault-injection suite: three sites run as
// containers (tests/dockerh), a checker client (tests/checker) writes
// self-describing blocks and flushes, and the tests kill, freeze, cut off
// and restart sites underneath it. Every test ends by proving, at every
// site, that no acknowledged-flushed block is missing, stale or torn, and
// that `volume verify` finds all copies identical. Each fault's write stall
// is logged (REPORT lines) and appended to $ROBIB_FAULT_REPORT if set.
package faults

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/robib/robib/tests/checker"
	"github.com/robib/robib/tests/harness"
)

// TestKillLeaderDuringWritesAtFollower: kill -9 the leader while a client
// writes at a follower. The survivors elect a leader and the client's
// waiting writes and flushes complete through it, on the same connection.
func TestKillLeaderDuringWritesAtFollower(t *testing.T) {
	e := newEnv(t, "64MiB")
	leader := e.c.MustLeader()
	follower := e.others(leader)[0]
	r := e.startRun("writer", checker.Options{Addrs: []string{e.nbd(follower)}, Blocks: 2048})
	r.waitFlushes(20, time.Minute)

	e.c.Kill(leader)
	t0 := time.Now() // the fault is in place: docker returned
	stall := r.stallAfter(t0, time.Minute)
	e.c.WaitLeader(time.Minute, leader)
	r.waitFlushes(20, time.Minute)
	if s := r.ck.Snapshot(); s.Sessions != 1 {
		t.Errorf("the client at %s had to reconnect (%d sessions): the failover was not transparent", follower, s.Sessions)
	}
	report(t, "kill -9 leader", stall, r)

	e.c.Start(leader)
	e.c.WaitReady(time.Minute, 3)
	r.waitFlushes(10, time.Minute)
	e.verifyEverywhere(r)
}

// TestFreezeLeader: SIGSTOP the leader, let the others take over, then
// SIGCONT it: it must step down and catch up, not write anything stale.
func TestFreezeLeader(t *testing.T) {
	e := newEnv(t, "64MiB")
	leader := e.c.MustLeader()
	follower := e.others(leader)[0]
	r := e.startRun("writer", checker.Options{Addrs: []string{e.nbd(follower)}, Blocks: 2048})
	r.waitFlushes(20, time.Minute)

	e.c.Signal(leader, "STOP")
	t0 := time.Now() // the fault is in place: docker returned
	stall := r.stallAfter(t0, time.Minute)
	e.c.WaitLeader(time.Minute, leader)
	r.waitFlushes(20, time.Minute)
	report(t, "SIGSTOP leader", stall, r)

	e.c.Signal(leader, "CONT")
	e.c.WaitReady(time.Minute, 3)
	r.waitFlushes(10, time.Minute)
	e.verifyEverywhere(r)
}

// TestCutOffFollowerAndHeal: one site loses its links to the others while
// a client writes at another site; the majority keeps going, and the cut
// site catches up by itself when the partition heals.
func TestCutOffFollowerAndHeal(t *testing.T) {
	e := newEnv(t, "64MiB")
	leader := e.c.MustLeader()
	fs := e.others(leader)
	writerSite, cut := fs[0], fs[1]
	r := e.startRun("writer", checker.Options{Addrs: []string{e.nbd(writerSite)}, Blocks: 2048})
	r.waitFlushes(20, time.Minute)

	e.c.Partition(cut)
	t0 := time.Now() // the fault is in place: docker returned
	stall := r.stallAfter(t0, time.Minute)
	r.waitFlushes(40, time.Minute) // the majority carries on
	report(t, "cut off a follower", stall, r)

	e.c.Heal(cut)
	e.c.WaitReady(time.Minute, 3)
	r.waitFlushes(10, time.Minute)
	e.verifyEverywhere(r)
}

// TestCutOffLeader: the leader loses both its peers while a client writes
// at a follower. The majority elects a new leader; the old one steps down;
// after the heal it catches up.
func TestCutOffLeader(t *testing.T) {
	e := newEnv(t, "64MiB")
	leader := e.c.MustLeader()
	follower := e.others(leader)[0]
	r := e.startRun("writer", checker.Options{Addrs: []string{e.nbd(follower)}, Blocks: 2048})
	r.waitFlushes(20, time.Minute)

	e.c.Partition(leader)
	t0 := time.Now() // the fault is in place: docker returned
	stall := r.stallAfter(t0, time.Minute)
	e.c.WaitLeader(time.Minute, leader)
	r.waitFlushes(20, time.Minute)
	report(t, "cut off the leader", stall, r)

	e.c.Heal(leader)
	e.c.WaitReady(time.Minute, 3)
	r.waitFlushes(10, time.Minute)
	e.verifyEverywhere(r)
}

// TestRollingRestart restarts the sites one after another (SIGTERM, then
// start) while a client writes; the client follows, reconnecting to
// another member whenever its site goes down.
func TestRollingRestart(t *testing.T) {
	e := newEnv(t, "64MiB")
	names := e.c.Names()
	addrs := make([]string, len(names))
	for i, n := range names {
		addrs[i] = e.nbd(n)
	}
	r := e.startRun("writer", checker.Options{Addrs: addrs, Blocks: 2048})
	r.waitFlushes(20, time.Minute)
	for _, site := range names {
		t0 := time.Now()
		e.c.Restart(site)
		stall := r.stallAfter(t0, 2*time.Minute)
		e.c.WaitReady(2*time.Minute, 3)
		r.waitFlushes(20, time.Minute)
		report(t, "restart "+site, stall, r)
	}
	if s := r.ck.Snapshot(); s.Sessions < 2 {
		t.Errorf("the client never had to move (%d sessions): the restarts did not hit its site", s.Sessions)
	}
	e.verifyEverywhere(r)
}

// TestTwoSitesCannotBothWrite: a client writes at site A. A second client
// cannot attach the volume read-write at site B while A holds it. Then A is
// cut off from the others, with its client still connected and writing:
// A's flushes fail (no majority) instead of being acknowledged, B's client
// gets the volume once A's lease has expired and writes, and after the
// heal not one write that A's client issued during the partition exists at
// any site — A was fenced — while everything either client flushed does.
func TestTwoSitesCannotBothWrite(t *testing.T) {
	e := newEnv(t, "64MiB")
	leader := e.c.MustLeader()
	fs := e.others(leader)
	a, b := fs[0], fs[1] // both followers: the lease holder is not the leader
	const blocks = 1024
	w1 := e.startRun("writer-A", checker.Options{Addrs: []string{e.nbd(a)}, Blocks: blocks})
	w1.waitFlushes(20, time.Minute)

	// A read-write attach at B is refused, with a message naming A.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := checker.Dial(ctx, nil, e.nbd(b), volName)
	var oe *checker.OptionError
	if !errors.As(err, &oe) || !errors.Is(err, checker.ErrPolicy) {
		t.Fatalf("read-write attach at %s while %s writes: %v, want NBD_REP_ERR_POLICY", b, a, err)
	}
	t.Logf("second writer refused as expected: %v", err)
	// A read-only attach at B works.
	ro, err := checker.Dial(ctx, nil, e.nbd(b), volName+"@ro")
	if err != nil {
		t.Fatalf("read-only attach at %s: %v", b, err)
	}
	if !ro.ReadOnly() {
		t.Fatal("VOLUME@ro is not a read-only export")
	}
	ro.Close()

	e.c.Partition(a)
	tCut := time.Now()
	issuedAtCut := w1.ck.Snapshot().WritesIssued
	// A's client keeps writing; its flushes must fail, not succeed.
	harness.WaitFor(t, time.Minute, "a failed flush at the cut-off site", func() (bool, error) {
		return w1.ck.Snapshot().FlushesFailed > 0, nil
	})
	for _, f := range w1.ck.Flushes() {
		if f.OK && f.Sent.After(tCut.Add(time.Second)) {
			t.Fatalf("site %s acknowledged a flush sent %v after it was cut off from the majority", a, f.Sent.Sub(tCut))
		}
	}

	// B's client gets the volume once A's lease expired.
	w2 := e.startRun("writer-B", checker.Options{Addrs: []string{e.nbd(b)}, Blocks: blocks, BaseOffset: blocks * blockSize})
	w2.waitFlushes(20, 2*time.Minute)
	takeover := w2.ck.Sessions()[0].Start.Sub(tCut)
	t.Logf("B attached read-write %v after A was cut off (lease TTL %v)", takeover.Round(time.Millisecond), leaseTTL)
	if takeover < leaseTTL/2 {
		t.Errorf("B got the lease only %v after A was cut off; A's lease (TTL %v) cannot have expired", takeover, leaseTTL)
	}

	e.c.Heal(a)
	e.c.WaitReady(time.Minute, 3)
	w2.waitFlushes(10, time.Minute)
	w1.stop()
	w2.stop()
	e.verifyEverywhere(w1, w2)

	// Fencing: none of A's writes issued after the cut landed anywhere.
	// (A fresh context: the first one was spent before the partition.)
	ctx, cancel = context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, site := range e.c.Names() {
		cl, err := checker.Dial(ctx, nil, e.nbd(site), volName+"@ro")
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, blockSize)
		for blk := uint64(0); blk < blocks; blk++ {
			if err := cl.Read(ctx, blk*blockSize, buf); err != nil {
				t.Fatal(err)
			}
			h, ok := checker.ParseHeader(buf)
			if ok && h.Run == w1.ck.RunID() && h.WriteID > uint64(issuedAtCut) {
				t.Fatalf("at %s, block %d holds A's write %d, issued after A was cut off (%d issued before): A was not fenced",
					site, blk, h.WriteID, issuedAtCut)
			}
		}
		cl.Close()
	}
	s1 := w1.ck.Snapshot()
	report(t, "writer's site cut off; second writer takes over", takeover, w2)
	t.Logf("A's client: %d flushes ok, %d failed; %d writes issued after the cut, none landed", s1.FlushesOK, s1.FlushesFailed, s1.WritesIssued-issuedAtCut)
}

// TestFailoverTime kills the leader repeatedly while a client writes at a
// follower and reports the time from the kill to the first acknowledged
// flush (median and worst). ROBIB_FAILOVER_KILLS sets the count (default 3;
// `make soak` runs 12).
func TestFailoverTime(t *testing.T) {
	kills := envInt(t, "ROBIB_FAILOVER_KILLS", 3)
	const blocks = 512
	e := newEnv(t, fmt.Sprintf("%dMiB", kills*blocks*blockSize>>20+8))
	var stalls []time.Duration
	var runs []*run
	for i := range kills {
		leader := e.c.MustLeader()
		follower := e.others(leader)[0]
		r := e.startRun(fmt.Sprintf("writer-%d", i), checker.Options{
			Addrs: []string{e.nbd(follower)}, Blocks: blocks, BaseOffset: uint64(i * blocks * blockSize)})
		runs = append(runs, r)
		r.waitFlushes(20, time.Minute)
		e.c.Kill(leader)
		t0 := time.Now()
		stall := r.stallAfter(t0, time.Minute)
		stalls = append(stalls, stall)
		report(t, fmt.Sprintf("kill -9 leader %s (%d/%d)", leader, i+1, kills), stall, r)
		e.c.WaitLeader(time.Minute, leader)
		e.c.Start(leader)
		e.c.WaitReady(time.Minute, 3)
		r.waitFlushes(5, time.Minute)
		r.stop()
	}
	median, worst := durations(stalls)
	t.Logf("FAILOVER over %d leader kills: median %v, worst %v (goal: median < 2s, worst < 4s); all: %v",
		kills, median.Round(time.Millisecond), worst.Round(time.Millisecond), stalls)
	e.verifyEverywhere(runs...)
	if median > 2*time.Second || worst > 4*time.Second {
		t.Errorf("failover median %v / worst %v misses the goal (2s / 4s)", median, worst)
	}
}

// TestLeaderFollowsWriter: with the product default
// (--leader-follows-writes), a client that keeps writing at a follower gets
// the leader moved to its site within seconds, on the same connection and
// without an error; its flushes then commit without a forward. A writer at
// another site later pulls leadership there. Nothing flushed is lost.
func TestLeaderFollowsWriter(t *testing.T) {
	e := newEnvArgs(t, "64MiB")
	first := e.c.MustLeader()
	writer := e.others(first)[0]
	r := e.startRun("writer", checker.Options{Addrs: []string{e.nbd(writer)}, Blocks: 2048})
	r.waitFlushes(20, time.Minute)
	t0 := time.Now()
	waitLeaderIs(t, e, writer, time.Minute)
	t.Logf("leadership moved from %s to the writing site %s after %v of writes", first, writer, time.Since(t0).Round(100*time.Millisecond))
	r.waitFlushes(50, time.Minute)
	if s := r.ck.Snapshot(); s.Sessions != 1 || s.FlushesFailed != 0 {
		t.Errorf("the client at %s saw the move: %d sessions, %d failed flushes", writer, s.Sessions, s.FlushesFailed)
	}
	report(t, "leader moves to the writer", 0, r)
	r.stop()

	// The volume changes hands: its writer now sits at the third site.
	third := e.others(first, writer)[0]
	r2 := e.startRun("writer-2", checker.Options{Addrs: []string{e.nbd(third)}, Blocks: 2048, BaseOffset: 2048 * blockSize})
	r2.waitFlushes(20, time.Minute)
	waitLeaderIs(t, e, third, time.Minute)
	r2.waitFlushes(20, time.Minute)
	r2.stop()
	e.verifyEverywhere(r, r2)
}

// waitLeaderIs waits until every site names site as the leader.
func waitLeaderIs(t *testing.T, e *env, site string, timeout time.Duration) {
	t.Helper()
	harness.WaitFor(t, timeout, "leader "+site, func() (bool, error) {
		l, err := e.c.Leader()
		if err != nil {
			return false, err
		}
		if l != site {
			return false, fmt.Errorf("the leader is %s", l)
		}
		return true, nil
	})
}
