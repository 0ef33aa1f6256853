package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/robib/robib/dcd"
	"github.com/robib/robib/nbdfront"
)

// TestSingleWriterPerVolume: a read-write attach at one site holds the
// volume's lease; a read-write attach at another site is refused with a
// message naming the holder, a read-only attach works anywhere, and once
// the holder detaches, the other site can attach read-write and its writes
// fence nothing it should not.
func TestSingleWriterPerVolume(t *testing.T) {
	sites := startCluster(t, 3, nil)
	const size = 4 << 20
	createVolume(t, sites[0], "one", size)
	waitCaughtUp(t, sites)
	a, b := sites[1], sites[2]

	ea := openExport(t, a, "one")
	first := bytes.Repeat([]byte("A"), 64<<10)
	if _, err := ea.WriteAt(first, 0); err != nil {
		t.Fatal(err)
	}
	if err := ea.Flush(); err != nil {
		t.Fatal(err)
	}
	// A second connection at the same site shares the stage and the lease.
	ea2 := openExport(t, a, "one")

	start := time.Now()
	_, err := b.a.backend.Open("one")
	if !errors.Is(err, nbdfront.ErrBusy) {
		t.Fatalf("read-write attach at %s while %s holds the lease: %v, want ErrBusy", b.cfg.Name, a.cfg.Name, err)
	}
	for _, want := range []string{a.cfg.Name, "one@ro", "read-write"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal %q does not mention %q", err, want)
		}
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("refusal took %v", d)
	}

	// Read-only attach at b: sees the flushed data once applied, refuses writes.
	waitCaughtUp(t, sites)
	ro := openExport(t, b, "one@ro")
	if !ro.Info().ReadOnly || ro.Info().Name != "one@ro" {
		t.Fatalf("read-only export info = %+v", ro.Info())
	}
	got := make([]byte, len(first))
	if _, err := ro.ReadAt(got, 0); err != nil || !bytes.Equal(got, first) {
		t.Fatalf("read-only read: %v, equal=%v", err, bytes.Equal(got, first))
	}
	if _, err := ro.WriteAt(first, 0); !errors.Is(err, nbdfront.ErrReadOnly) {
		t.Fatalf("write through read-only attach: %v", err)
	}
	if err := ro.Close(); err != nil {
		t.Fatal(err)
	}
	if info, err := b.a.backend.Info("one@ro"); err != nil || !info.ReadOnly {
		t.Fatalf("Info(one@ro) = %+v, %v", info, err)
	}
	for _, bad := range []string{"@ro", "nope@ro", "one@rw", ""} {
		if _, err := b.a.backend.Open(bad); !errors.Is(err, nbdfront.ErrUnknownExport) {
			t.Errorf("Open(%q) = %v, want ErrUnknownExport", bad, err)
		}
	}

	// Both connections at a close: the lease is released and b may write.
	ea.Close()
	ea2.Close()
	eb := openExport(t, b, "one")
	second := bytes.Repeat([]byte("B"), 64<<10)
	if _, err := eb.WriteAt(second, 64<<10); err != nil {
		t.Fatal(err)
	}
	if err := eb.Flush(); err != nil {
		t.Fatal(err)
	}
	// Now a is refused in turn.
	if _, err := a.a.backend.Open("one"); !errors.Is(err, nbdfront.ErrBusy) {
		t.Fatalf("attach at the former holder while b holds the lease: %v", err)
	}
	eb.Close()
	waitCaughtUp(t, sites)
	for _, s := range sites {
		got := readAll(t, s, "one@ro", 128<<10)
		if !bytes.Equal(got[:64<<10], first) || !bytes.Equal(got[64<<10:], second) {
			t.Fatalf("%s: data differs after the hand-over", s.cfg.Name)
		}
	}
}

// TestLeaseTakenOverFencesOldHolder: when the holder stops renewing (here:
// its renewals are stopped, as if it were cut off), another site gets the
// lease after the TTL, and the old holder's buffered writes are rejected
// by the FSM (stale epoch) instead of landing behind the new holder.
func TestLeaseTakenOverFencesOldHolder(t *testing.T) {
	sites := startCluster(t, 3, nil)
	const size = 4 << 20
	createVolume(t, sites[0], "fence", size)
	waitCaughtUp(t, sites)
	a, b := sites[1], sites[2]

	ea := openExport(t, a, "fence")
	if _, err := ea.WriteAt(bytes.Repeat([]byte("1"), 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := ea.Flush(); err != nil {
		t.Fatal(err)
	}
	// Silence a's renewals: from the cluster's point of view a is gone.
	a.a.backend.mu.Lock()
	st := a.a.backend.stages["fence"]
	a.a.backend.mu.Unlock()
	st.stopRenewal()
	st.stopRenew, st.renewDone = make(chan struct{}), make(chan struct{})
	close(st.renewDone) // closeStage's stopRenewal must not block

	// b is refused at first, then gets the lease once a's has expired. a
	// stops serving (self-fencing) before that: never do both sites
	// answer reads of the volume at once.
	stopped := make(chan time.Time, 1)
	go func() { // when does a stop serving reads?
		buf := make([]byte, 4096)
		for {
			_, err := ea.ReadAt(buf, 0)
			if errors.Is(err, errLeaseSuspended) {
				stopped <- time.Now()
				return
			}
			if err != nil {
				t.Errorf("read at the old holder: %v", err)
				close(stopped)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	var eb nbdfront.Export
	waitFor(t, 30*time.Second, "b takes the expired lease", func() (bool, error) {
		e, err := b.a.backend.Open("fence")
		if errors.Is(err, nbdfront.ErrBusy) {
			return false, nil
		}
		eb = e
		return err == nil, err
	})
	bAttached := time.Now()
	select {
	case aStopped := <-stopped:
		if !aStopped.Before(bAttached) {
			t.Fatalf("the old holder stopped serving at %v, after b attached (%v)", aStopped, bAttached)
		}
	default:
		t.Fatal("the old holder still serves reads after b took the lease")
	}
	if code := nbdErrors.Code(fmt.Errorf("read: %w", errLeaseSuspended)); code != nbdfront.EIO {
		t.Errorf("a suspended holder answers NBD error %d, want EIO", code)
	}
	if _, err := eb.WriteAt(bytes.Repeat([]byte("2"), 4096), 4096); err != nil {
		t.Fatal(err)
	}
	if err := eb.Flush(); err != nil {
		t.Fatal(err)
	}
	// a still believes it holds the lease; its next flushed write must fail
	// and must not reach any site.
	if _, err := ea.WriteAt(bytes.Repeat([]byte("X"), 4096), 4096); err != nil && !errors.Is(err, dcd.ErrFailed) && !errors.Is(err, errLeaseSuspended) {
		t.Fatal(err)
	}
	if err := ea.Flush(); !errors.Is(err, dcd.ErrFailed) && !errors.Is(err, errLeaseSuspended) {
		t.Fatalf("old holder's flush = %v, want a failure", err)
	}
	// Its buffered write is dropped (never lands anywhere) once it flushes
	// through the stage: push it through dcd directly.
	if _, err := st.dcd.WriteAt(bytes.Repeat([]byte("X"), 4096), 4096); err != nil && !errors.Is(err, dcd.ErrFailed) {
		t.Fatal(err)
	}
	if err := st.dcd.Flush(); !errors.Is(err, dcd.ErrFailed) {
		t.Fatalf("old holder's flush through its stage = %v, want a failure", err)
	}
	// A new attach at a, while its failed stage is still open, does not
	// join that stage: it asks for the lease again (held by b: refused).
	if _, err := a.a.backend.Open("fence"); !errors.Is(err, nbdfront.ErrBusy) {
		t.Fatalf("attach at the fenced site while b holds the lease: %v, want ErrBusy", err)
	}
	ea.Close()
	waitCaughtUp(t, sites)
	for _, s := range sites {
		got := readAll(t, s, "fence@ro", 8192)
		if !bytes.Equal(got[:4096], bytes.Repeat([]byte("1"), 4096)) || !bytes.Equal(got[4096:], bytes.Repeat([]byte("2"), 4096)) {
			t.Fatalf("%s: the fenced writer's data landed (or the holders' data is missing)", s.cfg.Name)
		}
	}
	// Once b detaches, a can write again, under a new epoch.
	eb.Close()
	ea = openExport(t, a, "fence")
	defer ea.Close()
	if _, err := ea.WriteAt(bytes.Repeat([]byte("3"), 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := ea.Flush(); err != nil {
		t.Fatalf("flush at the former holder after it took the lease back: %v", err)
	}
}

// TestWriteStageShowsWhereWritesSpendTheirTime: after writes and flushes
// at a follower, `volume stats` lists the stages of the write path with
// counts at the sites where they happen: the forward at the writer, the
// leader's proposal, store and replication, the followers' store, and the
// state machine everywhere.
func TestWriteStageShowsWhereWritesSpendTheirTime(t *testing.T) {
	sites := startCluster(t, 3, nil)
	createVolume(t, sites[0], "where", 1<<20)
	waitCaughtUp(t, sites)
	leader, followers := leaderOf(t, sites)
	w := followers[0]
	e := openExport(t, w, "where")
	defer e.Close()
	for i := 0; i < 20; i++ {
		if _, err := e.WriteAt(bytes.Repeat([]byte{byte(i)}, 4096), int64(i)*4096); err != nil {
			t.Fatal(err)
		}
		if err := e.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	waitCaughtUp(t, sites)
	st, err := (&clusterService{node: w.a.node, store: w.a.store, stage: w.a.backend.stageStats}).WriteStage(context.Background(), "where")
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]uint64{}
	for _, x := range st.Breakdown {
		have[x.Site+" "+x.Stage] = x.Count
		if x.P50US < 0 || x.P99US < x.P50US {
			t.Errorf("%s %s: p50 %dµs p99 %dµs", x.Site, x.Stage, x.P50US, x.P99US)
		}
	}
	// The leader's append overlaps replication (LeaderOverlap): it
	// writes, and syncs in the background.
	for _, want := range []string{
		w.cfg.Name + " forward", leader.cfg.Name + " leader.propose", leader.cfg.Name + " leader.write",
		leader.cfg.Name + " leader.sync", leader.cfg.Name + " replicate", w.cfg.Name + " follower.store", w.cfg.Name + " fsm.apply", leader.cfg.Name + " fsm.apply",
	} {
		if have[want] == 0 {
			t.Errorf("no %q in the breakdown %v", want, have)
		}
	}
	if have[w.cfg.Name+" forward"] < 20 {
		t.Errorf("%d forwards recorded for 20 flushed writes", have[w.cfg.Name+" forward"])
	}
}
