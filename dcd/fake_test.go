package dcd

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/robib/robib/fsm"
)

// errTransient is what the fake returns for injected retryable failures.
var errTransient = errors.New("fake: no leader")

// errPermanent is what the fake returns for injected rejections.
var errPermanent = errors.New("fake: volume deleted")

func retryableInTests(err error) bool {
	return errors.Is(err, errTransient) || errors.Is(err, context.DeadlineExceeded)
}

// fakeLocal is this site's copy of the volume. The fake FSM applies each op
// atomically with respect to ReadAt.
type fakeLocal struct {
	mu   sync.RWMutex
	data []byte
}

func (l *fakeLocal) ReadAt(p []byte, off int64) (int, error) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if off < 0 || off+int64(len(p)) > int64(len(l.data)) {
		return 0, fmt.Errorf("fakeLocal: read [%d, +%d) out of range", off, len(p))
	}
	return copy(p, l.data[off:]), nil
}

func (l *fakeLocal) Size() int64 {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return int64(len(l.data))
}

func (l *fakeLocal) snapshot() []byte {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return append([]byte(nil), l.data...)
}

// applyOps applies ops to b as the FSM does.
func applyOps(b []byte, ops []fsm.Op) {
	for i := range ops {
		op := &ops[i]
		if op.Kind == fsm.OpWrite {
			copy(b[op.Off:], op.Data)
		} else {
			clear(b[op.Off : op.Off+op.Len])
		}
	}
}

// fakeCluster implements Committer like the cluster + FSM would, for one
// volume: batches of a session take effect exactly once in Seq order
// (Seq == last+1 applies, Seq <= last is a duplicate answered with the
// current index, anything else is ErrSeqGap), the "remote" bytes are the
// committed state, and local is this site's copy, which lags behind until
// WaitApplied (or an eager apply) catches it up.
type fakeCluster struct {
	t        testing.TB
	maxBatch int // every batch must encode within it

	// Knobs, set before use.
	maxDelay   time.Duration // random delay before a call reaches the FSM (reorders calls)
	failBefore float64       // probability of a transient error, nothing committed
	failAfter  float64       // probability of a transient error after committing
	eagerApply float64       // probability that the local copy applies right at commit
	applyDelay time.Duration // random delay in WaitApplied
	// hook runs at the start of each call (attempt counts from 1 per seq
	// and session); a non-nil error is returned without committing.
	hook func(b *fsm.WriteBatch, attempt int) error

	gateMu sync.Mutex
	gate   chan struct{} // non-nil: Commit waits until it is closed
	aGate  chan struct{} // non-nil: WaitApplied waits until it is closed

	mu       sync.Mutex
	rng      *rand.Rand
	remote   []byte
	local    *fakeLocal
	sessions map[uint64]uint64 // session -> last applied seq
	log      []*fsm.WriteBatch // committed batches (deep copies); index = position + 1
	localIdx int               // local reflects log[:localIdx]
	attempts map[[2]uint64]int
	calls    int // Commit calls
	dups     int
	gaps     int
	inflight int
	maxIn    int
}

func newFakeCluster(t testing.TB, size int) *fakeCluster {
	return &fakeCluster{
		t:        t,
		maxBatch: DefaultMaxBatchBytes,
		rng:      rand.New(rand.NewPCG(uint64(size), 42)),
		remote:   make([]byte, size),
		local:    &fakeLocal{data: make([]byte, size)},
		sessions: map[uint64]uint64{},
		attempts: map[[2]uint64]int{},
	}
}

func (f *fakeCluster) chance(p float64) bool {
	if p <= 0 {
		return false
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.rng.Float64() < p
}

func (f *fakeCluster) sleep(max time.Duration) {
	if max <= 0 {
		return
	}
	f.mu.Lock()
	d := time.Duration(f.rng.Int64N(int64(max)))
	f.mu.Unlock()
	time.Sleep(d)
}

// hold makes Commit (or WaitApplied) calls wait until release.
func (f *fakeCluster) hold()      { f.gateMu.Lock(); f.gate = make(chan struct{}); f.gateMu.Unlock() }
func (f *fakeCluster) holdApply() { f.gateMu.Lock(); f.aGate = make(chan struct{}); f.gateMu.Unlock() }
func (f *fakeCluster) release()   { f.gateMu.Lock(); close(f.gate); f.gate = nil; f.gateMu.Unlock() }
func (f *fakeCluster) releaseApply() {
	f.gateMu.Lock()
	close(f.aGate)
	f.aGate = nil
	f.gateMu.Unlock()
}

func (f *fakeCluster) wait(ctx context.Context, apply bool) error {
	f.gateMu.Lock()
	g := f.gate
	if apply {
		g = f.aGate
	}
	f.gateMu.Unlock()
	if g == nil {
		return nil
	}
	select {
	case <-g:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (f *fakeCluster) Commit(ctx context.Context, b *fsm.WriteBatch) (uint64, error) {
	f.mu.Lock()
	f.calls++
	f.inflight++
	f.maxIn = max(f.maxIn, f.inflight)
	key := [2]uint64{b.Session, b.Seq}
	f.attempts[key]++
	attempt := f.attempts[key]
	f.mu.Unlock()
	defer func() { f.mu.Lock(); f.inflight--; f.mu.Unlock() }()

	if err := f.check(b); err != nil {
		f.t.Errorf("invalid batch: %v", err)
		return 0, fmt.Errorf("%w: %w", errPermanent, err)
	}
	if f.hook != nil {
		if err := f.hook(b, attempt); err != nil {
			return 0, err
		}
	}
	if err := f.wait(ctx, false); err != nil {
		return 0, err
	}
	f.sleep(f.maxDelay)
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if f.chance(f.failBefore) {
		return 0, fmt.Errorf("%w (injected before commit)", errTransient)
	}
	index, err := f.apply(b)
	if err != nil {
		return 0, err
	}
	if f.chance(f.eagerApply) {
		f.applyLocal(index)
	}
	if f.chance(f.failAfter) {
		return 0, fmt.Errorf("%w (injected after commit)", errTransient)
	}
	return index, nil
}

// check validates b as the encoder and FSM would.
func (f *fakeCluster) check(b *fsm.WriteBatch) error {
	if b.Session == 0 || b.Seq == 0 || len(b.Ops) == 0 {
		return fmt.Errorf("session %d seq %d with %d ops", b.Session, b.Seq, len(b.Ops))
	}
	if n := fsm.EncodedSize(b); n > f.maxBatch {
		return fmt.Errorf("batch encodes to %d bytes, limit %d", n, f.maxBatch)
	}
	if _, err := fsm.Encode(b); err != nil {
		return err
	}
	for i, op := range b.Ops {
		if op.Off+op.Len > int64(len(f.remote)) || op.Len == 0 {
			return fmt.Errorf("op %d [%d, +%d) outside the volume or empty", i, op.Off, op.Len)
		}
		if i > 0 && b.Ops[i-1].Off+b.Ops[i-1].Len > op.Off {
			return fmt.Errorf("ops %d and %d overlap or are unsorted", i-1, i)
		}
	}
	return nil
}

// apply runs the FSM's session rules and commits b.
func (f *fakeCluster) apply(b *fsm.WriteBatch) (uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	last := f.sessions[b.Session]
	switch {
	case b.Seq <= last:
		f.dups++
		return uint64(len(f.log)), nil
	case b.Seq > last+1:
		f.gaps++
		return 0, fmt.Errorf("%w: session %x seq %d, last %d", fsm.ErrSeqGap, b.Session, b.Seq, last)
	}
	c := &fsm.WriteBatch{Volume: b.Volume, Session: b.Session, Seq: b.Seq, Epoch: b.Epoch, Ops: make([]fsm.Op, len(b.Ops))}
	for i, op := range b.Ops {
		op.Data = append([]byte(nil), op.Data...)
		c.Ops[i] = op
	}
	applyOps(f.remote, c.Ops)
	f.sessions[b.Session] = b.Seq
	f.log = append(f.log, c)
	return uint64(len(f.log)), nil
}

// applyLocal brings the local copy up to index, one op at a time.
func (f *fakeCluster) applyLocal(index uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if index > uint64(len(f.log)) {
		f.t.Errorf("WaitApplied(%d) beyond the last committed index %d", index, len(f.log))
		index = uint64(len(f.log))
	}
	for ; f.localIdx < int(index); f.localIdx++ {
		for _, op := range f.log[f.localIdx].Ops {
			f.local.mu.Lock()
			applyOps(f.local.data, []fsm.Op{op})
			f.local.mu.Unlock()
		}
	}
}

func (f *fakeCluster) WaitApplied(ctx context.Context, index uint64) error {
	if err := f.wait(ctx, true); err != nil {
		return err
	}
	f.sleep(f.applyDelay)
	f.applyLocal(index)
	return nil
}

// evict forgets a session, as the FSM's LRU does.
func (f *fakeCluster) evict(session uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.sessions, session)
}

func (f *fakeCluster) remoteCopy() []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]byte(nil), f.remote...)
}

func (f *fakeCluster) committed() []*fsm.WriteBatch {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*fsm.WriteBatch(nil), f.log...)
}

func (f *fakeCluster) counts() (calls, dups, gaps int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls, f.dups, f.gaps
}
