package tests

import (
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/robib/robib/tests/harness"
)

// TestClusterWipedSiteRejoinsAsNonVoter (issue 11): a site whose data
// directory was wiped restarts under its old name. It must not come back
// as a voter with an empty log and no vote record: it is fresh (takes no
// part in elections), the leader demotes it to non-voter, it catches up,
// and only then is it promoted again. The data stays intact and verify is
// clean.
func TestClusterWipedSiteRejoinsAsNonVoter(t *testing.T) {
	requireTools(t, "python3-nbd", "nbdcopy")
	c := harness.StartCluster(t, harness.ClusterOptions{})
	st := c.MustStatus(c.Agents[0])
	clusterID := st.ClusterID

	const size = 8 * MiB
	c.Agents[0].CreateVolume("wipe", "8MiB")
	waitVolumeEverywhere(t, c, "wipe", size)
	model := make([]byte, size)
	runNBDPlan(t, c.Agents[0].NBDURI("wipe"), randomBytes(1101, size), sequentialPlan(size, 512*KiB), true, model)
	c.WaitCaughtUp(clusterWait)

	// The victim is a follower started with --bootstrap-expect and --join,
	// as the documented setup has it: restarted empty, it must join the
	// existing cluster instead of bootstrapping again.
	var victim *harness.Agent
	for _, f := range c.Followers() {
		if f != c.Agents[0] {
			victim = f
			break
		}
	}
	if err := victim.Stop(); err != nil {
		t.Fatalf("stopping %s: %v", victim.Name, err)
	}
	if err := os.RemoveAll(victim.DataDir); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(victim.DataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := victim.Start(); err != nil {
		t.Fatalf("restarting %s with a wiped data directory: %v", victim.Name, err)
	}

	// It comes back as a voter only after having been a non-voter.
	harness.WaitFor(t, clusterWait, victim.Name+" to be a voter again, and not fresh", func() (bool, error) {
		st, err := c.Status(victim)
		if err != nil {
			return false, err
		}
		if s, _ := st.Site(victim.Name); s.Suffrage != "voter" || s.Fresh {
			return false, fmt.Errorf("%s is %q, fresh %v", victim.Name, s.Suffrage, s.Fresh)
		}
		return true, nil
	})
	c.WaitReady(clusterWait, 3)
	log := victim.CurrentLog()
	for _, want := range []string{"fresh site: no raft history", "site is no longer fresh"} {
		if !strings.Contains(log, want) {
			t.Errorf("%s's log has no %q", victim.Name, want)
		}
	}
	if strings.Contains(log, "bootstrapping cluster") {
		t.Errorf("%s bootstrapped again after its data directory was wiped", victim.Name)
	}
	var demoted, promoted bool
	for _, a := range c.Agents {
		l := a.CurrentLog()
		demoted = demoted || strings.Contains(l, "demoting it to non-voter") && strings.Contains(l, "site="+victim.Name)
		promoted = promoted || strings.Contains(l, "promoting caught-up non-voter to voter") && strings.Contains(l, "site="+victim.Name)
	}
	if !demoted || !promoted {
		t.Errorf("%s: demoted by a leader %v, promoted again %v; want both", victim.Name, demoted, promoted)
	}
	// Fresh until it was a non-voter: its log shows the end of the fresh
	// state before any vote it could grant (the promotion comes after).
	if i, j := strings.Index(log, "site is no longer fresh"), strings.Index(log, "why=\"listed as a non-voter\""); i < 0 || j < i {
		t.Errorf("%s left the fresh state other than as a non-voter", victim.Name)
	}

	st = c.MustStatus(victim)
	if st.ClusterID != clusterID {
		t.Errorf("%s reports cluster ID %q, the cluster's is %q", victim.Name, st.ClusterID, clusterID)
	}
	if s, _ := st.Site(victim.Name); s.Suffrage != "voter" || s.Fresh {
		t.Errorf("%s: %+v; want a voter that is not fresh", victim.Name, s)
	}
	c.WaitCaughtUp(clusterWait)
	assertExportEquals(t, victim, "wipe", model)
	mustVerify(t, victim, "wipe", 3)
}

// TestClusterRefusesSiteOfAnotherCluster (issue 11): a site started with
// the data directory of another cluster is never added to Raft, whatever
// its name, and gossip does not merge with it.
func TestClusterRefusesSiteOfAnotherCluster(t *testing.T) {
	c := harness.StartCluster(t, harness.ClusterOptions{})
	clusterID := c.MustStatus(c.Agents[0]).ClusterID

	// A lone site is a complete one-site cluster with its own ID.
	other := harness.StartAgent(t, harness.Options{Name: "site4", ExtraArgs: harness.FastFailover})
	var otherID string
	harness.WaitFor(t, clusterWait, "the lone site to fix its cluster ID", func() (bool, error) {
		st, err := c.Status(other)
		if err != nil {
			return false, err
		}
		if otherID = st.ClusterID; otherID == "" {
			return false, fmt.Errorf("no cluster ID yet")
		}
		return true, nil
	})
	if otherID == clusterID {
		t.Fatalf("two clusters got the same ID %s", otherID)
	}
	if err := other.Stop(); err != nil {
		t.Fatal(err)
	}

	// The same data directory, now told to join the cluster.
	var join []string
	for _, a := range c.Agents {
		join = append(join, a.GossipAddr)
	}
	intruder := harness.StartAgent(t, harness.Options{Name: "site4", DataDir: other.DataDir,
		ExtraArgs: append([]string{"--join", strings.Join(join, ",")}, harness.FastFailover...)})
	harness.WaitFor(t, clusterWait, "the cluster to refuse the other cluster's site", func() (bool, error) {
		for _, a := range c.Agents {
			if strings.Contains(a.CurrentLog(), "refusing a site of another cluster") {
				return true, nil
			}
		}
		return false, fmt.Errorf("no refusal logged yet")
	})
	// Once refused it is never added: the reconcile rounds that follow
	// (every 500 ms) and gossip's push/pull keep it out.
	c.WaitReady(clusterWait, 3)
	for _, a := range c.Agents {
		st := c.MustStatus(a)
		if s, ok := st.Site("site4"); ok {
			t.Errorf("%s lists the other cluster's site (gossip must not have merged with it): %+v", a.Name, s)
		}
	}
	var ist harness.ClusterStatus
	harness.WaitFor(t, clusterWait, "the other cluster's site to lead its own cluster", func() (bool, error) {
		var err error
		if ist, err = c.Status(intruder); err != nil {
			return false, err
		}
		if ist.Leader == "" {
			return false, fmt.Errorf("no leader")
		}
		return true, nil
	})
	if names := ist.Names(); len(names) != 1 {
		t.Errorf("the other cluster's site lists %v: it merged with this cluster's gossip", names)
	}
	if ist.ClusterID != otherID || ist.Leader != "site4" || len(ist.Voters()) != 1 {
		t.Errorf("the other cluster's site: cluster %s leader %q voters %v; want its own one-site cluster %s",
			ist.ClusterID, ist.Leader, ist.Voters(), otherID)
	}
}
