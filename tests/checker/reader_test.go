package checker

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"
)

// runWithReaders runs c's workload with the given readers reading during
// the whole run, and returns each reader's figures.
func runWithReaders(t *testing.T, c *Checker, opts ...ReaderOptions) []ReadStats {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var readers []*Reader
	var wg sync.WaitGroup
	for _, o := range opts {
		r := c.NewReader(o)
		readers = append(readers, r)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := r.Run(ctx); err != nil {
				t.Errorf("reader: %v", err)
			}
		}()
	}
	run(t, c)
	cancel()
	wg.Wait()
	var out []ReadStats
	for _, r := range readers {
		s := r.Stats()
		t.Logf("%s: %d sessions, %d reads (%d checked, %d of them first reads of a session), %d stale, %d torn, %d foreign, %d torn in flight, %d errors",
			r.opts.Name, s.Sessions, s.Reads, s.Checked, s.FirstChecked, s.Stale, s.Torn, s.Foreign, s.InFlightTorn, s.ReadErrors)
		if s.Checked == 0 || s.FirstChecked == 0 || s.Sessions < 2 {
			t.Fatalf("%s checked nothing (or never re-attached): %+v", r.opts.Name, s)
		}
		out = append(out, s)
	}
	return out
}

func targets(tg ...ReadTarget) func() []ReadTarget { return func() []ReadTarget { return tg } }

// TestReaderCleanServer: reads during the run, read-write and as of the
// attach, of a server that serves what it was given: no bad read, and the
// read-modify-writes are verified clean.
func TestReaderCleanServer(t *testing.T) {
	st := newFakeStore(testStoreBlocks * testBS)
	addr := newFakeServer(t, st).start()
	c := newTestChecker(t, []string{addr}, func(o *Options) { o.Writes = 3000; o.RMWFraction = 0.3 })
	stats := runWithReaders(t, c,
		ReaderOptions{Name: "rw", Targets: targets(ReadTarget{Addr: addr, Export: "disk"}), ReadsPerSession: 16},
		ReaderOptions{Name: "ro", Targets: targets(ReadTarget{Addr: addr, Export: "disk", FloorAtAttach: true}), ReadsPerSession: 16})
	for _, s := range stats {
		if err := s.Err(); err != nil {
			t.Fatal(err)
		}
	}
	s := c.Snapshot()
	if s.RMWWrites < 500 || s.RMWStaleReads != 0 || s.RMWBadReads != 0 {
		t.Fatalf("read-modify-writes: %d (stale reads %d, bad reads %d)", s.RMWWrites, s.RMWStaleReads, s.RMWBadReads)
	}
	rmwFound := false
	for _, b := range c.Record().Blocks {
		if w := b.Writes[len(b.Writes)-1]; w.Segs != nil {
			rmwFound = true
		}
	}
	if !rmwFound {
		t.Fatal("no block's last write is a read-modify-write: the verification below would not cover them")
	}
	mustVerifyClean(t, c, addr)
}

// TestReaderDetectsStaleReads: from the 600th write on, the server serves
// reads from a copy frozen at that moment, while writes and flushes go on
// normally. A reader must report the stale reads; the data itself (read
// once the fault is gone) is fine.
func TestReaderDetectsStaleReads(t *testing.T) {
	st := newFakeStore(testStoreBlocks * testBS)
	st.writeHook = func(n int, off uint64, data, cur []byte) ([]byte, bool) {
		if n == 600 {
			st.staleFrom = append([]byte(nil), st.visible...)
		}
		return data, true
	}
	addr := newFakeServer(t, st).start()
	c := newTestChecker(t, []string{addr}, func(o *Options) { o.Writes = 3000 })
	s := runWithReaders(t, c, ReaderOptions{Name: "rw", Targets: targets(ReadTarget{Addr: addr, Export: "disk"}), ReadsPerSession: 16})[0]
	if s.Stale == 0 || s.Err() == nil {
		t.Fatalf("stale reads not reported: %+v", s)
	}
	p := s.Problems[0]
	if p.Class != Stale || p.Found >= p.Floor || !strings.Contains(p.Detail, "durable before the read began") {
		t.Fatalf("problem: %+v", p)
	}
	t.Logf("first: %v", p)
	st.mu.Lock()
	st.staleFrom = nil
	st.mu.Unlock()
	mustVerifyClean(t, c, addr)
}

// TestReaderFloorAtAttach: a server whose connections read the volume as
// it was when they attached (as a read-only copy may) passes the
// as-of-attach rule, and fails the per-read rule, which only the lease
// holder's read-write attach promises.
func TestReaderFloorAtAttach(t *testing.T) {
	st := newFakeStore(testStoreBlocks * testBS)
	addr := newFakeServer(t, st).start()
	snap := newFakeServer(t, st)
	snap.snapshotReads = true
	snapAddr := snap.start()
	c := newTestChecker(t, []string{addr}, func(o *Options) { o.Writes = 4000 })
	stats := runWithReaders(t, c,
		ReaderOptions{Name: "as of attach", Targets: targets(ReadTarget{Addr: snapAddr, Export: "disk", FloorAtAttach: true}), ReadsPerSession: 64},
		ReaderOptions{Name: "per read", Targets: targets(ReadTarget{Addr: snapAddr, Export: "disk"}), ReadsPerSession: 64})
	if err := stats[0].Err(); err != nil {
		t.Fatalf("as-of-attach reads of an as-of-attach copy: %v", err)
	}
	if stats[1].Stale == 0 {
		t.Fatalf("per-read floor: reads of a copy frozen at the attach were not reported stale: %+v", stats[1])
	}
}

// TestRMWStaleReadBecomesStaleData: every write is a read-modify-write,
// and from the 400th write on the server's reads return a frozen copy. The
// writer counts the stale reads, and after the fault is gone Verify finds
// blocks whose segments are older than what was durable: the stale read
// turned into stale data.
func TestRMWStaleReadBecomesStaleData(t *testing.T) {
	st := newFakeStore(testStoreBlocks * testBS)
	st.writeHook = func(n int, off uint64, data, cur []byte) ([]byte, bool) {
		if n == 400 {
			st.staleFrom = append([]byte(nil), st.visible...)
		}
		return data, true
	}
	addr := newFakeServer(t, st).start()
	c := newTestChecker(t, []string{addr}, func(o *Options) { o.Writes = 1500; o.RMWFraction = 1 })
	run(t, c)
	s := c.Snapshot()
	t.Logf("read-modify-writes %d, stale reads %d, bad reads %d", s.RMWWrites, s.RMWStaleReads, s.RMWBadReads)
	if s.RMWStaleReads == 0 || len(c.ReadProblems()) == 0 {
		t.Fatalf("the writer's stale reads were not counted: %+v", s)
	}
	st.mu.Lock()
	st.staleFrom = nil
	st.mu.Unlock()
	rep := verifyAt(t, c, addr, VerifyOptions{})
	requireNonVacuous(t, rep)
	if rep.Counts[Stale] == 0 || rep.Counts[Stale] != rep.ProblemCount {
		t.Fatalf("want only STALE blocks: %v", rep)
	}
	if d := rep.Problems[0].Detail; !strings.Contains(d, "stale") {
		t.Fatalf("detail does not explain: %s", d)
	}
}

// TestRMWCleanAcrossCrash: read-modify-writes across server crashes
// (unflushed writes lost, the runner reconnecting): what a read returns
// after a crash is legitimately older than what was acknowledged but never
// flushed, and must not be reported.
func TestRMWCleanAcrossCrash(t *testing.T) {
	st := newFakeStore(testStoreBlocks * testBS)
	s1 := newFakeServer(t, st)
	s1.crashAt, s1.crashNeedsAcked, s1.replyDelay = 300, true, 2*time.Millisecond
	a1 := s1.start()
	a2 := newFakeServer(t, st).start()
	c := newTestChecker(t, []string{a1, a2}, func(o *Options) { o.Writes = 1500; o.RMWFraction = 0.7; o.FlushEvery = 16 })
	run(t, c)
	if s1.crashTime().IsZero() {
		t.Fatal("the first server never crashed")
	}
	s := c.Snapshot()
	if s.RMWWrites == 0 || s.RMWStaleReads != 0 || s.Sessions < 2 {
		t.Fatalf("stats: %+v; read problems %v", s, c.ReadProblems())
	}
	mustVerifyClean(t, c, a2)
}
