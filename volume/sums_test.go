package volume

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// TestSumsFollowMutations applies random writes, trims, zeroings and
// resizes of every shape (aligned, unaligned, sub-block, spanning, at the
// short last block) to volumes with 4096- and 512-byte block sizes, and
// checks after each step that the sums file on disk is exactly the one for
// the model, that nothing is damaged and that the data equals the model.
func TestSumsFollowMutations(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name      string
		blockSize int
		size      int64
	}{
		{"4096", 4096, 1 * MiB},
		{"512", 512, 1*MiB + 1536}, // a short last checksum block
		{"512-tiny", 512, 512},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			s := openStore(t, dir)
			v, err := s.Create(Meta{Name: "v", Size: tc.size, BlockSize: tc.blockSize, Created: testCreated})
			if err != nil {
				t.Fatal(err)
			}
			r := rand.New(rand.NewPCG(7, uint64(tc.blockSize)))
			model := make([]byte, tc.size)
			checkSumsFile(t, dir, "v", model)
			bs := int64(tc.blockSize)
			for i := range 300 {
				size := int64(len(model))
				// Offsets and lengths: multiples of the block size
				// (NBD's rule), biased towards short and unaligned.
				off := r.Int64N(size/bs) * bs
				n := bs * (1 + r.Int64N(min(size-off, 40*KiB)/bs))
				if r.IntN(3) == 0 {
					// Arbitrary bytes: the package allows them.
					off = r.Int64N(size)
					n = 1 + r.Int64N(min(size-off, 20*KiB))
				}
				what := ""
				switch k := r.IntN(10); {
				case k < 5:
					what = "write"
					data := randBytes(r, int(n))
					mustWrite(t, v, data, off)
					copy(model[off:], data)
				case k < 7:
					what = "trim"
					if err := v.Trim(off, n); err != nil {
						t.Fatal(err)
					}
					clear(model[off : off+n])
				case k < 9:
					what = "zero"
					if err := v.WriteZeroes(off, n, r.IntN(2) == 0); err != nil {
						t.Fatal(err)
					}
					clear(model[off : off+n])
				default:
					what = "resize"
					ns := bs * (1 + r.Int64N(int64(tc.size)*3/2/bs))
					if err := s.Resize("v", ns); err != nil {
						t.Fatal(err)
					}
					if ns < size {
						model = model[:ns]
					} else {
						model = append(model, make([]byte, ns-size)...)
					}
				}
				if i%10 == 0 || what == "resize" {
					checkSumsFile(t, dir, "v", model)
					wantNoDamage(t, v, model)
				} else {
					ro := max(0, off-5000)
					rn := min(int64(len(model))-ro, n+10000)
					if got := mustRead(t, v, ro, int(rn)); !bytes.Equal(got, model[ro:ro+rn]) {
						t.Fatalf("step %d (%s [%d, +%d)): read differs", i, what, off, n)
					}
				}
			}
			checkSumsFile(t, dir, "v", model)
			wantNoDamage(t, v, model)
			// And after a restart.
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s = openStore(t, dir)
			v, err = s.Get("v")
			if err != nil {
				t.Fatal(err)
			}
			checkSumsFile(t, dir, "v", model)
			wantNoDamage(t, v, model)
		})
	}
}

// TestCorruptByteDetected overwrites one byte of the data file behind the
// volume's back: reads covering it fail naming exactly that block, reads
// around it work, ReadHealthy fills the rest, a partial write does not heal
// it and a full-block write does.
func TestCorruptByteDetected(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := openStore(t, dir)
	v := mustCreate(t, s, "v", MiB)
	r := rand.New(rand.NewPCG(1, 9))
	model := randBytes(r, MiB)
	mustWrite(t, v, model, 0)
	const bad = 5*4096 + 1234
	corruptFile(t, dataPath(dir, "v"), bad, []byte{^model[bad]})
	model[bad] ^= 0xFF

	blk := Range{5 * 4096, 4096}
	wantDamage(t, v, 0, MiB, []Range{blk})
	wantDamage(t, v, bad, 1, []Range{blk})                                   // sub-block read
	wantDamage(t, v, 3*4096+100, 3*4096, []Range{blk})                       // unaligned, spans it
	if got := mustRead(t, v, 0, 5*4096); !bytes.Equal(got, model[:5*4096]) { // just before
		t.Fatal("read before the damaged block differs")
	}
	if got := mustRead(t, v, 6*4096, 4096); !bytes.Equal(got, model[6*4096:7*4096]) {
		t.Fatal("read after the damaged block differs")
	}
	if d := v.Damaged(); !slices.Equal(d, []Range{blk}) {
		t.Fatalf("Damaged = %v", d)
	}
	p := make([]byte, 64*KiB)
	got, err := v.ReadHealthy(p, 100)
	if err != nil || !slices.Equal(got, []Range{blk}) {
		t.Fatalf("ReadHealthy = %v, %v", got, err)
	}
	if !bytes.Equal(p[:blk.Off-100], model[100:blk.Off]) || !bytes.Equal(p[blk.End()-100:], model[blk.End():100+64*KiB]) {
		t.Fatal("ReadHealthy: healthy bytes differ")
	}
	if got, err := v.ReadHealthy(p[:100], blk.Off+4000); err != nil || !slices.Equal(got, []Range{{blk.Off + 4000, 96}}) {
		t.Fatalf("ReadHealthy clipped = %v, %v", got, err)
	}
	var de *DamageError
	_, err = v.ReadAt(p, 0)
	if !errors.As(err, &de) || !strings.Contains(err.Error(), "[20480, +4096)") || !strings.Contains(err.Error(), `"v"`) {
		t.Fatalf("error text %q", err)
	}

	// A partial write does not heal it, and must not bless it with a
	// fresh sum: after a restart (damage map gone) it is still damaged.
	mustWrite(t, v, []byte("abc"), blk.Off+10)
	wantDamage(t, v, blk.Off, 4096, []Range{blk})
	s.Close()
	s = openStore(t, dir)
	v, err = s.Get("v")
	if err != nil {
		t.Fatal(err)
	}
	if d := v.Damaged(); len(d) != 0 {
		t.Fatalf("Damaged after restart = %v (memory only)", d)
	}
	wantDamage(t, v, blk.Off, 4096, []Range{blk})

	// A full-block write heals it.
	copy(model[blk.Off:], randBytes(r, 4096))
	mustWrite(t, v, model[blk.Off:blk.End()], blk.Off)
	wantNoDamage(t, v, model)

	// So do a trim and an aligned zeroing covering the block.
	for i, heal := range []func() error{
		func() error { return v.Trim(blk.Off, 4096) },
		func() error { return v.WriteZeroes(blk.Off-4096, 3*4096, true) },
	} {
		corruptFile(t, dataPath(dir, "v"), blk.Off+7, []byte{1, 2, 3})
		wantDamage(t, v, blk.Off, 1, []Range{blk})
		if err := heal(); err != nil {
			t.Fatal(err)
		}
		clear(model[blk.Off:blk.End()])
		if i == 1 {
			clear(model[blk.Off-4096 : blk.End()+4096])
		}
		wantNoDamage(t, v, model)
	}
	checkSumsFile(t, dir, "v", model)
}

// TestSmallBlockPartialWrites: 512-byte writes on a 512-byte block size
// volume check the 4 KiB block they land in; a corrupt neighbour sector is
// found by the write's check and the block stays damaged.
func TestSmallBlockPartialWrites(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := openStore(t, dir)
	v, err := s.Create(Meta{Name: "v", Size: 64*KiB + 512, BlockSize: 512, Created: testCreated})
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, v.Size())
	r := rand.New(rand.NewPCG(2, 2))
	for sec := int64(0); sec < v.Size()/512; sec++ {
		d := randBytes(r, 512)
		mustWrite(t, v, d, sec*512)
		copy(model[sec*512:], d)
	}
	checkSumsFile(t, dir, "v", model)
	wantNoDamage(t, v, model)
	// The short last block (one sector).
	wantNoDamage(t, v, model)
	corruptFile(t, dataPath(dir, "v"), 64*KiB+3, []byte{^model[64*KiB+3]})
	wantDamage(t, v, 64*KiB, 512, []Range{{64 * KiB, 512}})
	// Damage a sector, then write its neighbour: the write's check finds it.
	corruptFile(t, dataPath(dir, "v"), 8192+512, []byte{^model[8192+512]})
	mustWrite(t, v, make([]byte, 512), 8192)
	if d := v.Damaged(); !slices.Equal(d, []Range{{8192, 4096}, {64 * KiB, 512}}) {
		t.Fatalf("Damaged = %v", d)
	}
}

// TestRepair damages blocks, takes a token, touches one of them after it
// and repairs: the touched block is skipped, the others repaired; a later
// token repairs the rest.
func TestRepair(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := openStore(t, dir)
	v := mustCreate(t, s, "v", 2*MiB)
	r := rand.New(rand.NewPCG(3, 3))
	model := randBytes(r, 2*MiB)
	mustWrite(t, v, model, 0)
	for _, b := range []int64{2, 3, 10, 200} {
		corruptFile(t, dataPath(dir, "v"), b*4096+17, []byte{^model[b*4096+17]})
	}
	found, err := v.Scrub(0, 2*MiB)
	want := []Range{{2 * 4096, 2 * 4096}, {10 * 4096, 4096}, {200 * 4096, 4096}}
	if err != nil || !slices.Equal(found, want) {
		t.Fatalf("Scrub = %v, %v; want %v", found, err, want)
	}
	token := v.RepairToken()
	// After the token: a partial write to damaged block 10 and a write
	// elsewhere.
	mustWrite(t, v, []byte("late"), 10*4096+100)
	copy(model[10*4096+100:], "late")
	mustWrite(t, v, model[MiB:MiB+4096], MiB)

	// The repair data as of the token: block 10 without "late" (stale).
	good := bytes.Clone(model[:MiB])
	copy(good[10*4096+100:], "LATE")
	repaired, still, err := v.Repair(good, 0, token)
	if err != nil {
		t.Fatal(err)
	}
	if w := []Range{{2 * 4096, 2 * 4096}, {200 * 4096, 4096}}; !slices.Equal(repaired, w) {
		t.Fatalf("repaired = %v, want %v", repaired, w)
	}
	if w := []Range{{10 * 4096, 4096}}; !slices.Equal(still, w) {
		t.Fatalf("still = %v, want %v", still, w)
	}
	if got := mustRead(t, v, 0, 10*4096); !bytes.Equal(got, model[:10*4096]) {
		t.Fatal("repaired blocks read wrong")
	}
	wantDamage(t, v, 0, 2*MiB, []Range{{10 * 4096, 4096}})
	// The skipped block kept its bytes, including the late write.
	p := make([]byte, 4096)
	if bad, err := v.ReadHealthy(p, 10*4096); err != nil || len(bad) != 1 || !bytes.Equal(p[100:104], []byte("late")) {
		t.Fatalf("skipped block: %v %v %q", bad, err, p[100:104])
	}

	// With a fresh token and current data it is repaired.
	repaired, still, err = v.Repair(model[8*4096:12*4096], 8*4096, v.RepairToken())
	if err != nil || !slices.Equal(repaired, []Range{{10 * 4096, 4096}}) || len(still) != 0 {
		t.Fatalf("second Repair = %v, %v, %v", repaired, still, err)
	}
	wantNoDamage(t, v, model)
	checkSumsFile(t, dir, "v", model)

	// Healthy blocks are never written by Repair.
	junk := make([]byte, 8192)
	if repaired, still, err := v.Repair(junk, 0, v.RepairToken()); err != nil || repaired != nil || still != nil {
		t.Fatalf("Repair of healthy blocks = %v, %v, %v", repaired, still, err)
	}
	wantNoDamage(t, v, model)
	// Misaligned or out of range.
	_, _, err = v.Repair(junk, 100, 0)
	wantErr(t, "Repair misaligned", err, ErrOutOfRange)
	_, _, err = v.Repair(junk[:100], 0, 0)
	wantErr(t, "Repair misaligned length", err, ErrOutOfRange)
	_, _, err = v.Repair(junk, 2*MiB-4096, 0)
	wantErr(t, "Repair out of range", err, ErrOutOfRange)
}

// TestMarkDamagedRepair: a block whose data matches its sum but that a
// replicated verify found wrong is marked, reads fail, Repair heals it.
func TestMarkDamagedRepair(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := openStore(t, dir)
	v, err := s.Create(Meta{Name: "v", Size: 3*4096 + 1024, BlockSize: 512, Created: testCreated})
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(4, 4))
	model := randBytes(r, int(v.Size()))
	mustWrite(t, v, model, 0)
	if err := v.MarkDamaged(4096+1, 1); err != nil {
		t.Fatal(err)
	}
	if err := v.MarkDamaged(3*4096+512, 512); err != nil { // the short last block
		t.Fatal(err)
	}
	want := []Range{{4096, 4096}, {3 * 4096, 1024}}
	if d := v.Damaged(); !slices.Equal(d, want) {
		t.Fatalf("Damaged = %v, want %v", d, want)
	}
	wantDamage(t, v, 0, int(v.Size()), want)
	wantErr(t, "MarkDamaged out of range", v.MarkDamaged(v.Size(), 1), ErrOutOfRange)
	// A partial write to a marked block keeps it damaged.
	mustWrite(t, v, model[4096:4096+512], 4096)
	wantDamage(t, v, 4096, 512, want[:1])

	token := v.RepairToken()
	good := bytes.Clone(model)
	repaired, still, err := v.Repair(good, 0, token)
	if err != nil || !slices.Equal(repaired, want) || len(still) != 0 {
		t.Fatalf("Repair = %v, %v, %v", repaired, still, err)
	}
	wantNoDamage(t, v, model)
	checkSumsFile(t, dir, "v", model)
}

// TestScrub corrupts data blocks and the sums of a hole, and truncates the
// data file: Scrub finds exactly those blocks and nothing else.
func TestScrub(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := openStore(t, dir)
	v := mustCreate(t, s, "v", 4*MiB)
	r := rand.New(rand.NewPCG(5, 5))
	data := randBytes(r, 2*MiB)
	mustWrite(t, v, data, 0) // [2 MiB, 4 MiB) stays a hole
	if found, err := v.Scrub(0, 4*MiB); err != nil || len(found) != 0 {
		t.Fatalf("Scrub of a healthy volume = %v, %v", found, err)
	}
	corruptFile(t, dataPath(dir, "v"), 4096*7, []byte{^data[4096*7]})
	corruptFile(t, dataPath(dir, "v"), MiB+5, []byte{^data[MiB+5]})
	// A hole whose stored sum is not 0.
	corruptFile(t, sumsPath(dir, "v"), sumOff(3*MiB/4096), []byte{1})
	want := []Range{{4096 * 7, 4096}, {MiB, 4096}, {3 * MiB, 4096}}
	found, err := v.Scrub(0, 4*MiB)
	if err != nil || !slices.Equal(found, want) {
		t.Fatalf("Scrub = %v, %v; want %v", found, err, want)
	}
	if d := v.Damaged(); !slices.Equal(d, want) {
		t.Fatalf("Damaged = %v", d)
	}
	// A subrange, unaligned: only what it covers.
	found, err = v.Scrub(MiB+100, 10)
	if err != nil || !slices.Equal(found, []Range{{MiB, 4096}}) {
		t.Fatalf("Scrub subrange = %v, %v", found, err)
	}
	// Cut the data file: the lost blocks are found.
	if err := os.Truncate(dataPath(dir, "v"), 2*MiB-8192); err != nil {
		t.Fatal(err)
	}
	found, err = v.Scrub(2*MiB-3*4096, 3*4096)
	if err != nil || !slices.Equal(found, []Range{{2*MiB - 8192, 8192}}) {
		t.Fatalf("Scrub after truncate = %v, %v", found, err)
	}
	_, err = v.Scrub(0, 4*MiB+1)
	wantErr(t, "Scrub out of range", err, ErrOutOfRange)
}

// TestReadEIO injects read errors: the unreadable block is damage (not a
// plain error), found by narrowing a larger read down block by block.
func TestReadEIO(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := openStore(t, dir)
	v := mustCreate(t, s, "v", MiB)
	r := rand.New(rand.NewPCG(6, 6))
	model := randBytes(r, MiB)
	mustWrite(t, v, model, 0)
	const badOff = 9 * 4096
	v.readAt = func(f *os.File, p []byte, off int64) (int, error) {
		if off < badOff+4096 && off+int64(len(p)) > badOff {
			return 0, unix.EIO
		}
		return f.ReadAt(p, off)
	}
	blk := []Range{{badOff, 4096}}
	wantDamage(t, v, 0, 64*KiB, blk)
	wantDamage(t, v, badOff+10, 10, blk)
	p := make([]byte, 64*KiB)
	if bad, err := v.ReadHealthy(p, 0); err != nil || !slices.Equal(bad, blk) ||
		!bytes.Equal(p[:badOff], model[:badOff]) || !bytes.Equal(p[badOff+4096:], model[badOff+4096:64*KiB]) {
		t.Fatalf("ReadHealthy = %v, %v", bad, err)
	}
	// A partial write to it writes, but it stays damaged.
	mustWrite(t, v, []byte{1}, badOff)
	if d := v.Damaged(); !slices.Equal(d, blk) {
		t.Fatalf("Damaged = %v", d)
	}
	// The disk recovers (the sector was remapped); the old sum no
	// longer matches the data, so it stays damaged until repaired.
	v.readAt = (*os.File).ReadAt
	model[badOff] = 1
	wantDamage(t, v, badOff, 4096, blk)
	if rep, _, err := v.Repair(model[badOff:badOff+4096], badOff, v.RepairToken()); err != nil || !slices.Equal(rep, blk) {
		t.Fatalf("Repair = %v, %v", rep, err)
	}
	wantNoDamage(t, v, model)
}

// TestHammer runs writers (whole and partial blocks, trims) and readers on
// the same few blocks concurrently: no read may ever report damage, and at
// the end the sums are exact.
func TestHammer(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := openStore(t, dir)
	const size = 2*MiB + 4096 // the ops straddle the 1 MiB region boundary
	v, err := s.Create(Meta{Name: "v", Size: size, BlockSize: 512, Created: testCreated})
	if err != nil {
		t.Fatal(err)
	}
	const base = MiB - 4*4096
	var wg sync.WaitGroup
	var failed sync.Once
	fail := func(err error) { failed.Do(func() { t.Error(err) }) }
	iters := 400
	if testing.Short() {
		iters = 100
	}
	for w := range 4 {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 77))
			for range iters {
				off := base + r.Int64N(8*4096/512)*512
				n := 512 * (1 + r.Int64N(16))
				var err error
				switch r.IntN(4) {
				case 0:
					err = v.Trim(off, n)
				case 1:
					err = v.WriteZeroes(off, n, true)
				default:
					_, err = v.WriteAt(randBytes(r, int(n)), off)
				}
				if err != nil {
					fail(err)
					return
				}
			}
		})
	}
	for w := range 4 {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 78))
			p := make([]byte, 12*4096)
			for range iters {
				off := base - 4096 + r.Int64N(4096)
				n := 1 + r.IntN(len(p))
				if _, err := v.ReadAt(p[:n], off); err != nil {
					fail(err)
					return
				}
				if w == 0 {
					if _, err := v.Scrub(base, 8*4096); err != nil {
						fail(err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	if d := v.Damaged(); len(d) != 0 {
		t.Fatalf("Damaged = %v", d)
	}
	model := mustRead(t, v, 0, size)
	checkSumsFile(t, dir, "v", model)
}

// copyTree copies the regular files under src to dst, keeping holes only
// as zeros (content is what matters).
func copyTree(t testing.TB, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		target := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(target, 0o700)
		}
		if d.Name() == lockFileName {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(target, b, 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// tear returns a crash image of a file: each 4 KiB page is taken from old
// (the durable version) or cur (the page cache) at random, as a crash may
// have written back any subset of the dirty pages.
func tear(r *rand.Rand, old, cur []byte) []byte {
	out := bytes.Clone(cur)
	for off := 0; off < len(out); off += 4096 {
		if r.IntN(2) == 0 {
			end := min(off+4096, len(out))
			clear(out[off:end])
			if off < len(old) {
				copy(out[off:end], old[off:min(end, len(old))])
			}
		}
	}
	return out
}

// op is a volume mutation, as the FSM replays them.
type op struct {
	kind   int // 0 write, 1 trim, 2 zero
	off, n int64
	data   []byte
}

func (o op) apply(t testing.TB, v *Volume) {
	t.Helper()
	var err error
	switch o.kind {
	case 0:
		_, err = v.WriteAt(o.data, o.off)
	case 1:
		err = v.Trim(o.off, o.n)
	case 2:
		err = v.WriteZeroes(o.off, o.n, true)
	}
	if err != nil {
		t.Fatal(err)
	}
}

// TestCrashConsistency writes, Syncs (a checkpoint), writes more without
// Sync, then "crashes": the store is reopened from copies of its files
// without Close, where each page of the data and sums files written after
// the Sync holds its old or new content independently (or, in the "clean"
// variant, the files as they are), and the unsynced ops are applied again
// as the FSM's replay would. With ops that cover whole 4 KiB blocks (the
// FSM's common case) nothing may be damaged and the sums must be exact.
// With sub-4 KiB ops the replay's first partial write to a block can find
// new data under an old sum, which it cannot tell from damage: such blocks
// (and only those) may be reported damaged (DESIGN.md, "Crash consistency").
func TestCrashConsistency(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		align   int64
		torn    bool
		mayHurt bool
	}{
		{"clean/unaligned", 512, false, false},
		{"torn/aligned", 4096, true, false},
		{"torn/unaligned", 512, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			for seed := range uint64(4) {
				crashOnce(t, tc.align, tc.torn, tc.mayHurt, seed)
			}
		})
	}
}

func crashOnce(t *testing.T, align int64, torn, mayHurt bool, seed uint64) {
	const size = 2 * MiB
	r := rand.New(rand.NewPCG(seed, 99))
	dir := t.TempDir()
	s, err := Open(dir, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	v, err := s.Create(Meta{Name: "v", Size: size, BlockSize: int(align), Created: testCreated})
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, size)
	randOp := func() op {
		off := r.Int64N(size/align) * align
		n := align * (1 + r.Int64N(min(size-off, 64*KiB)/align))
		o := op{kind: r.IntN(3), off: off, n: n}
		if o.kind == 0 || r.IntN(2) == 0 {
			o.kind, o.data = 0, randBytes(r, int(n))
		}
		return o
	}
	do := func(o op) {
		o.apply(t, v)
		if o.kind == 0 {
			copy(model[o.off:], o.data)
		} else {
			clear(model[o.off : o.off+o.n])
		}
	}
	for range 50 {
		do(randOp())
	}
	if err := v.Sync(); err != nil { // the checkpoint
		t.Fatal(err)
	}
	durable := snapshotFiles(t, dir)
	var replay []op
	for range 40 {
		o := randOp()
		do(o)
		replay = append(replay, o)
	}
	// Blocks whose first op after the checkpoint covered them in part.
	partialFirst := map[int64]bool{}
	seen := map[int64]bool{}
	for _, o := range replay {
		for b := o.off / 4096; b <= (o.off+o.n-1)/4096; b++ {
			if !seen[b] {
				seen[b] = true
				partialFirst[b] = o.off > b*4096 || o.off+o.n < (b+1)*4096
			}
		}
	}

	crash := t.TempDir()
	copyTree(t, dir, crash)
	if torn {
		for _, name := range []string{dataFileName, sumsFileName} {
			path := filepath.Join(dir, volumesDirName, "v", name)
			cur, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			img := tear(r, durable[path], cur)
			if err := os.WriteFile(filepath.Join(crash, volumesDirName, "v", name), img, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	s2 := openStore(t, crash)
	v2, err := s2.Get("v")
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range replay {
		o.apply(t, v2)
	}
	p := make([]byte, size)
	bad, err := v2.ReadHealthy(p, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, rg := range bad {
		for b := rg.Off / 4096; b < rg.End()/4096; b++ {
			if !mayHurt || !partialFirst[b] {
				t.Fatalf("seed %d: block %d damaged after replay (partial first op: %v); all: %v", seed, b, partialFirst[b], bad)
			}
		}
	}
	if !bytes.Equal(p, model) && len(bad) == 0 {
		t.Fatalf("seed %d: data differs after replay", seed)
	}
	if len(bad) == 0 {
		checkSumsFile(t, crash, "v", model)
	} else {
		t.Logf("seed %d: %d ranges falsely damaged (partial first writes after the crash): %v", seed, len(bad), bad)
	}
	if _, err := v2.Scrub(0, size); err != nil {
		t.Fatal(err)
	}
	if d := v2.Damaged(); !slices.Equal(d, bad) {
		t.Fatalf("seed %d: Scrub found %v beyond the read's %v", seed, d, bad)
	}
}

// TestSumsBuiltAtOpen removes the sums file (a volume of an older build):
// Open builds it from the data, skipping holes, and logs it at info level.
func TestSumsBuiltAtOpen(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := openStore(t, dir)
	v, err := s.Create(Meta{Name: "v", Size: 3*MiB + 512, BlockSize: 512, Created: testCreated})
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(8, 8))
	model := make([]byte, v.Size())
	for _, off := range []int64{100, MiB + 4096, 3 * MiB} { // a hole between
		d := randBytes(r, 70*KiB)
		d = d[:min(int64(len(d)), v.Size()-off)]
		mustWrite(t, v, d, off)
		copy(model[off:], d)
	}
	s.Close()
	if err := os.Remove(sumsPath(dir, "v")); err != nil {
		t.Fatal(err)
	}
	rec := &logRecorder{}
	s, err = Open(dir, slog.New(rec))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !rec.has("INFO built block checksums") {
		t.Fatalf("no info log of the build: %q", rec.msgs)
	}
	v, err = s.Get("v")
	if err != nil {
		t.Fatal(err)
	}
	checkSumsFile(t, dir, "v", model)
	wantNoDamage(t, v, model)
	if _, err := os.Stat(filepath.Join(dir, volumesDirName, "v", sumsTmpName)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("temporary sums file left: %v", err)
	}
}

// TestCorruptSumsRebuilt damages the sums file in each way it can be: Open
// rebuilds it (with a warning) from the data, with the right sums. A sums
// file that is too long (a crash inside Resize) is truncated instead.
func TestCorruptSumsRebuilt(t *testing.T) {
	t.Parallel()
	damage := map[string]func(t *testing.T, path string){
		"header byte": func(t *testing.T, path string) { corruptFile(t, path, 3, []byte{'x'}) },
		"header crc":  func(t *testing.T, path string) { corruptFile(t, path, 24, []byte{0, 0, 0, 0}) },
		"padding":     func(t *testing.T, path string) { corruptFile(t, path, 4000, []byte{1}) },
		"newer version": func(t *testing.T, path string) {
			h := encodeSumsHeader()
			binary.LittleEndian.PutUint32(h[8:], sumsFormat+1)
			binary.LittleEndian.PutUint32(h[24:], crc32.Checksum(h[:24], castagnoli))
			corruptFile(t, path, 0, h)
		},
		"too short":  func(t *testing.T, path string) { os.Truncate(path, sumsHeaderSize+100) },
		"no header":  func(t *testing.T, path string) { os.Truncate(path, 100) },
		"empty":      func(t *testing.T, path string) { os.Truncate(path, 0) },
		"wrong sums": nil, // not corrupt as a file: reads find the damage
		"too long": func(t *testing.T, path string) {
			corruptFile(t, path, sumsFileLen(MiB)+40, []byte{9, 9, 9, 9})
		},
	}
	for what, f := range damage {
		t.Run(what, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			s := openStore(t, dir)
			v := mustCreate(t, s, "v", MiB)
			model := make([]byte, MiB)
			copy(model[8192:], randBytes(rand.New(rand.NewPCG(1, 1)), 100*KiB))
			mustWrite(t, v, model, 0)
			s.Close()
			if f == nil {
				corruptFile(t, sumsPath(dir, "v"), sumOff(3), []byte{1, 2, 3, 4})
			} else {
				f(t, sumsPath(dir, "v"))
			}
			rec := &logRecorder{}
			s, err := Open(dir, slog.New(rec))
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			v, err = s.Get("v")
			if err != nil {
				t.Fatal(err)
			}
			rebuilt := rec.has("WARN built block checksums")
			switch what {
			case "wrong sums":
				if rebuilt {
					t.Fatal("a sums file with a good header was rebuilt")
				}
				wantDamage(t, v, 0, MiB, []Range{{3 * 4096, 4096}})
				return
			case "too long":
				if rebuilt {
					t.Fatal("a long sums file was rebuilt, not truncated")
				}
			default:
				if !rebuilt {
					t.Fatalf("no warning of a rebuild: %q", rec.msgs)
				}
			}
			checkSumsFile(t, dir, "v", model)
			wantNoDamage(t, v, model)
		})
	}
}

// TestResizeCrashes simulates crashes inside Resize of a volume whose size
// is not 4 KiB aligned: Open reconciles data and sums without damage.
func TestResizeCrashes(t *testing.T) {
	t.Parallel()
	const big, small = 3*4096 + 3072, 2*4096 + 1024
	setup := func(t *testing.T) (string, []byte) {
		dir := t.TempDir()
		s := openStore(t, dir)
		v, err := s.Create(Meta{Name: "v", Size: big, BlockSize: 512, Created: testCreated})
		if err != nil {
			t.Fatal(err)
		}
		model := randBytes(rand.New(rand.NewPCG(2, 3)), big)
		mustWrite(t, v, model, 0)
		s.Close()
		return dir, model
	}
	meta := func(t *testing.T, dir string, size int64) {
		if err := writeMetaFile(filepath.Join(dir, volumesDirName, "v"), Meta{Name: "v", Size: size, BlockSize: 512, Created: testCreated}); err != nil {
			t.Fatal(err)
		}
	}
	t.Run("shrink committed, nothing else", func(t *testing.T) {
		t.Parallel()
		dir, model := setup(t)
		meta(t, dir, small)
		s := openStore(t, dir)
		v, err := s.Get("v")
		if err != nil {
			t.Fatal(err)
		}
		checkSumsFile(t, dir, "v", model[:small])
		wantNoDamage(t, v, model[:small])
	})
	t.Run("shrink committed, data truncated", func(t *testing.T) {
		t.Parallel()
		dir, _ := setup(t)
		meta(t, dir, small)
		if err := os.Truncate(dataPath(dir, "v"), small); err != nil {
			t.Fatal(err)
		}
		s := openStore(t, dir)
		v, err := s.Get("v")
		if err != nil {
			t.Fatal(err)
		}
		// The last block's sum is still that of the long block; the
		// data that would prove it is gone, so it is damage (repair
		// from another site fixes it).
		wantDamage(t, v, 0, small, []Range{{2 * 4096, 1024}})
	})
	t.Run("grow not committed", func(t *testing.T) {
		t.Parallel()
		dir, model := setup(t)
		// The grow extended both files, then the crash.
		if err := os.Truncate(dataPath(dir, "v"), 4*big); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(sumsPath(dir, "v"), sumsFileLen(4*big)); err != nil {
			t.Fatal(err)
		}
		s := openStore(t, dir)
		v, err := s.Get("v")
		if err != nil {
			t.Fatal(err)
		}
		checkSumsFile(t, dir, "v", model)
		wantNoDamage(t, v, model)
		if err := s.Resize("v", 2*big); err != nil {
			t.Fatal(err)
		}
		wantNoDamage(t, v, append(bytes.Clone(model), make([]byte, big)...))
	})
}

// TestShrinkKeepsDamage: shrinking into a damaged block keeps it damaged
// (the shrink must not bless it with the cut block's sum).
func TestShrinkKeepsDamage(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := openStore(t, dir)
	v, err := s.Create(Meta{Name: "v", Size: 4 * 4096, BlockSize: 512, Created: testCreated})
	if err != nil {
		t.Fatal(err)
	}
	model := randBytes(rand.New(rand.NewPCG(5, 1)), 4*4096)
	mustWrite(t, v, model, 0)
	corruptFile(t, dataPath(dir, "v"), 2*4096+5, []byte{^model[2*4096+5]})
	corruptFile(t, dataPath(dir, "v"), 3*4096+5, []byte{^model[3*4096+5]})
	if err := s.Resize("v", 2*4096+512); err != nil {
		t.Fatal(err)
	}
	wantDamage(t, v, 0, 2*4096+512, []Range{{2 * 4096, 512}})
	// After a restart it is found again from the stored sum.
	s.Close()
	s = openStore(t, dir)
	if v, err = s.Get("v"); err != nil {
		t.Fatal(err)
	}
	wantDamage(t, v, 0, 2*4096+512, []Range{{2 * 4096, 512}})
}

// TestSumsDigest: equal sums give equal digests, and the digest is the
// stored sums in order.
func TestSumsDigest(t *testing.T) {
	t.Parallel()
	s := newStore(t)
	a := mustCreate(t, s, "a", MiB)
	b := mustCreate(t, s, "b", MiB)
	data := randBytes(rand.New(rand.NewPCG(9, 9)), 300*KiB)
	mustWrite(t, a, data, 4096)
	mustWrite(t, b, data, 4096)
	digest := func(v *Volume, off, n int64) []byte {
		h := crc32.New(castagnoli)
		if err := v.SumsDigest(off, n, h); err != nil {
			t.Fatal(err)
		}
		return h.Sum(nil)
	}
	if !bytes.Equal(digest(a, 0, MiB), digest(b, 0, MiB)) {
		t.Fatal("equal volumes digest differently")
	}
	mustWrite(t, b, []byte{1}, 200*KiB)
	if bytes.Equal(digest(a, 0, MiB), digest(b, 0, MiB)) {
		t.Fatal("different volumes digest equally")
	}
	if !bytes.Equal(digest(a, 0, 200*KiB), digest(b, 0, 200*KiB)) {
		t.Fatal("equal prefixes digest differently")
	}
	// The digest input is the stored sums.
	var buf bytes.Buffer
	if err := a.SumsDigest(4096, 8192, writerHash{&buf}); err != nil {
		t.Fatal(err)
	}
	want := binary.LittleEndian.AppendUint32(nil, blockSum(data[:4096]))
	want = binary.LittleEndian.AppendUint32(want, blockSum(data[4096:8192]))
	if !bytes.Equal(buf.Bytes(), want) {
		t.Fatalf("digest input %x, want %x", buf.Bytes(), want)
	}
	for _, bad := range [][2]int64{{1, 4096}, {0, 100}, {0, MiB + 4096}, {-4096, 4096}} {
		wantErr(t, fmt.Sprint("SumsDigest", bad), a.SumsDigest(bad[0], bad[1], nopHash{}), ErrOutOfRange)
	}
}

// writerHash is a hash.Hash that records its input.
type writerHash struct{ w io.Writer }

func (h writerHash) Write(p []byte) (int, error) { return h.w.Write(p) }
func (writerHash) Sum(b []byte) []byte           { return b }
func (writerHash) Reset()                        {}
func (writerHash) Size() int                     { return 0 }
func (writerHash) BlockSize() int                { return 1 }

// TestDamageRanges checks the merging and clipping of block lists.
func TestDamageRanges(t *testing.T) {
	got := blocksToRanges([]int64{0, 1, 3, 5, 6, 7}, 7*4096+512, 0, 1<<40)
	want := []Range{{0, 8192}, {3 * 4096, 4096}, {5 * 4096, 2*4096 + 512}}
	if !slices.Equal(got, want) {
		t.Fatalf("blocksToRanges = %v, want %v", got, want)
	}
	if got := blocksToRanges([]int64{1, 2}, 1<<20, 4096+10, 2*4096+20); !slices.Equal(got, []Range{{4096 + 10, 4096 + 10}}) {
		t.Fatalf("clipped = %v", got)
	}
	// Stripes: ascending, deduplicated, all of them for huge ranges.
	ss := stripesFor(255<<20, 258<<20)
	if ss[0] != 0b11 || ss[3] != 1<<63 {
		t.Fatalf("stripes = %x", ss)
	}
	ss = stripesFor(0, 1<<40)
	for _, w := range ss {
		if w != ^uint64(0) {
			t.Fatalf("stripes for a huge range = %x", ss)
		}
	}
}
