package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/robib/robib/fsm"
)

// A forward whose leader is cut off and steps down while the forward is in
// flight gets a retryable error, never a success; resent, the batch takes
// effect exactly once at every site.
func TestForwardDroppedAtLeaderChange(t *testing.T) {
	c := newRoleCluster(t, "a", "b", "c")
	c.createVolume()
	old := c.leader()
	from := c.follower(old)

	payload := bytes.Repeat([]byte("w"), 4096)
	batch := &fsm.WriteBatch{Volume: testVolume, Session: 7, Seq: 1, Ops: []fsm.Op{{Kind: fsm.OpWrite, Off: 8192, Len: int64(len(payload)), Data: payload}}}
	data, err := fsm.Encode(batch)
	if err != nil {
		t.Fatal(err)
	}

	// The leader can still be reached over HTTP but no longer over Raft:
	// it appends the forwarded entry and can never commit it.
	rec := &recordingForwarder{forwarder: from.prop.fwd}
	from.prop.fwd = rec
	last := old.raft.LastIndex()
	c.isolate(old)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := from.prop.Apply(ctx, batch)
	if err == nil {
		t.Fatalf("a forward to a leader cut off from the majority succeeded: %+v", res)
	}
	if got := rec.addrs(); len(got) != 1 || got[0] != old.api {
		t.Fatalf("forwards %v, want one to the old leader %s", got, old.api)
	}
	if old.raft.LastIndex() <= last {
		t.Fatalf("the old leader did not append the forwarded batch (last index %d)", last)
	}
	if !IsRetryable(err) {
		t.Fatalf("forward dropped at a leader change: %v is not retryable", err)
	}
	if !errors.Is(err, ErrNotLeader) {
		t.Fatalf("forward dropped at a leader change: %v, want ErrNotLeader", err)
	}

	// The writer resends until the new leader commits it.
	var idx uint64
	waitFor(t, "the resent batch to commit", 10*time.Second, func() bool {
		r, err := from.prop.Apply(ctx, batch)
		if err != nil {
			if !IsRetryable(err) {
				t.Fatalf("resend: %v", err)
			}
			return false
		}
		if r.Err != nil {
			t.Fatalf("resend: FSM verdict %v", r.Err)
		}
		idx = r.Index
		return true
	})
	if l := c.leader(c.sitesBut(old)...); l == old {
		t.Fatalf("the cut-off site %s still leads", old.name)
	}
	c.heal()
	c.leader()
	c.waitApplied(idx)

	for _, s := range c.order {
		// The old leader's copy was never committed: it was replaced,
		// not applied, and the resent one took effect once.
		copies, effective := s.fsm.counts(data)
		if copies != 1 || effective != 1 {
			t.Errorf("site %s: %d copies of the batch applied, %d took effect; want 1 and 1", s.name, copies, effective)
		}
		v, err := s.store.Get(testVolume)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(payload))
		if _, err := v.ReadAt(got, 8192); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, payload) {
			t.Errorf("site %s: volume does not hold the batch's data", s.name)
		}
	}
}

// sitesBut lists every site except s.
func (c *roleCluster) sitesBut(s *roleSite) []*roleSite {
	var out []*roleSite
	for _, o := range c.order {
		if o != s {
			out = append(out, o)
		}
	}
	return out
}

// recordingForwarder records the address of every forward.
type recordingForwarder struct {
	forwarder
	mu   sync.Mutex
	sent []string
}

func (r *recordingForwarder) apply(ctx context.Context, addr, origin string, data []byte) (*fsm.Result, time.Duration, error) {
	r.mu.Lock()
	r.sent = append(r.sent, addr)
	r.mu.Unlock()
	return r.forwarder.apply(ctx, addr, origin, data)
}

func (r *recordingForwarder) addrs() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.sent...)
}

// fakeLeadership is a leadership whose answers the test sets.
type fakeLeadership struct {
	mu      sync.Mutex
	leading bool
	leaders []string // successive answers of Leader; the last one repeats
}

func (f *fakeLeadership) IsLeader() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.leading
}

func (f *fakeLeadership) Leader() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	l := f.leaders[0]
	if len(f.leaders) > 1 {
		f.leaders = f.leaders[1:]
	}
	return l
}

func (f *fakeLeadership) set(leaders ...string) {
	f.mu.Lock()
	f.leaders = leaders
	f.mu.Unlock()
}

// fakeBook knows every site's API address as "<site>:1".
type fakeBook map[string]bool

func (b fakeBook) memberMeta(site string) (siteMeta, bool) {
	if !b[site] {
		return siteMeta{}, false
	}
	return siteMeta{API: site + ":1"}, true
}

// hangingForwarder never answers (a dead host) until ctx ends.
type hangingForwarder struct {
	sent chan string // receives the address of each forward
}

func (h *hangingForwarder) apply(ctx context.Context, addr, origin string, data []byte) (*fsm.Result, time.Duration, error) {
	h.sent <- addr
	<-ctx.Done()
	return nil, 0, ctx.Err()
}

func newFakeProposer(lead *fakeLeadership, fwd forwarder, watch *leaderWatch) *proposer {
	return newClosableProposer(lead, fwd, watch, make(chan struct{}))
}

func newClosableProposer(lead *fakeLeadership, fwd forwarder, watch *leaderWatch, stop chan struct{}) *proposer {
	return &proposer{self: "a", log: slog.New(slog.DiscardHandler), leader: lead, book: fakeBook{"b": true, "c": true},
		changes: watch, fwd: fwd, stop: stop, seq: newSequencer(time.Millisecond)}
}

// A forward to a leader that never answers is abandoned as soon as the
// leader changes, with a retryable error, long before the caller's
// deadline.
func TestForwardToVanishedLeaderAbandonedAtChange(t *testing.T) {
	lead := &fakeLeadership{leaders: []string{"b"}}
	fwd := &hangingForwarder{sent: make(chan string, 1)}
	watch := newLeaderWatch()
	p := newFakeProposer(lead, fwd, watch)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		_, err := p.Apply(ctx, &fsm.EndSession{Session: 1})
		errc <- err
	}()
	if addr := <-fwd.sent; addr != "b:1" {
		t.Fatalf("forwarded to %s, want b:1", addr)
	}
	lead.set("c")
	watch.changedNow()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrNotLeader) || !IsRetryable(err) || !strings.Contains(err.Error(), "replaced while") {
			t.Fatalf("abandoned forward: %v, want a retryable ErrNotLeader", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the forward was not abandoned at the leader change")
	}
}

// The caller's own deadline or cancellation is reported as such, not as
// a leader change: a deadline is retryable, a cancellation is not.
func TestForwardCallerGivesUp(t *testing.T) {
	for _, tc := range []struct {
		name      string
		end       func(context.CancelFunc)
		ctx       func() (context.Context, context.CancelFunc)
		want      error
		retryable bool
	}{
		{"deadline", func(context.CancelFunc) {}, func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), 50*time.Millisecond)
		}, context.DeadlineExceeded, true},
		{"cancel", func(c context.CancelFunc) { c() }, func() (context.Context, context.CancelFunc) {
			return context.WithCancel(context.Background())
		}, context.Canceled, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fwd := &hangingForwarder{sent: make(chan string, 1)}
			p := newFakeProposer(&fakeLeadership{leaders: []string{"b"}}, fwd, newLeaderWatch())
			ctx, cancel := tc.ctx()
			defer cancel()
			errc := make(chan error, 1)
			go func() {
				_, err := p.Apply(ctx, &fsm.EndSession{Session: 1})
				errc <- err
			}()
			<-fwd.sent
			tc.end(cancel)
			err := <-errc
			if !errors.Is(err, tc.want) || errors.Is(err, ErrNotLeader) {
				t.Fatalf("got %v, want %v and not ErrNotLeader", err, tc.want)
			}
			if IsRetryable(err) != tc.retryable {
				t.Fatalf("IsRetryable(%v) = %v, want %v", err, !tc.retryable, tc.retryable)
			}
		})
	}
}

// A leader that changes between the lookup and the start of the watch is
// caught before anything is sent.
func TestForwardLeaderChangedBeforeSend(t *testing.T) {
	fwd := &hangingForwarder{sent: make(chan string, 1)}
	p := newFakeProposer(&fakeLeadership{leaders: []string{"b", "c"}}, fwd, newLeaderWatch())
	_, err := p.Apply(context.Background(), &fsm.EndSession{Session: 1})
	if !errors.Is(err, ErrNotLeader) || !IsRetryable(err) {
		t.Fatalf("got %v, want a retryable ErrNotLeader", err)
	}
	select {
	case addr := <-fwd.sent:
		t.Fatalf("forwarded to %s after the leader changed", addr)
	default:
	}
}

// Without a leader, or without its address, nothing is sent and the
// answer is retryable; a closed proposer answers ErrClosed.
func TestProposeWithoutLeader(t *testing.T) {
	fwd := &hangingForwarder{sent: make(chan string, 1)}
	for _, leader := range []string{"", "unknown-site"} {
		p := newFakeProposer(&fakeLeadership{leaders: []string{leader}}, fwd, newLeaderWatch())
		_, err := p.Apply(context.Background(), &fsm.EndSession{Session: 1})
		if !errors.Is(err, ErrNoLeader) || !IsRetryable(err) {
			t.Fatalf("leader %q: got %v, want a retryable ErrNoLeader", leader, err)
		}
	}
	stop := make(chan struct{})
	p := newClosableProposer(&fakeLeadership{leaders: []string{"b"}}, fwd, newLeaderWatch(), stop)
	close(stop)
	if _, err := p.Apply(context.Background(), &fsm.EndSession{Session: 1}); !errors.Is(err, ErrClosed) || IsRetryable(err) {
		t.Fatalf("closed: got %v, want ErrClosed (final)", err)
	}
	if _, err := p.ApplyAndWait(context.Background(), &fsm.EndSession{Session: 1}); !errors.Is(err, ErrClosed) {
		t.Fatalf("closed ApplyAndWait: got %v, want ErrClosed", err)
	}
	select {
	case addr := <-fwd.sent:
		t.Fatalf("forwarded to %s", addr)
	default:
	}
}

// ApplyAndWait retries transient conditions until its context ends, and
// reports the last one.
func TestApplyAndWaitRetriesUntilDeadline(t *testing.T) {
	p := newFakeProposer(&fakeLeadership{leaders: []string{""}}, &hangingForwarder{sent: make(chan string, 1)}, newLeaderWatch())
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	defer cancel()
	_, err := p.ApplyAndWait(ctx, &fsm.EndSession{Session: 1})
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), ErrNoLeader.Error()) {
		t.Fatalf("got %v, want the deadline with the last error (no leader)", err)
	}
}

// countingRaft counts appends and hands over leadership on request.
type countingRaft struct {
	mu        sync.Mutex
	applies   int
	transfers int
	resp      *fsm.Result
}

func (r *countingRaft) Apply([]byte, time.Duration) raft.ApplyFuture {
	r.mu.Lock()
	r.applies++
	r.mu.Unlock()
	return errFuture{resp: r.resp}
}

func (r *countingRaft) LeadershipTransfer() raft.Future {
	r.mu.Lock()
	r.transfers++
	r.mu.Unlock()
	return errFuture{}
}

func (r *countingRaft) counts() (applies, transfers int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.applies, r.transfers
}

func leaderProposerOver(r proposeRaft, origins originCounter) *proposer {
	return &proposer{self: "a", log: slog.New(slog.DiscardHandler), raft: r, leader: &fakeLeadership{leading: true, leaders: []string{"a"}},
		origins: origins, stop: make(chan struct{}), seq: newSequencer(time.Millisecond)}
}

// On the leader, write batches are counted by origin (placement) and
// nothing else is; a batch whose sender already gave up is not appended.
func TestApplyLocalOriginsAndGivenUp(t *testing.T) {
	r := &countingRaft{resp: &fsm.Result{Index: 3}}
	pl := &placement{}
	p := leaderProposerOver(r, pl)
	batch := &fsm.WriteBatch{Volume: "v", Session: 1, Seq: 1, Ops: []fsm.Op{{Kind: fsm.OpWrite, Len: 1, Data: []byte{1}}}}
	data, err := fsm.Encode(batch)
	if err != nil {
		t.Fatal(err)
	}
	for _, origin := range []string{"b", "b", "", strings.Repeat("x", maxOriginName+1)} {
		if _, err := p.applyLocal(context.Background(), batch, data, origin); err != nil {
			t.Fatal(err)
		}
	}
	end := &fsm.EndSession{Session: 1}
	endData, _ := fsm.Encode(end)
	if _, err := p.applyLocal(context.Background(), end, endData, "b"); err != nil {
		t.Fatal(err)
	}
	if got := pl.origins.take(); len(got) != 1 || got["b"] != 2 {
		t.Fatalf("origins %v, want b: 2 (batches only, sane names only)", got)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	before, _ := r.counts()
	if _, err := p.applyLocal(ctx, batch, data, "b"); !errors.Is(err, context.Canceled) {
		t.Fatalf("a batch whose sender gave up: %v, want context.Canceled", err)
	}
	if after, _ := r.counts(); after != before {
		t.Fatal("a batch whose sender gave up was appended")
	}
	// Without LeaderFollowsWrites nothing is counted (and nothing breaks).
	if _, err := leaderProposerOver(r, nil).applyLocal(context.Background(), batch, data, "b"); err != nil {
		t.Fatal(err)
	}
}

// A leader whose own copy failed to apply a committed entry hands over
// leadership, once, and still reports the entry's result.
func TestApplyLocalFailedCopyStepsDownOnce(t *testing.T) {
	r := &countingRaft{resp: &fsm.Result{Index: 4, Err: fmt.Errorf("%w: disk", fsm.ErrFailed)}}
	p := leaderProposerOver(r, nil)
	for range 3 {
		res, err := p.Apply(context.Background(), &fsm.EndSession{Session: 1})
		if err != nil || res.Index != 4 || !errors.Is(res.Err, fsm.ErrFailed) || !IsRetryable(res.Err) {
			t.Fatalf("result %+v, %v; want the failed verdict (retryable)", res, err)
		}
	}
	waitFor(t, "the leadership transfer", 5*time.Second, func() bool { _, n := r.counts(); return n == 1 })
	if _, n := r.counts(); n != 1 {
		t.Fatalf("%d leadership transfers, want 1", n)
	}
}
