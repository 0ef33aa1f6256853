package volume

// Per-block checksums: the sums file format, its creation and rebuild, the
// striped region locks, and the in-memory damage map. The I/O paths that use
// them are in volume.go; DESIGN.md ("Block checksums") gives the invariants
// and the crash argument.

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"log/slog"
	"math/bits"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// SumBlockSize is the size of the blocks the volume checksums: every
// aligned 4 KiB block of the data has one CRC-32C in the sums file,
// whatever Meta.BlockSize is. A volume whose size is not a multiple of it
// has a last, shorter block, checksummed as if padded with zeros to 4 KiB.
const SumBlockSize = 4096

// Range is a byte range [Off, Off+Len) of a volume.
type Range struct{ Off, Len int64 }

// End returns Off+Len.
func (r Range) End() int64 { return r.Off + r.Len }

// DamageError lists the damaged ranges found by a read: sorted, merged,
// 4 KiB aligned and clipped to the volume (the last range may end at the
// volume size). errors.Is(err, ErrDamaged) is true.
type DamageError struct {
	Volume string
	Ranges []Range
}

// maxRangesInError bounds how many ranges DamageError.Error spells out.
const maxRangesInError = 8

func (e *DamageError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "volume %q: %v:", e.Volume, ErrDamaged)
	for i, r := range e.Ranges {
		if i == maxRangesInError {
			fmt.Fprintf(&b, " and %d more", len(e.Ranges)-i)
			break
		}
		fmt.Fprintf(&b, " [%d, +%d)", r.Off, r.Len)
	}
	return b.String()
}

// Is makes errors.Is(err, ErrDamaged) true for a *DamageError.
func (e *DamageError) Is(target error) bool { return target == ErrDamaged }

// The sums file, <volume>/sums: a 4096-byte header, then one little-endian
// uint32 per SumBlockSize block of the data, block i at byte 4096+4*i.
//
// Header, format 1 (all integers little-endian):
//
//	[0, 8)     magic "RBBSUMS\n"
//	[8, 12)    format version, 1
//	[12, 16)   checksum block size, 4096
//	[16, 20)   flags, 0 (none are defined)
//	[20, 24)   reserved, 0
//	[24, 28)   CRC-32C (Castagnoli) of bytes [0, 24)
//	[28, 4096) zeros
//
// The stored value of a block is crc32c(block) XOR crc32c(4096 zero bytes),
// so an all-zero block (a hole, a trimmed block, a block never written)
// stores 0, and a sparse sums file is correct for a sparse volume.
const (
	sumsFileName   = "sums"
	sumsTmpName    = "sums.tmp"
	sumsFormat     = 1
	sumsHeaderSize = 4096
	sumsMagic      = "RBBSUMS\n"
	sumsHeaderUsed = 28 // bytes of the header before the zero padding
)

// zeroBlockCRC is crc32c of SumBlockSize zero bytes: the stored value of a
// block is its CRC XOR this, which makes zero blocks store 0.
var zeroBlockCRC = crc32.Checksum(make([]byte, SumBlockSize), castagnoli)

// blockSum returns the stored value for a block whose bytes are b (at most
// SumBlockSize; a shorter b is the volume's last block, padded with zeros).
func blockSum(b []byte) uint32 {
	c := crc32.Update(0, castagnoli, b)
	if pad := SumBlockSize - len(b); pad > 0 {
		c = crc32.Update(c, castagnoli, zeroChunk[:pad])
	}
	return c ^ zeroBlockCRC
}

// sumBlocks returns the number of checksum blocks of a volume of size bytes.
func sumBlocks(size int64) int64 { return (size + SumBlockSize - 1) / SumBlockSize }

// sumsFileLen returns the length of the sums file of a volume of size bytes.
func sumsFileLen(size int64) int64 { return sumsHeaderSize + 4*sumBlocks(size) }

// sumOff returns the offset of block b's stored sum in the sums file.
func sumOff(b int64) int64 { return sumsHeaderSize + 4*b }

// encodeSumsHeader returns the 4096-byte header of the current format.
func encodeSumsHeader() []byte {
	h := make([]byte, sumsHeaderSize)
	copy(h, sumsMagic)
	binary.LittleEndian.PutUint32(h[8:], sumsFormat)
	binary.LittleEndian.PutUint32(h[12:], SumBlockSize)
	binary.LittleEndian.PutUint32(h[24:], crc32.Checksum(h[:24], castagnoli))
	return h
}

// decodeSumsHeader checks a sums file header (exactly sumsHeaderSize
// bytes). Every failure wraps ErrCorrupt; it never panics. A newer format
// version is refused with an error naming it, before anything else of the
// header is interpreted.
func decodeSumsHeader(h []byte) error {
	if len(h) != sumsHeaderSize {
		return fmt.Errorf("%w: sums header is %d bytes, want %d", ErrCorrupt, len(h), sumsHeaderSize)
	}
	if string(h[:8]) != sumsMagic {
		return fmt.Errorf("%w: sums header has bad magic %q", ErrCorrupt, h[:8])
	}
	if v := binary.LittleEndian.Uint32(h[8:]); v != sumsFormat {
		return fmt.Errorf("%w: unsupported sums format version %d (want %d)", ErrCorrupt, v, sumsFormat)
	}
	if got, want := binary.LittleEndian.Uint32(h[24:]), crc32.Checksum(h[:24], castagnoli); got != want {
		return fmt.Errorf("%w: sums header checksum mismatch: stored %08x, computed %08x", ErrCorrupt, got, want)
	}
	if bs := binary.LittleEndian.Uint32(h[12:]); bs != SumBlockSize {
		return fmt.Errorf("%w: sums block size %d, want %d", ErrCorrupt, bs, SumBlockSize)
	}
	if f := binary.LittleEndian.Uint32(h[16:]); f != 0 {
		return fmt.Errorf("%w: unknown sums header flags %#x", ErrCorrupt, f)
	}
	if r := binary.LittleEndian.Uint32(h[20:]); r != 0 {
		return fmt.Errorf("%w: sums header reserved field is %#x, want 0", ErrCorrupt, r)
	}
	if slices.ContainsFunc(h[sumsHeaderUsed:], func(c byte) bool { return c != 0 }) {
		return fmt.Errorf("%w: sums header padding is not zero", ErrCorrupt)
	}
	return nil
}

// createSumsFile creates the sums file at path (which must not exist) for a
// volume of size bytes whose data is all zeros: the header and a hole. It is
// fsynced; the caller fsyncs the directory.
func createSumsFile(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|openFlags, 0o600)
	if err != nil {
		return err
	}
	_, err = f.WriteAt(encodeSumsHeader(), 0)
	if err == nil {
		err = f.Truncate(sumsFileLen(size))
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// openSumsFile opens the sums file at path and checks its header. An error
// wraps fs.ErrNotExist if there is none and ErrCorrupt if the header is bad.
func openSumsFile(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|openFlags, 0)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err == nil && !st.Mode().IsRegular() {
		err = fmt.Errorf("%w: %s is not a regular file", ErrCorrupt, path)
	}
	if err == nil {
		h := make([]byte, sumsHeaderSize)
		var n int
		n, err = f.ReadAt(h, 0)
		if err == io.EOF {
			err = fmt.Errorf("%w: sums file is %d bytes, shorter than its header", ErrCorrupt, n)
		}
		if err == nil {
			err = decodeSumsHeader(h)
		}
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// rebuildSums computes the sums of the volume's data (skipping holes) into
// sums.tmp, fsyncs it, renames it over sums and fsyncs the directory. It
// returns the blocks the disk could not read: their stored sum is 0 and the
// caller marks them damaged. v is not shared yet; v.f is open.
func (v *Volume) rebuildSums(size int64) (unreadable []int64, err error) {
	tmp := filepath.Join(v.path, sumsTmpName)
	if err := os.Remove(tmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	if err := createSumsFile(tmp, size); err != nil {
		return nil, err
	}
	t, err := os.OpenFile(tmp, os.O_RDWR|openFlags, 0)
	if err != nil {
		return nil, err
	}
	defer t.Close()
	buf := make([]byte, hashChunkSize)
	sums := make([]byte, 4*(hashChunkSize/SumBlockSize))
	err = v.control(func(fd int) error {
		return walkExtents(fd, 0, size, func(e Extent) error {
			if e.Hole {
				return nil // zeros: the stored sums are 0 already
			}
			// Whole blocks covering the extent; neighbours that share
			// a block compute the same sum twice.
			pos := e.Offset / SumBlockSize * SumBlockSize
			end := min(size, (e.Offset+e.Length+SumBlockSize-1)/SumBlockSize*SumBlockSize)
			for pos < end {
				n := min(end-pos, int64(len(buf)))
				b0 := pos / SumBlockSize
				nb := (n + SumBlockSize - 1) / SumBlockSize
				unreadable = v.readRun(buf[:n], pos, nil, sums[:4*nb], unreadable)
				if _, err := t.WriteAt(sums[:4*nb], sumOff(b0)); err != nil {
					return err
				}
				pos += n
			}
			return nil
		})
	})
	if err == nil {
		err = t.Sync()
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(v.path, sumsFileName))
	}
	if err == nil {
		err = SyncDir(v.path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return nil, err
	}
	return unreadable, nil
}

// loadSums attaches the sums file to v, which was just opened by
// Store.Open and is not shared yet; fileLen is the data file's length
// before reconcileLength has run, which this calls. A missing sums file
// (made by an older build) is built from the data; a corrupt one (bad
// header, too short for the size) is rebuilt. Data is the source of truth
// here: wrong data is the replicated repair's business.
func (v *Volume) loadSums(fileLen int64) error {
	size := v.meta.Size
	path := filepath.Join(v.path, sumsFileName)
	if err := os.Remove(filepath.Join(v.path, sumsTmpName)); err == nil {
		v.log.Info("removed leftover temporary sums file")
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	sf, err := openSumsFile(path)
	var reason string
	switch {
	case errors.Is(err, fs.ErrNotExist):
		reason = "missing"
	case errors.Is(err, ErrCorrupt):
		reason = "corrupt"
		v.log.Warn("block checksum file is corrupt; rebuilding it from the data", "err", err)
	case err != nil:
		return err
	}
	if sf != nil {
		v.setSums(sf)
		if fileLen > size && size%SumBlockSize != 0 {
			// A crash inside a shrink may have committed the new size
			// before the last block's sum was recomputed.
			if err := v.fixShrunkLastBlock(size); err != nil {
				return err
			}
		}
	}
	if err := v.reconcileLength(fileLen); err != nil {
		return err
	}
	if sf != nil {
		st, err := sf.Stat()
		if err != nil {
			return err
		}
		switch want := sumsFileLen(size); {
		case st.Size() > want:
			// A crash inside a Resize: the entries past the size are
			// discarded, as the data past it is.
			v.log.Info("block checksum file longer than the volume needs; truncating",
				"sums_length", st.Size(), "want", want)
			if err := sf.Truncate(want); err != nil {
				return err
			}
		case st.Size() < want:
			reason = "corrupt"
			v.log.Warn("block checksum file too short for the volume; rebuilding it from the data",
				"sums_length", st.Size(), "want", want)
			v.closeSums()
		}
		if reason == "" {
			return sf.Sync()
		}
	}
	start := time.Now()
	unreadable, err := v.rebuildSums(size)
	if err != nil {
		return fmt.Errorf("build block checksums: %w", err)
	}
	sf, err = openSumsFile(path)
	if err != nil {
		return err
	}
	v.setSums(sf)
	level := slog.LevelInfo
	if reason != "missing" {
		level = slog.LevelWarn
	}
	v.log.Log(context.Background(), level, "built block checksums from the data", "reason", reason,
		"size", size, "duration", time.Since(start), "unreadable_blocks", len(unreadable))
	for _, b := range unreadable {
		v.dmg.add(b, 0)
	}
	return nil
}

// fixShrunkLastBlock runs at open when the data file is longer than the
// committed size, which is not block aligned: if the last block's stored sum
// is that of the longer block (the old size's), it becomes that of the
// block cut at size. A stored sum that matches neither is left (damage).
func (v *Volume) fixShrunkLastBlock(size int64) error {
	lb := (size - 1) / SumBlockSize
	bs := lb * SumBlockSize
	blk := make([]byte, SumBlockSize)
	if err := v.readData(blk, bs); err != nil {
		return nil // unreadable: reads will report it
	}
	var sb [4]byte
	if err := v.readSums(lb, sb[:]); err != nil {
		return err
	}
	stored := binary.LittleEndian.Uint32(sb[:])
	short := blockSum(blk[:size-bs])
	if stored != short && stored == blockSum(blk) {
		v.log.Info("recomputing the last block's checksum after an interrupted shrink", "block", lb)
		return v.writeSums(lb, binary.LittleEndian.AppendUint32(nil, short))
	}
	return nil
}

// reconcileLength truncates or extends the data file of a volume being
// opened to the committed size and fsyncs it.
func (v *Volume) reconcileLength(fileLen int64) error {
	if fileLen == v.meta.Size {
		return nil
	}
	v.log.Warn("data file length differs from volume size; reconciling",
		"file_length", fileLen, "size", v.meta.Size)
	if err := v.f.Truncate(v.meta.Size); err != nil {
		return err
	}
	return v.f.Sync()
}

// readSums reads the stored sums of the blocks from b into p (4 bytes per
// block). Bytes past the end of the sums file (cut behind our back) read
// as zeros. The caller holds v.mu.
func (v *Volume) readSums(b int64, p []byte) error {
	n, err := v.sums.ReadAt(p, sumOff(b))
	if err == io.EOF {
		clear(p[n:])
		return nil
	}
	return err
}

// writeSums stores the sums p (4 bytes per block) of the blocks from b.
func (v *Volume) writeSums(b int64, p []byte) error {
	_, err := v.sums.WriteAt(p, sumOff(b))
	return err
}

// zeroSums sets the stored sums of blocks [b0, b1] to 0: written zeros for
// a small run, a punched hole for a large one.
func (v *Volume) zeroSums(b0, b1 int64) error {
	off, length := sumOff(b0), 4*(b1-b0+1)
	if length > int64(len(zeroChunk)) {
		err := v.sumsControl(func(fd int) error {
			return retryEINTR(func() error {
				return unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
			})
		})
		if !isNotSupported(err) {
			return err
		}
	}
	for length > 0 {
		n := min(length, int64(len(zeroChunk)))
		if _, err := v.sums.WriteAt(zeroChunk[:n], off); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

// setSums attaches an open sums file.
func (v *Volume) setSums(f *os.File) {
	v.sums = f
	v.sumsRC, _ = f.SyscallConn() // never fails for an *os.File
}

// closeSums closes the sums file, if open.
func (v *Volume) closeSums() error {
	if v.sums == nil {
		return nil
	}
	err := v.sums.Close()
	v.sums, v.sumsRC = nil, nil
	return err
}

// sumsControl is control for the sums file.
func (v *Volume) sumsControl(fn func(fd int) error) error {
	var fnErr error
	if err := v.sumsRC.Control(func(fd uintptr) { fnErr = fn(int(fd)) }); err != nil {
		return err
	}
	return fnErr
}

// Region locks. The volume's byte range is cut into 1 MiB regions; region r
// is guarded by stripe r % numStripes. A request locks the stripes of the
// regions it covers, each once, in ascending stripe order (so two requests
// never wait for each other in a cycle), after v.mu and before the damage
// map's mutex.
const (
	regionShift = 20
	numStripes  = 256
)

// stripeSet is a bit set of stripe numbers.
type stripeSet [numStripes / 64]uint64

// stripesFor returns the stripes of the regions covering [off, end), end >
// off.
func stripesFor(off, end int64) stripeSet {
	var s stripeSet
	r0, r1 := off>>regionShift, (end-1)>>regionShift
	if r1-r0+1 >= numStripes {
		for i := range s {
			s[i] = ^uint64(0)
		}
		return s
	}
	for r := r0; r <= r1; r++ {
		i := r % numStripes
		s[i/64] |= 1 << (i % 64)
	}
	return s
}

// lockStripes locks the stripes of s in ascending order, exclusively or
// shared.
func (v *Volume) lockStripes(s *stripeSet, excl bool) {
	for w, word := range s {
		for word != 0 {
			i := w*64 + bits.TrailingZeros64(word)
			word &= word - 1
			if excl {
				v.stripes[i].Lock()
			} else {
				v.stripes[i].RLock()
			}
		}
	}
}

// unlockStripes releases what lockStripes took.
func (v *Volume) unlockStripes(s *stripeSet, excl bool) {
	for w, word := range s {
		for word != 0 {
			i := w*64 + bits.TrailingZeros64(word)
			word &= word - 1
			if excl {
				v.stripes[i].Unlock()
			} else {
				v.stripes[i].RUnlock()
			}
		}
	}
}

// damageMap is the in-memory set of damaged blocks: block index → the
// write generation that last touched the block while it was damaged (or,
// for a block found damaged, the generation when it was found). It is not
// persisted: after a restart a block whose sum mismatches is found again by
// the next read or scrub; one marked by MarkDamaged must be marked again.
type damageMap struct {
	mu     sync.Mutex
	blocks map[int64]uint64 // guarded by mu
	n      atomic.Int64     // len(blocks), for a lock-free "none" check
}

// add marks block b damaged at generation gen, keeping the generation of
// an entry that exists (no mutation touched the block since it was set).
func (d *damageMap) add(b int64, gen uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.addLocked(b, gen)
}

func (d *damageMap) addLocked(b int64, gen uint64) {
	if d.blocks == nil {
		d.blocks = make(map[int64]uint64)
	}
	if _, ok := d.blocks[b]; !ok {
		d.blocks[b] = gen
		d.n.Add(1)
	}
}

// setLocked marks b damaged at gen, replacing any generation.
func (d *damageMap) setLocked(b int64, gen uint64) {
	d.addLocked(b, gen)
	d.blocks[b] = gen
}

// removeRangeLocked clears [b0, b1].
func (d *damageMap) removeRangeLocked(b0, b1 int64) {
	if len(d.blocks) == 0 {
		return
	}
	if b1-b0+1 > int64(len(d.blocks)) {
		for b := range d.blocks {
			if b0 <= b && b <= b1 {
				delete(d.blocks, b)
			}
		}
	} else {
		for b := b0; b <= b1; b++ {
			delete(d.blocks, b)
		}
	}
	d.n.Store(int64(len(d.blocks)))
}

// inRangeLocked returns the damaged blocks in [b0, b1], sorted.
func (d *damageMap) inRangeLocked(b0, b1 int64) []int64 {
	var out []int64
	if b1-b0+1 > int64(len(d.blocks)) {
		for b := range d.blocks {
			if b0 <= b && b <= b1 {
				out = append(out, b)
			}
		}
		slices.Sort(out)
	} else {
		for b := b0; b <= b1; b++ {
			if _, ok := d.blocks[b]; ok {
				out = append(out, b)
			}
		}
	}
	return out
}

// noteRead records the blocks a read of [b0, b1] found bad (sorted) at
// generation gen and returns every damaged block of [b0, b1], sorted.
func (d *damageMap) noteRead(b0, b1 int64, bad []int64, gen uint64) []int64 {
	if len(bad) == 0 && d.n.Load() == 0 {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, b := range bad {
		d.addLocked(b, gen)
	}
	if len(d.blocks) == 0 {
		return nil
	}
	return d.inRangeLocked(b0, b1)
}

// blocksToRanges turns sorted block indexes into merged byte ranges,
// clipped to a volume of size bytes and to [lo, hi).
func blocksToRanges(blocks []int64, size, lo, hi int64) []Range {
	var out []Range
	for _, b := range blocks {
		s := max(b*SumBlockSize, lo)
		e := min((b+1)*SumBlockSize, size, hi)
		if e <= s {
			continue
		}
		if n := len(out); n > 0 && out[n-1].End() == s {
			out[n-1].Len += e - s
			continue
		}
		out = append(out, Range{Off: s, Len: e - s})
	}
	return out
}

// sumsChunk is the number of blocks the read and write paths handle at a
// time: 4 MiB of data, one 4 KiB page of sums.
const sumsChunk = 1024

// scratch is the per-operation buffer set, pooled so the I/O paths do not
// allocate.
type scratch struct {
	sums       [4 * sumsChunk]byte
	head, tail [SumBlockSize]byte
	bad        []int64
}

var scratchPool = sync.Pool{New: func() any { return new(scratch) }}

func getScratch() *scratch { return scratchPool.Get().(*scratch) }

func putScratch(sc *scratch) {
	sc.bad = sc.bad[:0]
	scratchPool.Put(sc)
}
