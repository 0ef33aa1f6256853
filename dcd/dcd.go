// Package dcd ("disk caching disk") is the write-back stage between the NBD
// front end and the cluster. A Volume accepts block writes, trims and
// zeroings into a bounded in-memory buffer, coalesces them, and replicates
// them as fsm.WriteBatch commands through a Committer in the background
// (group commit, pipelined). Reads see this site's copy of the volume with
// every buffered operation applied on top, so a writer always reads its own
// writes even before they are committed or applied locally.
//
// Durability: WriteAt, Trim and WriteZeroes return once the operation is
// buffered (or committed, with Config.SyncWrites); Flush returns once every
// operation accepted before it is committed on a majority of sites.
//
// See DESIGN.md for the data structures, the ordering argument and the lock
// rules.
package dcd

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"sync"
	"time"

	"github.com/robib/robib/fsm"
)

// Errors of this package. Returned errors wrap one of them with details;
// test with errors.Is.
var (
	// ErrClosed: the Volume is closed (or closing).
	ErrClosed = errors.New("dcd: volume closed")
	// ErrOutOfRange: an offset or length is negative, overflows, or reaches
	// past the end of the local volume.
	ErrOutOfRange = errors.New("dcd: range outside the volume")
	// ErrFailed is sticky: a batch was rejected permanently (the error also
	// wraps the Committer's error), so the data in it and in every later
	// buffered operation is lost. Every later WriteAt, Trim, WriteZeroes
	// and Flush returns it, and Close too; reads keep working and show the
	// operations committed before the failure. Close the Volume and open a
	// new one (a new session) to write again.
	ErrFailed = errors.New("dcd: write-back failed, buffered writes lost")
	// ErrFenced is the sticky failure set by Fence: the writer lost the
	// right to write (its volume lease went to another site). It wraps
	// ErrFailed.
	ErrFenced = fmt.Errorf("%w: fenced", ErrFailed)
	// ErrFlushTimeout: a Flush (or a write under SyncWrites) waited
	// Config.FlushTimeout without its operations being committed on a
	// majority of sites (no quorum reachable). Not sticky: the operations
	// stay buffered and are still sent; a later Flush may succeed.
	ErrFlushTimeout = errors.New("dcd: flush timed out waiting for a majority of sites")
)

// Committer is implemented by the cluster layer. Both methods are called
// concurrently: Commit by up to Config.MaxInflight goroutines, WaitApplied
// by one.
type Committer interface {
	// Commit replicates b and returns once it is committed on a majority
	// of sites (durable in their Raft logs), with the log index where it
	// took effect (for a duplicate: an index at or after it). Errors:
	// fsm.ErrSeqGap (dcd resends in order), transient conditions that
	// Config.Retryable accepts (dcd retries with backoff), ctx errors, and
	// final verdicts (volume deleted, out of range, ...) after which the
	// Volume fails (ErrFailed). b and its data must not be modified or
	// retained after Commit returns.
	Commit(ctx context.Context, b *fsm.WriteBatch) (index uint64, err error)
	// WaitApplied blocks until this site's FSM has applied index, so the
	// local volume shows every batch committed at or before it.
	WaitApplied(ctx context.Context, index uint64) error
}

// Local is this site's copy of the volume (a *volume.Volume satisfies it).
// ReadAt and Size are called concurrently, without any lock of this package
// held, while the FSM writes to the same volume.
type Local interface {
	io.ReaderAt
	Size() int64
}

// Config configures a Volume. The zero value gives the defaults.
type Config struct {
	// MaxBufferBytes bounds the bytes held for operations that are not yet
	// applied to the local volume: write payload plus opCost per
	// operation. Writers block (backpressure) while it is reached; one
	// operation may overshoot it. Default 64 MiB.
	MaxBufferBytes int64
	// MaxBatchBytes is the largest encoded batch (fsm.EncodedSize).
	// Larger writes are split across ops and batches. Default 512 KiB.
	MaxBatchBytes int
	// MaxInflight bounds the batches committing concurrently. Below two
	// in flight, pending operations are cut into a batch at once; above,
	// only once a full batch has gathered (or commits complete), so the
	// batch size adapts to the commit time. Default 16.
	MaxInflight int
	// SyncWrites makes WriteAt, Trim and WriteZeroes return only after the
	// operation is committed (like FUA on every write).
	SyncWrites bool
	// Retryable reports which Commit errors are transient (retried with
	// backoff) rather than final. fsm.ErrSeqGap and the expiry of
	// CommitTimeout are always retried. Default: context.DeadlineExceeded.
	Retryable func(error) bool
	// CommitTimeout bounds one Commit call; on expiry the batch is resent
	// (the FSM deduplicates). Default 30 s.
	CommitTimeout time.Duration
	// FlushTimeout bounds how long Flush (and a write under SyncWrites)
	// waits for its commit before failing with ErrFlushTimeout. Zero
	// waits for as long as it takes.
	FlushTimeout time.Duration
	// Logger receives retries, failures and session changes. Default: discard.
	Logger *slog.Logger
	// Epoch is copied into each batch (volume leases).
	Epoch uint64
	// VolumeCreated is copied into each batch (fsm.WriteBatch.Created): the
	// incarnation of the volume this stage writes to.
	VolumeCreated int64
	// Session identifies this writer to the FSM; 0 picks a random non-zero
	// one. A new one is picked if the FSM evicted the session.
	Session uint64
}

// Defaults of Config.
const (
	DefaultMaxBufferBytes = 64 << 20
	DefaultMaxBatchBytes  = 512 << 10
	DefaultMaxInflight    = 16
	DefaultCommitTimeout  = 30 * time.Second
	// DefaultFlushTimeout is what DefaultConfig suggests for FlushTimeout;
	// a zero FlushTimeout still means no bound.
	DefaultFlushTimeout = 30 * time.Second
)

// DefaultConfig returns the recommended limits (the agent's flags take
// their defaults from it). New fills the zero limits of a Config with the
// same values; FlushTimeout is the exception, zero there means no bound.
func DefaultConfig() Config {
	return Config{
		MaxBufferBytes: DefaultMaxBufferBytes,
		MaxBatchBytes:  DefaultMaxBatchBytes,
		MaxInflight:    DefaultMaxInflight,
		CommitTimeout:  DefaultCommitTimeout,
		FlushTimeout:   DefaultFlushTimeout,
	}
}

// opCost is charged against MaxBufferBytes for every buffered operation on
// top of its payload, so trims and zeroings are bounded too. It
// approximates the bookkeeping memory of one op.
const opCost = 128

// Retry backoff bounds.
const (
	minBackoff = 10 * time.Millisecond
	maxBackoff = 200 * time.Millisecond // short: a new leader is usually found within a second
)

// Stats is a snapshot of a Volume's counters.
type Stats struct {
	Accepted      uint64        // ops accepted (a large write counts once per piece)
	Coalesced     uint64        // ops that disappeared into others (overwritten or merged) before being sent
	Batches       uint64        // batches committed
	Ops           uint64        // ops in committed batches
	Bytes         uint64        // write payload bytes in committed batches
	Retries       uint64        // Commit attempts that failed transiently (resent later)
	Sessions      uint64        // sessions started because the FSM had evicted the previous one
	Inflight      int           // Commit calls in progress
	PendingOps    int           // buffered ops not yet in a batch
	BufferedBytes int64         // bytes charged against MaxBufferBytes
	CommitCount   uint64        // successful Commit calls
	CommitLatency time.Duration // sum of the durations of successful Commit calls
	// CommitP50 and CommitP99: percentiles of the durations of the newest
	// successful Commit calls (up to 1024): how long a replicated commit
	// takes from this site right now, the floor of a FLUSH's latency.
	CommitP50, CommitP99 time.Duration
}

// Volume is the write-back stage of one volume. Its methods are safe for
// concurrent use by any number of goroutines (several NBD connections):
// operations are ordered by the moment they are accepted, reads see every
// operation accepted before they started.
//
// Locking: mu guards every field below it. It is never held across I/O,
// Commit or WaitApplied; while holding it the code only updates the indexes
// of buffered ops and copies op descriptors (and, when a cut leaves a write
// piece smaller than half its array, that piece). Two background goroutines run:
// the pipeline (cuts, sends and retries batches) and the applier (waits for
// the local apply and releases the buffer); see DESIGN.md.
type Volume struct {
	name   string
	local  Local
	c      Committer
	cfg    Config
	log    *slog.Logger
	limits limits

	ctx       context.Context // canceled only when Shutdown gives up
	cancel    context.CancelFunc
	kick      chan struct{}     // cap 1: new work for the pipeline
	results   chan commitResult // cap MaxInflight: finished Commit calls
	applyKick chan struct{}     // cap 1: new commits for the applier
	stop      chan struct{}     // closed when Shutdown is done waiting
	done      sync.WaitGroup    // the two background goroutines

	mu          sync.Mutex
	space       sync.Cond // signalled when buffered bytes shrink or the state changes
	progress    sync.Cond // signalled on commits, local applies and state changes
	closed      bool      // Shutdown started: no new operations
	err         error     // sticky failure (wraps ErrFailed, or ErrClosed after an abort)
	lastID      uint64    // ID of the last accepted op (IDs start at 1)
	reserved    int64     // buffer bytes reserved by writers copying their data
	pending     pendingSet
	window      []*batch      // batches cut and not yet applied locally, by seq
	winBytes    int64         // buffer bytes charged to the batches in window
	session     uint64        // current FSM session
	seqBase     uint64        // wire Seq = seq - seqBase (changes with the session)
	nextSeq     uint64        // seq of the next batch to cut
	ackSeq      uint64        // every batch with seq <= ackSeq is committed
	ackIndex    uint64        // a log index at or after the commit of batch ackSeq
	applied     uint64        // every batch with seq <= applied is applied locally and left window
	inflight    int           // batches counted as in flight (being built or committing)
	lastStarted chan struct{} // closed when the last Commit goroutine started its call
	failures    int           // consecutive transient failures, for the backoff
	retryAt     time.Time
	stats       Stats
	latency     latencyRing // durations of the newest successful Commit calls
}

// limits are the batch size rules derived from MaxBatchBytes.
type limits struct {
	batchBase  int // upper bound of the encoded size of a batch without ops
	opOverhead int // upper bound of the encoded size of one op besides its data
	chunk      int // largest data of one write op; writes are split at it
}

// New returns the write-back stage for the named volume and starts its
// background goroutines; Close stops them. local is this site's copy, c the
// cluster.
func New(volumeName string, local Local, c Committer, cfg Config) (*Volume, error) {
	if volumeName == "" || local == nil || c == nil {
		return nil, errors.New("dcd: New needs a volume name, a local volume and a committer")
	}
	if cfg.MaxBufferBytes < 0 || cfg.MaxBatchBytes < 0 || cfg.MaxInflight < 0 || cfg.CommitTimeout < 0 {
		return nil, fmt.Errorf("dcd: negative limit in config %+v", cfg)
	}
	if cfg.MaxBufferBytes == 0 {
		cfg.MaxBufferBytes = DefaultMaxBufferBytes
	}
	if cfg.MaxBatchBytes == 0 {
		cfg.MaxBatchBytes = DefaultMaxBatchBytes
	}
	if cfg.MaxInflight == 0 {
		cfg.MaxInflight = DefaultMaxInflight
	}
	if cfg.CommitTimeout == 0 {
		cfg.CommitTimeout = DefaultCommitTimeout
	}
	if cfg.Retryable == nil {
		cfg.Retryable = func(err error) bool { return errors.Is(err, context.DeadlineExceeded) }
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	lim, err := batchLimits(volumeName, cfg.MaxBatchBytes)
	if err != nil {
		return nil, err
	}
	session := cfg.Session
	if session == 0 {
		session = randomSession()
	}
	ctx, cancel := context.WithCancel(context.Background())
	v := &Volume{
		name:      volumeName,
		local:     local,
		c:         c,
		cfg:       cfg,
		log:       log,
		limits:    lim,
		ctx:       ctx,
		cancel:    cancel,
		kick:      make(chan struct{}, 1),
		results:   make(chan commitResult, cfg.MaxInflight),
		applyKick: make(chan struct{}, 1),
		stop:      make(chan struct{}),
		pending:   newPendingSet(),
		session:   session,
		nextSeq:   1,
	}
	v.space.L = &v.mu
	v.progress.L = &v.mu
	v.done.Add(2)
	go v.pipeline()
	go v.applier()
	return v, nil
}

// batchLimits derives the op size rules from the encoding (fsm.EncodedSize)
// with every variable-length field at its largest.
func batchLimits(name string, maxBatch int) (limits, error) {
	probe := fsm.WriteBatch{Volume: name, Session: math.MaxUint64, Seq: math.MaxUint64, Epoch: math.MaxUint64, Created: math.MinInt64}
	// The op count is a varint: leave room for its longest form.
	base := fsm.EncodedSize(&probe) + binary.MaxVarintLen64 - 1
	probe.Ops = []fsm.Op{{Kind: fsm.OpWrite, NoHole: true, Off: math.MaxInt64, Len: math.MaxInt64}}
	perOp := fsm.EncodedSize(&probe) - base + binary.MaxVarintLen64 - 1
	chunk := maxBatch - base - perOp
	if chunk >= 8192 {
		chunk &^= 4095 // keep split writes block aligned
	}
	if chunk < 512 {
		return limits{}, fmt.Errorf("dcd: MaxBatchBytes %d is too small (a batch needs %d bytes besides data)", maxBatch, base+perOp)
	}
	return limits{batchBase: base, opOverhead: perOp, chunk: chunk}, nil
}

func randomSession() uint64 {
	var b [8]byte
	for {
		rand.Read(b[:]) // never fails (crypto/rand panics instead)
		if s := binary.LittleEndian.Uint64(b[:]); s != 0 {
			return s
		}
	}
}

// Session returns the writer session the Volume currently uses (it changes
// if the FSM evicted the previous one). End it in the FSM after Close.
func (v *Volume) Session() uint64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.session
}

// Err returns the sticky failure (wrapping ErrFailed or ErrFenced), or
// ErrClosed once closed, or nil while the Volume accepts writes.
func (v *Volume) Err() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.stateErrLocked()
}

// checkRange validates [off, off+length) against the local volume's size.
func (v *Volume) checkRange(what string, off, length int64) error {
	size := v.local.Size()
	if off < 0 || length < 0 || length > math.MaxInt64-off || off+length > size {
		return fmt.Errorf("%w: %s of %d bytes at offset %d, volume %s is %d bytes", ErrOutOfRange, what, length, off, v.name, size)
	}
	return nil
}

// stateErrLocked returns why no new operation can be accepted, if so.
func (v *Volume) stateErrLocked() error {
	if v.closed {
		return fmt.Errorf("%w: %s", ErrClosed, v.name)
	}
	return v.err
}

// ReadAt reads len(p) bytes at off: the local volume with every buffered
// operation applied on top in order. A range not entirely inside the volume
// is an error (ErrOutOfRange); nothing is read.
func (v *Volume) ReadAt(p []byte, off int64) (int, error) {
	if err := v.checkRange("read", off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	end := off + int64(len(p))
	var stack [16]fsm.Op
	// Capture the overlay before reading the local file: an op that is
	// applied locally and leaves the overlay meanwhile is then applied
	// twice, which is harmless because every later op is captured too and
	// re-applied after it (DESIGN.md, "Reads").
	v.mu.Lock()
	if v.closed {
		v.mu.Unlock()
		return 0, fmt.Errorf("%w: %s", ErrClosed, v.name)
	}
	ops := v.captureLocked(stack[:0], off, end)
	v.mu.Unlock()

	if !coversAll(ops, off, end) {
		n, err := v.local.ReadAt(p, off)
		if err != nil && !(err == io.EOF && n == len(p)) {
			return 0, fmt.Errorf("dcd: reading local volume %s at %d: %w", v.name, off, err)
		}
	}
	for i := range ops {
		applyOp(p, off, &ops[i])
	}
	return len(p), nil
}

// coversAll reports whether one op alone covers [off, end), so the local
// bytes would be overwritten anyway.
func coversAll(ops []fsm.Op, off, end int64) bool {
	for i := range ops {
		if ops[i].Off <= off && ops[i].Off+ops[i].Len >= end {
			return true
		}
	}
	return false
}

// applyOp applies op to p, which holds the bytes at [off, off+len(p)).
func applyOp(p []byte, off int64, op *fsm.Op) {
	lo := max(op.Off, off)
	hi := min(op.Off+op.Len, off+int64(len(p)))
	if lo >= hi {
		return
	}
	dst := p[lo-off : hi-off]
	if op.Kind == fsm.OpWrite {
		copy(dst, op.Data[lo-op.Off:])
	} else {
		clear(dst)
	}
}

// WriteAt buffers a copy of p for offset off and returns len(p) once it is
// accepted (with SyncWrites: once committed). It blocks while the buffer is
// full. Writes longer than a batch can carry are split into pieces accepted
// one after another; on an error n counts the bytes accepted.
func (v *Volume) WriteAt(p []byte, off int64) (n int, err error) {
	if err := v.checkRange("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	var last uint64
	for n < len(p) {
		k := min(len(p)-n, v.limits.chunk)
		last, err = v.submit(&pendingOp{kind: fsm.OpWrite, off: off + int64(n), end: off + int64(n+k)}, p[n:n+k])
		if err != nil {
			return n, err
		}
		n += k
	}
	if len(p) == 0 {
		return 0, v.checkState()
	}
	if v.cfg.SyncWrites {
		if err := v.waitCommitted(last); err != nil {
			return n, err
		}
	}
	return n, nil
}

// Trim buffers a trim of [off, off+length): the range reads as zeros and is
// replicated as a range op (no data).
func (v *Volume) Trim(off, length int64) error {
	return v.rangeOp("trim", &pendingOp{kind: fsm.OpTrim, off: off, end: off + length}, length)
}

// WriteZeroes buffers zeroing [off, off+length), replicated as a range op.
// With noHole the range stays allocated at every site.
func (v *Volume) WriteZeroes(off, length int64, noHole bool) error {
	return v.rangeOp("write zeroes", &pendingOp{kind: fsm.OpZero, noHole: noHole, off: off, end: off + length}, length)
}

func (v *Volume) rangeOp(what string, op *pendingOp, length int64) error {
	if err := v.checkRange(what, op.off, length); err != nil {
		return err
	}
	if length == 0 {
		return v.checkState()
	}
	id, err := v.submit(op, nil)
	if err != nil {
		return err
	}
	if v.cfg.SyncWrites {
		return v.waitCommitted(id)
	}
	return nil
}

func (v *Volume) checkState() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.stateErrLocked()
}

// submit accepts op (with a copy of data for writes) once the buffer has
// room, and returns its ID.
func (v *Volume) submit(op *pendingOp, data []byte) (uint64, error) {
	cost := int64(opCost + len(data))
	v.mu.Lock()
	for v.stateErrLocked() == nil && v.bufferedLocked() >= v.cfg.MaxBufferBytes {
		v.space.Wait()
	}
	if err := v.stateErrLocked(); err != nil {
		v.mu.Unlock()
		return 0, err
	}
	if data != nil {
		// Copy outside the lock with the space reserved, so the buffer
		// bound holds and the lock stays short.
		v.reserved += cost
		v.mu.Unlock()
		// Cloned by append, which leaves the copied part unzeroed
		// (make then copy writes every byte twice).
		op.data = append([]byte(nil), data...)
		op.backing = len(data)
		v.mu.Lock()
		v.reserved -= cost
		if err := v.stateErrLocked(); err != nil {
			v.space.Broadcast()
			v.mu.Unlock()
			return 0, err
		}
	}
	v.lastID++
	id := v.lastID
	op.age = id
	v.stats.Accepted++
	v.stats.Coalesced += uint64(v.pending.insert(op))
	wake := v.inflight < v.cfg.MaxInflight
	v.mu.Unlock()
	if wake {
		select {
		case v.kick <- struct{}{}:
		default:
		}
	}
	return id, nil
}

// bufferedLocked is the number of bytes charged against MaxBufferBytes.
func (v *Volume) bufferedLocked() int64 {
	return v.reserved + v.pending.bytes + v.winBytes
}

// Flush returns once every operation accepted before the call is committed
// on a majority of sites (not necessarily applied locally yet). Concurrent
// flushes wait for the same commits; Flush itself sends nothing extra.
func (v *Volume) Flush() error {
	v.mu.Lock()
	if err := v.stateErrLocked(); err != nil {
		v.mu.Unlock()
		return err
	}
	id := v.lastID
	v.mu.Unlock()
	return v.waitCommitted(id)
}

// waitCommitted blocks until every op with ID <= id is committed, the
// Volume fails, or FlushTimeout passes.
func (v *Volume) waitCommitted(id uint64) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.err == nil && v.committedLocked() >= id {
		return nil
	}
	expired := false
	if v.cfg.FlushTimeout > 0 {
		t := time.AfterFunc(v.cfg.FlushTimeout, func() {
			v.mu.Lock()
			expired = true
			v.progress.Broadcast()
			v.mu.Unlock()
		})
		defer t.Stop()
	}
	for v.err == nil && v.committedLocked() < id {
		if expired {
			return fmt.Errorf("%w: volume %s: not committed after %v", ErrFlushTimeout, v.name, v.cfg.FlushTimeout)
		}
		v.progress.Wait()
	}
	return v.err
}

// Fence fails the Volume for good (ErrFenced, wrapping cause): every
// buffered operation is dropped, and every later write, flush and Close
// returns the error. Reads keep working. Call it when the writer learns
// that it lost its right to write; the FSM would reject its batches anyway
// (stale epoch), Fence only makes the failure immediate.
func (v *Volume) Fence(cause error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.err != nil {
		return
	}
	v.err = fmt.Errorf("%w: volume %s: %w", ErrFenced, v.name, cause)
	v.log.Error("writer fenced, dropping buffered writes", "err", cause)
	v.pending.clear()
	v.space.Broadcast()
	v.progress.Broadcast()
	select { // the pipeline drops the uncommitted batches
	case v.kick <- struct{}{}:
	default:
	}
}

// committedLocked returns the largest ID such that every op with that ID or
// a smaller one is committed. An op inherits the smallest ID of the
// buffered ops it overwrote or absorbed (see pendingSet.insert), so it is
// enough to look at the IDs of the ops still uncommitted.
func (v *Volume) committedLocked() uint64 {
	oldest := uint64(math.MaxUint64)
	if v.pending.head != nil {
		oldest = v.pending.head.age
	}
	for _, b := range v.window {
		if b.seq > v.ackSeq && b.minAge < oldest {
			oldest = b.minAge
		}
	}
	if oldest == math.MaxUint64 {
		return v.lastID
	}
	return oldest - 1
}

// Range is a byte range of a volume.
type Range struct{ Off, Len int64 }

// Buffered returns the ranges of the buffered operations (writes, trims,
// zeroings not yet applied locally) that overlap [off, off+length), clipped
// to it, in no particular order. The local copy's allocation there is not
// final. Like ReadAt, a caller that combines them with the local copy must
// call Buffered first and read the local copy after: an operation that
// leaves the buffer in between is applied locally by then (DESIGN.md).
func (v *Volume) Buffered(off, length int64) []Range {
	if length <= 0 {
		return nil
	}
	end := off + length
	if end < off {
		end = math.MaxInt64
	}
	v.mu.Lock()
	ops := v.captureLocked(nil, off, end)
	v.mu.Unlock()
	out := make([]Range, 0, len(ops))
	for _, op := range ops {
		lo, hi := max(op.Off, off), min(op.Off+op.Len, end)
		if lo < hi {
			out = append(out, Range{Off: lo, Len: hi - lo})
		}
	}
	return out
}

// Close is Shutdown without a deadline: it flushes every buffered operation
// (retrying for as long as the cluster is unavailable), waits until they are
// applied locally, and stops the background goroutines. It returns the
// sticky error if the Volume failed; a second call returns ErrClosed.
func (v *Volume) Close() error {
	return v.Shutdown(context.Background())
}

// Shutdown is Close with a deadline: if ctx ends before every buffered
// operation is committed and applied, it abandons them (the data is lost)
// and returns an error wrapping ErrClosed and ctx.Err(). New operations are
// refused (ErrClosed) as soon as Shutdown starts; operations already
// accepted are still committed.
func (v *Volume) Shutdown(ctx context.Context) error {
	v.mu.Lock()
	if v.closed {
		v.mu.Unlock()
		return fmt.Errorf("%w: %s", ErrClosed, v.name)
	}
	v.closed = true
	v.space.Broadcast()
	wake := context.AfterFunc(ctx, func() {
		v.mu.Lock()
		v.progress.Broadcast()
		v.mu.Unlock()
	})
	for (v.pending.len() > 0 || len(v.window) > 0) && ctx.Err() == nil {
		v.progress.Wait()
	}
	wake()
	var abandoned int64
	if v.pending.len() > 0 || len(v.window) > 0 {
		abandoned = v.pending.bytes + v.winBytes
		if v.err == nil {
			v.err = fmt.Errorf("%w: %s: shutdown with %d bytes not yet committed and applied: %w", ErrClosed, v.name, abandoned, ctx.Err())
		}
		v.progress.Broadcast()
	}
	err := v.err
	v.mu.Unlock()

	if abandoned > 0 {
		v.log.Error("shutdown abandoned buffered writes", "bytes", abandoned, "err", err)
		v.cancel() // in-flight Commit and WaitApplied calls return
	}
	close(v.stop)
	v.done.Wait()
	v.cancel()

	v.mu.Lock()
	v.pending.clear()
	v.window, v.winBytes = nil, 0
	v.mu.Unlock()
	return err
}

// Stats returns a snapshot of the counters.
func (v *Volume) Stats() Stats {
	v.mu.Lock()
	s := v.stats
	s.Inflight = v.inflight
	s.PendingOps = v.pending.len()
	s.BufferedBytes = v.bufferedLocked()
	lat := v.latency.snapshot()
	v.mu.Unlock()
	// Sorted outside the lock: writers never wait for a stats call.
	s.CommitP50 = percentile(lat, 0.50)
	s.CommitP99 = percentile(lat, 0.99)
	return s
}
