package fsm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
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

// noCheckpoints keeps periodic checkpoints out of a test.
var noCheckpoints = Options{CheckpointBytes: 1 << 40, CheckpointInterval: time.Hour}

func TestApplyOps(t *testing.T) {
	s := newSite(t, t.TempDir(), noCheckpoints)
	l := &testLog{t: t}
	s.mustApply(l, create("v", 1*MiB))
	rng := rand.New(rand.NewPCG(1, 2))
	want := make([]byte, MiB)

	a := randBytes(rng, 64*KiB)
	b := randBytes(rng, 5000)
	s.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 1, Ops: []Op{write(0, a), write(100*KiB, b)}})
	copy(want, a)
	copy(want[100*KiB:], b)
	if !bytes.Equal(s.read("v"), want) {
		t.Fatal("after writes")
	}

	s.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 2, Ops: []Op{
		{Kind: OpTrim, Off: 4 * KiB, Len: 8 * KiB},
		{Kind: OpZero, Off: 100 * KiB, Len: 100},
		{Kind: OpZero, NoHole: true, Off: 60 * KiB, Len: 3 * KiB},
		write(MiB-3, []byte("end")),
		{Kind: OpTrim, Off: 0, Len: 0}, // empty: no-op
	}})
	clear(want[4*KiB : 12*KiB])
	clear(want[100*KiB : 100*KiB+100])
	clear(want[60*KiB : 63*KiB])
	copy(want[MiB-3:], "end")
	if !bytes.Equal(s.read("v"), want) {
		t.Fatal("after trim/zero")
	}
	if got := s.fsm.AppliedIndex(); got != 3 {
		t.Fatalf("AppliedIndex = %d, want 3", got)
	}
}

func TestApplySessions(t *testing.T) {
	s := newSite(t, t.TempDir(), noCheckpoints)
	l := &testLog{t: t}
	s.mustApply(l, create("v", MiB))
	w := func(seq uint64, b byte) *WriteBatch {
		return &WriteBatch{Volume: "v", Session: 7, Seq: seq, Ops: []Op{write(int64(seq)*10, []byte{b})}}
	}
	check := func(cmd Command, wantErr error, wantDup bool) {
		t.Helper()
		r := s.applyLog(l.add(cmd))
		if !errors.Is(r.Err, wantErr) || (wantErr == nil && r.Err != nil) || r.Duplicate != wantDup {
			t.Fatalf("entry %d (%#v): Err %v Duplicate %v; want %v %v", r.Index, cmd, r.Err, r.Duplicate, wantErr, wantDup)
		}
	}
	check(w(2, 'x'), ErrSeqGap, false) // unknown session must start at 1
	check(w(1, 'a'), nil, false)
	check(w(1, 'X'), nil, true) // duplicate: not applied again
	check(w(3, 'X'), ErrSeqGap, false)
	check(w(2, 'b'), nil, false)
	check(w(3, 'c'), nil, false)
	check(&WriteBatch{Volume: "v", Session: 7, Seq: 4, Ops: []Op{write(MiB-1, []byte("xx"))}}, ErrOutOfRange, false)
	// A rejected batch is lost data for its writer: the session is failed
	// for good, so neither a resend (which could otherwise pass as a
	// duplicate) nor a later batch succeeds.
	check(w(4, 'X'), ErrOutOfRange, false)
	check(w(2, 'X'), ErrOutOfRange, false)
	check(w(5, 'X'), ErrOutOfRange, false)
	check(&WriteBatch{Volume: "nope", Session: 9, Seq: 1}, ErrUnknownVolume, false)
	check(&WriteBatch{Volume: "v", Session: 9, Seq: 1}, ErrUnknownVolume, false) // the resend, lost answer
	check(&WriteBatch{Volume: "v", Session: 0, Seq: 1}, ErrInvalidCommand, false)
	check(&WriteBatch{Volume: "v", Session: 8, Seq: 0}, ErrInvalidCommand, false)
	check(&EndSession{Session: 0}, ErrInvalidCommand, false)

	got := s.read("v")
	for seq, want := range map[int]byte{10: 'a', 20: 'b', 30: 'c', 40: 0, 50: 0} {
		if got[seq] != want {
			t.Errorf("byte %d = %q, want %q", seq, got[seq], want)
		}
	}
	if sess := s.fsm.sessions[7]; sess == nil || sess.LastSeq != 4 || sess.Failed != "out_of_range" {
		t.Fatalf("session 7 = %+v", sess)
	}
	check(&EndSession{Session: 7}, nil, false)
	check(&EndSession{Session: 7}, nil, false) // idempotent
	check(w(7, 'g'), ErrSeqGap, false)         // forgotten
	check(w(1, 'h'), nil, false)               // a new life
	if got := s.read("v")[10]; got != 'h' {
		t.Fatalf("byte 10 = %q", got)
	}
}

func TestRejectedBatchChangesNothing(t *testing.T) {
	s := newSite(t, t.TempDir(), noCheckpoints)
	l := &testLog{t: t}
	s.mustApply(l, create("v", MiB))
	s.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 1, Ops: []Op{write(0, bytes.Repeat([]byte{1}, 8192))}})
	before := s.read("v")
	bad := []*WriteBatch{
		{Volume: "v", Session: 1, Seq: 2, Ops: []Op{write(0, []byte("first op is fine")), write(MiB, []byte("x"))}},
		{Volume: "v", Session: 1, Seq: 3, Ops: []Op{{Kind: OpTrim, Off: 0, Len: 4096}, {Kind: OpZero, Off: 4096, Len: MiB}}},
		{Volume: "v", Session: 1, Seq: 4, Ops: []Op{{Kind: OpTrim, Off: 0, Len: 4096}, {Kind: OpZero, Off: 2 * MiB, Len: 0}}},
	}
	for _, b := range bad {
		if r := s.applyLog(l.add(b)); !errors.Is(r.Err, ErrOutOfRange) {
			t.Fatalf("seq %d: %v, want ErrOutOfRange", b.Seq, r.Err)
		}
	}
	if !bytes.Equal(s.read("v"), before) {
		t.Fatal("a rejected batch changed the volume")
	}
	// Garbage entries are rejected and change nothing either.
	r := s.applyLog(&raft.Log{Index: uint64(len(l.entries) + 1), Type: raft.LogCommand, Data: []byte("garbage")})
	if !errors.Is(r.Err, ErrBadCommand) {
		t.Fatalf("garbage: %v", r.Err)
	}
	l.entries = append(l.entries, nil)
	if got := s.fsm.AppliedIndex(); got != uint64(len(l.entries)) {
		t.Fatalf("AppliedIndex %d, want %d", got, len(l.entries))
	}
}

func TestSessionEviction(t *testing.T) {
	opts := noCheckpoints
	opts.MaxSessions = 3
	s := newSite(t, t.TempDir(), opts)
	l := &testLog{t: t}
	s.mustApply(l, create("v", MiB))
	wb := func(sess, seq uint64) *WriteBatch { return &WriteBatch{Volume: "v", Session: sess, Seq: seq} }
	s.mustApply(l, wb(1, 1))
	s.mustApply(l, wb(2, 1))
	s.mustApply(l, wb(3, 1))
	s.mustApply(l, wb(1, 2)) // 1 is now the most recent; 2 the least
	s.mustApply(l, wb(4, 1)) // evicts 2
	if _, ok := s.fsm.sessions[2]; ok || len(s.fsm.sessions) != 3 {
		t.Fatalf("sessions after eviction: %v", sessionList(s.fsm.sessions))
	}
	if r := s.applyLog(l.add(wb(2, 2))); !errors.Is(r.Err, ErrSeqGap) {
		t.Fatalf("evicted session: %v, want ErrSeqGap", r.Err)
	}
	if r := s.applyLog(l.add(wb(1, 2))); !r.Duplicate {
		t.Fatalf("session 1 lost: %+v", r)
	}
	if st := s.fsm.Stats(); st.Sessions != 3 {
		t.Fatalf("Stats.Sessions = %d", st.Sessions)
	}
}

func TestMetaCommands(t *testing.T) {
	s := newSite(t, t.TempDir(), noCheckpoints)
	l := &testLog{t: t}
	expect := func(cmd Command, want error) {
		t.Helper()
		r := s.applyLog(l.add(cmd))
		if !errors.Is(r.Err, want) || (want == nil && r.Err != nil) {
			t.Fatalf("%#v: %v, want %v", cmd, r.Err, want)
		}
	}
	expect(create("v", 2*MiB), nil)
	v, err := s.store.Get("v")
	if err != nil {
		t.Fatal(err)
	}
	if m := v.Meta(); m.Created.UnixNano() != testCreated || m.BlockSize != 4096 || m.Size != 2*MiB {
		t.Fatalf("meta %+v", m)
	}
	expect(create("v", 2*MiB), nil) // identical: idempotent no-op
	expect(&CreateVolume{Name: "v", Size: 2 * MiB, BlockSize: 4096, Created: testCreated + 1}, ErrVolumeExists)
	expect(&CreateVolume{Name: "v", Size: 2 * MiB, BlockSize: 4096, Created: testCreated, SyncWrites: true}, ErrVolumeExists)
	expect(&CreateVolume{Name: "s", Size: 8192, Created: 1, SyncWrites: true}, nil)
	if v, _ := s.store.Get("s"); !v.Meta().SyncWrites {
		t.Fatalf("SyncWrites not stored: %+v", v.Meta())
	}
	expect(create("v", 4*MiB), ErrVolumeExists)
	expect(&CreateVolume{Name: "w", Size: 1000, Created: 1}, ErrInvalidCommand)
	expect(&CreateVolume{Name: "w", Size: 4096, BlockSize: 1000, Created: 1}, ErrInvalidCommand)
	expect(&CreateVolume{Name: "w", Size: 8192, Created: 1}, nil) // default block size
	if v, _ := s.store.Get("w"); v.Meta().BlockSize != volume.DefaultBlockSize {
		t.Fatalf("default block size not applied: %+v", v.Meta())
	}
	expect(&ResizeVolume{Name: "v", Size: 3 * MiB}, nil)
	expect(&ResizeVolume{Name: "v", Size: 3*MiB + 1}, ErrInvalidCommand)
	expect(&ResizeVolume{Name: "v", Size: 0}, ErrInvalidCommand)
	expect(&ResizeVolume{Name: "x", Size: MiB}, ErrUnknownVolume)
	expect(&ResizeVolume{Name: "v", Size: 3 * MiB}, nil) // same size
	if v, _ := s.store.Get("v"); v.Size() != 3*MiB {
		t.Fatalf("size %d", v.Size())
	}
	expect(&DeleteVolume{Name: "v"}, nil)
	expect(&DeleteVolume{Name: "v"}, ErrUnknownVolume)
	if _, err := s.store.Get("v"); !errors.Is(err, volume.ErrNotFound) {
		t.Fatalf("deleted volume: %v", err)
	}
	// Every successful meta change checkpointed synchronously.
	img, err := readStateFile(filepath.Join(s.dir, "fsm"))
	if err != nil || img.Applied != uint64(len(l.entries)-1) {
		t.Fatalf("state file %+v %v, want applied %d", img, err, len(l.entries)-1)
	}
}

func TestVerifyChunks(t *testing.T) {
	s := newSite(t, t.TempDir(), noCheckpoints)
	l := &testLog{t: t}
	s.mustApply(l, create("v", 2*MiB))
	data := randBytes(rand.New(rand.NewPCG(3, 4)), 100*KiB)
	s.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 1, Ops: []Op{write(10*KiB, data)}})
	r := s.mustApply(l, &VerifyChunks{ID: "c1", Volume: "v", Off: 8 * KiB, Len: 150 * KiB, ChunkSize: 64 * KiB})
	rep, ok := s.fsm.VerifyResult("c1")
	if !ok || rep.Index != r.Index || rep.Volume != "v" || len(rep.Hashes) != 3 || rep.Fuzzy {
		t.Fatalf("report %+v %v", rep, ok)
	}
	all := s.read("v")
	for i, h := range rep.Hashes {
		off := 8*KiB + i*64*KiB
		sum := sha256.Sum256(all[off:min(off+64*KiB, 8*KiB+150*KiB)])
		if h != hex.EncodeToString(sum[:]) {
			t.Fatalf("chunk %d hash mismatch", i)
		}
	}
	for _, c := range []struct {
		cmd  *VerifyChunks
		want error
	}{
		{&VerifyChunks{ID: "x", Volume: "v", Len: MiB, ChunkSize: 4095}, ErrInvalidCommand},
		{&VerifyChunks{ID: "x", Volume: "v", Len: 0, ChunkSize: 4096}, ErrInvalidCommand},
		{&VerifyChunks{ID: "x", Volume: "v", Len: MaxVerifyLen + 1, ChunkSize: 4096}, ErrInvalidCommand},
		{&VerifyChunks{ID: "x", Volume: "v", Off: MiB, Len: MiB + 1, ChunkSize: 4096}, ErrOutOfRange},
		{&VerifyChunks{ID: "x", Volume: "nope", Len: 1, ChunkSize: 4096}, ErrUnknownVolume},
	} {
		if r := s.applyLog(l.add(c.cmd)); !errors.Is(r.Err, c.want) {
			t.Fatalf("%+v: %v, want %v", c.cmd, r.Err, c.want)
		}
	}
	if _, ok := s.fsm.VerifyResult("x"); ok {
		t.Fatal("a rejected verify left a report")
	}
	for i := range maxVerifyResults + 5 {
		s.mustApply(l, &VerifyChunks{ID: fmt.Sprint("id", i), Volume: "v", Len: 4096, ChunkSize: 4096})
	}
	if _, ok := s.fsm.VerifyResult("c1"); ok {
		t.Fatal("oldest report not evicted")
	}
	if _, ok := s.fsm.VerifyResult(fmt.Sprint("id", maxVerifyResults+4)); !ok {
		t.Fatal("newest report missing")
	}
	if len(s.fsm.verify) != maxVerifyResults {
		t.Fatalf("%d reports kept", len(s.fsm.verify))
	}
}

// workload returns a mix of commands on volumes "a" and "b".
func workload(rng *rand.Rand, n int) []Command {
	cmds := []Command{create("a", 4*MiB), &CreateVolume{Name: "b", Size: 2 * MiB, Created: testCreated + 1, SyncWrites: true}}
	seq := map[uint64]uint64{}
	for len(cmds) < n {
		sess := uint64(rng.IntN(3) + 1)
		name, size := "a", int64(4*MiB)
		if rng.IntN(3) == 0 {
			name, size = "b", 2*MiB
		}
		var ops []Op
		for range rng.IntN(4) + 1 {
			off := rng.Int64N(size - 64*KiB)
			ln := rng.Int64N(64*KiB) + 1
			switch rng.IntN(5) {
			case 0:
				ops = append(ops, Op{Kind: OpTrim, Off: off, Len: ln})
			case 1:
				ops = append(ops, Op{Kind: OpZero, NoHole: rng.IntN(2) == 0, Off: off, Len: ln})
			default:
				ops = append(ops, write(off, randBytes(rng, int(ln))))
			}
		}
		seq[sess]++
		cmds = append(cmds, &WriteBatch{Volume: name, Session: sess, Seq: seq[sess], Ops: ops})
	}
	return cmds
}

func TestCrashReplay(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	cmds := workload(rng, 60)
	// Two tiny batches at the end, each applied after the background
	// checkpoint has finished: the first may start a checkpoint the
	// workload's last bytes deferred, the second cannot start one. So the
	// last checkpoint is before the end whatever the timing.
	const tail = 2
	for i := range tail {
		cmds = append(cmds, &WriteBatch{Volume: "a", Session: 4, Seq: uint64(i + 1), Ops: []Op{write(int64(i)*4096, []byte("tail"))}})
	}
	opts := Options{CheckpointBytes: 300 * KiB, CheckpointInterval: time.Hour}

	ref := newSite(t, t.TempDir(), noCheckpoints)
	s := newSite(t, t.TempDir(), opts)
	l := &testLog{t: t}
	for i, c := range cmds {
		if i >= len(cmds)-tail {
			if err := s.fsm.reapCheckpoint(true); err != nil {
				t.Fatal(err)
			}
		}
		e := l.add(c)
		ref.applyLog(e)
		s.applyLog(e)
	}
	if err := s.fsm.reapCheckpoint(true); err != nil { // let a background checkpoint finish
		t.Fatal(err)
	}
	st := s.fsm.Stats()
	if st.Checkpoints < 2 || st.CheckpointIndex == 0 || st.CheckpointIndex == uint64(len(cmds)) {
		t.Fatalf("want a few checkpoints, the last one before the end: %+v", st)
	}
	ckpt := st.CheckpointIndex

	// Crash: no final checkpoint. Raft replays the whole log.
	s.crash()
	if got := s.fsm.AppliedIndex(); got != ckpt {
		t.Fatalf("after crash AppliedIndex = %d, want checkpoint %d", got, ckpt)
	}
	for _, e := range l.entries {
		if r := s.applyLog(e); r.Duplicate {
			t.Fatalf("replayed entry %d reported duplicate", e.Index)
		}
	}
	st = s.fsm.Stats()
	if st.SkippedReplays != int(ckpt) || st.AppliedIndex != uint64(len(cmds)) {
		t.Fatalf("stats after replay %+v, want %d skipped", st, ckpt)
	}
	sameState(t, ref, s)

	// A writer retrying its last batch after the crash gets Duplicate.
	last := cmds[len(cmds)-1].(*WriteBatch)
	e := l.add(last)
	if r := s.applyLog(e); !r.Duplicate {
		t.Fatalf("retried batch: %+v", r)
	}
}

func TestCrashDuringMetaCommand(t *testing.T) {
	// The state file is at the entry before a Create, the Create itself
	// reached the disk: the situation after a crash between the
	// pre-checkpoint and the post-checkpoint of a meta command.
	s := newSite(t, t.TempDir(), noCheckpoints)
	ref := newSite(t, t.TempDir(), noCheckpoints)
	l := &testLog{t: t}
	cmds := []Command{
		create("a", MiB),
		&WriteBatch{Volume: "a", Session: 1, Seq: 1, Ops: []Op{write(0, []byte("one"))}},
		&WriteBatch{Volume: "b", Session: 1, Seq: 2, Ops: []Op{write(0, []byte("rejected: no b yet"))}},
		create("b", MiB),
		&WriteBatch{Volume: "b", Session: 2, Seq: 1, Ops: []Op{write(5, []byte("two"))}},
		&ResizeVolume{Name: "a", Size: 2 * MiB},
		&WriteBatch{Volume: "a", Session: 2, Seq: 2, Ops: []Op{write(MiB+5, []byte("three"))}},
	}
	stateDir := filepath.Join(s.dir, "fsm")
	var saved []byte
	for i, c := range cmds {
		e := l.add(c)
		ref.applyLog(e)
		s.applyLog(e)
		if i == 2 {
			if err := s.fsm.checkpoint(); err != nil {
				t.Fatal(err)
			}
			saved, _ = os.ReadFile(filepath.Join(stateDir, stateFileName))
		}
	}
	// Each meta command that changed something checkpointed before and
	// after itself (the first Create had nothing to checkpoint before).
	if n := ref.fsm.Stats().Checkpoints; n != 5 {
		t.Fatalf("reference site wrote %d checkpoints, want 5", n)
	}
	s.store.Close()
	if err := os.WriteFile(filepath.Join(stateDir, stateFileName), saved, 0o600); err != nil {
		t.Fatal(err)
	}
	s.open()
	for _, e := range l.entries {
		if r := s.applyLog(e); e.Index > 3 && r.Err != nil {
			t.Fatalf("replay of %d: %v", e.Index, r.Err)
		}
	}
	if st := s.fsm.Stats(); st.SkippedReplays != 3 {
		t.Fatalf("skipped %d", st.SkippedReplays)
	}
	sameState(t, ref, s)
}

func TestRestartRewritesNothing(t *testing.T) {
	s := newSite(t, t.TempDir(), Options{CheckpointBytes: 100 * KiB})
	l := &testLog{t: t}
	for _, c := range workload(rand.New(rand.NewPCG(7, 8)), 30) {
		s.applyLog(l.add(c))
	}
	s.restart()
	before := s.read("a")
	st0 := s.fsm.Stats()
	for _, e := range l.entries {
		s.applyLog(e)
	}
	st := s.fsm.Stats()
	if st.SkippedReplays != len(l.entries) || st.Checkpoints != st0.Checkpoints || st.Restores != 0 ||
		st.AppliedIndex != uint64(len(l.entries)) {
		t.Fatalf("after clean restart and replay: %+v", st)
	}
	if !bytes.Equal(before, s.read("a")) {
		t.Fatal("data changed")
	}
}

func TestCheckpointInterval(t *testing.T) {
	s := newSite(t, t.TempDir(), Options{CheckpointInterval: 20 * time.Millisecond})
	l := &testLog{t: t}
	s.mustApply(l, create("v", MiB))
	n := s.fsm.Stats().Checkpoints
	s.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 1})
	if got := s.fsm.Stats().Checkpoints; got != n {
		t.Fatalf("checkpoint right after the first entry")
	}
	time.Sleep(30 * time.Millisecond)
	s.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 2})
	// Periodic checkpoints run in the background.
	for deadline := time.Now().Add(5 * time.Second); ; {
		st := s.fsm.Stats()
		if st.Checkpoints == n+1 && st.CheckpointIndex == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no interval checkpoint: %+v", st)
		}
		time.Sleep(time.Millisecond)
	}
	img, err := readStateFile(filepath.Join(s.dir, "fsm"))
	if err != nil || img.Applied != 3 {
		t.Fatalf("state file after the background checkpoint: %+v, %v", img, err)
	}
	// The next entry reaps it: a restart skips everything up to 3.
	s.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 3})
	if s.fsm.checkpointed != 3 {
		t.Fatalf("checkpointed = %d after reaping, want 3", s.fsm.checkpointed)
	}
}

// TestBackgroundCheckpointDoesNotBlockApply: a periodic checkpoint syncs
// volumes off the FSM goroutine, and a crash at any point during it leaves
// a state that replays to the right bytes.
func TestBackgroundCheckpointCrashReplays(t *testing.T) {
	dir := t.TempDir()
	s := newSite(t, dir, Options{CheckpointBytes: 64 * KiB})
	l := &testLog{t: t}
	s.mustApply(l, create("v", 4*MiB))
	rng := rand.New(rand.NewPCG(7, 7))
	want := make([]byte, 4*MiB)
	for seq := uint64(1); seq <= 200; seq++ {
		off := int64(rng.IntN(1000)) * 4096
		data := randBytes(rng, 4096+int(rng.IntN(3))*4096)
		if off+int64(len(data)) > 4*MiB {
			off = 4*MiB - int64(len(data))
		}
		copy(want[off:], data)
		s.mustApply(l, &WriteBatch{Volume: "v", Session: 9, Seq: seq, Ops: []Op{write(off, data)}})
		if seq%50 == 0 && seq < 200 {
			// On a loaded machine one background checkpoint can outlast
			// all 200 applies; let a few finish so there are several.
			if err := s.fsm.reapCheckpoint(true); err != nil {
				t.Fatal(err)
			}
		}
	}
	if s.fsm.Stats().Checkpoints < 2 {
		t.Fatalf("expected background checkpoints: %+v", s.fsm.Stats())
	}
	s.crash()
	s.replay(l.entries)
	if !bytes.Equal(s.read("v"), want) {
		t.Fatal("volume differs after crash and replay")
	}
}

func TestFailedState(t *testing.T) {
	s := newSite(t, t.TempDir(), noCheckpoints)
	l := &testLog{t: t}
	s.mustApply(l, create("v", MiB))
	s.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 1, Ops: []Op{write(0, []byte("durable"))}})
	if err := s.fsm.checkpoint(); err != nil {
		t.Fatal(err)
	}
	s.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 2, Ops: []Op{write(10, []byte("replayed"))}})

	// Inject a local failure: the store goes away under the FSM.
	s.store.Close()
	r := s.applyLog(l.add(&WriteBatch{Volume: "v", Session: 1, Seq: 3, Ops: []Op{write(20, []byte("lost"))}}))
	if !errors.Is(r.Err, ErrFailed) {
		t.Fatalf("Apply with a closed store: %v, want ErrFailed", r.Err)
	}
	later := l.add(&EndSession{Session: 99})
	if r := s.applyLog(later); !errors.Is(r.Err, ErrFailed) {
		t.Fatalf("later Apply: %v, want ErrFailed", r.Err)
	}
	if _, err := s.fsm.Snapshot(); !errors.Is(err, ErrFailed) {
		t.Fatalf("Snapshot in failed state: %v", err)
	}
	st := s.fsm.Stats()
	if !errors.Is(st.Failed, ErrFailed) || st.AppliedIndex != 3 || st.CheckpointIndex != 2 {
		t.Fatalf("stats %+v", st)
	}
	if err := s.fsm.WaitApplied(context.Background(), 5); !errors.Is(err, ErrFailed) {
		t.Fatalf("WaitApplied: %v", err)
	}
	if err := s.fsm.Close(); err != nil { // no checkpoint in the failed state
		t.Fatalf("Close: %v", err)
	}
	img, err := readStateFile(filepath.Join(s.dir, "fsm"))
	if err != nil || img.Applied != 2 {
		t.Fatalf("state file advanced past the failure: %+v %v", img, err)
	}

	// Restart: the entries after the checkpoint are replayed.
	s.open()
	for _, e := range l.entries {
		if r := s.applyLog(e); r.Err != nil {
			t.Fatalf("replay %d: %v", e.Index, r.Err)
		}
	}
	if got := string(s.read("v")[:24]); got != "durable\x00\x00\x00replayed\x00\x00lost" {
		t.Fatalf("data %q", got)
	}
}

func TestBrokenVolumeFails(t *testing.T) {
	s := newSite(t, t.TempDir(), noCheckpoints)
	l := &testLog{t: t}
	s.mustApply(l, create("v", MiB))
	s.restart()
	s.store.Close()
	if err := os.WriteFile(filepath.Join(s.dir, "volumes", "volumes", "v", "meta.json"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	s.open()
	if len(s.store.Broken()) != 1 {
		t.Fatal("volume not broken")
	}
	if _, err := s.fsm.Snapshot(); err == nil {
		t.Fatal("Snapshot with a broken volume")
	}
	r := s.applyLog(l.add(&WriteBatch{Volume: "v", Session: 1, Seq: 1, Ops: []Op{write(0, []byte("x"))}}))
	if !errors.Is(r.Err, ErrFailed) {
		t.Fatalf("write to a broken volume: %v, want ErrFailed", r.Err)
	}
}

func TestWaitApplied(t *testing.T) {
	s := newSite(t, t.TempDir(), noCheckpoints)
	l := &testLog{t: t}
	done := make(chan error, 1)
	go func() { done <- s.fsm.WaitApplied(context.Background(), 2) }()
	s.mustApply(l, create("v", MiB))
	select {
	case err := <-done:
		t.Fatalf("WaitApplied(2) returned %v at index 1", err)
	case <-time.After(10 * time.Millisecond):
	}
	s.mustApply(l, &EndSession{Session: 1})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if err := s.fsm.WaitApplied(ctx, 3); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("timeout: %v", err)
	}
	go func() { done <- s.fsm.WaitApplied(context.Background(), 3) }()
	time.Sleep(5 * time.Millisecond)
	if err := s.fsm.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, ErrClosed) {
		t.Fatalf("after Close: %v", err)
	}
	if r := s.applyLog(l.add(&EndSession{Session: 1})); !errors.Is(r.Err, ErrClosed) {
		t.Fatalf("Apply after Close: %v", r.Err)
	}
}

func TestNewRejectsBadState(t *testing.T) {
	dir := t.TempDir()
	s := newSite(t, dir, noCheckpoints)
	l := &testLog{t: t}
	s.mustApply(l, create("v", MiB))
	s.restart()
	s.store.Close()
	s.store = nil
	stateFile := filepath.Join(dir, "fsm", stateFileName)
	good, _ := os.ReadFile(stateFile)

	store, err := volume.Open(filepath.Join(dir, "volumes"), testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	for name, content := range map[string][]byte{
		"flipped":   func() []byte { b := append([]byte(nil), good...); b[6] ^= 0x40; return b }(),
		"truncated": good[:len(good)-1],
		"empty":     {},
	} {
		os.WriteFile(stateFile, content, 0o600)
		if _, err := New(store, filepath.Join(dir, "fsm"), Options{Logger: testLogger(t)}); !errors.Is(err, errCorruptState) {
			t.Errorf("%s state file: %v", name, err)
		}
	}
	os.Remove(stateFile)
	if _, err := New(store, filepath.Join(dir, "fsm"), Options{Logger: testLogger(t)}); err == nil {
		t.Error("missing state file with volumes present accepted")
	}
}

func TestStateEncoding(t *testing.T) {
	img := &stateImage{Applied: 99, FuzzyUntil: 120, Restoring: true,
		Volumes: []volume.Meta{
			{Name: "a", Size: 4096, BlockSize: 512, Created: time.Unix(0, testCreated).UTC()},
			{Name: "b", Size: MiB, BlockSize: 4096, Created: time.Unix(0, -1).UTC(), SyncWrites: true},
		},
		Sessions: []sessionEntry{{ID: 1, session: session{LastSeq: 5, LastIndex: 90}}, {ID: 1 << 63, session: session{LastSeq: 1, LastIndex: 99}}},
		Leases:   []leaseEntry{{Volume: "a", Lease: Lease{Holder: "site1", Epoch: 3}}, {Volume: "b", Lease: Lease{Epoch: 1}}},
	}
	b := encodeState(img)
	got, err := decodeState(b)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != fmt.Sprint(img) {
		t.Fatalf("round trip\n%v\n%v", got, img)
	}
	for n := range len(b) {
		if _, err := decodeState(b[:n]); err == nil {
			t.Fatalf("truncated to %d decodes", n)
		}
	}
	unsorted := *img
	unsorted.Volumes = []volume.Meta{img.Volumes[1], img.Volumes[0]}
	if _, err := decodeState(encodeState(&unsorted)); err == nil {
		t.Fatal("unsorted volumes accepted")
	}
}

func TestErrorCodes(t *testing.T) {
	if ErrorCode(nil) != "" || ErrorFromCode("", "x") != nil {
		t.Fatal("nil")
	}
	for _, c := range errorCodes {
		err := fmt.Errorf("context: %w", c.err)
		code := ErrorCode(err)
		back := ErrorFromCode(code, err.Error())
		if !errors.Is(back, c.err) || back.Error() != err.Error() {
			t.Errorf("%v: code %q back %v", c.err, code, back)
		}
	}
	other := errors.New("disk on fire")
	if code := ErrorCode(other); code != codeOther {
		t.Fatalf("code %q", code)
	}
	back := ErrorFromCode(codeOther, "disk on fire")
	if back == nil || back.Error() != "disk on fire" || errors.Is(back, ErrFailed) {
		t.Fatalf("other: %v", back)
	}
	if back := ErrorFromCode("from_the_future", "msg"); back == nil || back.Error() != "msg" {
		t.Fatalf("unknown code: %v", back)
	}
}

func BenchmarkApplyWriteBatch(b *testing.B) {
	s := newSite(b, b.TempDir(), Options{})
	l := &testLog{t: b}
	const volSize = 64 * MiB
	s.mustApply(l, create("bench", volSize))
	data := randBytes(rand.New(rand.NewPCG(9, 9)), 4*KiB)
	const batch = 512 * KiB
	b.SetBytes(batch)
	b.ReportAllocs()
	off := int64(0)
	seq := uint64(0)
	index := uint64(len(l.entries))
	for b.Loop() {
		b.StopTimer() // measure Apply (decode + writes + checkpoints), not Encode
		ops := make([]Op, batch/(4*KiB))
		for i := range ops {
			ops[i] = write(off, data)
			off = (off + 4*KiB) % volSize
		}
		seq++
		index++
		e := entry(b, index, &WriteBatch{Volume: "bench", Session: 1, Seq: seq, Ops: ops})
		b.StartTimer()
		if r := s.fsm.Apply(e).(*Result); r.Err != nil {
			b.Fatal(r.Err)
		}
	}
}

// A writer attached to a volume that was deleted and recreated under the
// same name must not land in the new volume.
func TestApplyRejectsBatchForOldIncarnation(t *testing.T) {
	s := newSite(t, t.TempDir(), noCheckpoints)
	l := &testLog{t: t}
	s.mustApply(l, create("v", MiB))
	old := testCreated
	s.mustApply(l, &WriteBatch{Volume: "v", Session: 7, Seq: 1, Created: old, Ops: []Op{write(0, []byte("old"))}})
	s.mustApply(l, &DeleteVolume{Name: "v"})
	recreated := create("v", MiB)
	recreated.Created = old + 1
	s.mustApply(l, recreated)
	r := s.applyLog(l.add(&WriteBatch{Volume: "v", Session: 7, Seq: 2, Created: old, Ops: []Op{write(0, []byte("stale"))}}))
	if !errors.Is(r.Err, ErrUnknownVolume) {
		t.Fatalf("stale incarnation: err = %v, want ErrUnknownVolume", r.Err)
	}
	if got := s.read("v"); !bytes.Equal(got[:5], make([]byte, 5)) {
		t.Fatalf("new volume was written by the old writer: %q", got[:5])
	}
	s.mustApply(l, &WriteBatch{Volume: "v", Session: 8, Seq: 1, Created: old + 1, Ops: []Op{write(0, []byte("new"))}})
	if got := s.read("v"); string(got[:3]) != "new" {
		t.Fatalf("current incarnation write lost: %q", got[:3])
	}
}
