package dcd

import (
	"bytes"
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/robib/robib/fsm"
	"github.com/robib/robib/volume"
)

// fsmCommitter commits batches by applying them, in call order, to a real
// FSM as consecutive log entries, and records every batch it was given.
type fsmCommitter struct {
	t     *testing.T
	f     *fsm.FSM
	mu    sync.Mutex
	index uint64
	sent  []fsm.WriteBatch // every batch passed to Commit, deep copies
}

func (c *fsmCommitter) apply(cmd fsm.Command) *fsm.Result {
	c.t.Helper()
	data, err := fsm.Encode(cmd)
	if err != nil {
		c.t.Fatalf("encode %T: %v", cmd, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.index++
	return c.f.Apply(&raft.Log{Index: c.index, Term: 1, Type: raft.LogCommand, Data: data}).(*fsm.Result)
}

func (c *fsmCommitter) Commit(_ context.Context, b *fsm.WriteBatch) (uint64, error) {
	cp := *b
	cp.Ops = make([]fsm.Op, len(b.Ops))
	for i, op := range b.Ops {
		op.Data = bytes.Clone(op.Data)
		cp.Ops[i] = op
	}
	c.mu.Lock()
	c.sent = append(c.sent, cp)
	c.mu.Unlock()
	res := c.apply(b)
	return res.Index, res.Err
}

func (c *fsmCommitter) WaitApplied(ctx context.Context, index uint64) error {
	return c.f.WaitApplied(ctx, index)
}

// TestLateCopiesAfterTheWriterEndedChangeNothing: a copy of any batch of a
// writer session that reaches the FSM after the writer closed (a forward
// its sender gave up on, appended late by the leader that received it)
// must not change the volume, whatever the writer's site managed to do on
// its way out. Before sessions were pinned to their lease, an EndSession
// (or an eviction) made the FSM forget the session, and a late copy of its
// first batch, Seq 1, was accepted as a new session and overwrote newer
// flushed data.
func TestLateCopiesAfterTheWriterEndedChangeNothing(t *testing.T) {
	for _, tc := range []struct {
		name    string
		release bool // the writer's site released the lease before ending
	}{
		{"released", true},
		{"release lost, session ended, table under pressure", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			store, err := volume.Open(filepath.Join(dir, "volumes"), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer store.Close()
			f, err := fsm.New(store, filepath.Join(dir, "fsm"), fsm.Options{MaxSessions: 2})
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			c := &fsmCommitter{t: t, f: f}
			created := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC).UnixNano()
			for _, cmd := range []fsm.Command{
				&fsm.CreateVolume{Name: "vol", Size: 1 << 20, Created: created},
				&fsm.CreateVolume{Name: "other", Size: 1 << 20, Created: created},
				&fsm.AcquireLease{Volume: "vol", Site: "a", Created: created},
			} {
				if res := c.apply(cmd); res.Err != nil {
					t.Fatal(res.Err)
				}
			}
			local, err := store.Get("vol")
			if err != nil {
				t.Fatal(err)
			}
			v, err := New("vol", local, c, Config{VolumeCreated: created, Epoch: 1, MaxInflight: 1})
			if err != nil {
				t.Fatal(err)
			}
			older, newer := pattern(1, 4*kib), pattern(2, 4*kib)
			mustWrite(t, v, older, 0)
			mustFlush(t, v)
			mustWrite(t, v, newer, 0)
			mustFlush(t, v)
			if err := v.Close(); err != nil {
				t.Fatal(err)
			}
			if tc.release {
				if res := c.apply(&fsm.ReleaseLease{Volume: "vol", Site: "a", Epoch: 1}); res.Err != nil {
					t.Fatal(res.Err)
				}
			}
			if res := c.apply(&fsm.EndSession{Session: v.Session()}); res.Err != nil {
				t.Fatal(res.Err)
			}
			// Other writers fill the session table (MaxSessions 2).
			for i := uint64(1); i <= 3; i++ {
				res := c.apply(&fsm.WriteBatch{Volume: "other", Session: 1000 + i, Seq: 1,
					Ops: []fsm.Op{{Kind: fsm.OpWrite, Off: 0, Len: 4, Data: []byte("fill")}}})
				if res.Err != nil {
					t.Fatal(res.Err)
				}
			}

			c.mu.Lock()
			sent := append([]fsm.WriteBatch(nil), c.sent...)
			c.mu.Unlock()
			if len(sent) != 2 || sent[0].Seq != 1 {
				t.Fatalf("%d batches sent, want two, the first at seq 1", len(sent))
			}
			// Every batch arrives once more, late, in the order sent.
			for i := range sent {
				res := c.apply(&sent[i])
				if res.Err == nil && !res.Duplicate {
					t.Errorf("late copy of seq %d was applied", sent[i].Seq)
				}
			}
			got := make([]byte, len(newer))
			if _, err := local.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, newer) {
				t.Fatalf("a late copy changed flushed data: block 0 holds the older write")
			}
		})
	}
}
