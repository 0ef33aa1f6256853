package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/robib/robib/fsm"
)

// Retry classification: every error a role returns is either retryable
// (the same command may be proposed again: IsRetryable) or final, and the
// class survives the trip over the internal endpoints.

// errFuture is a raft.Future (and ApplyFuture, IndexFuture) that is done.
type errFuture struct {
	err  error
	resp any
}

func (f errFuture) Error() error  { return f.err }
func (f errFuture) Index() uint64 { return 0 }
func (f errFuture) Response() any { return f.resp }
func (f errFuture) Configuration() raft.Configuration {
	return raft.Configuration{Servers: []raft.Server{{Suffrage: raft.Voter, ID: "a", Address: "a"}, {Suffrage: raft.Voter, ID: "b", Address: "b"}}}
}

// fakeRaft answers every call with the errors the test sets.
type fakeRaft struct {
	term      uint64
	termAfter uint64 // CurrentTerm's answer after VerifyLeader (0: term)
	verified  bool
	verifyErr error
	barrier   error
	apply     errFuture
	config    error
	change    error // RemoveServer, LeadershipTransfer*
}

func (f *fakeRaft) CurrentTerm() uint64 {
	if f.verified && f.termAfter != 0 {
		return f.termAfter
	}
	return f.term
}
func (f *fakeRaft) VerifyLeader() raft.Future         { f.verified = true; return errFuture{err: f.verifyErr} }
func (f *fakeRaft) Barrier(time.Duration) raft.Future { return errFuture{err: f.barrier} }
func (f *fakeRaft) Apply([]byte, time.Duration) raft.ApplyFuture {
	return f.apply
}
func (f *fakeRaft) LeadershipTransfer() raft.Future { return errFuture{err: f.change} }
func (f *fakeRaft) LeadershipTransferToServer(raft.ServerID, raft.ServerAddress) raft.Future {
	return errFuture{err: f.change}
}
func (f *fakeRaft) GetConfiguration() raft.ConfigurationFuture { return errFuture{err: f.config} }
func (f *fakeRaft) RemoveServer(raft.ServerID, uint64, time.Duration) raft.IndexFuture {
	return errFuture{err: f.change}
}

// fakeLeases is a lease table and applied index.
type fakeLeases map[string]fsm.Lease

func (f fakeLeases) Lease(v string) (fsm.Lease, bool) { l, ok := f[v]; return l, ok }
func (f fakeLeases) AppliedIndex() uint64             { return 42 }

// fakeLocalProposer answers applyLocal with a set result.
type fakeLocalProposer struct {
	res *fsm.Result
	err error
}

func (p fakeLocalProposer) applyLocal(context.Context, fsm.Command, []byte, string) (*fsm.Result, error) {
	return p.res, p.err
}
func (p fakeLocalProposer) ApplyAndWait(context.Context, fsm.Command) (*fsm.Result, error) {
	return p.res, p.err
}

func fakeArbiter(leading bool, r *fakeRaft, leases fakeLeases, prop leaderProposer) *leaseArbiter {
	now := time.Unix(1000, 0)
	return &leaseArbiter{self: "a", ttl: time.Second, log: slog.New(slog.DiscardHandler), raft: r, state: leases, prop: prop,
		leader: &fakeLeadership{leading: leading, leaders: []string{"a"}}, book: fakeBook{}, now: func() time.Time { return now }}
}

type classified struct {
	name      string
	err       error
	retryable bool
	is        error // a sentinel it must wrap (nil: none checked)
}

func checkClassified(t *testing.T, cases []classified) {
	t.Helper()
	for _, c := range cases {
		if c.err == nil {
			t.Errorf("%s: no error", c.name)
			continue
		}
		if got := IsRetryable(c.err); got != c.retryable {
			t.Errorf("%s: IsRetryable(%v) = %v, want %v", c.name, c.err, got, c.retryable)
		}
		if c.is != nil && !errors.Is(c.err, c.is) {
			t.Errorf("%s: %v does not wrap %v", c.name, c.err, c.is)
		}
	}
}

func TestRetryClassificationSentinels(t *testing.T) {
	_, _, noLeader := leaderAPI(&fakeLeadership{leaders: []string{""}}, fakeBook{})
	_, _, noAddr := leaderAPI(&fakeLeadership{leaders: []string{"b"}}, fakeBook{})
	checkClassified(t, []classified{
		{"ErrNoLeader", ErrNoLeader, true, ErrRetry},
		{"ErrNotLeader", ErrNotLeader, true, ErrRetry},
		{"ErrUnreachable", ErrUnreachable, true, ErrRetry},
		{"leaderAPI without a leader", noLeader, true, ErrNoLeader},
		{"leaderAPI without the leader's address", noAddr, true, ErrNoLeader},
		{"deadline", context.DeadlineExceeded, true, nil},
		{"wrapped deadline", fmt.Errorf("x: %w", context.DeadlineExceeded), true, nil},
		{"fsm.ErrSeqGap", fsm.ErrSeqGap, true, nil},
		{"fsm.ErrFailed", fsm.ErrFailed, true, nil},
		{"ErrClosed", ErrClosed, false, nil},
		{"ErrLeaseHeld", ErrLeaseHeld, false, nil},
		{"ErrLeaseLost", ErrLeaseLost, false, nil},
		{"ErrInvalidRequest", ErrInvalidRequest, false, nil},
		{"ErrUnknownSite", ErrUnknownSite, false, nil},
		{"ErrForeignCluster", ErrForeignCluster, false, nil},
		{"canceled", context.Canceled, false, nil},
		{"fsm.ErrStaleEpoch", fsm.ErrStaleEpoch, false, nil},
		{"fsm.ErrUnknownVolume", fsm.ErrUnknownVolume, false, nil},
		{"fsm.ErrLeaseConflict", fsm.ErrLeaseConflict, false, nil},
		{"fsm.ErrClosed", fsm.ErrClosed, false, nil},
	})
	if IsRetryable(nil) {
		t.Error("IsRetryable(nil)")
	}
}

func TestRetryClassificationRaftErrors(t *testing.T) {
	var cases []classified
	for _, e := range []error{raft.ErrNotLeader, raft.ErrLeadershipLost, raft.ErrLeadershipTransferInProgress, raft.ErrEnqueueTimeout, raft.ErrAbortedByRestore} {
		cases = append(cases, classified{"raft " + e.Error(), raftErr(e), true, ErrNotLeader})
	}
	cases = append(cases,
		classified{"raft shutdown", raftErr(raft.ErrRaftShutdown), false, ErrClosed},
		classified{"other raft error", raftErr(raft.ErrUnsupportedProtocol), false, raft.ErrUnsupportedProtocol},
	)
	checkClassified(t, cases)
}

func TestRetryClassificationProposer(t *testing.T) {
	data, _ := fsm.Encode(&fsm.EndSession{Session: 1})
	local := func(f errFuture, ctx context.Context) error {
		p := &proposer{self: "a", log: slog.New(slog.DiscardHandler), raft: &fakeRaft{apply: f}, leader: &fakeLeadership{leading: true, leaders: []string{"a"}},
			stop: make(chan struct{}), seq: newSequencer(time.Millisecond)}
		_, err := p.applyLocal(ctx, &fsm.EndSession{Session: 1}, data, "a")
		return err
	}
	past, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	bg := context.Background()
	checkClassified(t, []classified{
		{"leadership lost while committing", local(errFuture{err: raft.ErrLeadershipLost}, bg), true, ErrNotLeader},
		{"not the leader", local(errFuture{err: raft.ErrNotLeader}, bg), true, ErrNotLeader},
		{"enqueue timeout", local(errFuture{err: raft.ErrEnqueueTimeout}, bg), true, ErrNotLeader},
		{"raft shut down", local(errFuture{err: raft.ErrRaftShutdown}, bg), false, ErrClosed},
		{"deadline already past", local(errFuture{resp: &fsm.Result{}}, past), true, context.DeadlineExceeded},
		{"unexpected FSM response", local(errFuture{resp: "nonsense"}, bg), false, nil},
	})
	// A verdict is not an error of the proposal: it comes back in the result.
	p := &proposer{self: "a", log: slog.New(slog.DiscardHandler), raft: &fakeRaft{apply: errFuture{resp: &fsm.Result{Index: 9, Err: fsm.ErrUnknownVolume}}},
		leader: &fakeLeadership{leading: true, leaders: []string{"a"}}, stop: make(chan struct{}), seq: newSequencer(time.Millisecond)}
	res, err := p.Apply(bg, &fsm.EndSession{Session: 1})
	if err != nil || res.Index != 9 || !errors.Is(res.Err, fsm.ErrUnknownVolume) {
		t.Fatalf("verdict: %+v, %v", res, err)
	}
	if _, err := p.ApplyAndWait(bg, &fsm.EndSession{Session: 1}); !errors.Is(err, fsm.ErrUnknownVolume) {
		t.Fatalf("ApplyAndWait returns the verdict: %v", err)
	}
	if _, err := p.Commit(bg, &fsm.WriteBatch{}); !errors.Is(err, ErrInvalidRequest) || IsRetryable(err) {
		t.Fatalf("an unencodable batch: %v, want ErrInvalidRequest (final)", err)
	}
}

func TestRetryClassificationLeases(t *testing.T) {
	held := fakeLeases{"v": {Holder: "b", Epoch: 3}}
	ok := fakeLocalProposer{res: &fsm.Result{Index: 7}}
	acq := func(a *leaseArbiter, site string) error {
		_, err := a.acquireLocal(context.Background(), leaseRequest{Volume: "v", Site: site})
		return err
	}
	ren := func(a *leaseArbiter, site string, epoch uint64) error {
		return a.renewLocal(leaseRequest{Volume: "v", Site: site, Epoch: epoch})
	}
	_, readNotLeader := fakeArbiter(false, &fakeRaft{}, held, ok).readIndexLocal()
	_, readBarrier := fakeArbiter(true, &fakeRaft{barrier: raft.ErrLeadershipLost}, held, ok).readIndexLocal()
	checkClassified(t, []classified{
		{"acquire at a follower", acq(fakeArbiter(false, &fakeRaft{}, held, ok), "c"), true, ErrNotLeader},
		{"acquire of a renewed lease", acq(fakeArbiter(true, &fakeRaft{term: 2}, held, ok), "c"), false, ErrLeaseHeld},
		{"acquire racing another acquisition", acq(fakeArbiter(true, &fakeRaft{term: 2}, fakeLeases{}, fakeLocalProposer{res: &fsm.Result{Err: fsm.ErrLeaseConflict}}), "c"), true, ErrRetry},
		{"acquire of another incarnation", acq(fakeArbiter(true, &fakeRaft{term: 2}, fakeLeases{}, fakeLocalProposer{res: &fsm.Result{Err: fsm.ErrUnknownVolume}}), "c"), false, fsm.ErrUnknownVolume},
		{"acquire whose proposal lost leadership", acq(fakeArbiter(true, &fakeRaft{term: 2}, fakeLeases{}, fakeLocalProposer{err: raftErr(raft.ErrLeadershipLost)}), "c"), true, ErrNotLeader},
		{"renew at a follower", ren(fakeArbiter(false, &fakeRaft{}, held, ok), "b", 3), true, ErrNotLeader},
		{"renew at a deposed leader", ren(fakeArbiter(true, &fakeRaft{term: 2, verifyErr: raft.ErrNotLeader}, held, ok), "b", 3), true, ErrNotLeader},
		{"renew while leadership is lost", ren(fakeArbiter(true, &fakeRaft{term: 2, verifyErr: raft.ErrLeadershipLost}, held, ok), "b", 3), true, ErrNotLeader},
		{"renew across a term change", ren(fakeArbiter(true, &fakeRaft{term: 2, termAfter: 3}, held, ok), "b", 3), true, ErrNotLeader},
		{"renew of a later epoch's lease", ren(fakeArbiter(true, &fakeRaft{term: 2}, held, ok), "b", 2), false, ErrLeaseLost},
		{"renew of another holder's epoch", ren(fakeArbiter(true, &fakeRaft{term: 2}, held, ok), "c", 3), false, ErrLeaseLost},
		{"read index at a follower", readNotLeader, true, ErrNotLeader},
		{"read index whose barrier lost leadership", readBarrier, true, ErrNotLeader},
	})
	// The holder's own lease is taken again at once, at the next epoch;
	// renewals of the current epoch, or of one not applied yet, succeed.
	a := fakeArbiter(true, &fakeRaft{term: 2}, held, ok)
	if g, err := a.acquireLocal(context.Background(), leaseRequest{Volume: "v", Site: "b"}); err != nil || g.Epoch != 4 || g.Index != 7 {
		t.Fatalf("re-acquire by the holder: %+v, %v", g, err)
	}
	for _, epoch := range []uint64{3, 4} {
		if err := ren(fakeArbiter(true, &fakeRaft{term: 2}, held, ok), "b", epoch); err != nil {
			t.Fatalf("renew epoch %d: %v", epoch, err)
		}
	}
}

func TestRetryClassificationAdminAndMembership(t *testing.T) {
	adm := func(leading bool, r *fakeRaft) *admin {
		return &admin{self: "a", log: slog.New(slog.DiscardHandler), raft: r, leader: &fakeLeadership{leading: leading, leaders: []string{"a"}}, book: fakeBook{}}
	}
	checkClassified(t, []classified{
		{"remove at a follower", adm(false, &fakeRaft{}).removeServerLocal("b"), true, ErrNotLeader},
		{"remove of a non-member", adm(true, &fakeRaft{}).removeServerLocal("z"), false, ErrUnknownSite},
		{"remove, configuration unreadable", adm(true, &fakeRaft{config: raft.ErrLeadershipLost}).removeServerLocal("b"), true, ErrNotLeader},
		{"remove that lost leadership", adm(true, &fakeRaft{change: raft.ErrLeadershipLost}).removeServerLocal("b"), true, ErrNotLeader},
		{"transfer at a follower", adm(false, &fakeRaft{}).transferLocal("b"), true, ErrNotLeader},
		{"transfer to a non-member", adm(true, &fakeRaft{}).transferLocal("z"), false, ErrUnknownSite},
		{"remove of this site by name", adm(true, &fakeRaft{}).RemoveSite(context.Background(), "a"), false, ErrInvalidRequest},
	})
	gossipOpen := func(addr string) error {
		m := newTestMembership(t, "")
		m.cfg.GossipAddr = addr
		return m.open()
	}
	checkClassified(t, []classified{
		{"gossip address without a port", gossipOpen("10.0.0.1"), false, ErrInvalidRequest},
		{"gossip address with a bad port", gossipOpen("10.0.0.1:gossip"), false, ErrInvalidRequest},
		{"foreign member", (&delegate{m: newTestMembership(t, "c1")}).checkPeer(gossipPeer(t, "x", "10.0.0.2", siteMeta{Raft: "x:1", Cluster: "c2"}), "test"), false, ErrForeignCluster},
	})
	if err := adm(true, &fakeRaft{}).transferLocal("a"); err != nil {
		t.Fatalf("transfer to the leader itself: %v", err)
	}
}

// The apply endpoint and its client keep the class: a receiver that is not
// the leader, or whose proposal failed retryably or is closing, answers
// "retry" (ErrNotLeader at the sender); an FSM verdict comes back as the
// same sentinel in the result; a dead or garbled peer is ErrUnreachable.
func TestRetryClassificationApplyWire(t *testing.T) {
	serve := func(t *testing.T, leading bool, f errFuture) string {
		p := &proposer{self: "b", log: slog.New(slog.DiscardHandler), raft: &fakeRaft{apply: f}, leader: &fakeLeadership{leading: leading, leaders: []string{"b"}},
			stop: make(chan struct{}), seq: newSequencer(time.Millisecond)}
		srv := httptest.NewServer(http.HandlerFunc(p.handleApply))
		t.Cleanup(srv.Close)
		return srv.Listener.Addr().String()
	}
	c := &rpcClient{http: http.DefaultClient}
	data, _ := fsm.Encode(&fsm.EndSession{Session: 1})
	call := func(addr string, data []byte) (*fsm.Result, error) {
		res, _, err := c.apply(context.Background(), addr, "a", data)
		return res, err
	}
	_, follower := call(serve(t, false, errFuture{}), data)
	_, lost := call(serve(t, true, errFuture{err: raft.ErrLeadershipLost}), data)
	_, closing := call(serve(t, true, errFuture{err: raft.ErrRaftShutdown}), data)
	_, dead := call(freePort(t), data)
	garbled := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("<html>")) }))
	defer garbled.Close()
	_, garbledErr := call(garbled.Listener.Addr().String(), data)
	checkClassified(t, []classified{
		{"forward to a follower", follower, true, ErrNotLeader},
		{"forward whose proposal lost leadership", lost, true, ErrNotLeader},
		{"forward to a closing leader", closing, true, ErrNotLeader},
		{"forward to a dead site", dead, true, ErrUnreachable},
		{"forward answered with garbage", garbledErr, true, ErrUnreachable},
	})
	for _, verdict := range []error{fsm.ErrUnknownVolume, fsm.ErrStaleEpoch, fsm.ErrSeqGap, fsm.ErrFailed} {
		res, err := call(serve(t, true, errFuture{resp: &fsm.Result{Index: 5, Err: fmt.Errorf("%w: detail", verdict)}}), data)
		if err != nil || res.Index != 5 || !errors.Is(res.Err, verdict) || IsRetryable(res.Err) != IsRetryable(verdict) {
			t.Errorf("verdict %v: %+v, %v", verdict, res, err)
		}
	}
	// Bad input: an undecodable command is the FSM's final verdict; a body
	// over the limit is refused.
	res, err := call(serve(t, true, errFuture{}), []byte("garbage"))
	if err != nil || !errors.Is(res.Err, fsm.ErrBadCommand) || IsRetryable(res.Err) {
		t.Errorf("undecodable command: %+v, %v", res, err)
	}
	addr := serve(t, true, errFuture{})
	resp, err := http.Post("http://"+addr+pathApply, "application/octet-stream", bytes.NewReader(make([]byte, maxForwardBody+1)))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("oversized forward: %s, want 400", resp.Status)
	}
}

// The lease endpoints and their client keep the class and the sentinel of
// every error the arbiter returns.
func TestRetryClassificationLeaseWire(t *testing.T) {
	for _, e := range []error{
		fmt.Errorf("%w: volume v is attached read-write at site b", ErrLeaseHeld),
		fmt.Errorf("%w: volume v: site a held epoch 1", ErrLeaseLost),
		ErrNotLeader, raftErr(raft.ErrLeadershipLost), ErrNoLeader, ErrClosed,
		fmt.Errorf("%w: %v", ErrRetry, fsm.ErrLeaseConflict),
		fsm.ErrUnknownVolume, fsm.ErrStaleEpoch, context.DeadlineExceeded, errors.New("something else"),
	} {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			writeJSON(w, http.StatusOK, leaseReply{Code: leaseCode(e), Error: e.Error()})
		}))
		_, got := (&rpcClient{http: srv.Client()}).lease(context.Background(), srv.Listener.Addr().String(), pathLeaseRenew, leaseRequest{})
		srv.Close()
		if got == nil {
			t.Errorf("%v: no error at the caller", e)
			continue
		}
		// ErrClosed at the leader is retryable for the caller: another
		// leader will answer.
		want := IsRetryable(e) || errors.Is(e, ErrClosed)
		if IsRetryable(got) != want {
			t.Errorf("%v: caller got %v, IsRetryable %v, want %v", e, got, !want, want)
		}
		for _, s := range []error{ErrLeaseHeld, ErrLeaseLost, fsm.ErrUnknownVolume, fsm.ErrStaleEpoch} {
			if errors.Is(e, s) && !errors.Is(got, s) {
				t.Errorf("%v: caller got %v, which lost %v", e, got, s)
			}
		}
		if strings.Count(got.Error(), ErrLeaseHeld.Error()) > 1 || strings.Count(got.Error(), ErrLeaseLost.Error()) > 1 {
			t.Errorf("%v: message repeats its sentinel: %v", e, got)
		}
	}
	// Bad input: a malformed request is answered "invalid", not retried.
	a := fakeArbiter(true, &fakeRaft{}, fakeLeases{}, fakeLocalProposer{})
	srv := httptest.NewServer(http.HandlerFunc(a.handleLease))
	defer srv.Close()
	resp, err := http.Post(srv.URL+pathLeaseRenew, "application/json", strings.NewReader("{not json"))
	if err != nil {
		t.Fatal(err)
	}
	var rep leaseReply
	_ = json.NewDecoder(resp.Body).Decode(&rep)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || rep.Code != "invalid" {
		t.Errorf("malformed lease request: %s %+v, want 400 invalid", resp.Status, rep)
	}
}

// The admin endpoints' statuses keep the class (postJSON).
func TestRetryClassificationAdminWire(t *testing.T) {
	for _, e := range []error{ErrNotLeader, raftErr(raft.ErrLeadershipLost), fmt.Errorf("%w: z", ErrUnknownSite), fmt.Errorf("%w: x", ErrInvalidRequest), errors.New("boom")} {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			writeJSON(w, statusFor(e), map[string]string{"error": e.Error()})
		}))
		got := (&rpcClient{http: srv.Client()}).postJSON(context.Background(), srv.Listener.Addr().String(), pathRemoveServer, siteRequest{Site: "z"})
		srv.Close()
		if got == nil || IsRetryable(got) != IsRetryable(e) {
			t.Errorf("%v: caller got %v", e, got)
		}
		for _, s := range []error{ErrUnknownSite, ErrInvalidRequest} {
			if errors.Is(e, s) && !errors.Is(got, s) {
				t.Errorf("%v: caller got %v, which lost %v", e, got, s)
			}
		}
	}
	if err := (&rpcClient{http: http.DefaultClient}).postJSON(context.Background(), freePort(t), pathTransfer, siteRequest{}); !errors.Is(err, ErrUnreachable) {
		t.Errorf("post to a dead site: %v, want ErrUnreachable", err)
	}
}
