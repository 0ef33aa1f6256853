package harness

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// FastFailover are agent flags for quick elections; clusters use them
// unless ClusterOptions.DefaultTiming is set.
var FastFailover = []string{"--heartbeat-timeout", "300ms", "--election-timeout", "300ms", "--leader-lease-timeout", "150ms"}

// ClusterOptions configure StartCluster. Zero fields get defaults.
type ClusterOptions struct {
	// Sites is the number of sites started together with
	// --bootstrap-expect Sites; default 3.
	Sites int
	// NamePrefix names the sites NamePrefix1..N; default "site".
	NamePrefix string
	// Args are extra agent flags for every site (also for AddSite), e.g.
	// snapshot tuning.
	Args []string
	// DefaultTiming leaves out FastFailover (the binary's 1s timeouts).
	DefaultTiming bool
	// TLS runs every site with a certificate of this PKI (see
	// Options.TLS); nil: --insecure.
	TLS *PKI
	// Bin is the robib binary; default Build(t).
	Bin string
}

// Cluster is a set of agent processes forming one robib cluster.
type Cluster struct {
	t      testing.TB
	opts   ClusterOptions
	Agents []*Agent // in start order; AddSite appends
}

// SiteStatus is one site of `robib cluster status --json`.
type SiteStatus struct {
	Name              string `json:"name"`
	State             string `json:"state"`
	Voter             bool   `json:"voter"`
	Suffrage          string `json:"suffrage"`
	ClusterID         string `json:"cluster_id"`
	Fresh             bool   `json:"fresh"`
	Gossip            string `json:"gossip"`
	RaftAddr          string `json:"raft_addr"`
	APIAddr           string `json:"api_addr"`
	NBDAddr           string `json:"nbd_addr"`
	Term              uint64 `json:"term"`
	AppliedIndex      uint64 `json:"applied_index"`
	FSMIndex          uint64 `json:"fsm_index"`
	CommitIndex       uint64 `json:"commit_index"`
	LastLogIndex      uint64 `json:"last_log_index"`
	LastSnapshotIndex uint64 `json:"last_snapshot_index"`
	Lag               uint64 `json:"lag"`
	Leader            string `json:"leader"`
	Error             string `json:"error"`
}

// ClusterStatus is `robib cluster status --json`.
type ClusterStatus struct {
	Leader      string       `json:"leader"`
	ClusterID   string       `json:"cluster_id"`
	CommitIndex uint64       `json:"commit_index"`
	Sites       []SiteStatus `json:"sites"`
}

// Site returns the named site's entry.
func (s ClusterStatus) Site(name string) (SiteStatus, bool) {
	for _, x := range s.Sites {
		if x.Name == name {
			return x, true
		}
	}
	return SiteStatus{}, false
}

// Voters lists the names of the voting sites, sorted.
func (s ClusterStatus) Voters() []string {
	var out []string
	for _, x := range s.Sites {
		if x.Voter {
			out = append(out, x.Name)
		}
	}
	slices.Sort(out)
	return out
}

// Names lists every site in the status, sorted.
func (s ClusterStatus) Names() []string {
	var out []string
	for _, x := range s.Sites {
		out = append(out, x.Name)
	}
	slices.Sort(out)
	return out
}

// StartCluster starts opts.Sites agents that bootstrap one cluster
// together (--bootstrap-expect N on all, --join to the first site on the
// others) and waits until every site knows the same leader and N voters.
func StartCluster(t testing.TB, opts ClusterOptions) *Cluster {
	t.Helper()
	if opts.Sites == 0 {
		opts.Sites = 3
	}
	if opts.NamePrefix == "" {
		opts.NamePrefix = "site"
	}
	if opts.Bin == "" {
		opts.Bin = Build(t)
	}
	c := &Cluster{t: t, opts: opts}
	for i := range opts.Sites {
		c.Agents = append(c.Agents, c.startSite(fmt.Sprintf("%s%d", opts.NamePrefix, i+1), opts.Sites, nil))
	}
	c.WaitReady(60*time.Second, opts.Sites)
	return c
}

// startSite creates and starts one site. Ports come from FreeAddr just
// before the start; should one be taken in between (another process's
// outgoing connection can get it), the site is tried again on new ports.
func (c *Cluster) startSite(name string, expect int, extra []string) *Agent {
	c.t.Helper()
	for attempt := 1; ; attempt++ {
		o := c.agentOptions(name, expect)
		o.ExtraArgs = append(o.ExtraArgs, extra...)
		a := NewAgent(c.t, o)
		err := a.Start()
		if err == nil {
			return a
		}
		_ = a.Wait(5 * time.Second) // this exit is expected, not one "on its own"
		if attempt < 3 && strings.Contains(err.Error(), "address already in use") {
			c.t.Logf("starting %s: a port was taken meanwhile; trying new ports: %v", name, err)
			continue
		}
		c.t.Fatalf("starting %s: %v", name, err)
	}
}

func (c *Cluster) agentOptions(name string, expect int) Options {
	var args []string
	if expect > 0 {
		args = append(args, "--bootstrap-expect", strconv.Itoa(expect))
	}
	switch {
	case expect > 0 && len(c.Agents) > 0:
		// Starting together: the documented setup, --join the first site.
		args = append(args, "--join", c.Agents[0].GossipAddr)
	case expect == 0:
		// Joining later: through every running site.
		var join []string
		for _, a := range c.Running() {
			join = append(join, a.GossipAddr)
		}
		if len(join) > 0 {
			args = append(args, "--join", strings.Join(join, ","))
		}
	}
	if !c.opts.DefaultTiming {
		args = append(args, FastFailover...)
	}
	args = append(args, c.opts.Args...)
	return Options{Name: name, Bin: c.opts.Bin, ExtraArgs: args, TLS: c.opts.TLS}
}

// AddSite starts a new site that joins the cluster through the gossip
// addresses of every running site (no --bootstrap-expect), with the
// cluster's Args plus extra. It does not wait for the site to become a
// voter.
func (c *Cluster) AddSite(name string, extra ...string) *Agent {
	c.t.Helper()
	a := c.startSite(name, 0, extra)
	c.Agents = append(c.Agents, a)
	return a
}

// Agent returns the named agent (nil if none).
func (c *Cluster) Agent(name string) *Agent {
	for _, a := range c.Agents {
		if a.Name == name {
			return a
		}
	}
	return nil
}

// Running lists the agents whose process is alive.
func (c *Cluster) Running() []*Agent {
	var out []*Agent
	for _, a := range c.Agents {
		if a.Running() {
			out = append(out, a)
		}
	}
	return out
}

// Status runs `robib cluster status --json` against a.
func (c *Cluster) Status(a *Agent) (ClusterStatus, error) {
	r := Run(c.t, 30*time.Second, a.CLIEnv(), a.Bin, "--api", a.APIURL(), "cluster", "status", "--json")
	if r.Err != nil {
		return ClusterStatus{}, fmt.Errorf("cluster status at %s: %v: %s", a.Name, r.Err, strings.TrimSpace(r.Stderr))
	}
	var st ClusterStatus
	if err := json.Unmarshal([]byte(r.Stdout), &st); err != nil {
		return ClusterStatus{}, fmt.Errorf("cluster status --json at %s: %v\n%s", a.Name, err, r.Stdout)
	}
	return st, nil
}

// MustStatus is Status that fails the test on error.
func (c *Cluster) MustStatus(a *Agent) ClusterStatus {
	c.t.Helper()
	st, err := c.Status(a)
	if err != nil {
		c.t.Fatal(err)
	}
	return st
}

// WaitReady waits until every running agent reports the same leader, the
// same cluster ID and exactly `voters` voting sites, each of them
// reachable (Leader or Follower). It returns the status seen at the first
// running agent.
func (c *Cluster) WaitReady(timeout time.Duration, voters int) ClusterStatus {
	c.t.Helper()
	var last ClusterStatus
	WaitFor(c.t, timeout, fmt.Sprintf("a leader and %d reachable voters at every running site", voters), func() (bool, error) {
		leader, clusterID := "", ""
		for i, a := range c.Running() {
			st, err := c.Status(a)
			if err != nil {
				return false, err
			}
			if st.Leader == "" {
				return false, fmt.Errorf("%s knows no leader", a.Name)
			}
			if st.ClusterID == "" || clusterID != "" && st.ClusterID != clusterID {
				return false, fmt.Errorf("%s has cluster ID %q, another site %q", a.Name, st.ClusterID, clusterID)
			}
			clusterID = st.ClusterID
			if leader != "" && st.Leader != leader {
				return false, fmt.Errorf("%s says the leader is %s, another site says %s", a.Name, st.Leader, leader)
			}
			leader = st.Leader
			if v := st.Voters(); len(v) != voters {
				return false, fmt.Errorf("%s sees voters %v, want %d", a.Name, v, voters)
			}
			for _, s := range st.Sites {
				if s.Voter && s.State != "Leader" && s.State != "Follower" {
					return false, fmt.Errorf("%s sees voter %s in state %s (%s)", a.Name, s.Name, s.State, s.Error)
				}
			}
			if i == 0 {
				last = st
			}
		}
		return leader != "", nil
	})
	return last
}

// Leader returns the running agent that leads, per the status at the
// first running agent (which must know a leader).
func (c *Cluster) Leader() *Agent {
	c.t.Helper()
	run := c.Running()
	if len(run) == 0 {
		c.t.Fatal("no agent is running")
	}
	st := c.MustStatus(run[0])
	a := c.Agent(st.Leader)
	if a == nil || !a.Running() {
		c.t.Fatalf("leader %q (per %s) is not a running agent of this cluster", st.Leader, run[0].Name)
	}
	return a
}

// Followers returns the running agents other than the leader, in start
// order.
func (c *Cluster) Followers() []*Agent {
	c.t.Helper()
	l := c.Leader()
	var out []*Agent
	for _, a := range c.Running() {
		if a != l {
			out = append(out, a)
		}
	}
	return out
}

// WaitCaughtUp waits until every running agent's fsm_index reached the
// highest fsm_index any running agent reports now (so every command a
// site has applied — e.g. the writes behind a flush it answered — is
// applied everywhere). It returns that index.
//
// A site that installed a snapshot reports the snapshot's index as its
// fsm_index, and that index may be a Raft entry that is no command (a
// barrier of a read index, a no-op, a configuration); the other sites'
// fsm_index stays at the last command below it until the next command. So
// a site also counts as caught up once its applied_index (Raft's, which
// counts those entries) reached the target: every command up to it has
// then been handed to its state machine.
func (c *Cluster) WaitCaughtUp(timeout time.Duration) uint64 {
	c.t.Helper()
	var target uint64
	run := c.Running()
	for _, a := range run {
		st := c.MustStatus(a)
		if s, ok := st.Site(a.Name); ok {
			target = max(target, s.FSMIndex)
		}
	}
	WaitFor(c.t, timeout, fmt.Sprintf("every running site to apply command index %d", target), func() (bool, error) {
		for _, a := range run {
			st, err := c.Status(a)
			if err != nil {
				return false, err
			}
			s, ok := st.Site(a.Name)
			if !ok {
				return false, fmt.Errorf("%s is not in its own status", a.Name)
			}
			if s.FSMIndex < target && s.AppliedIndex < target {
				return false, fmt.Errorf("%s applied %d of %d (raft applied %d)", a.Name, s.FSMIndex, target, s.AppliedIndex)
			}
		}
		return true, nil
	})
	return target
}

// CurrentLog returns the log lines of the agent's current (last started)
// process: everything after the harness's last start marker.
func (a *Agent) CurrentLog() string {
	logs := a.Logs()
	if i := strings.LastIndex(logs, "=== harness: start #"); i >= 0 {
		return logs[i:]
	}
	return logs
}

// ProcIO reads /proc/PID/io (rchar, wchar, read_bytes, write_bytes, ...).
func ProcIO(pid int) (map[string]int64, error) {
	return procKeyValues(fmt.Sprintf("/proc/%d/io", pid), 1)
}

// ProcStatusKiB reads the kB fields of /proc/PID/status (VmRSS, VmHWM,
// RssAnon, RssFile, ...), in KiB.
func ProcStatusKiB(pid int) (map[string]int64, error) {
	return procKeyValues(fmt.Sprintf("/proc/%d/status", pid), 1)
}

func procKeyValues(path string, field int) (map[string]int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]int64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fs := strings.Fields(v)
		if len(fs) < field {
			continue
		}
		if n, err := strconv.ParseInt(fs[field-1], 10, 64); err == nil {
			out[k] = n
		}
	}
	return out, sc.Err()
}
