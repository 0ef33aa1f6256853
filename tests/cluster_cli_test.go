package tests

import (
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/robib/robib/tests/harness"
)

// clusterCLIMustFail runs the CLI against a and asserts a non-zero exit
// with stderr matching every pattern (case-insensitive).
func clusterCLIMustFail(t *testing.T, a *harness.Agent, patterns []string, args ...string) string {
	t.Helper()
	out, errOut, err := a.CLI(args...)
	if err == nil {
		t.Errorf("robib %q at %s succeeded, want an error\nstdout: %s", args, a.Name, out)
		return errOut
	}
	for _, p := range patterns {
		if !regexp.MustCompile("(?i)" + p).MatchString(errOut) {
			t.Errorf("robib %q at %s: stderr %q does not match %q", args, a.Name, strings.TrimSpace(errOut), p)
		}
	}
	if strings.Contains(errOut, "goroutine ") || strings.Contains(errOut, "panic") {
		t.Errorf("robib %q crashed:\n%s", args, errOut)
	}
	t.Logf("robib %s at %s: refused: %s", strings.Join(args, " "), a.Name, strings.TrimSpace(errOut))
	return errOut
}

// TestClusterCLI drives the cluster commands: status (table and JSON),
// transfer-leadership, remove (refused for a live site, accepted for a
// dead one) and leave; the cluster keeps accepting writes throughout.
func TestClusterCLI(t *testing.T) {
	requireTools(t, "python3-nbd", "nbdcopy")
	c := harness.StartCluster(t, harness.ClusterOptions{})

	// status, JSON.
	st := c.MustStatus(c.Agents[1])
	if st.Leader == "" || st.CommitIndex == 0 || len(st.Sites) != 3 {
		t.Fatalf("cluster status --json: leader %q, commit index %d, %d sites; want a leader, an index and 3 sites: %+v", st.Leader, st.CommitIndex, len(st.Sites), st)
	}
	leaders := 0
	for i, s := range st.Sites {
		a := c.Agents[i] // sites are sorted by name, like the agents
		if s.Name != a.Name || !s.Voter || s.Gossip != "alive" || s.AppliedIndex == 0 ||
			s.RaftAddr != a.RaftAddr || s.APIAddr != a.APIAddr || s.NBDAddr != a.NBDAddr {
			t.Errorf("status of %s: %+v; want a live voter with an applied index at raft %s api %s nbd %s", a.Name, s, a.RaftAddr, a.APIAddr, a.NBDAddr)
		}
		switch s.State {
		case "Leader":
			leaders++
			if s.Name != st.Leader {
				t.Errorf("site %s is in state Leader but the leader is %s", s.Name, st.Leader)
			}
		case "Follower":
		default:
			t.Errorf("site %s in state %q", s.Name, s.State)
		}
	}
	if leaders != 1 {
		t.Errorf("%d sites in state Leader: %+v", leaders, st.Sites)
	}

	// status, table.
	table := c.Agents[2].MustCLI("cluster", "status")
	for _, re := range []string{
		`(?m)^cluster: [0-9a-f]{32}\s+leader: ` + regexp.QuoteMeta(st.Leader) + `\s+commit index: \d+$`,
		`(?m)^SITE\s+STATE\s+SUFFRAGE\s+GOSSIP\s+APPLIED\s+COMMIT\s+LAG\s+RAFT\s+NBD\s+API\s+SECURITY\s+DEGRADED\s*$`,
		`(?m)^site1\s.*\sINSECURE\s+-\s*$`,
	} {
		if !regexp.MustCompile(re).MatchString(table) {
			t.Errorf("cluster status table does not match %s:\n%s", re, table)
		}
	}
	for _, a := range c.Agents {
		re := `(?m)^` + regexp.QuoteMeta(a.Name) + `\s+(Leader|Follower)\s+voter\s+alive\s+\d+\s+\d+\s+\d+\s+` +
			regexp.QuoteMeta(a.RaftAddr) + `\s+` + regexp.QuoteMeta(a.NBDAddr) + `\s+` + regexp.QuoteMeta(a.APIAddr) + `\s+INSECURE\s+-\s*$`
		if !regexp.MustCompile(re).MatchString(table) {
			t.Errorf("cluster status table has no row for %s matching %s:\n%s", a.Name, re, table)
		}
	}

	// transfer-leadership --to a follower other than site1, asked at a
	// third site; site1 (the bootstrap site, no --join) leaves later.
	boot := c.Agents[0]
	var target *harness.Agent
	for _, f := range c.Followers() {
		if f != boot {
			target = f
			break
		}
	}
	asker := others(c, target)[1]
	out := asker.MustCLI("cluster", "transfer-leadership", "--to", target.Name)
	if !strings.Contains(out, "leader is now "+target.Name) {
		t.Errorf("transfer-leadership output %q does not name %s", out, target.Name)
	}
	harness.WaitFor(t, clusterWait, "every site to see "+target.Name+" lead", func() (bool, error) {
		for _, a := range c.Agents {
			st, err := c.Status(a)
			if err != nil {
				return false, err
			}
			if s, _ := st.Site(target.Name); st.Leader != target.Name || s.State != "Leader" {
				return false, fmt.Errorf("%s says the leader is %q (%s is %s)", a.Name, st.Leader, target.Name, s.State)
			}
		}
		return true, nil
	})
	clusterCLIMustFail(t, asker, []string{"ghost", "not a member|unknown"}, "cluster", "transfer-leadership", "--to", "ghost")

	// remove: refused for a live site, an unknown one and the site asked.
	leaver := boot
	clusterCLIMustFail(t, target, []string{leaver.Name, "alive", "leave"}, "cluster", "remove", leaver.Name)
	clusterCLIMustFail(t, leaver, []string{target.Name, "alive", "leave"}, "cluster", "remove", target.Name)
	clusterCLIMustFail(t, target, []string{"ghost", "not a member|unknown"}, "cluster", "remove", "ghost")
	clusterCLIMustFail(t, target, []string{"leave"}, "cluster", "remove", target.Name)
	clusterCLIMustFail(t, target, nil, "cluster", "remove")
	if got := c.MustStatus(target).Voters(); len(got) != 3 {
		t.Fatalf("voters after refused removals: %v", got)
	}

	// leave, at a follower.
	out = leaver.MustCLI("cluster", "leave")
	if !strings.Contains(out, "left") {
		t.Errorf("cluster leave output: %q", out)
	}
	remaining := others(c, leaver)
	harness.WaitFor(t, clusterWait, "the other sites to list 2 sites", func() (bool, error) {
		for _, a := range remaining {
			st, err := c.Status(a)
			if err != nil {
				return false, err
			}
			if names := st.Names(); len(names) != 2 || len(st.Voters()) != 2 || st.Leader == "" || st.Leader == leaver.Name {
				return false, fmt.Errorf("%s lists %v, voters %v, leader %q", a.Name, names, st.Voters(), st.Leader)
			}
		}
		return true, nil
	})
	if err := leaver.Stop(); err != nil {
		t.Errorf("stopping %s after it left: %v", leaver.Name, err)
	}
	c.WaitReady(clusterWait, 2)

	// Still a working cluster: metadata and flushed writes commit on 2 of 2.
	writeAndReadBack := func(vol string, seed uint64, at, from *harness.Agent) {
		t.Helper()
		at.CreateVolume(vol, "8MiB")
		waitVolumeEverywhere(t, c, vol, 8*MiB)
		model := make([]byte, 8*MiB)
		runNBDPlan(t, at.NBDURI(vol), randomBytes(seed, 8*MiB), sequentialPlan(8*MiB, 512*KiB), false, model)
		c.WaitCaughtUp(clusterWait)
		assertExportEquals(t, from, vol, model)
		mustVerify(t, from, vol, len(c.Running()))
	}
	writeAndReadBack("after-leave", 61, remaining[0], remaining[1])

	// remove, for a dead site: a new site joins, dies, and is removed.
	s4 := c.AddSite("site4")
	c.WaitReady(clusterWait, 3)
	s4.Kill()
	var removed string
	harness.WaitFor(t, clusterWait, "cluster remove of the killed site4 to succeed", func() (bool, error) {
		out, errOut, err := target.CLI("cluster", "remove", "site4")
		if err != nil {
			if !strings.Contains(errOut, "alive") { // gossip has not noticed yet: the only acceptable refusal
				t.Fatalf("cluster remove site4 (dead): %v: %s", err, errOut)
			}
			return false, fmt.Errorf("%s", strings.TrimSpace(errOut))
		}
		removed = out
		return true, nil
	})
	if !strings.Contains(removed, "site4") {
		t.Errorf("cluster remove output %q does not name site4", removed)
	}
	harness.WaitFor(t, clusterWait, "the sites to list 2 voters without site4", func() (bool, error) {
		for _, a := range c.Running() {
			st, err := c.Status(a)
			if err != nil {
				return false, err
			}
			if v := st.Voters(); len(v) != 2 || v[0] == "site4" || v[1] == "site4" {
				return false, fmt.Errorf("%s: voters %v", a.Name, v)
			}
		}
		return true, nil
	})
	writeAndReadBack("after-remove", 62, remaining[1], remaining[0])
}

// TestClusterAgentBadFlags: cluster flags that cannot work are refused at
// start with a message naming the flag.
func TestClusterAgentBadFlags(t *testing.T) {
	bin := harness.Build(t)
	dir := t.TempDir()
	base := func() []string {
		return []string{"agent", "--name", "s", "--data-dir", filepath.Join(dir, "d"), "--nbd-addr", harness.FreeAddr(t),
			"--api-addr", harness.FreeAddr(t), "--raft-addr", harness.FreeAddr(t), "--gossip-addr", harness.FreeAddr(t)}
	}
	same := harness.FreeAddr(t)
	for _, tc := range []struct {
		args     []string
		patterns []string
	}{
		{[]string{"--raft-addr", "0.0.0.0:1"}, []string{"raft-addr", "wildcard"}},
		{[]string{"--raft-addr", "[::]:7000"}, []string{"raft-addr", "wildcard"}},
		{[]string{"--gossip-addr", ":7946"}, []string{"gossip-addr", "wildcard"}},
		{[]string{"--raft-addr", "127.0.0.1:0"}, []string{"raft-addr", "port"}},
		{[]string{"--raft-addr", same, "--gossip-addr", same}, []string{"raft-addr", "gossip-addr", "differ"}},
		{[]string{"--bootstrap-expect", "-1"}, []string{"bootstrap-expect", "0..15"}},
		{[]string{"--bootstrap-expect", "16"}, []string{"bootstrap-expect", "0..15"}},
		{[]string{"--bootstrap-expect", "three"}, []string{"bootstrap-expect"}},
		{[]string{"--join", "bad"}, []string{"join", "bad"}},
		{[]string{"--join", "127.0.0.1:1,nohost"}, []string{"join", "nohost"}},
		{[]string{"--snapshot-threshold", "3"}, []string{"snapshot-threshold"}},
		{[]string{"--trailing-logs", "0"}, []string{"trailing-logs"}},
		{[]string{"--leader-lease-timeout", "2s"}, []string{"leader-lease-timeout"}},
	} {
		args := append(base(), tc.args...) // later flags win
		r := harness.Run(t, 30*time.Second, []string{"ROBIB_INSECURE=true"}, bin, args...)
		if r.Err == nil || r.ExitCode <= 0 {
			t.Errorf("robib agent %v: exit %d (%v), want a prompt non-zero exit\nstderr: %s", tc.args, r.ExitCode, r.Err, harness.Tail(r.Stderr, 10))
			continue
		}
		for _, p := range tc.patterns {
			if !regexp.MustCompile("(?i)" + p).MatchString(r.Stderr) {
				t.Errorf("robib agent %v: stderr %q does not match %q", tc.args, strings.TrimSpace(r.Stderr), p)
			}
		}
		if strings.Contains(r.Stderr, "goroutine ") || strings.Contains(r.Stderr, "robib site serving") {
			t.Errorf("robib agent %v started or crashed:\n%s", tc.args, harness.Tail(r.Stderr, 20))
		}
	}
}
