package checker

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"hash/crc32"
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

const testBS = 4096

// testStoreBlocks: the fake export holds twice the working set, so blocks
// beyond it can be checked as never written.
const (
	testBlocks      = 32
	testStoreBlocks = 64
)

func newTestChecker(t *testing.T, addrs []string, mod func(*Options)) *Checker {
	t.Helper()
	opts := Options{
		Addrs:       addrs,
		Export:      "disk",
		Blocks:      testBlocks,
		QueueDepth:  8,
		FlushEvery:  8,
		FUAFraction: 0.1,
		Seed:        1,
		Writes:      800,
		OpTimeout:   5 * time.Second,
		Logf:        t.Logf,
	}
	if mod != nil {
		mod(&opts)
	}
	c, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func run(t *testing.T, c *Checker) Stats {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := c.Run(ctx); err != nil {
		t.Fatalf("Run: %v", err)
	}
	return c.Snapshot()
}

func verifyAt(t *testing.T, c *Checker, addr string, vo VerifyOptions) *Report {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	cl, err := Dial(ctx, nil, addr, c.Options().Export)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	rep, err := c.Verify(ctx, cl, vo)
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	t.Logf("verify: %v", rep)
	return rep
}

// requireNonVacuous fails unless the report covers written blocks with
// durable writes.
func requireNonVacuous(t *testing.T, rep *Report) {
	t.Helper()
	if rep.Checked == 0 || rep.Written == 0 || rep.Durable == 0 {
		t.Fatalf("vacuous verification: %v", rep)
	}
}

// mustVerifyClean verifies the export at addr: the check must cover
// written, durable blocks and find no problem.
func mustVerifyClean(t *testing.T, c *Checker, addr string) *Report {
	t.Helper()
	rep := verifyAt(t, c, addr, VerifyOptions{})
	requireNonVacuous(t, rep)
	if err := rep.Err(); err != nil {
		t.Fatal(err)
	}
	return rep
}

func blockOf(off uint64) uint64 { return off / testBS }

func TestCheckerCleanServer(t *testing.T) {
	st := newFakeStore(testStoreBlocks * testBS)
	s := newFakeServer(t, st)
	addr := s.start()
	c := newTestChecker(t, []string{addr}, func(o *Options) { o.Writes = 1000; o.FUAFraction = 0.2 })
	stats := run(t, c)
	t.Logf("stats: %+v", stats)
	if stats.WritesIssued != 1000 || stats.WritesAcked != 1000 || stats.WritesFailed+stats.WritesUnanswered != 0 || stats.WritesInFlight != 0 {
		t.Fatalf("write counts: %+v", stats)
	}
	if stats.FlushesOK < 2 || stats.FlushesFailed != 0 || stats.FUAWrites == 0 || stats.Sessions != 1 || stats.Reconnects != 0 {
		t.Fatalf("flush/session counts: %+v", stats)
	}
	if stats.BlocksDurable != testBlocks || stats.LongestStall <= 0 || stats.Running {
		t.Fatalf("durability/stall: %+v", stats)
	}
	if fl := c.Flushes(); !fl[len(fl)-1].Final || !fl[len(fl)-1].OK {
		t.Fatalf("last flush %+v is not a successful final flush", fl[len(fl)-1])
	}

	rep := verifyAt(t, c, addr, VerifyOptions{Unwritten: 100})
	requireNonVacuous(t, rep)
	if err := rep.Err(); err != nil {
		t.Fatal(err)
	}
	if rep.Written != testBlocks || rep.Durable != testBlocks || rep.OKData != testBlocks ||
		rep.Unwritten != testStoreBlocks-testBlocks || rep.OKZero != rep.Unwritten {
		t.Fatalf("report: %+v", rep)
	}
	// Nothing was lost, so even the strict floor holds.
	if err := verifyAt(t, c, addr, VerifyOptions{Floor: FloorAcked}).Err(); err != nil {
		t.Fatal(err)
	}

	// Control: the same record catches a single flipped byte.
	st.mu.Lock()
	st.visible[7*testBS+1000] ^= 0x40
	st.mu.Unlock()
	rep = verifyAt(t, c, addr, VerifyOptions{})
	if rep.ProblemCount != 1 || rep.Counts[Torn] != 1 || rep.Problems[0].Block != 7 {
		t.Fatalf("flipped byte: %v", rep)
	}
}

func TestCheckerDetectsStaleWrite(t *testing.T) {
	st := newFakeStore(testStoreBlocks * testBS)
	seen := false
	st.writeHook = func(n int, off uint64, data, cur []byte) ([]byte, bool) {
		if blockOf(off) != 3 {
			return data, true
		}
		if seen {
			return nil, false // acknowledged, flushed, never stored
		}
		seen = true
		return data, true
	}
	s := newFakeServer(t, st)
	addr := s.start()
	c := newTestChecker(t, []string{addr}, nil)
	run(t, c)
	for _, br := range c.Record().Blocks {
		if br.Block == 3 && br.LastSeq < 2 {
			t.Fatalf("block 3 was written only once")
		}
	}
	rep := verifyAt(t, c, addr, VerifyOptions{})
	requireNonVacuous(t, rep)
	if rep.ProblemCount != 1 || rep.Counts[Stale] != 1 {
		t.Fatalf("want one STALE block: %v", rep)
	}
	p := rep.Problems[0]
	if p.Block != 3 || p.Class != Stale || p.Found == nil || p.Found.Seq != 1 || p.Floor < 2 {
		t.Fatalf("problem: %+v", p)
	}
}

func TestCheckerDetectsTornBlocks(t *testing.T) {
	st := newFakeStore(testStoreBlocks * testBS)
	written := map[uint64]bool{}
	st.writeHook = func(n int, off uint64, data, cur []byte) ([]byte, bool) {
		blk := blockOf(off)
		defer func() { written[blk] = true }()
		half := len(data) / 2
		switch {
		case blk == 5 && written[blk]:
			// New first half (header), old second half.
			return append(append([]byte(nil), data[:half]...), cur[half:]...), true
		case blk == 6:
			// Old (never written: zero) first half, new second half.
			return append(append([]byte(nil), cur[:half]...), data[half:]...), true
		}
		return data, true
	}
	s := newFakeServer(t, st)
	addr := s.start()
	c := newTestChecker(t, []string{addr}, nil)
	run(t, c)
	rep := verifyAt(t, c, addr, VerifyOptions{})
	requireNonVacuous(t, rep)
	if rep.ProblemCount != 2 || rep.Counts[Torn] != 2 {
		t.Fatalf("want two TORN blocks: %v", rep)
	}
	p5, p6 := rep.Problems[0], rep.Problems[1]
	if p5.Block != 5 || p5.Found == nil || p5.Found.ChecksumOK || !strings.Contains(p5.Detail, "checksum mismatch") {
		t.Fatalf("block 5: %+v", p5)
	}
	if p6.Block != 6 || p6.Found != nil || !strings.Contains(p6.Detail, "0-3:zero, 4-7:seq ") {
		t.Fatalf("block 6: %+v", p6)
	}

	// The record survives JSON and verifies the same way.
	var buf bytes.Buffer
	if err := c.WriteJSON(&buf); err != nil {
		t.Fatal(err)
	}
	c2, err := Load(&buf, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c2.RunID() != c.RunID() {
		t.Fatal("run ID lost")
	}
	rep2 := verifyAt(t, c2, addr, VerifyOptions{})
	if rep2.ProblemCount != 2 || rep2.Counts[Torn] != 2 || rep2.Checked != rep.Checked || rep2.Durable != rep.Durable {
		t.Fatalf("after JSON round trip: %v", rep2)
	}
	if _, err := json.Marshal(rep2); err != nil {
		t.Fatal(err)
	}
}

func TestCheckerDetectsForeignAndMissing(t *testing.T) {
	st := newFakeStore(testStoreBlocks * testBS)
	st.readHook = func(off uint64) uint64 {
		switch blockOf(off) {
		case 7:
			return 8 * testBS // another block's data
		case 9:
			return 40 * testBS // never written: zeros
		}
		return off
	}
	s := newFakeServer(t, st)
	addr := s.start()
	c := newTestChecker(t, []string{addr}, nil)
	run(t, c)
	rep := verifyAt(t, c, addr, VerifyOptions{})
	requireNonVacuous(t, rep)
	if rep.ProblemCount != 2 || rep.Counts[Foreign] != 1 || rep.Counts[Missing] != 1 {
		t.Fatalf("want one FOREIGN and one MISSING block: %v", rep)
	}
	if p := rep.Problems[0]; p.Block != 7 || p.Class != Foreign || p.Found == nil || p.Found.Block != 8 {
		t.Fatalf("block 7: %+v", p)
	}
	if p := rep.Problems[1]; p.Block != 9 || p.Class != Missing || !strings.Contains(p.Detail, "zeros") {
		t.Fatalf("block 9: %+v", p)
	}

	// Another run overwrites the first four blocks: foreign to this one.
	st.readHook = nil
	other := newTestChecker(t, []string{addr}, func(o *Options) { o.Blocks = 4; o.Writes = 40; o.Seed = 2 })
	run(t, other)
	rep = verifyAt(t, c, addr, VerifyOptions{})
	if rep.ProblemCount != 4 || rep.Counts[Foreign] != 4 || !strings.Contains(rep.Problems[0].Detail, "another run") {
		t.Fatalf("want four FOREIGN blocks: %v", rep)
	}
}

func TestCheckerDetectsLostWrites(t *testing.T) {
	st := newFakeStore(testStoreBlocks * testBS)
	st.writeHook = func(n int, off uint64, data, cur []byte) ([]byte, bool) {
		return data, n <= 20 // everything after the 20th write vanishes
	}
	s := newFakeServer(t, st)
	addr := s.start()
	c := newTestChecker(t, []string{addr}, nil)
	run(t, c)
	rep := verifyAt(t, c, addr, VerifyOptions{})
	requireNonVacuous(t, rep)
	if rep.Counts[Stale] == 0 || rep.Counts[Missing] == 0 || rep.ProblemCount != rep.Counts[Stale]+rep.Counts[Missing] {
		t.Fatalf("want only STALE and MISSING blocks: %v", rep)
	}
	if rep.ProblemCount != rep.Written {
		t.Fatalf("every written block lost its newest durable write, but %d of %d were reported", rep.ProblemCount, rep.Written)
	}
}

func TestCheckerDetectsLyingFlush(t *testing.T) {
	for _, lie := range []bool{false, true} {
		t.Run(map[bool]string{false: "honest", true: "lying"}[lie], func(t *testing.T) {
			st := newFakeStore(testStoreBlocks * testBS)
			st.lieFlush = lie
			a := newFakeServer(t, st)
			addrA := a.start()
			b := newFakeServer(t, st)
			addrB := b.start()
			c := newTestChecker(t, []string{addrA}, func(o *Options) { o.FUAFraction = 0 })
			run(t, c)
			a.crash() // everything not durable is lost
			rep := verifyAt(t, c, addrB, VerifyOptions{})
			requireNonVacuous(t, rep)
			if !lie {
				if err := rep.Err(); err != nil {
					t.Fatal(err)
				}
				return
			}
			if rep.Counts[Missing] != rep.Written || rep.ProblemCount != rep.Written {
				t.Fatalf("want every block MISSING: %v", rep)
			}
		})
	}
}

func TestCheckerReconnectsAfterCrash(t *testing.T) {
	st := newFakeStore(testStoreBlocks * testBS)
	a := newFakeServer(t, st)
	a.crashAt = 300
	addrA := a.start()
	b := newFakeServer(t, st)
	addrB := b.start()
	c := newTestChecker(t, []string{addrA, addrB}, func(o *Options) { o.Writes = 900 })
	stats := run(t, c)
	t.Logf("stats: %+v", stats)
	if stats.Reconnects < 1 || stats.WritesUnanswered < 1 || stats.WritesIssued != 900 {
		t.Fatalf("stats: %+v", stats)
	}
	sess := c.Sessions()
	if sess[0].Addr != addrA || sess[len(sess)-1].Addr != addrB || sess[0].Reason == "" {
		t.Fatalf("sessions: %+v", sess)
	}
	crashed := a.crashTime()
	d, ok := c.StallAround(crashed)
	if !ok || d <= 0 {
		t.Fatalf("StallAround(crash) = %v, %v", d, ok)
	}
	t.Logf("failover: first acknowledged flush %v after the crash (longest stall %v)", d, stats.LongestStall)
	if _, ok := c.StallAround(time.Now()); ok {
		t.Fatal("StallAround(now) found a flush sent in the future")
	}

	rep := verifyAt(t, c, addrB, VerifyOptions{Unwritten: 8})
	requireNonVacuous(t, rep)
	if err := rep.Err(); err != nil {
		t.Fatal(err)
	}

	// The record of the crash: writes in flight at the crash are maybes.
	var unanswered int
	for _, br := range c.Record().Blocks {
		for _, w := range br.Writes {
			if w.State == WriteUnanswered {
				unanswered++
			}
		}
	}
	if unanswered == 0 {
		t.Fatal("no unanswered write in the record")
	}
}

// TestCheckerFlushCoverage pins the acknowledgement rule: a FLUSH covers
// only the writes whose replies had arrived when it was sent. The server
// answers late and makes durable only what it had answered when it
// processed the FLUSH, then crashes mid-run. Nothing durable may be
// missing, while acknowledged-but-unflushed writes really were lost (so the
// scenario is not vacuous).
func TestCheckerFlushCoverage(t *testing.T) {
	st := newFakeStore(testStoreBlocks * testBS)
	a := newFakeServer(t, st)
	a.replyDelay = 2 * time.Millisecond
	a.crashAt = 400
	a.crashNeedsAcked = true // else a FLUSH just before the crash may leave no acknowledged write to lose
	addrA := a.start()
	b := newFakeServer(t, st)
	addrB := b.start()
	c := newTestChecker(t, []string{addrA}, func(o *Options) { o.Writes = 0; o.FlushEvery = 48; o.FUAFraction = 0 })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	pollUntil(t, 10*time.Second, "the crash and a failed reconnect", func() bool {
		return !a.crashTime().IsZero() && c.Snapshot().AttachFailures >= 1
	})
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run: %v", err)
	}
	stats := c.Snapshot()
	a.mu.Lock()
	partial := a.partialFlushes
	a.mu.Unlock()
	t.Logf("stats: %+v; flushes with unanswered writes excluded: %d", stats, partial)
	if stats.FlushesOK < 2 || partial == 0 {
		t.Fatalf("scenario did not happen: %d flushes ok, %d partial", stats.FlushesOK, partial)
	}
	mustVerifyClean(t, c, addrB)
	if strict := verifyAt(t, c, addrB, VerifyOptions{Floor: FloorAcked}); strict.ProblemCount == 0 {
		t.Fatal("no acknowledged write was lost in the crash: the test proves nothing")
	}
}

func TestCheckerSkipsBadSites(t *testing.T) {
	st := newFakeStore(testStoreBlocks * testBS)
	refusing := newFakeServer(t, st)
	refusing.refuse, refusing.refuseMsg = ErrPolicy, "not serving this volume"
	addrR := refusing.start()
	readOnly := newFakeServer(t, st)
	readOnly.flags |= FlagReadOnly
	addrRO := readOnly.start()
	good := newFakeServer(t, st)
	addrG := good.start()
	gone := newFakeServer(t, st)
	dead := gone.start()
	gone.close() // nothing listens there any more
	c := newTestChecker(t, []string{dead, addrR, addrRO, addrG}, func(o *Options) { o.Writes = 200 })
	stats := run(t, c)
	if stats.AttachFailures != 3 || stats.Sessions != 1 {
		t.Fatalf("stats: %+v", stats)
	}
	rec := c.Record()
	if !strings.Contains(rec.Attempts[1].Err, "NBD_REP_ERR_POLICY: not serving this volume") || !strings.Contains(rec.Attempts[2].Err, "read-only") {
		t.Fatalf("attempts: %+v", rec.Attempts)
	}
	mustVerifyClean(t, c, addrG)
}

func TestCheckerUnsuitableExport(t *testing.T) {
	s := newFakeServer(t, newFakeStore(8*testBS))
	addr := s.start()
	c := newTestChecker(t, []string{addr}, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Run(ctx); !errors.Is(err, ErrUnsuitable) {
		t.Fatalf("Run on a too small export: %v", err)
	}
}

func TestCheckerRunCancel(t *testing.T) {
	st := newFakeStore(testStoreBlocks * testBS)
	s := newFakeServer(t, st)
	addr := s.start()
	c := newTestChecker(t, []string{addr}, func(o *Options) { o.Writes = 0 })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	pollUntil(t, 10*time.Second, "acknowledged writes and flushes", func() bool {
		st := c.Snapshot()
		return st.WritesAcked >= 200 && st.FlushesOK >= 2 && st.Running
	})
	if _, err := c.Verify(context.Background(), nil, VerifyOptions{}); !errors.Is(err, ErrRunning) {
		t.Fatalf("Verify during Run: %v", err)
	}
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after cancellation")
	}
	stats := c.Snapshot()
	if stats.Running || stats.WritesInFlight != 0 || stats.WritesAcked+stats.WritesFailed+stats.WritesUnanswered != stats.WritesIssued {
		t.Fatalf("stats after cancel: %+v", stats)
	}
	mustVerifyClean(t, c, addr)
}

func TestCheckerNoServerUntilDeadline(t *testing.T) {
	tmp := newFakeServer(t, newFakeStore(testBS))
	dead := tmp.start()
	tmp.close()
	c := newTestChecker(t, []string{dead, "unix:/nonexistent/robib-checker.sock"}, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := c.Run(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Run: %v", err)
	}
	if st := c.Snapshot(); st.AttachFailures < 2 || st.Sessions != 0 {
		t.Fatalf("stats: %+v", st)
	}
}

func TestCheckerStalledServerTimesOut(t *testing.T) {
	st := newFakeStore(testStoreBlocks * testBS)
	stalled := newFakeServer(t, st)
	stalled.blackhole = true
	addrS := stalled.start()
	good := newFakeServer(t, st)
	addrG := good.start()
	c := newTestChecker(t, []string{addrS, addrG}, func(o *Options) { o.Writes = 200; o.OpTimeout = 200 * time.Millisecond })
	stats := run(t, c)
	if stats.Reconnects != 1 || stats.WritesUnanswered < 1 {
		t.Fatalf("stats: %+v", stats)
	}
	mustVerifyClean(t, c, addrG)
}

// TestClassifySectorTearing builds blocks directly: every 512-byte tear
// between two writes, and the other ways a block can be wrong.
func TestClassifySectorTearing(t *testing.T) {
	c, err := New(Options{Addrs: []string{"unused"}, Blocks: 2})
	if err != nil {
		t.Fatal(err)
	}
	v := &blockView{blk: 0, lastSeq: 6, acked: 6, durable: 5}
	for seq := uint64(4); seq <= 6; seq++ {
		v.writes = append(v.writes, WriteRecord{Seq: seq, ID: 10 + seq, Writer: 1, Session: 1, State: WriteAcked})
	}
	enc := func(w WriteRecord, blk uint64) []byte {
		b := make([]byte, testBS)
		encodeBlock(b, c.runID, blk, &w)
		return b
	}
	w4, w5, w6 := enc(v.writes[0], 0), enc(v.writes[1], 0), enc(v.writes[2], 0)
	zero := make([]byte, testBS)
	mix := func(a, b []byte, k int) []byte {
		return append(append([]byte(nil), a[:k*SectorSize]...), b[k*SectorSize:]...)
	}
	check := func(name string, data []byte, floor uint64, want Class) {
		t.Helper()
		got, p := c.classify(v, data, floor)
		if got != want {
			t.Errorf("%s: got %s (%v), want %s", name, got, p, want)
		}
		if (p == nil) != (want == OK) {
			t.Errorf("%s: problem %v for class %s", name, p, got)
		}
	}
	check("seq 5", w5, 5, OK)
	check("seq 6", w6, 5, OK)
	check("seq 4", w4, 5, Stale)
	check("seq 4, floor 0", w4, 0, OK)
	check("zeros", zero, 5, Missing)
	check("zeros, floor 0", zero, 0, OK)
	for k := 1; k < testBS/SectorSize; k++ {
		check("5|6 at sector "+string(rune('0'+k)), mix(w5, w6, k), 5, Torn)
		check("6|5 at sector "+string(rune('0'+k)), mix(w6, w5, k), 5, Torn)
		check("zero|6 at sector "+string(rune('0'+k)), mix(zero, w6, k), 5, Torn)
		check("6|zero at sector "+string(rune('0'+k)), mix(w6, zero, k), 5, Torn)
		check("zero|6 at sector "+string(rune('0'+k))+", floor 0", mix(zero, w6, k), 0, Torn)
	}
	_, p := c.classify(v, mix(mix(w5, w6, 2), w4, 5), 5)
	if p == nil || !strings.Contains(p.Detail, "sectors 0-1:seq 5, 2-4:seq 6, 5-7:seq 4") {
		t.Errorf("three-way tear: %v", p)
	}

	garbage := make([]byte, testBS)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range garbage {
		garbage[i] = byte(r.Uint32())
	}
	check("garbage", garbage, 5, Missing)
	check("garbage, floor 0", garbage, 0, Corrupt)

	flipped := append([]byte(nil), w6...)
	flipped[3000] ^= 1
	check("bit flip in payload", flipped, 5, Torn)
	crcFlip := append([]byte(nil), w6...)
	crcFlip[testBS-1] ^= 1
	check("bit flip in checksum", crcFlip, 5, Torn)

	// Valid checksum over content no write carried.
	forged := append([]byte(nil), w6...)
	forged[3000] ^= 1
	reseal(forged)
	check("forged payload", forged, 5, Corrupt)
	badID := append([]byte(nil), w6...)
	badID[offWriteID+7] ^= 1
	reseal(badID)
	check("write id mismatch", badID, 5, Foreign)

	check("another block", enc(v.writes[2], 1), 5, Foreign)
	check("never issued seq 7", enc(WriteRecord{Seq: 7, ID: 17, Writer: 1, Session: 1}, 0), 5, Foreign)
	other, _ := New(Options{Addrs: []string{"unused"}, Blocks: 2})
	ob := make([]byte, testBS)
	encodeBlock(ob, other.runID, 0, &v.writes[2])
	check("another run", ob, 5, Foreign)
	small := make([]byte, 512)
	encodeBlock(small, c.runID, 0, &v.writes[2])
	check("another block size", append(small, make([]byte, testBS-512)...), 5, Torn)
}

// reseal recomputes a block's checksum after it was tampered with.
func reseal(b []byte) {
	binary.BigEndian.PutUint32(b[len(b)-4:], crc32.Checksum(b[:len(b)-4], castagnoli))
}

func TestNbdkitChecker(t *testing.T) {
	addr := startNbdkit(t, nil)
	c := newTestChecker(t, []string{addr}, func(o *Options) {
		o.Export = ""
		o.Blocks = 256
		o.Writes = 3000
		o.QueueDepth = 16
		o.FlushEvery = 32
		o.FUAFraction = 0.2
	})
	stats := run(t, c)
	if stats.WritesAcked != 3000 || stats.FlushesOK == 0 {
		t.Fatalf("stats: %+v", stats)
	}
	for _, floor := range []FloorRule{FloorDurable, FloorAcked} {
		rep := verifyAt(t, c, addr, VerifyOptions{Floor: floor, Unwritten: 64})
		requireNonVacuous(t, rep)
		if err := rep.Err(); err != nil {
			t.Fatal(err)
		}
		if rep.Unwritten != 64 {
			t.Fatalf("unwritten blocks checked: %d", rep.Unwritten)
		}
	}
}

func TestNbdkitCheckerWithWriteErrors(t *testing.T) {
	addr := startNbdkit(t, []string{"--filter=error"}, "error=EIO", "error-pwrite-rate=5%")
	c := newTestChecker(t, []string{addr}, func(o *Options) {
		o.Export = ""
		o.Blocks = 128
		o.Writes = 2000
	})
	stats := run(t, c)
	t.Logf("stats: %+v", stats)
	if stats.WritesFailed == 0 || stats.WritesAcked == 0 {
		t.Fatalf("stats: %+v", stats)
	}
	mustVerifyClean(t, c, addr)
	var failed int
	for _, b := range c.Record().Blocks {
		for _, w := range b.Writes {
			if w.State == WriteFailed && strings.Contains(w.Err, "EIO") {
				failed++
			}
		}
	}
	if failed == 0 {
		t.Fatal("no failed write with EIO in the record")
	}
}
