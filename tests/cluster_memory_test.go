package tests

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/robib/robib/tests/harness"
)

// Memory bounds per agent. The heap (anonymous memory) holds the DCD
// buffer (64 MiB), up to 16 batches of 512 KiB in flight with their copies
// in forwarding and Raft, and the Raft log cache (32 entries), twice over
// for the garbage collector's headroom. The resident set adds the pages of
// the memory-mapped Raft log (raft-boltdb), which hold up to
// snapshot-threshold + trailing-logs entries of up to 512 KiB and which the
// kernel can reclaim.
const (
	anonLimit = 384 * MiB
	rssLimit  = 768 * MiB
)

// memPeak is the highest memory figures seen for one agent (bytes).
type memPeak struct {
	VmRSS, VmHWM, RssAnon, RssFile int64
	samples                        int
}

// memSampler polls /proc/PID/status of every running agent of a cluster.
type memSampler struct {
	c    *harness.Cluster
	mu   sync.Mutex
	peak map[string]*memPeak
}

func (s *memSampler) sample() {
	for _, a := range s.c.Running() {
		st, err := harness.ProcStatusKiB(a.Pid())
		if err != nil {
			continue // exited between Running and the read
		}
		s.mu.Lock()
		p := s.peak[a.Name]
		if p == nil {
			p = &memPeak{}
			s.peak[a.Name] = p
		}
		p.VmRSS = max(p.VmRSS, st["VmRSS"]*KiB)
		p.VmHWM = max(p.VmHWM, st["VmHWM"]*KiB)
		p.RssAnon = max(p.RssAnon, st["RssAnon"]*KiB)
		p.RssFile = max(p.RssFile, st["RssFile"]*KiB)
		p.samples++
		s.mu.Unlock()
	}
}

func (s *memSampler) run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		s.sample()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// TestClusterMemoryBounded writes a whole volume end to end through NBD at
// a follower of a three-site cluster (default settings) and samples the
// memory of every agent meanwhile: it must stay bounded, whatever the
// volume size. 1 GiB by default, 4 GiB with ROBIB_LONG=1.
func TestClusterMemoryBounded(t *testing.T) {
	requireTools(t, "fio")
	size, sizeArg := int64(1<<30), "1GiB"
	if os.Getenv("ROBIB_LONG") == "1" {
		size, sizeArg = 4<<30, "4GiB"
	}
	// The binary's own timing and log-compaction defaults: what a user runs.
	c := harness.StartCluster(t, harness.ClusterOptions{DefaultTiming: true})
	leader := c.Leader()
	writer := c.Followers()[0]
	writer.CreateVolume("mem", sizeArg)
	waitVolumeEverywhere(t, c, "mem", size)

	s := &memSampler{c: c, peak: map[string]*memPeak{}}
	s.sample()
	idle := map[string]memPeak{}
	for n, p := range s.peak {
		idle[n] = *p
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.run(ctx, 100*time.Millisecond) }()

	start := time.Now()
	out := harness.MustRun(t, 20*time.Minute, "fio", "--name=fill", "--ioengine=nbd", "--uri="+writer.NBDURI("mem"),
		"--rw=write", "--bs=1M", "--iodepth=8", fmt.Sprintf("--size=%d", size), "--end_fsync=1", "--output-format=json")
	elapsed := time.Since(start)
	idx := c.WaitCaughtUp(10 * time.Minute)
	caughtUp := time.Since(start)
	cancel()
	<-done
	s.sample() // VmHWM after catch-up covers any peak between samples

	var res struct {
		Jobs []struct {
			Write struct {
				IOBytes  int64   `json:"io_bytes"`
				BWBytes  float64 `json:"bw_bytes"`
				RuntimMS int64   `json:"runtime"`
			} `json:"write"`
			Error int `json:"error"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal([]byte(jsonStart(out)), &res); err != nil || len(res.Jobs) != 1 {
		t.Fatalf("fio output: %v\n%s", err, harness.Tail(out, 20))
	}
	w := res.Jobs[0].Write
	if res.Jobs[0].Error != 0 || w.IOBytes != size {
		t.Fatalf("fio wrote %d bytes (error %d), want %d", w.IOBytes, res.Jobs[0].Error, size)
	}
	t.Logf("fio wrote %d MiB at %s in %v (%.1f MiB/s incl. final flush); all sites applied through index %d after %v",
		size/MiB, writer.Name, elapsed.Round(time.Millisecond), float64(size)/MiB/elapsed.Seconds(), idx, caughtUp.Round(time.Millisecond))

	for _, a := range c.Agents {
		p := s.peak[a.Name]
		if p == nil {
			t.Fatalf("no memory samples of %s", a.Name)
		}
		db := fileSize(filepath.Join(a.DataDir, "raft", "raft.db"))
		role := "follower"
		switch a {
		case leader:
			role = "leader at start"
		case writer:
			role = "follower, NBD writer"
		}
		t.Logf("%s (%s): idle VmRSS %.0f MiB; peak VmRSS %.0f MiB, VmHWM %.0f MiB, RssAnon %.0f MiB, RssFile %.0f MiB; raft.db %.0f MiB; %d samples",
			a.Name, role, mib(idle[a.Name].VmRSS), mib(p.VmRSS), mib(p.VmHWM), mib(p.RssAnon), mib(p.RssFile), mib(db), p.samples)
		if p.RssAnon >= anonLimit {
			t.Errorf("%s: anonymous memory (heap, buffers) peaked at %.0f MiB, want < %d MiB", a.Name, mib(p.RssAnon), anonLimit/MiB)
		}
		if p.VmHWM >= rssLimit {
			t.Errorf("%s: peak RSS (VmHWM) %.0f MiB, want < %d MiB; of it up to %.0f MiB is file-backed (RssFile: pages of the "+
				"memory-mapped Raft log %s, now %.0f MiB, which the bolt store reads through mmap)",
				a.Name, mib(p.VmHWM), rssLimit/MiB, mib(p.RssFile), filepath.Join("raft", "raft.db"), mib(db))
		}
	}
	mustVerify(t, c.Agents[0], "mem", 3)
}

// jsonStart drops anything fio prints before its JSON document.
func jsonStart(s string) string {
	for i := range s {
		if s[i] == '{' {
			return s[i:]
		}
	}
	return s
}
