package dockerh

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/robib/robib/tests/harness"
)

func TestMain(m *testing.M) {
	code := m.Run()
	Cleanup()
	os.Exit(code)
}

// TestDockerClusterBasics drives a 3-site cluster through the harness's
// fault injections: a partitioned follower, a killed leader, a paused
// leader and a SIGSTOPped follower, with data written and read back over
// NBD from the host at different sites.
func TestDockerClusterBasics(t *testing.T) {
	harness.RequireTool(t, "nbdcopy")
	t0 := time.Now()
	phase := func(what string) { t.Logf("%6.1fs %s", time.Since(t0).Seconds(), what) }

	c := StartCluster(t, Options{})
	phase("3 sites up with a leader")
	if got := c.Names(); !slices.Equal(got, []string{"site1", "site2", "site3"}) {
		t.Fatalf("sites %v", got)
	}
	leader := c.MustLeader()
	st := c.MustStatus(leader)
	for _, s := range c.Sites() {
		ss, ok := st.Site(s.Name)
		if !ok {
			t.Fatalf("%s not in status %+v", s.Name, st)
		}
		if want := s.ClusterIP + ":10811"; ss.RaftAddr != want {
			t.Errorf("%s advertises raft %s, want %s (the cluster network only)", s.Name, ss.RaftAddr, want)
		}
		if want := s.ClusterIP + ":10810"; ss.APIAddr != want {
			t.Errorf("%s advertises api %s, want %s", s.Name, ss.APIAddr, want)
		}
	}
	fol := c.Followers()
	if len(fol) != 2 {
		t.Fatalf("followers %v of leader %s", fol, leader)
	}

	// A volume created at a follower (forwarded to the leader over the
	// cluster network), written over NBD at that follower from the host,
	// read back at the other follower.
	c.MustCLI(fol[0], "volume", "create", "vol", "--size", "64MiB")
	dir := t.TempDir()
	data1 := randomFile(t, dir, "data1", 8<<20)
	nbdWrite(t, data1, c.NBDURI(fol[0], "vol"))
	c.WaitCaughtUp(30 * time.Second)
	assertVolume(t, c, fol[1], "vol", data1)
	c.MustCLI(leader, "volume", "verify", "vol")
	phase("volume written at one follower, identical at the other")
	// Raft, gossip and the API listen on the cluster address only, and no
	// connection but NBD uses the client network.
	for _, s := range c.Sites() {
		socks, err := c.Sockets(s.Name)
		if errors.Is(err, ErrNoProc) {
			t.Logf("cannot check the sockets of %s: %v", s.Name, err)
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"tcp " + s.ClusterIP + ":10810", "tcp " + s.ClusterIP + ":10811",
			"tcp " + s.ClusterIP + ":10812", "udp " + s.ClusterIP + ":10812"} {
			if !slices.ContainsFunc(socks, func(x Socket) bool { return strings.HasPrefix(x.String(), want+" ") && x.Remote.Port() == 0 }) {
				t.Errorf("%s: no listener %s among %v", s.Name, want, socks)
			}
		}
		bad, err := c.ClientNetSockets(s.Name)
		if err != nil {
			t.Fatal(err)
		}
		for _, x := range bad {
			t.Errorf("%s has a non-NBD socket on the client network: %s", s.Name, x)
		}
	}

	// Partition a follower: the other two keep a leader and see it
	// unreachable; its NBD port stays reachable on the client network, its
	// API does not; its log shows it lost the leader.
	cut := fol[1]
	lostBefore := strings.Count(c.Logs(cut), lostLeaderLog)
	c.Partition(cut)
	l := c.WaitLeader(20*time.Second, cut)
	harness.WaitFor(t, 20*time.Second, "the majority to see "+cut+" unreachable", func() (bool, error) {
		sts, errs := c.Statuses()
		if len(errs) > 0 {
			return false, fmt.Errorf("status: %v", errs)
		}
		for n, st := range sts {
			s, ok := st.Site(cut)
			if !ok {
				return false, fmt.Errorf("%s does not list %s", n, cut)
			}
			if s.State == "Leader" || s.State == "Follower" {
				return false, fmt.Errorf("%s sees %s as %s", n, cut, s.State)
			}
		}
		return true, nil
	})
	api := strings.TrimPrefix(c.APIURL(cut), "http://")
	if conn, err := net.DialTimeout("tcp", api, 3*time.Second); err == nil {
		conn.Close()
		t.Errorf("the API of partitioned %s answered at %s", cut, api)
	}
	if conn, err := net.DialTimeout("tcp", c.NBDAddr(cut), 5*time.Second); err != nil {
		t.Errorf("NBD of partitioned %s unreachable on the client network: %v", cut, err)
	} else {
		conn.Close()
	}
	c.WaitForLog(20*time.Second, cut, lostLeaderLog, lostBefore+1)
	phase("follower " + cut + " partitioned; " + l + " leads the majority")

	// Writes while it is cut off, then heal: it catches up.
	data2 := randomFile(t, dir, "data2", 8<<20)
	nbdWrite(t, data2, c.NBDURI(l, "vol"))
	c.Heal(cut)
	c.WaitReady(30*time.Second, 3)
	c.WaitCaughtUp(30 * time.Second)
	assertVolume(t, c, cut, "vol", data2)
	phase("partition healed; " + cut + " caught up")

	// Kill the leader: one of the other two takes over; the killed one
	// restarts with its addresses and data and catches up.
	old := c.MustLeader()
	c.Kill(old)
	nl := c.WaitLeader(20*time.Second, old)
	phase("leader " + old + " killed; new leader " + nl)
	c.Start(old)
	c.WaitReady(30*time.Second, 3)
	c.WaitCaughtUp(30 * time.Second)
	assertVolume(t, c, old, "vol", data2)
	phase(old + " restarted and caught up")

	// Freeze the leader (docker pause): the others elect another; after
	// thawing it follows.
	old = c.MustLeader()
	c.Pause(old)
	nl = c.WaitLeader(20*time.Second, old)
	c.Unpause(old)
	c.WaitReady(30*time.Second, 3)
	phase("leader " + old + " paused and unpaused; leader " + nl)

	// SIGSTOP a follower: the leader stays; SIGCONT: all three healthy.
	l = c.MustLeader()
	f := c.Followers()[0]
	c.Signal(f, "STOP")
	if got := c.WaitLeader(20 * time.Second); got != l {
		t.Errorf("leader changed from %s to %s when follower %s stopped", l, got, f)
	}
	c.Signal(f, "CONT")
	c.WaitReady(30*time.Second, 3)
	phase("follower " + f + " stopped and continued")

	// A graceful restart (SIGTERM, exit status 0) of that follower.
	c.Restart(f)
	c.WaitReady(30*time.Second, 3)
	c.WaitCaughtUp(30 * time.Second)
	assertVolume(t, c, f, "vol", data2)
	c.MustCLI(c.MustLeader(), "volume", "verify", "vol")
	phase("follower " + f + " restarted gracefully; volume verified")
}

// lostLeaderLog is what Raft logs at a follower that stopped hearing from
// its leader.
const lostLeaderLog = "heartbeat timeout reached"

func randomFile(t *testing.T, dir, name string, size int) string {
	t.Helper()
	b := make([]byte, size)
	rand.Read(b)
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func nbdWrite(t *testing.T, src, uri string) {
	t.Helper()
	harness.MustRun(t, 2*time.Minute, "nbdcopy", "--flush", src, uri)
}

// assertVolume reads the whole export at the site and checks it starts
// with the file's bytes and is zero after them.
func assertVolume(t *testing.T, c *Cluster, site, vol, file string) {
	t.Helper()
	want, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "readback")
	harness.MustRun(t, 2*time.Minute, "nbdcopy", c.NBDURI(site, vol), out)
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) < len(want) {
		t.Fatalf("%s at %s: %d bytes, want at least %d", vol, site, len(got), len(want))
	}
	if !bytes.Equal(got[:len(want)], want) {
		i := 0
		for i < len(want) && got[i] == want[i] {
			i++
		}
		t.Fatalf("%s at %s differs from %s at byte %d", vol, site, filepath.Base(file), i)
	}
	if j := slices.IndexFunc(got[len(want):], func(b byte) bool { return b != 0 }); j >= 0 {
		t.Fatalf("%s at %s: non-zero byte at %d past the written data", vol, site, len(want)+j)
	}
}

// TestCleanupStale checks that CleanupStale removes what a dead test
// process left and keeps what a live one owns.
func TestCleanupStale(t *testing.T) {
	image := Image(t)
	host, _ := os.Hostname()
	run := newRunID()
	mk := func(kind, name, own string) {
		t.Helper()
		labels := []string{"--label", LabelTest + "=1", "--label", LabelRun + "=" + run,
			"--label", LabelOwner + "=" + own, "--label", LabelCreated + "=" + fmt.Sprint(time.Now().Unix())}
		var args []string
		if kind == "network" {
			args = append(append([]string{"network", "create", "--internal"}, labels...), name)
		} else {
			args = append(append([]string{"create", "--network", "none", "--name", name}, labels...), image, "--version")
		}
		if _, err := docker(dockerTimeout, args...); err != nil {
			t.Fatal(err)
		}
	}
	exists := func(kind, name string) bool {
		_, err := docker(dockerTimeout, kind, "inspect", name)
		return err == nil
	}
	prefix := "robib-t-" + run
	t.Cleanup(func() {
		docker(dockerTimeout, "rm", "-f", prefix+"-dead", prefix+"-live")
		docker(dockerTimeout, "network", "rm", prefix+"-dead", prefix+"-live")
	})
	dead := host + ":999999999:5"
	mk("network", prefix+"-dead", dead)
	mk("network", prefix+"-live", owner())
	mk("container", prefix+"-dead", dead)
	mk("container", prefix+"-live", owner())
	if err := CleanupStale(); err != nil {
		t.Fatal(err)
	}
	for _, kind := range []string{"network", "container"} {
		if exists(kind, prefix+"-dead") {
			t.Errorf("%s of a dead owner survived CleanupStale", kind)
		}
		if !exists(kind, prefix+"-live") {
			t.Errorf("%s of this live process was removed by CleanupStale", kind)
		}
	}
}

func TestParseStatStart(t *testing.T) {
	stat := "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 12345 67 18446744073709551615"
	if got := parseStatStart(stat); got != 987654 {
		t.Errorf("parseStatStart = %d, want 987654", got)
	}
	if got := parseStatStart("garbage"); got != 0 {
		t.Errorf("parseStatStart(garbage) = %d", got)
	}
	if procStart(os.Getpid()) == 0 {
		t.Error("procStart of this process is 0")
	}
}

func TestStale(t *testing.T) {
	now := time.Now()
	host, _ := os.Hostname()
	old := fmt.Sprint(now.Add(-2 * StaleAge).Unix())
	recent := fmt.Sprint(now.Unix())
	for _, tc := range []struct {
		labels map[string]string
		want   bool
	}{
		{map[string]string{LabelTest: "1", LabelOwner: owner(), LabelCreated: old}, false},                    // this process
		{map[string]string{LabelTest: "1", LabelOwner: host + ":1:999999999999", LabelCreated: recent}, true}, // pid 1 started at another tick
		{map[string]string{LabelTest: "1", LabelOwner: host + ":999999999:5", LabelCreated: recent}, true},    // no such pid
		{map[string]string{LabelTest: "1", LabelOwner: "elsewhere:5:5", LabelCreated: recent}, false},         // another host, young
		{map[string]string{LabelTest: "1", LabelOwner: "elsewhere:5:5", LabelCreated: old}, true},             // another host, old
		{map[string]string{LabelTest: "1"}, false},                                                            // nothing known
		{map[string]string{LabelOwner: host + ":999999999:5", LabelCreated: old}, false},                      // not ours
	} {
		if got := stale(tc.labels, now); got != tc.want {
			t.Errorf("stale(%v) = %v, want %v", tc.labels, got, tc.want)
		}
	}
}

func TestParseHexAddrPort(t *testing.T) {
	for in, want := range map[string]string{
		"0100007F:0CEA":                         "127.0.0.1:3306",
		"0B385B0A:2A3B":                         "10.91.56.11:10811",
		"0000000000000000FFFF00000B385B0A:2A39": "[::ffff:10.91.56.11]:10809",
		"00000000000000000000000000000000:2A39": "[::]:10809",
	} {
		got, err := parseHexAddrPort(in)
		if err != nil || got.String() != want {
			t.Errorf("parseHexAddrPort(%s) = %v, %v; want %s", in, got, err, want)
		}
	}
	if _, err := parseHexAddrPort("zz:1"); err == nil {
		t.Error("parsed garbage")
	}
}

func TestOverlaps(t *testing.T) {
	cidr := func(s string) *net.IPNet { _, n, _ := net.ParseCIDR(s); return n }
	n := cidr("10.91.7.0/24")
	if !overlapsAny(n, []*net.IPNet{cidr("10.0.0.0/8")}) || !overlapsAny(n, []*net.IPNet{cidr("10.91.7.128/25")}) {
		t.Error("missed an overlap")
	}
	if overlapsAny(n, []*net.IPNet{cidr("10.91.8.0/24"), cidr("172.17.0.0/16")}) {
		t.Error("false overlap")
	}
}
