package agent

import (
	"bytes"
	"crypto/rand"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/robib/robib/nbdfront"
	"github.com/robib/robib/volume"
)

// Tests of what a site serves right after it attaches a volume, before it
// has caught up: issue 11's stale reads after a restart, after a takeover and
// at a read-only attach, and BlockStatus over data that is being applied.

// writeFlushed writes size random bytes at e in 1 MiB requests, flushes, and
// returns them.
func writeFlushed(t *testing.T, e nbdfront.Export, size int) []byte {
	t.Helper()
	data := make([]byte, size)
	rand.Read(data)
	for off := 0; off < size; off += 1 << 20 {
		if _, err := e.WriteAt(data[off:min(off+1<<20, size)], int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	return data
}

// countStale compares got with want per 4 KiB block.
func countStale(got, want []byte) (stale, total int) {
	for off := 0; off < len(want); off += 4096 {
		total++
		if !bytes.Equal(got[off:off+4096], want[off:off+4096]) {
			stale++
		}
	}
	return stale, total
}

// TestRestartedSiteServesNoStaleDataToAWriter: c is stopped, 16 MiB are
// written and flushed at a, c restarts, and a read-write attach at c at once
// (no waiting for catch-up) must read what was flushed. A block rewritten
// there after a read-modify-write must then hold the flushed data plus the
// change at every site. Before the attach waited for its site to apply the
// log up to the lease grant, every block read at c was stale, and the
// rewritten block ended stale everywhere.
func TestRestartedSiteServesNoStaleDataToAWriter(t *testing.T) {
	sites := startCluster(t, 3, nil)
	const size = 16 << 20
	createVolume(t, sites[0], "fresh", size)
	waitCaughtUp(t, sites)
	a, c := sites[0], sites[2]
	c.stop(t)

	ea := openExport(t, a, "fresh")
	want := writeFlushed(t, ea, size)
	if err := ea.Close(); err != nil {
		t.Fatal(err)
	}

	c.start(t)
	ec, err := c.a.backend.Open("fresh")
	if err != nil {
		t.Fatalf("read-write attach at the restarted site: %v", err)
	}
	got := make([]byte, size)
	if _, err := ec.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if stale, total := countStale(got, want); stale > 0 {
		t.Fatalf("%d of %d blocks read at the restarted site right after attaching are stale", stale, total)
	}
	// Read-modify-write of one block, as a file system updating a byte does.
	blk := make([]byte, 4096)
	if _, err := ec.ReadAt(blk, 8192); err != nil {
		t.Fatal(err)
	}
	copy(blk[100:], "changed")
	if _, err := ec.WriteAt(blk, 8192); err != nil {
		t.Fatal(err)
	}
	if err := ec.Flush(); err != nil {
		t.Fatal(err)
	}
	copy(want[8192+100:], "changed")
	if err := ec.Close(); err != nil {
		t.Fatal(err)
	}
	waitCaughtUp(t, sites)
	for _, s := range sites {
		if stale, _ := countStale(readAll(t, s, "fresh@ro", size), want); stale > 0 {
			t.Errorf("%s: %d blocks differ from the flushed data after the read-modify-write", s.cfg.Name, stale)
		}
	}
}

// TestReadOnlyAttachAtALaggingSiteWaits: "@ro" at a site that just restarted
// serves data at least as new as what was flushed before the attach began;
// "@ro-stale" serves the copy as it is and says so.
func TestReadOnlyAttachAtALaggingSiteWaits(t *testing.T) {
	sites := startCluster(t, 3, nil)
	const size = 16 << 20
	createVolume(t, sites[0], "lag", size)
	waitCaughtUp(t, sites)
	a, c := sites[0], sites[2]
	c.stop(t)
	ea := openExport(t, a, "lag")
	want := writeFlushed(t, ea, size)
	defer ea.Close()

	c.start(t)
	ro, err := c.a.backend.Open("lag@ro")
	if err != nil {
		t.Fatalf("read-only attach at the restarted site: %v", err)
	}
	defer ro.Close()
	if d := ro.Info().Description; !strings.Contains(d, "behind the leader") {
		t.Errorf("read-only export description %q does not say how far the site lagged", d)
	}
	got := make([]byte, size)
	if _, err := ro.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if stale, total := countStale(got, want); stale > 0 {
		t.Fatalf("%d of %d blocks read through %s at a lagging site are older than a flush acknowledged before the attach", stale, total, "lag@ro")
	}
	st, err := c.a.backend.Open("lag@ro-stale")
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if !st.Info().ReadOnly || !strings.Contains(st.Info().Description, "stale") {
		t.Errorf("stale export info %+v", st.Info())
	}
	if _, err := st.WriteAt(got[:4096], 0); !errors.Is(err, nbdfront.ErrReadOnly) {
		t.Errorf("write through the stale export: %v", err)
	}
}

// TestCutOffSiteRefusesReadOnlyUnlessStale: a site that cannot reach a
// majority cannot know how current its copy is: "@ro" is refused with a
// message naming "@ro-stale", which works.
func TestCutOffSiteRefusesReadOnlyUnlessStale(t *testing.T) {
	sites := startCluster(t, 3, nil)
	createVolume(t, sites[0], "alone", 1<<20)
	waitCaughtUp(t, sites)
	c := sites[2]
	sites[0].stop(t)
	sites[1].stop(t)
	start := time.Now()
	_, err := c.a.backend.Open("alone@ro")
	if err == nil || !strings.Contains(err.Error(), "alone@ro-stale") {
		t.Fatalf("read-only attach at a site without a majority: %v, want a refusal naming alone@ro-stale", err)
	}
	if d := time.Since(start); d > readIndexTimeout+5*time.Second {
		t.Errorf("the refusal took %v", d)
	}
	e, err := c.a.backend.Open("alone@ro-stale")
	if err != nil {
		t.Fatalf("stale read-only attach at a cut-off site: %v", err)
	}
	e.Close()
}

// TestBlockStatusNeverReportsAHoleOverWrittenData: block status through a
// writer's export must report a block as data once its write was accepted,
// also when the write is applied locally (and leaves the write-back
// buffer) while the query runs. The hook forces exactly that: the local
// allocation is read while the write is buffered (a hole), then the write is
// flushed and released before BlockStatus combines the two. Reading the
// local allocation first and the buffer second reported a hole.
func TestBlockStatusNeverReportsAHoleOverWrittenData(t *testing.T) {
	sites := startCluster(t, 1, nil)
	const blocks = 64
	createVolume(t, sites[0], "bs", blocks*4096)
	e := openExport(t, sites[0], "bs")
	defer e.Close()

	var sawHole atomic.Bool // the hook caught the block as a local hole
	var target atomic.Int64
	testHookExtents = func(x *export, exts []volume.Extent) {
		blk := target.Load()
		for _, ext := range exts {
			if ext.Hole && ext.Offset <= blk*4096 && blk*4096 < ext.Offset+ext.Length {
				sawHole.Store(true)
			}
		}
		if err := x.st.dcd.Flush(); err != nil {
			t.Error(err)
		}
		waitFor(t, 10*time.Second, "the write leaves the buffer", func() (bool, error) {
			return len(x.st.dcd.Buffered(blk*4096, 4096)) == 0, nil
		})
	}
	defer func() { testHookExtents = nil }()

	p := bytes.Repeat([]byte{0xab}, 4096)
	for blk := int64(0); blk < blocks && !sawHole.Load(); blk++ {
		target.Store(blk)
		if _, err := e.WriteAt(p, blk*4096); err != nil {
			t.Fatal(err)
		}
		exts, err := e.BlockStatus(blk*4096, 4096)
		if err != nil {
			t.Fatal(err)
		}
		if len(exts) == 0 || exts[0].Hole {
			t.Fatalf("block %d, written before the query, reported as a hole (%+v)", blk, exts)
		}
	}
	if !sawHole.Load() {
		t.Fatalf("in %d tries the write was never caught unapplied: the test proved nothing", blocks)
	}
}

// TestReadOnlyAttachAfterAnIdleLeaderChange: a new leader appends a no-op
// that no FSM ever applies; on an idle cluster a read-only attach must
// still be served at once (its read index is a command's index), not wait
// for the next write.
func TestReadOnlyAttachAfterAnIdleLeaderChange(t *testing.T) {
	sites := startCluster(t, 3, nil)
	createVolume(t, sites[0], "idle", 1<<20)
	waitCaughtUp(t, sites)
	old, followers := leaderOf(t, sites)
	old.stop(t)
	waitFor(t, 30*time.Second, "a new leader", func() (bool, error) {
		return followers[0].a.Node().Leader() != "" && followers[0].a.Node().Leader() != old.cfg.Name, nil
	})
	for _, s := range followers {
		start := time.Now()
		e, err := s.a.backend.Open("idle@ro")
		if err != nil {
			t.Fatalf("read-only attach at %s after an idle leader change: %v", s.cfg.Name, err)
		}
		e.Close()
		if d := time.Since(start); d > readIndexTimeout {
			t.Errorf("read-only attach at %s took %v", s.cfg.Name, d)
		}
	}
}
