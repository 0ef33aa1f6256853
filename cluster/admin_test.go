package cluster

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// scriptRaft is an adminRaft that records what it was asked.
type scriptRaft struct {
	mu      sync.Mutex
	servers []raft.Server
	calls   []string
	err     error
}

func (r *scriptRaft) record(s string) {
	r.mu.Lock()
	r.calls = append(r.calls, s)
	r.mu.Unlock()
}

func (r *scriptRaft) GetConfiguration() raft.ConfigurationFuture {
	return servedConfig{raft.Configuration{Servers: r.servers}}
}
func (r *scriptRaft) RemoveServer(id raft.ServerID, _ uint64, _ time.Duration) raft.IndexFuture {
	r.record("remove " + string(id))
	return errFuture{err: r.err}
}
func (r *scriptRaft) LeadershipTransfer() raft.Future {
	r.record("transfer")
	return errFuture{err: r.err}
}
func (r *scriptRaft) LeadershipTransferToServer(id raft.ServerID, _ raft.ServerAddress) raft.Future {
	r.record("transfer " + string(id))
	return errFuture{err: r.err}
}

// scriptGossip is a gossipLeaver and jsonPoster that record their calls
// in the same script as the Raft calls.
type scriptGossip struct {
	r       *scriptRaft
	leave   error
	postErr []error // successive answers of postJSON; the last repeats
}

type gossipOf struct{ g *scriptGossip }

func (l gossipOf) leave(time.Duration) error { l.g.r.record("leave gossip"); return l.g.leave }

type posterOf struct{ g *scriptGossip }

func (p posterOf) postJSON(_ context.Context, addr, path string, in any) error {
	p.g.r.record("post " + addr + path + " " + in.(siteRequest).Site)
	err := p.g.postErr[0]
	if len(p.g.postErr) > 1 {
		p.g.postErr = p.g.postErr[1:]
	}
	return err
}

func newScriptAdmin(leading bool, leader string, alive ...string) (*admin, *scriptRaft, *scriptGossip) {
	r := &scriptRaft{servers: []raft.Server{voter("a", "a:1"), voter("b", "b:1"), voter("c", "c:1")}}
	g := &scriptGossip{r: r, postErr: []error{nil}}
	book := fakeBook{}
	var ms fixedMembers
	for _, s := range alive {
		book[s] = true
		ms = append(ms, member{Name: s, Meta: siteMeta{Raft: s + ":1", API: s + ":1"}})
	}
	a := &admin{self: "a", log: slog.New(slog.DiscardHandler), raft: r, leader: &fakeLeadership{leading: leading, leaders: []string{leader}},
		book: book, members: ms, gossip: gossipOf{g}, rpc: posterOf{g}}
	return a, r, g
}

func TestAdminRemoveSite(t *testing.T) {
	ctx := context.Background()
	a, r, _ := newScriptAdmin(true, "a", "a", "b")
	if err := a.RemoveSite(ctx, "b"); !errors.Is(err, ErrInvalidRequest) {
		t.Fatalf("removing a live site: %v, want ErrInvalidRequest", err)
	}
	if err := a.RemoveSite(ctx, "a"); !errors.Is(err, ErrInvalidRequest) {
		t.Fatalf("removing this site: %v, want ErrInvalidRequest", err)
	}
	if err := a.RemoveSite(ctx, "z"); !errors.Is(err, ErrUnknownSite) {
		t.Fatalf("removing a non-member: %v, want ErrUnknownSite", err)
	}
	if err := a.RemoveSite(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(r.calls, []string{"remove c"}) {
		t.Fatalf("calls %q", r.calls)
	}
	// At a follower it asks the leader, retrying transient answers.
	f, r2, g := newScriptAdmin(false, "b", "a", "b")
	g.postErr = []error{ErrNotLeader, nil}
	if err := f.RemoveSite(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	want := []string{"post b:1" + pathRemoveServer + " c", "post b:1" + pathRemoveServer + " c"}
	if !slices.Equal(r2.calls, want) {
		t.Fatalf("calls %q, want %q", r2.calls, want)
	}
	// A final answer is not retried; no leader until ctx ends is.
	g.postErr = []error{ErrUnknownSite}
	if err := f.RemoveSite(ctx, "c"); !errors.Is(err, ErrUnknownSite) {
		t.Fatalf("final answer: %v", err)
	}
	n, _, _ := newScriptAdmin(false, "")
	tctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if err := n.RemoveSite(tctx, "c"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("without a leader: %v, want the deadline", err)
	}
}

// Leave at a follower leaves gossip first (so the leader does not add the
// site back), then has the leader remove it; a second Leave does nothing.
func TestAdminLeaveOrder(t *testing.T) {
	ctx := context.Background()
	a, r, _ := newScriptAdmin(false, "b", "a", "b")
	if err := a.Leave(ctx); err != nil {
		t.Fatal(err)
	}
	want := []string{"leave gossip", "post b:1" + pathRemoveServer + " a"}
	if !slices.Equal(r.calls, want) {
		t.Fatalf("calls %q, want %q", r.calls, want)
	}
	if !a.hasLeft() {
		t.Fatal("hasLeft after Leave")
	}
	if err := a.Leave(ctx); err != nil || len(r.calls) != len(want) {
		t.Fatalf("second Leave: %v, calls %q", err, r.calls)
	}
	// A failed gossip leave is reported and undone: the gossip loop may
	// rejoin.
	b, r3, g3 := newScriptAdmin(false, "b", "a", "b")
	g3.leave = errors.New("no route")
	if err := b.Leave(ctx); err == nil || b.hasLeft() {
		t.Fatalf("Leave with a failed gossip leave: %v, hasLeft %v", err, b.hasLeft())
	}
	if !slices.Equal(r3.calls, []string{"leave gossip"}) {
		t.Fatalf("calls %q", r3.calls)
	}
}

// A leader that leaves hands over leadership before anything else.
func TestAdminLeaveAsLeader(t *testing.T) {
	a, r, _ := newScriptAdmin(true, "a", "a", "b")
	r.err = raft.ErrLeadershipTransferInProgress
	err := a.Leave(context.Background())
	if !IsRetryable(err) || a.hasLeft() {
		t.Fatalf("Leave whose transfer failed: %v (retryable %v), hasLeft %v", err, IsRetryable(err), a.hasLeft())
	}
	if !slices.Equal(r.calls, []string{"transfer"}) {
		t.Fatalf("calls %q, want only the transfer", r.calls)
	}
}

func TestAdminLiveVoter(t *testing.T) {
	a, _, _ := newScriptAdmin(true, "a", "a", "b", "z")
	for site, want := range map[string]bool{"b": true, "c": false /* not in gossip */, "z": false /* not a voter */} {
		if got := a.isLiveVoter(site); got != want {
			t.Errorf("isLiveVoter(%s) = %v, want %v", site, got, want)
		}
	}
	a.raft.(*scriptRaft).servers[1].Suffrage = raft.Nonvoter
	if a.isLiveVoter("b") {
		t.Error("a non-voter is a live voter")
	}
}

// The admin endpoints: a malformed body is ErrInvalidRequest at the caller, a
// non-member ErrUnknownSite, a follower's answer retryable.
func TestAdminEndpoints(t *testing.T) {
	serve := func(a *admin) (string, *rpcClient) {
		mux := http.NewServeMux()
		mux.HandleFunc("POST "+pathRemoveServer, a.handleRemoveServer)
		mux.HandleFunc("POST "+pathTransfer, a.handleTransfer)
		srv := httptest.NewServer(mux)
		t.Cleanup(srv.Close)
		return srv.Listener.Addr().String(), &rpcClient{http: srv.Client()}
	}
	ctx := context.Background()
	leader, r, _ := newScriptAdmin(true, "a", "a")
	addr, c := serve(leader)
	for _, path := range []string{pathRemoveServer, pathTransfer} {
		if err := c.postJSON(ctx, addr, path, "not an object"); !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("%s with a malformed body: %v, want ErrInvalidRequest", path, err)
		}
		if err := c.postJSON(ctx, addr, path, siteRequest{Site: "z"}); !errors.Is(err, ErrUnknownSite) {
			t.Errorf("%s of a non-member: %v, want ErrUnknownSite", path, err)
		}
	}
	if err := c.postJSON(ctx, addr, pathRemoveServer, siteRequest{Site: "c"}); err != nil {
		t.Fatal(err)
	}
	if err := c.postJSON(ctx, addr, pathTransfer, siteRequest{Site: "b"}); err != nil {
		t.Fatal(err)
	}
	if want := []string{"remove c", "transfer b"}; !slices.Equal(r.calls, want) {
		t.Fatalf("calls %q, want %q", r.calls, want)
	}
	follower, _, _ := newScriptAdmin(false, "b", "a")
	faddr, fc := serve(follower)
	if err := fc.postJSON(ctx, faddr, pathTransfer, siteRequest{Site: "b"}); !IsRetryable(err) {
		t.Fatalf("transfer at a follower: %v, want retryable", err)
	}
}
