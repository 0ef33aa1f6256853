package cluster

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"

	"github.com/robib/robib/volume"
)

// Repair from peers (DESIGN.md, "Repair from peers"): a site whose copy of
// a volume has damaged blocks (a failed checksum, an I/O error) reads them
// from another site at an index it has applied itself, writes them back
// (repair-on-read), and rebuilds the rest of its damaged ranges in the
// background.

// Range is a byte range of a volume, as the volume's damage API reports it.
type Range = volume.Range

// RepairBlock is the granularity of damage and repair: the volume's
// checksum block.
const RepairBlock = volume.SumBlockSize

// *volume.Volume is what the repair path repairs.
var _ RepairableVolume = (*volume.Volume)(nil)

// RepairableVolume is what the repair path needs of a local volume: the
// block checksum API of *volume.Volume (see volume/DESIGN.md). Every
// mutation of a block (a write, trim or zeroing applied by the FSM, a
// snapshot install) moves the volume's repair token past the block's
// generation; Repair writes only blocks that are damaged and untouched
// since the token it is given.
type RepairableVolume interface {
	Name() string
	Size() int64
	// ReadHealthy fills the healthy blocks of [off, off+len(p)) into p and
	// lists the damaged ones.
	ReadHealthy(p []byte, off int64) (damaged []Range, err error)
	// Damaged lists every range known to be damaged.
	Damaged() []Range
	// MarkDamaged marks a range damaged (its blocks are served and
	// repaired as if their checksums had failed).
	MarkDamaged(off, length int64) error
	// RepairToken is the volume's current write generation.
	RepairToken() uint64
	// Repair writes p at off into the blocks that are damaged and were
	// not touched by any mutation after token; still lists the damaged
	// blocks it left alone.
	Repair(p []byte, off int64, token uint64) (repaired, still []Range, err error)
	// Scrub checks every block of [off, off+length) against its checksum
	// and marks the ones that fail damaged.
	Scrub(off, length int64) (damaged []Range, err error)
}

// volumeSource looks up this site's volumes for the repair path.
type volumeSource interface {
	repairable(name string) (RepairableVolume, error)
	volumeNames() []string
}

// storeVolumes is the volume store as a volumeSource.
type storeVolumes struct{ store *volume.Store }

func (s storeVolumes) repairable(name string) (RepairableVolume, error) {
	v, err := s.store.Get(name)
	if err != nil {
		return nil, err
	}
	return v, nil
}

func (s storeVolumes) volumeNames() []string {
	var out []string
	for _, m := range s.store.List() {
		out = append(out, m.Name)
	}
	return out
}

// healFSM is what the repair path needs of the FSM.
type healFSM interface {
	AtBoundary(fn func(applied uint64))
	AppliedIndex() uint64
	WaitApplied(ctx context.Context, index uint64) error
	CopyExact() bool
}

// readSource is a site the repair path may read from.
type readSource struct {
	name, api string
}

// sourceLister lists the sites to read damaged ranges from, in order of
// preference.
type sourceLister interface {
	readSources(allowed []string) []readSource
}

// peerReader reads a range of another site's copy (rpcClient.readRange).
type peerReader interface {
	readRange(ctx context.Context, addr, vol string, off, length int64, minIndex uint64) ([]byte, uint64, error)
}

// voterSources lists the voters other than self that gossip has an API
// address for: the leader first (it is never behind the commit index it
// announces), then the others by name.
type voterSources struct {
	self   string
	config configReader
	leader leadership
	book   addressBook
}

func (s voterSources) readSources(allowed []string) []readSource {
	fut := s.config.GetConfiguration()
	if fut.Error() != nil {
		return nil
	}
	var names []string
	for _, srv := range fut.Configuration().Servers {
		name := string(srv.ID)
		if srv.Suffrage != raft.Voter || name == s.self || (allowed != nil && !slices.Contains(allowed, name)) {
			continue
		}
		names = append(names, name)
	}
	slices.Sort(names)
	if l := s.leader.Leader(); l != "" {
		if i := slices.Index(names, l); i > 0 {
			names = append([]string{l}, slices.Delete(names, i, i+1)...)
		}
	}
	var out []readSource
	for _, name := range names {
		if meta, ok := s.book.memberMeta(name); ok && meta.API != "" {
			out = append(out, readSource{name: name, api: meta.API})
		}
	}
	return out
}

const (
	// maxHealAttempts bounds how often one read or repair takes a fresh
	// token because blocks it fetched were written locally meanwhile.
	maxHealAttempts = 5
	// peerReadTimeout bounds one read from one peer (its wait for the
	// index, then the transfer).
	peerReadTimeout = 15 * time.Second
	// healReadTimeout bounds a read of damaged blocks (all peers, the
	// local wait, the repair).
	healReadTimeout = 30 * time.Second
	// rebuildChunk is the background rebuild's unit.
	rebuildChunk = 1 << 20
)

// Defaults of the background rebuild.
const (
	DefaultRebuildInterval = 30 * time.Second
	DefaultRebuildRate     = 64 << 20 // bytes per second
	// DefaultScrubInterval: every local volume is scrubbed once a week
	// (Ceph's deep scrub default), at the rebuild rate.
	DefaultScrubInterval = 7 * 24 * time.Hour
)

// healer reads damaged blocks of local volumes from other sites, repairs
// them, and rebuilds damaged ranges in the background. Its counters are
// atomics; lastReport (the rebuild's log-once state) is the rebuild
// goroutine's alone.
type healer struct {
	self     string
	log      *slog.Logger
	fsm      healFSM
	vols     volumeSource
	sources  sourceLister
	rpc      peerReader
	interval time.Duration // between background passes
	rate     int64         // background rebuild, bytes per second
	stop     <-chan struct{}
	kick     chan struct{} // a read found damage: run a pass now (cap 1)
	// readSlots bounds the peer reads served at once (handleRead).
	readSlots chan struct{}
	// catchUp bounds a peer read's wait for its index (peerCatchUpWait).
	catchUp time.Duration

	remoteBytes   atomic.Int64 // bytes of damaged blocks read from other sites
	repairedBytes atomic.Int64 // bytes written back into local copies
	servedRemote  atomic.Int64 // bytes served from other sites' copies without a local repair
	scrubs        atomic.Int64 // whole-volume scrubs done

	lastReport map[string]int64 // volume -> damaged bytes last logged at WARN (rebuild goroutine)

	scrubEvery time.Duration        // Config.ScrubInterval (<= 0: no periodic scrub)
	scrubbed   map[string]time.Time // volume -> end of its last scrub, or when the rebuild started (rebuild goroutine)
	scrubMu    sync.Mutex           // guards scrubSoon
	scrubSoon  map[string]bool      // volumes a read found damaged: scrub them whole at the next pass

	warnMu sync.Mutex           // guards warned
	warned map[string]time.Time // volume -> last WARN of the read path
}

// ReadAt reads [off, off+len(p)) of v, a local volume whose own read
// reported damage: healthy blocks come from the local copy, damaged ones
// from another voter's copy at an index this site has applied, and are
// written back. p then
// holds the volume's contents as of some applied index at or after the
// call started. It fails, with an error wrapping ErrNoHealthyCopy, only if
// no site could supply a damaged block; it never returns other bytes.
func (h *healer) ReadAt(ctx context.Context, v RepairableVolume, p []byte, off int64) error {
	rep, err := h.heal(ctx, v, p, off, nil, true)
	defer h.nudge() // other known damage, and what this read could not repair
	if err != nil {
		h.log.Warn("cluster: a read of a damaged range could not be served", "volume", v.Name(), "site", h.self,
			"off", off, "len", len(p), "err", err)
		return err
	}
	if len(rep.damaged) > 0 {
		// Damage seldom comes alone: look at the whole volume, not
		// only at what clients happen to read.
		h.scrubMu.Lock()
		if h.scrubSoon == nil {
			h.scrubSoon = map[string]bool{}
		}
		h.scrubSoon[v.Name()] = true
		h.scrubMu.Unlock()
	}
	if len(rep.damaged) > 0 && h.warnNow(v.Name()) {
		h.log.Warn("cluster: local copy of a volume is damaged; read its damaged blocks from other sites",
			"volume", v.Name(), "site", h.self, "ranges", formatRanges(rep.damaged, 8), "sources", rep.sources,
			"repaired_bytes", rep.repaired)
	}
	return nil
}

// readWarnEvery bounds the read path's WARN records to one per volume in
// this interval (a damaged region read block by block would flood the
// log; the rebuild's own records and status say the rest).
const readWarnEvery = 10 * time.Second

// warnNow reports whether a damaged read of vol should be logged at WARN
// now, and notes that it was.
func (h *healer) warnNow(vol string) bool {
	h.warnMu.Lock()
	defer h.warnMu.Unlock()
	if h.warned == nil {
		h.warned = map[string]time.Time{}
	}
	if t, ok := h.warned[vol]; ok && time.Since(t) < readWarnEvery {
		return false
	}
	h.warned[vol] = time.Now()
	return true
}

// healReport is what one heal call did.
type healReport struct {
	repaired int64    // bytes written back
	damaged  []Range  // the damaged block ranges its first attempt found
	sources  []string // the sites read from
}

// nudge asks the background rebuild for a pass now.
func (h *healer) nudge() {
	if h.kick == nil {
		return
	}
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// remoteCopy is a peer's bytes standing in for blocks that the local disk
// could not take (serve mode).
type remoteCopy struct {
	r    Range
	data []byte
}

// heal fills p with [off, off+len(p)) of v, fetching damaged blocks from
// peers and repairing them, and says what it did.
//
// Each attempt takes (token, A) at an FSM boundary, reads the local copy
// (healthy blocks into p, a list of damaged ones), fetches every damaged
// block-aligned range from a peer that has applied at least A, waits until
// this site has applied the index P the peer's bytes reflect, and has the
// volume repair the blocks untouched since the token. Blocks written
// locally after the token stay damaged and are fetched again with a fresh
// token. With serve, a repair the disk refuses still lets p carry the
// peer's bytes, if no mutation reached the volume since the token (checked
// at a boundary after the wait); without it the failure is returned.
// DESIGN.md, "Repair from peers", has the argument.
func (h *healer) heal(ctx context.Context, v RepairableVolume, p []byte, off int64, allowed []string, serve bool) (healReport, error) {
	end := off + int64(len(p))
	var rep healReport
	var copies []remoteCopy
	for attempt := 1; ; attempt++ {
		var token, at uint64
		h.fsm.AtBoundary(func(applied uint64) { token, at = v.RepairToken(), applied })
		damaged, err := v.ReadHealthy(p, off)
		if err != nil {
			return rep, err
		}
		todo := subtractRanges(blockSpan(damaged, off, end, v.Size()), copies)
		if attempt == 1 {
			rep.damaged = todo
		}
		if len(todo) == 0 {
			for _, c := range copies {
				copyOverlap(p, off, c.data, c.r.Off)
				h.servedRemote.Add(overlap(c.r, off, end))
			}
			return rep, nil
		}
		if attempt > maxHealAttempts {
			return rep, fmt.Errorf("%w: %s: %d bytes of [%d, +%d) still damaged after %d attempts (written locally during each repair)",
				ErrNoHealthyCopy, v.Name(), rangeBytes(todo), off, len(p), maxHealAttempts)
		}
		for _, r := range todo {
			for piece := range pieces(r, MaxPeerRead) {
				data, index, src, err := h.fetch(ctx, v.Name(), piece, at, allowed)
				if err != nil {
					return rep, err
				}
				h.remoteBytes.Add(piece.Len)
				if !slices.Contains(rep.sources, src) {
					rep.sources = append(rep.sources, src)
				}
				if err := h.fsm.WaitApplied(ctx, index); err != nil {
					return rep, fmt.Errorf("%w: %s: this site did not reach index %d of the copy read from %s: %v",
						ErrNoHealthyCopy, v.Name(), index, src, err)
				}
				fixed, _, err := v.Repair(data, piece.Off, token)
				if err != nil {
					if !serve {
						return rep, fmt.Errorf("repairing %s [%d, +%d) from %s: %w", v.Name(), piece.Off, piece.Len, src, err)
					}
					untouched := false
					h.fsm.AtBoundary(func(uint64) { untouched = v.RepairToken() == token })
					h.log.Warn("cluster: cannot repair the local copy; serving another site's bytes", "volume", v.Name(), "site", h.self,
						"off", piece.Off, "len", piece.Len, "source", src, "untouched", untouched, "err", err)
					if untouched {
						copies = append(copies, remoteCopy{r: piece, data: data})
					}
					continue
				}
				n := rangeBytes(fixed)
				rep.repaired += n
				h.repairedBytes.Add(n)
			}
		}
	}
}

// fetch reads r of vol from the first source that serves it at an index at
// or above minIndex: its bytes, that index and the source's name.
func (h *healer) fetch(ctx context.Context, vol string, r Range, minIndex uint64, allowed []string) ([]byte, uint64, string, error) {
	srcs := h.sources.readSources(allowed)
	if len(srcs) == 0 {
		return nil, 0, "", fmt.Errorf("%w: %s [%d, +%d): no other voter to read from", ErrNoHealthyCopy, vol, r.Off, r.Len)
	}
	var why []string
	for _, s := range srcs {
		pctx, cancel := context.WithTimeout(ctx, peerReadTimeout)
		data, index, err := h.rpc.readRange(pctx, s.api, vol, r.Off, r.Len, minIndex)
		cancel()
		if err == nil {
			return data, index, s.name, nil
		}
		why = append(why, s.name+": "+err.Error())
		if ctx.Err() != nil {
			break
		}
	}
	return nil, 0, "", fmt.Errorf("%w: %s [%d, +%d): %s", ErrNoHealthyCopy, vol, r.Off, r.Len, strings.Join(why, "; "))
}

// repairRange repairs the damaged blocks of [off, off+length) of v from
// the allowed sources (nil: any voter), in rebuildChunk pieces, pacing
// itself with pace (nil: no pacing). It returns the bytes repaired.
func (h *healer) repairRange(ctx context.Context, v RepairableVolume, off, length int64, allowed []string, pace func(context.Context, int64) error) (int64, error) {
	buf := make([]byte, min(length, rebuildChunk))
	var total int64
	for o := off; o < off+length; o += rebuildChunk {
		n := min(rebuildChunk, off+length-o)
		rep, err := h.heal(ctx, v, buf[:n], o, allowed, false)
		total += rep.repaired
		if err != nil {
			return total, err
		}
		if pace != nil {
			if err := pace(ctx, n); err != nil {
				return total, err
			}
		}
	}
	return total, nil
}

// run is the background rebuild: a pass every interval, and one soon
// after a read found damage, until stop.
func (h *healer) run(wg *sync.WaitGroup) {
	defer wg.Done()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-h.stop
		cancel()
	}()
	t := time.NewTicker(h.interval)
	defer t.Stop()
	for {
		select {
		case <-h.stop:
			return
		case <-t.C:
		case <-h.kick:
		}
		h.rebuildPass(ctx)
	}
}

// rebuildPass repairs every damaged range of every local volume, at most
// rate bytes per second. It logs damage at WARN (when it changed since
// the last pass) and repairs at INFO.
func (h *healer) rebuildPass(ctx context.Context) {
	if h.lastReport == nil {
		h.lastReport = map[string]int64{}
	}
	pace := pacer(h.rate)
	seen := map[string]bool{}
	for _, name := range h.vols.volumeNames() {
		v, err := h.vols.repairable(name)
		if err != nil {
			continue
		}
		if h.scrubDue(name) {
			if err := h.scrub(ctx, v, pace); err != nil {
				if ctx.Err() != nil {
					return
				}
				h.log.Warn("cluster: scrub of a local volume failed; retrying at the next pass", "volume", name, "site", h.self, "err", err)
			}
		}
		dmg := blockSpan(v.Damaged(), 0, v.Size(), v.Size())
		if len(dmg) == 0 {
			continue
		}
		seen[name] = true
		total := rangeBytes(dmg)
		if h.lastReport[name] != total {
			h.lastReport[name] = total
			h.log.Warn("cluster: local copy of a volume is damaged; serving its damaged ranges from other sites and rebuilding them",
				"volume", name, "site", h.self, "damaged_bytes", total, "ranges", formatRanges(dmg, 8))
		}
		var repaired int64
		var failed error
		for _, r := range dmg {
			n, err := h.repairRange(ctx, v, r.Off, r.Len, nil, pace)
			repaired += n
			if err != nil {
				failed = err
				break
			}
		}
		left := rangeBytes(blockSpan(v.Damaged(), 0, v.Size(), v.Size()))
		switch {
		case ctx.Err() != nil:
			return
		case failed != nil:
			h.log.Warn("cluster: rebuild of a damaged volume incomplete; retrying at the next pass",
				"volume", name, "site", h.self, "repaired_bytes", repaired, "damaged_bytes", left, "err", failed)
		case left == 0:
			delete(h.lastReport, name)
			if repaired > 0 {
				h.log.Info("cluster: damaged ranges repaired from other sites", "volume", name, "site", h.self, "repaired_bytes", repaired)
			}
		default:
			h.log.Info("cluster: damaged ranges partly repaired (the rest was written meanwhile); retrying at the next pass",
				"volume", name, "site", h.self, "repaired_bytes", repaired, "damaged_bytes", left)
		}
	}
	for name := range h.lastReport {
		if !seen[name] {
			delete(h.lastReport, name)
		}
	}
}

// scrubDue reports whether name should be scrubbed in this pass: a read
// found damage in it, or its last scrub (or the rebuild's start) is
// ScrubInterval ago. Rebuild goroutine only (scrubbed).
func (h *healer) scrubDue(name string) bool {
	h.scrubMu.Lock()
	soon := h.scrubSoon[name]
	h.scrubMu.Unlock()
	if soon {
		return true
	}
	if h.scrubbed == nil {
		h.scrubbed = map[string]time.Time{}
	}
	last, ok := h.scrubbed[name]
	if !ok {
		// Not at start-up: a restart would read every volume whole.
		h.scrubbed[name] = time.Now()
		return false
	}
	return h.scrubEvery > 0 && time.Since(last) >= h.scrubEvery
}

// scrub reads v whole, 1 MiB at a time at the pass's pace, checking every
// block against its checksum; what it finds is in v.Damaged() for the
// repair that follows.
func (h *healer) scrub(ctx context.Context, v RepairableVolume, pace func(context.Context, int64) error) error {
	name, size := v.Name(), v.Size()
	start := time.Now()
	for off := int64(0); off < size; off += scrubPiece {
		n := min(scrubPiece, size-off)
		if pace != nil {
			if err := pace(ctx, n); err != nil {
				return err
			}
		} else if err := ctx.Err(); err != nil {
			return err
		}
		if _, err := v.Scrub(off, n); err != nil {
			return fmt.Errorf("scrub [%d, +%d): %w", off, n, err)
		}
	}
	h.scrubMu.Lock()
	delete(h.scrubSoon, name)
	h.scrubMu.Unlock()
	if h.scrubbed == nil {
		h.scrubbed = map[string]time.Time{}
	}
	h.scrubbed[name] = time.Now()
	dmg := rangeBytes(blockSpan(v.Damaged(), 0, size, size))
	h.scrubs.Add(1)
	if dmg > 0 {
		h.log.Warn("cluster: scrub found damaged blocks in the local copy of a volume", "volume", name, "site", h.self,
			"damaged_bytes", dmg, "bytes", size, "took", time.Since(start).Round(time.Millisecond))
	} else {
		h.log.Info("cluster: scrub found the local copy of a volume intact", "volume", name, "site", h.self,
			"bytes", size, "took", time.Since(start).Round(time.Millisecond))
	}
	return nil
}

// scrubPiece is the unit of a scrub: the volume's region locks are held
// for one piece at a time, so writers wait at most for one 1 MiB read.
const scrubPiece = 1 << 20

// pacer returns a pace function that keeps a pass at or below rate bytes
// per second (rate <= 0: no limit).
func pacer(rate int64) func(context.Context, int64) error {
	if rate <= 0 {
		return nil
	}
	start := time.Now()
	var done int64
	return func(ctx context.Context, n int64) error {
		done += n
		due := start.Add(time.Duration(float64(done) / float64(rate) * float64(time.Second)))
		wait := time.Until(due)
		if wait <= 0 {
			return nil
		}
		t := time.NewTimer(wait)
		defer t.Stop()
		select {
		case <-t.C:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// DegradedVolume is a volume whose copy at a site has damaged blocks: the
// site reads them from other sites and rebuilds them.
type DegradedVolume struct {
	Volume       string      `json:"volume"`
	DamagedBytes int64       `json:"damaged_bytes"`
	Ranges       int         `json:"ranges"`          // damaged ranges (block-aligned, merged)
	First        []ByteRange `json:"first,omitempty"` // the first few of them
}

// ByteRange is a range of a volume in reports.
type ByteRange struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
}

// maxReportedRanges bounds DegradedVolume.First.
const maxReportedRanges = 8

// degraded lists this site's volumes with damaged blocks.
func (h *healer) degraded() []DegradedVolume {
	var out []DegradedVolume
	for _, name := range h.vols.volumeNames() {
		v, err := h.vols.repairable(name)
		if err != nil {
			continue
		}
		dmg := blockSpan(v.Damaged(), 0, v.Size(), v.Size())
		if len(dmg) == 0 {
			continue
		}
		d := DegradedVolume{Volume: name, DamagedBytes: rangeBytes(dmg), Ranges: len(dmg)}
		for _, r := range dmg[:min(len(dmg), maxReportedRanges)] {
			d.First = append(d.First, ByteRange{Offset: r.Off, Length: r.Len})
		}
		out = append(out, d)
	}
	return out
}

// blockSpan clips rs to [lo, hi), widens each range to whole RepairBlocks
// (the last one ends at size at most), sorts and merges them.
func blockSpan(rs []Range, lo, hi, size int64) []Range {
	var out []Range
	for _, r := range rs {
		s, e := max(r.Off, lo), min(r.Off+r.Len, hi)
		if s >= e {
			continue
		}
		s -= s % RepairBlock
		e = min(size, (e+RepairBlock-1)/RepairBlock*RepairBlock)
		if s >= e {
			continue
		}
		out = append(out, Range{Off: s, Len: e - s})
	}
	slices.SortFunc(out, func(a, b Range) int { return cmp.Compare(a.Off, b.Off) })
	merged := out[:0]
	for _, r := range out {
		if n := len(merged); n > 0 && r.Off <= merged[n-1].Off+merged[n-1].Len {
			last := &merged[n-1]
			last.Len = max(last.Off+last.Len, r.Off+r.Len) - last.Off
			continue
		}
		merged = append(merged, r)
	}
	return merged
}

// subtractRanges returns the parts of rs (sorted, disjoint) that no copy
// covers.
func subtractRanges(rs []Range, copies []remoteCopy) []Range {
	for _, c := range copies {
		var next []Range
		for _, r := range rs {
			cs, ce := c.r.Off, c.r.Off+c.r.Len
			s, e := r.Off, r.Off+r.Len
			if ce <= s || e <= cs {
				next = append(next, r)
				continue
			}
			if s < cs {
				next = append(next, Range{Off: s, Len: cs - s})
			}
			if ce < e {
				next = append(next, Range{Off: ce, Len: e - ce})
			}
		}
		rs = next
	}
	return rs
}

// pieces splits r into ranges of at most n bytes.
func pieces(r Range, n int64) func(func(Range) bool) {
	return func(yield func(Range) bool) {
		for o := r.Off; o < r.Off+r.Len; o += n {
			if !yield(Range{Off: o, Len: min(n, r.Off+r.Len-o)}) {
				return
			}
		}
	}
}

// copyOverlap copies the part of src (which starts at srcOff) that
// overlaps p (which starts at off) into p.
func copyOverlap(p []byte, off int64, src []byte, srcOff int64) {
	s, e := max(off, srcOff), min(off+int64(len(p)), srcOff+int64(len(src)))
	if s < e {
		copy(p[s-off:e-off], src[s-srcOff:e-srcOff])
	}
}

// overlap is the number of bytes r shares with [lo, hi).
func overlap(r Range, lo, hi int64) int64 {
	return max(0, min(r.Off+r.Len, hi)-max(r.Off, lo))
}

func rangeBytes(rs []Range) int64 {
	var n int64
	for _, r := range rs {
		n += r.Len
	}
	return n
}

// formatRanges writes at most n ranges as "[off,+len) ...".
func formatRanges(rs []Range, n int) string {
	var b strings.Builder
	for i, r := range rs {
		if i == n {
			fmt.Fprintf(&b, " and %d more", len(rs)-n)
			break
		}
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "[%d,+%d)", r.Off, r.Len)
	}
	return b.String()
}
