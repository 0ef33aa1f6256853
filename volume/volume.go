// Package volume stores named block volumes as sparse files with crash-safe
// metadata. It is the bottom layer of robib and imports nothing else from
// the project.
//
// A Store owns a directory:
//
//	<dir>/LOCK                      flock(2) held while a Store has it open
//	<dir>/volumes/<name>/data       sparse data file, length == Meta.Size
//	<dir>/volumes/<name>/meta.json  versioned, checksummed metadata
//
// Every mutation yields identical bytes on every site that applies the same
// sequence of operations: holes, trimmed and zeroed ranges read as zeros.
// Only the Linux filesystem interfaces are used (fallocate, SEEK_DATA and
// SEEK_HOLE, fdatasync, flock). See DESIGN.md for the crash-safety argument.
package volume

import (
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
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
	// not lie within the volume.
	ErrOutOfRange = errors.New("offset or length out of range")
	// ErrCorrupt: a volume found on disk cannot be loaded (bad or missing
	// metadata, missing data file). Errors reported by Store.Broken wrap it.
	ErrCorrupt = errors.New("corrupt volume metadata")
	// ErrClosed: the volume was deleted, or the store was closed.
	ErrClosed = errors.New("volume closed")
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
// Concurrent writes to overlapping ranges have no ordering guarantee between
// them; callers that need one (the replicated state machine) must serialize.
type Volume struct {
	name      string        // immutable
	path      string        // immutable: <store>/volumes/<name>
	log       *slog.Logger  // immutable
	fallocate fallocateFunc // immutable after open; replaced only by tests

	// mu: read lock for I/O, write lock for Resize, Delete and Close.
	mu   sync.RWMutex
	meta Meta            // guarded by mu
	f    *os.File        // guarded by mu; nil once closed
	rc   syscall.RawConn // guarded by mu; raw access to f's descriptor
}

// openVolume opens the data file of the volume at path described by m and
// returns the Volume. It does not check that the file length equals m.Size.
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
		meta:      m,
		f:         f,
		rc:        rc,
	}, nil
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
// returns len(p), nil, or returns an error; it never returns io.EOF.
func (v *Volume) ReadAt(p []byte, off int64) (int, error) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.checkLocked("read", off, int64(len(p))); err != nil {
		return 0, err
	}
	return v.readLocked(p, off)
}

// readLocked reads p at off, treating bytes past the end of the data file
// (possible only after a failed truncate; see Store.Resize) as zeros.
// The caller holds v.mu and has checked the range.
func (v *Volume) readLocked(p []byte, off int64) (int, error) {
	n, err := v.f.ReadAt(p, off)
	if err == io.EOF {
		clear(p[n:])
		return len(p), nil
	}
	if err != nil {
		return n, fmt.Errorf("volume %q: read at %d: %w", v.name, off, err)
	}
	return n, nil
}

// WriteAt writes p at off. The range rule is that of ReadAt. It returns
// len(p), nil or an error; the data is durable only after Sync.
func (v *Volume) WriteAt(p []byte, off int64) (int, error) {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.checkLocked("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	n, err := v.f.WriteAt(p, off)
	if err != nil {
		return n, fmt.Errorf("volume %q: write at %d: %w", v.name, off, err)
	}
	return n, nil
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
// Range rule as for ReadAt. The volume's read lock is held for the whole
// call. Durable after Sync.
func (v *Volume) WriteZeroes(off, length int64, noHole bool) error {
	v.mu.RLock()
	defer v.mu.RUnlock()
	op := "punch hole"
	mode := uint32(unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE)
	if noHole {
		op = "write zeroes"
	}
	if err := v.checkLocked(op, off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	if noHole {
		// Written zeros, not FALLOC_FL_ZERO_RANGE: that leaves unwritten
		// extents, which SEEK_DATA (and so BlockStatus) reports as holes,
		// while NO_HOLE promises the range stays allocated.
		if err := v.writeZeroBuffersLocked(off, length); err != nil {
			return fmt.Errorf("volume %q: %s [%d, +%d): %w", v.name, op, off, length, err)
		}
		return nil
	}
	err := v.control(func(fd int) error {
		return retryEINTR(func() error { return v.fallocate(fd, mode, off, length) })
	})
	if isNotSupported(err) {
		err = v.writeZeroBuffersLocked(off, length)
	}
	if err != nil {
		return fmt.Errorf("volume %q: %s [%d, +%d): %w", v.name, op, off, length, err)
	}
	return nil
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

// Sync makes all completed writes, trims and zeroings durable with
// fdatasync(2) on the data file.
func (v *Volume) Sync() error {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if v.f == nil {
		return fmt.Errorf("volume %q: sync: %w", v.name, ErrClosed)
	}
	err := v.control(func(fd int) error {
		return retryEINTR(func() error { return unix.Fdatasync(fd) })
	})
	if err != nil {
		return fmt.Errorf("volume %q: fdatasync: %w", v.name, err)
	}
	return nil
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
		for pos := off; pos < end; {
			// Find the next data at or after pos. ENXIO means
			// none: the rest of the file (and anything past its
			// end, which reads as zeros) is a hole.
			data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
			if errors.Is(err, unix.ENXIO) {
				data = end
			} else if err != nil {
				return fmt.Errorf("SEEK_DATA at %d: %w", pos, err)
			}
			if data > pos {
				next := min(data, end)
				exts = appendExtent(exts, Extent{Offset: pos, Length: next - pos, Hole: true})
				pos = next
				continue
			}
			// pos is in data; find where it ends. Every file has
			// an implicit hole at EOF, so ENXIO only happens if
			// the file shrank under us; treat the rest as hole.
			hole, err := unix.Seek(fd, pos, unix.SEEK_HOLE)
			if errors.Is(err, unix.ENXIO) {
				exts = appendExtent(exts, Extent{Offset: pos, Length: end - pos, Hole: true})
				break
			} else if err != nil {
				return fmt.Errorf("SEEK_HOLE at %d: %w", pos, err)
			}
			if hole <= pos {
				// Only if a concurrent trim raced us. Reporting
				// data is always truthful (data may be zeros).
				hole = end
			}
			next := min(hole, end)
			exts = appendExtent(exts, Extent{Offset: pos, Length: next - pos})
			pos = next
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("volume %q: block status: %w", v.name, err)
	}
	return exts, nil
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
// not be reflected: quiesce writers for a consistent digest.
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

// closeLocked closes the data file and marks the volume closed. The caller
// holds v.mu for writing. It is idempotent.
func (v *Volume) closeLocked() error {
	if v.f == nil {
		return nil
	}
	err := v.f.Close()
	v.f, v.rc = nil, nil
	if err != nil {
		return fmt.Errorf("volume %q: close: %w", v.name, err)
	}
	return nil
}
