package fsm

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/robib/robib/volume"
)

// Catch-up proportional to what changed (DESIGN.md has the argument).
//
// Every site keeps a last-write map: per volume and per streamChunk, the
// log index of the last entry that touched the chunk. A lagging site
// offers its durable base (CatchUpBase: its checkpointed index and its
// volumes' incarnations); the leader's full stream (SetBase) then sends a
// keep record instead of the bytes of every chunk that no entry after the
// base touched, and the receiver keeps its own bytes there.

// CatchUpBase is what a site that is about to receive a snapshot already
// holds: every byte of its volumes (as listed) holds its replicated value
// at Index, or a value some entry after Index gave it. Index 0 with no
// volumes means "no base": the sender streams everything.
type CatchUpBase struct {
	// Index is the site's durable base: the applied index of its state
	// file (writes applied after it may be lost in a crash, so the applied
	// index would not do). While an interrupted install is unfinished it
	// is the index the install started from, or 0 if that install could
	// have left older bytes behind (see Restore).
	Index uint64
	// Volumes are the incarnations (name, creation time, block size,
	// sync mode) and sizes of the site's volumes.
	Volumes []volume.Meta
}

// CatchUpBase returns this site's base for a catch-up (safe from any
// goroutine). A site with broken volumes, or a closed one, offers none.
func (f *FSM) CatchUpBase() CatchUpBase {
	f.mu.Lock()
	index, closed := f.base, f.closed
	f.mu.Unlock()
	if closed || len(f.store.Broken()) > 0 {
		return CatchUpBase{}
	}
	// Read after the index: a volume created, resized or deleted since is
	// listed as it is now, which the sender's plan tolerates (DESIGN.md).
	return CatchUpBase{Index: index, Volumes: f.store.List()}
}

// setBase records the applied index of the state file just written (FSM
// goroutine, or the background checkpoint with raise set).
func (f *FSM) setBase(index uint64, raise bool) {
	f.mu.Lock()
	if !raise || index > f.base {
		f.base = index
	}
	f.mu.Unlock()
}

// CatchUpPlan describes what a full stream sends: returned by the stream's
// Plan method (after SetBase, or for a stream planned without a base).
type CatchUpPlan struct {
	Base       uint64 // the base index the stream was planned against (0: none)
	Size       int64  // the stream's exact length
	DataChunks int64  // data records: chunks read from the volumes and sent
	ZeroRuns   int64  // zero-run records
	KeptBytes  int64  // volume bytes the receiver keeps (keep records)
	KeptRuns   int64  // keep records
	// Reason says why nothing is kept, when nothing is ("" otherwise).
	Reason string
}

// CatchUpProgress is a snapshot install in progress at this site (Stats).
// Phase is "" when none runs.
type CatchUpProgress struct {
	// Phase: "receiving" (the leader's stream is being stored), or
	// "restoring" (the stored stream is being installed).
	Phase   string
	Started time.Time
	Done    int64 // stream bytes received or restored so far
	Total   int64 // the stream's length; 0 while unknown (receiving)
}

// progress tracks the install in progress for Stats. phase, started and
// total are guarded by FSM.mu; done is atomic (updated per read/write).
type progress struct {
	phase   string
	started time.Time
	total   int64
	done    atomic.Int64
	owner   any // who started the phase (a sink, or Restore)
}

// startProgress begins a phase owned by owner.
func (f *FSM) startProgress(owner any, phase string, total int64) {
	f.mu.Lock()
	f.prog.phase, f.prog.started, f.prog.total, f.prog.owner = phase, time.Now(), total, owner
	f.prog.done.Store(0)
	f.mu.Unlock()
}

// endProgress ends the phase if owner still owns it.
func (f *FSM) endProgress(owner any) {
	f.mu.Lock()
	if f.prog.owner == owner {
		f.prog.phase, f.prog.started, f.prog.total, f.prog.owner = "", time.Time{}, 0, nil
		f.prog.done.Store(0)
	}
	f.mu.Unlock()
}

// progressReader counts the bytes read through it as restore progress.
type progressReader struct {
	r    interface{ Read([]byte) (int, error) }
	done *atomic.Int64
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.done.Add(int64(n))
	return n, err
}

// Last-write map.

// notTracked is writeMap.since while the map is not usable (a restore is
// replacing the volumes).
const notTracked = ^uint64(0)

// Pages of the per-volume map: a page of 1024 chunks (1 GiB of volume) is
// allocated only when an entry touches part of it; until then one value
// stands for all its chunks. A 1 PiB sparse volume costs 16 MiB, not 8 GiB.
const (
	markPageShift  = 10
	markPageChunks = 1 << markPageShift
)

// writeMap is the last-write map. The FSM goroutine updates it in the apply
// path (one lock per command); a stream's SetBase reads it. mu is a leaf.
type writeMap struct {
	mu sync.Mutex
	// since: the map is complete for every entry after since: each chunk
	// an entry with index > since touched (ops, resize regions, creates)
	// has a mark >= that index. notTracked: unusable.
	since uint64
	vols  map[string]*chunkMarks
}

// chunkMarks is one volume's marks: fill[p] stands for every chunk of page
// p while pages[p] is nil.
type chunkMarks struct {
	chunks int64
	fill   []uint64
	pages  []*[markPageChunks]uint64
}

func chunksOf(size int64) int64 { return (size + streamChunk - 1) / streamChunk }

func newChunkMarks(size int64, fill uint64) *chunkMarks {
	m := &chunkMarks{}
	m.resize(chunksOf(size))
	for i := range m.fill {
		m.fill[i] = fill
	}
	return m
}

// resize makes room for chunks chunks; chunks added are marked 0 (callers
// mark a grown region themselves).
func (m *chunkMarks) resize(chunks int64) {
	old := m.chunks
	np := int((chunks + markPageChunks - 1) >> markPageShift)
	if np <= len(m.fill) {
		clear(m.pages[np:]) // let the collector have them
		m.fill, m.pages = m.fill[:np], m.pages[:np]
	} else {
		m.fill = append(m.fill, make([]uint64, np-len(m.fill))...)
		m.pages = append(m.pages, make([]*[markPageChunks]uint64, np-len(m.pages))...)
	}
	m.chunks = chunks
	if chunks > old {
		m.mark(old, chunks, 0) // the old last page may hold marks past its end
	}
}

func (m *chunkMarks) get(c int64) uint64 {
	p := c >> markPageShift
	if pg := m.pages[p]; pg != nil {
		return pg[c&(markPageChunks-1)]
	}
	return m.fill[p]
}

// mark sets the chunks [from, to) (clipped to the volume) to index.
func (m *chunkMarks) mark(from, to int64, index uint64) {
	from, to = max(from, 0), min(to, m.chunks)
	for from < to {
		p := from >> markPageShift
		start := p << markPageShift
		end := min(to, start+markPageChunks)
		if from == start && end >= min(start+markPageChunks, m.chunks) {
			m.fill[p], m.pages[p] = index, nil // the whole page
		} else {
			pg := m.pages[p]
			if pg == nil {
				pg = new([markPageChunks]uint64)
				for i := range pg {
					pg[i] = m.fill[p]
				}
				m.pages[p] = pg
			}
			for c := from; c < end; c++ {
				pg[c-start] = index
			}
		}
		from = end
	}
}

// reset starts tracking afresh: complete for entries after since, every
// chunk of metas unmarked (New, Restore).
func (w *writeMap) reset(since uint64, metas []volume.Meta) {
	vols := make(map[string]*chunkMarks, len(metas))
	for _, m := range metas {
		vols[m.Name] = newChunkMarks(m.Size, 0)
	}
	w.mu.Lock()
	w.since, w.vols = since, vols
	w.mu.Unlock()
}

// invalidate makes the map unusable until the next reset.
func (w *writeMap) invalidate() {
	w.mu.Lock()
	w.since, w.vols = notTracked, map[string]*chunkMarks{}
	w.mu.Unlock()
}

// volumeLocked returns name's marks; a volume the map does not know (it
// should know every volume) is marked touched by index throughout.
func (w *writeMap) volumeLocked(name string, size int64, index uint64) *chunkMarks {
	m := w.vols[name]
	if m == nil {
		m = newChunkMarks(size, index)
		w.vols[name] = m
	}
	return m
}

// markOps records the ops of a batch at index (before they are applied:
// a batch that fails halfway is marked whole).
func (w *writeMap) markOps(name string, size int64, ops []Op, index uint64) {
	w.mu.Lock()
	m := w.volumeLocked(name, size, index)
	for i := range ops {
		if op := &ops[i]; op.Len > 0 {
			m.mark(op.Off/streamChunk, (op.Off+op.Len-1)/streamChunk+1, index)
		}
	}
	w.mu.Unlock()
}

// markCreate records that the whole volume was created (or found already
// created, by a replayed or repeated Create) at index.
func (w *writeMap) markCreate(name string, size int64, index uint64) {
	w.mu.Lock()
	w.vols[name] = newChunkMarks(size, index)
	w.mu.Unlock()
}

// markResize records the region a resize from old to new changed,
// [min(old, new), max(old, new)), at index.
func (w *writeMap) markResize(name string, old, new int64, index uint64) {
	w.mu.Lock()
	m := w.volumeLocked(name, new, index)
	m.resize(chunksOf(new))
	m.mark(min(old, new)/streamChunk, chunksOf(max(old, new)), index)
	w.mu.Unlock()
}

// drop forgets a deleted volume.
func (w *writeMap) drop(name string) {
	w.mu.Lock()
	delete(w.vols, name)
	w.mu.Unlock()
}

// SetBase re-plans the stream for a receiver whose base is b: every chunk
// of a volume that b holds in the same incarnation, that lies within b's
// size of it, and that no entry after b.Index touched, becomes part of a
// keep record (runs of kept chunks merge into one record). It needs the
// source's last-write map to be complete since b.Index at the latest and
// b.Index below the snapshot index; otherwise nothing is kept and the
// stream stays the full version 1 stream. It returns the stream's new exact
// length. Call it before the first Read (it fails afterwards); it may be
// called again to re-plan. Plan says what was planned.
func (s *fullStream) SetBase(b CatchUpBase) (int64, error) {
	if s.emitted > 0 || s.stage != stagePrologue {
		return s.size, fmt.Errorf("fsm: SetBase on a snapshot stream that already started")
	}
	for i := range s.vols {
		l := &s.vols[i]
		l.keep, l.keepEnd = nil, 0
	}
	s.header.Version, s.header.Base = streamVersionV1, nil
	s.reason = s.planKeeps(b)
	if s.reason == "" {
		base := &streamBase{Index: b.Index, KeepEnd: make([]int64, len(s.vols))}
		for i := range s.vols {
			base.KeepEnd[i] = s.vols[i].keepEnd
		}
		s.header.Version, s.header.Base = streamVersion, base
	}
	s.layout()
	return s.size, nil
}

// planKeeps sets the keep bits; it returns why nothing is kept, or "".
func (s *fullStream) planKeeps(b CatchUpBase) string {
	if b.Index == 0 && len(b.Volumes) == 0 {
		return "the receiver offers no base"
	}
	if b.Index >= s.header.Index {
		return fmt.Sprintf("the receiver's base %d is not below the snapshot index %d", b.Index, s.header.Index)
	}
	if s.marks == nil {
		return "no last-write map"
	}
	base := make(map[string]volume.Meta, len(b.Volumes))
	for _, m := range b.Volumes {
		base[m.Name] = m
	}
	w := s.marks
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.since == notTracked {
		return "the last-write map is being rebuilt (a restore is running)"
	}
	if b.Index < w.since {
		return fmt.Sprintf("the receiver's base %d is older than this site's last-write map (complete after %d)", b.Index, w.since)
	}
	kept := false
	for i := range s.vols {
		l := &s.vols[i]
		bm, ok := base[l.meta.Name]
		m := w.vols[l.meta.Name]
		if !ok || m == nil || !sameIncarnation(bm, l.meta) {
			continue
		}
		for c := int64(0); c < l.chunks && c < m.chunks; c++ {
			end := min((c+1)*streamChunk, l.meta.Size)
			if end > bm.Size {
				break
			}
			if m.get(c) > b.Index {
				continue
			}
			if l.keep == nil {
				l.keep = make([]uint64, (l.chunks+63)/64)
			}
			l.keep[c/64] |= 1 << (c % 64)
			l.keepEnd = end
			kept = true
		}
	}
	if !kept {
		return "no chunk is unchanged since the receiver's base"
	}
	return ""
}

// Plan reports what the stream sends.
func (s *fullStream) Plan() CatchUpPlan {
	p := s.plan
	p.Reason = s.reason
	if s.header.Base != nil {
		p.Base = s.header.Base.Index
	}
	return p
}

// checkThin checks, before anything changes, that the keep records of a
// version 2 stream can be honoured here: the stream was planned against a
// base this site's bytes still satisfy (at or below its durable base),
// that base is below the snapshot index (Restore's marker keeps it then),
// no volume is broken, and every volume with keep records is held here in
// the snapshot's incarnation and at least up to its keep end. A failure
// is a stream this site cannot install (it wraps errCorruptStream); the
// sender plans again or sends everything.
func (f *FSM) checkThin(h streamHeader, img *stateImage, base uint64) error {
	switch {
	case h.Base.Index > base:
		return corruptf("thin stream planned against base index %d, this site's durable base is %d", h.Base.Index, base)
	case base >= h.Index:
		return corruptf("thin stream for snapshot index %d, this site's durable base %d is not below it", h.Index, base)
	case len(f.store.Broken()) > 0:
		return corruptf("thin stream, and this site has %d broken volumes", len(f.store.Broken()))
	}
	for i, m := range img.Volumes {
		end := h.Base.KeepEnd[i]
		if end == 0 {
			continue
		}
		v, err := f.store.Get(m.Name)
		if err != nil {
			return corruptf("thin stream keeps bytes of volume %q, which this site cannot read: %v", m.Name, err)
		}
		lm := v.Meta()
		if !sameIncarnation(lm, m) {
			return corruptf("thin stream keeps bytes of volume %q, which is another incarnation here "+
				"(created %d, block size %d, sync %v; the snapshot's: created %d, block size %d, sync %v)",
				m.Name, lm.Created.UnixNano(), lm.BlockSize, lm.SyncWrites, m.Created.UnixNano(), m.BlockSize, m.SyncWrites)
		}
		if lm.Size < end {
			return corruptf("thin stream keeps [0, %d) of volume %q, which has %d bytes here", end, m.Name, lm.Size)
		}
	}
	return nil
}
