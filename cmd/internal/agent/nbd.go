package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/robib/robib/cluster"
	"github.com/robib/robib/dcd"
	"github.com/robib/robib/fsm"
	"github.com/robib/robib/nbdfront"
	"github.com/robib/robib/volume"
)

// nbdBackend exports the cluster's volumes over NBD at this site. All NBD
// connections to one volume at this site share one DCD write-back stage, so
// a flush on any connection covers writes completed on all of them
// (CAN_MULTI_CONN) and reads see every connection's writes.
//
// A read-write attach holds the volume's lease (cluster.AcquireLease) for as
// long as the stage is open: a second site's read-write attach is refused
// while this site renews it, and every batch carries the lease epoch, so a
// site that lost the lease can never land a write. The export name
// "VOLUME@ro" attaches read-only, anywhere, without a lease.
type nbdBackend struct {
	store    *volume.Store
	node     *cluster.Node
	dcd      dcd.Config
	leaseTTL time.Duration
	log      *slog.Logger

	mu     sync.Mutex // guards stages
	stages map[string]*stage
}

// stageStats returns the counters of the volume's write-back stage at this
// site, if it is attached read-write here.
func (b *nbdBackend) stageStats(name string) (dcd.Stats, bool) {
	b.mu.Lock()
	st := b.stages[name]
	var d *dcd.Volume
	if st != nil && st.busy == nil {
		d = st.dcd
	}
	b.mu.Unlock()
	if d == nil {
		return dcd.Stats{}, false
	}
	return d.Stats(), true
}

// readOnlySuffix, appended to a volume name, selects a read-only attach.
const readOnlySuffix = "@ro"

const (
	// releaseTimeout bounds how long closing a volume's write-back stage
	// waits for its buffered writes to commit. Writes not flushed by the
	// client may be lost past it (they were never acknowledged as durable).
	releaseTimeout = 30 * time.Second
	// attachTimeout bounds taking a volume's lease when a connection
	// attaches read-write (it needs a majority of sites).
	attachTimeout = 15 * time.Second
	// heldWait is how long an attach keeps asking for a lease that another
	// site holds before it is refused: long enough for a client that just
	// detached there to have its site release the lease.
	heldWait = 2 * time.Second
)

// stage is one volume's shared DCD stage and the connections using it.
// While busy is non-nil the stage is in transition: being opened (taking
// the lease) or closed (its buffered writes committing); a new connection
// waits for that, so it never reads the volume file without them or opens
// a second stage.
type stage struct {
	vol   *volume.Volume
	dcd   *dcd.Volume
	epoch uint64 // the volume lease epoch this stage writes under
	refs  int
	busy  chan struct{} // non-nil while opening or closing; closed when done

	stopRenew chan struct{} // closed to stop the lease renewal
	renewDone chan struct{} // closed when the renewal goroutine returned
}

func exportInfo(m volume.Meta) nbdfront.ExportInfo {
	return nbdfront.ExportInfo{
		Name:           m.Name,
		Description:    fmt.Sprintf("robib volume %s", m.Name),
		Size:           m.Size,
		MinBlock:       1,
		PrefBlock:      uint32(m.BlockSize),
		MultiConn:      true,
		CanTrim:        true,
		CanZero:        true,
		CanFastZero:    true,
		CanBlockStatus: true,
	}
}

func readOnlyInfo(m volume.Meta) nbdfront.ExportInfo {
	info := exportInfo(m)
	info.Name = m.Name + readOnlySuffix
	info.Description = fmt.Sprintf("robib volume %s, read-only (this site's copy)", m.Name)
	info.ReadOnly = true
	return info
}

func (b *nbdBackend) List() ([]nbdfront.ExportInfo, error) {
	var out []nbdfront.ExportInfo
	for _, m := range b.store.List() {
		out = append(out, exportInfo(m))
	}
	return out, nil
}

// lookup resolves an export name to its volume and access mode.
func (b *nbdBackend) lookup(name string) (v *volume.Volume, readOnly bool, err error) {
	vol, readOnly := strings.CutSuffix(name, readOnlySuffix)
	if vol == "" {
		return nil, false, fmt.Errorf("%w: robib has no default export; name a volume (or VOLUME%s for read-only)", nbdfront.ErrUnknownExport, readOnlySuffix)
	}
	v, err = b.store.Get(vol)
	if err != nil {
		return nil, false, fmt.Errorf("%w: %w", nbdfront.ErrUnknownExport, err)
	}
	return v, readOnly, nil
}

func (b *nbdBackend) Info(name string) (nbdfront.ExportInfo, error) {
	v, ro, err := b.lookup(name)
	if err != nil {
		return nbdfront.ExportInfo{}, err
	}
	if ro {
		return readOnlyInfo(v.Meta()), nil
	}
	return exportInfo(v.Meta()), nil
}

func (b *nbdBackend) Open(name string) (nbdfront.Export, error) {
	v, ro, err := b.lookup(name)
	if err != nil {
		return nil, err
	}
	if ro {
		return &roExport{vol: v, info: readOnlyInfo(v.Meta())}, nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	st := b.stages[name]
	for st != nil && st.busy != nil {
		ch := st.busy
		b.mu.Unlock()
		<-ch
		b.mu.Lock()
		st = b.stages[name]
	}
	// A new stage when there is none, when the volume was deleted and
	// recreated, or when the stage failed for good (its lease was taken
	// over, a batch was rejected): its remaining connections keep their
	// errors, a new attach starts afresh (and takes the lease again).
	if st == nil || st.vol != v || st.dcd.Err() != nil {
		st = &stage{vol: v, busy: make(chan struct{})}
		b.stages[name] = st
		b.mu.Unlock()
		err := b.openStage(name, st)
		b.mu.Lock()
		close(st.busy)
		st.busy = nil
		if err != nil {
			if b.stages[name] == st {
				delete(b.stages, name)
			}
			return nil, err
		}
	}
	st.refs++
	return &export{b: b, name: name, st: st, info: exportInfo(v.Meta())}, nil
}

// openStage takes the volume's lease for this site and opens the stage's
// DCD volume under its epoch.
func (b *nbdBackend) openStage(name string, st *stage) error {
	meta := st.vol.Meta()
	ctx, cancel := context.WithTimeout(context.Background(), attachTimeout)
	defer cancel()
	epoch, err := b.acquire(ctx, name, meta.Created.UnixNano())
	if err != nil {
		return err
	}
	cfg := b.dcd
	cfg.SyncWrites = meta.SyncWrites
	cfg.VolumeCreated = meta.Created.UnixNano()
	cfg.Epoch = epoch
	cfg.Logger = b.log.With("volume", name, "epoch", epoch)
	d, err := dcd.New(name, st.vol, b.node, cfg)
	if err != nil {
		b.releaseLease(name, epoch)
		return fmt.Errorf("opening write-back stage for %s: %w", name, err)
	}
	st.dcd, st.epoch = d, epoch
	st.stopRenew, st.renewDone = make(chan struct{}), make(chan struct{})
	go b.renewLoop(name, st)
	return nil
}

// acquire takes the lease, asking again for a short while if another site
// holds it (it may be releasing it right now).
func (b *nbdBackend) acquire(ctx context.Context, name string, created int64) (uint64, error) {
	deadline := time.Now().Add(heldWait)
	for {
		epoch, err := b.node.AcquireLease(ctx, name, created)
		switch {
		case err == nil:
			return epoch, nil
		case errors.Is(err, cluster.ErrLeaseHeld) && time.Now().Before(deadline):
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
				continue
			}
			fallthrough
		case errors.Is(err, cluster.ErrLeaseHeld):
			return 0, fmt.Errorf("%w: %w; attach it read-only as %s%s, or detach it there first",
				nbdfront.ErrBusy, err, name, readOnlySuffix)
		case errors.Is(err, fsm.ErrUnknownVolume):
			return 0, fmt.Errorf("%w: %w", nbdfront.ErrUnknownExport, err)
		default:
			return 0, fmt.Errorf("taking the write lease of %s (it needs a majority of sites): %w", name, err)
		}
	}
}

// renewLoop renews the stage's lease every TTL/4 until the stage closes.
// If the lease turns out to be lost (another site took it after this one
// failed to renew it, e.g. behind a partition), the stage is fenced: its
// buffered writes are dropped and every later write or flush fails.
func (b *nbdBackend) renewLoop(name string, st *stage) {
	defer close(st.renewDone)
	log := b.log.With("volume", name, "epoch", st.epoch)
	ttl := b.leaseTTL
	if ttl <= 0 {
		ttl = cluster.DefaultLeaseTTL
	}
	t := time.NewTicker(ttl / 4)
	defer t.Stop()
	lastOK := time.Now()
	for {
		select {
		case <-st.stopRenew:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), ttl/2)
		err := b.node.RenewLease(ctx, name, st.epoch)
		cancel()
		switch {
		case err == nil:
			if time.Since(lastOK) > ttl/2 {
				log.Info("volume lease renewed again", "after", time.Since(lastOK).Round(time.Millisecond))
			}
			lastOK = time.Now()
		case errors.Is(err, cluster.ErrLeaseLost):
			log.Error("volume lease lost to another site; this site's writers are fenced", "err", err)
			st.dcd.Fence(err)
			return
		case time.Since(lastOK) > ttl/2:
			log.Warn("cannot renew the volume lease", "unrenewed_for", time.Since(lastOK).Round(time.Millisecond), "err", err)
		}
	}
}

// stopRenewal stops a stage's renewal goroutine and waits for it.
func (st *stage) stopRenewal() {
	close(st.stopRenew)
	<-st.renewDone
}

// releaseLease gives the lease up, best effort: if it fails (no majority)
// the lease simply expires.
func (b *nbdBackend) releaseLease(name string, epoch uint64) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := b.node.ReleaseLease(ctx, name, epoch); err != nil {
		b.log.Warn("releasing volume lease; it will expire instead", "volume", name, "epoch", epoch, "err", err)
	}
}

// release drops one connection's reference; the last one closes the stage
// (flushing it), ends its writer session in the FSM and gives the lease up.
func (b *nbdBackend) release(name string, st *stage) error {
	b.mu.Lock()
	st.refs--
	if st.refs > 0 {
		b.mu.Unlock()
		return nil
	}
	st.busy = make(chan struct{})
	b.mu.Unlock()

	err := b.closeStage(name, st, releaseTimeout)
	b.closed(name, st)
	return err
}

// closed unregisters a stage that finished closing and wakes the
// connections waiting for it.
func (b *nbdBackend) closed(name string, st *stage) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.stages[name] == st {
		delete(b.stages, name)
	}
	close(st.busy)
	st.busy = nil
}

// closeStage flushes and closes a stage's DCD volume (abandoning what is not
// committed within timeout), then ends its session and releases its lease.
func (b *nbdBackend) closeStage(name string, st *stage, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	err := st.dcd.Shutdown(ctx)
	st.stopRenewal()
	if _, e := b.node.Apply(ctx, &fsm.EndSession{Session: st.dcd.Session()}); e != nil {
		b.log.Debug("ending writer session", "volume", name, "err", e)
	}
	b.releaseLease(name, st.epoch)
	return err
}

// abortAll shuts every open stage down at once, abandoning writes that are
// not committed yet: their waiting flushes fail. Leases are left to expire.
func (b *nbdBackend) abortAll() {
	b.mu.Lock()
	var stages []*stage
	for _, st := range b.stages {
		if st.busy == nil {
			stages = append(stages, st)
		}
	}
	b.mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for _, st := range stages {
		_ = st.dcd.Shutdown(ctx)
	}
}

// closeAll flushes every stage at shutdown and releases its lease.
func (b *nbdBackend) closeAll() {
	b.mu.Lock()
	var stages = map[string]*stage{}
	for name, st := range b.stages {
		if st.busy == nil { // busy ones are being opened or closed
			st.busy = make(chan struct{})
			stages[name] = st
		}
	}
	b.mu.Unlock()
	for name, st := range stages {
		if err := b.closeStage(name, st, releaseTimeout); err != nil {
			b.log.Error("flushing volume at shutdown", "volume", name, "err", err)
		}
		b.closed(name, st)
	}
}

// roExport is a read-only connection: it reads this site's copy of the
// volume (everything applied here), needs no lease and buffers nothing.
type roExport struct {
	vol  *volume.Volume
	info nbdfront.ExportInfo
}

func (e *roExport) Info() nbdfront.ExportInfo               { return e.info }
func (e *roExport) ReadAt(p []byte, off int64) (int, error) { return e.vol.ReadAt(p, off) }
func (e *roExport) WriteAt([]byte, int64) (int, error) {
	return 0, fmt.Errorf("%w: read-only attach", nbdfront.ErrReadOnly)
}
func (e *roExport) Flush() error { return nil }
func (e *roExport) Trim(int64, int64) error {
	return fmt.Errorf("%w: read-only attach", nbdfront.ErrReadOnly)
}
func (e *roExport) WriteZeroes(int64, int64, bool) error {
	return fmt.Errorf("%w: read-only attach", nbdfront.ErrReadOnly)
}
func (e *roExport) BlockStatus(off, length int64) ([]nbdfront.Extent, error) {
	exts, err := e.vol.BlockStatus(off, length)
	if err != nil {
		return nil, err
	}
	out := make([]nbdfront.Extent, 0, len(exts))
	for _, x := range exts {
		out = append(out, nbdfront.Extent{Length: x.Length, Hole: x.Hole, Zero: x.Hole})
	}
	return out, nil
}
func (e *roExport) Close() error { return nil }

// export is one NBD connection's handle on a volume.
type export struct {
	b    *nbdBackend
	name string
	st   *stage
	info nbdfront.ExportInfo
	once sync.Once
}

func (e *export) Info() nbdfront.ExportInfo                { return e.info }
func (e *export) ReadAt(p []byte, off int64) (int, error)  { return e.st.dcd.ReadAt(p, off) }
func (e *export) WriteAt(p []byte, off int64) (int, error) { return e.st.dcd.WriteAt(p, off) }
func (e *export) Flush() error                             { return e.st.dcd.Flush() }
func (e *export) Trim(off, length int64) error             { return e.st.dcd.Trim(off, length) }
func (e *export) WriteZeroes(off, length int64, noHole bool) error {
	return e.st.dcd.WriteZeroes(off, length, noHole)
}

func (e *export) Close() error {
	var err error
	e.once.Do(func() { err = e.b.release(e.name, e.st) })
	return err
}

// BlockStatus reports the local copy's allocation, except that ranges with
// buffered (not yet applied) writes are reported as data.
func (e *export) BlockStatus(off, length int64) ([]nbdfront.Extent, error) {
	exts, err := e.st.vol.BlockStatus(off, length)
	if err != nil {
		return nil, err
	}
	out := make([]nbdfront.Extent, 0, len(exts))
	for _, x := range exts {
		hole := x.Hole && !e.st.dcd.Pending(x.Offset, x.Length)
		out = append(out, nbdfront.Extent{Length: x.Length, Hole: hole, Zero: hole})
	}
	return out, nil
}

// nbdErrorCode maps errors of the layers below nbdfront to NBD error codes.
func nbdErrorCode(err error) uint32 {
	switch {
	case errors.Is(err, volume.ErrOutOfRange), errors.Is(err, dcd.ErrOutOfRange), errors.Is(err, fsm.ErrOutOfRange):
		return nbdfront.EINVAL
	case errors.Is(err, volume.ErrClosed), errors.Is(err, dcd.ErrClosed), errors.Is(err, cluster.ErrClosed):
		return nbdfront.ESHUTDOWN
	case errors.Is(err, dcd.ErrFailed), errors.Is(err, dcd.ErrFlushTimeout):
		// Lost writes (rejected, fenced) and flushes without a majority:
		// an I/O error the client must see, not a shutdown it would
		// retry elsewhere as if nothing happened.
		return nbdfront.EIO
	}
	return nbdfront.DefaultErrorCode(err)
}
