package cluster

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/robib/robib/fsm"
)

// asPeer is an HTTP client transport that sends every request as site
// (in the Test-Peer header, which testPeerName reads like an agent reads a
// verified client certificate); "" sends no identity.
type asPeer struct{ site string }

func (p asPeer) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	if p.site != "" {
		r.Header.Set("Test-Peer", p.site)
	}
	return http.DefaultTransport.RoundTrip(r)
}

func testPeerName(r *http.Request) (string, bool) {
	s := r.Header.Get("Test-Peer")
	return s, s != ""
}

// recordingOrigins records the origin of every write batch proposed.
type recordingOrigins struct {
	mu   sync.Mutex
	seen []string
}

func (o *recordingOrigins) note(site string) {
	o.mu.Lock()
	o.seen = append(o.seen, site)
	o.mu.Unlock()
}

// peerTestNode is a leading site "a" whose roles are fakes, behind the
// real Handler: b is alive, c is dead; volume v's lease is b's at epoch 3.
type peerTestNode struct {
	addr     string
	barriers int // handlers run one at a time in these tests
	raft     *countingRaft
	admin    *scriptRaft
	origins  *recordingOrigins
}

func newPeerTestNode(t *testing.T, cfg Config) *peerTestNode {
	t.Helper()
	p := &peerTestNode{raft: &countingRaft{resp: &fsm.Result{Index: 7}}, origins: &recordingOrigins{}}
	prop := leaderProposerOver(p.raft, p.origins)
	leases := fakeLeases{"v": {Holder: "b", Epoch: 3}}
	prop.leases = leases
	// The barrier applies b's acquisition of epoch 4, committed but not
	// yet applied when the first batch at epoch 4 arrives.
	prop.barrier = barrierFunc(func() {
		p.barriers++
		if l := leases["v"]; l.Epoch == 3 {
			leases["v"] = fsm.Lease{Holder: "b", Epoch: 4}
		}
	})
	adm, sr, _ := newScriptAdmin(true, "a", "a", "b")
	p.admin = sr
	n := &Node{cfg: cfg, prop: prop, admin: adm,
		leases: fakeArbiter(true, &fakeRaft{term: 1}, fakeLeases{}, fakeLocalProposer{res: &fsm.Result{Index: 9}})}
	srv := httptest.NewServer(n.Handler())
	t.Cleanup(srv.Close)
	p.addr = srv.Listener.Addr().String()
	return p
}

// barrierFunc is a barrierRaft that runs f and succeeds.
type barrierFunc func()

func (f barrierFunc) Barrier(time.Duration) raft.Future { f(); return errFuture{} }

func clientAs(site string) *rpcClient { return &rpcClient{http: &http.Client{Transport: asPeer{site}}} }

func encoded(t *testing.T, cmd fsm.Command) []byte {
	t.Helper()
	b, err := fsm.Encode(cmd)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Every internal request that acts for a site must come from that site:
// forwarded proposals (origin, lease commands, write batches under a
// lease), lease acquisitions and renewals, removals of live sites. A
// mismatch is refused with ErrForbidden before anything is proposed.
func TestInternalHandlerRefusesMismatchedSiteClaims(t *testing.T) {
	ctx := context.Background()
	p := newPeerTestNode(t, Config{PeerName: testPeerName})
	batch := func(epoch uint64) []byte {
		return encoded(t, &fsm.WriteBatch{Volume: "v", Session: 1, Seq: 1, Epoch: epoch, Ops: []fsm.Op{{Kind: fsm.OpWrite, Len: 1, Data: []byte{1}}}})
	}
	create := encoded(t, &fsm.CreateVolume{Name: "w", Size: 1 << 20, BlockSize: 4096, Created: 1})
	applies := func() int { n, _ := p.raft.counts(); return n }

	for _, c := range []struct {
		name, from, origin string
		data               []byte
		want               error // nil: proposed
	}{
		{"release of b's lease from a", "a", "a", encoded(t, &fsm.ReleaseLease{Volume: "v", Site: "b", Epoch: 3}), ErrForbidden},
		{"acquire for b from a", "a", "", encoded(t, &fsm.AcquireLease{Volume: "v", Site: "b", Prev: 3}), ErrForbidden},
		{"origin b from a", "a", "b", create, ErrForbidden},
		{"b's batch from a", "a", "", batch(3), ErrForbidden},
		{"b's batch from a claiming b", "a", "b", batch(3), ErrForbidden},
		{"b's batch from b", "b", "b", batch(3), nil},
		{"b's batch from b without origin", "b", "", batch(3), nil},
		{"a stale batch goes to the FSM", "a", "a", batch(2), nil},
		{"b's batch at an epoch applied only after a barrier, from a", "a", "a", batch(4), ErrForbidden},
		{"b's batch at that epoch from b", "b", "b", batch(4), nil},
		{"a forged epoch goes to the FSM", "a", "a", batch(9), nil},
		{"an unleased batch", "a", "a", batch(0), nil},
		{"own release", "b", "b", encoded(t, &fsm.ReleaseLease{Volume: "v", Site: "b", Epoch: 3}), nil},
		{"a command for no site", "c", "c", create, nil},
	} {
		before := applies()
		res, _, err := clientAs(c.from).apply(ctx, p.addr, c.origin, c.data)
		switch {
		case c.want == nil && (err != nil || res.Index != 7):
			t.Errorf("%s: %+v, %v; want it proposed", c.name, res, err)
		case c.want != nil && !errors.Is(err, c.want):
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		case c.want == ErrForbidden && !strings.Contains(err.Error(), `"`+c.from+`" may not`):
			t.Errorf("%s: %v does not name the sender", c.name, err)
		}
		if proposed := applies() > before; proposed != (c.want == nil) {
			t.Errorf("%s: proposed %v", c.name, proposed)
		}
	}
	// Batches are counted under the site they come from, whatever the
	// header says.
	p.origins.mu.Lock()
	seen := slices.Clone(p.origins.seen)
	p.origins.mu.Unlock()
	if !slices.Equal(seen, []string{"b", "b", "a", "b", "a", "a"}) {
		t.Errorf("origins %v", seen)
	}
	if p.barriers != 2 { // epoch 4 (then applied) and the forged 9
		t.Errorf("%d barriers", p.barriers)
	}

	rpcA := clientAs("a")
	for _, c := range []struct {
		name string
		path string
		req  leaseRequest
		want error
	}{
		{"acquire for b from a", pathLeaseAcquire, leaseRequest{Volume: "w", Site: "b", Created: 1}, ErrForbidden},
		{"renew b's lease from a", pathLeaseRenew, leaseRequest{Volume: "v", Site: "b", Epoch: 3}, ErrForbidden},
		{"acquire for itself", pathLeaseAcquire, leaseRequest{Volume: "w", Site: "a", Created: 1}, nil},
		{"read index", pathReadIndex, leaseRequest{}, nil},
	} {
		if _, err := rpcA.lease(ctx, p.addr, c.path, c.req); (c.want == nil) != (err == nil) || (c.want != nil && !errors.Is(err, c.want)) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}

	for _, c := range []struct {
		name, site string
		want       error
	}{
		{"a removes live b", "b", ErrForbidden},
		{"a removes dead c", "c", nil},
		{"a removes itself", "a", nil},
	} {
		if err := rpcA.postJSON(ctx, p.addr, pathRemoveServer, siteRequest{Site: c.site}); (c.want == nil) != (err == nil) || (c.want != nil && !errors.Is(err, c.want)) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
	if err := rpcA.postJSON(ctx, p.addr, pathTransfer, siteRequest{Site: "b"}); err != nil {
		t.Errorf("a transfer to b (no claim): %v", err)
	}
	p.admin.mu.Lock()
	calls := slices.Clone(p.admin.calls)
	p.admin.mu.Unlock()
	if !slices.Equal(calls, []string{"remove c", "remove a", "transfer b"}) {
		t.Errorf("raft was asked %q", calls)
	}
}

// Without PeerName (insecure mode) nothing is checked; with RequirePeer a
// request from no site identity is refused whatever it asks.
func TestInternalHandlerPeerModes(t *testing.T) {
	ctx := context.Background()
	release := encoded(t, &fsm.ReleaseLease{Volume: "v", Site: "b", Epoch: 3})

	open := newPeerTestNode(t, Config{})
	if _, _, err := clientAs("a").apply(ctx, open.addr, "b", release); err != nil {
		t.Fatalf("insecure mode: %v", err)
	}
	known := newPeerTestNode(t, Config{PeerName: testPeerName})
	if _, _, err := clientAs("").apply(ctx, known.addr, "b", release); err != nil {
		t.Fatalf("unknown sender without RequirePeer: %v", err)
	}

	strict := newPeerTestNode(t, Config{PeerName: testPeerName, RequirePeer: true})
	anon := clientAs("")
	if _, _, err := anon.apply(ctx, strict.addr, "", encoded(t, &fsm.CreateVolume{Name: "w", Size: 1 << 20, BlockSize: 4096, Created: 1})); !errors.Is(err, ErrForbidden) {
		t.Fatalf("apply from no identity: %v", err)
	}
	var s SiteStatus
	if err := anon.getJSON(ctx, strict.addr, pathLocalStatus, &s); !errors.Is(err, ErrForbidden) {
		t.Fatalf("status from no identity: %v", err)
	}
	if _, err := anon.lease(ctx, strict.addr, pathReadIndex, leaseRequest{}); !errors.Is(err, ErrForbidden) {
		t.Fatalf("read index from no identity: %v", err)
	}
	if err := anon.postJSON(ctx, strict.addr, pathTransfer, siteRequest{}); !errors.Is(err, ErrForbidden) {
		t.Fatalf("transfer from no identity: %v", err)
	}
	if _, _, err := anon.readRange(ctx, strict.addr, "v", 0, 4096, 0); !errors.Is(err, ErrForbidden) {
		t.Fatalf("peer read from no identity: %v", err)
	}
	if _, err := anon.repair(ctx, strict.addr, repairRequest{Version: 1, Volume: "v", Length: 4096, Sources: []string{"b"}}); !errors.Is(err, ErrForbidden) {
		t.Fatalf("repair request from no identity: %v", err)
	}
	if n, _ := strict.raft.counts(); n != 0 {
		t.Fatalf("%d proposals from no identity", n)
	}
	if _, err := clientAs("a").lease(ctx, strict.addr, pathReadIndex, leaseRequest{}); err != nil {
		t.Fatalf("read index from a site: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dial := func(context.Context, string) (net.Conn, error) { return nil, errors.New("no") }
	if _, err := Open(Config{RequirePeer: true, RaftListener: ln, Dial: dial, DataDir: t.TempDir()}, nil); !errors.Is(err, ErrInvalidRequest) {
		t.Fatalf("RequirePeer without PeerName: %v", err)
	}
}
