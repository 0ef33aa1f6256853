package fsm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/robib/robib/volume"
)

// ---- the last-write map ----

// TestChunkMarksModel drives chunkMarks with random marks and resizes
// across page boundaries and compares every chunk with a flat model.
func TestChunkMarksModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for run := range 20 {
		size := int64(1+rng.IntN(3*markPageChunks)) * streamChunk / int64(1+rng.IntN(3))
		size = max(size, 4096)
		m := newChunkMarks(size, 7)
		model := slices.Repeat([]uint64{7}, int(chunksOf(size)))
		for step := range 200 {
			index := uint64(100*run + step + 10)
			switch rng.IntN(8) {
			case 0: // resize
				n := int64(rng.IntN(4*markPageChunks)+1) * streamChunk / int64(1+rng.IntN(4))
				n = max(n, 4096)
				m.resize(chunksOf(n))
				for int64(len(model)) < chunksOf(n) {
					model = append(model, 0)
				}
				model = model[:chunksOf(n)]
			default:
				chunks := int64(len(model))
				from := rng.Int64N(chunks)
				to := from + 1 + rng.Int64N(min(chunks-from, []int64{1, 3, markPageChunks, 3 * markPageChunks}[rng.IntN(4)]))
				if rng.IntN(10) == 0 {
					from, to = 0, chunks+5 // clipped
				}
				m.mark(from, to, index)
				for c := from; c < min(to, chunks); c++ {
					model[c] = index
				}
			}
			if m.chunks != int64(len(model)) {
				t.Fatalf("run %d step %d: %d chunks, model %d", run, step, m.chunks, len(model))
			}
			for c := range model {
				if got := m.get(int64(c)); got != model[c] {
					t.Fatalf("run %d step %d: chunk %d marked %d, model %d", run, step, c, got, model[c])
				}
			}
		}
	}
}

// markModel is the last-write map as the specification states it: per
// volume, per chunk, the index of the last entry that touched it.
type markModel map[string][]uint64

func (mm markModel) touch(name string, from, to int64, index uint64) {
	for c := from; c < min(to, int64(len(mm[name]))); c++ {
		mm[name][c] = index
	}
}

// apply updates the model for an entry that took effect (no verdict, no
// duplicate) on a site whose store held before.
func (mm markModel) apply(cmd Command, index uint64, before map[string]volume.Meta) {
	switch c := cmd.(type) {
	case *WriteBatch:
		for _, op := range c.Ops {
			if op.Len > 0 {
				mm.touch(c.Volume, op.Off/streamChunk, (op.Off+op.Len-1)/streamChunk+1, index)
			}
		}
	case *CreateVolume:
		mm[c.Name] = slices.Repeat([]uint64{index}, int(chunksOf(c.Size)))
	case *DeleteVolume:
		delete(mm, c.Name)
	case *ResizeVolume:
		old := before[c.Name].Size
		if old == c.Size {
			return
		}
		n := chunksOf(c.Size)
		for int64(len(mm[c.Name])) < n {
			mm[c.Name] = append(mm[c.Name], 0)
		}
		mm[c.Name] = mm[c.Name][:n]
		mm.touch(c.Name, min(old, c.Size)/streamChunk, chunksOf(max(old, c.Size)), index)
	}
}

// checkMarks compares the site's last-write map with the model.
func checkMarks(t *testing.T, s *site, mm markModel, since uint64, what string) {
	t.Helper()
	w := &s.fsm.marks
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.since != since {
		t.Fatalf("%s: map complete since %d, want %d", what, w.since, since)
	}
	if len(w.vols) != len(mm) {
		t.Fatalf("%s: map has %d volumes, model %d", what, len(w.vols), len(mm))
	}
	for name, want := range mm {
		m := w.vols[name]
		if m == nil || m.chunks != int64(len(want)) {
			t.Fatalf("%s: volume %q: marks %+v, model %d chunks", what, name, m, len(want))
		}
		for c := range want {
			if got := m.get(int64(c)); got != want[c] {
				t.Fatalf("%s: volume %q chunk %d marked %d, model %d", what, name, c, got, want[c])
			}
		}
	}
}

// TestLastWriteMapModel applies random histories (writes, trims, zeros
// across chunk boundaries, resizes, deletes, creates, identical re-creates,
// rejected batches) to a site and compares its last-write map with the
// model after every entry, and after restarts (the map starts over at the
// checkpoint).
func TestLastWriteMapModel(t *testing.T) {
	for seed := range uint64(4) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 77))
			s := newSite(t, t.TempDir(), noCheckpoints)
			gen := &histGen{rng: rng, ref: s, bigVolumes: seed%2 == 1}
			l := &testLog{t: t}
			mm := markModel{}
			since := uint64(0)
			for i := range 150 {
				cmd := gen.next()
				before := map[string]volume.Meta{}
				for _, m := range s.store.List() {
					before[m.Name] = m
				}
				e := l.add(cmd)
				r := s.applyLog(e)
				if r.Err == nil && !r.Duplicate {
					// An identical re-create (a no-op) marks the whole
					// volume too: it may be the replay of the Create.
					mm.apply(cmd, e.Index, before)
				}
				checkMarks(t, s, mm, since, fmt.Sprintf("entry %d (%T, %v)", e.Index, cmd, r.Err))
				if i%40 == 39 {
					// A restart: the map starts over at the checkpoint,
					// every volume unmarked.
					s.restart()
					since = s.fsm.checkpointed
					mm = markModel{}
					for _, m := range s.store.List() {
						mm[m.Name] = make([]uint64, chunksOf(m.Size))
					}
					checkMarks(t, s, mm, since, "after a restart")
				}
			}
			gen.stats(t)
		})
	}
}

// histGen generates random histories for the catch-up tests: volumes of a
// few chunks (or sparse ones of several GiB, so the map's pages are
// crossed), writes, trims and zeros of a few KiB to a few MiB at random
// offsets, resizes across chunk boundaries, deletes and re-creates (of the
// same incarnation's metadata too), each batch its own session.
type histGen struct {
	rng        *rand.Rand
	ref        *site // applies every command generated so far
	bigVolumes bool
	session    uint64
	seen       map[string]int
}

func (g *histGen) next() Command {
	c := g.pick()
	if g.seen == nil {
		g.seen = map[string]int{}
	}
	g.seen[fmt.Sprintf("%T", c)]++
	return c
}

func (g *histGen) stats(t *testing.T) { t.Logf("commands: %v", g.seen) }

func (g *histGen) size() int64 {
	r := g.rng
	if g.bigVolumes && r.IntN(3) == 0 {
		return int64(1+r.IntN(3))<<30 + int64(r.IntN(64))*4*KiB
	}
	return int64(1+r.IntN(6))*MiB + int64(r.IntN(4))*64*KiB
}

func (g *histGen) pick() Command {
	r := g.rng
	name := genVolumes[r.IntN(len(genVolumes))]
	v, err := g.ref.store.Get(name)
	exists := err == nil
	switch k := r.IntN(100); {
	case !exists && k < 60 || k < 4:
		c := &CreateVolume{Name: name, Size: g.size(), BlockSize: 4096, Created: testCreated + int64(r.IntN(3))}
		if exists && r.IntN(2) == 0 {
			m := v.Meta()
			c.Size, c.Created = m.Size, m.Created.UnixNano() // an identical retry
		}
		return c
	case !exists:
		return &DeleteVolume{Name: name} // a verdict
	case k < 9:
		return &DeleteVolume{Name: name}
	case k < 16:
		size := g.size()
		if r.IntN(3) == 0 {
			size = v.Size() + int64(r.IntN(9)-4)*64*KiB
		}
		return &ResizeVolume{Name: name, Size: max(size, 4096)}
	}
	size := v.Size()
	g.session++
	b := &WriteBatch{Volume: name, Session: g.session, Seq: 1}
	for range 1 + r.IntN(3) {
		off := r.Int64N(size) &^ 511
		ln := min([]int64{r.Int64N(16*KiB) + 1, r.Int64N(3 * MiB), streamChunk}[r.IntN(3)]+1, size-off)
		if r.IntN(30) == 0 {
			ln = size // out of range unless off is 0: the batch is rejected
		}
		switch r.IntN(5) {
		case 0:
			b.Ops = append(b.Ops, Op{Kind: OpTrim, Off: off, Len: ln})
		case 1:
			b.Ops = append(b.Ops, Op{Kind: OpZero, NoHole: ln <= 64*KiB && r.IntN(2) == 0, Off: off, Len: ln})
		default:
			b.Ops = append(b.Ops, write(off, randBytes(r, int(min(ln, 256*KiB)))))
		}
	}
	return b
}

// ---- planning ----

// keepPlan lists the records of a thin stream per volume: "k" for a keep
// run of n chunks (as "k3"), "d" for a data chunk, "z" for a zero run.
func keepPlan(t *testing.T, stream []byte) (streamHeader, map[string]string) {
	t.Helper()
	rr := newRecordReader(bytes.NewReader(stream))
	h, img, err := rr.readPrologue()
	if err != nil {
		t.Fatalf("prologue: %v", err)
	}
	var sink recordingSink
	if err := rr.readImage(h, img, &sink); err != nil {
		t.Fatalf("image: %v", err)
	}
	if _, err := rr.readEpilogue(); err != nil {
		t.Fatalf("epilogue: %v", err)
	}
	out := map[string]string{}
	cur := ""
	for _, e := range sink.events {
		switch e.Kind {
		case "volume":
			cur = img.Volumes[e.I].Name
			out[cur] = ""
		case "data":
			out[cur] += "d"
		case "zero":
			out[cur] += "z"
		case "keep":
			out[cur] += fmt.Sprintf("k%d", (e.N+streamChunk-1)/streamChunk)
		}
	}
	return h, out
}

// openThin opens snapshot id of ss, sets base b and reads the stream; it
// checks the announced size.
func openThin(t *testing.T, ss raft.SnapshotStore, id string, b CatchUpBase) (*raft.SnapshotMeta, []byte, CatchUpPlan) {
	t.Helper()
	meta, rc, err := ss.Open(id)
	if err != nil {
		t.Fatalf("Open(%s): %v", id, err)
	}
	defer rc.Close()
	thin, ok := rc.(interface {
		SetBase(CatchUpBase) (int64, error)
		Plan() CatchUpPlan
	})
	if !ok {
		t.Fatalf("snapshot %s opens as %T, without SetBase", id, rc)
	}
	size, err := thin.SetBase(b)
	if err != nil {
		t.Fatalf("SetBase: %v", err)
	}
	meta.Size = size
	data, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("reading: %v", err)
	}
	if int64(len(data)) != size {
		t.Fatalf("stream of %d bytes, SetBase said %d", len(data), size)
	}
	if p := thin.Plan(); p.Size != size {
		t.Fatalf("plan %+v, size %d", p, size)
	}
	if _, err := thin.SetBase(b); err == nil {
		t.Fatal("SetBase after the stream was read")
	}
	return meta, data, thin.Plan()
}

// TestSetBasePlansUnchangedChunks: after a base, writes touch chunks 2 and
// 5 of an 8 MiB volume, a resize grows another, a third is re-created;
// the thin stream keeps exactly the chunks no entry touched.
func TestSetBasePlansUnchangedChunks(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	a := newSite(t, t.TempDir(), noCheckpoints)
	ss := a.snapStore()
	l := &testLog{t: t}
	a.mustApply(l, create("v", 8*MiB))
	a.mustApply(l, &CreateVolume{Name: "w", Size: 3*MiB + 8*KiB, BlockSize: 4096, Created: testCreated})
	a.mustApply(l, &CreateVolume{Name: "x", Size: 2 * MiB, BlockSize: 4096, Created: testCreated})
	a.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 1, Ops: []Op{write(0, randBytes(rng, 8*MiB))}})
	a.mustApply(l, &WriteBatch{Volume: "w", Session: 1, Seq: 2, Ops: []Op{write(0, randBytes(rng, 3*MiB))}})
	base := CatchUpBase{Index: uint64(len(l.entries)), Volumes: a.store.List()}

	a.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 3, Ops: []Op{
		write(2*MiB+100, []byte("two")), {Kind: OpTrim, Off: 5 * MiB, Len: 4096},
	}})
	a.mustApply(l, &ResizeVolume{Name: "w", Size: 5 * MiB})                                            // grows from inside chunk 3
	a.mustApply(l, &DeleteVolume{Name: "x"})                                                           // and re-created
	a.mustApply(l, &CreateVolume{Name: "x", Size: 2 * MiB, BlockSize: 4096, Created: testCreated + 1}) // another incarnation
	a.mustApply(l, &CreateVolume{Name: "y", Size: MiB, BlockSize: 4096, Created: testCreated})         // new
	id := takeSnapshot(t, a, ss, uint64(len(l.entries)+1))

	h, plan, _ := func() (streamHeader, map[string]string, CatchUpPlan) {
		_, data, p := openThin(t, ss, id, base)
		h, recs := keepPlan(t, data)
		return h, recs, p
	}()
	want := map[string]string{
		"v": "k2dk2dk2", // chunks 0-1 kept, 2 sent, 3-4 kept, 5 sent, 6-7 kept
		"w": "k3z",      // chunks 0-2 kept; 3 (the old end, a hole) and 4 (new) are zeros
		"x": "z",        // another incarnation: its zeros are sent
		"y": "z",        // not at the base
	}
	for name, w := range want {
		if plan[name] != w {
			t.Errorf("volume %s: records %q, want %q", name, plan[name], w)
		}
	}
	if h.Version != streamVersion || h.Base == nil || h.Base.Index != base.Index {
		t.Fatalf("header %+v", h)
	}
	if _, _, p := openThin(t, ss, id, base); p.KeptBytes != 9*MiB || p.DataChunks != 2 || p.KeptRuns != 4 || p.Reason != "" {
		t.Fatalf("plan %+v", p)
	}

	// A base that is not usable keeps nothing: a version 1 stream, and the
	// plan says why.
	for name, b := range map[string]CatchUpBase{
		"none":            {},
		"at the snapshot": {Index: uint64(len(l.entries) + 1), Volumes: base.Volumes},
		"other volumes":   {Index: base.Index, Volumes: []volume.Meta{{Name: "q", Size: MiB, BlockSize: 4096, Created: time.Unix(0, testCreated)}}},
	} {
		_, data, p := openThin(t, ss, id, b)
		if h, _ := keepPlan(t, data); h.Version != streamVersionV1 || h.Base != nil || p.KeptBytes != 0 || p.Reason == "" {
			t.Errorf("%s: header %+v plan %+v", name, h, p)
		}
		if _, full := openStream(t, ss, id); !bytes.Equal(full, data) {
			t.Errorf("%s: the stream differs from the one planned without a base", name)
		}
	}
	// A smaller base size: only chunks wholly within it are kept.
	small := CatchUpBase{Index: base.Index, Volumes: slices.Clone(base.Volumes)}
	small.Volumes[0].Size = 3*MiB + 4096 // v
	if _, data, _ := openThin(t, ss, id, small); keepPlanOf(t, data)["v"] != "k2dddddd" {
		t.Errorf("v with a 3 MiB base: %q", keepPlanOf(t, data)["v"])
	}

	// After a restart the map is complete only since the checkpoint: the
	// old base is refused, a base at the checkpoint is usable.
	a.restart()
	ss = a.snapStore()
	_, data, p := openThin(t, ss, id, base)
	if h, _ := keepPlan(t, data); h.Base != nil || !strings.Contains(p.Reason, "older than") {
		t.Fatalf("base before the restart: %+v, %+v", h, p)
	}
	a.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 4, Ops: []Op{write(7*MiB, []byte("seven"))}})
	after := CatchUpBase{Index: a.fsm.checkpointed, Volumes: a.store.List()}
	id = takeSnapshot(t, a, ss, uint64(len(l.entries)+1))
	if _, data, _ := openThin(t, ss, id, after); keepPlanOf(t, data)["v"] != "k7d" {
		t.Fatalf("after the restart: %q", keepPlanOf(t, data)["v"])
	}
}

func keepPlanOf(t *testing.T, data []byte) map[string]string {
	_, p := keepPlan(t, data)
	return p
}

// ---- equivalence ----

// failingReader returns the first n bytes of r, then an error.
type failingReader struct {
	r io.Reader
	n int64
}

func (f *failingReader) Read(p []byte) (int, error) {
	if f.n <= 0 {
		return 0, errors.New("connection reset (test)")
	}
	if int64(len(p)) > f.n {
		p = p[:f.n]
	}
	n, err := f.r.Read(p)
	f.n -= int64(n)
	return n, err
}

// sameVolumes fails unless a and b hold the same volumes (metadata, bytes).
func sameVolumes(t *testing.T, a, b *site, what string) {
	t.Helper()
	am, bm := a.store.List(), b.store.List()
	if !slices.EqualFunc(am, bm, sameMeta) {
		t.Fatalf("%s: volume metadata differs:\n%v\n%v", what, am, bm)
	}
	for _, m := range am {
		if !bytes.Equal(a.read(m.Name), b.read(m.Name)) {
			t.Fatalf("%s: volume %q bytes differ", what, m.Name)
		}
	}
}

// TestThinEquivalence: for random histories, a follower at checkpoint C
// (its volumes ahead: entries after C applied without a checkpoint, then a
// crash) restored from a thin stream holds exactly the volumes a full
// stream gives it, and both reach the leader's state after the rest of the
// log. Some runs restart the leader first (its map starts over), let the
// follower be ahead of the snapshot, interrupt the first restore (then
// restore the same stored stream again, recover it at start-up, or install
// a new stream planned against the base the follower offers meanwhile).
func TestThinEquivalence(t *testing.T) {
	kept := int64(0)
	for seed := range uint64(24) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			kept += thinEquivalenceRun(t, seed)
		})
	}
	if kept == 0 {
		t.Fatal("no run kept anything")
	}
}

func thinEquivalenceRun(t *testing.T, seed uint64) int64 {
	rng := rand.New(rand.NewPCG(seed, 99))
	ref := newSite(t, t.TempDir(), noCheckpoints)
	gen := &histGen{rng: rng, ref: ref}
	l := &testLog{t: t}
	n := 40 + rng.IntN(60)
	for range n {
		ref.applyLog(l.add(gen.next()))
	}
	// The snapshot at S, the follower's checkpoint C < S and how far it
	// applied (ahead of C, maybe past S).
	s := 10 + rng.IntN(n-10)
	c := rng.IntN(s)
	aheadTo := c + rng.IntN(n-c+1)
	if seed%4 != 3 {
		aheadTo = min(aheadTo, s) // usually the follower is behind the snapshot
	}
	leaderRestart := -1
	if seed%5 == 4 {
		leaderRestart = rng.IntN(s)
	}
	interrupt := int(seed % 4) // 0: none, 1: restore again, 2: recover at start-up, 3: a new stream

	a := newSite(t, t.TempDir(), noCheckpoints)
	for i, e := range l.entries[:s] {
		if i == leaderRestart {
			a.restart()
		}
		a.applyLog(e)
	}
	ssA := a.snapStore()
	id := takeSnapshot(t, a, ssA, uint64(s))

	follower := func() *site {
		b := newSite(t, t.TempDir(), noCheckpoints)
		b.replay(l.entries[:c])
		if err := b.fsm.checkpoint(); err != nil {
			t.Fatal(err)
		}
		b.replay(l.entries[c:aheadTo])
		b.crash()
		b.fsm.SetReplayBound(uint64(aheadTo))
		return b
	}
	bFull, bThin := follower(), follower()
	ssFull, ssThin := bFull.snapStore(), bThin.snapStore()
	install(t, ssA, id, bFull, ssFull)

	base := bThin.fsm.CatchUpBase()
	meta, stream, plan := openThin(t, ssA, id, base)
	rid, err := receive(t, ssThin, meta, bytes.NewReader(stream))
	if err != nil {
		t.Fatalf("receiving the thin stream: %v", err)
	}
	restore := func() {
		t.Helper()
		_, src, err := ssThin.Open(rid)
		if err != nil {
			t.Fatal(err)
		}
		if err := bThin.fsm.Restore(src); err != nil {
			t.Fatalf("thin restore (base %d, plan %+v): %v", base.Index, plan, err)
		}
	}
	if interrupt != 0 {
		_, src, err := ssThin.Open(rid)
		if err != nil {
			t.Fatal(err)
		}
		cut := int64(rng.IntN(len(stream)))
		if err := bThin.fsm.Restore(io.NopCloser(&failingReader{r: src, n: cut})); err == nil {
			t.Fatalf("restore cut after %d of %d bytes succeeded", cut, len(stream))
		}
		src.Close()
	}
	switch interrupt {
	case 2: // the site crashed in the middle; start-up finishes the install
		bThin.crash()
		ssThin = bThin.snapStore()
		if st := bThin.fsm.Stats(); st.Failed != nil || st.Restores != 1 {
			t.Fatalf("start-up recovery: %+v", st)
		}
	case 3: // the leader sends a new stream, planned against the base offered now
		if nb := bThin.fsm.CatchUpBase(); nb.Index > base.Index {
			t.Fatalf("base moved from %d to %d while restoring", base.Index, nb.Index)
		} else {
			base = nb
		}
		meta, stream, plan = openThin(t, ssA, id, base)
		if rid, err = receive(t, ssThin, meta, bytes.NewReader(stream)); err != nil {
			t.Fatal(err)
		}
		restore()
	default:
		restore()
	}
	if aheadTo <= s {
		sameVolumes(t, bFull, bThin, fmt.Sprintf("after the restores (C %d, ahead to %d, S %d, plan %+v)", c, aheadTo, s, plan))
	}
	st := bThin.fsm.Stats()
	if st.RestoreBytesKept != plan.KeptBytes {
		t.Fatalf("kept %d bytes, the plan said %d", st.RestoreBytesKept, plan.KeptBytes)
	}
	if st.CatchUp.Phase != "" {
		t.Fatalf("progress after the restore: %+v", st.CatchUp)
	}
	// The rest of the log: both reach the reference.
	for _, b := range []*site{bFull, bThin} {
		b.replay(l.entries[s:])
		sameState(t, ref, b)
	}
	t.Logf("checkpoint %d (base %d), ahead to %d, S %d, leader restart %d, interrupt %d: %d of %d bytes sent, %d kept",
		c, base.Index, aheadTo, s, leaderRestart, interrupt, len(stream), fullSize(t, ssA, id), plan.KeptBytes)
	return plan.KeptBytes
}

func fullSize(t *testing.T, ss raft.SnapshotStore, id string) int {
	_, b := openStream(t, ss, id)
	return len(b)
}

// TestThinKeepsBytesAheadOfTheSnapshot: the follower applied an entry the
// leader's snapshot does not cover (it is ahead of the snapshot in a chunk
// the leader's map shows unchanged): the thin restore keeps those bytes,
// marks the volumes fuzzy until past what they may reflect, and the
// replay of the entry converges.
func TestThinKeepsBytesAheadOfTheSnapshot(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	a := newSite(t, t.TempDir(), noCheckpoints)
	b := newSite(t, t.TempDir(), noCheckpoints)
	l := &testLog{t: t}
	for _, c := range []Command{
		create("v", 4*MiB),
		&WriteBatch{Volume: "v", Session: 1, Seq: 1, Ops: []Op{write(0, randBytes(rng, 4*MiB))}},
	} {
		a.mustApply(l, c)
	}
	b.replay(l.entries)
	if err := b.fsm.checkpoint(); err != nil {
		t.Fatal(err)
	}
	a.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 2, Ops: []Op{write(MiB, []byte("at 3"))}})
	ahead := l.add(&WriteBatch{Volume: "v", Session: 1, Seq: 3, Ops: []Op{write(2*MiB, []byte("at 4"))}})
	verify := l.add(&VerifyChunks{ID: "vf", Volume: "v", Len: 4 * MiB, ChunkSize: MiB})
	b.replay(l.entries[2:4]) // 3 and 4, not checkpointed
	b.crash()
	b.fsm.SetReplayBound(4)
	ssA := a.snapStore()
	id := takeSnapshot(t, a, ssA, 3)
	_, stream, plan := openThin(t, ssA, id, b.fsm.CatchUpBase())
	if plan.KeptBytes != 3*MiB || plan.Base != 2 {
		t.Fatalf("plan %+v", plan)
	}
	if err := b.fsm.Restore(io.NopCloser(bytes.NewReader(stream))); err != nil {
		t.Fatal(err)
	}
	if got := b.read("v")[2*MiB : 2*MiB+4]; string(got) != "at 4" {
		t.Fatalf("kept chunk: %q", got)
	}
	if b.fsm.fuzzyUntil < 5 {
		t.Fatalf("fuzzy until %d after keeping bytes of entry 4", b.fsm.fuzzyUntil)
	}
	b.applyLog(ahead)
	b.applyLog(verify)
	a.applyLog(ahead)
	a.applyLog(verify)
	sameState(t, a, b)
	got, _ := b.fsm.VerifyResult("vf")
	want, _ := a.fsm.VerifyResult("vf")
	if got.Fuzzy || fmt.Sprint(got.Hashes) != fmt.Sprint(want.Hashes) {
		t.Fatalf("verify after the replay: %+v, want %+v", got, want)
	}
}

// ---- refusals ----

// thinFixture: leader a with volume v (4 MiB, written), follower b at a
// checkpoint, then a changes chunk 1; stream is the thin stream for b.
func thinFixture(t *testing.T) (a, b *site, l *testLog, meta *raft.SnapshotMeta, stream []byte) {
	rng := rand.New(rand.NewPCG(7, 8))
	a = newSite(t, t.TempDir(), noCheckpoints)
	b = newSite(t, t.TempDir(), noCheckpoints)
	l = &testLog{t: t}
	for _, c := range []Command{
		create("v", 4*MiB),
		&WriteBatch{Volume: "v", Session: 1, Seq: 1, Ops: []Op{write(0, randBytes(rng, 4*MiB))}},
	} {
		a.mustApply(l, c)
	}
	b.replay(l.entries)
	if err := b.fsm.checkpoint(); err != nil {
		t.Fatal(err)
	}
	a.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 2, Ops: []Op{write(MiB+5, []byte("new"))}})
	ssA := a.snapStore()
	id := takeSnapshot(t, a, ssA, uint64(len(l.entries)))
	meta, stream, plan := openThin(t, ssA, id, b.fsm.CatchUpBase())
	if plan.KeptBytes != 3*MiB {
		t.Fatalf("plan %+v", plan)
	}
	return a, b, l, meta, stream
}

// TestThinRestoreRefusesMismatch: keep records that the receiving site
// cannot honour (the volume missing, another incarnation, too small, a
// base it does not have, a broken volume) fail the restore before
// anything changes: no volume touched, the state file not marked
// restoring, the site not failed.
func TestThinRestoreRefusesMismatch(t *testing.T) {
	a, b, l, _, stream := thinFixture(t) // base 2, snapshot 3
	own := func(cmds ...Command) func(s *site) {
		return func(s *site) {
			sl := &testLog{t: t}
			for _, c := range cmds {
				s.mustApply(sl, c)
			}
		}
	}
	end := &EndSession{Session: 9}
	cases := map[string]struct {
		prepare func(s *site)
		reason  string
	}{
		"volume missing":          {own(end, end), "cannot read"},
		"another incarnation":     {own(&CreateVolume{Name: "v", Size: 4 * MiB, BlockSize: 4096, Created: testCreated + 5}, end), "another incarnation"},
		"other block size":        {own(&CreateVolume{Name: "v", Size: 4 * MiB, BlockSize: 512, Created: testCreated}, end), "another incarnation"},
		"smaller here":            {own(create("v", 2*MiB), end), "has 2097152 bytes here"},
		"base below the stream's": {func(s *site) { s.replay(l.entries[:1]) }, "planned against base index 2"},
		"base at the snapshot":    {func(s *site) { s.replay(l.entries) }, "not below it"},
		"broken volume": {func(s *site) {
			s.replay(l.entries[:2])
			if err := s.fsm.checkpoint(); err != nil {
				t.Fatal(err)
			}
			if _, err := s.store.Create(volume.Meta{Name: "w", Size: MiB, BlockSize: 4096, Created: time.Unix(0, 1)}); err != nil {
				t.Fatal(err)
			}
			s.store.Close()
			if err := os.WriteFile(filepath.Join(s.dir, "volumes", "volumes", "w", "meta.json"), []byte("{"), 0o600); err != nil {
				t.Fatal(err)
			}
			s.open()
			if len(s.store.Broken()) != 1 {
				t.Fatal("w is not broken")
			}
		}, "broken volumes"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			s := newSite(t, t.TempDir(), noCheckpoints)
			tc.prepare(s)
			if err := s.fsm.checkpoint(); err != nil {
				t.Fatal(err)
			}
			metas, broken := s.store.List(), len(s.store.Broken())
			state := s.stateFile()
			var data [][]byte
			for _, m := range metas {
				data = append(data, s.read(m.Name))
			}
			err := s.fsm.Restore(io.NopCloser(bytes.NewReader(stream)))
			if !errors.Is(err, errCorruptStream) || !strings.Contains(err.Error(), "thin stream") || !strings.Contains(err.Error(), tc.reason) {
				t.Fatalf("Restore: %v (want %q)", err, tc.reason)
			}
			if s.fsm.Stats().Failed != nil {
				t.Fatal("the refusal failed the site")
			}
			if !bytes.Equal(s.stateFile(), state) {
				t.Fatal("the refusal changed the state file")
			}
			if !slices.EqualFunc(s.store.List(), metas, sameMeta) || len(s.store.Broken()) != broken {
				t.Fatalf("volumes changed: %v, were %v", s.store.List(), metas)
			}
			for i, m := range metas {
				if !bytes.Equal(s.read(m.Name), data[i]) {
					t.Fatalf("volume %s changed", m.Name)
				}
			}
		})
	}
	// The site it was planned for installs it.
	if err := b.fsm.Restore(io.NopCloser(bytes.NewReader(stream))); err != nil {
		t.Fatal(err)
	}
	sameState(t, a, b)
	if st := b.fsm.Stats(); st.RestoreBytesKept != 3*MiB || st.RestoreBytesWritten != MiB {
		t.Fatalf("stats %+v", st)
	}
}

// TestReceivedThinSnapshotStreamsLive: once installed, a received thin
// snapshot is streamed from the live volumes (another site could not
// honour its keep records); before that, Open returns the stored stream
// for raft's restore. A stored thin snapshot that does not apply to the
// site (received, never restored, then the site restarted) is removed at
// start-up instead of blocking it.
func TestReceivedThinSnapshotStreamsLive(t *testing.T) {
	a, b, _, meta, stream := thinFixture(t)
	ssB := b.snapStore()
	rid, err := receive(t, ssB, meta, bytes.NewReader(stream))
	if err != nil {
		t.Fatal(err)
	}
	_, first := openStream(t, ssB, rid)
	if !bytes.Equal(first, stream) {
		t.Fatal("the first Open of a just received thin snapshot is not the stored stream")
	}
	if _, again := openStream(t, ssB, rid); !bytes.Equal(again, stream) {
		t.Fatal("Open before the install is not the stored stream")
	}
	if err := b.fsm.Restore(io.NopCloser(bytes.NewReader(stream))); err != nil {
		t.Fatal(err)
	}
	_, live := openStream(t, ssB, rid)
	h, _, img, err := parseFull(live)
	if err != nil || h.Version != streamVersionV1 || h.Base != nil || len(img.Volumes) != 1 {
		t.Fatalf("installed thin snapshot opens as %+v, %v", h, err)
	}
	// The live stream installs anywhere.
	c := newSite(t, t.TempDir(), noCheckpoints)
	if err := c.fsm.Restore(io.NopCloser(bytes.NewReader(live))); err != nil {
		t.Fatal(err)
	}
	sameState(t, a, c)
	// It has SetBase: a site at b's new base gets a thin stream again.
	if _, _, p := openThin(t, ssB, rid, CatchUpBase{Index: 1, Volumes: b.store.List()}); p.Reason == "" {
		t.Fatalf("a base below the restore's map planned keeps: %+v", p)
	}

	// Recovery: d receives the thin stream for b but holds another
	// incarnation of v; it crashes before the restore.
	d := newSite(t, t.TempDir(), noCheckpoints)
	dl := &testLog{t: t}
	d.mustApply(dl, &CreateVolume{Name: "v", Size: 4 * MiB, BlockSize: 4096, Created: testCreated + 5})
	d.mustApply(dl, &WriteBatch{Volume: "v", Session: 1, Seq: 1, Ops: []Op{write(0, []byte("mine"))}})
	if err := d.fsm.checkpoint(); err != nil {
		t.Fatal(err)
	}
	ssD := d.snapStore()
	did, err := receive(t, ssD, meta, bytes.NewReader(stream))
	if err != nil {
		t.Fatal(err)
	}
	// Refused by Restore (as raft would call it): removed at once.
	_, src, err := ssD.Open(did)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.fsm.Restore(src); !errors.Is(err, errCorruptStream) {
		t.Fatalf("Restore at d: %v", err)
	}
	if list, _ := ssD.List(); len(list) != 0 {
		t.Fatalf("the refused thin snapshot is still listed: %+v", list)
	}
	// Received again, and the site crashed before the restore.
	if _, err := receive(t, ssD, meta, bytes.NewReader(stream)); err != nil {
		t.Fatal(err)
	}
	d.crash()
	ssD = d.snapStore()
	if list, _ := ssD.List(); len(list) != 0 {
		t.Fatalf("the inapplicable thin snapshot is still listed: %+v", list)
	}
	if got := d.read("v"); string(got[:4]) != "mine" || d.fsm.Stats().Failed != nil {
		t.Fatalf("recovery changed the site: %q, %v", got[:4], d.fsm.Stats().Failed)
	}
}

// ---- bad streams ----

// streamOf builds a stream record by record: header h, a state of one
// volume "v" of size, the base record (if h.Base), a volume record, recs
// and the end record.
func streamOf(h streamHeader, size int64, recs ...[]byte) []byte {
	img := &stateImage{Applied: 9, Volumes: []volume.Meta{{Name: "v", Size: size, BlockSize: 4096, Created: time.Unix(0, testCreated).UTC()}}}
	b := append([]byte(streamMagic), appendRecord(nil, recHeader, headerRecordPayload(h))...)
	b = appendRecord(b, recState, encodeState(img))
	n := uint64(2)
	if h.Base != nil {
		b = appendRecord(b, recBase, baseRecordPayload(h.Base))
		n++
	}
	if h.Kind == kindFull {
		b = appendRecord(b, recVolume, volumeRecordPayload(0, "v"))
		n++
	}
	for _, r := range recs {
		b = append(b, r...)
		n++
	}
	return appendRecord(b, recEnd, endRecordPayload(streamEnd{Records: n, FuzzyUntil: 11}))
}

func thinHeader(baseIndex uint64, keepEnd int64) streamHeader {
	return streamHeader{Version: streamVersion, Kind: kindFull, Index: 10, Base: &streamBase{Index: baseIndex, KeepEnd: []int64{keepEnd}}}
}

func keepRec(n uint64) []byte {
	return appendRecord(nil, recKeep, binary.LittleEndian.AppendUint64(nil, n))
}

// TestThinStreamBadRecords: malformed keep and base records (zero length,
// truncated, overflowing, past the volume or the keep end, keep records in
// a version 1 stream, base records that do not fit the state or the
// header) are corrupt streams.
func TestThinStreamBadRecords(t *testing.T) {
	const size = 2 * MiB
	data := appendRecord(nil, recData, make([]byte, MiB))
	good := streamOf(thinHeader(5, MiB), size, keepRec(MiB), data)
	if _, _, err := validateStream(bytes.NewReader(good)); err != nil {
		t.Fatalf("the good stream: %v", err)
	}
	keepAt := len(good) - recOverhead - endPayload - len(data) - recOverhead - keepPayload
	bad := map[string][]byte{
		"keep of 0 bytes":         streamOf(thinHeader(5, MiB), size, keepRec(0), keepRec(MiB), data),
		"keep past the volume":    streamOf(thinHeader(5, size), size, data, keepRec(2*MiB)),
		"keep overflowing":        streamOf(thinHeader(5, MiB), size, keepRec(^uint64(0)), data),
		"keep payload truncated":  streamOf(thinHeader(5, MiB), size, appendRecord(nil, recKeep, make([]byte, 7)), data),
		"keep payload long":       streamOf(thinHeader(5, MiB), size, appendRecord(nil, recKeep, make([]byte, 9)), data),
		"keep past its keep end":  streamOf(thinHeader(5, MiB/2), size, keepRec(MiB), data),
		"keep end not reached":    streamOf(thinHeader(5, 2*MiB), size, keepRec(MiB), data),
		"keep end without a keep": streamOf(thinHeader(5, MiB), size, data, data),
		"base at the snapshot":    streamOf(thinHeader(10, MiB), size, keepRec(MiB), data),
		"keep in a v1 stream":     streamOf(streamHeader{Kind: kindFull, Index: 10}, size, keepRec(MiB), data),
		"cut inside the keep":     good[:keepAt+recOverhead],
		"v2 state stream":         streamOf(streamHeader{Version: streamVersion, Kind: kindState}, size),
		"v2 without a base":       streamOf(streamHeader{Version: streamVersion, Kind: kindFull, Index: 10}, size, data, data),
	}
	for name, b := range bad {
		if _, _, err := validateStream(bytes.NewReader(b)); !errors.Is(err, errCorruptStream) {
			t.Errorf("%s: validateStream: %v", name, err)
		}
	}
	// Base records that do not fit the state.
	img := &stateImage{Applied: 9, Volumes: []volume.Meta{{Name: "v", Size: size, BlockSize: 4096, Created: time.Unix(0, testCreated).UTC()}}}
	h := streamHeader{Version: streamVersion, Kind: kindFull, Index: 10}
	for name, p := range map[string][]byte{
		"no keep ends":       binary.LittleEndian.AppendUint64(nil, 5),
		"two volumes":        baseRecordPayload(&streamBase{Index: 5, KeepEnd: []int64{MiB, 0}}),
		"trailing byte":      append(baseRecordPayload(&streamBase{Index: 5, KeepEnd: []int64{MiB}}), 0),
		"keep end too large": baseRecordPayload(&streamBase{Index: 5, KeepEnd: []int64{size + 1}}),
		"truncated index":    {1, 2, 3},
		"keep end overflow":  append(binary.LittleEndian.AppendUint64(nil, 5), 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01),
		"huge count":         append(binary.LittleEndian.AppendUint64(nil, 5), 0xff, 0xff, 0xff, 0xff, 0x0f),
	} {
		if _, err := decodeBase(p, h, img); !errors.Is(err, errCorruptStream) {
			t.Errorf("base %s: %v", name, err)
		}
	}
}

// gateReader passes n bytes, then waits for open before the rest.
type gateReader struct {
	r    io.Reader
	n    int64
	at   chan struct{} // closed when n bytes were read
	open chan struct{}
	once bool
}

func (g *gateReader) Read(p []byte) (int, error) {
	if g.n == 0 && !g.once {
		g.once = true
		close(g.at)
		<-g.open
	}
	if g.n > 0 && int64(len(p)) > g.n {
		p = p[:g.n]
	}
	n, err := g.r.Read(p)
	if g.n > 0 {
		g.n -= int64(n)
	}
	return n, err
}

// TestInstallProgress: Stats.CatchUp shows the stream being received
// (bytes so far) and then restored (bytes read of the stored stream's
// length), and nothing once done.
func TestInstallProgress(t *testing.T) {
	_, b, _, meta, stream := thinFixture(t)
	ss := b.snapStore()
	sink, err := ss.Create(1, meta.Index, meta.Term, meta.Configuration, meta.ConfigurationIndex, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sink.Write(stream[:len(stream)/2]); err != nil {
		t.Fatal(err)
	}
	if p := b.fsm.Stats().CatchUp; p.Phase != "receiving" || p.Done != int64(len(stream)/2) || p.Total != 0 || p.Started.IsZero() {
		t.Fatalf("while receiving: %+v", p)
	}
	if _, err := sink.Write(stream[len(stream)/2:]); err != nil {
		t.Fatal(err)
	}
	if err := sink.Close(); err != nil {
		t.Fatal(err)
	}
	if p := b.fsm.Stats().CatchUp; p.Phase != "" {
		t.Fatalf("after receiving: %+v", p)
	}
	_, src, err := ss.Open(sink.ID())
	if err != nil {
		t.Fatal(err)
	}
	g := &gateReader{r: src, n: int64(len(stream)) - 100, at: make(chan struct{}), open: make(chan struct{})}
	done := make(chan error, 1)
	go func() { done <- b.fsm.Restore(io.NopCloser(g)) }()
	<-g.at
	p := b.fsm.Stats().CatchUp
	close(g.open)
	if p.Phase != "restoring" || p.Total != int64(len(stream)) || p.Done != int64(len(stream))-100 {
		t.Fatalf("while restoring: %+v (stream of %d bytes)", p, len(stream))
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	src.Close()
	if p := b.fsm.Stats().CatchUp; p.Phase != "" {
		t.Fatalf("after restoring: %+v", p)
	}
}

// BenchmarkSetBase1TiB plans a thin stream for one sparse 1 TiB volume
// (a million chunks) whose map has scattered marks.
func BenchmarkSetBase1TiB(b *testing.B) {
	st, err := volume.Open(b.TempDir(), testLogger(b))
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	m := volume.Meta{Name: "v", Size: 1 << 40, BlockSize: 4096, Created: time.Unix(0, testCreated).UTC()}
	if _, err := st.Create(m); err != nil {
		b.Fatal(err)
	}
	img := &stateImage{Applied: 100, Volumes: []volume.Meta{m}}
	s, err := newFullStream(st, 100, img, func() uint64 { return 101 })
	if err != nil {
		b.Fatal(err)
	}
	var w writeMap
	w.reset(10, img.Volumes)
	for c := int64(0); c < chunksOf(m.Size); c += 997 {
		w.vols["v"].mark(c, c+1, 60)
	}
	s.marks = &w
	base := CatchUpBase{Index: 50, Volumes: img.Volumes}
	b.ResetTimer()
	for range b.N {
		if _, err := s.SetBase(base); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(s.Plan().KeptRuns), "keep-records")
}
