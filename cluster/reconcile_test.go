package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
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

// verifyScript is a VerifyPeer whose answer per site the test sets; it
// records every call.
type verifyScript struct {
	mu    sync.Mutex
	fail  map[string]error
	calls []string
}

func (v *verifyScript) verify(_ context.Context, site, raftAddr string) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.calls = append(v.calls, site+"@"+raftAddr)
	return v.fail[site]
}

func (v *verifyScript) set(site string, err error) {
	v.mu.Lock()
	v.fail[site] = err
	v.mu.Unlock()
}

func (v *verifyScript) called(site string) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return slices.ContainsFunc(v.calls, func(c string) bool { return strings.HasPrefix(c, site+"@") })
}

// No member is added, readdressed or promoted before it passes VerifyPeer;
// failures are logged once per member and distinct error however many
// rounds fail, and the member is added at the first round it passes. A
// member of another cluster is never even verified.
func TestReconcileVerifiesPeers(t *testing.T) {
	errCert := errors.New("certificate names site mallory")
	v := &verifyScript{fail: map[string]error{"b": errCert, "c": errCert, "d": errCert}}
	r := &recordingRaft{servers: []raft.Server{voter("a", "a:1"), nonvoter("c", "c:1"), voter("d", "d:1")}, commit: 100}
	logs := &logRecords{}
	members := fixedMembers{
		siteMember("a", "a:1", "c1", false),
		siteMember("b", "b:1", "", false),   // new
		siteMember("c", "c:1", "c1", false), // caught-up non-voter
		siteMember("d", "d:2", "c1", false), // voter at a new address
		siteMember("x", "x:1", "c2", false), // another cluster
	}
	c := &reconciler{self: "a", log: slog.New(logs), raft: r, ids: fakeIDs("c1"), members: members, refused: &refusals{},
		rpc: statusBook{"c:api": {Name: "c", ClusterID: "c1", AppliedIndex: 100}}, verify: v.verify}
	const failing = "site failed verification"
	for range 5 {
		if err := c.reconcile(); err != nil {
			t.Fatal(err)
		}
	}
	if len(r.changes) != 0 {
		t.Fatalf("changes %q while every member fails verification", r.changes)
	}
	if n := logs.count(slog.LevelError, failing); n != 3 {
		t.Fatalf("%d failures logged over 5 rounds, want 3 (one per member):\n%s", n, logs.texts())
	}
	// Another error for b is logged once more; c passes and is promoted.
	v.set("b", errors.New("dial tcp b:1: connection refused"))
	v.set("c", nil)
	for range 3 {
		if err := c.reconcile(); err != nil {
			t.Fatal(err)
		}
	}
	if n := logs.count(slog.LevelError, failing); n != 4 {
		t.Fatalf("%d failures logged, want 4:\n%s", n, logs.texts())
	}
	if !slices.Equal(r.changes, []string{"voter c c:1", "voter c c:1", "voter c c:1"}) { // the fake configuration does not change
		t.Fatalf("changes %q, want c promoted", r.changes)
	}
	if logs.count(slog.LevelInfo, "passed verification") != 1 {
		t.Fatalf("c's pass not logged once:\n%s", logs.texts())
	}
	r.changes = nil
	r.servers = []raft.Server{voter("a", "a:1"), voter("c", "c:1"), voter("d", "d:1")}
	v.set("b", nil)
	v.set("d", nil)
	if err := c.reconcile(); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(r.changes, []string{"nonvoter b b:1", "voter d d:2"}) {
		t.Fatalf("changes %q once b and d pass", r.changes)
	}
	// Failing again after a pass is news again.
	r.changes = nil
	v.set("b", errCert)
	r.servers = []raft.Server{voter("a", "a:1")}
	if err := c.reconcile(); err != nil {
		t.Fatal(err)
	}
	if slices.Contains(r.changes, "nonvoter b b:1") || logs.count(slog.LevelError, failing) != 5 {
		t.Fatalf("changes %q, log:\n%s", r.changes, logs.texts())
	}
	if v.called("x") {
		t.Fatal("a member of another cluster reached VerifyPeer")
	}

	// A leader that knows no cluster ID yet verifies nobody advertising one.
	v2 := &verifyScript{fail: map[string]error{}}
	r2 := &recordingRaft{servers: []raft.Server{voter("a", "a:1")}}
	c2 := &reconciler{self: "a", log: slog.New(slog.DiscardHandler), raft: r2, ids: fakeIDs(""),
		members: fixedMembers{siteMember("y", "y:1", "c9", false)}, refused: &refusals{}, rpc: statusBook{}, verify: v2.verify}
	if err := c2.reconcile(); err != nil {
		t.Fatal(err)
	}
	if v2.called("y") || len(r2.changes) != 0 {
		t.Fatalf("a member of a possibly foreign cluster was verified (%v) or added (%q)", v2.calls, r2.changes)
	}
}
