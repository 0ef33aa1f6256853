package tests

import (
	"fmt"
	"testing"
	"time"

	"github.com/robib/robib/tests/harness"
)

// TestClusterBootstrapSiteRejoinsAfterDowntime: the site started without
// --join (site1 of the documented setup: --bootstrap-expect on all,
// --join site1 on the others) is down for a while and comes back. It must
// find the other sites again and serve writes.
func TestClusterBootstrapSiteRejoinsAfterDowntime(t *testing.T) {
	requireTools(t, "python3-nbd", "nbdcopy")
	if testing.Short() {
		t.Skip("keeps a site down for over 30 seconds")
	}
	step := stopwatch(t)
	c := harness.StartCluster(t, harness.ClusterOptions{})
	boot := c.Agents[0] // the one without --join
	rest := others(c, boot)
	rest[0].CreateVolume("rj", "8MiB")
	waitVolumeEverywhere(t, c, "rj", 8*MiB)

	if err := boot.Stop(); err != nil {
		t.Fatalf("stopping %s: %v", boot.Name, err)
	}
	harness.WaitFor(t, clusterWait, "the other sites to see "+boot.Name+" gone from gossip", func() (bool, error) {
		for _, a := range rest {
			st, err := c.Status(a)
			if err != nil {
				return false, err
			}
			if s, _ := st.Site(boot.Name); s.Gossip != "gone" || st.Leader == "" {
				return false, fmt.Errorf("%s: %s gossip %q, leader %q", a.Name, boot.Name, s.Gossip, st.Leader)
			}
		}
		return true, nil
	})
	step(boot.Name + " stopped and gone from the others' gossip")
	// The downtime itself is the scenario, not a synchronisation: memberlist
	// (LAN defaults) keeps gossiping to a dead member for 30 seconds, so a
	// site that returns sooner is found by the others; one that was away
	// longer must find its way back by itself.
	time.Sleep(32 * time.Second)
	if err := boot.Start(); err != nil {
		t.Fatal(err)
	}
	step("restarted " + boot.Name)
	c.WaitReady(60*time.Second, 3)
	step("every site sees 3 reachable voters and the same leader")

	model := make([]byte, 8*MiB)
	runNBDPlan(t, boot.NBDURI("rj"), randomBytes(71, 8*MiB), sequentialPlan(8*MiB, 512*KiB), false, model)
	step("wrote and flushed 8 MiB at " + boot.Name)
	c.WaitCaughtUp(clusterWait)
	for _, a := range rest {
		assertExportEquals(t, a, "rj", model)
	}
	mustVerify(t, boot, "rj", 3)
}
