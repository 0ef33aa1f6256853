package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/robib/robib/cmd/internal/api"
	"github.com/robib/robib/cmd/internal/config"
	"github.com/robib/robib/nbdfront"
)

// site is one in-process agent of a test cluster, restartable on the same
// data dir and ports.
type site struct {
	cfg config.Config
	a   *Agent
}

// handedOut remembers every address freeAddr returned in this process: the
// kernel may offer a port again once its probe listener closed, and two
// listeners of one test (a site's Raft and gossip addresses) must differ.
var handedOut = struct {
	sync.Mutex
	addrs map[string]bool
}{addrs: map[string]bool{}}

func freeAddr(t *testing.T) string {
	t.Helper()
	handedOut.Lock()
	defer handedOut.Unlock()
	for range 100 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		l.Close()
		if !handedOut.addrs[addr] {
			handedOut.addrs[addr] = true
			return addr
		}
	}
	t.Fatal("no fresh loopback port after 100 tries")
	return ""
}

func testLogger(t *testing.T, name string) *slog.Logger {
	if os.Getenv("ROBIB_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("site", name)
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func siteConfig(t *testing.T, name string, join []string, expect int) config.Config {
	return config.Config{
		Name:              name,
		DataDir:           filepath.Join(t.TempDir(), name),
		NBDAddr:           freeAddr(t),
		APIAddr:           freeAddr(t),
		RaftAddr:          freeAddr(t),
		GossipAddr:        freeAddr(t),
		LogLevel:          "info",
		LogFormat:         "text",
		Join:              join,
		BootstrapExpect:   expect,
		SnapshotThreshold: 1 << 20,
		SnapshotInterval:  time.Hour,
		TrailingLogs:      1024,
		HeartbeatTimeout:  300 * time.Millisecond,
		ElectionTimeout:   300 * time.Millisecond,
		LeaderLease:       150 * time.Millisecond,
		DCDBuffer:         16 << 20,
		DCDInflight:       4,
		VolumeLeaseTTL:    2 * time.Second,
		LeaderOverlap:     true,
		FlushTimeout:      30 * time.Second,
		Insecure:          true, // tls_test.go runs a cluster with TLS
	}
}

func (s *site) start(t *testing.T) {
	t.Helper()
	a, err := New(s.cfg, testLogger(t, s.cfg.Name), nil)
	if err != nil {
		t.Fatalf("starting %s: %v", s.cfg.Name, err)
	}
	if err := a.Start(); err != nil {
		a.Close()
		t.Fatalf("serving %s: %v", s.cfg.Name, err)
	}
	s.a = a
}

func (s *site) stop(t *testing.T) {
	t.Helper()
	if s.a != nil {
		if err := s.a.Close(); err != nil {
			t.Logf("closing %s: %v", s.cfg.Name, err)
		}
		s.a = nil
	}
}

// startCluster starts n sites that bootstrap together.
func startCluster(t *testing.T, n int, tweak func(*config.Config)) []*site {
	t.Helper()
	sites := make([]*site, n)
	for i := range sites {
		var join []string
		if i > 0 {
			join = []string{sites[0].cfg.GossipAddr}
		}
		cfg := siteConfig(t, fmt.Sprintf("s%d", i+1), join, n)
		if tweak != nil {
			tweak(&cfg)
		}
		sites[i] = &site{cfg: cfg}
	}
	for _, s := range sites {
		s.start(t)
		t.Cleanup(func() { s.stop(t) })
	}
	waitFor(t, 30*time.Second, "a leader known by every site with all voters", func() (bool, error) {
		for _, s := range sites {
			st, err := s.a.Node().Status(context.Background())
			if err != nil || st.Leader == "" {
				return false, err
			}
			voters := 0
			for _, x := range st.Sites {
				if x.Voter {
					voters++
				}
			}
			if voters != n {
				return false, nil
			}
		}
		return true, nil
	})
	return sites
}

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		ok, err := cond()
		if ok {
			return
		}
		last = err
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("timed out after %v waiting for %s (last error: %v)", timeout, what, last)
}

func leaderOf(t *testing.T, sites []*site) (*site, []*site) {
	t.Helper()
	var leader *site
	var followers []*site
	for _, s := range sites {
		if s.a != nil && s.a.Node().IsLeader() {
			leader = s
		} else if s.a != nil {
			followers = append(followers, s)
		}
	}
	if leader == nil {
		t.Fatal("no leader")
	}
	return leader, followers
}

func svc(s *site) *clusterService {
	return &clusterService{node: s.a.node, store: s.a.store}
}

func createVolume(t *testing.T, s *site, name string, size int64) {
	t.Helper()
	if _, err := svc(s).CreateVolume(context.Background(), api.CreateVolumeRequest{Name: name, Size: size}); err != nil {
		t.Fatalf("create %s at %s: %v", name, s.cfg.Name, err)
	}
}

// waitCaughtUp waits until every running site applied the last command the
// leader applied as of now (commands the test made have all been applied by
// the leader before they returned).
func waitCaughtUp(t *testing.T, sites []*site) {
	t.Helper()
	leader, _ := leaderOf(t, sites)
	target := leader.a.fsm.AppliedIndex()
	waitFor(t, 60*time.Second, fmt.Sprintf("every site applied command index %d", target), func() (bool, error) {
		for _, s := range sites {
			if s.a != nil && s.a.fsm.AppliedIndex() < target {
				return false, nil
			}
		}
		return true, nil
	})
}

func openExport(t *testing.T, s *site, name string) nbdfront.Export {
	t.Helper()
	e, err := s.a.backend.Open(name)
	if err != nil {
		t.Fatalf("open %s at %s: %v", name, s.cfg.Name, err)
	}
	return e
}

func readAll(t *testing.T, s *site, name string, size int64) []byte {
	t.Helper()
	e := openExport(t, s, name)
	defer e.Close()
	buf := make([]byte, size)
	if _, err := e.ReadAt(buf, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatalf("read %s at %s: %v", name, s.cfg.Name, err)
	}
	return buf
}

// writeRandom writes random blocks through an export and returns the
// expected volume content.
func writeRandom(t *testing.T, e nbdfront.Export, model []byte, writes int, maxLen int) {
	t.Helper()
	for i := 0; i < writes; i++ {
		var rb [8]byte
		rand.Read(rb[:])
		n := 512 * (1 + int(rb[0])%(maxLen/512))
		off := (int64(rb[1])<<16 | int64(rb[2])<<8 | int64(rb[3])) * 512 % int64(len(model)-n)
		off -= off % 512
		p := make([]byte, n)
		rand.Read(p)
		if _, err := e.WriteAt(p, off); err != nil {
			t.Fatalf("write: %v", err)
		}
		copy(model[off:], p)
	}
}

func TestVolumeCreatedAtOneSiteAppearsAtAll(t *testing.T) {
	sites := startCluster(t, 3, nil)
	_, followers := leaderOf(t, sites)
	createVolume(t, followers[0], "vol1", 8<<20)
	waitCaughtUp(t, sites)
	for _, s := range sites {
		v, err := svc(s).GetVolume(context.Background(), "vol1")
		if err != nil || v.Size != 8<<20 {
			t.Fatalf("%s: got %+v, %v", s.cfg.Name, v, err)
		}
	}
	// Duplicate and bad requests are clear errors, from any site.
	if _, err := svc(sites[2]).CreateVolume(context.Background(), api.CreateVolumeRequest{Name: "vol1", Size: 8 << 20}); !errors.Is(err, api.ErrExists) {
		t.Fatalf("duplicate create: %v", err)
	}
	if _, err := svc(sites[1]).CreateVolume(context.Background(), api.CreateVolumeRequest{Name: "../x", Size: 8 << 20}); !errors.Is(err, api.ErrBadRequest) {
		t.Fatalf("bad name: %v", err)
	}
	if err := svc(sites[1]).DeleteVolume(context.Background(), "nope"); !errors.Is(err, api.ErrNotFound) {
		t.Fatalf("delete unknown: %v", err)
	}
	if _, err := svc(sites[0]).ResizeVolume(context.Background(), "vol1", 16<<20); err != nil {
		t.Fatal(err)
	}
	waitCaughtUp(t, sites)
	for _, s := range sites {
		if v, _ := svc(s).GetVolume(context.Background(), "vol1"); v.Size != 16<<20 {
			t.Fatalf("%s: resize not applied: %+v", s.cfg.Name, v)
		}
	}
	if err := svc(sites[2]).DeleteVolume(context.Background(), "vol1"); err != nil {
		t.Fatal(err)
	}
	waitCaughtUp(t, sites)
	for _, s := range sites {
		if _, err := svc(s).GetVolume(context.Background(), "vol1"); !errors.Is(err, api.ErrNotFound) {
			t.Fatalf("%s: deleted volume still there: %v", s.cfg.Name, err)
		}
	}
}

func TestWriteAtFollowerReadsBackEverywhereAndVerifies(t *testing.T) {
	sites := startCluster(t, 3, nil)
	_, followers := leaderOf(t, sites)
	const size = 16 << 20
	createVolume(t, sites[0], "data", size)
	waitCaughtUp(t, sites)

	model := make([]byte, size)
	e := openExport(t, followers[0], "data")
	writeRandom(t, e, model, 400, 64<<10)
	// Read-your-writes before the flush, at the writing site.
	got := make([]byte, size)
	if _, err := e.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("read-your-writes: writer site does not see its own writes")
	}
	if err := e.Flush(); err != nil {
		t.Fatalf("flush: %v", err)
	}
	if err := e.Trim(0, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := e.WriteZeroes(2<<20, 1<<20, true); err != nil {
		t.Fatal(err)
	}
	clear(model[:1<<20])
	clear(model[2<<20 : 3<<20])
	if err := e.Flush(); err != nil {
		t.Fatalf("flush: %v", err)
	}
	e.Close()
	waitCaughtUp(t, sites)
	for _, s := range sites {
		if got := readAll(t, s, "data", size); !bytes.Equal(got, model) {
			t.Fatalf("site %s: content differs from what was written", s.cfg.Name)
		}
	}

	res, err := svc(followers[1]).VerifyVolume(context.Background(), "data", api.VerifyRequest{Offset: 0, Length: size, ChunkSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Sites) != 3 || len(res.Mismatches) != 0 || res.Chunks != size>>20 {
		t.Fatalf("verify of identical copies: %+v", res)
	}

	// Corrupt one site's copy on disk, behind robib's back.
	victim := followers[1]
	v, err := victim.a.store.Get("data")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt([]byte("corruption!"), 5<<20+100); err != nil {
		t.Fatal(err)
	}
	res, err = svc(sites[0]).VerifyVolume(context.Background(), "data", api.VerifyRequest{Offset: 0, Length: size, ChunkSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Mismatches) != 1 || res.Mismatches[0].Offset != 5<<20 {
		t.Fatalf("verify should find exactly the corrupted chunk at 5MiB: %+v", res.Mismatches)
	}
	h := res.Mismatches[0].Hashes
	for _, s := range sites {
		if s != victim && h[s.cfg.Name] == h[victim.cfg.Name] {
			t.Fatalf("corrupted site's hash equals %s's", s.cfg.Name)
		}
	}
}

func TestCatchUpThroughSnapshotAndNewSite(t *testing.T) {
	sites := startCluster(t, 3, func(c *config.Config) {
		c.SnapshotThreshold = 16
		c.SnapshotInterval = 100 * time.Millisecond
		c.TrailingLogs = 4
	})
	const size = 8 << 20
	createVolume(t, sites[0], "cu", size)
	waitCaughtUp(t, sites)
	leader, followers := leaderOf(t, sites)
	down := followers[0]
	down.stop(t)

	model := make([]byte, size)
	e := openExport(t, leader, "cu")
	for i := 0; i < 40; i++ { // many flushes: many entries, past the threshold
		writeRandom(t, e, model, 5, 32<<10)
		if err := e.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 30*time.Second, "the leader compacted its log past the stopped site", func() (bool, error) {
		st := leader.a.Node().LocalStatus()
		return st.LastSnapshotIndex > 0 && leader.a.fsm.Stats().AppliedIndex > st.LastSnapshotIndex-1, nil
	})
	e.Close()

	down.start(t)
	waitCaughtUp(t, sites)
	if got := readAll(t, down, "cu", size); !bytes.Equal(got, model) {
		t.Fatal("restarted site differs after catch-up")
	}

	// A brand-new fourth site joins and catches up too.
	cfg := siteConfig(t, "s4", []string{sites[0].cfg.GossipAddr}, 0)
	cfg.SnapshotThreshold, cfg.SnapshotInterval, cfg.TrailingLogs = 16, 100*time.Millisecond, 4
	s4 := &site{cfg: cfg}
	s4.start(t)
	t.Cleanup(func() { s4.stop(t) })
	all := append(sites, s4)
	waitFor(t, 60*time.Second, "s4 becomes a voter", func() (bool, error) {
		// Ask whichever site leads now: under load an election may move it.
		st, err := s4.a.Node().Status(context.Background())
		if err != nil {
			return false, err
		}
		if st.Leader == "" {
			return false, fmt.Errorf("no leader known at s4")
		}
		for _, x := range st.Sites {
			if x.Name == "s4" && x.Voter {
				return true, nil
			}
		}
		return false, nil
	})
	waitCaughtUp(t, all)
	if got := readAll(t, s4, "cu", size); !bytes.Equal(got, model) {
		t.Fatal("new site differs after catch-up")
	}
	res, err := svc(s4).VerifyVolume(context.Background(), "cu", api.VerifyRequest{Length: size, ChunkSize: 1 << 20})
	if err != nil || len(res.Sites) != 4 || len(res.Mismatches) != 0 {
		t.Fatalf("verify after catch-up: %+v %v", res, err)
	}
	if down.a.fsm.Stats().Restores+s4.a.fsm.Stats().Restores == 0 {
		t.Fatal("expected at least one snapshot restore during catch-up")
	}
}

func TestRestartEverySiteKeepsDataWithoutRewrite(t *testing.T) {
	sites := startCluster(t, 3, nil)
	const size = 8 << 20
	createVolume(t, sites[1], "r", size)
	waitCaughtUp(t, sites)
	model := make([]byte, size)
	e := openExport(t, sites[2], "r")
	writeRandom(t, e, model, 200, 32<<10)
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	e.Close()
	waitCaughtUp(t, sites)
	for _, s := range sites {
		s.stop(t)
	}
	var wg sync.WaitGroup
	for _, s := range sites {
		wg.Add(1)
		go func() { defer wg.Done(); s.start(t) }()
	}
	wg.Wait()
	waitFor(t, 30*time.Second, "a leader after restart", func() (bool, error) {
		return sites[0].a.Node().Leader() != "", nil
	})
	waitCaughtUp(t, sites)
	for _, s := range sites {
		if got := readAll(t, s, "r", size); !bytes.Equal(got, model) {
			t.Fatalf("%s differs after restart", s.cfg.Name)
		}
		if st := s.a.fsm.Stats(); st.Restores != 0 || st.RestoreBytesWritten != 0 {
			t.Fatalf("%s restored a snapshot on restart: %+v", s.cfg.Name, st)
		}
	}
}

func TestSingleSiteIsACompleteCluster(t *testing.T) {
	cfg := siteConfig(t, "solo", nil, 0)
	s := &site{cfg: cfg}
	s.start(t)
	t.Cleanup(func() { s.stop(t) })
	waitFor(t, 10*time.Second, "solo leads", func() (bool, error) { return s.a.Node().IsLeader(), nil })
	createVolume(t, s, "v", 1<<20)
	e := openExport(t, s, "v")
	defer e.Close()
	p := bytes.Repeat([]byte("robib"), 1000)
	if _, err := e.WriteAt(p, 4096); err != nil {
		t.Fatal(err)
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(p))
	if _, err := e.ReadAt(got, 4096); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read back: %v", err)
	}
	if _, err := e.WriteAt(p, 1<<20-10); err == nil || !strings.Contains(err.Error(), "range") {
		t.Fatalf("write past the end: %v", err)
	} else if code := nbdErrors.Code(err); code != nbdfront.ENOSPC {
		t.Fatalf("write past the end: NBD error %d, want ENOSPC", code)
	}
	if err := e.WriteZeroes(1<<20-4096, 8192, false); nbdErrors.Code(err) != nbdfront.ENOSPC {
		t.Fatalf("write zeroes past the end: %v, NBD error %d, want ENOSPC", err, nbdErrors.Code(err))
	}
	if err := e.Trim(1<<20-4096, 8192); nbdErrors.Code(err) != nbdfront.EINVAL {
		t.Fatalf("trim past the end: %v, NBD error %d, want EINVAL", err, nbdErrors.Code(err))
	}
	if _, err := e.ReadAt(make([]byte, 20), 1<<20-10); nbdErrors.Code(err) != nbdfront.EINVAL {
		t.Fatalf("read past the end: %v, NBD error %d, want EINVAL", err, nbdErrors.Code(err))
	}
	st, err := s.a.Node().Status(context.Background())
	if err != nil || st.Leader != "solo" || len(st.Sites) != 1 || st.Sites[0].AppliedIndex == 0 {
		t.Fatalf("status: %+v %v", st, err)
	}
}
