package volume

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"math"
	"math/rand/v2"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

func TestReadWriteRandom(t *testing.T) {
	t.Parallel()
	const size = 4 * MiB
	s := newStore(t)
	v := mustCreate(t, s, "v", size)
	r := rand.New(rand.NewPCG(3, 4))
	model := make([]byte, size) // what the volume must contain

	wantZeros(t, v, 0, size)
	for range 200 {
		n := 1 + r.IntN(200*KiB)
		off := r.Int64N(size - int64(n) + 1)
		switch r.IntN(4) {
		case 0, 1:
			data := randBytes(r, n)
			mustWrite(t, v, data, off)
			copy(model[off:], data)
		case 2:
			if err := v.Trim(off, int64(n)); err != nil {
				t.Fatal(err)
			}
			clear(model[off : off+int64(n)])
		case 3:
			if err := v.WriteZeroes(off, int64(n), r.IntN(2) == 0); err != nil {
				t.Fatal(err)
			}
			clear(model[off : off+int64(n)])
		}
		// Read back a random range.
		n = r.IntN(300 * KiB)
		off = r.Int64N(size - int64(n) + 1)
		if got := mustRead(t, v, off, n); !bytes.Equal(got, model[off:off+int64(n)]) {
			t.Fatalf("ReadAt(%d, +%d) differs from model", off, n)
		}
	}
	if err := v.Sync(); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, v, 0, size); !bytes.Equal(got, model) {
		t.Fatal("final contents differ from model")
	}
	// Zero-length I/O is fine anywhere in [0, Size].
	for _, off := range []int64{0, 100, size} {
		if n, err := v.ReadAt(nil, off); n != 0 || err != nil {
			t.Fatalf("ReadAt(nil, %d) = %d, %v", off, n, err)
		}
		if n, err := v.WriteAt(nil, off); n != 0 || err != nil {
			t.Fatalf("WriteAt(nil, %d) = %d, %v", off, n, err)
		}
	}
}

func TestRangeChecks(t *testing.T) {
	t.Parallel()
	const size = MiB
	s := newStore(t)
	v := mustCreate(t, s, "v", size)
	mustWrite(t, v, bytes.Repeat([]byte{1}, size), 0)

	bad := []struct{ off, length int64 }{
		{-1, 1},
		{-1, 0},
		{0, -1},
		{math.MinInt64, 1},
		{0, size + 1},
		{1, size},
		{size, 1},
		{size + 1, 0},
		{size - 1, 2},
		{math.MaxInt64, 1},
		{math.MaxInt64 - 10, 20},
		{1, math.MaxInt64},
		{math.MaxInt64, math.MaxInt64},
	}
	for _, tc := range bad {
		what := fmt.Sprintf("[%d, +%d)", tc.off, tc.length)
		if tc.length >= 0 && tc.length <= 2*size { // a buffer we can allocate
			_, err := v.ReadAt(make([]byte, tc.length), tc.off)
			wantErr(t, "ReadAt"+what, err, ErrOutOfRange)
			_, err = v.WriteAt(make([]byte, tc.length), tc.off)
			wantErr(t, "WriteAt"+what, err, ErrOutOfRange)
		}
		wantErr(t, "Trim"+what, v.Trim(tc.off, tc.length), ErrOutOfRange)
		wantErr(t, "WriteZeroes"+what, v.WriteZeroes(tc.off, tc.length, true), ErrOutOfRange)
		wantErr(t, "WriteZeroes hole"+what, v.WriteZeroes(tc.off, tc.length, false), ErrOutOfRange)
		wantErr(t, "Hash"+what, v.Hash(tc.off, tc.length, sha256.New()), ErrOutOfRange)
	}
	// Nothing was modified by the rejected calls.
	if got := mustRead(t, v, 0, size); !bytes.Equal(got, bytes.Repeat([]byte{1}, size)) {
		t.Fatal("rejected calls modified the volume")
	}

	// BlockStatus clips the length at Size but not the offset.
	for _, tc := range []struct{ off, length int64 }{{-1, 1}, {size + 1, 0}, {0, -1}, {math.MaxInt64, 1}, {math.MinInt64, 0}} {
		_, err := v.BlockStatus(tc.off, tc.length)
		wantErr(t, fmt.Sprintf("BlockStatus(%d, %d)", tc.off, tc.length), err, ErrOutOfRange)
	}
	for _, tc := range []struct{ off, length, end int64 }{
		{0, math.MaxInt64, size},
		{size - 4096, math.MaxInt64, size},
		{4096, size, size},
		{size, 100, size},
		{0, 0, 0},
	} {
		exts, err := v.BlockStatus(tc.off, tc.length)
		if err != nil {
			t.Fatalf("BlockStatus(%d, %d): %v", tc.off, tc.length, err)
		}
		if tc.end <= tc.off {
			if len(exts) != 0 {
				t.Fatalf("BlockStatus(%d, %d) = %+v, want none", tc.off, tc.length, exts)
			}
			continue
		}
		checkExtents(t, exts, tc.off, tc.end)
	}

	// The error names the volume and the range.
	_, err := v.ReadAt(make([]byte, 2), size-1)
	if msg := err.Error(); !bytes.Contains([]byte(msg), []byte(`"v"`)) || !bytes.Contains([]byte(msg), []byte("1048575")) {
		t.Errorf("error %q lacks context", msg)
	}
}

const region = 64 * KiB // aligned to any filesystem block size we expect

func TestTrim(t *testing.T) {
	t.Parallel()
	s := newStore(t)
	v := mustCreate(t, s, "v", 16*region)
	r := rand.New(rand.NewPCG(5, 6))
	data := randBytes(r, 16*region)
	mustWrite(t, v, data, 0)
	if err := v.Sync(); err != nil {
		t.Fatal(err)
	}

	if err := v.Trim(4*region, 4*region); err != nil {
		t.Fatal(err)
	}
	wantZeros(t, v, 4*region, 4*region)
	if got := mustRead(t, v, 0, 4*region); !bytes.Equal(got, data[:4*region]) {
		t.Fatal("trim changed data before the range")
	}
	if got := mustRead(t, v, 8*region, 8*region); !bytes.Equal(got, data[8*region:]) {
		t.Fatal("trim changed data after the range")
	}
	exts, err := v.BlockStatus(0, v.Size())
	if err != nil {
		t.Fatal(err)
	}
	checkExtents(t, exts, 0, v.Size())
	want := []Extent{{0, 4 * region, false}, {4 * region, 4 * region, true}, {8 * region, 8 * region, false}}
	if fmt.Sprint(exts) != fmt.Sprint(want) {
		t.Fatalf("BlockStatus after trim = %+v, want %+v", exts, want)
	}

	// Unaligned trims zero exactly the range, nothing more.
	if err := v.Trim(100, 5000); err != nil {
		t.Fatal(err)
	}
	wantZeros(t, v, 100, 5000)
	if got := mustRead(t, v, 0, 100); !bytes.Equal(got, data[:100]) {
		t.Fatal("unaligned trim zeroed too much before")
	}
	if got := mustRead(t, v, 5100, 1000); !bytes.Equal(got, data[5100:6100]) {
		t.Fatal("unaligned trim zeroed too much after")
	}
	if err := v.Trim(0, 0); err != nil {
		t.Fatalf("empty trim: %v", err)
	}
}

func TestWriteZeroes(t *testing.T) {
	t.Parallel()
	for _, noHole := range []bool{false, true} {
		for _, fallback := range []bool{false, true} {
			t.Run(fmt.Sprintf("noHole=%v/fallback=%v", noHole, fallback), func(t *testing.T) {
				t.Parallel()
				s := newStore(t)
				v := mustCreate(t, s, "v", 3*MiB)
				calls := 0
				if fallback {
					v.fallocate = func(int, uint32, int64, int64) error { calls++; return unix.EOPNOTSUPP }
				}
				data := bytes.Repeat([]byte{0xFF}, 3*MiB)
				mustWrite(t, v, data, 0)
				// Spans more than one 1 MiB fallback chunk, unaligned.
				off, n := int64(1000), int64(2*MiB+12345)
				if err := v.WriteZeroes(off, n, noHole); err != nil {
					t.Fatal(err)
				}
				if want := map[bool]int{false: 1, true: 0}[noHole]; fallback && calls != want {
					t.Fatalf("fallocate called %d times, want %d", calls, want)
				}
				wantZeros(t, v, off, int(n))
				if got := mustRead(t, v, 0, int(off)); !bytes.Equal(got, data[:off]) {
					t.Fatal("data before range changed")
				}
				if got := mustRead(t, v, off+n, int(3*MiB-off-n)); !bytes.Equal(got, data[off+n:]) {
					t.Fatal("data after range changed")
				}
				exts, err := v.BlockStatus(0, v.Size())
				if err != nil {
					t.Fatal(err)
				}
				checkExtents(t, exts, 0, v.Size())
				if holeAt(exts, 0) || holeAt(exts, 3*MiB-1) {
					t.Fatalf("written data reported as hole: %+v", exts)
				}
				if noHole && (holeAt(exts, off) || holeAt(exts, MiB) || holeAt(exts, off+n-1)) {
					t.Fatalf("a NO_HOLE zeroing is reported as a hole: %+v", exts)
				}
			})
		}
	}
}

func TestWriteZeroesError(t *testing.T) {
	t.Parallel()
	s := newStore(t)
	v := mustCreate(t, s, "v", MiB)
	v.fallocate = func(int, uint32, int64, int64) error { return unix.EIO }
	err := v.WriteZeroes(0, 4096, false)
	wantErr(t, "WriteZeroes", err, unix.EIO)
	wantErr(t, "Trim", v.Trim(0, 4096), unix.EIO)
	eintr := 3
	v.fallocate = func(int, uint32, int64, int64) error {
		if eintr > 0 {
			eintr--
			return unix.EINTR
		}
		return nil
	}
	if err := v.Trim(0, 4096); err != nil || eintr != 0 {
		t.Fatalf("EINTR not retried: %v, %d left", err, eintr)
	}
}

// TestBlockStatus writes a known layout of 64 KiB regions and checks the
// extents for the whole volume and for many subranges. Filesystems may
// report data where nothing was written (allocation granularity), but never
// a hole where data was written; on this layout they should report holes
// for the unwritten regions, and the test logs if not.
func TestBlockStatus(t *testing.T) {
	t.Parallel()
	layout := "D.DD...D.D.DDDD..." // D: data written, .: never written
	size := int64(len(layout)) * region
	s := newStore(t)
	v := mustCreate(t, s, "v", size)
	r := rand.New(rand.NewPCG(7, 8))
	for i, c := range layout {
		if c == 'D' {
			mustWrite(t, v, randBytes(r, region), int64(i)*region)
		}
	}
	if err := v.Sync(); err != nil {
		t.Fatal(err)
	}

	exts, err := v.BlockStatus(0, size)
	if err != nil {
		t.Fatal(err)
	}
	checkExtents(t, exts, 0, size)
	exact := true
	for i, c := range layout {
		first, last := int64(i)*region, int64(i+1)*region-1
		hole := holeAt(exts, first)
		if hole != holeAt(exts, last) {
			exact = false
		}
		switch {
		case c == 'D' && (hole || holeAt(exts, last)):
			t.Fatalf("region %d has data but is reported as hole: %+v", i, exts)
		case c == '.' && !hole:
			exact = false
		}
		if hole {
			wantZeros(t, v, first, region)
		}
	}
	if !exact {
		t.Logf("filesystem reports coarser extents than written: %+v", exts)
	}

	// Every subrange is described consistently with the full answer.
	for range 200 {
		off := r.Int64N(size + 1)
		length := r.Int64N(size + region)
		sub, err := v.BlockStatus(off, length)
		if err != nil {
			t.Fatal(err)
		}
		end := min(off+length, size)
		checkExtents(t, sub, off, end)
		for _, e := range sub {
			for _, p := range []int64{e.Offset, e.Offset + e.Length - 1} {
				if holeAt(exts, p) != e.Hole {
					t.Fatalf("BlockStatus(%d, %d) = %+v disagrees with full map %+v at %d", off, length, sub, exts, p)
				}
			}
		}
	}

	// A fresh volume is one hole; a fully written one is one data extent.
	empty := mustCreate(t, s, "empty", size)
	if exts, err := empty.BlockStatus(0, size); err != nil || fmt.Sprint(exts) != fmt.Sprint([]Extent{{0, size, true}}) {
		t.Fatalf("empty volume: %+v, %v", exts, err)
	}
	full := mustCreate(t, s, "full", 4*region)
	mustWrite(t, full, randBytes(r, 4*region), 0)
	if exts, err := full.BlockStatus(0, 4*region); err != nil || fmt.Sprint(exts) != fmt.Sprint([]Extent{{0, 4 * region, false}}) {
		t.Fatalf("full volume: %+v, %v", exts, err)
	}
}

func TestAppendExtent(t *testing.T) {
	t.Parallel()
	var exts []Extent
	for _, e := range []Extent{{0, 1, true}, {1, 2, true}, {3, 1, false}, {4, 5, false}, {9, 1, true}} {
		exts = appendExtent(exts, e)
	}
	want := []Extent{{0, 3, true}, {3, 6, false}, {9, 1, true}}
	if fmt.Sprint(exts) != fmt.Sprint(want) {
		t.Fatalf("got %+v, want %+v", exts, want)
	}
}

func TestHash(t *testing.T) {
	t.Parallel()
	const size = 3*MiB + 8*KiB // several hash chunks plus a partial one
	s := newStore(t)
	v := mustCreate(t, s, "v", size)
	r := rand.New(rand.NewPCG(9, 10))
	mustWrite(t, v, randBytes(r, MiB), 512*KiB)
	mustWrite(t, v, randBytes(r, 100), size-100)

	for _, rg := range []struct{ off, length int64 }{
		{0, size}, {4096, size - 8192}, {MiB - 1, MiB + 2}, {size, 0}, {7, 1},
	} {
		h := sha256.New()
		if err := v.Hash(rg.off, rg.length, h); err != nil {
			t.Fatal(err)
		}
		want := sha256.Sum256(mustRead(t, v, rg.off, int(rg.length)))
		if !bytes.Equal(h.Sum(nil), want[:]) {
			t.Fatalf("Hash(%d, %d) differs from sha256 of the data", rg.off, rg.length)
		}
	}

	// Identical contents give identical digests, however they were made.
	w := mustCreate(t, s, "w", size)
	buf := mustRead(t, v, 0, size)
	mustWrite(t, w, buf, 0)
	if err := w.WriteZeroes(0, 512*KiB, true); err != nil {
		t.Fatal(err)
	}
	hv, hw := sha256.New(), sha256.New()
	if err := v.Hash(0, size, hv); err != nil {
		t.Fatal(err)
	}
	if err := w.Hash(0, size, hw); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(hv.Sum(nil), hw.Sum(nil)) {
		t.Fatal("equal contents hash differently")
	}
}

// TestConcurrentIO runs writers and readers on disjoint ranges while other
// goroutines query metadata, block status and grow the volume.
func TestConcurrentIO(t *testing.T) {
	t.Parallel()
	const workers, span = 8, 256 * KiB
	s := newStore(t)
	v := mustCreate(t, s, "v", workers*span)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 11))
			base := int64(w) * span
			model := make([]byte, span)
			for i := range 100 {
				n := 1 + r.IntN(32*KiB)
				off := r.Int64N(span - int64(n) + 1)
				if r.IntN(5) == 0 {
					if err := v.Trim(base+off, int64(n)); err != nil {
						t.Error(err)
						return
					}
					clear(model[off : off+int64(n)])
				} else {
					data := randBytes(r, n)
					if _, err := v.WriteAt(data, base+off); err != nil {
						t.Error(err)
						return
					}
					copy(model[off:], data)
				}
				// Read back around the change; every 10th time all.
				roff, rlen := max(off-4*KiB, 0), min(int64(n)+8*KiB, span)
				if i%10 == 9 {
					roff, rlen = 0, span
				}
				rlen = min(rlen, span-roff)
				got := make([]byte, rlen)
				if _, err := v.ReadAt(got, base+roff); err != nil {
					t.Error(err)
					return
				}
				if !bytes.Equal(got, model[roff:roff+rlen]) {
					t.Errorf("worker %d: [%d, +%d) differs from model", w, roff, rlen)
					return
				}
			}
		})
	}
	stop := make(chan struct{})
	var bg sync.WaitGroup
	bg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			size := v.Size()
			exts, err := v.BlockStatus(0, size)
			if err != nil {
				t.Error(err)
				return
			}
			checkExtents(t, exts, 0, size)
			_ = v.Meta()
			_ = s.List()
		}
	})
	bg.Go(func() {
		for i := range 5 {
			if err := s.Resize("v", int64(workers)*span+int64(i+1)*MiB); err != nil {
				t.Error(err)
			}
			if err := v.Sync(); err != nil {
				t.Error(err)
			}
		}
	})
	wg.Wait()
	close(stop)
	bg.Wait()
}

func BenchmarkWriteAt4K(b *testing.B) {
	const size = 64 * MiB
	s := newStore(b)
	v := mustCreate(b, s, "bench", size)
	buf := randBytes(rand.New(rand.NewPCG(1, 1)), 4096)
	b.SetBytes(int64(len(buf)))
	var off int64
	for b.Loop() {
		if _, err := v.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
		off = (off + 4096) % size
	}
}

func BenchmarkReadAt1M(b *testing.B) {
	const size = 16 * MiB
	s := newStore(b)
	v := mustCreate(b, s, "bench", size)
	mustWrite(b, v, randBytes(rand.New(rand.NewPCG(1, 1)), size), 0)
	buf := make([]byte, MiB)
	b.SetBytes(int64(len(buf)))
	var off int64
	for b.Loop() {
		if _, err := v.ReadAt(buf, off); err != nil {
			b.Fatal(err)
		}
		off = (off + MiB) % size
	}
}
