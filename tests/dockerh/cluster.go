// Package dockerh runs a robib cluster as Docker containers, one site per
// container, so that fault-injection tests can kill, stop, pause, signal,
// restart and network-partition whole sites while driving the volumes from
// the host. It shells out to the docker CLI.
//
// Layout of one Cluster:
//
//   - an image FROM scratch holding a static robib binary, built once per
//     test process and tagged robib-test:<hash of the binary>; the same
//     binary runs the CLI on the host;
//   - a "cluster" network (an internal bridge on its own 10.91.N.0/24):
//     every site has a fixed address there, and Raft, gossip and the admin
//     API bind to and advertise only that address, so all site-to-site
//     traffic (Raft, gossip, forwarded proposals, status and verify calls)
//     crosses it;
//   - a "client" network (another internal bridge and /24): NBD listens on
//     0.0.0.0, so the host reaches every site's NBD server at its client
//     address, also while the site is partitioned.
//
// Partition(site) disconnects the site's container from the cluster
// network; Heal reconnects it with the same address. Both networks are
// internal (no default route), so a partitioned site has no path at all to
// the others' cluster addresses. The admin API lives on the cluster
// address (the agent advertises --api-addr verbatim to its peers, so it
// cannot be a wildcard), which means a partitioned site's API is out of
// the host's reach too until it is healed: its own view is visible only
// in its log.
//
// The host reaches the cluster addresses through the bridge, so the CLI
// helpers work against every connected, running site.
//
// Every container and network is labeled robib.test=1 plus a run id and
// the owning process; a test's resources are removed when it ends (and the
// sites' last log lines printed if it failed), and CleanupStale removes
// what aborted runs left behind. The sites' data directories are bind
// mounts under t.TempDir(), and the agents run with the test process's
// uid and gid so that the files stay removable.
//
// Environment: ROBIB_DOCKER_BIN uses a prebuilt static robib binary;
// ROBIB_E2E_LOGS=1 prints the sites' log tails for passing tests too;
// ROBIB_REQUIRE_TOOLS=1 fails instead of skipping without Docker.
package dockerh

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/robib/robib/tests/harness"
)

// Ports every site uses on its addresses.
const (
	NBDPort    = 10809
	APIPort    = 10810
	RaftPort   = 10811
	GossipPort = 10812
)

// SubnetPrefix: the cluster and client networks are /24s 10.91.N.0/24
// with N chosen free at creation.
const SubnetPrefix = "10.91."

// Options configure StartCluster. Zero fields get defaults.
type Options struct {
	// Sites is the number of sites, all started with --bootstrap-expect
	// Sites and --join of every other site; default 3.
	Sites int
	// NamePrefix names the sites NamePrefix1..N; default "site".
	NamePrefix string
	// HeartbeatTimeout, ElectionTimeout and LeaderLeaseTimeout are passed
	// as --heartbeat-timeout etc.; defaults 300ms, 300ms and 150ms (the
	// harness's FastFailover). DefaultTiming leaves all three out.
	HeartbeatTimeout, ElectionTimeout, LeaderLeaseTimeout string
	DefaultTiming                                         bool
	// LogLevel (--log-level) and LogFormat (--log-format) are passed
	// unless empty.
	LogLevel, LogFormat string
	// ExtraArgs are appended to every site's agent flags.
	ExtraArgs []string
	// ReadyTimeout bounds StartCluster's wait for a leader and all
	// voters; default 90s.
	ReadyTimeout time.Duration
	// StartTimeout bounds the wait for a started container's serving log
	// line; default 60s.
	StartTimeout time.Duration
	// StopTimeout is the grace period of Stop before docker kills;
	// default 20s.
	StopTimeout time.Duration
}

// Site is one container of a Cluster.
type Site struct {
	Name      string // robib site name (--name)
	Container string // docker container name
	ClusterIP string // fixed address on the cluster network
	ClientIP  string // fixed address on the client network
	DataDir   string // host directory bind-mounted at /data
	Args      []string

	// Guarded by Cluster.mu.
	created     bool // the container exists
	up          bool // started and not (expectedly) ended
	paused      bool // docker pause
	sigstopped  bool // SIGSTOP sent, no SIGCONT yet
	partitioned bool // disconnected from the cluster network
}

// Cluster is a robib cluster of containers.
type Cluster struct {
	t    testing.TB
	opts Options

	// RunID is the per-cluster id in every name and the robib.test.run
	// label.
	RunID string
	// ClusterNet and ClientNet are the docker network names;
	// ClusterSubnet and ClientSubnet their CIDRs.
	ClusterNet, ClientNet       string
	ClusterSubnet, ClientSubnet string
	// Image is the docker image the sites run; Bin the same robib binary
	// on the host (for the CLI).
	Image, Bin string

	mu    sync.Mutex
	sites []*Site
	nets  []string // created networks
}

// StartCluster starts opts.Sites sites, each in its own container, and
// waits until every site knows the same leader and all sites as voters.
// Everything is removed when the test ends.
func StartCluster(t testing.TB, opts Options) *Cluster {
	t.Helper()
	RequireDocker(t)
	if opts.Sites == 0 {
		opts.Sites = 3
	}
	if opts.Sites < 1 || opts.Sites > 200 {
		t.Fatalf("dockerh: %d sites", opts.Sites)
	}
	if opts.NamePrefix == "" {
		opts.NamePrefix = "site"
	}
	if opts.HeartbeatTimeout == "" {
		opts.HeartbeatTimeout = "300ms"
	}
	if opts.ElectionTimeout == "" {
		opts.ElectionTimeout = "300ms"
	}
	if opts.LeaderLeaseTimeout == "" {
		opts.LeaderLeaseTimeout = "150ms"
	}
	if opts.ReadyTimeout == 0 {
		opts.ReadyTimeout = 90 * time.Second
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = 60 * time.Second
	}
	if opts.StopTimeout == 0 {
		opts.StopTimeout = 20 * time.Second
	}
	image := Image(t)
	staleOnce.Do(func() {
		if err := CleanupStale(); err != nil {
			t.Logf("dockerh: removing leftovers of earlier runs: %v", err)
		}
	})

	// The data directories' removal is registered before the containers'
	// so that it runs after them.
	base := t.TempDir()
	c := &Cluster{t: t, opts: opts, RunID: newRunID(), Image: image, Bin: Binary(t)}
	t.Cleanup(c.cleanup)
	prefix := "robib-t-" + c.RunID
	c.ClusterNet, c.ClientNet = prefix+"-cluster", prefix+"-client"

	var err error
	if c.ClusterSubnet, err = c.createNetwork(c.ClusterNet); err != nil {
		t.Fatal(err)
	}
	if c.ClientSubnet, err = c.createNetwork(c.ClientNet); err != nil {
		t.Fatal(err)
	}
	clusterBase := strings.TrimSuffix(c.ClusterSubnet, "0/24")
	clientBase := strings.TrimSuffix(c.ClientSubnet, "0/24")
	for i := range opts.Sites {
		name := fmt.Sprintf("%s%d", opts.NamePrefix, i+1)
		s := &Site{
			Name:      name,
			Container: prefix + "-" + name,
			ClusterIP: clusterBase + strconv.Itoa(10+i),
			ClientIP:  clientBase + strconv.Itoa(10+i),
			DataDir:   filepath.Join(base, name),
		}
		if err := os.Mkdir(s.DataDir, 0o755); err != nil {
			t.Fatal(err)
		}
		c.sites = append(c.sites, s)
	}
	for _, s := range c.sites {
		s.Args = c.agentArgs(s)
		if err := c.create(s); err != nil {
			t.Fatal(err)
		}
	}
	// Start all before waiting for any: the sites wait for each other
	// to bootstrap.
	for _, s := range c.sites {
		if _, err := docker(dockerTimeout, "start", s.Container); err != nil {
			t.Fatalf("starting site %s: %v", s.Name, err)
		}
		c.mu.Lock()
		s.up = true
		c.mu.Unlock()
	}
	for _, s := range c.sites {
		if err := c.waitServing(s, 0); err != nil {
			t.Fatal(err)
		}
	}
	c.WaitReady(opts.ReadyTimeout, opts.Sites)
	return c
}

func newRunID() string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		return strconv.FormatInt(time.Now().UnixNano(), 36)
	}
	return hex.EncodeToString(b)
}

func (c *Cluster) labels() []string {
	return []string{
		"--label", LabelTest + "=1",
		"--label", LabelRun + "=" + c.RunID,
		"--label", LabelOwner + "=" + owner(),
		"--label", LabelCreated + "=" + strconv.FormatInt(time.Now().Unix(), 10),
	}
}

// createNetwork creates an internal bridge network on a free 10.91.N.0/24
// and returns the subnet.
func (c *Cluster) createNetwork(name string) (string, error) {
	used := usedSubnets()
	var lastErr error
	tries := 0
	for _, n := range mrand.Perm(256) {
		_, subnet, _ := net.ParseCIDR(fmt.Sprintf("%s%d.0/24", SubnetPrefix, n))
		if overlapsAny(subnet, used) {
			continue
		}
		if tries++; tries > 20 {
			break
		}
		args := []string{"network", "create", "--driver", "bridge", "--internal",
			"--subnet", subnet.String(), "--gateway", fmt.Sprintf("%s%d.1", SubnetPrefix, n)}
		args = append(args, c.labels()...)
		args = append(args, name)
		_, err := docker(dockerTimeout, args...)
		if err == nil {
			c.mu.Lock()
			c.nets = append(c.nets, name)
			c.mu.Unlock()
			return subnet.String(), nil
		}
		lastErr = err
		if !strings.Contains(strings.ToLower(err.Error()), "overlap") {
			return "", fmt.Errorf("creating network %s: %w", name, err)
		}
		// Taken meanwhile (another test process): try another.
		used = append(used, subnet)
	}
	return "", fmt.Errorf("creating network %s: no free %sN.0/24 (last error: %v)", name, SubnetPrefix, lastErr)
}

// usedSubnets lists the subnets of existing docker networks and of the
// host's interfaces.
func usedSubnets() []*net.IPNet {
	var out []*net.IPNet
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok {
				out = append(out, n)
			}
		}
	}
	ids, err := docker(dockerTimeout, "network", "ls", "-q", "--no-trunc")
	if err != nil || ids == "" {
		return out
	}
	js, _ := docker(dockerTimeout, append([]string{"network", "inspect"}, strings.Fields(ids)...)...)
	var nets []struct {
		IPAM struct {
			Config []struct{ Subnet string }
		}
	}
	if json.Unmarshal([]byte(js), &nets) != nil {
		return out
	}
	for _, n := range nets {
		for _, cfg := range n.IPAM.Config {
			if _, sn, err := net.ParseCIDR(cfg.Subnet); err == nil {
				out = append(out, sn)
			}
		}
	}
	return out
}

func overlapsAny(n *net.IPNet, list []*net.IPNet) bool {
	for _, m := range list {
		if n.Contains(m.IP) || m.Contains(n.IP) {
			return true
		}
	}
	return false
}

func (c *Cluster) agentArgs(s *Site) []string {
	ip := s.ClusterIP
	args := []string{"agent",
		"--name", s.Name,
		"--data-dir", "/data",
		"--nbd-addr", fmt.Sprintf("0.0.0.0:%d", NBDPort),
		"--api-addr", fmt.Sprintf("%s:%d", ip, APIPort),
		"--raft-addr", fmt.Sprintf("%s:%d", ip, RaftPort),
		"--gossip-addr", fmt.Sprintf("%s:%d", ip, GossipPort),
		"--bootstrap-expect", strconv.Itoa(c.opts.Sites),
		// The fault suite tests replication, not the network's security
		// (tests/e2e_tls_test.go does that); plaintext keeps its timing
		// comparable with earlier runs.
		"--insecure",
	}
	var join []string
	for _, o := range c.sites {
		if o != s {
			join = append(join, fmt.Sprintf("%s:%d", o.ClusterIP, GossipPort))
		}
	}
	if len(join) > 0 {
		args = append(args, "--join", strings.Join(join, ","))
	}
	if !c.opts.DefaultTiming {
		args = append(args, "--heartbeat-timeout", c.opts.HeartbeatTimeout,
			"--election-timeout", c.opts.ElectionTimeout,
			"--leader-lease-timeout", c.opts.LeaderLeaseTimeout)
	}
	if c.opts.LogLevel != "" {
		args = append(args, "--log-level", c.opts.LogLevel)
	}
	if c.opts.LogFormat != "" {
		args = append(args, "--log-format", c.opts.LogFormat)
	}
	return append(args, c.opts.ExtraArgs...)
}

// create makes the site's container, on the client network and connected
// to the cluster network, without starting it.
func (c *Cluster) create(s *Site) error {
	args := []string{"create", "--name", s.Container, "--hostname", s.Name}
	args = append(args, c.labels()...)
	args = append(args,
		"--user", fmt.Sprintf("%d:%d", os.Getuid(), os.Getgid()),
		"--network", c.ClientNet, "--ip", s.ClientIP,
		"--volume", s.DataDir+":/data",
		c.Image)
	args = append(args, s.Args...)
	_, err := docker(dockerTimeout, args...)
	c.mu.Lock()
	s.created = s.created || err == nil
	c.mu.Unlock()
	if err != nil {
		return fmt.Errorf("creating site %s: %w", s.Name, err)
	}
	if _, err := docker(dockerTimeout, "network", "connect", "--ip", s.ClusterIP, c.ClusterNet, s.Container); err != nil {
		return fmt.Errorf("connecting site %s to the cluster network: %w", s.Name, err)
	}
	return nil
}

// Site returns the named site; an unknown name fails the test.
func (c *Cluster) Site(name string) *Site {
	c.t.Helper()
	for _, s := range c.sites {
		if s.Name == name {
			return s
		}
	}
	c.t.Fatalf("dockerh: no site %q", name)
	return nil
}

// Sites lists the sites in start order.
func (c *Cluster) Sites() []*Site { return slices.Clone(c.sites) }

// Names lists the site names in start order.
func (c *Cluster) Names() []string {
	var out []string
	for _, s := range c.sites {
		out = append(out, s.Name)
	}
	return out
}

// Reachable lists the sites whose API the host can use now: started, not
// paused or SIGSTOPped, not partitioned.
func (c *Cluster) Reachable() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for _, s := range c.sites {
		if s.up && !s.paused && !s.sigstopped && !s.partitioned {
			out = append(out, s.Name)
		}
	}
	return out
}

// APIURL is the site's admin API base URL (on its cluster address).
func (c *Cluster) APIURL(name string) string {
	return fmt.Sprintf("http://%s:%d", c.Site(name).ClusterIP, APIPort)
}

// NBDAddr is the site's NBD address on the client network, "IP:10809".
func (c *Cluster) NBDAddr(name string) string {
	return fmt.Sprintf("%s:%d", c.Site(name).ClientIP, NBDPort)
}

// NBDURI is the NBD URI of an export at the site, on the client network.
func (c *Cluster) NBDURI(name, export string) string {
	return "nbd://" + c.NBDAddr(name) + "/" + export
}

// CLI runs the host's robib binary with --api at the site. err is non-nil
// for a non-zero exit or a timeout (2 minutes).
func (c *Cluster) CLI(name string, args ...string) (stdout, stderr string, err error) {
	c.t.Helper()
	r := harness.Run(c.t, 2*time.Minute, nil, c.Bin, append([]string{"--api", c.APIURL(name)}, args...)...)
	return r.Stdout, r.Stderr, r.Err
}

// MustCLI is CLI that fails the test on error; it returns stdout.
func (c *Cluster) MustCLI(name string, args ...string) string {
	c.t.Helper()
	out, errOut, err := c.CLI(name, args...)
	if err != nil {
		c.t.Fatalf("robib --api %s %s: %v\nstdout: %s\nstderr: %s", c.APIURL(name), strings.Join(args, " "), err, out, errOut)
	}
	return out
}

// Status runs `robib cluster status --json` against the site.
func (c *Cluster) Status(name string) (harness.ClusterStatus, error) {
	url := c.APIURL(name)
	r := harness.Run(c.t, 20*time.Second, nil, c.Bin, "--api", url, "cluster", "status", "--json")
	if r.Err != nil {
		return harness.ClusterStatus{}, fmt.Errorf("cluster status at %s: %v: %s", name, r.Err, strings.TrimSpace(r.Stderr))
	}
	var st harness.ClusterStatus
	if err := json.Unmarshal([]byte(r.Stdout), &st); err != nil {
		return harness.ClusterStatus{}, fmt.Errorf("cluster status --json at %s: %v\n%s", name, err, r.Stdout)
	}
	return st, nil
}

// MustStatus is Status that fails the test on error.
func (c *Cluster) MustStatus(name string) harness.ClusterStatus {
	c.t.Helper()
	st, err := c.Status(name)
	if err != nil {
		c.t.Fatal(err)
	}
	return st
}

// Statuses asks every reachable site for its status, in parallel.
func (c *Cluster) Statuses() (map[string]harness.ClusterStatus, map[string]error) {
	names := c.Reachable()
	sts := make([]harness.ClusterStatus, len(names))
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	for i, n := range names {
		wg.Go(func() { sts[i], errs[i] = c.Status(n) })
	}
	wg.Wait()
	okm, errm := map[string]harness.ClusterStatus{}, map[string]error{}
	for i, n := range names {
		if errs[i] != nil {
			errm[n] = errs[i]
		} else {
			okm[n] = sts[i]
		}
	}
	return okm, errm
}

// Leader returns the leader that a majority of all the cluster's sites
// (among the reachable ones) name, provided it is reachable itself.
func (c *Cluster) Leader() (string, error) {
	sts, errs := c.Statuses()
	votes := map[string]int{}
	for _, st := range sts {
		if st.Leader != "" {
			votes[st.Leader]++
		}
	}
	need := len(c.sites)/2 + 1
	for l, v := range votes {
		if v < need {
			continue
		}
		if !slices.Contains(c.Reachable(), l) {
			return "", fmt.Errorf("%d sites name %s the leader, but it is not reachable (down, paused or partitioned)", v, l)
		}
		return l, nil
	}
	return "", fmt.Errorf("no leader named by %d sites: votes %v, errors %v", need, votes, errs)
}

// MustLeader is Leader that fails the test on error.
func (c *Cluster) MustLeader() string {
	c.t.Helper()
	l, err := c.Leader()
	if err != nil {
		c.t.Fatal(err)
	}
	return l
}

// WaitLeader waits until Leader names a site not in exclude and returns it.
func (c *Cluster) WaitLeader(timeout time.Duration, exclude ...string) string {
	c.t.Helper()
	var leader string
	harness.WaitFor(c.t, timeout, fmt.Sprintf("a leader (other than %v)", exclude), func() (bool, error) {
		l, err := c.Leader()
		if err != nil {
			return false, err
		}
		if slices.Contains(exclude, l) {
			return false, fmt.Errorf("the leader is still %s", l)
		}
		leader = l
		return true, nil
	})
	return leader
}

// Followers lists the reachable sites other than the leader.
func (c *Cluster) Followers() []string {
	c.t.Helper()
	l := c.MustLeader()
	var out []string
	for _, n := range c.Reachable() {
		if n != l {
			out = append(out, n)
		}
	}
	return out
}

// WaitReady waits until every reachable site reports the same leader and
// exactly `voters` voting sites, each Leader or Follower. It returns the
// status seen at the first reachable site.
func (c *Cluster) WaitReady(timeout time.Duration, voters int) harness.ClusterStatus {
	c.t.Helper()
	var last harness.ClusterStatus
	harness.WaitFor(c.t, timeout, fmt.Sprintf("a leader and %d healthy voters at every reachable site", voters), func() (bool, error) {
		names := c.Reachable()
		if len(names) == 0 {
			return false, errors.New("no site is reachable")
		}
		sts, errs := c.Statuses()
		for _, n := range names {
			if err := errs[n]; err != nil {
				return false, err
			}
		}
		leader := ""
		for _, n := range names {
			st := sts[n]
			if st.Leader == "" {
				return false, fmt.Errorf("%s knows no leader", n)
			}
			if leader != "" && st.Leader != leader {
				return false, fmt.Errorf("%s says the leader is %s, another site says %s", n, st.Leader, leader)
			}
			leader = st.Leader
			if v := st.Voters(); len(v) != voters {
				return false, fmt.Errorf("%s sees voters %v, want %d", n, v, voters)
			}
			for _, s := range st.Sites {
				if s.Voter && s.State != "Leader" && s.State != "Follower" {
					return false, fmt.Errorf("%s sees voter %s in state %s (%s)", n, s.Name, s.State, s.Error)
				}
			}
		}
		last = sts[names[0]]
		return true, nil
	})
	return last
}

// WaitCaughtUp waits until every reachable site's fsm_index reached the
// highest fsm_index any reachable site reported at the first complete
// round of answers (so every command a site had applied, e.g. the writes
// behind a flush it answered, is applied everywhere). It returns that
// index.
func (c *Cluster) WaitCaughtUp(timeout time.Duration) uint64 {
	c.t.Helper()
	var target uint64
	known := false
	harness.WaitFor(c.t, timeout, "every reachable site to apply the highest command index", func() (bool, error) {
		sts, errs := c.Statuses()
		if len(errs) > 0 {
			return false, fmt.Errorf("status errors: %v", errs)
		}
		if !known {
			for n, st := range sts {
				if s, ok := st.Site(n); ok {
					target = max(target, s.FSMIndex)
				}
			}
			known = true
		}
		for n, st := range sts {
			s, ok := st.Site(n)
			if !ok {
				return false, fmt.Errorf("%s is not in its own status", n)
			}
			if s.FSMIndex < target {
				return false, fmt.Errorf("%s applied %d of %d", n, s.FSMIndex, target)
			}
		}
		return true, nil
	})
	return target
}

// ContainerState is docker's .State of a container.
type ContainerState struct {
	Status     string
	Running    bool
	Paused     bool
	OOMKilled  bool
	ExitCode   int
	Error      string
	StartedAt  string
	FinishedAt string
}

// State inspects the site's container.
func (c *Cluster) State(name string) (ContainerState, error) {
	out, err := docker(dockerTimeout, "container", "inspect", "--format", "{{json .State}}", c.Site(name).Container)
	if err != nil {
		return ContainerState{}, err
	}
	var st ContainerState
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return ContainerState{}, fmt.Errorf("container state of %s: %v: %s", name, err, out)
	}
	return st, nil
}

// IPs returns the site's container addresses per network name, as docker
// reports them.
func (c *Cluster) IPs(name string) (map[string]string, error) {
	out, err := docker(dockerTimeout, "container", "inspect", "--format", "{{json .NetworkSettings.Networks}}", c.Site(name).Container)
	if err != nil {
		return nil, err
	}
	var nets map[string]struct{ IPAddress string }
	if err := json.Unmarshal([]byte(out), &nets); err != nil {
		return nil, fmt.Errorf("networks of %s: %v: %s", name, err, out)
	}
	ips := map[string]string{}
	for n, v := range nets {
		ips[n] = v.IPAddress
	}
	return ips, nil
}

// checkIPs verifies the site has its fixed addresses (the cluster one
// only while not partitioned).
func (c *Cluster) checkIPs(s *Site) error {
	ips, err := c.IPs(s.Name)
	if err != nil {
		return err
	}
	c.mu.Lock()
	part := s.partitioned
	c.mu.Unlock()
	if ips[c.ClientNet] != s.ClientIP {
		return fmt.Errorf("site %s has client address %q, want %s (all: %v)", s.Name, ips[c.ClientNet], s.ClientIP, ips)
	}
	got, on := ips[c.ClusterNet]
	switch {
	case part && on:
		return fmt.Errorf("site %s is partitioned but on the cluster network (%v)", s.Name, ips)
	case !part && got != s.ClusterIP:
		return fmt.Errorf("site %s has cluster address %q, want %s (all: %v)", s.Name, got, s.ClusterIP, ips)
	}
	return nil
}

// Logs returns everything the site's container printed, over all its
// starts.
func (c *Cluster) Logs(name string) string {
	out, err := dockerCombined(dockerTimeout, "logs", c.Site(name).Container)
	if err != nil {
		return out + "\n(dockerh: " + err.Error() + ")"
	}
	return out
}

// LogTail returns the last n lines the site printed.
func (c *Cluster) LogTail(name string, n int) string {
	out, err := dockerCombined(dockerTimeout, "logs", "--tail", strconv.Itoa(n), c.Site(name).Container)
	if err != nil {
		return out + "\n(dockerh: " + err.Error() + ")"
	}
	return out
}

// WaitForLog waits until the site's log holds substr at least n times.
func (c *Cluster) WaitForLog(timeout time.Duration, name, substr string, n int) {
	c.t.Helper()
	harness.WaitFor(c.t, timeout, fmt.Sprintf("site %s to log %q %d times", name, substr, n), func() (bool, error) {
		got := strings.Count(c.Logs(name), substr)
		if got >= n {
			return true, nil
		}
		return false, fmt.Errorf("%d times so far", got)
	})
}

// waitServing waits until the site's log holds more than `before` serving
// lines, failing early when the container stops.
func (c *Cluster) waitServing(s *Site, before int) error {
	var exited error
	err := harness.Poll(c.opts.StartTimeout, func() (bool, error) {
		if strings.Count(c.Logs(s.Name), harness.ServingMessage) > before {
			return true, nil
		}
		st, err := c.State(s.Name)
		if err != nil {
			return false, err
		}
		if !st.Running {
			exited = fmt.Errorf("container %s %s (exit code %d)", s.Container, st.Status, st.ExitCode)
			return true, nil
		}
		return false, errors.New("no serving line yet")
	})
	if err == nil {
		err = exited
	}
	if err != nil {
		return fmt.Errorf("site %s did not start serving: %v\nlog tail:\n%s", s.Name, err, c.LogTail(s.Name, 40))
	}
	return c.checkIPs(s)
}

// Start starts a stopped or killed site's container again (same data
// directory, same addresses) and waits for its serving line.
func (c *Cluster) Start(name string) {
	c.t.Helper()
	s := c.Site(name)
	if c.Partitioned(name) {
		// The agent binds its cluster address, which the container lacks
		// while disconnected: it would exit at once.
		c.t.Fatalf("dockerh: cannot start site %s while it is partitioned (its cluster address %s is absent); Heal it first", name, s.ClusterIP)
	}
	before := strings.Count(c.Logs(name), harness.ServingMessage)
	if _, err := docker(dockerTimeout, "start", s.Container); err != nil {
		c.t.Fatalf("starting site %s: %v", name, err)
	}
	c.mu.Lock()
	s.up, s.paused, s.sigstopped = true, false, false
	c.mu.Unlock()
	if err := c.waitServing(s, before); err != nil {
		c.t.Fatal(err)
	}
}

// Kill sends SIGKILL to the site's agent and waits until the container
// has stopped.
func (c *Cluster) Kill(name string) {
	c.t.Helper()
	s := c.Site(name)
	c.mu.Lock()
	s.up = false
	paused := s.paused
	c.mu.Unlock()
	if _, err := docker(dockerTimeout, "kill", "--signal", "KILL", s.Container); err != nil {
		c.t.Fatalf("killing site %s: %v", name, err)
	}
	if paused {
		// A frozen process dies once thawed.
		_, _ = docker(dockerTimeout, "unpause", s.Container)
	}
	c.waitExited(s)
	c.mu.Lock()
	s.paused, s.sigstopped = false, false
	c.mu.Unlock()
}

func (c *Cluster) waitExited(s *Site) {
	c.t.Helper()
	harness.WaitFor(c.t, time.Minute, fmt.Sprintf("site %s's container to stop", s.Name), func() (bool, error) {
		st, err := c.State(s.Name)
		if err != nil {
			return false, err
		}
		if st.Running {
			return false, fmt.Errorf("still %s", st.Status)
		}
		return true, nil
	})
}

// Stop sends SIGTERM and waits for the container to stop, up to
// Options.StopTimeout after which docker kills it. It returns an error
// unless the agent exited with status 0 in time.
func (c *Cluster) Stop(name string) error {
	c.t.Helper()
	s := c.Site(name)
	c.mu.Lock()
	s.up = false
	c.mu.Unlock()
	secs := int((c.opts.StopTimeout + time.Second - 1) / time.Second)
	if _, err := docker(c.opts.StopTimeout+dockerTimeout, "stop", "--time", strconv.Itoa(secs), s.Container); err != nil {
		return fmt.Errorf("stopping site %s: %w", name, err)
	}
	c.mu.Lock()
	s.paused, s.sigstopped = false, false
	c.mu.Unlock()
	st, err := c.State(name)
	if err != nil {
		return err
	}
	if st.Running {
		return fmt.Errorf("site %s still running after docker stop", name)
	}
	if st.ExitCode != 0 {
		return fmt.Errorf("site %s exited with status %d after SIGTERM (%s)", name, st.ExitCode, st.Error)
	}
	return nil
}

// Restart is Stop (a failed stop is a test error) and Start.
func (c *Cluster) Restart(name string) {
	c.t.Helper()
	if err := c.Stop(name); err != nil {
		c.t.Error(err)
	}
	c.Start(name)
}

// WipeData empties a stopped site's data directory (the host directory
// bind-mounted at /data), as if its disk had been replaced: Start then
// runs the site under its old name with nothing it had stored.
func (c *Cluster) WipeData(name string) {
	c.t.Helper()
	s := c.Site(name)
	st, err := c.State(name)
	if err != nil {
		c.t.Fatal(err)
	}
	if st.Running {
		c.t.Fatalf("dockerh: wiping the data directory of site %s while it runs", name)
	}
	entries, err := os.ReadDir(s.DataDir)
	if err != nil {
		c.t.Fatal(err)
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(s.DataDir, e.Name())); err != nil {
			c.t.Fatalf("wiping %s's data directory: %v", name, err)
		}
	}
}

// Pause freezes every process of the site (docker pause: the cgroup
// freezer, which the agent cannot notice or handle, like SIGSTOP).
func (c *Cluster) Pause(name string) {
	c.t.Helper()
	s := c.Site(name)
	if _, err := docker(dockerTimeout, "pause", s.Container); err != nil {
		c.t.Fatalf("pausing site %s: %v", name, err)
	}
	c.mu.Lock()
	s.paused = true
	c.mu.Unlock()
}

// Unpause thaws a paused site.
func (c *Cluster) Unpause(name string) {
	c.t.Helper()
	s := c.Site(name)
	if _, err := docker(dockerTimeout, "unpause", s.Container); err != nil {
		c.t.Fatalf("unpausing site %s: %v", name, err)
	}
	c.mu.Lock()
	s.paused = false
	c.mu.Unlock()
}

// Signal sends a signal ("STOP", "CONT", "TERM", "HUP", ...) to the
// site's agent (PID 1 of its container: signals it has no handler for,
// other than KILL and STOP, are ignored). KILL, TERM, INT and QUIT mark
// the site as expected to exit; STOP and CONT as stopped and continued.
func (c *Cluster) Signal(name, sig string) {
	c.t.Helper()
	s := c.Site(name)
	sig = strings.TrimPrefix(strings.ToUpper(sig), "SIG")
	c.mu.Lock()
	switch sig {
	case "KILL", "TERM", "INT", "QUIT":
		s.up = false
	}
	c.mu.Unlock()
	if _, err := docker(dockerTimeout, "kill", "--signal", sig, s.Container); err != nil {
		c.t.Fatalf("signalling site %s with SIG%s: %v", name, sig, err)
	}
	c.mu.Lock()
	switch sig {
	case "STOP":
		s.sigstopped = true
	case "CONT":
		s.sigstopped = false
	}
	c.mu.Unlock()
}

// Partition cuts the site off from every other site: its container leaves
// the cluster network. NBD on the client network stays reachable from the
// host; the site's API (on its cluster address) does not.
func (c *Cluster) Partition(name string) {
	c.t.Helper()
	s := c.Site(name)
	if _, err := docker(dockerTimeout, "network", "disconnect", c.ClusterNet, s.Container); err != nil {
		c.t.Fatalf("partitioning site %s: %v", name, err)
	}
	c.mu.Lock()
	s.partitioned = true
	c.mu.Unlock()
}

// Heal reconnects a partitioned site to the cluster network with its
// address.
func (c *Cluster) Heal(name string) {
	c.t.Helper()
	s := c.Site(name)
	if _, err := docker(dockerTimeout, "network", "connect", "--ip", s.ClusterIP, c.ClusterNet, s.Container); err != nil {
		c.t.Fatalf("healing site %s: %v", name, err)
	}
	c.mu.Lock()
	s.partitioned = false
	up := s.up
	c.mu.Unlock()
	if !up {
		return // a stopped container has no addresses; Start checks them
	}
	if err := c.checkIPs(s); err != nil {
		c.t.Fatal(err)
	}
}

// Partitioned reports whether the site is cut off by Partition.
func (c *Cluster) Partitioned(name string) bool {
	s := c.Site(name)
	c.mu.Lock()
	defer c.mu.Unlock()
	return s.partitioned
}

var alarmPatterns = []string{"panic:", "fatal error:", "WARNING: DATA RACE", "SIGSEGV"}

// cleanup reports (log tails on failure, panics, sites that died on their
// own) and removes this run's containers and networks. It copes with a
// half-made cluster: it finds its resources by the run label.
func (c *Cluster) cleanup() {
	t := c.t
	c.mu.Lock()
	sites := slices.Clone(c.sites)
	c.mu.Unlock()
	for _, s := range sites {
		c.mu.Lock()
		created, up, paused := s.created, s.up, s.paused
		c.mu.Unlock()
		if !created {
			continue
		}
		logs := c.Logs(s.Name)
		for _, pat := range alarmPatterns {
			if i := strings.Index(logs, pat); i >= 0 {
				line := logs[i:]
				if j := strings.IndexByte(line, '\n'); j >= 0 {
					line = line[:j]
				}
				t.Errorf("site %s logged %q: %s", s.Name, pat, line)
				break
			}
		}
		if up && !paused {
			if st, err := c.State(s.Name); err == nil && !st.Running {
				t.Errorf("site %s exited on its own during the test: %s, exit code %d, OOM killed %v %s",
					s.Name, st.Status, st.ExitCode, st.OOMKilled, st.Error)
			}
		}
		if t.Failed() || os.Getenv("ROBIB_E2E_LOGS") == "1" {
			t.Logf("site %s (container %s, cluster %s, client %s), last log lines:\n%s",
				s.Name, s.Container, s.ClusterIP, s.ClientIP, harness.Tail(logs, 80))
		}
	}
	filter := "label=" + LabelRun + "=" + c.RunID
	if ids, err := docker(dockerTimeout, "ps", "-aq", "--filter", filter); err != nil {
		t.Logf("dockerh cleanup: listing containers: %v", err)
	} else if ids != "" {
		list := strings.Fields(ids)
		for _, id := range list {
			_, _ = docker(dockerTimeout, "unpause", id) // rm -f cannot kill a frozen container
		}
		if _, err := docker(dockerTimeout, append([]string{"rm", "-f", "-v"}, list...)...); err != nil {
			t.Logf("dockerh cleanup: removing containers: %v", err)
		}
	}
	ids, err := docker(dockerTimeout, "network", "ls", "-q", "--filter", filter)
	if err != nil {
		t.Logf("dockerh cleanup: listing networks: %v", err)
		return
	}
	for _, id := range strings.Fields(ids) {
		err := harness.Poll(30*time.Second, func() (bool, error) {
			_, err := docker(dockerTimeout, "network", "rm", id)
			if err != nil && isNoSuch(err) {
				return true, nil
			}
			return err == nil, err
		})
		if err != nil {
			t.Logf("dockerh cleanup: removing network %s: %v", id, err)
		}
	}
}
