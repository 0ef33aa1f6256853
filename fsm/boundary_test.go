package fsm

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/hashicorp/raft"
)

// TestAtBoundaryConsistent runs an apply loop whose every entry rewrites a
// whole volume with its own byte, in several ops (so a read in the middle
// of an entry would see two bytes), against readers that read the volume
// inside AtBoundary: each must see exactly the bytes of the entry at the
// index it was given, never a mix and never another entry's.
func TestAtBoundaryConsistent(t *testing.T) {
	const size, opLen, entries = 256 * KiB, 16 * KiB, 300
	s := newSite(t, t.TempDir(), Options{})
	l := &testLog{t: t}
	s.mustApply(l, create("v", size)) // index 1: zeros
	v, err := s.store.Get("v")
	if err != nil {
		t.Fatal(err)
	}
	want := func(index uint64) byte {
		if index < 2 {
			return 0
		}
		return byte(index)
	}
	var cmds []*raft.Log
	for i := 2; i < 2+entries; i++ {
		b := &WriteBatch{Volume: "v", Session: 1, Seq: uint64(i - 1)}
		for off := int64(0); off < size; off += opLen {
			b.Ops = append(b.Ops, write(off, bytes.Repeat([]byte{byte(i)}, opLen)))
		}
		cmds = append(cmds, entry(t, uint64(i), b))
	}

	var stop atomic.Bool
	var reads, moved atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, size)
			last := uint64(0)
			for !stop.Load() {
				var bad error
				s.fsm.AtBoundary(func(applied uint64) {
					if applied < last {
						bad = errors.New("applied index went backwards")
						return
					}
					if applied != last {
						moved.Add(1)
					}
					last = applied
					if _, err := v.ReadAt(buf, 0); err != nil {
						bad = err
						return
					}
					if n := bytes.Count(buf, []byte{want(applied)}); n != size {
						bad = fmt.Errorf("torn or stale read at index %d: %d of %d bytes hold its entry's byte", applied, n, size)
					}
					if got := s.fsm.AppliedIndex(); got != applied {
						bad = errors.New("the applied index moved inside AtBoundary")
					}
				})
				reads.Add(1)
				if bad != nil {
					errs <- bad
					return
				}
			}
		}()
	}
	for _, c := range cmds {
		if r := s.applyLog(c); r.Err != nil {
			t.Fatalf("Apply(%d): %v", r.Index, r.Err)
		}
	}
	stop.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if reads.Load() < 10 || moved.Load() < 2 {
		t.Fatalf("the readers did not overlap the apply loop (%d reads, %d index changes seen)", reads.Load(), moved.Load())
	}
	t.Logf("%d reads at boundaries, %d index changes seen", reads.Load(), moved.Load())
}

// TestCopyExact follows the fuzzy-until index, the failed state and Close.
func TestCopyExact(t *testing.T) {
	s := newSite(t, t.TempDir(), Options{})
	l := &testLog{t: t}
	if !s.fsm.CopyExact() {
		t.Fatal("a new FSM is not exact")
	}
	s.mustApply(l, create("v", 64*KiB)) // 1
	s.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 1, Ops: []Op{write(0, []byte("a"))}})
	s.restart()
	// As after a crash: the log holds entries past the checkpoint.
	s.fsm.SetReplayBound(5)
	if s.fsm.CopyExact() {
		t.Fatal("exact while the volumes may be ahead of the applied index (replay bound 5, applied 2)")
	}
	for seq := uint64(2); seq <= 4; seq++ {
		s.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: seq, Ops: []Op{write(0, []byte("b"))}})
	}
	if s.fsm.CopyExact() {
		t.Fatal("exact at applied 5, below the fuzzy-until index 6")
	}
	s.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 5, Ops: []Op{write(0, []byte("c"))}}) // 6
	if !s.fsm.CopyExact() {
		t.Fatal("not exact once past the fuzzy-until index")
	}
	s.fsm.fail(7, errors.New("disk on fire"))
	if s.fsm.CopyExact() {
		t.Fatal("exact in the failed state")
	}
	s.restart()
	if err := s.fsm.Close(); err != nil {
		t.Fatal(err)
	}
	if s.fsm.CopyExact() {
		t.Fatal("exact after Close")
	}
}

// BenchmarkApplyWriteBatch4K applies one-op 4 KiB batches: the smallest
// entries, where the boundary lock Apply takes per entry weighs most.
func BenchmarkApplyWriteBatch4K(b *testing.B) {
	s := newSite(b, b.TempDir(), Options{Logger: slog.New(slog.DiscardHandler)})
	l := &testLog{t: b}
	const volSize = 64 * MiB
	s.mustApply(l, create("bench", volSize))
	data := bytes.Repeat([]byte{7}, 4*KiB)
	b.SetBytes(4 * KiB)
	off, seq, index := int64(0), uint64(0), uint64(len(l.entries))
	for b.Loop() {
		b.StopTimer()
		seq++
		index++
		e := entry(b, index, &WriteBatch{Volume: "bench", Session: 1, Seq: seq, Ops: []Op{write(off, data)}})
		off = (off + 4*KiB) % volSize
		b.StartTimer()
		if r := s.fsm.Apply(e).(*Result); r.Err != nil {
			b.Fatal(r.Err)
		}
	}
}
