package cluster

import (
	"errors"
	"testing"
	"time"
)

// The leader watch closes the channel it handed out at the next leader
// change Raft observes, and hands out a fresh one afterwards.
func TestLeaderWatchFollowsRaft(t *testing.T) {
	c := newRoleCluster(t, "a", "b", "c")
	l := c.leader()
	f := c.follower(l)
	ch := f.watch.change()
	select {
	case <-ch:
		t.Fatal("closed without a leader change")
	default:
	}
	var to *roleSite
	for _, s := range c.order {
		if s != l && s != f {
			to = s
		}
	}
	c.transferTo(to)
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatal("the leader changed and the watch did not say so")
	}
	if next := f.watch.change(); next == ch {
		t.Fatal("the watch hands out the closed channel again")
	}
	lead := raftLeader{f.raft}
	if lead.IsLeader() || lead.Leader() != to.name || !(raftLeader{to.raft}).IsLeader() {
		t.Fatalf("raftLeader: %s leads=%v, says leader %q; want %s", f.name, lead.IsLeader(), lead.Leader(), to.name)
	}
	name, api, err := leaderAPI(lead, c)
	if err != nil || name != to.name || api != to.api {
		t.Fatalf("leaderAPI = %q, %q, %v; want %s at %s", name, api, err, to.name, to.api)
	}
	if _, _, err := leaderAPI(lead, fakeBook{}); !errors.Is(err, ErrNoLeader) {
		t.Fatalf("leaderAPI without the leader's address: %v", err)
	}
}
