package tests

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/robib/robib/tests/harness"
)

// Regressions of issue 11 with real clients: a site that was down (or
// frozen) while flushed data was written elsewhere is read AT ONCE after it
// comes back, with no wait for catch-up. Whatever it serves then must be at
// least as new as what was flushed before the attach began: a read-write
// attach (the lease moves to the restarted site), its BlockStatus (sparse
// copies skip holes), a read-modify-write through it, and a read-only
// attach (VOLUME@ro).

// freshScene is three sites with one volume: writer writes, victim is
// taken down (killed or frozen) while it does, third is the other site.
type freshScene struct {
	c                     *harness.Cluster
	writer, victim, third *harness.Agent
	vol                   string
	size                  int64
}

func newFreshScene(t *testing.T, vol string, size int64) *freshScene {
	t.Helper()
	requireTools(t, "nbdcopy", "nbdinfo", "python3-nbd")
	c := harness.StartCluster(t, harness.ClusterOptions{})
	fs := c.Followers()
	s := &freshScene{c: c, writer: c.Leader(), victim: fs[1], third: fs[0], vol: vol, size: size}
	s.writer.CreateVolume(vol, fmtSize(size))
	waitVolumeEverywhere(t, c, vol, size)
	t.Logf("writer %s (leader), victim %s, third %s", s.writer.Name, s.victim.Name, s.third.Name)
	return s
}

// writeFlushed copies data to the volume at the writer with nbdcopy
// --flush (the client detaches when it exits), so every byte of it is
// acknowledged flushed when it returns.
func (s *freshScene) writeFlushed(t *testing.T, data []byte) {
	t.Helper()
	src := writeFile(t, t.TempDir(), "src.img", data)
	harness.MustRun(t, toolTimeout, "nbdcopy", "--flush", src, s.writer.NBDURI(s.vol))
}

// nbdcopyRead copies the export at uri into a file with nbdcopy (extra
// flags first) and returns the bytes and how long it took.
func nbdcopyRead(t *testing.T, uri string, extra ...string) ([]byte, time.Duration) {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "out.img")
	t0 := time.Now()
	harness.MustRun(t, toolTimeout, "nbdcopy", append(append([]string{}, extra...), uri, dst)...)
	return readFile(t, dst), time.Since(t0)
}

// firstDiff describes how got differs from want: the first differing
// offset and how many 4 KiB blocks differ.
func firstDiff(got, want []byte) string {
	if len(got) != len(want) {
		return fmt.Sprintf("%d bytes, want %d", len(got), len(want))
	}
	first, blocks, total := -1, 0, (len(want)+4095)/4096
	for b := 0; b < total; b++ {
		lo, hi := b*4096, min((b+1)*4096, len(want))
		if string(got[lo:hi]) != string(want[lo:hi]) {
			if first < 0 {
				for i := lo; i < hi; i++ {
					if got[i] != want[i] {
						first = i
						break
					}
				}
			}
			blocks++
		}
	}
	if blocks == 0 {
		return ""
	}
	return fmt.Sprintf("%d of %d 4 KiB blocks differ, the first at offset %d (%#x)", blocks, total, first, first)
}

// extent is one line of `nbdinfo --map --json`.
type extent struct {
	Offset      int64  `json:"offset"`
	Length      int64  `json:"length"`
	Type        int    `json:"type"`
	Description string `json:"description"`
}

// holesOver returns the extents of base:allocation at uri that claim a
// hole or zeros (type bit 0 or 1) anywhere in [lo, hi).
func holesOver(t *testing.T, uri string, lo, hi int64) ([]extent, []extent) {
	t.Helper()
	out := harness.MustRun(t, toolTimeout, "nbdinfo", "--map", "--json", uri)
	var exts []extent
	if err := json.Unmarshal([]byte(out), &exts); err != nil {
		t.Fatalf("nbdinfo --map --json %s: %v\n%s", uri, err, out)
	}
	var bad []extent
	for _, e := range exts {
		if e.Offset < hi && e.Offset+e.Length > lo && e.Type&3 != 0 {
			bad = append(bad, e)
		}
	}
	return bad, exts
}

// TestClusterFreshReadAfterRestart: site c is killed, 64 MiB are written
// and flushed at a, the client detaches; c restarts and the volume is read
// read-write at c at once (no wait for catch-up). Round 1 reads every byte
// (nbdcopy --no-extents); round 2 writes the other half of the volume the
// same way and then asks c's BlockStatus at once (nbdinfo --map must not
// report a hole or zeros over written data) and copies with nbdcopy's
// default extent-driven sparse copy.
func TestClusterFreshReadAfterRestart(t *testing.T) {
	const half = 64 * MiB
	s := newFreshScene(t, "fresh", 2*half)
	want := make([]byte, 2*half)

	// Round 1: every byte read by plain NBD reads.
	s.victim.Kill()
	copy(want, randomBytes(1101, half))
	s.writeFlushed(t, want)
	if err := s.victim.Start(); err != nil {
		t.Fatal(err)
	}
	got, d := nbdcopyRead(t, s.victim.NBDURI(s.vol), "--no-extents")
	t.Logf("round 1: read %d MiB read-write at %s right after its restart in %v", len(got)/MiB, s.victim.Name, d.Round(time.Millisecond))
	if diff := firstDiff(got, want); diff != "" {
		t.Errorf("round 1: read-write attach at %s right after its restart served stale data: %s", s.victim.Name, diff)
	}

	// Round 2: block status and an extent-driven sparse copy.
	s.c.WaitCaughtUp(clusterWait)
	s.victim.Kill()
	copy(want[half:], randomBytes(1102, half))
	s.writeFlushed(t, want)
	if err := s.victim.Start(); err != nil {
		t.Fatal(err)
	}
	bad, exts := holesOver(t, s.victim.NBDURI(s.vol), 0, 2*half)
	if len(bad) > 0 {
		t.Errorf("round 2: BlockStatus at %s right after its restart reports %d hole/zero extents over flushed data, the first %+v (all: %+v)",
			s.victim.Name, len(bad), bad[0], exts)
	}
	got, d = nbdcopyRead(t, s.victim.NBDURI(s.vol))
	t.Logf("round 2: sparse copy of %d MiB at %s in %v", len(got)/MiB, s.victim.Name, d.Round(time.Millisecond))
	if diff := firstDiff(got, want); diff != "" {
		t.Errorf("round 2: sparse nbdcopy (block status) at %s right after its restart: %s", s.victim.Name, diff)
	}

	s.c.WaitCaughtUp(clusterWait)
	mustVerify(t, s.writer, s.vol, 3)
	for _, a := range s.c.Agents {
		if diff := firstDiff(nbdcopyOut(t, a.NBDURI(s.vol+"@ro")), want); diff != "" {
			t.Errorf("after catch-up, %s's copy differs from what was flushed: %s", a.Name, diff)
		}
	}
}

// rmwScript reads one block, writes it to a file (what was read), changes
// the bytes at patch offset, writes the block back and flushes: a file
// system updating a few bytes.
const rmwScript = `
import sys, nbd
uri, off, n, poff, patch, out = sys.argv[1:7]
off, n, poff = int(off), int(n), int(poff)
patch = bytes.fromhex(patch)
h = nbd.NBD()
h.connect_uri(uri)
buf = bytearray(h.pread(n, off))
open(out, "wb").write(buf)
buf[poff:poff + len(patch)] = patch
h.pwrite(bytes(buf), off)
h.flush()
h.shutdown()
`

// TestClusterReadModifyWriteAfterTakeover: as above, but right after c's
// restart a client at c rewrites one 4 KiB block partially (read, change
// 16 bytes, write back, flush). After catch-up `volume verify` must be
// clean and every site's copy must be what was flushed plus that change:
// a stale read there would become stale data everywhere.
func TestClusterReadModifyWriteAfterTakeover(t *testing.T) {
	const size = 64 * MiB
	s := newFreshScene(t, "rmw", size)
	s.victim.Kill()
	want := randomBytes(1201, size)
	s.writeFlushed(t, want)
	if err := s.victim.Start(); err != nil {
		t.Fatal(err)
	}

	const off, bs, poff = 37*MiB + 5*4096, 4096, 1000
	patch := []byte("robib-rmw-patch!")
	readPath := filepath.Join(t.TempDir(), "read.bin")
	harness.MustRun(t, toolTimeout, harness.SystemPython, "-c", rmwScript, s.victim.NBDURI(s.vol),
		strconv.Itoa(off), strconv.Itoa(bs), strconv.Itoa(poff), fmt.Sprintf("%x", patch), readPath)
	if diff := firstDiff(readFile(t, readPath), want[off:off+bs]); diff != "" {
		t.Errorf("the read of the read-modify-write at %s right after its restart was stale: %s", s.victim.Name, diff)
	}
	copy(want[off+poff:], patch)

	s.c.WaitCaughtUp(clusterWait)
	mustVerify(t, s.writer, s.vol, 3)
	for _, a := range s.c.Agents {
		if diff := firstDiff(nbdcopyOut(t, a.NBDURI(s.vol+"@ro")), want); diff != "" {
			t.Errorf("after the read-modify-write at %s and catch-up, %s's copy differs from the flushed data plus the change: %s",
				s.victim.Name, a.Name, diff)
		}
	}
}

// TestClusterReadOnlyAtLaggingSite: a read-only attach (VOLUME@ro) at a
// site that is behind must wait (bounded) and serve data at least as new
// as what was flushed before the attach began. Two ways to be behind: the
// site was killed and has just restarted, and the site was frozen
// (SIGSTOP) and has just been thawed.
func TestClusterReadOnlyAtLaggingSite(t *testing.T) {
	const size = 64 * MiB
	s := newFreshScene(t, "lag", size)
	ro := s.vol + "@ro"
	// Bounded: the attach may wait for catch-up, not forever.
	const bound = 60 * time.Second

	s.victim.Kill()
	want := randomBytes(1301, size)
	s.writeFlushed(t, want)
	if err := s.victim.Start(); err != nil {
		t.Fatal(err)
	}
	got, d := nbdcopyRead(t, s.victim.NBDURI(ro))
	t.Logf("restarted: %s read at %s in %v", ro, s.victim.Name, d.Round(time.Millisecond))
	if diff := firstDiff(got, want); diff != "" {
		t.Errorf("%s at %s right after its restart served data older than what was flushed before the attach: %s", ro, s.victim.Name, diff)
	}
	if d > bound {
		t.Errorf("%s at %s took %v, more than %v", ro, s.victim.Name, d, bound)
	}

	s.c.WaitCaughtUp(clusterWait)
	pid := s.victim.Pid()
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	thawed := false
	defer func() {
		if !thawed {
			_ = syscall.Kill(pid, syscall.SIGCONT)
		}
	}()
	want = randomBytes(1302, size)
	s.writeFlushed(t, want)
	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	thawed = true
	got, d = nbdcopyRead(t, s.victim.NBDURI(ro))
	t.Logf("thawed: %s read at %s in %v", ro, s.victim.Name, d.Round(time.Millisecond))
	if diff := firstDiff(got, want); diff != "" {
		t.Errorf("%s at %s right after SIGCONT served data older than what was flushed before the attach: %s", ro, s.victim.Name, diff)
	}
	if d > bound {
		t.Errorf("%s at %s took %v, more than %v", ro, s.victim.Name, d, bound)
	}

	s.c.WaitCaughtUp(clusterWait)
	mustVerify(t, s.writer, s.vol, 3)
}
