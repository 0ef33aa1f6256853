package fsm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"time"

	"github.com/hashicorp/raft"
	"github.com/robib/robib/volume"
)

// Snapshot implements raft.FSM. It checkpoints synchronously (fsync of the
// dirty volumes, state file) so raft may compact the log up to the snapshot
// index, and returns an FSMSnapshot holding only the small state record:
// applied index, volume metadata and session table. Volume data is never
// copied; the SnapshotStore streams it from the live volumes when a follower
// needs it (see DESIGN.md, "Fuzzy snapshots").
//
// It fails in the failed state, so the log is never compacted past a
// failure, and while a volume is broken (its metadata is unknown).
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	if err := f.failure(); err != nil {
		return nil, fmt.Errorf("fsm: snapshot refused: %w", err)
	}
	if broken := f.store.Broken(); len(broken) > 0 {
		return nil, fmt.Errorf("fsm: snapshot refused: %d broken volumes in the store", len(broken))
	}
	if err := f.checkpoint(); err != nil {
		return nil, fmt.Errorf("fsm: snapshot: %w", f.fail(f.applied, err))
	}
	img := &stateImage{Applied: f.applied, Volumes: f.store.List(), Sessions: sessionList(f.sessions), Leases: leaseList(f.leases), ClusterID: f.clusterID}
	return &fsmSnapshot{stream: encodeStateStream(img)}, nil
}

// fsmSnapshot is a state stream captured by Snapshot. Persist touches only
// this immutable byte slice, so it can run concurrently with Apply.
type fsmSnapshot struct {
	stream []byte
}

// Persist writes the state stream to sink and closes it (cancels it on
// error).
func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	if _, err := sink.Write(s.stream); err != nil {
		sink.Cancel()
		return fmt.Errorf("fsm: persist snapshot: %w", err)
	}
	return sink.Close()
}

// Release implements raft.FSMSnapshot.
func (s *fsmSnapshot) Release() {}

// Restore implements raft.FSM: it installs a full snapshot stream (as
// produced by the SnapshotStore's Open) with bounded memory. Volumes not in
// the snapshot are deleted, missing ones created, sizes reconciled; then
// every chunk is compared with the local bytes and written only if it
// differs (zero runs are trimmed only where the local range is not already
// zeros). Finally all volumes are synced and the state file records the
// snapshot's applied index and session table.
//
// A thin stream (version 2, planned against this site's CatchUpBase) leaves
// the bytes of its keep records as they are (Stats.RestoreBytesKept); it is
// refused before anything changes unless this site can honour them
// (checkThin).
//
// A stream whose header or state record is bad is rejected before anything
// changes. A failure after volumes started changing (corrupt data record,
// I/O error) leaves the FSM in the failed state, and the state file marked
// "restoring" with the base index (see below), until a Restore succeeds:
// the volumes are then neither the old state nor the new one, so no entry
// may be applied.
func (f *FSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	// Volumes change until the new applied index is set: no AtBoundary
	// callback may run in between.
	f.boundary.Lock()
	defer f.boundary.Unlock()
	f.mu.Lock()
	closed := f.closed
	total, totalFor := f.restoreSize.size, f.restoreSize.index // recorded by the snapshot store's Open
	f.restoreSize.index, f.restoreSize.size = 0, 0
	base := f.base
	// What the volumes may already reflect beyond the applied index: kept
	// bytes (a thin stream's keep records) carry it over.
	local := max(f.fuzzyUntil, f.applied+1)
	f.mu.Unlock()
	if closed {
		return ErrClosed
	}
	// The state file is about to change: no background checkpoint may
	// write it afterwards.
	if err := f.reapCheckpoint(true); err != nil {
		f.log.Warn("fsm: background checkpoint failed before a restore; the restore replaces its state", "err", err)
	}
	owner := new(int)
	f.startProgress(owner, "restoring", total)
	defer f.endProgress(owner)
	rr := newRecordReader(&progressReader{r: rc, done: &f.prog.done})
	h, img, err := rr.readPrologue()
	if err != nil {
		return fmt.Errorf("fsm: restore: %w", err)
	}
	if h.Kind != kindFull {
		return fmt.Errorf("fsm: restore: %w", corruptf("stream kind %d is not a full snapshot", h.Kind))
	}
	if totalFor != 0 && totalFor != h.Index {
		f.mu.Lock()
		f.prog.total = 0 // the size was recorded for another snapshot
		f.mu.Unlock()
	}
	if h.Base != nil {
		// Keep records rely on this site's bytes: refused before anything
		// changes if they cannot be honoured here.
		if err := f.checkThin(h, img, base); err != nil {
			if f.onThinRefused != nil {
				f.onThinRefused(h.Index)
			}
			return fmt.Errorf("fsm: restore: %w", err)
		}
	}
	f.log.Info("fsm: restoring snapshot", "snapshot_index", h.Index, "applied", img.Applied,
		"volumes", len(img.Volumes), "sessions", len(img.Sessions), "thin", h.Base != nil)

	// From here on the volumes change: record that first. The marker's
	// index is this site's base while the install is unfinished
	// (CatchUpBase): it stays the old base when the snapshot is ahead of
	// it and no volume is broken, because then whatever part of the image
	// lands holds values of the snapshot's index or later, and a volume the
	// reconcile creates is of an incarnation created after the base. Else
	// 0: the volumes may end up holding values older than the base.
	marker := base
	if h.Index <= base || len(f.store.Broken()) > 0 {
		marker = 0
	}
	if err := writeStateFile(f.stateDir, &stateImage{Applied: marker, Restoring: true, FuzzyUntil: local, ClusterID: f.clusterID}); err != nil {
		return fmt.Errorf("fsm: restore: %w", err)
	}
	f.setBase(marker, false)
	f.marks.invalidate()
	f.restoring = true
	clear(f.dirty)
	if h.Base == nil {
		local = 0 // every byte is rewritten from the image
	}
	r, err := f.installImage(rr, h, img, local)
	if err != nil {
		f.mu.Lock()
		f.failed = fmt.Errorf("%w: snapshot restore failed: %v", ErrFailed, err)
		f.notifyLocked()
		f.mu.Unlock()
		f.log.Error("fsm: snapshot restore failed; not applying entries until a snapshot is installed", "err", err)
		return fmt.Errorf("fsm: restore: %w", err)
	}

	f.restoring = false
	f.sessions = sessionMap(img.Sessions)
	leases := leaseMap(r.state.Leases)
	f.checkpointed = r.state.Applied
	f.pendingBytes = 0
	f.pendingSince = time.Time{}
	f.marks.reset(max(r.state.Applied, r.state.FuzzyUntil), f.store.List())
	f.mu.Lock()
	f.applied = r.state.Applied
	f.base = r.state.Applied
	f.fuzzyUntil = r.state.FuzzyUntil
	f.failed = nil
	f.leases = leases
	f.clusterID = img.ClusterID
	f.stats.Restores++
	f.stats.Checkpoints++
	f.stats.CheckpointIndex = r.state.Applied
	f.stats.RestoreBytesWritten += r.written
	f.stats.RestoreBytesSkipped += r.skipped
	f.stats.RestoreBytesKept += r.kept
	f.stats.Sessions = len(f.sessions)
	f.notifyLocked()
	f.mu.Unlock()
	f.log.Info("fsm: snapshot restored", "applied", r.state.Applied, "fuzzy_until", r.state.FuzzyUntil,
		"bytes_written", r.written, "bytes_skipped", r.skipped, "bytes_kept", r.kept)
	return nil
}

// installImage reconciles the volumes with img, applies the image records
// of rr, syncs the volumes and writes the new state file: applied index
// max(img.Applied, h.Index) (entries in between are not commands), the
// snapshot's sessions, and as fuzzy-until index the larger of the end
// record's and local (what kept bytes may already reflect; 0 for a stream
// without keep records).
func (f *FSM) installImage(rr *recordReader, h streamHeader, img *stateImage, local uint64) (*restorer, error) {
	vols, err := f.reconcileVolumes(img)
	if err != nil {
		return nil, err
	}
	r := &restorer{vols: vols, local: make([]byte, streamChunk), zeros: make([]byte, streamChunk)}
	if err := rr.readImage(h, img, r); err != nil {
		return nil, err
	}
	end, err := rr.readEpilogue()
	if err != nil {
		return nil, err
	}
	for _, v := range vols {
		if err := v.Sync(); err != nil {
			return nil, err
		}
	}
	r.state = stateImage{Applied: max(img.Applied, h.Index), Sessions: img.Sessions, Leases: existingLeases(img), ClusterID: img.ClusterID}
	if fuzzy := max(end.FuzzyUntil, local); fuzzy > r.state.Applied {
		r.state.FuzzyUntil = fuzzy
	}
	if err := writeStateFile(f.stateDir, &r.state); err != nil {
		return nil, err
	}
	return r, nil
}

// reconcileVolumes makes the store's volume set and metadata equal to
// img.Volumes: it deletes volumes that are not in the snapshot, are broken,
// or are a different incarnation (see sameIncarnation),
// creates missing ones and resizes the rest. It returns the volumes in
// img.Volumes order.
func (f *FSM) reconcileVolumes(img *stateImage) ([]*volume.Volume, error) {
	want := make(map[string]volume.Meta, len(img.Volumes))
	for _, m := range img.Volumes {
		want[m.Name] = m
	}
	for _, m := range f.store.List() {
		w, ok := want[m.Name]
		if ok && sameIncarnation(w, m) {
			continue
		}
		if err := f.store.Delete(m.Name); err != nil {
			return nil, err
		}
	}
	for name := range f.store.Broken() {
		if err := f.store.Delete(name); err != nil {
			return nil, err
		}
	}
	vols := make([]*volume.Volume, len(img.Volumes))
	for i, m := range img.Volumes {
		v, err := f.store.Get(m.Name)
		switch {
		case errors.Is(err, volume.ErrNotFound):
			v, err = f.store.Create(m)
		case err == nil && v.Size() != m.Size:
			err = f.store.Resize(m.Name, m.Size)
		}
		if err != nil {
			return nil, err
		}
		vols[i] = v
	}
	return vols, nil
}

// restorer writes a snapshot image into the volumes, skipping what is
// already identical. It implements imageSink.
type restorer struct {
	vols    []*volume.Volume
	cur     *volume.Volume
	local   []byte // read buffer for the local bytes
	zeros   []byte // all zeros, never written
	written int64
	skipped int64
	kept    int64
	state   stateImage // the state file written at the end
}

// keep leaves [off, off+n) as it is (checkThin checked, before anything
// changed, that this site holds the volume in the snapshot's incarnation
// and at least this far).
func (r *restorer) keep(_, n int64) error {
	r.kept += n
	return nil
}

func (r *restorer) volume(i int, _ volume.Meta) error {
	r.cur = r.vols[i]
	return nil
}

// data makes [off, off+len(p)) equal p. A local chunk with damaged
// blocks (failed checksums) differs: it is written whole, which repairs
// them.
func (r *restorer) data(off int64, p []byte) error {
	local := r.local[:len(p)]
	_, err := r.cur.ReadAt(local, off)
	damaged := errors.Is(err, volume.ErrDamaged)
	if err != nil && !damaged {
		return err
	}
	n := int64(len(p))
	if !damaged && bytes.Equal(local, p) {
		r.skipped += n
		return nil
	}
	if bytes.Equal(p, r.zeros[:len(p)]) {
		err = r.cur.Trim(off, n)
	} else {
		_, err = r.cur.WriteAt(p, off)
	}
	if err != nil {
		return err
	}
	r.written += n
	return nil
}

// zero makes [off, off+n) read as zeros, trimming only allocated pieces
// that are not zeros already.
func (r *restorer) zero(off, n int64) error {
	exts, err := r.cur.BlockStatus(off, n)
	if err != nil {
		return err
	}
	for _, e := range exts {
		if e.Hole {
			r.skipped += e.Length
			continue
		}
		for pos, end := e.Offset, e.Offset+e.Length; pos < end; {
			k := min(int64(streamChunk), end-pos)
			local := r.local[:k]
			_, err := r.cur.ReadAt(local, pos)
			damaged := errors.Is(err, volume.ErrDamaged)
			if err != nil && !damaged {
				return err
			}
			if !damaged && bytes.Equal(local, r.zeros[:k]) {
				r.skipped += k
			} else {
				if err := r.cur.Trim(pos, k); err != nil {
					return err
				}
				r.written += k
			}
			pos += k
		}
	}
	return nil
}

// fullStream produces the full snapshot stream of a local snapshot from the
// live volumes, one record at a time (memory: one chunk plus one bit per
// chunk). Which chunks are sent as zero runs is decided when the stream is
// opened (BlockStatus), so its size is known up front, as raft requires.
// The bytes are read from the volumes as they are when each record is
// produced; DESIGN.md explains why this fuzzy image is correct.
type fullStream struct {
	header streamHeader
	state  []byte // state record payload
	vols   []volumeLayout
	bound  func() uint64 // the source FSM's fuzzyBound
	marks  *writeMap     // the source FSM's last-write map (SetBase); nil: none
	plan   CatchUpPlan   // record counts (layout)
	reason string        // why SetBase keeps nothing

	size    int64 // total stream length
	emitted int64

	stage   int // stagePrologue, stageVolumes, stageEnd, stageDone
	vi      int // current volume
	started bool
	chunk   int64 // next chunk of the current volume
	records uint64

	rec []byte // the record being emitted
	out []byte // unread part of rec
}

const (
	stagePrologue = iota
	stageVolumes
	stageEnd
	stageDone
)

// volumeLayout is one volume of a fullStream.
type volumeLayout struct {
	meta    volume.Meta
	v       *volume.Volume // nil: deleted since the snapshot, all zeros
	chunks  int64
	data    []uint64 // bit per chunk: 1 = send data, 0 = part of a zero run
	keep    []uint64 // bit per chunk: 1 = part of a keep run (SetBase); nil: none
	keepEnd int64    // where the last kept chunk ends (0: none)
}

func (l *volumeLayout) isData(c int64) bool { return l.data[c/64]&(1<<(c%64)) != 0 }

func (l *volumeLayout) isKeep(c int64) bool { return l.keep != nil && l.keep[c/64]&(1<<(c%64)) != 0 }

// run returns the record starting at chunk c: its type (keep run, data
// chunk or zero run), its byte length and the chunk after it.
func (l *volumeLayout) run(c int64) (typ byte, length int64, next int64) {
	start := c * streamChunk
	switch {
	case l.isKeep(c):
		next = c + 1
		for next < l.chunks && l.isKeep(next) {
			next++
		}
		return recKeep, min(next*streamChunk, l.meta.Size) - start, next
	case l.isData(c):
		return recData, min(streamChunk, l.meta.Size-start), c + 1
	}
	next = c + 1
	for next < l.chunks && !l.isData(next) && !l.isKeep(next) {
		next++
	}
	return recZero, min(next*streamChunk, l.meta.Size) - start, next
}

// layoutWindow is the range of one BlockStatus call while opening a stream.
const layoutWindow = 64 << 20

// newFullStream prepares the full stream for a local snapshot with raft
// index index and state img, reading the volumes of store.
func newFullStream(store *volume.Store, index uint64, img *stateImage, bound func() uint64) (*fullStream, error) {
	s := &fullStream{
		header: streamHeader{Version: streamVersionV1, Kind: kindFull, Index: index},
		state:  encodeState(img),
		bound:  bound,
		rec:    make([]byte, 0, recOverhead+streamChunk),
		reason: "planned without a base",
	}
	for _, m := range img.Volumes {
		l, err := layoutVolume(store, m)
		if err != nil {
			return nil, err
		}
		s.vols = append(s.vols, l)
	}
	s.layout()
	return s, nil
}

// layout computes the stream's exact length and record counts from the
// volume layouts and the header.
func (s *fullStream) layout() {
	p := CatchUpPlan{}
	size := int64(len(streamMagic)) + recOverhead + headerPayload + recOverhead + int64(len(s.state)) + recOverhead + endPayload
	if s.header.Base != nil {
		size += recOverhead + int64(len(baseRecordPayload(s.header.Base)))
	}
	for i := range s.vols {
		l := &s.vols[i]
		size += recOverhead + int64(len(volumeRecordPayload(i, l.meta.Name)))
		for c := int64(0); c < l.chunks; {
			typ, n, next := l.run(c)
			switch typ {
			case recData:
				size += recOverhead + n
				p.DataChunks++
			case recZero:
				size += recOverhead + zeroPayload
				p.ZeroRuns++
			case recKeep:
				size += recOverhead + keepPayload
				p.KeptRuns++
				p.KeptBytes += n
			}
			c = next
		}
	}
	p.Size = size
	s.size, s.plan = size, p
}

// layoutVolume classifies the chunks of m's live volume: a chunk is sent as
// data unless BlockStatus reports it entirely a hole (or it lies beyond the
// live volume, or the volume no longer exists).
func layoutVolume(store *volume.Store, m volume.Meta) (volumeLayout, error) {
	l := volumeLayout{meta: m, chunks: (m.Size + streamChunk - 1) / streamChunk}
	l.data = make([]uint64, (l.chunks+63)/64)
	v, err := store.Get(m.Name)
	if errors.Is(err, volume.ErrNotFound) {
		return l, nil
	}
	if err != nil {
		return l, fmt.Errorf("snapshot volume %q: %w", m.Name, err)
	}
	l.v = v
	limit := min(m.Size, v.Size())
	for off := int64(0); off < limit; off += layoutWindow {
		exts, err := v.BlockStatus(off, min(layoutWindow, limit-off))
		if errors.Is(err, volume.ErrClosed) || errors.Is(err, volume.ErrOutOfRange) {
			break // deleted or shrunk meanwhile: the rest reads as zeros
		}
		if err != nil {
			return l, fmt.Errorf("snapshot volume %q: %w", m.Name, err)
		}
		for _, e := range exts {
			if e.Hole {
				continue
			}
			last := min(e.Offset+e.Length, m.Size) - 1
			for c := e.Offset / streamChunk; c <= last/streamChunk; c++ {
				l.data[c/64] |= 1 << (c % 64)
			}
		}
	}
	return l, nil
}

// Size returns the exact length of the stream.
func (s *fullStream) Size() int64 { return s.size }

// Read implements io.Reader.
func (s *fullStream) Read(p []byte) (int, error) {
	for len(s.out) == 0 {
		if s.stage == stageDone {
			if s.emitted != s.size {
				return 0, fmt.Errorf("fsm: snapshot stream is %d bytes, announced %d", s.emitted, s.size)
			}
			return 0, io.EOF
		}
		if err := s.fill(); err != nil {
			return 0, err
		}
	}
	n := copy(p, s.out)
	s.out = s.out[n:]
	s.emitted += int64(n)
	return n, nil
}

// Close implements io.Closer.
func (s *fullStream) Close() error {
	s.stage, s.out = stageDone, nil
	s.emitted = s.size
	return nil
}

// emit makes payload the next record.
func (s *fullStream) emit(typ byte, payload []byte) {
	s.rec = appendRecord(s.rec[:0], typ, payload)
	s.out = s.rec
	s.records++
}

// fill produces the next record(s) into s.out.
func (s *fullStream) fill() error {
	switch s.stage {
	case stagePrologue:
		b := make([]byte, 0, len(streamMagic)+2*recOverhead+headerPayload+len(s.state))
		b = append(b, streamMagic...)
		b = appendRecord(b, recHeader, headerRecordPayload(s.header))
		b = appendRecord(b, recState, s.state)
		s.records = 2
		if s.header.Base != nil {
			b = appendRecord(b, recBase, baseRecordPayload(s.header.Base))
			s.records++
		}
		s.out, s.stage = b, stageVolumes
		return nil
	case stageVolumes:
		if s.vi == len(s.vols) {
			s.stage = stageEnd
			return nil
		}
		l := &s.vols[s.vi]
		if !s.started {
			s.emit(recVolume, volumeRecordPayload(s.vi, l.meta.Name))
			s.started = true
			return nil
		}
		if s.chunk == l.chunks {
			s.vi, s.started, s.chunk = s.vi+1, false, 0
			return nil
		}
		typ, n, next := l.run(s.chunk)
		if typ != recData {
			s.emit(typ, binary.LittleEndian.AppendUint64(nil, uint64(n)))
		} else {
			// Build the record in place around the volume bytes.
			b := s.rec[:5+n]
			b[0] = recData
			binary.LittleEndian.PutUint32(b[1:], uint32(n))
			if err := readLive(l.v, s.chunk*streamChunk, b[5:]); err != nil {
				return fmt.Errorf("fsm: snapshot volume %q: %w", l.meta.Name, err)
			}
			s.rec = binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
			s.out = s.rec
			s.records++
		}
		s.chunk = next
		return nil
	case stageEnd:
		// Everything read so far reflects entries below fuzzyBound():
		// the one being applied now at most, or, while the source
		// replays after a restart (or is still below a restored image's
		// bound), the highest index its volumes may already reflect.
		s.emit(recEnd, endRecordPayload(streamEnd{Records: s.records, FuzzyUntil: s.bound()}))
		s.stage = stageDone
		return nil
	}
	return nil
}

// readLive fills p with the live bytes of v at off; bytes beyond the
// volume's current size, or of a deleted volume (nil or closed), are zeros.
func readLive(v *volume.Volume, off int64, p []byte) error {
	if v == nil {
		clear(p)
		return nil
	}
	for attempt := 0; ; attempt++ {
		n := max(0, min(v.Size()-off, int64(len(p))))
		clear(p[n:])
		if n == 0 {
			return nil
		}
		_, err := v.ReadAt(p[:n], off)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, volume.ErrClosed):
			clear(p)
			return nil
		case errors.Is(err, volume.ErrOutOfRange) && attempt < 3:
			continue // shrunk between Size and ReadAt
		}
		return err
	}
}
