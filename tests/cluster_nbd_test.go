package tests

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/robib/robib/tests/harness"
)

// TestClusterThreeSitesNBD: a volume created at a follower exists at every
// site; data written with nbdcopy at a follower reads back byte-exact from
// the other sites; `volume verify` agrees, and catches a copy corrupted on
// disk behind robib's back, naming the chunk.
func TestClusterThreeSitesNBD(t *testing.T) {
	requireTools(t, "nbdcopy", "python3-nbd", "dd")
	c := harness.StartCluster(t, harness.ClusterOptions{})
	writer := c.Followers()[0]
	const size, dataLen = 64 * MiB, 32 * MiB

	writer.CreateVolume("rep", "64MiB")
	waitVolumeEverywhere(t, c, "rep", size)

	data := randomBytes(101, dataLen)
	src := writeFile(t, t.TempDir(), "src.img", data)
	harness.MustRun(t, toolTimeout, "nbdcopy", "--flush", src, writer.NBDURI("rep"))
	// And an explicit FLUSH on a fresh connection: it covers the writes of
	// nbdcopy's connections too (one write-back stage per volume and site).
	// This is nbdsh, run with the interpreter that has the bindings (the
	// nbdsh script runs whatever python3 is first on PATH).
	harness.MustRun(t, toolTimeout, harness.SystemPython, "-m", "nbd", "-u", writer.NBDURI("rep"), "-c", "h.flush()")
	idx := c.WaitCaughtUp(clusterWait)
	t.Logf("writes applied everywhere by command index %d", idx)

	want := make([]byte, size)
	copy(want, data)
	for _, a := range c.Agents {
		assertExportEquals(t, a, "rep", want)
	}
	rep := mustVerify(t, c.Agents[2], "rep", 3)
	t.Logf("verify: %d chunks at %v identical", rep.Chunks, rep.Sites)

	// Corrupt one copy in place while its agent runs.
	victim := others(c, writer)[0]
	path := volumeDataFile(victim, "rep")
	if n := fileSize(path); n != size {
		t.Fatalf("%s: data file %s has size %d, want %d", victim.Name, path, n, size)
	}
	const corruptAt = 5*MiB + 100
	junk := writeFile(t, t.TempDir(), "junk", []byte("corruption!"))
	harness.MustRun(t, toolTimeout, "dd", "if="+junk, "of="+path, "bs=11", "count=1",
		fmt.Sprintf("seek=%d", corruptAt), "oflag=seek_bytes", "conv=notrunc", "status=none")
	if n := fileSize(path); n != size {
		t.Fatalf("dd changed the size of %s to %d", path, n)
	}

	bad, code := verifyVolume(t, writer, "rep")
	if code == 0 || bad.OK {
		t.Fatalf("volume verify after corrupting %s's copy exited %d, ok=%v: %+v", victim.Name, code, bad.OK, bad)
	}
	if len(bad.Mismatches) != 1 || bad.Mismatches[0].Offset != 5*MiB || bad.Mismatches[0].Length != MiB {
		t.Fatalf("verify should report exactly the 1 MiB chunk at offset %d: %+v", 5*MiB, bad.Mismatches)
	}
	h := bad.Mismatches[0].Hashes
	for _, a := range c.Agents {
		if a != victim && h[a.Name] == h[victim.Name] {
			t.Errorf("corrupted %s has the same hash as %s: %v", victim.Name, a.Name, h)
		}
		if a != victim && h[a.Name] != h[writer.Name] {
			t.Errorf("intact copies differ: %v", h)
		}
	}
	if len(bad.Sites) != 3 {
		t.Errorf("verify compared %v, want all 3 sites", bad.Sites)
	}
	// The human form names the offset too.
	r := harness.Run(t, toolTimeout, nil, victim.Bin, "--api", c.Agents[0].APIURL(), "volume", "verify", "rep", "-q")
	if r.ExitCode == 0 || !strings.Contains(r.Stdout, fmt.Sprintf("MISMATCH at offset %d", 5*MiB)) || !strings.Contains(r.Stdout, victim.Name+"=") {
		t.Errorf("volume verify (text) exit %d, output does not name offset %d and site %s:\n%s%s", r.ExitCode, 5*MiB, victim.Name, r.Stdout, r.Stderr)
	}

	// volume repair: the victim holds the minority copy of that chunk; it
	// is repaired from the two other sites, and verify agrees again.
	r = harness.Run(t, 5*time.Minute, writer.CLIEnv(), writer.Bin, "--api", writer.APIURL(), "volume", "repair", "rep", "--json", "-q")
	var fixed struct {
		OK      bool `json:"ok"`
		Repairs []struct {
			Site    string   `json:"site"`
			Offset  int64    `json:"offset"`
			Length  int64    `json:"length"`
			Sources []string `json:"sources"`
			Error   string   `json:"error"`
		} `json:"repairs"`
	}
	if err := json.Unmarshal([]byte(r.Stdout), &fixed); err != nil || r.ExitCode != 0 || !fixed.OK || len(fixed.Repairs) != 1 {
		t.Fatalf("volume repair: exit %d, %v: %+v\n%s%s", r.ExitCode, err, fixed, r.Stdout, r.Stderr)
	}
	if f := fixed.Repairs[0]; f.Site != victim.Name || f.Offset != 5*MiB || f.Length != MiB || len(f.Sources) != 2 || slices.Contains(f.Sources, victim.Name) || f.Error != "" {
		t.Fatalf("volume repair changed %+v, want %s's chunk at %d from the two others", f, victim.Name, 5*MiB)
	}
	mustVerify(t, c.Agents[0], "rep", 3)

	// A block damaged on disk and read over NBD at that site: the right
	// bytes, read from another site and repaired there on the way.
	harness.MustRun(t, toolTimeout, "dd", "if="+junk, "of="+path, "bs=11", "count=1",
		fmt.Sprintf("seek=%d", 9*MiB+7), "oflag=seek_bytes", "conv=notrunc", "status=none")
	assertExportEquals(t, victim, "rep", want)
	mustVerify(t, writer, "rep", 3)
}

// TestClusterKill9EverySiteKeepsFlushedData: flushed data survives SIGKILL
// of every site at once, and a restart neither restores a snapshot nor
// rewrites or rereads the volumes once a checkpoint covers the data.
func TestClusterKill9EverySiteKeepsFlushedData(t *testing.T) {
	requireTools(t, "python3-nbd", "nbdcopy")
	// raft-boltdb: this test reads "the restart rewrote nothing" off the
	// process's I/O counters, and the DCD log's own start-up work (it
	// reads the live log to check every record, and zeroes a spare
	// segment) would be counted as a volume rewrite. The FSM's replay,
	// which is what is tested, does not depend on the log store.
	c := harness.StartCluster(t, harness.ClusterOptions{Args: []string{"--raft-log-store", "boltdb"}})
	const size = 64 * MiB
	writer := c.Followers()[1]
	writer.CreateVolume("k9", "64MiB")
	waitVolumeEverywhere(t, c, "k9", size)

	model := make([]byte, size)
	runNBDPlan(t, writer.NBDURI("k9"), randomBytes(202, size), sequentialPlan(size, MiB), false, model)
	sum := sha256Hex(model)
	t.Logf("wrote and flushed %d MiB at %s, sha256 %s", size/MiB, writer.Name, sum)

	restartAll := func(round string) {
		t.Helper()
		for _, a := range c.Agents {
			a.Kill()
		}
		for _, a := range c.Agents {
			if err := a.Start(); err != nil {
				t.Fatalf("%s: restarting %s after SIGKILL: %v", round, a.Name, err)
			}
		}
		c.WaitReady(clusterWait, 3)
		c.WaitCaughtUp(clusterWait)
	}
	// ioAfterRestart reads /proc/PID/io of every restarted agent before
	// anything reads the volumes through NBD.
	ioAfterRestart := func(round string) map[string]map[string]int64 {
		t.Helper()
		out := map[string]map[string]int64{}
		for _, a := range c.Agents {
			io, err := harness.ProcIO(a.Pid())
			if err != nil {
				t.Fatalf("%s: %v", a.Name, err)
			}
			out[a.Name] = io
			t.Logf("%s: %s since restart: wchar %.1f MiB, write_bytes %.1f MiB, rchar %.1f MiB, read_bytes %.1f MiB (state file index %d)",
				round, a.Name, mib(io["wchar"]), mib(io["write_bytes"]), mib(io["rchar"]), mib(io["read_bytes"]), stateLoadedIndex(t, a))
			if l := a.CurrentLog(); strings.Contains(l, "fsm: restoring snapshot") || strings.Contains(l, "fsm: snapshot restored") {
				t.Errorf("%s: %s restored a snapshot on restart (it should replay its log tail onto its volumes)", round, a.Name)
			}
		}
		return out
	}
	readBack := func(round string) {
		t.Helper()
		for _, a := range c.Agents {
			got := nbdcopyOut(t, a.NBDURI("k9"))
			if s := sha256Hex(got); s != sum {
				assertSameBytes(t, fmt.Sprintf("%s: volume k9 at %s", round, a.Name), got, model)
			}
		}
		mustVerify(t, c.Agents[0], "k9", 3)
	}

	// Round 1: SIGKILL right after the flush. Whatever the sites had not
	// checkpointed yet is replayed from the Raft log.
	restartAll("round 1")
	ioAfterRestart("round 1")
	readBack("round 1")

	// Round 2: a metadata command makes every site checkpoint (the FSM
	// checkpoints before and after each); the verify of that volume is
	// applied after it at every site, so the checkpoint is on disk. A
	// SIGKILL now must cost a restart almost no volume I/O.
	covered := c.WaitCaughtUp(clusterWait)
	writer.CreateVolume("ckpt", "1MiB")
	mustVerify(t, c.Agents[2], "ckpt", 3)
	restartAll("round 2")
	io := ioAfterRestart("round 2")
	for _, a := range c.Agents {
		if got := stateLoadedIndex(t, a); got < covered {
			t.Errorf("round 2: %s loaded state index %d, below the %d its writes had reached before the checkpoint", a.Name, got, covered)
		}
		for _, k := range []string{"wchar", "rchar"} {
			if io[a.Name][k] >= size/4 {
				t.Errorf("round 2: %s: %s = %.1f MiB since restart, want < %d MiB (a quarter of the %d MiB volume): the restart rewrote or reread the volume",
					a.Name, k, mib(io[a.Name][k]), size/4/MiB, size/MiB)
			}
		}
	}
	readBack("round 2")
}

func mib(n int64) float64 { return float64(n) / MiB }

// TestClusterCatchUpAfterDowntime: a follower stopped while the others
// write past the snapshot threshold (and the leader compacts its log past
// it) catches up through a snapshot install; so does a brand-new fourth
// site.
func TestClusterCatchUpAfterDowntime(t *testing.T) {
	requireTools(t, "python3-nbd", "nbdcopy")
	snapArgs := []string{"--snapshot-threshold", "32", "--snapshot-interval", "200ms", "--trailing-logs", "8"}
	step := stopwatch(t)
	c := harness.StartCluster(t, harness.ClusterOptions{Args: snapArgs})
	step("cluster ready")
	const size = 16 * MiB
	c.Agents[0].CreateVolume("cu", "16MiB")
	waitVolumeEverywhere(t, c, "cu", size)
	c.WaitCaughtUp(clusterWait)

	leader := c.Leader()
	// Stop the later-started follower: it rejoins gossip through --join.
	// (The bootstrap site has no --join; its return after downtime is
	// TestClusterBootstrapSiteRejoinsAfterDowntime's subject.)
	fs := c.Followers()
	down, writer := fs[1], fs[0]
	before, _ := c.MustStatus(leader).Site(down.Name)
	if err := down.Stop(); err != nil {
		t.Fatalf("stopping %s: %v", down.Name, err)
	}
	t.Logf("stopped %s at log index %d", down.Name, before.LastLogIndex)

	// 100 writes, each followed by a flush: each flush is at least one
	// Raft entry.
	model := make([]byte, size)
	src := randomBytes(303, 4*MiB)
	rng := rand.New(rand.NewPCG(3, 3))
	var plan []nbdWrite
	for range 100 {
		n := int64(4*KiB) * (1 + rng.Int64N(32))
		plan = append(plan, nbdWrite{Off: rng.Int64N((size-n)/512) * 512, Len: n, SrcOff: rng.Int64N(int64(len(src)) - n)})
	}
	runNBDPlan(t, writer.NBDURI("cu"), src, plan, true, model)
	step(fmt.Sprintf("%d writes, each flushed, at %s", len(plan), writer.Name))

	// Whichever running site leads when the stopped one returns must have
	// compacted its log past it.
	var snaps []string
	harness.WaitFor(t, clusterWait, "the running sites to compact their logs past the stopped site", func() (bool, error) {
		snaps = snaps[:0]
		for _, a := range c.Running() {
			st, err := c.Status(a)
			if err != nil {
				return false, err
			}
			s, _ := st.Site(a.Name)
			snaps = append(snaps, fmt.Sprintf("%s:%d", a.Name, s.LastSnapshotIndex))
			if s.LastSnapshotIndex <= before.LastLogIndex+8 { // 8: --trailing-logs
				return false, fmt.Errorf("%s's last snapshot index is %d", a.Name, s.LastSnapshotIndex)
			}
		}
		return true, nil
	})
	t.Logf("snapshot indexes %v; the stopped site's log ends at %d", snaps, before.LastLogIndex)

	if err := down.Start(); err != nil {
		t.Fatal(err)
	}
	step("restarted " + down.Name)
	c.WaitReady(clusterWait, 3)
	step("3 voters ready")
	c.WaitCaughtUp(clusterWait)
	step(down.Name + " caught up")
	if !strings.Contains(down.CurrentLog(), "fsm: snapshot restored") {
		t.Errorf("%s caught up without installing a snapshot, though the leader's log no longer holds its missing entries", down.Name)
	}
	mustVerify(t, down, "cu", 3)
	assertExportEquals(t, down, "cu", model)

	// A brand-new site joins: the log was compacted long ago, so it too
	// needs a snapshot.
	s4 := c.AddSite("site4")
	step("started site4")
	c.WaitReady(clusterWait, 4)
	step("4 voters ready")
	c.WaitCaughtUp(clusterWait)
	step("site4 caught up")
	if !strings.Contains(s4.CurrentLog(), "fsm: snapshot restored") {
		t.Errorf("%s caught up without installing a snapshot", s4.Name)
	}
	mustVerify(t, s4, "cu", 4)
	assertExportEquals(t, s4, "cu", model)
	// The data file of the new site has the volume's size.
	if n := fileSize(volumeDataFile(s4, "cu")); n != size {
		t.Errorf("%s: data file size %d, want %d", s4.Name, n, size)
	}
}
