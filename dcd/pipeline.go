package dcd

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"time"

	"github.com/robib/robib/fsm"
)

// batch is a group of ops cut from the pending set, from the moment it is
// cut until it is applied locally. Its ops stay readable (the overlay)
// throughout.
type batch struct {
	seq    uint64
	ops    []fsm.Op // sorted by Off, non-overlapping; replaced once by the coalesced wire ops
	lo, hi int64    // bounds of the ops' ranges
	cost   int64    // buffer bytes charged to it
	minAge uint64   // smallest age of its ops
	wb     *fsm.WriteBatch

	// Pipeline state (guarded by Volume.mu).
	inflight bool   // a Commit call with it is running (or it is being built)
	gapHeld  bool   // got ErrSeqGap: resend once its predecessor is committed
	sentAck  uint64 // ackSeq when the last attempt was sent
}

// appendOverlapping appends b's ops overlapping [off, end) to dst.
func (b *batch) appendOverlapping(dst []fsm.Op, off, end int64) []fsm.Op {
	if end <= b.lo || off >= b.hi {
		return dst
	}
	for i := firstEndingAfter(b.ops, off); i < len(b.ops) && b.ops[i].Off < end; i++ {
		dst = append(dst, b.ops[i])
	}
	return dst
}

// firstEndingAfter returns the index of the first op of the sorted,
// non-overlapping ops that ends after off.
func firstEndingAfter(ops []fsm.Op, off int64) int {
	return sort.Search(len(ops), func(i int) bool { return ops[i].Off+ops[i].Len > off })
}

func sortOps(ops []fsm.Op) {
	slices.SortFunc(ops, func(a, b fsm.Op) int { return cmp.Compare(a.Off, b.Off) })
}

// captureLocked appends every buffered op overlapping [off, end) to dst in
// the order they must be applied: batches by seq, then the pending set.
// Ops of one batch, and the pending ops, do not overlap one another; an op
// that overlaps an op of an earlier batch (or pending vs. batch) is always
// the newer one, because insert cuts older pending ops (DESIGN.md).
func (v *Volume) captureLocked(dst []fsm.Op, off, end int64) []fsm.Op {
	for _, b := range v.window {
		dst = b.appendOverlapping(dst, off, end)
	}
	return v.pending.appendOverlapping(dst, off, end)
}

// coalesce returns ops (sorted, non-overlapping) with every run of touching
// ops of the same kind joined into one op, and how many ops disappeared.
// Joined write data is copied into a new array; ops is not modified.
func coalesce(ops []fsm.Op) ([]fsm.Op, int) {
	joinable := func(a, b *fsm.Op) bool {
		return a.Off+a.Len == b.Off && a.Kind == b.Kind && a.NoHole == b.NoHole
	}
	out := make([]fsm.Op, 0, len(ops))
	for i := 0; i < len(ops); {
		j := i + 1
		n := ops[i].Len
		for j < len(ops) && joinable(&ops[j-1], &ops[j]) {
			n += ops[j].Len
			j++
		}
		op := ops[i]
		if j > i+1 {
			op.Len = n
			if op.Kind == fsm.OpWrite {
				op.Data = make([]byte, 0, n)
				for k := i; k < j; k++ {
					op.Data = append(op.Data, ops[k].Data...)
				}
			}
		}
		out = append(out, op)
		i = j
	}
	return out, len(ops) - len(out)
}

// commitResult is the outcome of one Commit call.
type commitResult struct {
	b        *batch
	session  uint64 // the attempt's session
	index    uint64
	err      error
	timedOut bool // CommitTimeout expired (not a shutdown)
	elapsed  time.Duration
}

// pipeline is the background goroutine that cuts batches from the pending
// set, sends them (up to MaxInflight at once, in seq order), and handles the
// answers: acknowledgements, resends after transient errors and ErrSeqGap,
// and permanent failures. It is the only goroutine that changes the
// pipeline state of batches. It runs until Shutdown closes stop and no
// Commit call is in flight.
func (v *Volume) pipeline() {
	defer v.done.Done()
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	stopping := false
	for {
		fresh, idle := v.schedule(stopping)
		if len(fresh) > 0 {
			for _, b := range fresh {
				v.build(b)
			}
			v.mu.Lock()
			for _, b := range fresh {
				v.sendLocked(b)
			}
			v.mu.Unlock()
		}
		if stopping && idle {
			return
		}
		stop := v.stop
		if stopping {
			stop = nil
		}
		select {
		case <-v.kick:
		case <-retry.C:
		case r := <-v.results:
			if d := v.handle(r); d > 0 {
				retry.Reset(d)
			}
		case <-stop:
			stopping = true
		}
	}
}

// schedule (re)sends the batches that may go now and cuts new ones while
// there is room in flight. New batches are returned to be built outside
// the lock; they already count as in flight. idle reports that no Commit
// call is running.
func (v *Volume) schedule(stopping bool) (fresh []*batch, idle bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.err != nil {
		if v.inflight == 0 {
			v.dropUncommittedLocked()
		}
		return nil, v.inflight == 0
	}
	if stopping || time.Now().Before(v.retryAt) {
		return nil, v.inflight == 0
	}
	// Resends, strictly in seq order: stop at the first batch that may not
	// go yet, so nothing overtakes it.
	for _, b := range v.window {
		if b.seq <= v.ackSeq || b.inflight {
			continue
		}
		if v.inflight >= v.cfg.MaxInflight || (b.gapHeld && v.ackSeq+1 < b.seq) {
			return nil, v.inflight == 0
		}
		b.gapHeld = false
		b.inflight = true
		v.inflight++
		v.sendLocked(b)
	}
	for v.inflight < v.cfg.MaxInflight && v.pending.len() > 0 {
		// Adaptive batching: while few batches are in flight, cut at once
		// (low latency for a lone write or flush). With more in flight,
		// cut only full batches and let small writes gather until one is
		// full or commits complete (fewer than two in flight): the batch size
		// then follows the commit time, and slow commits (a WAN) get
		// fuller batches and more of them in flight, instead of a stream
		// of tiny entries.
		if v.inflight >= eagerInflight && v.pending.bytes < int64(v.cfg.MaxBatchBytes) {
			break
		}
		fresh = append(fresh, v.cutLocked())
	}
	return fresh, v.inflight == 0
}

// eagerInflight is the number of batches in flight below which pending
// operations are cut into a batch right away, however small.
const eagerInflight = 2

// cutLocked moves the oldest pending ops that fit into a new batch at the
// end of window (so they stay visible to readers) and counts it in flight.
func (v *Volume) cutLocked() *batch {
	ops, cost, minAge := v.pending.take(v.cfg.MaxBatchBytes-v.limits.batchBase, v.limits.opOverhead)
	b := &batch{
		seq:      v.nextSeq,
		ops:      ops,
		lo:       ops[0].Off,
		hi:       ops[len(ops)-1].Off + ops[len(ops)-1].Len,
		cost:     cost,
		minAge:   minAge,
		inflight: true,
	}
	v.nextSeq++
	v.window = append(v.window, b)
	v.winBytes += cost
	v.inflight++
	return b
}

// build coalesces a new batch's ops into its wire form. It runs without the
// lock: a cut batch's ops are never modified, only replaced.
func (v *Volume) build(b *batch) {
	ops, joined := coalesce(b.ops) // b.ops is read without the lock: see above
	wb := &fsm.WriteBatch{Volume: v.name, Epoch: v.cfg.Epoch, Created: v.cfg.VolumeCreated, Ops: ops}
	v.mu.Lock()
	b.ops, b.wb = ops, wb
	v.stats.Coalesced += uint64(joined)
	v.mu.Unlock()
}

// sendLocked starts a Commit call for b, which is counted in flight. It
// stamps the batch with the current session and its wire Seq (a new
// WriteBatch value each time: an earlier attempt's may still be read).
//
// Calls are started in the order of sendLocked calls: each goroutine enters
// Commit only after the previous one did. That does not guarantee the order
// in which they reach the FSM, but it removes most of the reordering the Go
// scheduler would otherwise cause (every overtaking costs a rejected batch
// and a resend).
func (v *Volume) sendLocked(b *batch) {
	wb := *b.wb
	wb.Session = v.session
	wb.Seq = b.seq - v.seqBase
	b.wb = &wb
	b.sentAck = v.ackSeq
	prev, started := v.lastStarted, make(chan struct{})
	v.lastStarted = started
	go func() {
		ctx, cancel := context.WithTimeout(v.ctx, v.cfg.CommitTimeout)
		if prev != nil {
			<-prev
		}
		start := time.Now()
		close(started)
		index, err := v.c.Commit(ctx, &wb)
		r := commitResult{b: b, session: wb.Session, index: index, err: err, elapsed: time.Since(start)}
		r.timedOut = err != nil && ctx.Err() == context.DeadlineExceeded && v.ctx.Err() == nil
		cancel()
		v.results <- r // never blocks: cap MaxInflight
	}()
}

// handle processes a finished Commit call and returns the backoff delay
// after which sending resumes (0: no backoff).
func (v *Volume) handle(r commitResult) time.Duration {
	v.mu.Lock()
	defer v.mu.Unlock()
	b := r.b
	b.inflight = false
	v.inflight--
	if r.err == nil {
		v.stats.CommitCount++
		v.stats.CommitLatency += r.elapsed
		v.latency.add(r.elapsed)
		v.ackLocked(b.seq, r.index)
		return 0
	}
	switch {
	case b.seq <= v.ackSeq:
		// A later batch's success already proved this one committed.
		return 0
	case v.err != nil || v.ctx.Err() != nil:
		return 0 // failed or abandoned: nothing is resent
	}
	v.stats.Retries++
	gap := errors.Is(r.err, fsm.ErrSeqGap)
	switch {
	case gap && (b.sentAck+1 < b.seq || r.session != v.session):
		// An earlier batch may not have landed when this one arrived
		// (calls overtook each other, or it failed too): resend once it
		// is committed (at once if it is by now).
		b.gapHeld = true
		v.log.Debug("batch overtook an earlier one, will resend", "seq", b.seq, "acked", v.ackSeq)
		return 0
	case gap:
		// Every earlier batch was committed before this one was sent, yet
		// the FSM expects an earlier Seq: it no longer knows the session
		// (evicted). Start a new one; the unacknowledged batches are
		// renumbered from 1.
		old := v.session
		v.session = randomSession()
		v.seqBase = v.ackSeq
		v.stats.Sessions++
		v.log.Warn("FSM lost the writer session, starting a new one", "old", old, "new", v.session, "seq", b.seq, "err", r.err)
		return v.backoffLocked()
	case r.timedOut || v.cfg.Retryable(r.err):
		// One warning per backoff round: a leader change fails every batch
		// in flight at once, and they all say the same.
		lvl := slog.LevelDebug
		if !time.Now().Before(v.retryAt) {
			lvl = slog.LevelWarn
		}
		v.log.Log(v.ctx, lvl, "commit failed, retrying", "seq", b.seq, "attempt_ms", r.elapsed.Milliseconds(), "inflight", v.inflight, "err", r.err)
		return v.backoffLocked()
	}
	v.err = fmt.Errorf("%w: volume %s: batch %d rejected: %w", ErrFailed, v.name, b.seq, r.err)
	v.log.Error("write-back failed, dropping buffered writes", "seq", b.seq, "err", r.err)
	v.pending.clear()
	v.space.Broadcast()
	v.progress.Broadcast()
	return 0
}

// backoffLocked pauses sending for the next exponential backoff delay
// (unless a pause is already running: the failures of one round of
// concurrent calls count once).
func (v *Volume) backoffLocked() time.Duration {
	now := time.Now()
	if now.Before(v.retryAt) {
		return 0
	}
	d := minBackoff << min(v.failures, 10)
	d = min(d, maxBackoff)
	v.failures++
	v.retryAt = now.Add(d)
	return d
}

// ackLocked records that batch seq is committed at (or before) index. A
// batch's success implies that every earlier batch of the session is
// committed too (the FSM applies them in order).
func (v *Volume) ackLocked(seq, index uint64) {
	v.failures = 0
	v.ackIndex = max(v.ackIndex, index)
	if seq <= v.ackSeq {
		return
	}
	for _, b := range v.window {
		if b.seq > v.ackSeq && b.seq <= seq {
			v.stats.Batches++
			v.stats.Ops += uint64(len(b.ops))
			for i := range b.ops {
				v.stats.Bytes += uint64(len(b.ops[i].Data))
			}
		}
	}
	v.ackSeq = seq
	v.progress.Broadcast()
	select {
	case v.applyKick <- struct{}{}:
	default:
	}
}

// dropUncommittedLocked removes the batches that will never be committed
// after a failure (once nothing is in flight) from the overlay.
func (v *Volume) dropUncommittedLocked() {
	keep := v.window[:0]
	dropped := false
	for _, b := range v.window {
		if b.seq <= v.ackSeq {
			keep = append(keep, b)
			continue
		}
		v.winBytes -= b.cost
		dropped = true
	}
	clear(v.window[len(keep):])
	v.window = keep
	if dropped {
		v.space.Broadcast()
		v.progress.Broadcast()
	}
}

// applier is the background goroutine that waits until this site has
// applied the committed batches and then removes them from the overlay,
// releasing their buffer space. It runs until Shutdown closes stop (once
// everything is applied) or abandons the volume.
func (v *Volume) applier() {
	defer v.done.Done()
	failures := 0
	for {
		v.mu.Lock()
		seq, index := v.ackSeq, v.ackIndex
		todo := seq > v.applied
		v.mu.Unlock()
		if !todo {
			select {
			case <-v.applyKick:
				continue
			case <-v.stop:
				return
			}
		}
		if err := v.c.WaitApplied(v.ctx, index); err != nil {
			if v.ctx.Err() != nil {
				return
			}
			d := min(minBackoff<<min(failures, 10), maxBackoff)
			failures++
			v.log.Warn("waiting for the local apply failed, retrying", "index", index, "err", err)
			select {
			case <-time.After(d):
			case <-v.ctx.Done():
				return
			}
			continue
		}
		failures = 0
		v.mu.Lock()
		v.releaseLocked(seq)
		v.mu.Unlock()
	}
}

// releaseLocked removes the batches up to seq, now applied locally, from
// the overlay.
func (v *Volume) releaseLocked(seq uint64) {
	n := 0
	for n < len(v.window) && v.window[n].seq <= seq {
		v.winBytes -= v.window[n].cost
		n++
	}
	rest := copy(v.window, v.window[n:])
	clear(v.window[rest:])
	v.window = v.window[:rest]
	v.applied = max(v.applied, seq)
	v.space.Broadcast()
	v.progress.Broadcast()
}
