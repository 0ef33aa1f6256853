package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"

	"github.com/robib/robib/volume"
)

// Fakes of the repair path's collaborators: a volume with per-block
// damage and generations exactly as volume's damage API is specified, an
// FSM whose applied index the test moves, and sites built from the two.

// fakeVolume is a RepairableVolume in memory. Every mutation takes a new
// generation and stamps the blocks it touches; a full-block write heals a
// damaged block, a partial one leaves it damaged.
type fakeVolume struct {
	mu      sync.Mutex
	name    string
	data    []byte
	damaged []bool
	latent  []bool // corrupted, not yet found: a read or Scrub finds it
	gen     []uint64
	cur     uint64

	repairErr error            // Repair fails with it (the disk cannot be written)
	onRepair  func(call int)   // called (without the lock) before each Repair
	repairs   int              // Repair calls
	written   map[int64][]byte // block offset -> bytes each Repair wrote there (the last)
	scrubbed  int64            // bytes Scrub looked at
}

func newFakeVolume(name string, size int64) *fakeVolume {
	n := (size + RepairBlock - 1) / RepairBlock
	return &fakeVolume{name: name, data: make([]byte, size), damaged: make([]bool, n), latent: make([]bool, n), gen: make([]uint64, n), written: map[int64][]byte{}}
}

func (v *fakeVolume) Name() string { return v.name }
func (v *fakeVolume) Size() int64  { v.mu.Lock(); defer v.mu.Unlock(); return int64(len(v.data)) }

func (v *fakeVolume) check(off, n int64) error {
	if off < 0 || n < 0 || off > int64(len(v.data)) || n > int64(len(v.data))-off {
		return fmt.Errorf("%w: [%d, +%d)", volume.ErrOutOfRange, off, n)
	}
	return nil
}

// write is an FSM apply of a write op.
func (v *fakeVolume) write(p []byte, off int64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.check(off, int64(len(p))); err != nil {
		panic(err)
	}
	v.cur++
	copy(v.data[off:], p)
	for b := off / RepairBlock; b*RepairBlock < off+int64(len(p)); b++ {
		v.gen[b] = v.cur
		bs, be := b*RepairBlock, min((b+1)*RepairBlock, int64(len(v.data)))
		if off <= bs && be <= off+int64(len(p)) {
			v.damaged[b], v.latent[b] = false, false
		}
	}
}

// corrupt damages [off, off+n) behind the volume's back (a bad disk) and
// marks it damaged, as a failed checksum would.
func (v *fakeVolume) corrupt(off, n int64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for i := off; i < off+n; i++ {
		v.data[i] ^= 0xA5
	}
	for b := off / RepairBlock; b*RepairBlock < off+n; b++ {
		v.damaged[b] = true
	}
}

// corruptLatent damages [off, off+n) behind the volume's back without
// anyone noticing: the next read or Scrub of those blocks finds it.
func (v *fakeVolume) corruptLatent(off, n int64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for i := off; i < off+n; i++ {
		v.data[i] ^= 0x5A
	}
	for b := off / RepairBlock; b*RepairBlock < off+n; b++ {
		v.latent[b] = true
	}
}

// findLatentLocked turns the latent damage of blocks [b0, b1) into known
// damage, as a checksum check would.
func (v *fakeVolume) findLatentLocked(b0, b1 int64) {
	for b := b0; b < b1 && b < int64(len(v.latent)); b++ {
		if v.latent[b] {
			v.latent[b], v.damaged[b] = false, true
		}
	}
}

func (v *fakeVolume) Scrub(off, n int64) ([]Range, error) {
	v.mu.Lock()
	if err := v.check(off, n); err != nil {
		v.mu.Unlock()
		return nil, err
	}
	v.scrubbed += n
	v.findLatentLocked(off/RepairBlock, (off+n+RepairBlock-1)/RepairBlock)
	v.mu.Unlock()
	return v.Damaged(), nil
}

func (v *fakeVolume) blockRange(b int64) Range {
	return Range{Off: b * RepairBlock, Len: min(RepairBlock, int64(len(v.data))-b*RepairBlock)}
}

func appendRange(rs []Range, r Range) []Range {
	if n := len(rs); n > 0 && rs[n-1].Off+rs[n-1].Len == r.Off {
		rs[n-1].Len += r.Len
		return rs
	}
	return append(rs, r)
}

func (v *fakeVolume) ReadHealthy(p []byte, off int64) ([]Range, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.check(off, int64(len(p))); err != nil {
		return nil, err
	}
	var dmg []Range
	end := off + int64(len(p))
	v.findLatentLocked(off/RepairBlock, (end+RepairBlock-1)/RepairBlock)
	for b := off / RepairBlock; b*RepairBlock < end; b++ {
		r := v.blockRange(b)
		s, e := max(r.Off, off), min(r.Off+r.Len, end)
		if v.damaged[b] {
			dmg = appendRange(dmg, r)
			continue
		}
		copy(p[s-off:e-off], v.data[s:e])
	}
	return dmg, nil
}

func (v *fakeVolume) Damaged() []Range {
	v.mu.Lock()
	defer v.mu.Unlock()
	var out []Range
	for b, d := range v.damaged {
		if d {
			out = appendRange(out, v.blockRange(int64(b)))
		}
	}
	return out
}

func (v *fakeVolume) MarkDamaged(off, n int64) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.check(off, n); err != nil {
		return err
	}
	for b := off / RepairBlock; b*RepairBlock < off+n; b++ {
		v.damaged[b] = true
	}
	return nil
}

func (v *fakeVolume) RepairToken() uint64 { v.mu.Lock(); defer v.mu.Unlock(); return v.cur }

func (v *fakeVolume) Repair(p []byte, off int64, token uint64) (repaired, still []Range, err error) {
	v.mu.Lock()
	v.repairs++
	call, hook := v.repairs, v.onRepair
	v.mu.Unlock()
	if hook != nil {
		hook(call)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.check(off, int64(len(p))); err != nil {
		return nil, nil, err
	}
	if off%RepairBlock != 0 {
		return nil, nil, fmt.Errorf("repair at %d: not block-aligned", off)
	}
	if v.repairErr != nil {
		return nil, nil, v.repairErr
	}
	end := off + int64(len(p))
	for b := off / RepairBlock; b*RepairBlock < end; b++ {
		r := v.blockRange(b)
		if r.Off+r.Len > end || !v.damaged[b] {
			continue
		}
		if v.gen[b] > token {
			still = appendRange(still, r)
			continue
		}
		copy(v.data[r.Off:r.Off+r.Len], p[r.Off-off:])
		v.written[r.Off] = append([]byte(nil), p[r.Off-off:r.Off-off+r.Len]...)
		v.damaged[b] = false
		repaired = appendRange(repaired, r)
	}
	return repaired, still, nil
}

// bytesAt returns a copy of the volume's bytes, damaged or not.
func (v *fakeVolume) bytesAt(off, n int64) []byte {
	v.mu.Lock()
	defer v.mu.Unlock()
	return append([]byte(nil), v.data[off:off+n]...)
}

// fakeFSM is an FSM for the repair path: apply runs a function as an
// entry, under the boundary lock, and moves the applied index.
type fakeFSM struct {
	boundary sync.Mutex
	mu       sync.Mutex
	applied  uint64
	inexact  bool
	changed  chan struct{}
	waiting  chan uint64 // receives the index of each WaitApplied that must wait (if not nil)
}

func newFakeFSM() *fakeFSM { return &fakeFSM{changed: make(chan struct{})} }

func (f *fakeFSM) apply(fn func()) uint64 {
	f.boundary.Lock()
	defer f.boundary.Unlock()
	if fn != nil {
		fn()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.applied++
	close(f.changed)
	f.changed = make(chan struct{})
	return f.applied
}

func (f *fakeFSM) AtBoundary(fn func(uint64)) {
	f.boundary.Lock()
	defer f.boundary.Unlock()
	fn(f.AppliedIndex())
}

func (f *fakeFSM) AppliedIndex() uint64 { f.mu.Lock(); defer f.mu.Unlock(); return f.applied }
func (f *fakeFSM) CopyExact() bool      { f.mu.Lock(); defer f.mu.Unlock(); return !f.inexact }

func (f *fakeFSM) WaitApplied(ctx context.Context, index uint64) error {
	notified := false
	for {
		f.mu.Lock()
		ok, ch, w := f.applied >= index, f.changed, f.waiting
		f.mu.Unlock()
		if ok {
			return nil
		}
		if w != nil && !notified {
			notified = true
			w <- index
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// fakeVolumes is a volumeSource over fake volumes.
type fakeVolumes map[string]*fakeVolume

func (f fakeVolumes) repairable(name string) (RepairableVolume, error) {
	if v, ok := f[name]; ok {
		return v, nil
	}
	return nil, fmt.Errorf("volume %q: %w", name, volume.ErrNotFound)
}

func (f fakeVolumes) volumeNames() []string {
	var out []string
	for n := range f {
		out = append(out, n)
	}
	return out
}

// fixedSources lists the same sources whatever is allowed, filtered.
type fixedSources []readSource

func (f fixedSources) readSources(allowed []string) []readSource {
	var out []readSource
	for _, s := range f {
		ok := allowed == nil
		for _, a := range allowed {
			ok = ok || a == s.name
		}
		if ok {
			out = append(out, s)
		}
	}
	return out
}

// healSite is one site of a repair test: its FSM, its volume, its healer,
// and its internal endpoints served over loopback HTTP.
type healSite struct {
	name string
	fsm  *fakeFSM
	vol  *fakeVolume
	heal *healer
	api  string
	log  *logRecords
}

// newHealSites makes sites with the same volume (size bytes, zeros); each
// reads from the others in the order given.
func newHealSites(t *testing.T, size int64, names ...string) []*healSite {
	t.Helper()
	var sites []*healSite
	for _, name := range names {
		s := &healSite{name: name, fsm: newFakeFSM(), vol: newFakeVolume("v", size), log: &logRecords{}}
		srv := httptest.NewServer(nil)
		t.Cleanup(srv.Close)
		s.api = srv.Listener.Addr().String()
		s.heal = &healer{self: name, log: slog.New(s.log), fsm: s.fsm, vols: fakeVolumes{"v": s.vol},
			rpc: &rpcClient{http: srv.Client()}, interval: DefaultRebuildInterval,
			kick: make(chan struct{}, 1), readSlots: make(chan struct{}, peerReadSlots), catchUp: peerCatchUpWait}
		mux := http.NewServeMux()
		mux.HandleFunc("GET "+pathRead, s.heal.handleRead)
		mux.HandleFunc("POST "+pathRepair, s.heal.handleRepair)
		srv.Config.Handler = mux
		sites = append(sites, s)
	}
	for _, s := range sites {
		var srcs fixedSources
		for _, o := range sites {
			if o != s {
				srcs = append(srcs, readSource{name: o.name, api: o.api})
			}
		}
		s.heal.sources = srcs
	}
	return sites
}

// write applies a write as the next entry at every given site.
func writeAt(p []byte, off int64, sites ...*healSite) {
	for _, s := range sites {
		s.fsm.apply(func() { s.vol.write(p, off) })
	}
}

var errDiskFull = errors.New("no space left on device")
