package fsm

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/raft"
)

var testConfig = raft.Configuration{Servers: []raft.Server{
	{Suffrage: raft.Voter, ID: "a", Address: "127.0.0.1:1"},
	{Suffrage: raft.Voter, ID: "b", Address: "127.0.0.1:2"},
}}

// snapStore returns the site's snapshot store (retain 2).
func (s *site) snapStore() raft.SnapshotStore {
	s.t.Helper()
	ss, err := s.fsm.SnapshotStore(filepath.Join(s.dir, "snapshots"), 2)
	if err != nil {
		s.t.Fatalf("SnapshotStore: %v", err)
	}
	return ss
}

// takeSnapshot does what raft's takeSnapshot does: FSM.Snapshot, Create,
// Persist. index is raft's index (>= the FSM's applied index).
func takeSnapshot(t testing.TB, s *site, ss raft.SnapshotStore, index uint64) string {
	t.Helper()
	snap, err := s.fsm.Snapshot()
	if err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	defer snap.Release()
	sink, err := ss.Create(1, index, 3, testConfig, 1, nil)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	if err := snap.Persist(sink); err != nil {
		t.Fatalf("Persist: %v", err)
	}
	return sink.ID()
}

// openStream opens a snapshot and reads the whole stream, checking that its
// length is the announced Size.
func openStream(t testing.TB, ss raft.SnapshotStore, id string) (*raft.SnapshotMeta, []byte) {
	t.Helper()
	meta, rc, err := ss.Open(id)
	if err != nil {
		t.Fatalf("Open(%s): %v", id, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("reading snapshot %s: %v", id, err)
	}
	if int64(len(b)) != meta.Size {
		t.Fatalf("snapshot %s: stream of %d bytes, meta.Size %d", id, len(b), meta.Size)
	}
	return meta, b
}

// receive does what raft's installSnapshot does with a leader's stream up
// to (not including) Restore: Create, copy, Close. It returns the ID.
func receive(t testing.TB, ss raft.SnapshotStore, meta *raft.SnapshotMeta, stream io.Reader) (string, error) {
	t.Helper()
	sink, err := ss.Create(1, meta.Index, meta.Term, meta.Configuration, meta.ConfigurationIndex, nil)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	if _, err := io.Copy(sink, stream); err != nil {
		sink.Cancel()
		return "", err
	}
	return sink.ID(), sink.Close()
}

// install sends snapshot id of from to the site s: receive, then Restore
// from s's own store.
func install(t testing.TB, fromSS raft.SnapshotStore, id string, s *site, ss raft.SnapshotStore) {
	t.Helper()
	meta, rc, err := fromSS.Open(id)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer rc.Close()
	rid, err := receive(t, ss, meta, rc)
	if err != nil {
		t.Fatalf("receiving snapshot: %v", err)
	}
	_, src, err := ss.Open(rid)
	if err != nil {
		t.Fatalf("Open received: %v", err)
	}
	if err := s.fsm.Restore(src); err != nil {
		t.Fatalf("Restore: %v", err)
	}
}

// holes adds n log entries that never reach the FSM (raft no-ops).
func (l *testLog) holes(n int) {
	for range n {
		l.entries = append(l.entries, nil)
	}
}

func (s *site) replay(entries []*raft.Log) {
	s.t.Helper()
	for _, e := range entries {
		if e != nil {
			s.applyLog(e)
		}
	}
}

func TestSnapshotFuzzyRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	a := newSite(t, t.TempDir(), Options{CheckpointBytes: 256 * KiB})
	b := newSite(t, t.TempDir(), Options{})
	ssA, ssB := a.snapStore(), b.snapStore()
	l := &testLog{t: t}
	for _, c := range workload(rng, 40) {
		a.applyLog(l.add(c))
	}
	l.holes(2) // raft's snapshot index is past the last command
	snapIndex := uint64(len(l.entries))
	id := takeSnapshot(t, a, ssA, snapIndex)
	if img, _ := readStateFile(filepath.Join(a.dir, "fsm")); img.Applied != 40 {
		t.Fatalf("Snapshot did not checkpoint: state file at %d", img.Applied)
	}
	afterSnap := len(l.entries)

	// Entries after the snapshot: data, metadata, sessions.
	more := []Command{
		&WriteBatch{Volume: "a", Session: 9, Seq: 1, Ops: []Op{write(3*MiB+100, randBytes(rng, 300*KiB)), {Kind: OpTrim, Off: 0, Len: MiB}}},
		&VerifyChunks{ID: "early", Volume: "a", Off: 0, Len: 4 * MiB, ChunkSize: MiB},
		&ResizeVolume{Name: "a", Size: 6 * MiB},
		&WriteBatch{Volume: "a", Session: 9, Seq: 2, Ops: []Op{write(5*MiB, randBytes(rng, 10*KiB))}},
		&DeleteVolume{Name: "b"},
		create("c", 3*MiB),
		&WriteBatch{Volume: "c", Session: 10, Seq: 1, Ops: []Op{write(MiB, randBytes(rng, 2*MiB))}},
		&EndSession{Session: 1},
	}
	for _, c := range more {
		a.applyLog(l.add(c))
	}

	// Open the stream, read part of it, let A move on, read the rest.
	meta, rc, err := ssA.Open(id)
	if err != nil {
		t.Fatal(err)
	}
	if meta.Index != snapIndex || meta.Term != 3 || meta.ConfigurationIndex != 1 || len(meta.Configuration.Servers) != 2 || meta.Version != 1 {
		t.Fatalf("meta %+v", meta)
	}
	if meta.Size >= 6*MiB {
		t.Fatalf("stream of %d bytes: holes were not sent as zero runs", meta.Size)
	}
	var stream bytes.Buffer
	if _, err := io.CopyN(&stream, rc, meta.Size/2); err != nil {
		t.Fatal(err)
	}
	// A keeps applying while the rest of the stream is read.
	extra := workload(rng, 20)[2:]
	applied := make(chan struct{})
	go func() {
		defer close(applied)
		for _, c := range extra {
			wb := c.(*WriteBatch)
			wb.Volume = "a"
			wb.Session += 100
			a.applyLog(l.add(c))
		}
		a.applyLog(l.add(&ResizeVolume{Name: "a", Size: 2 * MiB}))
	}()
	_, err = io.Copy(&stream, rc)
	<-applied
	if err != nil {
		t.Fatal(err)
	}
	rc.Close()
	if int64(stream.Len()) != meta.Size {
		t.Fatalf("stream %d bytes, meta.Size %d", stream.Len(), meta.Size)
	}

	rid, err := receive(t, ssB, meta, &stream)
	if err != nil {
		t.Fatalf("receive: %v", err)
	}
	_, src, err := ssB.Open(rid)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.fsm.Restore(src); err != nil {
		t.Fatalf("Restore: %v", err)
	}
	if got := b.fsm.AppliedIndex(); got != snapIndex {
		t.Fatalf("B applied %d after restore, want %d", got, snapIndex)
	}
	b.replay(l.entries[afterSnap:])
	sameState(t, a, b)
	if a.fsm.AppliedIndex() != b.fsm.AppliedIndex() {
		t.Fatalf("applied %d vs %d", a.fsm.AppliedIndex(), b.fsm.AppliedIndex())
	}
	if rep, _ := b.fsm.VerifyResult("early"); !rep.Fuzzy {
		t.Fatal("verify replayed inside the fuzzy window not marked fuzzy")
	}
	if rep, _ := a.fsm.VerifyResult("early"); rep.Fuzzy {
		t.Fatal("leader's verify marked fuzzy")
	}

	// B restarts: nothing is restored or rewritten again.
	b.restart()
	b.snapStore() // its start-up recovery runs; it must restore nothing (checked next)
	b.replay(l.entries[afterSnap:])
	if st := b.fsm.Stats(); st.Restores != 0 || st.SkippedReplays != len(l.entries)-afterSnap {
		t.Fatalf("B after restart: %+v", st)
	}
	sameState(t, a, b)
}

func TestRestoreWritesOnlyDifferences(t *testing.T) {
	rng := rand.New(rand.NewPCG(13, 14))
	a := newSite(t, t.TempDir(), Options{})
	b := newSite(t, t.TempDir(), Options{})
	ssA, ssB := a.snapStore(), b.snapStore()
	l := &testLog{t: t}
	a.mustApply(l, create("v", 8*MiB))
	a.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 1, Ops: []Op{write(0, randBytes(rng, 8*MiB))}})
	install(t, ssA, takeSnapshot(t, a, ssA, uint64(len(l.entries))), b, ssB)
	st := b.fsm.Stats()
	if st.Restores != 1 || st.RestoreBytesWritten != 8*MiB {
		t.Fatalf("first restore: %+v", st)
	}
	sameState(t, a, b)

	a.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 2, Ops: []Op{
		write(2*MiB+7, []byte("changed")),
		write(5*MiB+MiB/2, []byte("changed too")),
		{Kind: OpTrim, Off: 7 * MiB, Len: MiB},
	}})
	install(t, ssA, takeSnapshot(t, a, ssA, uint64(len(l.entries))), b, ssB)
	st2 := b.fsm.Stats()
	if w, s := st2.RestoreBytesWritten-st.RestoreBytesWritten, st2.RestoreBytesSkipped-st.RestoreBytesSkipped; w != 3*MiB || s != 5*MiB {
		t.Fatalf("second restore wrote %d and skipped %d bytes; want 3 MiB and 5 MiB", w, s)
	}
	sameState(t, a, b)
	v, err := b.store.Get("v")
	if err != nil {
		t.Fatal(err)
	}
	if exts, _ := v.BlockStatus(7*MiB, MiB); len(exts) != 1 || !exts[0].Hole {
		t.Fatalf("trimmed chunk not a hole on B: %+v", exts)
	}
	// A third restore of the same state writes nothing.
	install(t, ssA, takeSnapshot(t, a, ssA, uint64(len(l.entries))), b, ssB)
	if st3 := b.fsm.Stats(); st3.RestoreBytesWritten != st2.RestoreBytesWritten {
		t.Fatalf("identical restore wrote %d bytes", st3.RestoreBytesWritten-st2.RestoreBytesWritten)
	}
}

func TestRestoreCorruptStream(t *testing.T) {
	rng := rand.New(rand.NewPCG(15, 16))
	a := newSite(t, t.TempDir(), Options{})
	b := newSite(t, t.TempDir(), Options{})
	ssA, ssB := a.snapStore(), b.snapStore()
	l := &testLog{t: t}
	for _, c := range workload(rng, 20) {
		a.applyLog(l.add(c))
	}
	meta, good := openStream(t, ssA, takeSnapshot(t, a, ssA, uint64(len(l.entries))))

	// The prologue is magic (8) + header record (19) + state record.
	flip := func(at int) []byte {
		c := append([]byte(nil), good...)
		c[at] ^= 0x10
		return c
	}
	bad := map[string][]byte{
		"truncated":       good[:len(good)-1],
		"truncated more":  good[:len(good)/2],
		"data bit flip":   flip(len(good) / 2),
		"end record":      flip(len(good) - 6),
		"trailing":        append(append([]byte(nil), good...), 0),
		"header bit flip": flip(12),
	}
	for name, stream := range bad {
		if _, err := receive(t, ssB, meta, bytes.NewReader(stream)); err == nil {
			t.Errorf("%s: sink accepted a corrupt stream", name)
		}
	}
	if list, _ := ssB.List(); len(list) != 0 {
		t.Fatalf("corrupt snapshots listed: %+v", list)
	}
	entries, _ := os.ReadDir(filepath.Join(b.dir, "snapshots"))
	if len(entries) != 0 {
		t.Fatalf("leftovers in the snapshot dir: %v", entries)
	}

	// Restore straight from a corrupt prologue: rejected, nothing changes.
	stateFile := filepath.Join(b.dir, "fsm", stateFileName)
	before, _ := os.ReadFile(stateFile)
	if err := b.fsm.Restore(io.NopCloser(bytes.NewReader(flip(30)))); err == nil {
		t.Fatal("corrupt state record restored")
	}
	if b.fsm.Stats().Failed != nil {
		t.Fatal("a rejected prologue failed the FSM")
	}
	// Corrupt data: rejected midway; the FSM is failed, the state file
	// keeps the old index (and says "restoring").
	if err := b.fsm.Restore(io.NopCloser(bytes.NewReader(bad["data bit flip"]))); err == nil {
		t.Fatal("corrupt data restored")
	}
	img, err := readStateFile(filepath.Join(b.dir, "fsm"))
	if err != nil || !img.Restoring || img.Applied != 0 {
		t.Fatalf("state after a failed restore: %+v %v (was %x)", img, err, before)
	}
	if r := b.applyLog(entry(t, 100, &EndSession{Session: 1})); !errors.Is(r.Err, ErrFailed) {
		t.Fatalf("Apply after a failed restore: %v", r.Err)
	}
	if err := b.fsm.Restore(io.NopCloser(bytes.NewReader(good))); err != nil {
		t.Fatalf("good restore after a bad one: %v", err)
	}
	sameState(t, a, b)
	if b.fsm.Stats().Failed != nil {
		t.Fatal("still failed")
	}
}

func TestRecoverInterruptedInstall(t *testing.T) {
	rng := rand.New(rand.NewPCG(17, 18))
	a := newSite(t, t.TempDir(), Options{})
	b := newSite(t, t.TempDir(), Options{})
	ssA, ssB := a.snapStore(), b.snapStore()
	l := &testLog{t: t}
	for _, c := range workload(rng, 20) {
		a.applyLog(l.add(c))
	}
	meta, stream := openStream(t, ssA, takeSnapshot(t, a, ssA, uint64(len(l.entries))))

	// B received the snapshot, then crashed before Restore.
	if _, err := receive(t, ssB, meta, bytes.NewReader(stream)); err != nil {
		t.Fatal(err)
	}
	b.crash()
	b.snapStore()
	if st := b.fsm.Stats(); st.Restores != 1 || st.AppliedIndex != 20 {
		t.Fatalf("start-up did not finish the install: %+v", st)
	}
	sameState(t, a, b)

	// B crashed in the middle of a Restore (simulated by a corrupt one).
	c := append([]byte(nil), stream...)
	c[len(c)/2] ^= 1
	if err := b.fsm.Restore(io.NopCloser(bytes.NewReader(c))); err == nil {
		t.Fatal("corrupt restore")
	}
	b.crash()
	if b.fsm.Stats().Failed == nil {
		t.Fatal("interrupted restore not remembered")
	}
	b.snapStore()
	if st := b.fsm.Stats(); st.Failed != nil || st.Restores != 1 {
		t.Fatalf("interrupted restore not finished at start-up: %+v", st)
	}
	sameState(t, a, b)

	// A's state file is rolled back behind its local snapshot.
	a.restart()
	stateFile := filepath.Join(a.dir, "fsm", stateFileName)
	if err := writeStateFile(filepath.Dir(stateFile), &stateImage{Applied: 5}); err != nil {
		t.Fatal(err)
	}
	a.crash()
	if _, err := a.fsm.SnapshotStore(filepath.Join(a.dir, "snapshots"), 2); err == nil || !strings.Contains(err.Error(), "rolled back") {
		t.Fatalf("rolled-back state accepted: %v", err)
	}
}

func TestSnapshotStore(t *testing.T) {
	a := newSite(t, t.TempDir(), Options{})
	l := &testLog{t: t}
	a.mustApply(l, create("v", 2*MiB))
	a.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 1, Ops: []Op{write(MiB, []byte("x"))}})
	dir := filepath.Join(a.dir, "snapshots")
	if err := os.MkdirAll(filepath.Join(dir, "1-1-1-1.tmp"), 0o700); err != nil {
		t.Fatal(err)
	}
	ss := a.snapStore()
	if _, err := os.Stat(filepath.Join(dir, "1-1-1-1.tmp")); !os.IsNotExist(err) {
		t.Fatal("leftover temporary snapshot not removed")
	}
	if list, err := ss.List(); err != nil || len(list) != 0 {
		t.Fatalf("empty store lists %v %v", list, err)
	}
	if _, err := ss.Create(0, 1, 1, testConfig, 1, nil); err == nil {
		t.Fatal("version 0 accepted")
	}

	ids := []string{takeSnapshot(t, a, ss, 10), takeSnapshot(t, a, ss, 30), takeSnapshot(t, a, ss, 20)}
	list, err := ss.List()
	if err != nil || len(list) != 2 || list[0].ID != ids[1] || list[1].ID != ids[2] {
		t.Fatalf("List = %+v, %v; want %s, %s (retain 2, newest first)", list, err, ids[1], ids[2])
	}
	m := list[0]
	if m.Index != 30 || m.Term != 3 || m.Version != 1 || m.ConfigurationIndex != 1 || len(m.Configuration.Servers) != 2 || m.Size <= 0 {
		t.Fatalf("meta %+v", m)
	}
	if _, _, err := ss.Open(ids[0]); err == nil {
		t.Fatal("reaped snapshot opens")
	}
	meta, stream := openStream(t, ss, ids[1])
	if meta.Size <= m.Size || meta.Size >= 2*MiB {
		t.Fatalf("full stream of %d bytes (state %d)", meta.Size, m.Size)
	}
	if _, _, img, err := parseFull(stream); err != nil || img.Applied != 2 || len(img.Volumes) != 1 {
		t.Fatalf("stream: %+v %v", img, err)
	}

	// Cancel discards.
	sink, err := ss.Create(1, 40, 3, testConfig, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	sink.Write([]byte("partial"))
	if err := sink.Cancel(); err != nil {
		t.Fatal(err)
	}
	// Garbage is refused by Close.
	sink, _ = ss.Create(1, 50, 3, testConfig, 1, nil)
	sink.Write([]byte("not a snapshot"))
	if err := sink.Close(); err == nil {
		t.Fatal("garbage snapshot accepted")
	}
	if list, _ := ss.List(); len(list) != 2 || list[0].ID != ids[1] {
		t.Fatalf("after cancel/garbage: %+v", list)
	}
	for _, bad := range []string{"", "..", "../x", ids[1] + ".tmp", "nope"} {
		if _, _, err := ss.Open(bad); err == nil {
			t.Fatalf("Open(%q) succeeded", bad)
		}
	}

	// A corrupt meta.json hides the snapshot.
	metaPath := filepath.Join(dir, ids[1], snapMetaFile)
	b, _ := os.ReadFile(metaPath)
	os.WriteFile(metaPath, bytes.Replace(b, []byte(`"Index":30`), []byte(`"Index":31`), 1), 0o600)
	if list, _ := ss.List(); len(list) != 1 || list[0].ID != ids[2] {
		t.Fatalf("corrupt meta listed: %+v", list)
	}
	if _, _, err := ss.Open(ids[1]); err == nil {
		t.Fatal("corrupt meta opens")
	}
}

// parseFull validates a full stream and returns its parts.
func parseFull(b []byte) (streamHeader, streamEnd, *stateImage, error) {
	rr := newRecordReader(bytes.NewReader(b))
	h, img, err := rr.readPrologue()
	if err != nil {
		return h, streamEnd{}, nil, err
	}
	if err := rr.readImage(h, img, nil); err != nil {
		return h, streamEnd{}, nil, err
	}
	e, err := rr.readEpilogue()
	return h, e, img, err
}

// A snapshot install over a copy with damaged blocks (bytes of its data
// file overwritten behind the volume's back, in a data chunk and in a
// chunk that should be zeros) rewrites the damaged chunks instead of
// failing on them, and leaves the copy identical and healthy.
func TestRestoreRewritesDamagedChunks(t *testing.T) {
	rng := rand.New(rand.NewPCG(15, 16))
	a := newSite(t, t.TempDir(), Options{})
	b := newSite(t, t.TempDir(), Options{})
	ssA, ssB := a.snapStore(), b.snapStore()
	l := &testLog{t: t}
	a.mustApply(l, create("v", 8*MiB))
	a.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 1, Ops: []Op{write(0, randBytes(rng, 6*MiB))}})
	install(t, ssA, takeSnapshot(t, a, ssA, uint64(len(l.entries))), b, ssB)
	sameState(t, a, b)

	f, err := os.OpenFile(filepath.Join(b.store.Dir(), "volumes", "v", "data"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{2*MiB + 10, 7*MiB + 4096} {
		if _, err := f.WriteAt([]byte("rot"), off); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	v, err := b.store.Get("v")
	if err != nil {
		t.Fatal(err)
	}
	if dmg, err := v.Scrub(0, 8*MiB); err != nil || len(dmg) != 2 {
		t.Fatalf("scrub of the damaged copy: %v %v", dmg, err)
	}
	before := b.fsm.Stats()
	install(t, ssA, takeSnapshot(t, a, ssA, uint64(len(l.entries))), b, ssB)
	st := b.fsm.Stats()
	// The data chunk whole, and the one 4 KiB block the garbage allocated
	// in the zero run (the rest of it is a hole, skipped).
	if w := st.RestoreBytesWritten - before.RestoreBytesWritten; w != MiB+4096 {
		t.Fatalf("restore wrote %d bytes, want the damaged 1 MiB data chunk and 4 KiB of the zero run", w)
	}
	if d := v.Damaged(); len(d) != 0 {
		t.Fatalf("still damaged after the restore: %v", d)
	}
	sameState(t, a, b)
}
