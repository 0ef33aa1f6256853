// Package dcdlog is robib's Raft log store, the DCD log: pre-written,
// recycled segment files taking each StoreLogs as one vectored write and one
// fdatasync. See DESIGN.md for the format and the safety arguments.
package dcdlog

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/hashicorp/raft"
	"golang.org/x/sys/unix"
)

var (
	ErrClosed       = errors.New("dcdlog: store closed")
	ErrLocked       = errors.New("dcdlog: directory in use by another store")
	ErrFormat       = errors.New("dcdlog: unsupported format")
	ErrCorrupt      = errors.New("dcdlog: log corrupt")
	ErrNotMonotonic = errors.New("dcdlog: log entries not consecutive")
	ErrRange        = errors.New("dcdlog: unsupported delete range")
	ErrFailed       = errors.New("dcdlog: store failed after a write error; reopen it")
)

const (
	DefaultSegmentSize = 64 << 20
	defaultSpares      = 3
	seqReserve         = 1024 // generations reserved in meta at a time
	maxRecord          = 1<<32 - 1
	iovMax             = 1024
)

// Options configure a Store; the zero value is the default.
type Options struct {
	// SegmentSize is the pre-written size of a segment file. A batch that
	// does not fit into the rest of a segment starts a new one; a batch
	// bigger than a whole segment grows its (fresh) segment.
	SegmentSize int64
	// Spares is how many prepared segment files are kept ready.
	Spares int

	copyWrites bool // one pwrite of a built buffer instead of pwritev (benchmark)
}

// segment is one live segment file.
type segment struct {
	f    *os.File
	name string
	seq  uint64
	seed uint32 // genSeed(seq)
	base uint64
	size int64   // bytes prepared (written) in the file
	offs []int64 // offs[i]: offset of index base+i; the last element is the end
}

func (g *segment) n() uint64 { return uint64(len(g.offs) - 1) }

// Store is a raft.LogStore and raft.MonotonicLogStore.
type Store struct {
	dir   string
	opts  Options
	lockF *os.File
	dirF  *os.File
	metaF *os.File
	prep  *preparer

	// wmu serializes the mutators: StoreLogs, DeleteRange, Close. It is
	// taken before mu. The fields below are owned by the holder of wmu.
	wmu     sync.Mutex
	meta    meta
	active  *segment // appended to; nil: the next StoreLogs starts a segment
	nextSeq uint64
	failed  error
	hdrs    []byte
	iovs    [][]byte
	buf     []byte
	// unsynced: segments written by StoreLogsNoSync since the last sync.
	unsynced []*segment

	// mu guards what readers see. Only the holder of wmu changes it.
	mu     sync.RWMutex
	segs   []*segment // live segments, ascending index and generation
	first  uint64     // 0: empty
	last   uint64
	closed bool
}

var _ raft.MonotonicLogStore = (*Store)(nil)
var _ raft.LogStore = (*Store)(nil)

// Open opens (creating if needed) the store in dir. It holds an exclusive
// lock on dir until Close; a second Open fails with ErrLocked.
func Open(dir string, opts Options) (*Store, error) {
	if opts.SegmentSize <= 0 {
		opts.SegmentSize = DefaultSegmentSize
	}
	opts.SegmentSize = max(padded(opts.SegmentSize), 4096)
	if opts.Spares <= 0 {
		opts.Spares = defaultSpares
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("dcdlog: %w", err)
	}
	s := &Store{dir: dir, opts: opts}
	ok := false
	defer func() {
		if !ok {
			s.closeFiles()
		}
	}()
	var err error
	if s.lockF, err = os.OpenFile(filepath.Join(dir, "lock"), os.O_RDWR|os.O_CREATE, 0o600); err != nil {
		return nil, fmt.Errorf("dcdlog: %w", err)
	}
	if err := unix.Flock(int(s.lockF.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s", ErrLocked, dir)
		}
		return nil, fmt.Errorf("dcdlog: locking %s: %w", dir, err)
	}
	if s.dirF, err = os.Open(dir); err != nil {
		return nil, fmt.Errorf("dcdlog: %w", err)
	}
	if err := s.recover(); err != nil {
		return nil, err
	}
	ok = true
	return s, nil
}

// recover reads the meta file and every segment and rebuilds the index
// (DESIGN.md, "Opening").
func (s *Store) recover() error {
	haveMeta, err := s.openMeta()
	if err != nil {
		return err
	}
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return fmt.Errorf("dcdlog: %w", err)
	}
	// Files opened here are closed again if recovery fails.
	var opened []*os.File
	ok := false
	defer func() {
		if !ok {
			for _, f := range opened {
				f.Close()
			}
		}
	}()
	var (
		cands  []*segment
		ready  []*spare
		dead   []*spare
		maxID  uint64
		maxSeq uint64
	)
	for _, e := range ents {
		name := e.Name()
		if strings.HasSuffix(name, ".tmp") {
			os.Remove(filepath.Join(s.dir, name))
			continue
		}
		if !strings.HasPrefix(name, "seg-") {
			continue
		}
		id, err := strconv.ParseUint(strings.TrimPrefix(name, "seg-"), 16, 64)
		if err != nil {
			continue
		}
		maxID = max(maxID, id)
		f, err := os.OpenFile(filepath.Join(s.dir, name), os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("dcdlog: %w", err)
		}
		opened = append(opened, f)
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return fmt.Errorf("dcdlog: %w", err)
		}
		size := st.Size()
		sc, valid, err := scanSegment(f, size, nil)
		if err != nil {
			f.Close()
			return fmt.Errorf("%s: %w", name, err)
		}
		sp := &spare{f: f, name: name, size: size}
		switch {
		case !valid:
			// Every spare found is kept: the directory never held more
			// files than its high-water mark (see preparer.keepLocked).
			ready = append(ready, sp)
		default:
			maxSeq = max(maxSeq, sc.hdr.Seq)
			if sc.hdr.Seq < s.meta.MinSeq {
				dead = append(dead, sp)
				continue
			}
			cands = append(cands, &segment{f: f, name: name, seq: sc.hdr.Seq, seed: genSeed(sc.hdr.Seq),
				base: sc.hdr.Base, size: size, offs: slices.Clip(sc.offs)})
		}
	}
	if !haveMeta && (len(cands) > 0 || len(dead) > 0) {
		return fmt.Errorf("%w: segments without a valid meta file in %s", ErrCorrupt, s.dir)
	}
	slices.SortFunc(cands, func(a, b *segment) int { return cmpU64(a.seq, b.seq) })
	// A later generation supersedes every entry at or above its base.
	var live []*segment
	kill := func(g *segment) { dead = append(dead, &spare{f: g.f, name: g.name, size: g.size}) }
	for _, g := range cands {
		for len(live) > 0 && live[len(live)-1].base >= g.base {
			kill(live[len(live)-1])
			live = live[:len(live)-1]
		}
		if len(live) > 0 {
			// Cut what g supersedes. Whether the rest reaches g's base is
			// checked only once every later segment has been applied: a
			// later one may supersede g itself (a tail truncation whose
			// superseded files were not recycled yet).
			top := live[len(live)-1]
			if keep := g.base - top.base; keep < top.n() {
				top.offs = top.offs[:keep+1]
			}
		}
		live = append(live, g)
	}
	for k := 1; k < len(live); k++ {
		if prev, g := live[k-1], live[k]; prev.base+prev.n() != g.base {
			return fmt.Errorf("%w: %s ends at index %d, the next segment %s starts at %d",
				ErrCorrupt, prev.name, prev.base+prev.n()-1, g.name, g.base)
		}
	}
	// Drop whole segments below the first-index marker.
	for len(live) > 0 && live[0].n() > 0 && live[0].base+live[0].n()-1 < s.meta.First {
		kill(live[0])
		live = live[1:]
	}
	var first, last uint64
	if len(live) > 0 {
		first = max(live[0].base, s.meta.First)
		g := live[len(live)-1]
		last = g.base + g.n() - 1
	}
	if len(live) == 0 || last < first {
		for _, g := range live {
			kill(g)
		}
		live, first, last = nil, 0, 0
	}
	s.segs, s.first, s.last = live, first, last
	s.nextSeq = max(s.meta.SeqLimit, maxSeq+1, 1)
	if len(ready) == 0 && len(dead) == 0 {
		// The first segment of a new (or spare-less) directory is
		// prepared here, so that appends start at the disk's floor.
		p := &preparer{dir: s.dir, dirF: s.dirF, size: s.opts.SegmentSize}
		sp, err := p.zeroed(maxID + 1)
		if err != nil {
			return err
		}
		maxID++
		ready = append(ready, sp)
	}
	s.prep = newPreparer(s.dir, s.dirF, s.opts.SegmentSize, s.opts.Spares, maxID+1, len(live), ready, dead)
	ok = true
	// s.active stays nil: the last segment's tail past its last valid
	// record is unknown bytes, so nothing is ever appended to it.
	return nil
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// openMeta reads the meta file, creating it (durably) if new.
func (s *Store) openMeta() (bool, error) {
	path := filepath.Join(s.dir, "meta")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return false, fmt.Errorf("dcdlog: %w", err)
	}
	s.metaF = f
	var b [metaSlotGap + metaSlotSize]byte
	n, err := f.ReadAt(b[:], 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return false, fmt.Errorf("dcdlog: reading meta: %w", err)
	}
	found := false
	for i := 0; i < 2; i++ {
		off := i * metaSlotGap
		if off+metaSlotSize > n {
			continue
		}
		m, ok, err := decodeMeta(b[off : off+metaSlotSize])
		if err != nil {
			return false, err
		}
		if ok && (!found || m.Counter > s.meta.Counter) {
			s.meta, found = m, true
		}
	}
	if found {
		return true, nil
	}
	if err := s.writeMeta(meta{}); err != nil {
		return false, err
	}
	if err := s.dirF.Sync(); err != nil {
		return false, fmt.Errorf("dcdlog: %w", err)
	}
	return false, nil
}

// writeMeta durably records m (with the next counter) in the slot the
// current state is not in, so a torn write leaves the previous state.
func (s *Store) writeMeta(m meta) error {
	m.Counter = s.meta.Counter + 1
	var b [metaSlotSize]byte
	m.encode(b[:])
	if _, err := s.metaF.WriteAt(b[:], int64(m.Counter%2)*metaSlotGap); err != nil {
		return fmt.Errorf("dcdlog: writing meta: %w", err)
	}
	if err := unix.Fdatasync(int(s.metaF.Fd())); err != nil {
		return fmt.Errorf("dcdlog: syncing meta: %w", err)
	}
	s.meta = m
	return nil
}

// newSegment takes a spare for a segment of the given base, assigning it
// the next generation (reserving generations in meta first if needed). The
// caller writes its header. With empty, the store has no entries: the
// marker is reset so that entries at any index are kept.
func (s *Store) newSegment(base uint64, empty bool) (*segment, error) {
	sp, err := s.prep.take()
	if err != nil {
		return nil, err
	}
	seq := s.nextSeq
	if seq >= s.meta.SeqLimit || (empty && (s.meta.First != 0 || s.meta.MinSeq < seq)) {
		m := s.meta
		if seq >= m.SeqLimit {
			m.SeqLimit = seq + seqReserve
		}
		if empty {
			m.First, m.MinSeq = 0, seq
		}
		if err := s.writeMeta(m); err != nil {
			s.prep.give(len(s.segs), sp)
			return nil, err
		}
	}
	s.nextSeq++
	return &segment{f: sp.f, name: sp.name, seq: seq, seed: genSeed(seq), base: base,
		size: max(sp.size, s.opts.SegmentSize), offs: []int64{segHdrSize}}, nil
}

// FirstIndex returns the first index in the log, 0 if empty.
func (s *Store) FirstIndex() (uint64, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return 0, ErrClosed
	}
	return s.first, nil
}

// LastIndex returns the last index in the log, 0 if empty.
func (s *Store) LastIndex() (uint64, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return 0, ErrClosed
	}
	return s.last, nil
}

// IsMonotonic tells raft that the log never has gaps.
func (s *Store) IsMonotonic() bool { return true }

// GetLog reads the entry at index into l (its Data and Extensions are
// fresh slices), or returns raft.ErrLogNotFound.
func (s *Store) GetLog(index uint64, l *raft.Log) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return ErrClosed
	}
	if s.first == 0 || index < s.first || index > s.last {
		return raft.ErrLogNotFound
	}
	i, _ := slices.BinarySearchFunc(s.segs, index, func(g *segment, idx uint64) int {
		if g.base+g.n() <= idx {
			return -1
		}
		if g.base > idx {
			return 1
		}
		return 0
	})
	if i == len(s.segs) {
		return raft.ErrLogNotFound
	}
	g := s.segs[i]
	k := index - g.base
	off, end := g.offs[k], g.offs[k+1]
	b := make([]byte, end-off)
	if _, err := g.f.ReadAt(b, off); err != nil {
		return fmt.Errorf("dcdlog: reading index %d: %w", index, err)
	}
	if _, ok := decodeRecord(b, g.seed, index, l); !ok {
		return fmt.Errorf("%w: record of index %d in %s at offset %d fails its checksum", ErrCorrupt, index, g.name, off)
	}
	return nil
}

// StoreLog stores one entry.
func (s *Store) StoreLog(l *raft.Log) error { return s.StoreLogs([]*raft.Log{l}) }

// StoreLogs appends consecutive entries following the last one (any index
// if the log is empty) and returns once they, and every entry appended
// before them, are durable: one write, one fdatasync (one per segment that
// StoreLogsNoSync wrote meanwhile).
func (s *Store) StoreLogs(logs []*raft.Log) error { return s.storeLogs(logs, true) }

// StoreLogsNoSync appends like StoreLogs, but returns once the entries are
// written, before they are durable; they are readable at once. Sync (or a
// later StoreLogs) makes them durable. For the Raft leader, whose append
// may overlap replication (cluster/leadersync.go).
func (s *Store) StoreLogsNoSync(logs []*raft.Log) error { return s.storeLogs(logs, false) }

// Sync makes every entry appended so far durable. A failure is sticky (what
// reached the disk is unknown): the store takes no more writes.
func (s *Store) Sync() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.failed != nil {
		return s.failed
	}
	return s.syncUnsyncedLocked()
}

// syncUnsyncedLocked fdatasyncs the segments StoreLogsNoSync wrote (wmu
// held; the files stay open while wmu is held).
func (s *Store) syncUnsyncedLocked() error {
	for _, g := range s.unsynced {
		if err := unix.Fdatasync(int(g.f.Fd())); err != nil {
			s.failed = fmt.Errorf("%w: fdatasync %s: %w", ErrFailed, g.name, err)
			return s.failed
		}
	}
	clear(s.unsynced)
	s.unsynced = s.unsynced[:0]
	return nil
}

func (s *Store) storeLogs(logs []*raft.Log, durable bool) error {
	if len(logs) == 0 {
		return nil
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if s.failed != nil {
		return s.failed
	}
	first := logs[0].Index
	if first == 0 {
		return fmt.Errorf("%w: index 0", ErrNotMonotonic)
	}
	if s.last != 0 && first != s.last+1 {
		return fmt.Errorf("%w: index %d after %d", ErrNotMonotonic, first, s.last)
	}
	var total int64
	for i, l := range logs {
		if l.Index != first+uint64(i) {
			return fmt.Errorf("%w: index %d after %d in one batch", ErrNotMonotonic, l.Index, first+uint64(i)-1)
		}
		if int64(len(l.Data))+int64(len(l.Extensions)) > maxRecord-recHdrSize-recAlign {
			return fmt.Errorf("dcdlog: entry %d too large (%d bytes)", l.Index, len(l.Data)+len(l.Extensions))
		}
		total += recordLen(l)
	}

	g := s.active
	fresh := false
	if g == nil || (g.n() > 0 && g.offs[len(g.offs)-1]+total > g.size) {
		var err error
		if g, err = s.newSegment(first, s.last == 0); err != nil {
			return err
		}
		fresh = true
	}
	off := g.offs[len(g.offs)-1]
	if durable {
		// Entries written before without a sync become durable first
		// (or with this write's fdatasync, when in the same file).
		if err := s.syncUnsyncedLocked(); err != nil {
			return err
		}
	}
	if err := s.write(g, logs, total, fresh, durable); err != nil {
		// What reached the disk is unknown: stop taking writes. Reopening
		// recovers the valid prefix and never appends after it.
		s.failed = fmt.Errorf("%w: %w", ErrFailed, err)
		return s.failed
	}

	s.mu.Lock()
	for _, l := range logs {
		off += recordLen(l)
		g.offs = append(g.offs, off)
	}
	if fresh {
		var drop []*spare
		// An empty segment at the end (a tail truncation's) is superseded.
		for len(s.segs) > 0 && s.segs[len(s.segs)-1].base >= g.base {
			old := s.segs[len(s.segs)-1]
			drop = append(drop, &spare{f: old.f, name: old.name, size: old.size})
			s.segs = s.segs[:len(s.segs)-1]
		}
		s.segs = append(s.segs, g)
		s.active = g
		if len(drop) > 0 {
			s.prep.give(len(s.segs), drop...)
		} else {
			s.prep.setLive(len(s.segs))
		}
	}
	if s.first == 0 {
		s.first = first
	}
	s.last = logs[len(logs)-1].Index
	s.mu.Unlock()
	return nil
}

// write writes logs' records at g's end (with the segment header first if
// fresh) in one vectored write, then fdatasyncs (sync) or notes g as
// unsynced.
func (s *Store) write(g *segment, logs []*raft.Log, total int64, fresh, sync bool) error {
	off := g.offs[len(g.offs)-1]
	need := len(logs) * recHdrSize
	if fresh {
		need += segHdrSize
	}
	if cap(s.hdrs) < need {
		s.hdrs = make([]byte, need)
	}
	hdrs := s.hdrs[:need]
	iovs := s.iovs[:0]
	var pad [recAlign]byte
	if fresh {
		segHeader{Seq: g.seq, Base: g.base, Capacity: uint64(g.size)}.encode(hdrs)
		iovs = append(iovs, hdrs[:segHdrSize])
		hdrs = hdrs[segHdrSize:]
		off = 0
	}
	for _, l := range logs {
		h := hdrs[:recHdrSize]
		hdrs = hdrs[recHdrSize:]
		encodeRecordHeader(h, g.seed, l)
		iovs = append(iovs, h)
		if len(l.Data) > 0 {
			iovs = append(iovs, l.Data)
		}
		if len(l.Extensions) > 0 {
			iovs = append(iovs, l.Extensions)
		}
		if p := recordLen(l) - recHdrSize - int64(len(l.Data)+len(l.Extensions)); p > 0 {
			iovs = append(iovs, pad[:p])
		}
	}
	s.iovs = iovs[:0]
	fd := int(g.f.Fd())
	var err error
	if s.opts.copyWrites {
		buf := s.buf[:0]
		for _, v := range iovs {
			buf = append(buf, v...)
		}
		s.buf = buf[:0]
		err = pwriteAll(fd, buf, off)
	} else {
		err = pwritevAll(fd, iovs, off)
	}
	clear(s.iovs[:cap(s.iovs)]) // drop references to the callers' data
	if err != nil {
		return err
	}
	if sync {
		if err := unix.Fdatasync(fd); err != nil {
			return fmt.Errorf("fdatasync %s: %w", g.name, err)
		}
	} else if !slices.Contains(s.unsynced, g) {
		s.unsynced = append(s.unsynced, g)
	}
	if end := off + total; end > g.size {
		g.size = end
	}
	return nil
}

func pwriteAll(fd int, b []byte, off int64) error {
	for len(b) > 0 {
		n, err := unix.Pwrite(fd, b, off)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return fmt.Errorf("pwrite: %w", err)
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}

func pwritevAll(fd int, iovs [][]byte, off int64) error {
	for len(iovs) > 0 {
		chunk := iovs[:min(len(iovs), iovMax)]
		n, err := unix.Pwritev(fd, chunk, off)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return fmt.Errorf("pwritev: %w", err)
		}
		off += int64(n)
		for n > 0 {
			if n >= len(iovs[0]) {
				n -= len(iovs[0])
				iovs = iovs[1:]
			} else {
				iovs[0] = iovs[0][n:]
				n = 0
			}
		}
		for len(iovs) > 0 && len(iovs[0]) == 0 {
			iovs = iovs[1:]
		}
	}
	return nil
}

// DeleteRange deletes [lo, hi]: a prefix (compaction), a suffix (a
// conflict), or everything. It returns once the deletion is durable.
func (s *Store) DeleteRange(lo, hi uint64) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if s.failed != nil {
		return s.failed
	}
	// What StoreLogsNoSync wrote becomes durable before any segment is
	// dropped or replaced.
	if err := s.syncUnsyncedLocked(); err != nil {
		return err
	}
	if lo > hi || s.first == 0 || hi < s.first || lo > s.last {
		return nil
	}
	switch {
	case lo <= s.first && hi >= s.last:
		return s.deleteAll()
	case lo <= s.first:
		return s.deleteHead(hi)
	case hi >= s.last:
		return s.deleteTail(lo)
	default:
		return fmt.Errorf("%w: [%d, %d] inside [%d, %d]", ErrRange, lo, hi, s.first, s.last)
	}
}

func (s *Store) deleteAll() error {
	m := s.meta
	m.First, m.MinSeq = 0, s.nextSeq
	if err := s.writeMeta(m); err != nil {
		return err
	}
	s.mu.Lock()
	drop := s.segs
	s.segs, s.first, s.last, s.active = nil, 0, 0, nil
	s.mu.Unlock()
	s.giveSegs(drop)
	return nil
}

// deleteHead deletes [first, hi], hi < last: the marker first, then the
// files of whole segments below it.
func (s *Store) deleteHead(hi uint64) error {
	k := 0
	for k < len(s.segs) && s.segs[k].base+s.segs[k].n()-1 <= hi {
		k++
	}
	m := s.meta
	m.First = hi + 1
	m.MinSeq = s.segs[k].seq
	if err := s.writeMeta(m); err != nil {
		return err
	}
	s.mu.Lock()
	drop := s.segs[:k:k]
	s.segs = slices.Clone(s.segs[k:])
	s.first = hi + 1
	s.mu.Unlock()
	s.giveSegs(drop)
	return nil
}

// deleteTail deletes [lo, last], lo > first: a new segment of base lo is
// made durable (its header supersedes every older entry at or above lo),
// then the segments it supersedes entirely are recycled.
func (s *Store) deleteTail(lo uint64) error {
	g, err := s.newSegment(lo, false)
	if err != nil {
		return err
	}
	var hdr [segHdrSize]byte
	segHeader{Seq: g.seq, Base: g.base, Capacity: uint64(g.size)}.encode(hdr[:])
	fd := int(g.f.Fd())
	if err := pwriteAll(fd, hdr[:], 0); err != nil {
		s.failed = fmt.Errorf("%w: %w", ErrFailed, err)
		return s.failed
	}
	if err := unix.Fdatasync(fd); err != nil {
		s.failed = fmt.Errorf("%w: fdatasync: %w", ErrFailed, err)
		return s.failed
	}
	s.mu.Lock()
	k := len(s.segs)
	for k > 0 && s.segs[k-1].base >= lo {
		k--
	}
	drop := slices.Clone(s.segs[k:])
	s.segs = s.segs[:k]
	if k > 0 {
		top := s.segs[k-1]
		top.offs = slices.Clip(top.offs[:lo-top.base+1])
	}
	s.segs = append(s.segs, g)
	s.active = g
	s.last = lo - 1
	s.mu.Unlock()
	s.giveSegs(drop)
	return nil
}

func (s *Store) giveSegs(gs []*segment) {
	sps := make([]*spare, 0, len(gs))
	for _, g := range gs {
		sps = append(sps, &spare{f: g.f, name: g.name, size: g.size})
	}
	if len(sps) > 0 {
		s.prep.give(len(s.segs), sps...)
	}
}

// Close releases the files and the directory lock. Later calls fail with
// ErrClosed; a second Close returns nil.
func (s *Store) Close() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	var syncErr error
	if s.failed == nil {
		syncErr = s.syncUnsyncedLocked()
	}
	return errors.Join(syncErr, s.closeFiles())
}

func (s *Store) closeFiles() error {
	var errs []error
	if s.prep != nil {
		s.prep.close()
	}
	for _, g := range s.segs {
		errs = append(errs, g.f.Close())
	}
	s.segs = nil
	for _, f := range []*os.File{s.metaF, s.dirF, s.lockF} {
		if f != nil {
			errs = append(errs, f.Close())
		}
	}
	return errors.Join(errs...)
}
