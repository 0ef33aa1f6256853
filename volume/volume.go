// Package volume stores named block volumes as sparse files with crash-safe
// metadata and per-block checksums. It is the bottom layer of robib and
// imports nothing else from the project.
//
// A Store owns a directory:
//
//	<dir>/LOCK                      flock(2) held while a Store has it open
//	<dir>/volumes/<name>/data       sparse data file, length == Meta.Size
//	<dir>/volumes/<name>/meta.json  versioned, checksummed metadata
//	<dir>/volumes/<name>/sums       versioned CRC-32C of every 4 KiB block
//
// Every mutation yields identical bytes on every site that applies the same
// sequence of operations: holes, trimmed and zeroed ranges read as zeros.
// Every write, trim, zeroing and resize also updates the checksums of the
// blocks it touches, and every read checks them: a block whose data does not
// match its checksum, or that the disk cannot read, is damaged, and reads of
// it fail with ErrDamaged (a *DamageError names the ranges) until a full
// overwrite or Repair heals it. Sync makes data and checksums durable
// together. Only the Linux filesystem interfaces are used (fallocate,
// SEEK_DATA and SEEK_HOLE, fdatasync, flock). See DESIGN.md for the
// crash-safety argument.
package volume

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// Errors returned by this package, always wrapped with context (volume name,
// offsets); test for them with errors.Is.
var (
	// ErrNotFound: no volume with that name exists.
	ErrNotFound = errors.New("volume not found")
	// ErrExists: Create was called for a name that is already in use,
	// including by a broken volume.
	ErrExists = errors.New("volume already exists")
	// ErrInvalidName: the name fails ValidateName.
	ErrInvalidName = errors.New("invalid volume name")
	// ErrInvalidSize: a size or block size fails ValidateMeta.
	ErrInvalidSize = errors.New("invalid volume size")
	// ErrOutOfRange: an offset/length pair is negative, overflows or does
	// not lie within the volume (or, for Repair and SumsDigest, is not
	// 4 KiB aligned).
	ErrOutOfRange = errors.New("offset or length out of range")
	// ErrCorrupt: a volume found on disk cannot be loaded (bad or missing
	// metadata, missing data file). Errors reported by Store.Broken wrap it.
	// A corrupt sums file is not fatal: it is rebuilt at Open.
	ErrCorrupt = errors.New("corrupt volume metadata")
	// ErrClosed: the volume was deleted, or the store was closed.
	ErrClosed = errors.New("volume closed")
	// ErrDamaged: blocks whose data does not match its checksum, or that
	// the disk could not read. Reads return it wrapped in a *DamageError
	// that names the damaged ranges.
	ErrDamaged = errors.New("volume data damaged")
)

const (
	// DefaultBlockSize is the block size Store.Create uses when
	// Meta.BlockSize is zero.
	DefaultBlockSize = 4096
	// MaxSize caps Meta.Size at 1 PiB. It is a sanity bound: the
	// filesystem may impose a lower one (ext4 with 4 KiB blocks: 16 TiB),
	// in which case Create or Resize fails with the filesystem's error.
	MaxSize int64 = 1 << 50
)

// hashChunkSize is the read size used by Volume.Hash.
const hashChunkSize = 1 << 20

// zeroChunk is a shared, never-written buffer of zeros used to write zeros
// when fallocate cannot.
var zeroChunk = make([]byte, 1<<20)

// Extent is a run of the volume reported by Volume.BlockStatus.
type Extent struct {
	Offset int64 // first byte of the run
	Length int64 // length in bytes, > 0
	Hole   bool  // true: unallocated, reads as zeros; false: allocated data
}

// Volume is an open volume. All methods are safe for concurrent use by many
// goroutines. I/O methods run concurrently with each other (they hold the
// volume's read lock); Store.Resize and Store.Delete take the write lock, so
// they wait for in-flight I/O and I/O started after them sees their result.
// Once the volume is deleted or its Store closed every I/O method returns an
// error wrapping ErrClosed; Meta, Name and Size keep returning the last
// known values.
//
// Within that, the 1 MiB regions a request covers are locked: writes, trims
// and zeroings exclusively, reads shared, so a read never sees a block's
// data and checksum out of step. Concurrent writes to overlapping ranges
// therefore do not interleave, but they have no ordering guarantee between
// them; callers that need one (the replicated state machine) must serialize.
type Volume struct {
	name      string        // immutable
	path      string        // immutable: <store>/volumes/<name>
	log       *slog.Logger  // immutable
	fallocate fallocateFunc // immutable after open; replaced only by tests
	readAt    readFunc      // reads the data file; replaced only by tests

	// mu: read lock for I/O, write lock for Resize, Delete and Close.
	mu     sync.RWMutex
	meta   Meta            // guarded by mu
	f      *os.File        // guarded by mu; nil once closed
	rc     syscall.RawConn // guarded by mu; raw access to f's descriptor
	sums   *os.File        // guarded by mu; the sums file, nil once closed
	sumsRC syscall.RawConn // guarded by mu

	// stripes are the region locks, taken after mu (see sums.go).
	stripes [numStripes]sync.RWMutex
	// gen is the write generation: every mutation increments it while
	// holding the region locks of its range (Resize: while holding mu).
	gen atomic.Uint64
	// dmg is the set of damaged blocks; its mutex is taken last.
	dmg damageMap
}

// openVolume opens the data file of the volume at path described by m and
// returns the Volume, without its sums file (see loadSums and openSums). It
// does not check that the file length equals m.Size.
func openVolume(path string, m Meta, log *slog.Logger) (*Volume, error) {
	f, err := os.OpenFile(filepath.Join(path, dataFileName), os.O_RDWR|openFlags, 0)
	if err != nil {
		return nil, err
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &Volume{
		name:      m.Name,
		path:      path,
		log:       log.With("volume", m.Name),
		fallocate: unix.Fallocate,
		readAt:    (*os.File).ReadAt,
		meta:      m,
		f:         f,
		rc:        rc,
	}, nil
}

// openSums opens the sums file of a volume Create just made; it must have
// the right header and length. v is not shared yet.
func (v *Volume) openSums() error {
	sf, err := openSumsFile(filepath.Join(v.path, sumsFileName))
	if err != nil {
		return err
	}
	v.setSums(sf)
	st, err := sf.Stat()
	if err == nil && st.Size() != sumsFileLen(v.meta.Size) {
		err = fmt.Errorf("sums file is %d bytes, want %d", st.Size(), sumsFileLen(v.meta.Size))
	}
	return err
}

// Meta returns a copy of the volume's current metadata.
func (v *Volume) Meta() Meta {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.meta
}

// Name returns the volume name. It never changes.
func (v *Volume) Name() string { return v.name }

// Size returns the current size in bytes. It changes only through
// Store.Resize.
func (v *Volume) Size() int64 {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.meta.Size
}

// ReadAt reads len(p) bytes at off. The range [off, off+len(p)) must lie
// within [0, Size) (a zero-length read at off == Size is allowed), else the
// error wraps ErrOutOfRange. Holes read as zeros. ReadAt either fills p and
// returns len(p), nil, or returns 0 and an error; it never returns io.EOF.
// Every 4 KiB block the range touches is checked against its checksum: if
// any is damaged (mismatch, unreadable, or already known damaged) the error
// wraps a *DamageError listing the damaged blocks of the range (errors.Is
// ErrDamaged; errors.As gives the ranges), and the blocks found are added to
// Damaged. ReadHealthy reads around damage.
func (v *Volume) ReadAt(p []byte, off int64) (int, error) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.checkLocked("read", off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	damaged, err := v.readCheckedLocked(p, off)
	if err != nil {
		return 0, err
	}
	if damaged != nil {
		size := v.meta.Size
		return 0, fmt.Errorf("read [%d, +%d): %w", off, len(p),
			&DamageError{Volume: v.name, Ranges: blocksToRanges(damaged, size, 0, size)})
	}
	return len(p), nil
}

// ReadHealthy reads like ReadAt but fills every healthy block of p and
// returns the damaged ranges intersected with [off, off+len(p)) (sorted,
// merged; the bytes of p there are unspecified). err is only for other
// failures (closed, out of range, the sums file unreadable).
func (v *Volume) ReadHealthy(p []byte, off int64) (damaged []Range, err error) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.checkLocked("read", off, int64(len(p))); err != nil {
		return nil, err
	}
	if len(p) == 0 {
		return nil, nil
	}
	blocks, err := v.readCheckedLocked(p, off)
	if err != nil || blocks == nil {
		return nil, err
	}
	return blocksToRanges(blocks, v.meta.Size, off, off+int64(len(p))), nil
}

// readCheckedLocked reads p at off (a non-empty, checked range) under the
// shared region locks, checks every block it touches and returns the
// damaged ones (nil if none), recording new ones in the damage map. The
// caller holds v.mu.
func (v *Volume) readCheckedLocked(p []byte, off int64) ([]int64, error) {
	end := off + int64(len(p))
	ss := stripesFor(off, end)
	v.lockStripes(&ss, false)
	defer v.unlockStripes(&ss, false)
	sc := getScratch()
	defer putScratch(sc)
	for pos := off; pos < end; {
		cend := min(end, (pos/SumBlockSize+sumsChunk)*SumBlockSize)
		if err := v.readChunk(p[pos-off:cend-off], pos, sc); err != nil {
			return nil, fmt.Errorf("volume %q: read at %d: %w", v.name, off, err)
		}
		pos = cend
	}
	return v.dmg.noteRead(off/SumBlockSize, (end-1)/SumBlockSize, sc.bad, v.gen.Load()), nil
}

// readChunk reads p at off, at most sumsChunk blocks, and appends the
// blocks whose data is unreadable or does not match the stored sum to
// sc.bad. Blocks the range covers only in part are read whole into scratch
// buffers to be checked. The caller holds v.mu and the region locks.
func (v *Volume) readChunk(p []byte, off int64, sc *scratch) error {
	end := off + int64(len(p))
	b0, b1 := off/SumBlockSize, (end-1)/SumBlockSize
	stored := sc.sums[:4*(b1-b0+1)]
	if err := v.readSums(b0, stored); err != nil {
		return fmt.Errorf("read block checksums: %w", err)
	}
	mid0, mid1 := b0, b1
	headPartial := v.partial(b0, off, end)
	tailPartial := b1 > b0 && v.partial(b1, off, end)
	if headPartial {
		sc.bad = v.readEdge(p, off, b0, sc.head[:], stored[:4], sc.bad)
		mid0++
	}
	if tailPartial {
		mid1--
	}
	if mid0 <= mid1 {
		ms, me := mid0*SumBlockSize, v.blockEnd(mid1)
		sc.bad = v.readRun(p[ms-off:me-off], ms, stored[4*(mid0-b0):4*(mid1-b0+1)], nil, sc.bad)
	}
	if tailPartial {
		sc.bad = v.readEdge(p, off, b1, sc.tail[:], stored[4*(b1-b0):], sc.bad)
	}
	return nil
}

// readEdge reads block b, which the read of p at off covers in part, whole
// into buf, checks it against want and copies the part p covers.
func (v *Volume) readEdge(p []byte, off, b int64, buf, want []byte, bad []int64) []int64 {
	bs, be := b*SumBlockSize, v.blockEnd(b)
	blk := buf[:be-bs]
	bad = v.readRun(blk, bs, want[:4], nil, bad)
	lo, hi := max(bs, off), min(be, off+int64(len(p)))
	copy(p[lo-off:hi-off], blk[lo-bs:hi-bs])
	return bad
}

// readRun reads the whole blocks [pos, pos+len(p)) (pos block aligned; the
// run may end with the volume's short last block) into p and computes each
// block's sum: with want (4 bytes per block) it appends the blocks whose sum
// differs to bad; with got it stores the sums there. A failed read is
// retried block by block; the blocks the disk cannot read are appended to
// bad (their got sum is 0).
func (v *Volume) readRun(p []byte, pos int64, want, got []byte, bad []int64) []int64 {
	b0 := pos / SumBlockSize
	err := v.readData(p, pos)
	if err != nil {
		v.log.Warn("data read failed; retrying block by block", "off", pos, "len", len(p), "err", err)
	}
	for i := 0; i < len(p); i += SumBlockSize {
		blk := p[i:min(i+SumBlockSize, len(p))]
		b, k := b0+int64(i/SumBlockSize), i/SumBlockSize*4
		if err != nil {
			if berr := v.readData(blk, pos+int64(i)); berr != nil {
				v.log.Warn("block unreadable; marking it damaged", "block", b, "off", pos+int64(i), "err", berr)
				bad = append(bad, b)
				if got != nil {
					binary.LittleEndian.PutUint32(got[k:], 0)
				}
				continue
			}
		}
		s := blockSum(blk)
		if got != nil {
			binary.LittleEndian.PutUint32(got[k:], s)
		}
		if want != nil && binary.LittleEndian.Uint32(want[k:]) != s {
			bad = append(bad, b)
		}
	}
	return bad
}

// readData reads p at off from the data file, treating bytes past its end
// (possible only after a failed truncate or outside damage) as zeros.
func (v *Volume) readData(p []byte, off int64) error {
	n, err := v.readAt(v.f, p, off)
	if err == io.EOF {
		clear(p[n:])
		return nil
	}
	return err
}

// readLocked reads p at off without checking sums (Hash). The caller holds
// v.mu and has checked the range.
func (v *Volume) readLocked(p []byte, off int64) (int, error) {
	if err := v.readData(p, off); err != nil {
		return 0, fmt.Errorf("volume %q: read at %d: %w", v.name, off, err)
	}
	return len(p), nil
}

// blockEnd returns the end of checksum block b: the next 4 KiB boundary, or
// the size for the last block. The caller holds v.mu.
func (v *Volume) blockEnd(b int64) int64 { return min((b+1)*SumBlockSize, v.meta.Size) }

// partial reports whether [off, end) covers block b only in part.
func (v *Volume) partial(b, off, end int64) bool {
	return off > b*SumBlockSize || end < v.blockEnd(b)
}

// edge is a block that a mutation covers only in part: its new sum depends
// on the bytes it keeps, which are read and checked first.
type edge struct {
	b      int64
	blk    []byte // the whole block as read before the mutation
	stored uint32 // its stored sum before the mutation
	ok     bool   // blk was read and matches stored
}

// loadEdge reads block b whole into buf and checks it. Only a failure to
// read the sums file is an error; unreadable data leaves e.ok false.
func (v *Volume) loadEdge(e *edge, b int64, buf []byte) error {
	bs, be := b*SumBlockSize, v.blockEnd(b)
	e.b, e.blk = b, buf[:be-bs]
	var sb [4]byte
	if err := v.readSums(b, sb[:]); err != nil {
		return fmt.Errorf("read block checksums: %w", err)
	}
	e.stored = binary.LittleEndian.Uint32(sb[:])
	err := v.readData(e.blk, bs)
	if err != nil {
		v.log.Warn("block unreadable; marking it damaged", "block", b, "off", bs, "err", err)
	}
	e.ok = err == nil && blockSum(e.blk) == e.stored
	return nil
}

// apply puts the bytes of src (which holds [off, end); nil means zeros)
// into the edge's block and returns the sum to store: the new block's, or,
// if the block did not match its sum before, the old stored sum, so that a
// damaged block is never blessed with a fresh sum.
func (e *edge) apply(src []byte, off, end int64) uint32 {
	if !e.ok {
		return e.stored
	}
	bs := e.b * SumBlockSize
	lo, hi := max(bs, off), min(bs+int64(len(e.blk)), end)
	if src == nil {
		clear(e.blk[lo-bs : hi-bs])
	} else {
		copy(e.blk[lo-bs:hi-bs], src[lo-off:hi-off])
	}
	return blockSum(e.blk)
}

// noteMutation updates the damage map after a mutation at generation gen
// that covered the blocks [f0, f1] whole (they are healthy now) and the
// edges (nil: none) in part: an edge that was damaged, or did not match its
// sum, is damaged at gen.
func (d *damageMap) noteMutation(f0, f1 int64, head, tail *edge, gen uint64) {
	clean := (head == nil || head.ok) && (tail == nil || tail.ok)
	if clean && d.n.Load() == 0 {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if f0 <= f1 {
		d.removeRangeLocked(f0, f1)
	}
	for _, e := range [2]*edge{head, tail} {
		if e == nil {
			continue
		}
		if _, damaged := d.blocks[e.b]; damaged || !e.ok {
			d.setLocked(e.b, gen)
		}
	}
}

// markBlocks marks [b0, b1] damaged at gen, replacing generations: used
// when a mutation failed half way and the blocks' contents are unknown.
func (d *damageMap) markBlocks(b0, b1 int64, gen uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for b := b0; b <= b1; b++ {
		d.setLocked(b, gen)
	}
}

// WriteAt writes p at off. The range rule is that of ReadAt. It returns
// len(p), nil or an error; the data is durable only after Sync. The sums of
// the blocks written are updated under the same region locks. A block the
// write covers in part is read and checked first; if it is damaged the bytes
// are written but the block stays damaged (its old sum is kept).
func (v *Volume) WriteAt(p []byte, off int64) (int, error) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.checkLocked("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	end := off + int64(len(p))
	ss := stripesFor(off, end)
	v.lockStripes(&ss, true)
	defer v.unlockStripes(&ss, true)
	gen := v.gen.Add(1)
	sc := getScratch()
	defer putScratch(sc)
	for pos := off; pos < end; {
		cend := min(end, (pos/SumBlockSize+sumsChunk)*SumBlockSize)
		if err := v.writeChunk(p[pos-off:cend-off], pos, gen, sc); err != nil {
			return 0, fmt.Errorf("volume %q: write at %d: %w", v.name, pos, err)
		}
		pos = cend
	}
	return len(p), nil
}

// edges are the blocks at the two ends of a mutation of [off, end) that
// it covers only in part (nil when it covers them whole).
type edges struct {
	he, te     edge
	head, tail *edge
}

// loadEdges loads the partial end blocks of a mutation of [off, end),
// whose first and last blocks are b0 and b1, into es.
func (v *Volume) loadEdges(es *edges, b0, b1, off, end int64, sc *scratch) error {
	if v.partial(b0, off, end) {
		if err := v.loadEdge(&es.he, b0, sc.head[:]); err != nil {
			return err
		}
		es.head = &es.he
	}
	if b1 > b0 && v.partial(b1, off, end) {
		if err := v.loadEdge(&es.te, b1, sc.tail[:]); err != nil {
			return err
		}
		es.tail = &es.te
	}
	return nil
}

// writeChunk writes p (at most sumsChunk blocks) at off and stores the sums
// of its blocks with one pwrite. The caller holds v.mu and the region locks
// exclusively.
func (v *Volume) writeChunk(p []byte, off int64, gen uint64, sc *scratch) error {
	end := off + int64(len(p))
	b0, b1 := off/SumBlockSize, (end-1)/SumBlockSize
	var es edges
	if err := v.loadEdges(&es, b0, b1, off, end, sc); err != nil {
		return err
	}
	head, tail := es.head, es.tail
	if _, err := v.f.WriteAt(p, off); err != nil {
		v.dmg.markBlocks(b0, b1, gen) // contents unknown now
		return err
	}
	sums := sc.sums[:4*(b1-b0+1)]
	for b := b0; b <= b1; b++ {
		var s uint32
		switch {
		case head != nil && b == b0:
			s = head.apply(p, off, end)
		case tail != nil && b == b1:
			s = tail.apply(p, off, end)
		default:
			s = blockSum(p[b*SumBlockSize-off : v.blockEnd(b)-off])
		}
		binary.LittleEndian.PutUint32(sums[4*(b-b0):], s)
	}
	if err := v.writeSums(b0, sums); err != nil {
		v.dmg.markBlocks(b0, b1, gen)
		return fmt.Errorf("write block checksums: %w", err)
	}
	f0, f1 := b0, b1
	if head != nil {
		f0++
	}
	if tail != nil {
		f1--
	}
	v.dmg.noteMutation(f0, f1, head, tail, gen)
	return nil
}

// Trim deallocates [off, off+length) by punching a hole; afterwards the
// range reads as zeros on every filesystem (partial filesystem blocks at the
// edges are zeroed in place). Range rule as for ReadAt. If the filesystem
// cannot punch holes, zeros are written instead. Durable after Sync.
func (v *Volume) Trim(off, length int64) error {
	return v.WriteZeroes(off, length, false)
}

// WriteZeroes makes [off, off+length) read as zeros. With noHole the range
// stays allocated: zeros are written in 1 MiB chunks, so later writes there
// cannot fail for lack of space and block status reports data (fallocate's
// FALLOC_FL_ZERO_RANGE would leave unwritten extents, reported as holes);
// otherwise a hole is punched as in Trim, or, if fallocate cannot punch
// holes, zeros are written.
// Range rule as for ReadAt. The volume's read lock and the region locks of
// the range are held for the whole call. Blocks covered whole get the sum
// of zeros (0) and are healthy afterwards; blocks covered in part are
// handled as by WriteAt. Durable after Sync.
func (v *Volume) WriteZeroes(off, length int64, noHole bool) error {
	v.mu.RLock()
	defer v.mu.RUnlock()
	op := "punch hole"
	if noHole {
		op = "write zeroes"
	}
	if err := v.checkLocked(op, off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	end := off + length
	ss := stripesFor(off, end)
	v.lockStripes(&ss, true)
	defer v.unlockStripes(&ss, true)
	gen := v.gen.Add(1)
	sc := getScratch()
	defer putScratch(sc)
	if err := v.zeroLocked(off, length, noHole, gen, sc); err != nil {
		return fmt.Errorf("volume %q: %s [%d, +%d): %w", v.name, op, off, length, err)
	}
	return nil
}

// zeroLocked zeroes [off, off+length) and its sums. The caller holds v.mu
// and the region locks exclusively and has checked the range.
func (v *Volume) zeroLocked(off, length int64, noHole bool, gen uint64, sc *scratch) error {
	end := off + length
	b0, b1 := off/SumBlockSize, (end-1)/SumBlockSize
	var es edges
	if err := v.loadEdges(&es, b0, b1, off, end, sc); err != nil {
		return err
	}
	head, tail := es.head, es.tail
	if err := v.zeroDataLocked(off, length, noHole); err != nil {
		v.dmg.markBlocks(b0, b1, gen) // contents unknown now
		return err
	}
	f0, f1 := b0, b1
	if head != nil {
		f0++
	}
	if tail != nil {
		f1--
	}
	var err error
	if n := b1 - b0 + 1; n <= sumsChunk {
		// Small: one pwrite of the whole run.
		sums := sc.sums[:4*n]
		clear(sums)
		if head != nil {
			binary.LittleEndian.PutUint32(sums, head.apply(nil, off, end))
		}
		if tail != nil {
			binary.LittleEndian.PutUint32(sums[4*(n-1):], tail.apply(nil, off, end))
		}
		err = v.writeSums(b0, sums)
	} else {
		if f0 <= f1 {
			err = v.zeroSums(f0, f1)
		}
		for _, e := range [2]*edge{head, tail} {
			if e != nil && err == nil {
				err = v.writeSums(e.b, binary.LittleEndian.AppendUint32(sc.sums[:0], e.apply(nil, off, end)))
			}
		}
	}
	if err != nil {
		v.dmg.markBlocks(b0, b1, gen)
		return fmt.Errorf("write block checksums: %w", err)
	}
	v.dmg.noteMutation(f0, f1, head, tail, gen)
	return nil
}

// zeroDataLocked makes the data of [off, off+length) zeros.
func (v *Volume) zeroDataLocked(off, length int64, noHole bool) error {
	if noHole {
		// Written zeros, not FALLOC_FL_ZERO_RANGE: that leaves unwritten
		// extents, which SEEK_DATA (and so BlockStatus) reports as holes,
		// while NO_HOLE promises the range stays allocated.
		return v.writeZeroBuffersLocked(off, length)
	}
	mode := uint32(unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE)
	err := v.control(func(fd int) error {
		return retryEINTR(func() error { return v.fallocate(fd, mode, off, length) })
	})
	if isNotSupported(err) {
		err = v.writeZeroBuffersLocked(off, length)
	}
	return err
}

// writeZeroBuffersLocked writes zeros over [off, off+length) in chunks of
// len(zeroChunk). The caller holds v.mu and has checked the range.
func (v *Volume) writeZeroBuffersLocked(off, length int64) error {
	for length > 0 {
		n := int64(len(zeroChunk))
		if n > length {
			n = length
		}
		if _, err := v.f.WriteAt(zeroChunk[:n], off); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

// Sync makes all completed writes, trims and zeroings durable: fdatasync(2)
// of the data file, then of the sums file. When it returns nil, the data
// and the sums of every block are durable and agree (DESIGN.md, "Crash
// consistency of the sums").
func (v *Volume) Sync() error {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if v.f == nil {
		return fmt.Errorf("volume %q: sync: %w", v.name, ErrClosed)
	}
	return v.syncLocked()
}

// syncLocked is Sync; the caller holds v.mu and v.f is open.
func (v *Volume) syncLocked() error {
	err := v.control(func(fd int) error {
		return retryEINTR(func() error { return unix.Fdatasync(fd) })
	})
	if err != nil {
		return fmt.Errorf("volume %q: fdatasync: %w", v.name, err)
	}
	err = v.sumsControl(func(fd int) error {
		return retryEINTR(func() error { return unix.Fdatasync(fd) })
	})
	if err != nil {
		return fmt.Errorf("volume %q: fdatasync block checksums: %w", v.name, err)
	}
	return nil
}

// Damaged returns every known damaged range of the volume (sorted, merged,
// 4 KiB aligned, clipped to the volume): blocks found damaged by reads,
// scrubs or partial writes, or marked by MarkDamaged, and not healed since.
// The set lives in memory only: after a restart a block whose sum
// mismatches is found again by the next read or Scrub.
func (v *Volume) Damaged() []Range {
	v.mu.RLock()
	size := v.meta.Size
	v.mu.RUnlock()
	v.dmg.mu.Lock()
	blocks := make([]int64, 0, len(v.dmg.blocks))
	for b := range v.dmg.blocks {
		blocks = append(blocks, b)
	}
	v.dmg.mu.Unlock()
	slices.Sort(blocks)
	return blocksToRanges(blocks, size, 0, size)
}

// MarkDamaged marks the blocks overlapping [off, off+length) damaged (used
// when a replicated verify shows this copy is in the minority). Range rule
// as for ReadAt. Memory: one map entry per 4 KiB block.
func (v *Volume) MarkDamaged(off, length int64) error {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.checkLocked("mark damaged", off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	end := off + length
	ss := stripesFor(off, end)
	v.lockStripes(&ss, false)
	defer v.unlockStripes(&ss, false)
	gen := v.gen.Load()
	v.dmg.mu.Lock()
	for b := off / SumBlockSize; b <= (end-1)/SumBlockSize; b++ {
		v.dmg.addLocked(b, gen)
	}
	v.dmg.mu.Unlock()
	v.log.Warn("blocks marked damaged", "off", off, "len", length)
	return nil
}

// RepairToken returns the volume's current write generation. Take it once
// the damage to repair is known (Damaged, Scrub, MarkDamaged, a failed
// read), before fetching the good data, and pass it to Repair.
func (v *Volume) RepairToken() uint64 { return v.gen.Load() }

// Repair writes the blocks of p (p holds [off, off+len(p)), 4 KiB-aligned
// except possibly the volume's last block) that are damaged AND were not
// touched by any mutation after token, stores their sums and clears their
// damage; other blocks are left alone. It returns the ranges it repaired and
// the ranges still damaged in [off, off+len(p)). A block found or marked
// damaged after token counts as touched then (its generation is the one at
// which it was found), so it is only repaired with a later token.
// Misaligned ranges fail with ErrOutOfRange.
func (v *Volume) Repair(p []byte, off int64, token uint64) (repaired, still []Range, err error) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	n := int64(len(p))
	if err := v.checkLocked("repair", off, n); err != nil {
		return nil, nil, err
	}
	size := v.meta.Size
	if off%SumBlockSize != 0 || (n%SumBlockSize != 0 && off+n != size) {
		return nil, nil, fmt.Errorf("volume %q: repair [%d, +%d) is not %d-byte aligned: %w",
			v.name, off, n, SumBlockSize, ErrOutOfRange)
	}
	if n == 0 || v.dmg.n.Load() == 0 {
		return nil, nil, nil
	}
	end := off + n
	ss := stripesFor(off, end)
	v.lockStripes(&ss, true)
	defer v.unlockStripes(&ss, true)
	b0, b1 := off/SumBlockSize, (end-1)/SumBlockSize

	// The region locks keep every mutation, read and MarkDamaged off
	// these blocks, so their damage entries stay as read here.
	var cands []int64
	v.dmg.mu.Lock()
	for _, b := range v.dmg.inRangeLocked(b0, b1) {
		if v.dmg.blocks[b] <= token {
			cands = append(cands, b)
		}
	}
	v.dmg.mu.Unlock()

	sc := getScratch()
	defer putScratch(sc)
	var fixed []int64
	for i := 0; i < len(cands) && err == nil; {
		j := i
		for j+1 < len(cands) && cands[j+1] == cands[j]+1 && j+1-i < sumsChunk {
			j++
		}
		rs, re := cands[i]*SumBlockSize, v.blockEnd(cands[j])
		data := p[rs-off : re-off]
		if _, werr := v.f.WriteAt(data, rs); werr != nil {
			err = fmt.Errorf("volume %q: repair write at %d: %w", v.name, rs, werr)
			break
		}
		sums := sc.sums[:4*(j-i+1)]
		for k := range j - i + 1 {
			bs := int64(k) * SumBlockSize
			binary.LittleEndian.PutUint32(sums[4*k:], blockSum(data[bs:min(bs+SumBlockSize, int64(len(data)))]))
		}
		if werr := v.writeSums(cands[i], sums); werr != nil {
			err = fmt.Errorf("volume %q: repair: write block checksums: %w", v.name, werr)
			break
		}
		fixed = append(fixed, cands[i:j+1]...)
		i = j + 1
	}

	v.dmg.mu.Lock()
	for _, b := range fixed {
		delete(v.dmg.blocks, b)
	}
	v.dmg.n.Store(int64(len(v.dmg.blocks)))
	left := v.dmg.inRangeLocked(b0, b1)
	v.dmg.mu.Unlock()
	repaired = blocksToRanges(fixed, size, off, end)
	still = blocksToRanges(left, size, off, end)
	if len(fixed) > 0 {
		v.log.Info("repaired damaged blocks", "off", off, "len", n, "blocks", len(fixed), "still_damaged", len(left))
	}
	return repaired, still, err
}

// Scrub reads and checks every block of [off, off+length) (a hole must
// have the sum 0, without being read), marks mismatches damaged and returns
// the damaged ranges of the blocks covering the range (newly found or
// already known). Range rule as for ReadAt. It holds the volume's read lock
// and the region lock per 1 MiB, so it never stalls writers or a Resize for
// long; if the volume is closed or shrunk below the range meanwhile, it
// fails with ErrClosed or ErrOutOfRange.
func (v *Volume) Scrub(off, length int64) (damaged []Range, err error) {
	if err := v.check("scrub", off, length); err != nil {
		return nil, err
	}
	if length == 0 {
		return nil, nil
	}
	end := off + length
	buf := make([]byte, 1<<regionShift)
	for pos := off / SumBlockSize * SumBlockSize; pos < end; {
		cend := min(end, (pos>>regionShift+1)<<regionShift)
		if err := v.scrubChunk(pos, cend, buf); err != nil {
			return nil, err
		}
		pos = cend
	}
	v.mu.RLock()
	size := v.meta.Size
	v.mu.RUnlock()
	lo, hi := off/SumBlockSize, (end-1)/SumBlockSize
	v.dmg.mu.Lock()
	blocks := v.dmg.inRangeLocked(lo, hi)
	v.dmg.mu.Unlock()
	return blocksToRanges(blocks, size, 0, size), nil
}

// scrubChunk scrubs the blocks covering [pos, cend), which lie in one
// 1 MiB region; pos is block aligned.
func (v *Volume) scrubChunk(pos, cend int64, buf []byte) error {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.checkLocked("scrub", pos, cend-pos); err != nil {
		return err
	}
	b0, b1 := pos/SumBlockSize, (cend-1)/SumBlockSize
	end := v.blockEnd(b1)
	ss := stripesFor(pos, end)
	v.lockStripes(&ss, false)
	defer v.unlockStripes(&ss, false)
	sc := getScratch()
	defer putScratch(sc)
	stored := sc.sums[:4*(b1-b0+1)]
	if err := v.readSums(b0, stored); err != nil {
		return fmt.Errorf("volume %q: scrub: read block checksums: %w", v.name, err)
	}
	// Which blocks hold data (need reading): those not wholly in a hole.
	var read [1 << regionShift / SumBlockSize]bool
	err := v.control(func(fd int) error {
		return walkExtents(fd, pos, end, func(e Extent) error {
			if !e.Hole {
				for b := e.Offset / SumBlockSize; b <= (e.Offset+e.Length-1)/SumBlockSize; b++ {
					read[b-b0] = true
				}
			}
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("volume %q: scrub: %w", v.name, err)
	}
	for b := b0; b <= b1; {
		if !read[b-b0] {
			if binary.LittleEndian.Uint32(stored[4*(b-b0):]) != 0 {
				sc.bad = append(sc.bad, b)
			}
			b++
			continue
		}
		e := b
		for e+1 <= b1 && read[e+1-b0] {
			e++
		}
		rs, re := b*SumBlockSize, v.blockEnd(e)
		sc.bad = v.readRun(buf[:re-rs], rs, stored[4*(b-b0):4*(e-b0+1)], nil, sc.bad)
		b = e + 1
	}
	if len(sc.bad) > 0 {
		v.log.Warn("scrub found damaged blocks", "off", pos, "blocks", len(sc.bad))
	}
	v.dmg.noteRead(b0, b1, sc.bad, v.gen.Load())
	return nil
}

// SumsDigest feeds the stored sums of the 4 KiB blocks of [off, off+length)
// to h, in order (4 little-endian bytes per block, as stored): a cheap,
// deterministic digest that equals across sites exactly when their sums do.
// off must be 4 KiB aligned, and length too unless the range ends at the
// size; else, or outside the volume, the error wraps ErrOutOfRange. It reads
// 4 MiB of the volume's sums at a time under the volume's read lock and the
// region locks, like Hash; quiesce writers for a consistent digest.
func (v *Volume) SumsDigest(off, length int64, h hash.Hash) error {
	v.mu.RLock()
	err := v.checkLocked("sums digest", off, length)
	if err == nil && (off%SumBlockSize != 0 || (length%SumBlockSize != 0 && off+length != v.meta.Size)) {
		err = fmt.Errorf("volume %q: sums digest [%d, +%d) is not %d-byte aligned: %w",
			v.name, off, length, SumBlockSize, ErrOutOfRange)
	}
	v.mu.RUnlock()
	if err != nil {
		return err
	}
	sc := getScratch()
	defer putScratch(sc)
	end := off + length
	for pos := off; pos < end; {
		cend := min(end, pos+sumsChunk*SumBlockSize)
		n, err := v.sumsChunkLocked(pos, cend, sc.sums[:])
		if err != nil {
			return err
		}
		h.Write(sc.sums[:n])
		pos = cend
	}
	return nil
}

// sumsChunkLocked reads the stored sums of the blocks covering [pos, cend)
// into buf under the locks and returns their byte count.
func (v *Volume) sumsChunkLocked(pos, cend int64, buf []byte) (int, error) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.checkLocked("sums digest", pos, cend-pos); err != nil {
		return 0, err
	}
	ss := stripesFor(pos, cend)
	v.lockStripes(&ss, false)
	defer v.unlockStripes(&ss, false)
	b0, b1 := pos/SumBlockSize, (cend-1)/SumBlockSize
	n := int(4 * (b1 - b0 + 1))
	if err := v.readSums(b0, buf[:n]); err != nil {
		return 0, fmt.Errorf("volume %q: sums digest: %w", v.name, err)
	}
	return n, nil
}

// BlockStatus describes [off, off+length), clipped at Size, as a list of
// extents that are sorted, contiguous, cover the clipped range exactly, and
// never have two neighbours of the same kind. It uses SEEK_DATA/SEEK_HOLE, so
// the answer has filesystem granularity: a region reported as a hole reads
// as zeros, but a region reported as data may also hold zeros. It requires
// 0 <= off <= Size and length >= 0, else the error wraps ErrOutOfRange; an
// empty clipped range yields no extents.
func (v *Volume) BlockStatus(off, length int64) ([]Extent, error) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if v.f == nil {
		return nil, fmt.Errorf("volume %q: block status: %w", v.name, ErrClosed)
	}
	size := v.meta.Size
	if off < 0 || length < 0 || off > size {
		return nil, fmt.Errorf("volume %q: block status [%d, +%d) with size %d: %w",
			v.name, off, length, size, ErrOutOfRange)
	}
	end := size
	if length < size-off {
		end = off + length
	}

	var exts []Extent
	err := v.control(func(fd int) error {
		return walkExtents(fd, off, end, func(e Extent) error {
			exts = appendExtent(exts, e)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("volume %q: block status: %w", v.name, err)
	}
	return exts, nil
}

// walkExtents calls fn for the runs of data and holes of the file fd in
// [off, end), in order, covering it exactly (neighbours may be of the same
// kind). Bytes past the end of the file are a hole.
func walkExtents(fd int, off, end int64, fn func(Extent) error) error {
	for pos := off; pos < end; {
		// Find the next data at or after pos. ENXIO means none: the rest
		// of the file (and anything past its end, which reads as zeros)
		// is a hole.
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			data = end
		} else if err != nil {
			return fmt.Errorf("SEEK_DATA at %d: %w", pos, err)
		}
		if data > pos {
			next := min(data, end)
			if err := fn(Extent{Offset: pos, Length: next - pos, Hole: true}); err != nil {
				return err
			}
			pos = next
			continue
		}
		// pos is in data; find where it ends. Every file has an implicit
		// hole at EOF, so ENXIO only happens if the file shrank under us;
		// treat the rest as hole.
		hole, err := unix.Seek(fd, pos, unix.SEEK_HOLE)
		if errors.Is(err, unix.ENXIO) {
			return fn(Extent{Offset: pos, Length: end - pos, Hole: true})
		} else if err != nil {
			return fmt.Errorf("SEEK_HOLE at %d: %w", pos, err)
		}
		if hole <= pos {
			// Only if a concurrent trim raced us. Reporting data is
			// always truthful (data may be zeros).
			hole = end
		}
		next := min(hole, end)
		if err := fn(Extent{Offset: pos, Length: next - pos}); err != nil {
			return err
		}
		pos = next
	}
	return nil
}

// appendExtent appends e to exts, merging it into the last extent when both
// are of the same kind (they are always adjacent).
func appendExtent(exts []Extent, e Extent) []Extent {
	if n := len(exts); n > 0 && exts[n-1].Hole == e.Hole {
		exts[n-1].Length += e.Length
		return exts
	}
	return append(exts, e)
}

// Hash writes the bytes of [off, off+length) to h in order, reading 1 MiB at
// a time; it does not reset h. The range rule is that of ReadAt. The read
// lock is taken per chunk, so a long Hash does not stall Resize or Delete;
// if the volume is closed or shrunk below the range meanwhile, Hash fails
// with ErrClosed or ErrOutOfRange. Concurrent writes to the range may or may
// not be reflected: quiesce writers for a consistent digest. Hash reads the
// data as stored, without checking the block checksums (it is how sites
// compare their data; SumsDigest compares their sums).
func (v *Volume) Hash(off, length int64, h hash.Hash) error {
	if err := v.check("hash", off, length); err != nil {
		return err
	}
	buf := make([]byte, min(length, hashChunkSize))
	for length > 0 {
		p := buf[:min(length, int64(len(buf)))]
		if err := v.hashChunk(p, off); err != nil {
			return err
		}
		h.Write(p) // hash.Hash.Write never returns an error
		off += int64(len(p))
		length -= int64(len(p))
	}
	return nil
}

func (v *Volume) hashChunk(p []byte, off int64) error {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.checkLocked("hash", off, int64(len(p))); err != nil {
		return err
	}
	_, err := v.readLocked(p, off)
	return err
}

// check is checkLocked under the read lock.
func (v *Volume) check(op string, off, length int64) error {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.checkLocked(op, off, length)
}

// checkLocked returns an error wrapping ErrClosed if the volume is closed,
// or ErrOutOfRange unless 0 <= off, 0 <= length and off+length <= Size. It
// is written so that no intermediate value can overflow int64. The caller
// holds v.mu.
func (v *Volume) checkLocked(op string, off, length int64) error {
	if v.f == nil {
		return fmt.Errorf("volume %q: %s: %w", v.name, op, ErrClosed)
	}
	size := v.meta.Size
	if off < 0 || length < 0 || off > size || length > size-off {
		return fmt.Errorf("volume %q: %s [%d, +%d) with size %d: %w", v.name, op, off, length, size, ErrOutOfRange)
	}
	return nil
}

// control runs fn with the data file's descriptor, keeping it open for the
// duration. The caller holds v.mu and has checked that v.f != nil.
func (v *Volume) control(fn func(fd int) error) error {
	var fnErr error
	if err := v.rc.Control(func(fd uintptr) { fnErr = fn(int(fd)) }); err != nil {
		return err
	}
	return fnErr
}

// closeLocked closes the data and sums files and marks the volume closed.
// The caller holds v.mu for writing (or v is not shared yet). It is
// idempotent.
func (v *Volume) closeLocked() error {
	if v.f == nil {
		return nil
	}
	err := v.f.Close()
	v.f, v.rc = nil, nil
	if serr := v.closeSums(); err == nil {
		err = serr
	}
	if err != nil {
		return fmt.Errorf("volume %q: close: %w", v.name, err)
	}
	return nil
}
