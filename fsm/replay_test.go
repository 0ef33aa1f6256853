package fsm

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/robib/robib/volume"
)

// stateFile returns the site's current state file bytes.
func (s *site) stateFile() []byte {
	s.t.Helper()
	b, err := os.ReadFile(filepath.Join(s.dir, "fsm", stateFileName))
	if err != nil {
		s.t.Fatalf("reading the state file: %v", err)
	}
	return b
}

// crashWithState simulates kill -9 with the state file holding state (the
// bytes of an earlier state file of this site; nil: there was none): no
// final checkpoint, the volumes as they are. A background checkpoint is let
// finish first, so it cannot write the state file after the crash.
func (s *site) crashWithState(state []byte) {
	s.t.Helper()
	_ = s.fsm.reapCheckpoint(true)
	s.store.Close()
	path := filepath.Join(s.dir, "fsm", stateFileName)
	var err error
	if state == nil {
		err = os.Remove(path)
	} else {
		err = os.WriteFile(path, state, 0o600)
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		s.t.Fatal(err)
	}
	s.open()
}

// crashInside applies the metadata command e as if the site were killed
// between the store operation and the checkpoint after it: the store holds
// e's effect, the state file is the one of the checkpoint before e. Then the
// site is reopened.
func (s *site) crashInside(e *raft.Log) {
	s.t.Helper()
	// The checkpoint e's Apply writes before its store operation (here
	// written first, so that Apply's own is a no-op).
	if err := s.fsm.checkpoint(); err != nil {
		s.t.Fatal(err)
	}
	before, err := os.ReadFile(filepath.Join(s.dir, "fsm", stateFileName))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		s.t.Fatal(err)
	}
	s.applyLog(e)
	s.crashWithState(before)
}

// TestCrashInsideDeleteDropsLease: a kill -9 between the store's delete of
// a leased volume and the checkpoint after it. The replayed Delete finds
// the volume gone; the lease must still be dropped, or the recreated
// volume's first acquire (Prev 0) is rejected at this site only and the
// copies diverge (issue 11).
func TestCrashInsideDeleteDropsLease(t *testing.T) {
	ref := newSite(t, t.TempDir(), noCheckpoints)
	s := newSite(t, t.TempDir(), noCheckpoints)
	l := &testLog{t: t}
	both := func(c Command) (*Result, *Result) {
		t.Helper()
		e := l.add(c)
		return ref.applyLog(e), s.applyLog(e)
	}
	both(create("v", MiB))
	both(&AcquireLease{Volume: "v", Site: "a", Created: testCreated})
	both(batchAt(1, 1, 1, 0, []byte("first incarnation")))

	del := l.add(&DeleteVolume{Name: "v"})
	if r := ref.applyLog(del); r.Err != nil {
		t.Fatal(r.Err)
	}
	s.crashInside(del)
	img, err := readStateFile(filepath.Join(s.dir, "fsm"))
	if err != nil || img.Applied != 3 || len(img.Leases) != 1 {
		t.Fatalf("crash state: the state file should be at 3 and still hold the lease: %+v, %v", img, err)
	}
	if _, err := s.store.Get("v"); err == nil {
		t.Fatal("crash state: the store should no longer hold v")
	}
	s.replay(l.entries) // raft replays the whole log: 1-3 skipped, the Delete replayed
	sameState(t, ref, s)

	// Recreate, lease and write it: both sites must reach the same verdicts.
	newCreated := testCreated + 1
	cmds := []Command{
		&CreateVolume{Name: "v", Size: MiB, BlockSize: 4096, Created: newCreated},
		&AcquireLease{Volume: "v", Site: "b", Created: newCreated, Prev: 0},
		&WriteBatch{Volume: "v", Session: 2, Seq: 1, Epoch: 1, Created: newCreated, Ops: []Op{write(0, []byte("second"))}},
		&ReleaseLease{Volume: "v", Site: "b", Epoch: 1},
		&AcquireLease{Volume: "v", Site: "c", Created: newCreated, Prev: 1},
		&WriteBatch{Volume: "v", Session: 3, Seq: 1, Epoch: 2, Created: newCreated, Ops: []Op{write(100, []byte("third"))}},
	}
	for _, c := range cmds {
		rr, rs := both(c)
		if rr.Err != nil {
			t.Fatalf("reference: %T: %v", c, rr.Err)
		}
		if rs.Err != nil {
			t.Fatalf("crashed site: %T: %v (the reference accepted it)", c, rs.Err)
		}
	}
	sameState(t, ref, s)
	if got := string(s.read("v")[:6]); got != "second" {
		t.Fatalf("crashed site's volume: %q", got)
	}
}

// TestCrashInsideFirstCreate: the checkpoint before the very first Create
// has nothing to write (index 0); a crash after the store created the
// volume must still leave a state file the site can start from.
func TestCrashInsideFirstCreate(t *testing.T) {
	ref := newSite(t, t.TempDir(), noCheckpoints)
	s := newSite(t, t.TempDir(), noCheckpoints)
	l := &testLog{t: t}
	e := l.add(create("v", MiB))
	ref.applyLog(e)
	s.crashInside(e) // fails in open if New refuses the store
	s.replay(l.entries)
	w := l.add(&WriteBatch{Volume: "v", Session: 1, Seq: 1, Ops: []Op{write(0, []byte("x"))}})
	ref.applyLog(w)
	if r := s.applyLog(w); r.Err != nil {
		t.Fatal(r.Err)
	}
	sameState(t, ref, s)
}

// TestStateFileOrphanLeaseDroppedOnLoad: the state file written by the
// checkpoint before a Delete lists the volume's lease; if the store no
// longer holds the volume when the state is loaded, the lease is dropped
// at once (the invariant "no lease for a volume that does not exist").
func TestStateFileOrphanLeaseDroppedOnLoad(t *testing.T) {
	s := newSite(t, t.TempDir(), noCheckpoints)
	l := &testLog{t: t}
	s.mustApply(l, create("v", MiB))
	s.mustApply(l, create("w", MiB))
	s.mustApply(l, &AcquireLease{Volume: "v", Site: "a"})
	s.mustApply(l, &AcquireLease{Volume: "w", Site: "a"})
	s.crashInside(l.add(&DeleteVolume{Name: "v"}))
	if got := s.fsm.Leases(); len(got) != 1 || got["w"] != (Lease{Holder: "a", Epoch: 1}) {
		t.Fatalf("leases after loading the pre-delete state: %v, want only w's", got)
	}
}

// TestDeleteOfMissingVolumeDropsLease: the replayed Delete itself drops a
// lease of a volume that is gone (white box: the entry is injected, as a
// state loaded by an FSM without the load-time check would hold it).
func TestDeleteOfMissingVolumeDropsLease(t *testing.T) {
	s := newSite(t, t.TempDir(), noCheckpoints)
	l := &testLog{t: t}
	s.mustApply(l, create("w", MiB))
	s.fsm.setLease("v", Lease{Holder: "a", Epoch: 4}, true)
	if r := s.applyLog(l.add(&DeleteVolume{Name: "v"})); !errors.Is(r.Err, ErrUnknownVolume) {
		t.Fatalf("delete of a missing volume: %v, want ErrUnknownVolume", r.Err)
	}
	if got := s.fsm.Leases(); len(got) != 0 {
		t.Fatalf("leases after the delete: %v", got)
	}
}

// TestVerifyAfterStreamDuringRestartReplay: a site that crashed holds, in
// its volumes, effects of entries after its checkpoint; if it streams a
// snapshot while it replays them, the receiver's fuzzy bound must cover
// those entries, or its verify reports below them are exact-looking and
// differ from everyone else's: a false alarm (issue 11). A real difference
// found after the bound is still reported.
func TestVerifyAfterStreamDuringRestartReplay(t *testing.T) {
	rng := rand.New(rand.NewPCG(21, 22))
	ref := newSite(t, t.TempDir(), noCheckpoints)
	a := newSite(t, t.TempDir(), noCheckpoints)
	ssA := a.snapStore()
	l := &testLog{t: t}
	both := func(c Command) {
		t.Helper()
		e := l.add(c)
		if r := ref.applyLog(e); r.Err != nil {
			t.Fatalf("reference: %v", r.Err)
		}
		if r := a.applyLog(e); r.Err != nil {
			t.Fatalf("a: %v", r.Err)
		}
	}
	verify := func(id string) *VerifyChunks {
		return &VerifyChunks{ID: id, Volume: "v", Off: 0, Len: 4 * MiB, ChunkSize: MiB}
	}
	both(create("v", 4*MiB))                                                                                 // 1
	both(&WriteBatch{Volume: "v", Session: 1, Seq: 1, Ops: []Op{write(0, randBytes(rng, MiB))}})             // 2
	id := takeSnapshot(t, a, ssA, 2)                                                                         // S = A = C = 2
	both(verify("v3"))                                                                                       // 3
	both(&WriteBatch{Volume: "v", Session: 1, Seq: 2, Ops: []Op{write(0, randBytes(rng, MiB))}})             // 4
	both(verify("v5"))                                                                                       // 5
	both(&WriteBatch{Volume: "v", Session: 1, Seq: 3, Ops: []Op{write(MiB, randBytes(rng, MiB))}})           // 6
	both(&WriteBatch{Volume: "v", Session: 1, Seq: 4, Ops: []Op{write(2*MiB+4096, randBytes(rng, 64*KiB))}}) // 7
	lastBeforeCrash := uint64(len(l.entries))

	// kill -9: the state file is at 2, the volumes hold the effects of 4, 6
	// and 7. The wiring tells the FSM the raft log's last index.
	a.crash()
	a.fsm.SetReplayBound(lastBeforeCrash)
	ssA = a.snapStore()
	if got := a.fsm.AppliedIndex(); got != 2 {
		t.Fatalf("a restarted at %d, want 2", got)
	}
	a.replay(l.entries[:3]) // the replay has reached 3 when raft streams the snapshot
	meta, stream := openStream(t, ssA, id)
	_, end, _, err := parseFull(stream)
	if err != nil {
		t.Fatal(err)
	}
	if end.FuzzyUntil <= lastBeforeCrash {
		t.Errorf("stream's fuzzy-until %d does not cover the entries up to %d the volumes already reflect", end.FuzzyUntil, lastBeforeCrash)
	}
	b := newSite(t, t.TempDir(), noCheckpoints)
	ssB := b.snapStore()
	rid, err := receive(t, ssB, meta, bytes.NewReader(stream))
	if err != nil {
		t.Fatal(err)
	}
	_, src, err := ssB.Open(rid)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.fsm.Restore(src); err != nil {
		t.Fatal(err)
	}
	// b's volumes are now ahead of its applied index (2) too: a snapshot
	// it streams from them before passing the bound must say so.
	ssB = b.snapStore()
	bid := takeSnapshot(t, b, ssB, 2)
	if _, bstream := openStream(t, ssB, bid); true {
		_, bend, _, err := parseFull(bstream)
		if err != nil {
			t.Fatal(err)
		}
		if bend.FuzzyUntil < end.FuzzyUntil {
			t.Errorf("a restored site's stream has fuzzy-until %d, below the bound %d of the image it installed", bend.FuzzyUntil, end.FuzzyUntil)
		}
	}
	b.replay(l.entries[2:])
	a.replay(l.entries[3:])
	sameState(t, ref, a)
	sameState(t, ref, b)

	// No site may report a difference for 3 or 5: b's image and a's
	// volumes held later writes then; their reports must be Fuzzy.
	for _, vid := range []string{"v3", "v5"} {
		want, _ := ref.fsm.VerifyResult(vid)
		if want.Fuzzy || len(want.Hashes) != 4 {
			t.Fatalf("reference report %s: %+v", vid, want)
		}
		for name, s := range map[string]*site{"a": a, "b": b} {
			rep, ok := s.fsm.VerifyResult(vid)
			if !ok {
				t.Fatalf("%s has no report %s", name, vid)
			}
			if !rep.Fuzzy && fmt.Sprint(rep.Hashes) != fmt.Sprint(want.Hashes) {
				t.Errorf("%s: false alarm: report %s is not marked fuzzy and differs from the reference", name, vid)
			}
		}
	}

	// Past the bound every report is exact, and a real difference shows.
	all := []*site{ref, a, b}
	apply := func(c Command) {
		t.Helper()
		e := l.add(c)
		for _, s := range all {
			if r := s.applyLog(e); r.Err != nil {
				t.Fatal(r.Err)
			}
		}
	}
	check := func(vid string, wantDiff map[*site]bool) {
		t.Helper()
		want, _ := ref.fsm.VerifyResult(vid)
		for _, s := range all[1:] {
			rep, _ := s.fsm.VerifyResult(vid)
			if rep.Fuzzy {
				t.Fatalf("report %s at index %d still fuzzy", vid, rep.Index)
			}
			if differ := fmt.Sprint(rep.Hashes) != fmt.Sprint(want.Hashes); differ != wantDiff[s] {
				t.Fatalf("report %s: differs %v, want %v", vid, differ, wantDiff[s])
			}
		}
	}
	apply(verify("v9"))
	check("v9", nil)
	v, err := b.store.Get("v")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt([]byte("divergence"), 3*MiB+17); err != nil { // behind the FSM's back
		t.Fatal(err)
	}
	apply(verify("v10"))
	check("v10", map[*site]bool{b: true})
}

// TestCrashReplayRandom: random command sequences (creates, identical and
// conflicting re-creates, deletes, resizes, write batches with good, stale
// and wrong epochs and sequence numbers, lease acquire and release, session
// ends, verifies) are applied to a reference site and to a site that is
// killed at random points: after an entry (with the state file at any
// checkpoint it could hold then) or inside a metadata command (between the
// store operation and the checkpoint after it). After every crash the log
// is replayed and the whole replicated state — volume metadata and bytes,
// sessions, leases — and every later verdict must equal the reference's,
// and no verify report of the crashed site may be exact-looking yet differ
// (the site is told the raft log's last index, as cluster must do).
func TestCrashReplayRandom(t *testing.T) {
	seeds := 10 // before the fixes: seeds 3, 4, 6, 7 kept a deleted volume's lease, 0 and 2 raised a false alarm in a replayed verify
	if testing.Short() {
		seeds = 4
	}
	for seed := range seeds {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { crashReplayRun(t, uint64(seed)) })
	}
}

func crashReplayRun(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 0xc4a5))
	opts := Options{MaxSessions: 4, CheckpointInterval: time.Hour}
	ref := newSite(t, t.TempDir(), opts)
	opts.CheckpointBytes = int64(4+rng.IntN(60)) * KiB // periodic background checkpoints
	s := newSite(t, t.TempDir(), opts)
	l := &testLog{t: t}
	gen := &cmdGen{rng: rng, ref: ref, seq: map[uint64]uint64{}}

	type saved struct {
		index uint64
		state []byte
	}
	var states []saved // state files s held, oldest first
	minState := uint64(0)
	record := func() uint64 {
		b := s.stateFile()
		img, err := parseStateFile(b)
		if err != nil {
			t.Fatal(err)
		}
		if n := len(states); n == 0 || !bytes.Equal(states[n-1].state, b) {
			states = append(states, saved{img.Applied, b})
		}
		return img.Applied
	}
	crashes := 0
	for i := range 60 {
		cmd := gen.next()
		e := l.add(cmd)
		rr := ref.applyLog(e)
		metaBefore := s.store.List()
		isMeta := false
		switch cmd.(type) {
		case *CreateVolume, *DeleteVolume, *ResizeVolume:
			isMeta = true
		}
		var rs *Result
		crashed := false
		switch {
		case isMeta && rng.IntN(4) == 0:
			crashed = true
			s.crashInside(e)
			s.fsm.SetReplayBound(e.Index) // the raft log's last index
			crashes++
			s.replay(l.entries)
		default:
			rs = s.applyLog(e)
			if ErrorCode(rs.Err) != ErrorCode(rr.Err) || rs.Duplicate != rr.Duplicate {
				t.Fatalf("entry %d %T: crashed site %v (dup %v), reference %v (dup %v)", e.Index, cmd, rs.Err, rs.Duplicate, rr.Err, rr.Duplicate)
			}
		}
		cur := record()
		if !sameMetaList(metaBefore, s.store.List()) {
			// The volume metadata changed: a state file older than
			// the current one (the checkpoint at e, or the one before
			// e after a crash inside it) cannot be current any more.
			minState = cur
		}
		if rs != nil && rng.IntN(10) == 0 {
			// kill -9 after e, the state file at any checkpoint it
			// could hold now (later ones "not yet written").
			_ = s.fsm.reapCheckpoint(true)
			record()
			var cands []saved
			for _, st := range states {
				if st.index >= minState {
					cands = append(cands, st)
				}
			}
			if len(cands) == 0 {
				t.Fatalf("no state file at or after %d", minState)
			}
			s.crashWithState(cands[rng.IntN(len(cands))].state)
			s.fsm.SetReplayBound(e.Index)
			crashed = true
			crashes++
			s.replay(l.entries)
		}
		if !crashed && i%5 != 4 {
			continue // the verdicts were compared; the whole state every 5 entries and after every crash
		}
		if err := diffState(ref, s); err != nil {
			t.Fatalf("after entry %d (%T, %d crashes): %v", e.Index, cmd, crashes, err)
		}
		if got, want := s.fsm.AppliedIndex(), ref.fsm.AppliedIndex(); got != want {
			t.Fatalf("applied %d, reference %d", got, want)
		}
		// No false alarm: a verify report of the crashed site (replayed
		// or not) is exact or marked fuzzy.
		for _, id := range gen.verifies {
			got, ok := s.fsm.VerifyResult(id)
			if !ok || got.Fuzzy {
				continue
			}
			if want, _ := ref.fsm.VerifyResult(id); fmt.Sprint(got.Hashes) != fmt.Sprint(want.Hashes) {
				t.Fatalf("verify %s at index %d: the crashed site's report is not fuzzy and differs from the reference", id, got.Index)
			}
		}
	}
	if crashes == 0 {
		t.Log("no crash in this sequence")
	}
	gen.stats(t)
}

func sameMetaList(a, b []volume.Meta) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !sameMeta(a[i], b[i]) {
			return false
		}
	}
	return true
}

// cmdGen generates random commands, mostly plausible ones, looking at the
// reference site's state (which has applied every command generated so far).
type cmdGen struct {
	rng      *rand.Rand
	ref      *site
	seq      map[uint64]uint64 // last seq sent per session
	seen     map[string]int    // command kinds generated
	verifies []string          // IDs of the verifies generated
}

var genVolumes = []string{"a", "b", "c"}
var genSites = []string{"s1", "s2", "s3"}

func (g *cmdGen) next() Command {
	c := g.pick()
	if g.seen == nil {
		g.seen = map[string]int{}
	}
	g.seen[fmt.Sprintf("%T", c)]++
	return c
}

func (g *cmdGen) stats(t *testing.T) {
	t.Logf("commands: %v", g.seen)
}

func (g *cmdGen) pick() Command {
	r := g.rng
	name := genVolumes[r.IntN(len(genVolumes))]
	v, err := g.ref.store.Get(name)
	exists := err == nil
	var created int64
	var size int64
	if exists {
		created, size = v.Meta().Created.UnixNano(), v.Size()
	}
	lease, _ := g.ref.fsm.Lease(name)
	switch k := r.IntN(100); {
	case k < 12 || !exists && k < 40:
		c := &CreateVolume{Name: name, Size: int64(1+r.IntN(8)) * 32 * KiB, BlockSize: 4096, Created: testCreated + int64(r.IntN(1000))}
		if exists && r.IntN(2) == 0 { // an identical retry
			c.Size, c.Created = size, created
		}
		return c
	case k < 18:
		return &DeleteVolume{Name: name}
	case k < 24:
		return &ResizeVolume{Name: name, Size: int64(1+r.IntN(8)) * 32 * KiB}
	case k < 34:
		prev := lease.Epoch
		if r.IntN(6) == 0 {
			prev = uint64(r.IntN(3))
		}
		c := &AcquireLease{Volume: name, Site: genSites[r.IntN(len(genSites))], Prev: prev}
		if r.IntN(2) == 0 {
			c.Created = created
		}
		return c
	case k < 40:
		site := lease.Holder
		if site == "" || r.IntN(5) == 0 {
			site = genSites[r.IntN(len(genSites))]
		}
		ep := lease.Epoch
		if r.IntN(5) == 0 {
			ep++
		}
		return &ReleaseLease{Volume: name, Site: site, Epoch: ep}
	case k < 45:
		sess := uint64(1 + r.IntN(6))
		delete(g.seq, sess)
		return &EndSession{Session: sess}
	case k < 52 && exists:
		id := fmt.Sprint("x", len(g.verifies))
		g.verifies = append(g.verifies, id)
		return &VerifyChunks{ID: id, Volume: name, Len: size, ChunkSize: 16 * KiB}
	}
	// A write batch.
	sess := uint64(1 + r.IntN(6))
	seq := g.seq[sess] + 1
	switch r.IntN(12) {
	case 0:
		seq = max(1, seq-1) // a resend
	case 1:
		seq++ // a gap
	}
	g.seq[sess] = max(g.seq[sess], seq)
	b := &WriteBatch{Volume: name, Session: sess, Seq: seq, Epoch: lease.Epoch}
	switch r.IntN(10) {
	case 0:
		b.Epoch = lease.Epoch + 1
	case 1:
		b.Epoch = 0
	}
	if r.IntN(3) > 0 {
		b.Created = created
	}
	if size == 0 {
		size = 64 * KiB
	}
	for range 1 + r.IntN(3) {
		off := r.Int64N(size)
		ln := min(r.Int64N(16*KiB)+1, size-off)
		if r.IntN(25) == 0 {
			ln = size // out of range unless off is 0
		}
		switch r.IntN(5) {
		case 0:
			b.Ops = append(b.Ops, Op{Kind: OpTrim, Off: off, Len: ln})
		case 1:
			b.Ops = append(b.Ops, Op{Kind: OpZero, NoHole: r.IntN(2) == 0, Off: off, Len: ln})
		default:
			b.Ops = append(b.Ops, write(off, randBytes(r, int(ln))))
		}
	}
	return b
}

// TestRestoreDropsOrphanLeases: a snapshot taken by a site that still had
// an orphan lease (the defect of a replayed Delete) installs without it.
func TestRestoreDropsOrphanLeases(t *testing.T) {
	src := newSite(t, t.TempDir(), noCheckpoints)
	l := &testLog{t: t}
	src.mustApply(l, create("w", MiB))
	src.mustApply(l, &AcquireLease{Volume: "w", Site: "a"})
	src.fsm.setLease("gone", Lease{Holder: "a", Epoch: 2}, true) // as an old site's replay left it
	srcSS := src.snapStore()
	id := takeSnapshot(t, src, srcSS, 2)
	dst := newSite(t, t.TempDir(), noCheckpoints)
	install(t, srcSS, id, dst, dst.snapStore())
	if got := dst.fsm.Leases(); len(got) != 1 || got["w"] != (Lease{Holder: "a", Epoch: 1}) {
		t.Fatalf("leases after restore: %v, want only w's", got)
	}
	dst.restart()
	if got := dst.fsm.Leases(); len(got) != 1 {
		t.Fatalf("leases after restart: %v", got)
	}
}
