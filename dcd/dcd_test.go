package dcd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/robib/robib/fsm"
)

const kib = 1024

// newVolume opens a Volume over f with test defaults and closes it at the
// end of the test.
func newVolume(t *testing.T, f *fakeCluster, cfg Config) *Volume {
	t.Helper()
	return newVolumeWith(t, f, f, cfg)
}

// newVolumeWith is newVolume with c in front of f.
func newVolumeWith(t *testing.T, f *fakeCluster, c Committer, cfg Config) *Volume {
	t.Helper()
	if cfg.Retryable == nil {
		cfg.Retryable = retryableInTests
	}
	if cfg.MaxBatchBytes != 0 {
		f.maxBatch = cfg.MaxBatchBytes
	}
	cfg.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	v, err := New("vol1", f.local, c, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := v.Shutdown(ctx); err != nil && !errors.Is(err, ErrClosed) && !errors.Is(err, ErrFailed) {
			t.Errorf("Shutdown: %v", err)
		}
	})
	return v
}

// model is the reference: the bytes every op applied in order gives.
type model []byte

func (m model) write(p []byte, off int64) { copy(m[off:], p) }
func (m model) zero(off, n int64)         { clear(m[off : off+n]) }

func fill(rng *rand.Rand, n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(rng.Uint32())
	}
	return p
}

func pattern(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

func mustWrite(t *testing.T, v *Volume, p []byte, off int64) {
	t.Helper()
	if n, err := v.WriteAt(p, off); err != nil || n != len(p) {
		t.Fatalf("WriteAt(%d bytes, %d) = %d, %v", len(p), off, n, err)
	}
}

func mustRead(t *testing.T, v *Volume, off int64, n int) []byte {
	t.Helper()
	p := make([]byte, n)
	if got, err := v.ReadAt(p, off); err != nil || got != n {
		t.Fatalf("ReadAt(%d bytes, %d) = %d, %v", n, off, got, err)
	}
	return p
}

func mustFlush(t *testing.T, v *Volume) {
	t.Helper()
	if err := v.Flush(); err != nil {
		t.Fatalf("Flush: %v", err)
	}
}

// firstDiff describes where a and b differ.
func firstDiff(a, b []byte) string {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return fmt.Sprintf("first difference at byte %d: %#x != %#x", i, a[i], b[i])
		}
	}
	return fmt.Sprintf("lengths %d and %d", len(a), len(b))
}

// eventually polls cond for up to 5 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestReadYourWritesBeforeCommitAndApply(t *testing.T) {
	f := newFakeCluster(t, 1<<20)
	v := newVolume(t, f, Config{})
	a := pattern(0xaa, 8*kib)

	f.hold()
	mustWrite(t, v, a, 4*kib)
	if got := mustRead(t, v, 0, 16*kib); !bytes.Equal(got[4*kib:12*kib], a) || !bytes.Equal(got[:4*kib], make([]byte, 4*kib)) {
		t.Fatalf("read before commit does not show the write")
	}
	if !bytes.Equal(f.remoteCopy(), make([]byte, 1<<20)) {
		t.Fatal("the write committed while commits are held")
	}
	// Committed but not applied locally: still served from the overlay.
	f.holdApply()
	f.release()
	mustFlush(t, v)
	if !bytes.Equal(f.remoteCopy()[4*kib:12*kib], a) {
		t.Fatal("Flush returned before the write committed")
	}
	if !bytes.Equal(f.local.snapshot()[4*kib:12*kib], make([]byte, 8*kib)) {
		t.Fatal("local copy applied while WaitApplied is held")
	}
	if got := mustRead(t, v, 4*kib, 8*kib); !bytes.Equal(got, a) {
		t.Fatal("read between commit and local apply does not show the write")
	}
	if !pending(v, 4*kib, 1) {
		t.Fatal("Pending false for a write not yet applied locally")
	}
	f.releaseApply()
	eventually(t, "the buffer to drain", func() bool { return v.Stats().BufferedBytes == 0 })
	if !bytes.Equal(f.local.snapshot()[4*kib:12*kib], a) || pending(v, 4*kib, 1) {
		t.Fatal("buffer released before the local copy had the write")
	}
	if got := mustRead(t, v, 4*kib, 8*kib); !bytes.Equal(got, a) {
		t.Fatal("read after local apply differs")
	}
}

// TestRandomWorkload runs writes, trims, zeroings, reads and flushes from
// several goroutines against a reference model, under different fault
// injections. Each goroutine owns a disjoint region, so its model is exact
// and, after its own Flush, the committed state of its region must equal
// it byte for byte.
func TestRandomWorkload(t *testing.T) {
	cases := []struct {
		name  string
		cfg   Config
		setup func(f *fakeCluster)
	}{
		{"clean", Config{MaxBatchBytes: 64 * kib, MaxBufferBytes: 512 * kib}, func(f *fakeCluster) {}},
		{"latency-reorder", Config{MaxBatchBytes: 32 * kib, MaxBufferBytes: 256 * kib, MaxInflight: 6}, func(f *fakeCluster) {
			f.maxDelay = 2 * time.Millisecond
			f.eagerApply = 0.5
			f.applyDelay = time.Millisecond
		}},
		{"faults", Config{MaxBatchBytes: 48 * kib, MaxBufferBytes: 384 * kib, MaxInflight: 4}, func(f *fakeCluster) {
			f.maxDelay = time.Millisecond
			f.failBefore = 0.05
			f.failAfter = 0.05
			f.eagerApply = 0.3
		}},
		{"sync", Config{SyncWrites: true, MaxBatchBytes: 64 * kib}, func(f *fakeCluster) { f.maxDelay = 200 * time.Microsecond }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			const workers, region = 4, 256 * kib
			f := newFakeCluster(t, workers*region)
			tc.setup(f)
			v := newVolume(t, f, tc.cfg)
			want := make(model, workers*region)
			var wg sync.WaitGroup
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					runWorker(t, v, f, want[w*region:(w+1)*region], int64(w*region), uint64(w))
				}()
			}
			wg.Wait()
			mustFlush(t, v)
			if got := f.remoteCopy(); !bytes.Equal(got, want) {
				t.Fatalf("committed state differs from the model: %s", firstDiff(got, want))
			}
			if got := mustRead(t, v, 0, len(want)); !bytes.Equal(got, want) {
				t.Fatalf("read after flush differs from the model: %s", firstDiff(got, want))
			}
			if err := v.Close(); err != nil {
				t.Fatal(err)
			}
			if got := f.local.snapshot(); !bytes.Equal(got, want) {
				t.Fatalf("local copy after Close differs from the model: %s", firstDiff(got, want))
			}
			s := v.Stats()
			calls, dups, gaps := f.counts()
			t.Logf("stats %+v; fake: %d calls, %d duplicates, %d gaps, max %d in flight", s, calls, dups, gaps, f.maxIn)
			if s.BufferedBytes != 0 || s.Inflight != 0 || s.PendingOps != 0 {
				t.Errorf("buffer not empty after Close: %+v", s)
			}
			if uint64(len(f.committed())) != s.Batches {
				t.Errorf("fake applied %d batches, dcd counted %d committed", len(f.committed()), s.Batches)
			}
			if f.failBefore+f.failAfter > 0 && s.Retries == 0 {
				t.Errorf("faults injected but no retries counted")
			}
			limit := tc.cfg.MaxInflight
			if limit == 0 {
				limit = DefaultMaxInflight
			}
			if f.maxIn > limit {
				t.Errorf("%d Commit calls in flight, limit %d", f.maxIn, limit)
			}
		})
	}
}

// runWorker runs random ops on the region [base, base+len(m)) and checks
// every read and, after each flush, the committed state against m.
func runWorker(t *testing.T, v *Volume, f *fakeCluster, m model, base int64, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 7))
	size := int64(len(m))
	randRange := func(maxLen int64) (int64, int64) {
		n := 1 + rng.Int64N(maxLen)
		if rng.IntN(2) == 0 { // block aligned
			n = (n + 4*kib - 1) &^ (4*kib - 1)
		}
		n = min(n, size)
		off := rng.Int64N(size - n + 1)
		if rng.IntN(2) == 0 {
			off &^= 4*kib - 1
		}
		return off, n
	}
	for i := range 300 {
		switch r := rng.IntN(100); {
		case r < 45:
			off, n := randRange(24 * kib)
			if rng.IntN(10) == 0 { // sequential run of small writes
				for k := int64(0); k < 8 && off+(k+1)*512 <= size; k++ {
					p := fill(rng, 512)
					m.write(p, off+k*512)
					if _, err := v.WriteAt(p, base+off+k*512); err != nil {
						t.Error(err)
						return
					}
				}
				continue
			}
			p := fill(rng, int(n))
			m.write(p, off)
			if _, err := v.WriteAt(p, base+off); err != nil {
				t.Error(err)
				return
			}
		case r < 55:
			off, n := randRange(64 * kib)
			m.zero(off, n)
			if err := v.Trim(base+off, n); err != nil {
				t.Error(err)
				return
			}
		case r < 65:
			off, n := randRange(64 * kib)
			m.zero(off, n)
			if err := v.WriteZeroes(base+off, n, rng.IntN(2) == 0); err != nil {
				t.Error(err)
				return
			}
		case r < 95:
			off, n := randRange(32 * kib)
			p := make([]byte, n)
			if _, err := v.ReadAt(p, base+off); err != nil {
				t.Error(err)
				return
			}
			if !bytes.Equal(p, m[off:off+n]) {
				t.Errorf("op %d: read [%d, +%d) differs from the model: %s", i, base+off, n, firstDiff(p, m[off:off+n]))
				return
			}
		default:
			if err := v.Flush(); err != nil {
				t.Error(err)
				return
			}
			if got := f.remoteCopy()[base : base+size]; !bytes.Equal(got, m) {
				t.Errorf("op %d: committed region after Flush differs from the model: %s", i, firstDiff(got, m))
				return
			}
		}
	}
}

// TestConcurrentReadsSeeCompletedWrites: while writers keep rewriting whole
// blocks with version stamps, every read returns, per block, one complete
// version at least as new as the last one whose WriteAt returned before the
// read started (never torn, never older), with batches in flight and local
// applies racing the reads.
func TestConcurrentReadsSeeCompletedWrites(t *testing.T) {
	const blocks, bs = 64, 4 * kib
	f := newFakeCluster(t, blocks*bs)
	f.maxDelay = 300 * time.Microsecond
	f.eagerApply = 0.5
	f.applyDelay = 300 * time.Microsecond
	v := newVolume(t, f, Config{MaxBatchBytes: 32 * kib, MaxBufferBytes: 128 * kib})

	var done [blocks]atomic.Uint32 // last version whose WriteAt returned
	stop := make(chan struct{})
	var writers, readers sync.WaitGroup
	for w := range 2 {
		writers.Add(1)
		go func() { // writer w owns the blocks b with b%2 == w
			defer writers.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			for ver := uint32(1); ver <= 150; ver++ {
				b := 2*rng.IntN(blocks/2) + w
				p := make([]byte, bs)
				for i := 0; i < bs; i += 4 {
					p[i], p[i+1], p[i+2], p[i+3] = byte(ver), byte(ver>>8), byte(b), 0x5a
				}
				if _, err := v.WriteAt(p, int64(b*bs)); err != nil {
					t.Error(err)
					return
				}
				done[b].Store(ver)
			}
		}()
	}
	for r := range 3 {
		readers.Add(1)
		go func() {
			defer readers.Done()
			rng := rand.New(rand.NewPCG(uint64(r), 2))
			for {
				select {
				case <-stop:
					return
				default:
				}
				first, n := rng.IntN(blocks), 1+rng.IntN(8)
				n = min(n, blocks-first)
				var before [blocks]uint32
				for b := first; b < first+n; b++ {
					before[b] = done[b].Load()
				}
				p := make([]byte, n*bs)
				if _, err := v.ReadAt(p, int64(first*bs)); err != nil {
					t.Error(err)
					return
				}
				for k := range n {
					b, blk := first+k, p[k*bs:(k+1)*bs]
					ver := uint32(blk[0]) | uint32(blk[1])<<8
					if ver == 0 && blk[3] == 0 {
						if !bytes.Equal(blk, make([]byte, bs)) || before[b] != 0 {
							t.Errorf("block %d: torn or lost (zero stamp, %d completed)", b, before[b])
							return
						}
						continue
					}
					for i := 0; i < bs; i += 4 {
						if blk[i] != byte(ver) || blk[i+1] != byte(ver>>8) || blk[i+2] != byte(b) || blk[i+3] != 0x5a {
							t.Errorf("block %d torn at byte %d", b, i)
							return
						}
					}
					if ver < before[b] {
						t.Errorf("block %d: read version %d after version %d completed", b, ver, before[b])
						return
					}
				}
			}
		}()
	}
	writers.Wait()
	close(stop)
	readers.Wait()
}

func TestCoalescing(t *testing.T) {
	f := newFakeCluster(t, 1<<20)
	v := newVolume(t, f, Config{MaxInflight: 1})
	want := make(model, 1<<20)
	rng := rand.New(rand.NewPCG(1, 1))
	do := func(p []byte, off int64) { want.write(p, off); mustWrite(t, v, p, off) }

	f.hold()
	do(fill(rng, 4*kib), 0) // batch 1, held in Commit
	eventually(t, "batch 1 in flight", func() bool { return v.Stats().Inflight == 1 })
	for b := int64(1); b <= 32; b++ { // 32 adjacent blocks: one op
		do(fill(rng, 4*kib), b*4*kib)
	}
	do(fill(rng, 4*kib), 5*4*kib)                   // overwrite a buffered block
	do(fill(rng, 100), 7*4*kib+50)                  // overwrite part of one
	if err := v.Trim(10*4*kib, 4*kib); err != nil { // cut one out
		t.Fatal(err)
	}
	want.zero(10*4*kib, 4*kib)
	if err := v.Trim(11*4*kib, 4*kib); err != nil { // joins the trim before
		t.Fatal(err)
	}
	want.zero(11*4*kib, 4*kib)
	f.release()
	mustFlush(t, v)

	log := f.committed()
	if len(log) != 2 {
		t.Fatalf("%d batches committed, want 2", len(log))
	}
	var kinds []string
	for _, op := range log[1].Ops {
		kinds = append(kinds, fmt.Sprintf("%d[%d,+%d)", op.Kind, op.Off/kib, op.Len/kib))
	}
	wantOps := fmt.Sprintf("[%d[4,+36) %d[40,+8) %d[48,+84)]", fsm.OpWrite, fsm.OpTrim, fsm.OpWrite)
	if got := fmt.Sprint(kinds); got != wantOps {
		t.Errorf("batch 2 ops (kind[KiB,+KiB)) = %s, want %s", got, wantOps)
	}
	if got := f.remoteCopy(); !bytes.Equal(got, want) {
		t.Fatalf("committed state differs: %s", firstDiff(got, want))
	}
	s := v.Stats()
	// 37 ops accepted, 4 committed: block 0, then write [4K,40K) (blocks
	// 1-9 joined at the cut), trim [40K,48K) (the second trim absorbed the
	// first and block 11), write [48K,132K).
	if s.Accepted != 37 || s.Ops != 4 {
		t.Errorf("accepted %d ops, committed %d, want 37 and 4 (stats %+v)", s.Accepted, s.Ops, s)
	}
	if s.Coalesced == 0 {
		t.Errorf("no coalescing counted: %+v", s)
	}
}

func TestBatchesRespectMaxBatchBytes(t *testing.T) {
	const maxBatch = 16 * kib
	f := newFakeCluster(t, 4<<20)
	v := newVolume(t, f, Config{MaxBatchBytes: maxBatch})
	rng := rand.New(rand.NewPCG(2, 2))
	want := make(model, 4<<20)

	big := fill(rng, 1<<20+123) // one huge write
	want.write(big, 4095)
	mustWrite(t, v, big, 4095)
	for i := range 200 { // many small unaligned adjacent writes
		p := fill(rng, 1000)
		want.write(p, int64(2<<20+i*1000))
		mustWrite(t, v, p, int64(2<<20+i*1000))
	}
	mustFlush(t, v)
	if got := f.remoteCopy(); !bytes.Equal(got, want) {
		t.Fatalf("committed state differs: %s", firstDiff(got, want))
	}
	log := f.committed()
	for _, b := range log {
		if n := fsm.EncodedSize(b); n > maxBatch {
			t.Errorf("batch %d encodes to %d bytes > %d", b.Seq, n, maxBatch)
		}
	}
	if min := (1<<20 + 200*1000) / maxBatch; len(log) < min {
		t.Errorf("%d batches for %d bytes with a %d byte limit", len(log), 1<<20+200*1000, maxBatch)
	}
	// The fake checks every Commit call against the limit too (f.maxBatch).
}

func TestBackpressure(t *testing.T) {
	const limit = 64 * kib
	f := newFakeCluster(t, 1<<20)
	v := newVolume(t, f, Config{MaxBufferBytes: limit, MaxBatchBytes: 16 * kib})
	f.hold()

	var accepted atomic.Int64
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 16 {
				off := int64((w*16+i)*2) * 4 * kib // never adjacent, never overlapping
				if _, err := v.WriteAt(pattern(byte(i), 4*kib), off); err != nil {
					t.Error(err)
					return
				}
				accepted.Add(1)
			}
		}()
	}
	var peak atomic.Int64
	stopPoll := make(chan struct{})
	polled := make(chan struct{})
	go func() {
		defer close(polled)
		for {
			peak.Store(max(peak.Load(), v.Stats().BufferedBytes))
			select {
			case <-stopPoll:
				return
			default:
				time.Sleep(50 * time.Microsecond)
			}
		}
	}()
	time.Sleep(100 * time.Millisecond) // writers fill the buffer and block
	if n := accepted.Load(); n >= 64 {
		t.Fatalf("all %d writes accepted with commits held and a %d byte buffer", n, limit)
	}
	if b := v.Stats().BufferedBytes; b < limit-4*kib-opCost {
		t.Errorf("writers blocked with only %d bytes buffered", b)
	}
	f.release()
	wg.Wait()
	close(stopPoll)
	<-polled
	mustFlush(t, v)
	if p := peak.Load(); p > limit+4*kib+opCost {
		t.Errorf("buffered bytes peaked at %d, limit %d plus one op", p, limit)
	}
	if accepted.Load() != 64 {
		t.Errorf("%d writes completed, want 64", accepted.Load())
	}
}

func TestStickyFailure(t *testing.T) {
	f := newFakeCluster(t, 1<<20)
	reject := make(chan struct{}) // batch 2's rejection waits for it
	f.hook = func(b *fsm.WriteBatch, attempt int) error {
		if b.Seq == 2 {
			<-reject
			return fmt.Errorf("%w: batch 2", errPermanent)
		}
		return nil
	}
	v := newVolume(t, f, Config{MaxInflight: 1})
	mustWrite(t, v, pattern(1, 4*kib), 0)
	mustFlush(t, v) // batch 1 commits

	mustWrite(t, v, pattern(2, 4*kib), 8*kib)  // batch 2: rejected
	mustWrite(t, v, pattern(3, 4*kib), 16*kib) // pending behind it: dropped
	close(reject)
	err := v.Flush()
	if !errors.Is(err, ErrFailed) || !errors.Is(err, errPermanent) {
		t.Fatalf("Flush = %v, want ErrFailed wrapping the cause", err)
	}
	for name, err := range map[string]error{
		"Flush":       v.Flush(),
		"Trim":        v.Trim(0, 4*kib),
		"WriteZeroes": v.WriteZeroes(0, 4*kib, false),
	} {
		if !errors.Is(err, ErrFailed) {
			t.Errorf("%s after failure = %v, want ErrFailed", name, err)
		}
	}
	if _, err := v.WriteAt(pattern(4, 4*kib), 0); !errors.Is(err, ErrFailed) {
		t.Errorf("WriteAt after failure = %v, want ErrFailed", err)
	}
	eventually(t, "the lost writes to leave the buffer", func() bool { return v.Stats().BufferedBytes == 0 })
	got := mustRead(t, v, 0, 20*kib)
	if !bytes.Equal(got[:4*kib], pattern(1, 4*kib)) || !bytes.Equal(got[4*kib:], make([]byte, 16*kib)) {
		t.Errorf("reads after failure must show exactly the committed writes")
	}
	if pending(v, 0, 1<<20) {
		t.Errorf("Pending after the lost writes were dropped")
	}
	if err := v.Close(); !errors.Is(err, ErrFailed) {
		t.Errorf("Close = %v, want ErrFailed", err)
	}
	if err := v.Close(); !errors.Is(err, ErrClosed) {
		t.Errorf("second Close = %v, want ErrClosed", err)
	}
}

func TestSyncWrites(t *testing.T) {
	f := newFakeCluster(t, 1<<20)
	v := newVolume(t, f, Config{SyncWrites: true})
	f.hold()
	returned := make(chan error, 2)
	go func() { _, err := v.WriteAt(pattern(7, 4*kib), 0); returned <- err }()
	go func() { returned <- v.Trim(64*kib, 64*kib) }()
	select {
	case err := <-returned:
		t.Fatalf("sync write returned (%v) before its commit", err)
	case <-time.After(50 * time.Millisecond):
	}
	f.release()
	for range 2 {
		if err := <-returned; err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(f.remoteCopy()[:4*kib], pattern(7, 4*kib)) {
		t.Fatal("sync write returned but is not committed")
	}
}

func TestFlushWaitsAndSharesCommits(t *testing.T) {
	f := newFakeCluster(t, 1<<20)
	v := newVolume(t, f, Config{MaxInflight: 1})
	f.hold()
	mustWrite(t, v, pattern(1, 4*kib), 0) // batch 1, held
	eventually(t, "batch 1 in flight", func() bool { return v.Stats().Inflight == 1 })
	mustWrite(t, v, pattern(2, 4*kib), 8*kib) // pending, will be batch 2
	errs := make(chan error, 10)
	for range 10 {
		go func() { errs <- v.Flush() }()
	}
	select {
	case err := <-errs:
		t.Fatalf("Flush returned (%v) while its writes are uncommitted", err)
	case <-time.After(30 * time.Millisecond):
	}
	f.release()
	for range 10 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if calls, _, _ := f.counts(); calls != 2 {
		t.Errorf("%d Commit calls for two writes and ten flushes, want 2", calls)
	}
	if !bytes.Equal(f.remoteCopy()[8*kib:12*kib], pattern(2, 4*kib)) {
		t.Error("Flush returned before the pending write committed")
	}
}

// TestFlushCoversOverwrittenOps: a write accepted after a Flush that
// overwrites a buffered write accepted before it carries the older write's
// age, so the Flush waits for it too. Otherwise the flushed write would
// vanish from the commit stream and Flush could return before its
// replacement is committed, leaving older data durable.
func TestFlushCoversOverwrittenOps(t *testing.T) {
	f := newFakeCluster(t, 1<<20)
	f.hook = func(b *fsm.WriteBatch, attempt int) error {
		if b.Seq == 2 {
			time.Sleep(50 * time.Millisecond) // the replacement commits late
		}
		return nil
	}
	v := newVolume(t, f, Config{MaxInflight: 1})
	f.hold()
	mustWrite(t, v, pattern(1, 4*kib), 64*kib) // batch 1, held
	eventually(t, "batch 1 in flight", func() bool { return v.Stats().Inflight == 1 })
	mustWrite(t, v, pattern(2, 8*kib), 0) // pending
	flushed := make(chan error, 1)
	go func() { flushed <- v.Flush() }()
	time.Sleep(10 * time.Millisecond)
	mustWrite(t, v, pattern(3, 8*kib), 0) // newer, replaces the flushed write
	f.release()
	if err := <-flushed; err != nil {
		t.Fatal(err)
	}
	if got := f.remoteCopy(); !bytes.Equal(got[:8*kib], pattern(3, 8*kib)) {
		t.Fatal("Flush returned before the write replacing the flushed one was committed")
	}
}

func TestLoneWriteFlushPaysOneCommit(t *testing.T) {
	f := newFakeCluster(t, 1<<20)
	v := newVolume(t, f, Config{})
	start := time.Now()
	for i := range 200 {
		mustWrite(t, v, pattern(byte(i), 4*kib), int64(i%16)*4*kib)
		mustFlush(t, v)
	}
	if calls, _, _ := f.counts(); calls != 200 {
		t.Errorf("%d Commit calls for 200 write+flush pairs", calls)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("200 write+flush pairs took %v: a timer on the commit path?", d)
	}
}

func TestCloseFlushesAndRefuses(t *testing.T) {
	f := newFakeCluster(t, 1<<20)
	f.maxDelay = time.Millisecond
	f.applyDelay = time.Millisecond
	v := newVolume(t, f, Config{MaxBatchBytes: 16 * kib})
	rng := rand.New(rand.NewPCG(3, 3))
	want := make(model, 1<<20)
	for range 100 {
		off := rng.Int64N(1<<20 - 8*kib)
		p := fill(rng, 1+rng.IntN(8*kib))
		want.write(p, off)
		mustWrite(t, v, p, off)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	if got := f.remoteCopy(); !bytes.Equal(got, want) {
		t.Fatalf("committed state after Close differs: %s", firstDiff(got, want))
	}
	if got := f.local.snapshot(); !bytes.Equal(got, want) {
		t.Fatalf("local copy after Close differs: %s", firstDiff(got, want))
	}
	_, werr := v.WriteAt([]byte{1}, 0)
	_, rerr := v.ReadAt(make([]byte, 1), 0)
	for name, err := range map[string]error{
		"WriteAt": werr, "ReadAt": rerr, "Flush": v.Flush(), "Trim": v.Trim(0, 1),
		"WriteZeroes": v.WriteZeroes(0, 1, true), "Close": v.Close(),
	} {
		if !errors.Is(err, ErrClosed) {
			t.Errorf("%s after Close = %v, want ErrClosed", name, err)
		}
	}
}

func TestShutdownGivesUp(t *testing.T) {
	f := newFakeCluster(t, 1<<20)
	f.failBefore = 1 // the cluster never answers successfully
	v := newVolume(t, f, Config{})
	mustWrite(t, v, pattern(1, 4*kib), 0)
	flushed := make(chan error, 1)
	go func() { flushed <- v.Flush() }()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	err := v.Shutdown(ctx)
	if !errors.Is(err, ErrClosed) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want ErrClosed and DeadlineExceeded", err)
	}
	if err := <-flushed; err == nil {
		t.Fatal("Flush succeeded although nothing was committed")
	}
	if v.Stats().Retries == 0 {
		t.Error("no retries counted")
	}
}

func TestOutOfRange(t *testing.T) {
	f := newFakeCluster(t, 64*kib)
	v := newVolume(t, f, Config{})
	p := make([]byte, 4*kib)
	checks := map[string]error{
		"read past end":     func() error { _, err := v.ReadAt(p, 62*kib); return err }(),
		"read negative":     func() error { _, err := v.ReadAt(p, -1); return err }(),
		"write past end":    func() error { _, err := v.WriteAt(p, 60*kib+1); return err }(),
		"write at max":      func() error { _, err := v.WriteAt(p, math.MaxInt64-10); return err }(),
		"trim negative len": v.Trim(0, -1),
		"trim overflow":     v.Trim(1, math.MaxInt64),
		"zero past end":     v.WriteZeroes(64*kib, 1, false),
		"zero negative off": v.WriteZeroes(-4096, 4096, false),
	}
	for name, err := range checks {
		if !errors.Is(err, ErrOutOfRange) {
			t.Errorf("%s: %v, want ErrOutOfRange", name, err)
		}
	}
	// Exactly up to the end is fine, and so are empty ops at the end.
	mustWrite(t, v, p, 60*kib)
	mustRead(t, v, 60*kib, 4*kib)
	if n, err := v.WriteAt(nil, 64*kib); n != 0 || err != nil {
		t.Errorf("empty write at the end: %d, %v", n, err)
	}
	if err := v.Trim(64*kib, 0); err != nil {
		t.Errorf("empty trim at the end: %v", err)
	}
	if s := v.Stats(); s.Accepted != 1 {
		t.Errorf("%d ops accepted, want 1", s.Accepted)
	}
}

func TestPending(t *testing.T) {
	f := newFakeCluster(t, 1<<20)
	v := newVolume(t, f, Config{MaxInflight: 1})
	f.hold()
	mustWrite(t, v, pattern(1, 4*kib), 8*kib)     // in flight
	if err := v.Trim(32*kib, 4*kib); err != nil { // pending
		t.Fatal(err)
	}
	for _, c := range []struct {
		off, n int64
		want   bool
	}{
		{0, 8 * kib, false}, {0, 8*kib + 1, true}, {12*kib - 1, 1, true}, {12 * kib, 20 * kib, false},
		{35 * kib, 100 * kib, true}, {36 * kib, math.MaxInt64, false}, {8 * kib, 0, false},
	} {
		if got := pending(v, c.off, c.n); got != c.want {
			t.Errorf("Pending(%d, %d) = %v, want %v", c.off, c.n, got, c.want)
		}
	}
	f.release()
	mustFlush(t, v)
	eventually(t, "the buffer to drain", func() bool { return v.Stats().BufferedBytes == 0 })
	if pending(v, 0, 1<<20) {
		t.Error("Pending after everything was applied")
	}
}

// TestSeqGapResendsInOrder: batch 2 overtakes batch 1, is refused with
// ErrSeqGap and resent after batch 1 committed; each applies once, in order.
func TestSeqGapResendsInOrder(t *testing.T) {
	f := newFakeCluster(t, 1<<20)
	slow := make(chan struct{})
	f.hook = func(b *fsm.WriteBatch, attempt int) error {
		if b.Seq == 1 && attempt == 1 {
			<-slow // batch 1 arrives late
		}
		return nil
	}
	v := newVolume(t, f, Config{MaxInflight: 2})
	mustWrite(t, v, pattern(1, 4*kib), 0)
	eventually(t, "batch 1 in flight", func() bool { return v.Stats().Inflight == 1 })
	mustWrite(t, v, pattern(2, 4*kib), 0) // batch 2 overwrites it
	eventually(t, "batch 2 refused", func() bool { _, _, gaps := f.counts(); return gaps == 1 })
	close(slow)
	mustFlush(t, v)
	log := f.committed()
	if len(log) != 2 || log[0].Seq != 1 || log[1].Seq != 2 {
		t.Fatalf("committed %d batches, want seq 1 then 2", len(log))
	}
	if !bytes.Equal(f.remoteCopy()[:4*kib], pattern(2, 4*kib)) {
		t.Fatal("the older write won")
	}
	if s := v.Stats(); s.Retries != 1 || s.Batches != 2 {
		t.Errorf("stats %+v, want 1 retry and 2 batches", s)
	}
}

// TestFailureAfterCommitIsDeduplicated: a Commit that committed but
// reported an error is resent; the FSM answers it as a duplicate.
func TestFailureAfterCommitIsDeduplicated(t *testing.T) {
	f := newFakeCluster(t, 1<<20)
	v := newVolume(t, f, Config{})
	f.failAfter = 1
	mustWrite(t, v, pattern(1, 4*kib), 0)
	eventually(t, "a failed attempt", func() bool { return v.Stats().Retries > 0 })
	f.mu.Lock()
	f.failAfter = 0
	f.mu.Unlock()
	mustFlush(t, v)
	_, dups, _ := f.counts()
	if len(f.committed()) != 1 || dups == 0 {
		t.Errorf("%d batches applied, %d duplicates; want 1 applied and the resend a duplicate", len(f.committed()), dups)
	}
}

func TestSessionEvicted(t *testing.T) {
	f := newFakeCluster(t, 1<<20)
	v := newVolume(t, f, Config{Session: 77})
	mustWrite(t, v, pattern(1, 4*kib), 0)
	mustWrite(t, v, pattern(2, 4*kib), 8*kib)
	mustFlush(t, v)
	f.evict(77)
	mustWrite(t, v, pattern(3, 4*kib), 16*kib)
	mustFlush(t, v)
	if v.Session() == 77 || v.Stats().Sessions != 1 {
		t.Fatalf("session %d, %d new sessions; want a new session", v.Session(), v.Stats().Sessions)
	}
	log := f.committed()
	if last := log[len(log)-1]; last.Session != v.Session() || last.Seq != 1 {
		t.Errorf("first batch of the new session has seq %d", last.Seq)
	}
	if got := f.remoteCopy(); !bytes.Equal(got[16*kib:20*kib], pattern(3, 4*kib)) {
		t.Error("write after the eviction not committed")
	}
}

func TestWaitAppliedErrorsAreRetried(t *testing.T) {
	f := newFakeCluster(t, 1<<20)
	var fails atomic.Int32
	v := newVolumeWith(t, f, &failingApply{fakeCluster: f, fails: &fails}, Config{})
	mustWrite(t, v, pattern(9, 4*kib), 0)
	mustFlush(t, v)
	eventually(t, "the buffer to drain", func() bool { return v.Stats().BufferedBytes == 0 })
	if fails.Load() < 2 {
		t.Errorf("WaitApplied failed %d times, want >= 2", fails.Load())
	}
	if !bytes.Equal(f.local.snapshot()[:4*kib], pattern(9, 4*kib)) {
		t.Error("buffer released before the local apply")
	}
}

// failingApply fails the first two WaitApplied calls.
type failingApply struct {
	*fakeCluster
	fails *atomic.Int32
}

func (f *failingApply) WaitApplied(ctx context.Context, index uint64) error {
	if f.fails.Add(1) <= 2 {
		return errors.New("fake: local FSM busy")
	}
	return f.fakeCluster.WaitApplied(ctx, index)
}

func TestNewValidatesConfig(t *testing.T) {
	f := newFakeCluster(t, 1<<20)
	for _, cfg := range []Config{{MaxBatchBytes: 100}, {MaxInflight: -1}, {MaxBufferBytes: -1}} {
		if v, err := New("vol1", f.local, f, cfg); err == nil {
			v.Close()
			t.Errorf("New accepted %+v", cfg)
		}
	}
	v, err := New("vol1", f.local, f, Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if v.Session() == 0 {
		t.Error("random session is 0")
	}
}

func TestFenceDropsBufferAndFailsForGood(t *testing.T) {
	f := newFakeCluster(t, 1<<20)
	v := newVolume(t, f, Config{MaxInflight: 1})
	mustWrite(t, v, pattern(1, 4*kib), 0)
	mustFlush(t, v)
	f.hold()
	mustWrite(t, v, pattern(2, 4*kib), 8*kib) // in flight, held
	eventually(t, "batch in flight", func() bool { return v.Stats().Inflight == 1 })
	mustWrite(t, v, pattern(3, 4*kib), 16*kib) // pending behind it
	flushed := make(chan error, 1)
	go func() { flushed <- v.Flush() }()

	cause := errors.New("lease moved to site b")
	v.Fence(cause)
	if err := <-flushed; !errors.Is(err, ErrFenced) || !errors.Is(err, ErrFailed) || !errors.Is(err, cause) {
		t.Fatalf("waiting Flush = %v, want ErrFenced wrapping the cause", err)
	}
	if _, err := v.WriteAt(pattern(4, 4*kib), 0); !errors.Is(err, ErrFenced) {
		t.Fatalf("WriteAt after Fence = %v", err)
	}
	v.Fence(errors.New("second")) // no-op
	if err := v.Flush(); err == nil || !errors.Is(err, cause) {
		t.Fatalf("second Fence replaced the first cause: %v", err)
	}
	// The pending write never leaves; reads show committed data only.
	got := mustRead(t, v, 16*kib, 4*kib)
	if !bytes.Equal(got, make([]byte, 4*kib)) {
		t.Fatal("a fenced, never-sent write is still visible")
	}
	f.release()
	eventually(t, "the buffer to drain", func() bool { return v.Stats().BufferedBytes == 0 })
	if remote := f.remoteCopy(); !bytes.Equal(remote[16*kib:20*kib], make([]byte, 4*kib)) {
		t.Fatal("a write buffered before Fence was sent after it")
	}
}

func TestFlushTimeout(t *testing.T) {
	f := newFakeCluster(t, 1<<20)
	v := newVolume(t, f, Config{FlushTimeout: 50 * time.Millisecond})
	mustWrite(t, v, pattern(1, 4*kib), 0)
	mustFlush(t, v) // fast path
	f.hold()        // no quorum
	mustWrite(t, v, pattern(2, 4*kib), 0)
	start := time.Now()
	err := v.Flush()
	if !errors.Is(err, ErrFlushTimeout) || errors.Is(err, ErrFailed) {
		t.Fatalf("Flush without quorum = %v, want ErrFlushTimeout", err)
	}
	if d := time.Since(start); d < 50*time.Millisecond {
		t.Fatalf("Flush failed after %v, before its timeout", d)
	}
	// Not sticky: the write is still buffered, readable and sent once the
	// cluster is back.
	if got := mustRead(t, v, 0, 4*kib); !bytes.Equal(got, pattern(2, 4*kib)) {
		t.Fatal("buffered write lost after a flush timeout")
	}
	f.release()
	mustFlush(t, v)
	if !bytes.Equal(f.remoteCopy()[:4*kib], pattern(2, 4*kib)) {
		t.Fatal("write not committed after the cluster came back")
	}
}

func TestPercentile(t *testing.T) {
	ms := func(n ...int) []time.Duration {
		var out []time.Duration
		for _, x := range n {
			out = append(out, time.Duration(x)*time.Millisecond)
		}
		return out
	}
	for _, tc := range []struct {
		ds   []time.Duration
		q    float64
		want time.Duration
	}{
		{nil, 0.5, 0},
		{ms(7), 0.5, 7 * time.Millisecond},
		{ms(7), 0.99, 7 * time.Millisecond},
		{ms(4, 1, 3, 2), 0.5, 2 * time.Millisecond},
		{ms(5, 1, 4, 2, 3), 0.5, 3 * time.Millisecond},
		{ms(10, 9, 8, 7, 6, 5, 4, 3, 2, 1), 0.99, 10 * time.Millisecond},
		{ms(10, 9, 8, 7, 6, 5, 4, 3, 2, 1), 0.9, 9 * time.Millisecond},
	} {
		if got := percentile(tc.ds, tc.q); got != tc.want {
			t.Errorf("percentile(%v, %v) = %v, want %v", tc.ds, tc.q, got, tc.want)
		}
	}
}

func TestLatencyRingKeepsTheNewest(t *testing.T) {
	var r latencyRing
	for i := 1; i <= latencyWindow+10; i++ {
		r.add(time.Duration(i))
	}
	got := r.snapshot()
	if len(got) != latencyWindow {
		t.Fatalf("ring holds %d durations, want %d", len(got), latencyWindow)
	}
	if lo := percentile(got, 0); lo != 11 {
		t.Fatalf("oldest kept duration %d, want 11 (the first 10 overwritten)", lo)
	}
	if hi := percentile(got, 1); hi != latencyWindow+10 {
		t.Fatalf("newest duration %d, want %d", hi, latencyWindow+10)
	}
}

// TestStatsReportCommitLatency: Stats' percentiles come from the durations
// of real Commit calls.
func TestStatsReportCommitLatency(t *testing.T) {
	f := newFakeCluster(t, 1<<20)
	const commitTime = 3 * time.Millisecond
	f.hook = func(*fsm.WriteBatch, int) error { time.Sleep(commitTime); return nil }
	v := newVolume(t, f, Config{})
	if s := v.Stats(); s.CommitP50 != 0 || s.CommitP99 != 0 {
		t.Fatalf("percentiles before any commit: %v / %v", s.CommitP50, s.CommitP99)
	}
	for i := 0; i < 20; i++ {
		mustWrite(t, v, bytes.Repeat([]byte{byte(i)}, 4096), int64(i)*4096)
		mustFlush(t, v)
	}
	s := v.Stats()
	if s.CommitCount < 20 {
		t.Fatalf("%d commits for 20 flushed writes", s.CommitCount)
	}
	if s.CommitP50 < commitTime || s.CommitP99 < s.CommitP50 {
		t.Fatalf("commit p50 %v, p99 %v: want p50 >= %v (each commit sleeps that long) and p99 >= p50", s.CommitP50, s.CommitP99, commitTime)
	}
	if mean := s.CommitLatency / time.Duration(s.CommitCount); s.CommitP50 > 20*mean {
		t.Fatalf("commit p50 %v far above the mean %v", s.CommitP50, mean)
	}
}

// pending reports whether a buffered operation overlaps [off, off+n).
func pending(v *Volume, off, n int64) bool { return len(v.Buffered(off, n)) > 0 }
