package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/robib/robib/fsm"
	"github.com/robib/robib/volume"
)

// dataFile is the path of site s's data file of volume name.
func (s *roleSite) dataFile(name string) string {
	return filepath.Join(s.store.Dir(), "volumes", name, "data")
}

// fileBytes reads site s's data file of volume name.
func (s *roleSite) fileBytes(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(s.dataFile(name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// corruptFile overwrites bytes of site s's data file behind its back, as
// a failing disk would.
func (s *roleSite) corruptFile(t *testing.T, name string, off int64, junk []byte) {
	t.Helper()
	f, err := os.OpenFile(s.dataFile(name), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(junk, off); err != nil {
		t.Fatal(err)
	}
}

// write commits one batch writing p at off to testVolume and waits until
// every site applied it.
func (c *roleCluster) write(seq uint64, p []byte, off int64) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := c.leader().prop.ApplyAndWait(ctx, &fsm.WriteBatch{Volume: testVolume, Session: 77, Seq: seq,
		Ops: []fsm.Op{{Kind: fsm.OpWrite, Off: off, Len: int64(len(p)), Data: p}}})
	if err != nil || res.Err != nil {
		c.t.Fatalf("write: %v %v", err, res.Err)
	}
	c.waitApplied(res.Index)
}

// Three sites on real Raft, FSMs and checksummed volumes. Bytes of one
// site's data file are overwritten behind its back: its own read reports
// damage, a read through the repair path there returns the right bytes at
// once and repairs them; damage that a later partial write left in place
// reads right too; the background rebuild makes the file byte-identical to
// another site's; and volume repair fixes a copy that diverged with valid
// checksums (a write that bypassed the log), from the majority.
func TestRepairFromPeersThreeSites(t *testing.T) {
	c := newRoleCluster(t, "a", "b", "c")
	c.createVolume()
	const size = 1 << 20
	model := randData(40, size)
	c.write(1, model, 0)
	leader := c.leader()
	victim := c.follower(leader)
	healthy := leader
	v, err := victim.store.Get(testVolume)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(victim.fileBytes(t, testVolume), healthy.fileBytes(t, testVolume)) {
		t.Fatal("copies differ before the damage")
	}

	// A bad sector's worth of garbage inside block 73.
	victim.corruptFile(t, testVolume, 300000, bytes.Repeat([]byte{0xEE}, 100))
	buf := make([]byte, size)
	if _, err := v.ReadAt(buf, 0); !errors.Is(err, volume.ErrDamaged) {
		t.Fatalf("the volume's own read after the damage: %v, want ErrDamaged", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := victim.heal.ReadAt(ctx, v, buf, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, model) {
		t.Fatal("read through the repair path returned wrong bytes")
	}
	if !bytes.Equal(victim.fileBytes(t, testVolume), healthy.fileBytes(t, testVolume)) {
		t.Fatal("repair on read left the file different from the healthy copy")
	}
	if d := v.Damaged(); len(d) != 0 {
		t.Fatalf("still damaged after the read: %v", d)
	}

	// Two more damaged places; a partial write lands in one of them (the
	// block stays damaged: its old bytes under the write are garbage).
	victim.corruptFile(t, testVolume, 8192, bytes.Repeat([]byte{1}, 4096)) // block 2 whole
	victim.corruptFile(t, testVolume, 700000, []byte("rot"))               // inside block 170
	if _, err := v.ReadAt(buf, 0); !errors.Is(err, volume.ErrDamaged) {
		t.Fatalf("read after the second damage: %v", err)
	}
	patch := []byte("a partial write into a damaged block")
	c.write(2, patch, 8192+1000)
	copy(model[8192+1000:], patch)
	p := make([]byte, 3*4096)
	if err := victim.heal.ReadAt(ctx, v, p, 4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p, model[4096:4*4096]) {
		t.Fatal("read of a damaged block written in part since: wrong bytes")
	}
	if len(v.Damaged()) == 0 {
		t.Fatal("the damage in block 170 was never read, yet it is gone")
	}
	victim.heal.rebuildPass(ctx)
	if d := v.Damaged(); len(d) != 0 {
		t.Fatalf("still damaged after a rebuild pass: %v", d)
	}
	if got := victim.fileBytes(t, testVolume); !bytes.Equal(got, healthy.fileBytes(t, testVolume)) || !bytes.Equal(got, model) {
		t.Fatal("the rebuilt file differs from the healthy copy")
	}

	// A divergence the checksums cannot see: bytes written to the
	// victim's volume outside the log. Verify sees it; repair fixes it
	// from the majority, asked at the leader.
	if _, err := v.WriteAt([]byte("written outside the log"), 500000); err != nil {
		t.Fatal(err)
	}
	res, err := leader.repair.RepairRange(ctx, testVolume, 0, size, 64<<10, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Repairs) != 1 || res.Repairs[0].Site != victim.name || res.Repairs[0].Offset != 448<<10 || res.Repairs[0].Error != "" ||
		len(res.Remaining) != 0 || len(res.NoMajority) != 0 || len(res.Sites) != 3 {
		t.Fatalf("repair result %+v", res)
	}
	if !bytes.Equal(victim.fileBytes(t, testVolume), model) {
		t.Fatal("volume repair left the victim's copy different")
	}
	again, err := leader.verify.VerifyRange(ctx, testVolume, 0, size, 64<<10)
	if err != nil || len(again.Mismatches) != 0 || len(again.Sites) != 3 {
		t.Fatalf("verify after repair: %+v %v", again, err)
	}
}

// BenchmarkRepairOnRead: reads of a damaged range (MarkDamaged) through
// the repair path on three in-process sites (loopback HTTP between them):
// the latency and throughput of fetching from a peer, waiting for the
// index and writing back, for one 4 KiB block and for 1 MiB.
func BenchmarkRepairOnRead(b *testing.B) {
	c := newRoleCluster(b, "a", "b", "c")
	c.createVolume()
	const size = 1 << 20
	c.write(1, randData(41, size), 0)
	victim := c.follower(c.leader())
	v, err := victim.store.Get(testVolume)
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	for _, n := range []int64{4 << 10, size} {
		b.Run(fmt.Sprintf("%dKiB", n>>10), func(b *testing.B) {
			buf := make([]byte, n)
			b.SetBytes(n)
			for b.Loop() {
				if err := v.MarkDamaged(0, n); err != nil {
					b.Fatal(err)
				}
				if err := victim.heal.ReadAt(ctx, v, buf, 0); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
