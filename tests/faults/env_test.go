package faults

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/robib/robib/tests/checker"
	"github.com/robib/robib/tests/dockerh"
	"github.com/robib/robib/tests/harness"
)

// Timings of the sites under test: the product defaults for Raft (500 ms
// heartbeat and election timeouts) and the volume lease (4 s), and a short
// flush timeout so that a site cut off from the majority fails flushes
// within the test's patience.
const (
	volName      = "vol"
	leaseTTL     = 4 * time.Second
	flushTimeout = 5 * time.Second
	blockSize    = 4096
)

// env is one three-site cluster in containers with one volume.
type env struct {
	t *testing.T
	c *dockerh.Cluster
}

// newEnv starts three sites in containers and creates the volume.
// Leadership stays where Raft put it (--leader-follows-writes=false): these
// tests place the writer at a follower on purpose, to fault the leader
// while writes are forwarded to it. TestLeaderFollowsWriter runs with the
// product default.
func newEnv(t *testing.T, volSize string) *env {
	t.Helper()
	return newEnvArgs(t, volSize, "--leader-follows-writes=false")
}

// newEnvArgs is newEnv with these agent flags instead of
// --leader-follows-writes=false.
func newEnvArgs(t *testing.T, volSize string, args ...string) *env {
	t.Helper()
	dockerh.RequireDocker(t)
	c := dockerh.StartCluster(t, dockerh.Options{
		DefaultTiming: true,
		ExtraArgs:     append([]string{"--flush-timeout", flushTimeout.String(), "--volume-lease-ttl", leaseTTL.String()}, args...),
	})
	e := &env{t: t, c: c}
	c.MustCLI(c.MustLeader(), "volume", "create", volName, "--size", volSize)
	c.WaitCaughtUp(60 * time.Second)
	return e
}

// nbd returns the NBD address of a site (on the client network, reachable
// from the host even while the site is cut off from the other sites).
func (e *env) nbd(site string) string { return e.c.NBDAddr(site) }

// others returns the site names except the given ones.
func (e *env) others(except ...string) []string {
	var out []string
	for _, n := range e.c.Names() {
		if !contains(except, n) {
			out = append(out, n)
		}
	}
	return out
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// run is a checker workload running in the background.
type run struct {
	t      *testing.T
	name   string
	ck     *checker.Checker
	cancel context.CancelFunc
	done   chan error
}

// startRun starts a checker workload on the volume. opts.Export defaults
// to the volume.
func (e *env) startRun(name string, opts checker.Options) *run {
	e.t.Helper()
	if opts.Export == "" {
		opts.Export = volName
	}
	if opts.OpTimeout == 0 {
		// Longer than the sites' flush timeout: a flush that cannot be
		// committed fails with an error the client sees, rather than the
		// client giving up on the connection first.
		opts.OpTimeout = 3 * flushTimeout
	}
	if opts.QueueDepth == 0 {
		opts.QueueDepth = 8
	}
	if opts.FlushEvery == 0 {
		opts.FlushEvery = 16
	}
	if opts.FUAFraction == 0 {
		opts.FUAFraction = 0.02
	}
	logf := func(format string, args ...any) { e.t.Logf(name+": "+format, args...) }
	opts.Logf = logf
	ck, err := checker.New(opts)
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &run{t: e.t, name: name, ck: ck, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- ck.Run(ctx) }()
	e.t.Cleanup(func() { r.stop() })
	return r
}

// stop ends the workload (idempotent) and waits for it.
func (r *run) stop() {
	r.cancel()
	if r.done != nil {
		err := <-r.done
		r.done = nil
		if err != nil && !errors.Is(err, context.Canceled) {
			r.t.Errorf("%s: checker run: %v", r.name, err)
		}
	}
}

// waitFlushes waits until n more flushes than now were acknowledged.
func (r *run) waitFlushes(n int64, timeout time.Duration) {
	r.t.Helper()
	target := r.ck.Snapshot().FlushesOK + n
	harness.WaitFor(r.t, timeout, fmt.Sprintf("%s: %d acknowledged flushes", r.name, target), func() (bool, error) {
		return r.ck.Snapshot().FlushesOK >= target, nil
	})
}

// stallAfter waits for the first flush sent after t0 to be acknowledged
// and returns the time from t0 to that acknowledgement.
func (r *run) stallAfter(t0 time.Time, timeout time.Duration) time.Duration {
	r.t.Helper()
	var d time.Duration
	harness.WaitFor(r.t, timeout, fmt.Sprintf("%s: an acknowledged flush sent after the fault", r.name), func() (bool, error) {
		var ok bool
		d, ok = r.ck.StallAround(t0)
		return ok, nil
	})
	return d
}

// verifyEverywhere waits until every reachable site applied everything,
// then proves at each site, reading its own copy (VOLUME@ro), that no
// acknowledged-flushed block of any run is missing, stale or torn, and
// that `volume verify` finds all copies identical.
//
// It returns the number of (site, block) checks of blocks with a durable
// write, i.e. acknowledged flushes verified at every site.
func (e *env) verifyEverywhere(runs ...*run) int {
	e.t.Helper()
	for _, r := range runs {
		r.stop()
	}
	e.c.WaitReady(90*time.Second, len(e.c.Names()))
	e.c.WaitCaughtUp(90 * time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// Blocks past a run's working set must read as zeros, unless another
	// run uses them.
	unwritten := 0
	if len(runs) == 1 {
		unwritten = 8
	}
	durable := 0
	for _, site := range e.c.Names() {
		for _, r := range runs {
			cl, err := checker.Dial(ctx, nil, e.nbd(site), volName+"@ro")
			if err != nil {
				e.t.Fatalf("attach %s@ro at %s: %v", volName, site, err)
			}
			rep, err := r.ck.Verify(ctx, cl, checker.VerifyOptions{Unwritten: unwritten})
			cl.Close()
			if err != nil {
				e.t.Fatalf("%s: verify at %s: %v", r.name, site, err)
			}
			if rep.Err() != nil {
				e.saveRecord(r)
				e.t.Fatalf("%s: at %s: %v\n%s", r.name, site, rep.Err(), rep)
			}
			durable += rep.Durable
		}
	}
	if durable == 0 {
		e.t.Fatal("no run made any block durable: the check proves nothing")
	}
	out := e.c.MustCLI(e.c.MustLeader(), "volume", "verify", volName)
	e.t.Logf("volume verify: %s", strings.TrimSpace(out))
	return durable
}

// saveRecord keeps a failed run's record for inspection.
func (e *env) saveRecord(r *run) {
	dir := os.Getenv("ROBIB_FAULT_RECORDS")
	if dir == "" {
		dir = e.t.TempDir()
	}
	path := filepath.Join(dir, fmt.Sprintf("%s-%s.json", e.t.Name(), r.name))
	path = strings.ReplaceAll(path, "/", "_")
	path = filepath.Join(dir, filepath.Base(path))
	f, err := os.Create(path)
	if err != nil {
		e.t.Logf("saving record: %v", err)
		return
	}
	defer f.Close()
	if err := r.ck.WriteJSON(f); err == nil {
		e.t.Logf("%s: checker record saved in %s", r.name, path)
	}
}

// outcome is one fault's line in the report.
type outcome struct {
	Test     string        `json:"test"`
	Fault    string        `json:"fault"`
	Stall    time.Duration `json:"stall_ns"`
	Longest  time.Duration `json:"longest_stall_ns"`
	Writes   int64         `json:"writes_acked"`
	Flushes  int64         `json:"flushes_ok"`
	Failed   int64         `json:"flushes_failed"`
	Sessions int64         `json:"sessions"`
}

var reportMu sync.Mutex

// report logs a fault's outcome and appends it, as a JSON line, to the
// file named by ROBIB_FAULT_REPORT if set.
func report(t *testing.T, fault string, stall time.Duration, r *run) {
	t.Helper()
	s := r.ck.Snapshot()
	o := outcome{Test: t.Name(), Fault: fault, Stall: stall, Longest: s.LongestStall, Writes: s.WritesAcked,
		Flushes: s.FlushesOK, Failed: s.FlushesFailed, Sessions: s.Sessions}
	t.Logf("REPORT %-40s writes stalled %7v (longest gap between flushes %v); %d writes acked, %d flushes ok, %d failed, %d sessions",
		fault, stall.Round(time.Millisecond), s.LongestStall.Round(time.Millisecond), s.WritesAcked, s.FlushesOK, s.FlushesFailed, s.Sessions)
	path := os.Getenv("ROBIB_FAULT_REPORT")
	if path == "" {
		return
	}
	b, _ := json.Marshal(o)
	reportMu.Lock()
	defer reportMu.Unlock()
	f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		t.Logf("report file: %v", err)
		return
	}
	defer f.Close()
	f.Write(append(b, '\n'))
}

// durations summarises a list of measurements.
func durations(ds []time.Duration) (median, worst time.Duration) {
	if len(ds) == 0 {
		return 0, 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	if len(s)%2 == 1 {
		median = s[len(s)/2]
	} else {
		median = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return median, s[len(s)-1]
}
