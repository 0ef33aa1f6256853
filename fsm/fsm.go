// Package fsm is robib's replicated state machine: it applies the commands
// of the raft log (see command.go) to a volume.Store, deduplicates writer
// sessions, checkpoints its progress so a restart replays only a short tail
// of the log, and produces and installs snapshots without copying volumes.
// DESIGN.md explains the invariants and the crash and snapshot arguments.
package fsm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"github.com/robib/robib/volume"
)

// Defaults for Options.
const (
	DefaultCheckpointBytes    int64 = 256 << 20
	DefaultCheckpointInterval       = 5 * time.Second
	DefaultMaxSessions              = 4096
)

// Limits of VerifyChunks. They are part of the replicated semantics (a
// command outside them is rejected with ErrInvalidCommand at every site).
const (
	MaxVerifyLen       int64 = 256 << 20 // total range per command
	MinVerifyChunkSize int64 = 4 << 10
	// maxVerifyResults is how many verify reports a site keeps (local).
	maxVerifyResults = 64
)

// Options configures an FSM. Zero values mean the defaults.
type Options struct {
	// CheckpointBytes: checkpoint (fsync dirty volumes, persist the state)
	// once this many bytes of log entries were applied since the last
	// one. Default 256 MiB.
	CheckpointBytes int64
	// CheckpointInterval: ... or once this much time has passed since
	// the first entry applied after the last checkpoint. Checked on
	// Apply. Default 5s.
	CheckpointInterval time.Duration
	// MaxSessions caps the writer-session table; a new session beyond it
	// evicts the session with the oldest LastIndex. Default 4096.
	// It is part of the replicated semantics: every site MUST use the
	// same value, or their dedup decisions diverge.
	MaxSessions int
	// Logger; nil means slog.Default().
	Logger *slog.Logger
}

// DefaultOptions returns the recommended Options (New fills zero fields
// with the same values; Logger stays nil, meaning slog.Default()).
func DefaultOptions() Options {
	return Options{
		CheckpointBytes:    DefaultCheckpointBytes,
		CheckpointInterval: DefaultCheckpointInterval,
		MaxSessions:        DefaultMaxSessions,
	}
}

// Result is what Apply returns (as interface{}) for every entry.
type Result struct {
	Index     uint64 // the entry's log index
	Err       error  // nil, or wraps one of this package's errors
	Duplicate bool   // a WriteBatch already applied earlier; nothing was done
}

// VerifyReport is a site's answer to a VerifyChunks command: the SHA-256 of
// each chunk of the range as of the command's log index.
type VerifyReport struct {
	ID        string   `json:"id"`
	Volume    string   `json:"volume"`
	Index     uint64   `json:"index"`
	Off       int64    `json:"off"`
	Len       int64    `json:"len"`
	ChunkSize int64    `json:"chunk_size"`
	Hashes    []string `json:"hashes"` // hex SHA-256 per chunk; the last chunk may be short
	// Fuzzy: this site's volumes may contain writes from after Index
	// (it installed a snapshot whose image may hold them, or it restarted
	// and is replaying entries it had applied before), so the hashes may
	// differ from the other sites' without any real divergence. Ignore
	// such a report.
	Fuzzy bool `json:"fuzzy,omitempty"`
	// Error: the site could not read the range (local failure); Hashes
	// is empty.
	Error string `json:"error,omitempty"`
}

// Stats are counters for monitoring and tests.
type Stats struct {
	AppliedIndex        uint64
	CheckpointIndex     uint64 // applied index recorded in the state file
	Checkpoints         int    // checkpoints written by this FSM
	SkippedReplays      int    // entries skipped because Index <= checkpoint index
	Restores            int    // snapshots installed
	RestoreBytesWritten int64  // bytes written or trimmed by restores
	RestoreBytesSkipped int64  // bytes restores found already identical
	RestoreBytesKept    int64  // bytes restores left alone for a thin stream's keep records
	Sessions            int    // writer sessions in the dedup table
	Failed              error  // non-nil in the failed state
	// CatchUp is the snapshot install running at this site, if any
	// (Phase ""): bytes done of the stream's length since Started, from
	// which a rate and an ETA follow.
	CatchUp CatchUpProgress
}

// FSM is the replicated state machine over a volume.Store. It implements
// raft.FSM.
//
// Concurrency contract:
//   - Apply, Snapshot and Restore are called by raft from its one FSM
//     goroutine, never concurrently with each other. New, Close and
//     SnapshotStore's start-up recovery must not run concurrently with
//     them either (call them before raft starts / after it shut down).
//     The fields under "apply state" below belong to that goroutine.
//   - FSMSnapshot.Persist runs concurrently with Apply; it touches only
//     the bytes captured by Snapshot, never an FSM field.
//   - The SnapshotStore's Open streams volumes concurrently with Apply; it
//     uses only the volume.Store (safe for concurrent use) and
//     fuzzyBound (under mu).
//   - SetReplayBound is called before raft starts, like New.
//   - AppliedIndex, WaitApplied, VerifyResult, Stats, Store, CopyExact
//     and AtBoundary are safe from any goroutine; they read the fields
//     guarded by mu (AtBoundary also takes boundary).
//
// The FSM must be the only writer of its volume.Store: volume metadata is
// replicated state, and Apply trusts the store to hold exactly what the log
// produced.
type FSM struct {
	store    *volume.Store // immutable
	stateDir string        // immutable
	opts     Options       // immutable, defaults applied
	log      *slog.Logger  // immutable

	// Apply state: owned by the FSM goroutine (see above).
	sessions     map[uint64]*session
	dirty        map[string]*volume.Volume // written since the last checkpoint
	checkpointed uint64                    // Applied of the state file
	restoring    bool                      // the state file says a restore is unfinished
	pendingBytes int64                     // bytes applied since the last checkpoint
	pendingSince time.Time                 // first apply since the last checkpoint; zero if none
	bg           *bgCheckpoint             // periodic checkpoint running in the background, or nil

	// boundary is held by the FSM goroutine while one entry changes the
	// volumes and the applied index (Apply, from the first volume write
	// to setApplied) and for a whole Restore; AtBoundary holds it around
	// its callback, which therefore runs between two entries. Lock order:
	// boundary, then mu, then the volumes' locks.
	boundary sync.Mutex

	// mu guards the fields below. The FSM goroutine writes them under mu
	// and may read them without it (it is their only writer).
	mu      sync.Mutex
	applied uint64 // index of the last entry applied (or skipped)
	failed  error  // non-nil: the failed state; wraps ErrFailed
	closed  bool
	// fuzzyUntil: the volumes may hold effects of entries below this
	// index that this site has not applied (yet): after a restore (the
	// image's end record) or after a restart (SetReplayBound). A verify
	// below it is Fuzzy, and a snapshot streamed from the live volumes
	// says so in its end record (fuzzyBound).
	fuzzyUntil  uint64
	stats       Stats            // counters only; AppliedIndex etc. are filled in by Stats()
	leases      map[string]Lease // volume leases; written only by the FSM goroutine
	clusterID   string           // "" until SetClusterID; written only by the FSM goroutine
	verify      map[string]VerifyReport
	verifyOrder []string      // IDs in verify, oldest first
	changed     chan struct{} // closed when applied/failed/closed change; nil if nobody waits
	// base is the applied index of the state file last written (the
	// marker's while a restore is unfinished): CatchUpBase.Index.
	base uint64
	prog progress // the install in progress (Stats.CatchUp)
	// restoreSize is the length of the received stream the snapshot
	// store last opened for a restore (index 0: none), for progress.
	restoreSize struct {
		index uint64
		size  int64
	}

	// marks is the last-write map (catchup.go; its own lock).
	marks writeMap
	// onThinRefused, set by SnapshotStore before raft starts, removes the
	// received thin snapshots of an index Restore refused (checkThin).
	onThinRefused func(index uint64)
}

// New returns an FSM over store that keeps its state in stateDir (created
// if needed). It loads the state file written by the last checkpoint: the
// applied index and the session table. A corrupt state file is an error,
// as is a missing one while the store already holds volumes (the log could
// not be replayed onto them correctly). If the state file records an
// interrupted snapshot restore, the FSM starts in the failed state until a
// snapshot is installed (SnapshotStore does that at start-up).
//
// The FSM does not own store: Close does not close it.
func New(store *volume.Store, stateDir string, opts Options) (*FSM, error) {
	if opts.CheckpointBytes <= 0 {
		opts.CheckpointBytes = DefaultCheckpointBytes
	}
	if opts.CheckpointInterval <= 0 {
		opts.CheckpointInterval = DefaultCheckpointInterval
	}
	if opts.MaxSessions <= 0 {
		opts.MaxSessions = DefaultMaxSessions
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("fsm: state dir: %w", err)
	}
	_ = os.Remove(filepath.Join(stateDir, stateTmpName)) // an unfinished checkpoint
	img, err := readStateFile(stateDir)
	if err != nil {
		return nil, fmt.Errorf("fsm: cannot load state (fix or remove it together with the volumes and the raft data): %w", err)
	}
	if img == nil {
		if n := len(store.List()) + len(store.Broken()); n > 0 {
			return nil, fmt.Errorf("fsm: no state file in %s but the volume store %s holds %d volumes; "+
				"the log cannot be replayed onto them", stateDir, store.Dir(), n)
		}
		img = &stateImage{}
		// Write the empty state now: a crash inside the first Create
		// (after the store created the volume, before the checkpoint
		// after it; the one before it has nothing to write at index 0)
		// would otherwise leave volumes without a state file, which
		// the check above refuses.
		if err := writeStateFile(stateDir, img); err != nil {
			return nil, fmt.Errorf("fsm: initial state: %w", err)
		}
	}
	f := &FSM{
		store:        store,
		stateDir:     stateDir,
		opts:         opts,
		log:          opts.Logger,
		sessions:     sessionMap(img.Sessions),
		dirty:        make(map[string]*volume.Volume),
		checkpointed: img.Applied,
		fuzzyUntil:   img.FuzzyUntil,
		restoring:    img.Restoring,
		applied:      img.Applied,
		leases:       leaseMap(img.Leases),
		clusterID:    img.ClusterID,
		verify:       make(map[string]VerifyReport),
	}
	f.base = img.Applied
	f.stats.CheckpointIndex = img.Applied
	f.stats.Sessions = len(f.sessions)
	if img.Restoring {
		f.marks.invalidate() // the volumes are neither state
	} else {
		// Entries after the checkpoint are replayed through Apply and
		// marked; what came before is not known.
		f.marks.reset(img.Applied, store.List())
	}
	f.dropOrphanLeases("state file", func(name string) bool {
		_, err := store.Get(name)
		return err == nil || !errors.Is(err, volume.ErrNotFound)
	})
	if img.Restoring {
		f.failed = fmt.Errorf("%w: a snapshot restore was interrupted; waiting for a snapshot to be installed", ErrFailed)
		f.log.Error("fsm: interrupted snapshot restore; not applying entries until a snapshot is installed")
	}
	for name, err := range store.Broken() {
		f.log.Error("fsm: volume is broken; commands touching it will fail this site", "volume", name, "err", err)
	}
	f.log.Info("fsm: state loaded", "applied", img.Applied, "sessions", len(img.Sessions))
	return f, nil
}

// Store returns the volume store.
func (f *FSM) Store() *volume.Store { return f.store }

// SetReplayBound tells the FSM the last index of the raft log store as it
// is at start-up. Call it after New and before raft starts (with
// lastLogIndex from the log store's LastIndex).
//
// After a crash the volumes may already hold effects of entries after the
// checkpoint C that the state file records (applied before the crash, not
// yet checkpointed); every such entry is still in the raft log, so none is
// above lastLogIndex. Until this site has applied past lastLogIndex, its
// verify reports are marked Fuzzy and a snapshot it streams from its live
// volumes carries at least lastLogIndex+1 as its fuzzy-until bound (see
// DESIGN.md, "Restart and replay" and "Why a fuzzy image is correct").
// Without the call a restarted site cannot know how far its volumes are
// ahead of its applied index.
func (f *FSM) SetReplayBound(lastLogIndex uint64) {
	f.mu.Lock()
	raised := lastLogIndex > f.checkpointed && lastLogIndex >= f.fuzzyUntil
	if raised {
		f.fuzzyUntil = lastLogIndex + 1
	}
	f.mu.Unlock()
	if raised {
		f.log.Info("fsm: until the log is replayed past its last index, volumes may be ahead of the applied index",
			"checkpoint", f.checkpointed, "fuzzy_until", lastLogIndex+1)
	}
}

// fuzzyBound is the fuzzy-until index of a snapshot streamed from the live
// volumes now: every byte read from them reflects entries below it. That
// is the entry being applied (applied+1), unless the volumes are ahead of
// the applied index (fuzzyUntil: a restore's image or a restart's replay).
// Safe from any goroutine.
func (f *FSM) fuzzyBound() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return max(f.fuzzyUntil, f.applied+1)
}

// setFuzzyUntil sets fuzzyUntil (FSM goroutine only).
func (f *FSM) setFuzzyUntil(v uint64) {
	f.mu.Lock()
	f.fuzzyUntil = v
	f.mu.Unlock()
}

// AtBoundary runs fn between two entries: while fn runs no entry is being
// applied to any volume (nor a snapshot installed), and applied is the
// index of the last entry applied, so the volumes hold exactly what the
// entries up to applied left in them (CopyExact says whether they hold
// nothing later). A caller can read a volume's state and the index it
// reflects together, e.g. a repair token and the applied index.
//
// fn must be short (the apply loop waits for it) and must not wait for
// the FSM (WaitApplied, Apply: a deadlock); it may read volumes and call
// AppliedIndex, Stats and CopyExact. AtBoundary waits for the entry being
// applied, and for a snapshot install for as long as it runs.
func (f *FSM) AtBoundary(fn func(applied uint64)) {
	f.boundary.Lock()
	defer f.boundary.Unlock()
	fn(f.AppliedIndex())
}

// CopyExact reports whether this site's volumes hold exactly the
// replicated state at its applied index: the FSM is neither failed nor
// closed, and neither a snapshot image nor a restart's replay leaves the
// volumes ahead of the applied index (it is at or past the fuzzy-until
// index; see DESIGN.md). Call it inside AtBoundary for an answer that
// holds for what the callback reads.
func (f *FSM) CopyExact() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.failed == nil && !f.closed && f.applied >= f.fuzzyUntil
}

// AppliedIndex returns the index of the last log entry applied (including
// rejected and duplicate ones). Only command entries reach the FSM, so it
// can be lower than raft's applied index (no-op and configuration entries).
func (f *FSM) AppliedIndex() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.applied
}

// WaitApplied blocks until an entry with index >= index has been applied,
// ctx is done, the FSM fails (the error wraps ErrFailed) or is closed
// (ErrClosed). Entries that are not commands (raft no-op, barrier and
// configuration entries) never reach the FSM: wait for the index of a
// command, e.g. the one returned by raft's Apply.
func (f *FSM) WaitApplied(ctx context.Context, index uint64) error {
	for {
		f.mu.Lock()
		switch {
		case f.applied >= index:
			f.mu.Unlock()
			return nil
		case f.failed != nil:
			err := f.failed
			f.mu.Unlock()
			return err
		case f.closed:
			f.mu.Unlock()
			return ErrClosed
		}
		if f.changed == nil {
			f.changed = make(chan struct{})
		}
		ch := f.changed
		f.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// notifyLocked wakes WaitApplied callers. The caller holds mu.
func (f *FSM) notifyLocked() {
	if f.changed != nil {
		close(f.changed)
		f.changed = nil
	}
}

// VerifyResult returns the report of the VerifyChunks command with this ID,
// if this site applied it recently (the last 64 are kept, in memory only).
func (f *FSM) VerifyResult(id string) (VerifyReport, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	r, ok := f.verify[id]
	if ok {
		r.Hashes = append([]string(nil), r.Hashes...)
	}
	return r, ok
}

// Stats returns a snapshot of the counters.
func (f *FSM) Stats() Stats {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.stats
	s.AppliedIndex = f.applied
	s.Failed = f.failed
	if f.prog.phase != "" {
		s.CatchUp = CatchUpProgress{Phase: f.prog.phase, Started: f.prog.started, Done: f.prog.done.Load(), Total: f.prog.total}
	}
	return s
}

// Close writes a final checkpoint (unless the FSM is in the failed state)
// and wakes WaitApplied callers with ErrClosed. Call it after raft has shut
// down. It does not close the volume store. It is idempotent.
func (f *FSM) Close() error {
	f.mu.Lock()
	closed, failed := f.closed, f.failed
	f.mu.Unlock()
	if closed {
		return nil
	}
	var err error
	if failed == nil {
		if err = f.checkpoint(); err != nil {
			err = fmt.Errorf("fsm: final checkpoint: %w", err)
		}
	} else {
		_ = f.reapCheckpoint(true) // it must not outlive the store
	}
	f.mu.Lock()
	f.closed = true
	f.notifyLocked()
	f.mu.Unlock()
	return err
}

// failure returns the error every Apply returns in the failed or closed
// state, or nil.
func (f *FSM) failure() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failed != nil {
		return f.failed
	}
	if f.closed {
		return ErrClosed
	}
	return nil
}

// fail enters the failed state because of a local error while handling the
// entry at index.
func (f *FSM) fail(index uint64, cause error) error {
	f.mu.Lock()
	first := f.failed == nil
	if first {
		f.failed = fmt.Errorf("%w: entry %d: %v", ErrFailed, index, cause)
		f.notifyLocked()
	}
	err := f.failed
	f.mu.Unlock()
	if first {
		f.log.Error("fsm: local failure; this site stops applying entries until it is restarted "+
			"(the log is replayed from the last checkpoint) or a snapshot is installed",
			"index", index, "checkpoint", f.checkpointed, "err", cause)
	}
	return err
}

func (f *FSM) setApplied(index uint64) {
	f.mu.Lock()
	f.applied = index
	f.notifyLocked()
	f.mu.Unlock()
}

// Apply applies one committed log entry and returns a *Result. See
// DESIGN.md for the rules; in short: entries at or below the checkpoint
// index are skipped (they are replays after a restart), the command is
// validated completely against the replicated state before anything
// changes, and a local I/O failure puts the FSM into the failed state.
func (f *FSM) Apply(l *raft.Log) interface{} {
	res := &Result{Index: l.Index}
	if err := f.failure(); err != nil {
		res.Err = err
		return res
	}
	if l.Type != raft.LogCommand {
		return res // raft passes only commands; nothing to do
	}
	if err := f.reapCheckpoint(false); err != nil {
		res.Err = f.fail(l.Index, err)
		return res
	}
	if l.Index <= f.checkpointed {
		f.mu.Lock()
		f.stats.SkippedReplays++
		f.mu.Unlock()
		return res
	}
	var (
		out   outcome
		local error
	)
	cmd, err := Decode(l.Data)
	f.boundary.Lock()
	if err != nil {
		out.err = err
	} else {
		out, local = f.applyCommand(l.Index, cmd)
	}
	if local != nil {
		res.Err = f.fail(l.Index, local)
		f.boundary.Unlock()
		return res
	}
	res.Err, res.Duplicate = out.err, out.duplicate
	f.setApplied(l.Index)
	f.boundary.Unlock()

	f.pendingBytes += int64(len(l.Data))
	now := time.Now()
	if f.pendingSince.IsZero() {
		f.pendingSince = now
	}
	switch {
	case out.metaChanged:
		if err := f.checkpoint(); err != nil {
			res.Err = f.fail(l.Index, err)
		}
	case f.bg == nil && (f.pendingBytes >= f.opts.CheckpointBytes || now.Sub(f.pendingSince) >= f.opts.CheckpointInterval):
		// Periodic checkpoints run in the background: syncing up to
		// CheckpointBytes of volume data inside Apply would stall every
		// writer waiting for its batch to be applied here.
		f.startCheckpoint()
	}
	return res
}

// outcome is the replicated verdict on one command.
type outcome struct {
	err         error // deterministic rejection, or nil
	duplicate   bool
	metaChanged bool // volume metadata changed: checkpoint now
}

// applyCommand validates and applies cmd. A non-nil local error is a local
// failure (I/O); the outcome is then meaningless.
func (f *FSM) applyCommand(index uint64, cmd Command) (outcome, error) {
	switch c := cmd.(type) {
	case *WriteBatch:
		return f.applyWriteBatch(index, c)
	case *CreateVolume:
		return f.applyCreate(index, c)
	case *DeleteVolume:
		return f.applyDelete(c)
	case *ResizeVolume:
		return f.applyResize(index, c)
	case *EndSession:
		if c.Session == 0 {
			return outcome{err: fmt.Errorf("%w: session 0", ErrInvalidCommand)}, nil
		}
		// A pinned session outlives its EndSession: forgetting it while
		// its epoch can still write would let a late copy of its first
		// batch start it afresh. It goes with its lease.
		if s := f.sessions[c.Session]; s != nil && !f.pinned(s) {
			delete(f.sessions, c.Session)
			f.updateSessionCount()
		}
		return outcome{}, nil
	case *VerifyChunks:
		return f.applyVerify(index, c), nil
	case *AcquireLease:
		return f.applyAcquire(c)
	case *ReleaseLease:
		return f.applyRelease(c), nil
	case *SetClusterID:
		return f.applySetClusterID(c), nil
	}
	return outcome{err: fmt.Errorf("%w: unhandled command %T", ErrBadCommand, cmd)}, nil
}

// getVolume looks a volume up. A missing volume is the replicated verdict
// ErrUnknownVolume; any other error (a broken volume, a closed store) is
// local and returned as the second error.
func (f *FSM) getVolume(name string) (v *volume.Volume, verdict, local error) {
	v, err := f.store.Get(name)
	switch {
	case err == nil:
		return v, nil, nil
	case errors.Is(err, volume.ErrNotFound):
		return nil, fmt.Errorf("%w: %q", ErrUnknownVolume, name), nil
	default:
		return nil, nil, err
	}
}

func (f *FSM) applyWriteBatch(index uint64, b *WriteBatch) (outcome, error) {
	if b.Session == 0 || b.Seq == 0 {
		return outcome{err: fmt.Errorf("%w: session %d seq %d (both must be non-zero)", ErrInvalidCommand, b.Session, b.Seq)}, nil
	}
	s := f.sessions[b.Session]
	switch {
	case s != nil && s.Failed != "":
		return outcome{err: ErrorFromCode(s.Failed, fmt.Sprintf("session %x lost a batch earlier (%s); it accepts no more writes", b.Session, s.Failed))}, nil
	case s == nil && b.Seq != 1:
		// An unknown session's batch after the first: a session dropped
		// with its lease is told why (its writer was fenced), any other
		// writer to resend from Seq 1.
		if err := f.checkEpoch(b.Volume, b.Epoch); err != nil {
			f.recordSession(b, index)
			f.sessions[b.Session].Failed = ErrorCode(err)
			return outcome{err: err}, nil
		}
		return outcome{err: fmt.Errorf("%w: session %x is unknown (new or evicted) and seq is %d, not 1",
			ErrSeqGap, b.Session, b.Seq)}, nil
	case s != nil && b.Seq <= s.LastSeq:
		return outcome{duplicate: true}, nil
	case s != nil && b.Seq > s.LastSeq+1:
		return outcome{err: fmt.Errorf("%w: session %x seq %d after %d", ErrSeqGap, b.Session, b.Seq, s.LastSeq)}, nil
	}
	verdict, local := f.applyOps(index, b)
	if local != nil {
		return outcome{}, local
	}
	// The verdict, accepted or rejected, is the answer for this Seq; a
	// rejection fails the session for good (see session.Failed).
	f.recordSession(b, index)
	if verdict != nil {
		f.sessions[b.Session].Failed = ErrorCode(verdict)
	}
	return outcome{err: verdict}, nil
}

// applyOps range-checks every op of b against the volume, then applies them
// all. It returns a replicated verdict or a local error.
func (f *FSM) applyOps(index uint64, b *WriteBatch) (verdict, local error) {
	v, verdict, local := f.getVolume(b.Volume)
	if verdict != nil || local != nil {
		return verdict, local
	}
	if b.Created != 0 && v.Meta().Created.UnixNano() != b.Created {
		return fmt.Errorf("%w: %q was deleted and recreated since this writer attached", ErrUnknownVolume, b.Volume), nil
	}
	if err := f.checkEpoch(b.Volume, b.Epoch); err != nil {
		return err, nil
	}
	size := v.Size()
	for i := range b.Ops {
		op := &b.Ops[i]
		if op.Off > size || op.Len > size-op.Off {
			return fmt.Errorf("%w: op %d [%d, +%d) on volume %q of size %d",
				ErrOutOfRange, i, op.Off, op.Len, b.Volume, size), nil
		}
	}
	f.marks.markOps(b.Volume, size, b.Ops, index) // before any op lands
	for i := range b.Ops {
		op := &b.Ops[i]
		if op.Len == 0 {
			continue
		}
		var err error
		switch op.Kind {
		case OpWrite:
			_, err = v.WriteAt(op.Data, op.Off)
		case OpTrim:
			err = v.Trim(op.Off, op.Len)
		case OpZero:
			err = v.WriteZeroes(op.Off, op.Len, op.NoHole)
		}
		if err != nil {
			f.dirty[b.Volume] = v // earlier ops may have landed
			return nil, fmt.Errorf("op %d: %w", i, err)
		}
	}
	if len(b.Ops) > 0 {
		f.dirty[b.Volume] = v
	}
	return nil, nil
}

// recordSession sets the LastSeq and LastIndex of b's session. A new
// session records b's volume and epoch; when it would exceed MaxSessions,
// the least recently used sessions that are not pinned (smallest LastIndex,
// unique per session) are evicted first. Pinned sessions are never evicted:
// there is at most one per held lease, so they cannot grow without bound.
func (f *FSM) recordSession(b *WriteBatch, index uint64) {
	if s := f.sessions[b.Session]; s != nil {
		s.LastSeq, s.LastIndex = b.Seq, index
		return
	}
	for len(f.sessions) >= f.opts.MaxSessions {
		var victim uint64
		oldest := ^uint64(0)
		for sid, s := range f.sessions {
			if f.pinned(s) {
				continue
			}
			if s.LastIndex < oldest || s.LastIndex == oldest && sid < victim {
				victim, oldest = sid, s.LastIndex
			}
		}
		if oldest == ^uint64(0) {
			break // every session is pinned
		}
		delete(f.sessions, victim)
		f.log.Debug("fsm: evicted writer session", "session", victim, "last_index", oldest)
	}
	f.sessions[b.Session] = &session{LastSeq: b.Seq, LastIndex: index, Volume: b.Volume, Epoch: b.Epoch}
	f.updateSessionCount()
}

// pinned reports whether s belongs to the lease its volume is held under
// right now (FSM goroutine only).
func (f *FSM) pinned(s *session) bool {
	if s.Epoch == 0 {
		return false
	}
	l, ok := f.leases[s.Volume]
	return ok && l.Holder != "" && l.Epoch == s.Epoch
}

// dropSessions forgets every session of volume: its lease was released or
// taken at a new epoch, or the volume was deleted. The epoch check rejects
// any later batch of them (FSM goroutine only).
func (f *FSM) dropSessions(volume string) {
	n := len(f.sessions)
	for id, s := range f.sessions {
		if s.Volume == volume && s.Epoch != 0 {
			delete(f.sessions, id)
		}
	}
	if len(f.sessions) != n {
		f.updateSessionCount()
	}
}

func (f *FSM) updateSessionCount() {
	f.mu.Lock()
	f.stats.Sessions = len(f.sessions)
	f.mu.Unlock()
}

// sameMeta reports whether two volume metadata records are equal.
func sameMeta(a, b volume.Meta) bool {
	return a.Size == b.Size && sameIncarnation(a, b)
}

// sameIncarnation reports whether two volume metadata records describe the
// same volume, possibly at different sizes: everything but Size, which only
// ResizeVolume changes, is fixed when the volume is created.
func sameIncarnation(a, b volume.Meta) bool {
	return a.Name == b.Name && a.BlockSize == b.BlockSize &&
		a.Created.UnixNano() == b.Created.UnixNano() && a.SyncWrites == b.SyncWrites
}

func (f *FSM) applyCreate(index uint64, c *CreateVolume) (outcome, error) {
	bs := c.BlockSize
	if bs == 0 {
		bs = volume.DefaultBlockSize
	}
	m := volume.Meta{Name: c.Name, Size: c.Size, BlockSize: bs, Created: time.Unix(0, c.Created).UTC(), SyncWrites: c.SyncWrites}
	if err := volume.ValidateMeta(m); err != nil {
		return outcome{err: fmt.Errorf("%w: %w", ErrInvalidCommand, err)}, nil
	}
	v, err := f.store.Get(c.Name)
	switch {
	case err == nil:
		// Creating the identical volume again is a no-op, which makes
		// a replayed Create idempotent (see DESIGN.md).
		if sameMeta(v.Meta(), m) {
			// Possibly the replay of the Create that made it, whose
			// marks were lost with a restart: marked anew (DESIGN.md).
			f.marks.markCreate(c.Name, m.Size, index)
			return outcome{}, nil
		}
		return outcome{err: fmt.Errorf("%w: %q", ErrVolumeExists, c.Name)}, nil
	case !errors.Is(err, volume.ErrNotFound):
		return outcome{}, err
	}
	if err := f.checkpoint(); err != nil {
		return outcome{}, err
	}
	f.marks.markCreate(c.Name, m.Size, index)
	if _, err := f.store.Create(m); err != nil {
		return outcome{}, err
	}
	return outcome{metaChanged: true}, nil
}

func (f *FSM) applyDelete(c *DeleteVolume) (outcome, error) {
	_, err := f.store.Get(c.Name)
	switch {
	case errors.Is(err, volume.ErrNotFound):
		// The volume is gone, so nothing else may refer to it either. If
		// this is the replay of a Delete whose store operation completed
		// before a crash (the state file is at the checkpoint before it),
		// the lease table still holds the volume's lease: drop it here,
		// so the replay reaches the same replicated state as the first
		// apply (DESIGN.md, "Restart and replay", per-volume state).
		if _, ok := f.leases[c.Name]; ok {
			f.log.Info("fsm: dropping the lease of a volume that no longer exists (replayed delete)", "volume", c.Name)
			f.setLease(c.Name, Lease{}, false)
		}
		f.dropSessions(c.Name) // its writer sessions too, as the first apply did
		delete(f.dirty, c.Name)
		f.marks.drop(c.Name)
		return outcome{err: fmt.Errorf("%w: %q", ErrUnknownVolume, c.Name)}, nil
	case err != nil && !errors.Is(err, volume.ErrCorrupt):
		return outcome{}, err // a broken volume (ErrCorrupt) can be deleted
	}
	if err := f.checkpoint(); err != nil {
		return outcome{}, err
	}
	delete(f.dirty, c.Name)
	f.marks.drop(c.Name)
	if err := f.store.Delete(c.Name); err != nil {
		return outcome{}, err
	}
	f.setLease(c.Name, Lease{}, false)
	f.dropSessions(c.Name)
	return outcome{metaChanged: true}, nil
}

func (f *FSM) applyResize(index uint64, c *ResizeVolume) (outcome, error) {
	v, verdict, local := f.getVolume(c.Name)
	if verdict != nil || local != nil {
		return outcome{err: verdict}, local
	}
	m := v.Meta()
	if m.Size == c.Size {
		return outcome{}, nil
	}
	old := m.Size
	m.Size = c.Size
	if err := volume.ValidateMeta(m); err != nil {
		return outcome{err: fmt.Errorf("%w: %w", ErrInvalidCommand, err)}, nil
	}
	if err := f.checkpoint(); err != nil {
		return outcome{}, err
	}
	f.marks.markResize(c.Name, old, c.Size, index)
	if err := f.store.Resize(c.Name, c.Size); err != nil {
		return outcome{}, err
	}
	return outcome{metaChanged: true}, nil
}

// applyVerify hashes the requested range. A read failure is reported in the
// VerifyReport and the Result (wrapping ErrFailed) but does not put the FSM
// into the failed state: nothing was changed, so nothing diverged.
func (f *FSM) applyVerify(index uint64, c *VerifyChunks) outcome {
	switch {
	case c.ChunkSize < MinVerifyChunkSize:
		return outcome{err: fmt.Errorf("%w: verify chunk size %d is below %d", ErrInvalidCommand, c.ChunkSize, MinVerifyChunkSize)}
	case c.Len <= 0 || c.Len > MaxVerifyLen:
		return outcome{err: fmt.Errorf("%w: verify length %d is not in [1, %d]", ErrInvalidCommand, c.Len, MaxVerifyLen)}
	}
	rep := VerifyReport{ID: c.ID, Volume: c.Volume, Index: index, Off: c.Off, Len: c.Len, ChunkSize: c.ChunkSize,
		Fuzzy: index < f.fuzzyUntil}
	v, verdict, local := f.getVolume(c.Volume)
	if verdict != nil {
		return outcome{err: verdict}
	}
	if v != nil {
		if size := v.Size(); c.Off > size || c.Len > size-c.Off {
			return outcome{err: fmt.Errorf("%w: verify [%d, +%d) on volume %q of size %d", ErrOutOfRange, c.Off, c.Len, c.Volume, size)}
		}
		h := sha256.New()
		for off := c.Off; off < c.Off+c.Len; off += c.ChunkSize {
			n := min(c.ChunkSize, c.Off+c.Len-off)
			h.Reset()
			if local = v.Hash(off, n, h); local != nil {
				break
			}
			rep.Hashes = append(rep.Hashes, hex.EncodeToString(h.Sum(nil)))
		}
	}
	var out outcome
	if local != nil {
		rep.Hashes = nil
		rep.Error = local.Error()
		out.err = fmt.Errorf("%w: verify %s: %v", ErrFailed, c.ID, local)
		f.log.Error("fsm: verify could not read the volume", "id", c.ID, "volume", c.Volume, "err", local)
	}
	f.mu.Lock()
	if _, ok := f.verify[c.ID]; !ok {
		f.verifyOrder = append(f.verifyOrder, c.ID)
	}
	f.verify[c.ID] = rep
	for len(f.verifyOrder) > maxVerifyResults {
		delete(f.verify, f.verifyOrder[0])
		f.verifyOrder = f.verifyOrder[1:]
	}
	f.mu.Unlock()
	return out
}

// checkpoint makes everything applied so far durable: fdatasync every
// volume written since the last checkpoint, then atomically replace the
// state file with the applied index and the session table. It is a no-op
// if nothing was applied since the last one.
func (f *FSM) checkpoint() error {
	// A background checkpoint covers volumes no longer in f.dirty: it must
	// be complete before a newer index can be recorded.
	if err := f.reapCheckpoint(true); err != nil {
		return err
	}
	if f.applied == f.checkpointed && len(f.dirty) == 0 {
		return nil
	}
	for name, v := range f.dirty {
		if err := v.Sync(); err != nil {
			return fmt.Errorf("checkpoint: %w", err)
		}
		delete(f.dirty, name)
	}
	img := &stateImage{Applied: f.applied, FuzzyUntil: f.fuzzyUntil, Sessions: sessionList(f.sessions), Leases: leaseList(f.leases), ClusterID: f.clusterID}
	if f.fuzzyUntil <= f.applied {
		img.FuzzyUntil = 0
	}
	if err := writeStateFile(f.stateDir, img); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	f.setBase(f.applied, false)
	f.checkpointed = f.applied
	f.setFuzzyUntil(img.FuzzyUntil)
	f.pendingBytes = 0
	f.pendingSince = time.Time{}
	f.mu.Lock()
	f.stats.Checkpoints++
	f.stats.CheckpointIndex = f.checkpointed
	f.mu.Unlock()
	return nil
}

// bgCheckpoint is a periodic checkpoint running in the background: it syncs
// the volumes dirtied up to img.Applied, then writes img as the state file.
type bgCheckpoint struct {
	img  *stateImage
	done chan error // receives the outcome once (buffered)
}

// startCheckpoint starts a background checkpoint of the state after the
// last applied entry (FSM goroutine only; none may be running). I1 holds
// for its image: the session and lease tables are copied now, and every
// volume written by entries up to now is synced before the state file
// names this index. Writes applied meanwhile may be synced too, which is
// harmless (replay overwrites them with the same bytes, I3).
func (f *FSM) startCheckpoint() {
	img := &stateImage{Applied: f.applied, FuzzyUntil: f.fuzzyUntil, Sessions: sessionList(f.sessions), Leases: leaseList(f.leases), ClusterID: f.clusterID}
	if f.fuzzyUntil <= f.applied {
		img.FuzzyUntil = 0
	}
	vols := f.dirty
	f.dirty = make(map[string]*volume.Volume)
	f.pendingBytes = 0
	f.pendingSince = time.Time{}
	bg := &bgCheckpoint{img: img, done: make(chan error, 1)}
	f.bg = bg
	go func() {
		for _, v := range vols {
			if err := v.Sync(); err != nil {
				bg.done <- fmt.Errorf("checkpoint: %w", err)
				return
			}
		}
		if err := writeStateFile(f.stateDir, img); err != nil {
			bg.done <- fmt.Errorf("checkpoint: %w", err)
			return
		}
		f.setBase(img.Applied, true)
		f.mu.Lock()
		f.stats.Checkpoints++
		f.stats.CheckpointIndex = max(f.stats.CheckpointIndex, img.Applied)
		f.mu.Unlock()
		bg.done <- nil
	}()
}

// reapCheckpoint collects the background checkpoint's outcome: waiting for
// it if block is set, else only if it has finished. A failure is a local
// failure of the FSM (the caller puts it in the failed state).
func (f *FSM) reapCheckpoint(block bool) error {
	if f.bg == nil {
		return nil
	}
	var err error
	if block {
		err = <-f.bg.done
	} else {
		select {
		case err = <-f.bg.done:
		default:
			return nil
		}
	}
	img := f.bg.img
	f.bg = nil
	if err != nil {
		return err
	}
	f.checkpointed = max(f.checkpointed, img.Applied)
	if img.FuzzyUntil == 0 && f.fuzzyUntil <= img.Applied {
		f.setFuzzyUntil(0)
	}
	return nil
}
