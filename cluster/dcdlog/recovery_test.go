package dcdlog

import (
	"errors"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

func mustOpen(t *testing.T, dir string, opts Options) *Store {
	t.Helper()
	s, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func mustStore(t *testing.T, s *Store, logs ...*raft.Log) {
	t.Helper()
	if err := s.StoreLogs(logs); err != nil {
		t.Fatal(err)
	}
}

func wantRange(t *testing.T, s *Store, first, last uint64) {
	t.Helper()
	f, _ := s.FirstIndex()
	l, _ := s.LastIndex()
	if f != first || l != last {
		t.Fatalf("indexes %d..%d, want %d..%d", f, l, first, last)
	}
}

func wantLog(t *testing.T, s *Store, want *raft.Log) {
	t.Helper()
	var l raft.Log
	if err := s.GetLog(want.Index, &l); err != nil {
		t.Fatalf("GetLog(%d): %v", want.Index, err)
	}
	sameLog(t, &l, want)
}

func wantNotFound(t *testing.T, s *Store, i uint64) {
	t.Helper()
	var l raft.Log
	if err := s.GetLog(i, &l); err != raft.ErrLogNotFound {
		t.Fatalf("GetLog(%d): %v, want raft.ErrLogNotFound", i, err)
	}
}

// where returns the file and offsets [start, end) of index i's record.
func where(t *testing.T, s *Store, i uint64) (string, int64, int64) {
	t.Helper()
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, g := range s.segs {
		if i >= g.base && i < g.base+g.n() {
			return filepath.Join(s.dir, g.name), g.offs[i-g.base], g.offs[i-g.base+1]
		}
	}
	t.Fatalf("index %d in no segment", i)
	return "", 0, 0
}

func writeAt(t *testing.T, path string, b []byte, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// A record that fails its checksum ends the log, even though valid
// records of the same generation follow it; and new entries written after
// recovery never bring those back, even when they end exactly where the
// stale records begin.
func TestTornRecordEndsTheLogForGood(t *testing.T) {
	dir := t.TempDir()
	opts := Options{SegmentSize: 1 << 20}
	s := mustOpen(t, dir, opts)
	for i := uint64(1); i <= 20; i++ {
		mustStore(t, s, entry(i, 1, 1000))
	}
	path, off, _ := where(t, s, 18)
	s.Close()
	writeAt(t, path, []byte{0xff}, off+recHdrSize+10) // a byte of 18's data

	s = mustOpen(t, dir, opts)
	wantRange(t, s, 1, 17)
	wantNotFound(t, s, 18)
	wantLog(t, s, entry(17, 1, 1000))
	// Same index, same size: a store that appended in place would now
	// have a valid 18 followed by the old, valid 19 and 20.
	mustStore(t, s, entry(18, 2, 1000))
	s.Close()

	s = mustOpen(t, dir, opts)
	defer s.Close()
	wantRange(t, s, 1, 18)
	wantLog(t, s, entry(18, 2, 1000))
	wantNotFound(t, s, 19)
	mustStore(t, s, entry(19, 2, 1000), entry(20, 2, 1000))
	wantLog(t, s, entry(20, 2, 1000))
}

// A file cut in the middle of a record keeps the records before it.
func TestCutFileRecovery(t *testing.T) {
	dir := t.TempDir()
	opts := Options{SegmentSize: 1 << 20}
	s := mustOpen(t, dir, opts)
	mustStore(t, s, batch(1, 20, 1, 3000)...)
	path, off, _ := where(t, s, 20)
	s.Close()
	if err := os.Truncate(path, off+recHdrSize+5); err != nil {
		t.Fatal(err)
	}
	s = mustOpen(t, dir, opts)
	wantRange(t, s, 1, 19)
	wantNotFound(t, s, 20)
	mustStore(t, s, batch(20, 25, 2, 100)...)
	s.Close()
	s = mustOpen(t, dir, opts)
	defer s.Close()
	wantRange(t, s, 1, 25)
	for _, l := range batch(20, 25, 2, 100) {
		wantLog(t, s, l)
	}
	wantLog(t, s, batch(1, 20, 1, 3000)[18])
}

// A segment whose header did not reach the disk (a torn first write) is
// not a segment; its records, valid for its generation, never come back:
// the generation is never used again.
func TestLostSegmentHeader(t *testing.T) {
	dir := t.TempDir()
	opts := Options{SegmentSize: 16 << 10, Spares: 1}
	s := mustOpen(t, dir, opts)
	for i := uint64(1); i <= 40; i++ {
		mustStore(t, s, entry(i, 1, 2000))
	}
	path, _, _ := where(t, s, 40)
	s.mu.RLock()
	g := s.segs[len(s.segs)-1]
	lostFrom := g.base
	s.mu.RUnlock()
	s.Close()
	writeAt(t, path, make([]byte, segHdrSize), 0)

	s = mustOpen(t, dir, opts)
	wantRange(t, s, 1, lostFrom-1)
	wantNotFound(t, s, lostFrom)
	mustStore(t, s, entry(lostFrom, 2, 2000))
	s.Close()
	s = mustOpen(t, dir, opts)
	defer s.Close()
	wantRange(t, s, 1, lostFrom)
	wantLog(t, s, entry(lostFrom, 2, 2000))
}

// A tail truncation is durable when DeleteRange returns: it survives a
// reopen with nothing appended after it, and the entries it dropped from a
// sealed segment stay dropped after later appends and reopens.
func TestTailTruncationDurable(t *testing.T) {
	dir := t.TempDir()
	opts := Options{SegmentSize: 32 << 10}
	s := mustOpen(t, dir, opts)
	mustStore(t, s, batch(1, 30, 1, 3000)...) // several segments
	if err := s.DeleteRange(12, 30); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s = mustOpen(t, dir, opts)
	wantRange(t, s, 1, 11)
	wantNotFound(t, s, 12)
	mustStore(t, s, batch(12, 14, 2, 10)...)
	s.Close()
	s = mustOpen(t, dir, opts)
	defer s.Close()
	wantRange(t, s, 1, 14)
	for _, l := range batch(12, 14, 2, 10) {
		wantLog(t, s, l)
	}
	wantLog(t, s, batch(1, 11, 1, 3000)[10])
	wantNotFound(t, s, 15)
}

func TestOpenTwiceFails(t *testing.T) {
	dir := t.TempDir()
	s := mustOpen(t, dir, Options{})
	if _, err := Open(dir, Options{}); !errors.Is(err, ErrLocked) {
		t.Fatalf("second open: %v, want ErrLocked", err)
	}
	mustStore(t, s, entry(1, 1, 10))
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	var l raft.Log
	if err := s.GetLog(1, &l); !errors.Is(err, ErrClosed) {
		t.Fatalf("GetLog after Close: %v", err)
	}
	if err := s.StoreLogs([]*raft.Log{entry(2, 1, 10)}); !errors.Is(err, ErrClosed) {
		t.Fatalf("StoreLogs after Close: %v", err)
	}
	s = mustOpen(t, dir, Options{})
	defer s.Close()
	wantLog(t, s, entry(1, 1, 10))
}

// Readers (raft's replication goroutines) call GetLog while entries are
// appended and compacted away; every read either returns the right entry
// or ErrLogNotFound for an index compacted away or not yet stored.
func TestConcurrentReaders(t *testing.T) {
	s := mustOpen(t, t.TempDir(), Options{SegmentSize: 64 << 10})
	defer s.Close()
	var done atomic.Bool
	var reads, found atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for r := 0; r < 3; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := uint64(0); !done.Load(); k++ {
				last, _ := s.LastIndex()
				i := last - k%50
				var l raft.Log
				err := s.GetLog(i, &l)
				reads.Add(1)
				if err == raft.ErrLogNotFound {
					continue
				}
				if err != nil {
					errs <- err
					return
				}
				want := entry(i, 1, int(i%7)*500)
				if l.Index != i || l.Term != 1 || string(l.Data) != string(want.Data) {
					errs <- errors.New("wrong entry read")
					return
				}
				found.Add(1)
			}
		}()
	}
	first := uint64(1)
	for i := uint64(1); i <= 3000; i += 3 {
		mustStore(t, s, entry(i, 1, int(i%7)*500), entry(i+1, 1, int((i+1)%7)*500), entry(i+2, 1, int((i+2)%7)*500))
		if i%300 == 1 && i > 600 {
			if err := s.DeleteRange(first, i-500); err != nil {
				t.Fatal(err)
			}
			first = i - 499
		}
	}
	done.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if found.Load() == 0 {
		t.Fatalf("no read found an entry (%d reads)", reads.Load())
	}
}

// Damage to synced data inside the log (not at its tail) is a clear error
// on open, never a silently shorter log.
func TestHoleInTheLogIsCorruption(t *testing.T) {
	dir := t.TempDir()
	opts := Options{SegmentSize: 16 << 10}
	s := mustOpen(t, dir, opts)
	for i := uint64(1); i <= 40; i++ {
		mustStore(t, s, entry(i, 1, 2000))
	}
	path, off, _ := where(t, s, 3) // in the first segment, which later ones follow
	s.Close()
	writeAt(t, path, []byte{0x5a}, off+recHdrSize+1)
	if _, err := Open(dir, opts); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("open with a damaged sealed segment: %v, want ErrCorrupt", err)
	}
}

func TestBadRequestsRefused(t *testing.T) {
	s := mustOpen(t, t.TempDir(), Options{SegmentSize: 16 << 10})
	defer s.Close()
	if err := s.StoreLogs([]*raft.Log{{Index: 0, Term: 1}}); !errors.Is(err, ErrNotMonotonic) {
		t.Fatalf("index 0: %v", err)
	}
	mustStore(t, s, batch(1, 30, 1, 1000)...)
	if err := s.DeleteRange(10, 20); !errors.Is(err, ErrRange) {
		t.Fatalf("a hole in the middle: %v", err)
	}
	if err := s.StoreLogs([]*raft.Log{entry(30, 2, 10)}); !errors.Is(err, ErrNotMonotonic) {
		t.Fatalf("overwriting the last index: %v", err)
	}
	wantRange(t, s, 1, 30)
	for _, l := range batch(1, 30, 1, 1000) {
		wantLog(t, s, l)
	}
	// Ranges outside the log and empty ranges change nothing.
	for _, r := range [][2]uint64{{31, 40}, {0, 0}, {20, 10}} {
		if err := s.DeleteRange(r[0], r[1]); err != nil {
			t.Fatalf("DeleteRange(%d, %d): %v", r[0], r[1], err)
		}
	}
	wantRange(t, s, 1, 30)
}

// A tail truncation makes its superseding segment durable and only then
// hands the superseded files over to be invalidated; a crash in between
// can leave any of them with a valid header, in any combination. Open must
// apply every later segment before judging the log to have a hole (found
// by the crash test: a file superseded by a truncation survived while an
// earlier one was already invalidated, and open reported a hole).
func TestTruncationSupersedesUnrecycledSegments(t *testing.T) {
	dir := t.TempDir()
	opts := Options{SegmentSize: 16 << 10}
	s := mustOpen(t, dir, opts)
	for i := uint64(1); i <= 12; i++ {
		mustStore(t, s, entry(i, 1, 5000))
	}
	s.mu.RLock()
	if len(s.segs) < 4 {
		s.mu.RUnlock()
		t.Fatalf("%d segments, the test needs 4", len(s.segs))
	}
	lo := s.segs[2].base // B: truncated from its first entry, C after it
	pathB, pathC := filepath.Join(dir, s.segs[2].name), filepath.Join(dir, s.segs[3].name)
	s.mu.RUnlock()
	keepC, err := os.ReadFile(pathC)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteRange(lo, 12); err != nil {
		t.Fatal(err)
	}
	s.Close()
	// As if the crash came after B was invalidated and before C was.
	if err := os.WriteFile(pathC, keepC, 0o600); err != nil {
		t.Fatal(err)
	}
	writeAt(t, pathB, make([]byte, segHdrSize), 0)

	s = mustOpen(t, dir, opts)
	wantRange(t, s, 1, lo-1)
	wantNotFound(t, s, lo)
	mustStore(t, s, entry(lo, 2, 100), entry(lo+1, 2, 100))
	s.Close()
	s = mustOpen(t, dir, opts)
	defer s.Close()
	wantRange(t, s, 1, lo+1)
	wantLog(t, s, entry(lo-1, 1, 5000))
	wantLog(t, s, entry(lo+1, 2, 100))
}

// TestBreathingLogStopsZeroing: a log that grows for a while and is then
// compacted by several segments at once (Raft's snapshots do this) must,
// once it has reached its high-water mark, run on recycled files only.
// Before the preparer kept the freed files, every cycle zeroed fresh ones.
func TestBreathingLogStopsZeroing(t *testing.T) {
	dir := t.TempDir()
	s := mustOpen(t, dir, Options{SegmentSize: 16 << 10, Spares: 1})
	defer s.Close()
	settle := func() prepStats {
		t.Helper()
		for range 5000 {
			s.prep.mu.Lock()
			idle := len(s.prep.recycle) == 0 && len(s.prep.ready) > 0 && !s.prep.busy
			s.prep.mu.Unlock()
			if idle {
				return s.prep.statsNow()
			}
			time.Sleep(time.Millisecond)
		}
		t.Fatal("the preparer never settled")
		return prepStats{}
	}
	next := uint64(1)
	cycle := func() {
		t.Helper()
		for range 12 { // 4 segments of 3 entries
			mustStore(t, s, &raft.Log{Index: next, Term: 1, Type: raft.LogCommand, Data: make([]byte, 5000)})
			next++
		}
		first, _ := s.FirstIndex()
		if err := s.DeleteRange(first, next-3); err != nil {
			t.Fatal(err)
		}
	}
	// The high-water mark settles within a few cycles (how many depends
	// on how the preparer's zeroing interleaves with the takes); from then
	// on nothing may be zeroed.
	quiet := 0
	for range 20 {
		z := settle().zeroed
		cycle()
		if settle().zeroed == z {
			quiet++
		} else {
			quiet = 0
		}
		if quiet == 2 {
			break
		}
	}
	if quiet < 2 {
		t.Fatalf("still zeroing after 20 cycles: %+v", settle())
	}
	before := settle()
	files := func() int {
		m, _ := filepath.Glob(filepath.Join(dir, "seg-*"))
		return len(m)
	}
	n0 := files()
	for range 20 {
		cycle()
		settle()
	}
	after := settle()
	if after.zeroed != before.zeroed || after.grown != before.grown {
		t.Fatalf("steady state still prepares fresh files: zeroed %d -> %d, grown %d -> %d (reused %d -> %d)",
			before.zeroed, after.zeroed, before.grown, after.grown, before.reused, after.reused)
	}
	if after.reused-before.reused != 20*4 {
		t.Fatalf("reused %d files in 20 cycles of 4 segments", after.reused-before.reused)
	}
	if n := files(); n > n0 {
		t.Fatalf("segment files grew from %d to %d", n0, n)
	}
	wantRange(t, s, next-2, next-1)
	wantLog(t, s, &raft.Log{Index: next - 1, Term: 1, Type: raft.LogCommand, Data: make([]byte, 5000)})
}
