package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// recordingRaft is a Raft configuration the reconciler changes; it records
// every change.
type recordingRaft struct {
	servers []raft.Server
	commit  uint64
	changes []string
	fail    error
}

func (r *recordingRaft) GetConfiguration() raft.ConfigurationFuture {
	return servedConfig{raft.Configuration{Servers: slices.Clone(r.servers)}}
}

type servedConfig struct{ c raft.Configuration }

func (s servedConfig) Error() error                      { return nil }
func (s servedConfig) Index() uint64                     { return 1 }
func (s servedConfig) Configuration() raft.Configuration { return s.c }

func (r *recordingRaft) change(what string, id raft.ServerID, addr raft.ServerAddress) raft.IndexFuture {
	r.changes = append(r.changes, fmt.Sprintf("%s %s %s", what, id, addr))
	return errFuture{err: r.fail}
}

func (r *recordingRaft) AddNonvoter(id raft.ServerID, addr raft.ServerAddress, _ uint64, _ time.Duration) raft.IndexFuture {
	return r.change("nonvoter", id, addr)
}
func (r *recordingRaft) AddVoter(id raft.ServerID, addr raft.ServerAddress, _ uint64, _ time.Duration) raft.IndexFuture {
	return r.change("voter", id, addr)
}
func (r *recordingRaft) DemoteVoter(id raft.ServerID, _ uint64, _ time.Duration) raft.IndexFuture {
	return r.change("demote", id, "")
}
func (r *recordingRaft) Stats() map[string]string {
	return map[string]string{"commit_index": strconv.FormatUint(r.commit, 10)}
}

// fixedMembers is a member list.
type fixedMembers []member

func (f fixedMembers) members() []member { return f }

// statusBook answers each member's local-status by API address.
type statusBook map[string]SiteStatus

func (b statusBook) getJSON(_ context.Context, addr, path string, out any) error {
	s, ok := b[addr]
	if !ok || path != pathLocalStatus {
		return errors.New("unreachable")
	}
	*out.(*SiteStatus) = s
	return nil
}

func voter(id, addr string) raft.Server {
	return raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(id), Address: raft.ServerAddress(addr)}
}

func nonvoter(id, addr string) raft.Server {
	return raft.Server{Suffrage: raft.Nonvoter, ID: raft.ServerID(id), Address: raft.ServerAddress(addr)}
}

func siteMember(name, raftAddr, cluster string, fresh bool) member {
	return member{Name: name, Meta: siteMeta{Raft: raftAddr, API: name + ":api", Cluster: cluster, Fresh: fresh}}
}

// The leader's reconcile makes one change per member and round: add as a
// non-voter, demote a wiped voter, promote a caught-up non-voter, update an
// address; it never adds a site of another cluster, and never removes
// anyone.
func TestReconcilePolicy(t *testing.T) {
	for _, tc := range []struct {
		name    string
		ours    string
		servers []raft.Server
		members []member
		status  statusBook
		commit  uint64
		want    []string
	}{
		{name: "a new member joins as a non-voter", ours: "c1",
			servers: []raft.Server{voter("a", "a:1")},
			members: []member{siteMember("a", "a:1", "c1", false), siteMember("b", "b:1", "", true)},
			want:    []string{"nonvoter b b:1"}},
		{name: "a member of another cluster is never added", ours: "c1",
			servers: []raft.Server{voter("a", "a:1")},
			members: []member{siteMember("x", "x:1", "c2", false)}},
		{name: "a leader without an ID adds no member that has one", ours: "",
			servers: []raft.Server{voter("a", "a:1")},
			members: []member{siteMember("x", "x:1", "c1", false), siteMember("y", "y:1", "", false)},
			want:    []string{"nonvoter y y:1"}},
		{name: "a wiped voter is demoted once its own status confirms it", ours: "c1",
			servers: []raft.Server{voter("a", "a:1"), voter("b", "b:1")},
			members: []member{siteMember("b", "b:1", "", true)},
			status:  statusBook{"b:api": {Name: "b", Fresh: true}},
			want:    []string{"demote b "}},
		{name: "stale fresh gossip of a founding voter demotes nobody", ours: "c1",
			servers: []raft.Server{voter("a", "a:1"), voter("b", "b:1")},
			members: []member{siteMember("b", "b:1", "c1", true)},
			status:  statusBook{"b:api": {Name: "b", ClusterID: "c1"}}},
		{name: "an unreachable fresh voter is left alone", ours: "c1",
			servers: []raft.Server{voter("a", "a:1"), voter("b", "b:1")},
			members: []member{siteMember("b", "b:1", "", true)}},
		{name: "a caught-up non-voter is promoted", ours: "c1", commit: 1000,
			servers: []raft.Server{voter("a", "a:1"), nonvoter("b", "b:1")},
			members: []member{siteMember("b", "b:1", "c1", false)},
			status:  statusBook{"b:api": {Name: "b", ClusterID: "c1", AppliedIndex: 1000 - promoteMaxLag}},
			want:    []string{"voter b b:1"}},
		{name: "a lagging non-voter waits", ours: "c1", commit: 1000,
			servers: []raft.Server{voter("a", "a:1"), nonvoter("b", "b:1")},
			members: []member{siteMember("b", "b:1", "c1", false)},
			status:  statusBook{"b:api": {Name: "b", ClusterID: "c1", AppliedIndex: 1000 - promoteMaxLag - 1}}},
		{name: "a non-voter still fresh by its own word waits", ours: "c1",
			servers: []raft.Server{voter("a", "a:1"), nonvoter("b", "b:1")},
			members: []member{siteMember("b", "b:1", "c1", false)},
			status:  statusBook{"b:api": {Name: "b", ClusterID: "c1", Fresh: true}}},
		{name: "a non-voter answering as another site waits", ours: "c1",
			servers: []raft.Server{voter("a", "a:1"), nonvoter("b", "b:1")},
			members: []member{siteMember("b", "b:1", "c1", false)},
			status:  statusBook{"b:api": {Name: "impostor", ClusterID: "c1"}}},
		{name: "a non-voter answering for another cluster waits", ours: "c1",
			servers: []raft.Server{voter("a", "a:1"), nonvoter("b", "b:1")},
			members: []member{siteMember("b", "b:1", "c1", false)},
			status:  statusBook{"b:api": {Name: "b", ClusterID: "c2"}}},
		{name: "a voter's new address keeps it a voter", ours: "c1",
			servers: []raft.Server{voter("a", "a:1"), voter("b", "b:1")},
			members: []member{siteMember("b", "b:2", "c1", false)},
			want:    []string{"voter b b:2"}},
		{name: "a non-voter's new address keeps it a non-voter", ours: "c1",
			servers: []raft.Server{voter("a", "a:1"), nonvoter("b", "b:1")},
			members: []member{siteMember("b", "b:2", "c1", false)},
			want:    []string{"nonvoter b b:2"}},
		{name: "a dead voter (not in gossip) stays", ours: "c1",
			servers: []raft.Server{voter("a", "a:1"), voter("b", "b:1"), voter("c", "c:1")},
			members: []member{siteMember("a", "a:1", "c1", false)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &recordingRaft{servers: tc.servers, commit: tc.commit}
			c := &reconciler{self: "a", log: slog.New(slog.DiscardHandler), raft: r, ids: fakeIDs(tc.ours),
				members: fixedMembers(tc.members), refused: &refusals{}, rpc: tc.status}
			if err := c.reconcile(); err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(r.changes, tc.want) {
				t.Fatalf("changes %q, want %q", r.changes, tc.want)
			}
		})
	}
}

// A failed change is reported, naming the site.
func TestReconcileReportsFailedChange(t *testing.T) {
	r := &recordingRaft{servers: []raft.Server{voter("a", "a:1")}, fail: raft.ErrNotLeader}
	c := &reconciler{self: "a", log: slog.New(slog.DiscardHandler), raft: r, ids: fakeIDs("c1"),
		members: fixedMembers{siteMember("b", "b:1", "c1", false)}, refused: &refusals{}, rpc: statusBook{}}
	if err := c.reconcile(); !errors.Is(err, raft.ErrNotLeader) {
		t.Fatalf("reconcile: %v, want the change's error", err)
	}
}
