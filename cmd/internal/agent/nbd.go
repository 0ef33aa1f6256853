package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/robib/robib/cluster"
	"github.com/robib/robib/cmd/internal/auth"
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

// Export name suffixes. readOnlySuffix selects a read-only attach of this
// site's copy, once it has applied everything committed when the attach
// began; staleSuffix a read-only attach of the copy as it is, without
// asking the leader (a site cut off from the majority serves only these).
const (
	readOnlySuffix = "@ro"
	staleSuffix    = "@ro-stale"
)

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
	// catchUpTimeout bounds how long an attach waits for this site to apply
	// the log up to the point it must serve from: the lease grant for a
	// read-write attach, the leader's read index for a read-only one.
	catchUpTimeout = 60 * time.Second
	// readIndexTimeout bounds how long a read-only attach looks for a
	// leader to tell it how current this site's copy must be (a leader
	// election takes about a second).
	readIndexTimeout = 5 * time.Second
)

// errLeaseSuspended: this site has not renewed a volume's lease for so long
// that the lease may soon expire at the leader; until a renewal succeeds
// again it neither acknowledges writes nor serves reads of the volume
// (self-fencing, see DESIGN.md). NBD clients see EIO.
var errLeaseSuspended = errors.New("volume lease not renewed: this site may no longer be the volume's writer")

// stage is one volume's shared DCD stage and the connections using it.
// While busy is non-nil the stage is in transition: being opened (taking
// the lease) or closed (its buffered writes committing); a new connection
// waits for that, so it never reads the volume file without them or opens
// a second stage.
type stage struct {
	vol   *volume.Volume
	dcd   *dcd.Volume
	epoch uint64      // the volume lease epoch this stage writes under
	lease *leaseClock // how long this stage may serve without a renewal
	refs  int
	busy  chan struct{} // non-nil while opening or closing; closed when done

	stopRenew chan struct{} // closed to stop the lease renewal
	renewDone chan struct{} // closed when the renewal goroutine returned

	// fenceMu guards the hand-over between the renewal goroutine, which
	// starts before the DCD volume exists, and openStage, which sets it.
	fenceMu sync.Mutex
	fenced  error       // the lease was lost
	fenceTo *dcd.Volume // the DCD volume to fence, once it exists
}

// fence fences the stage's DCD volume, now or when it is set.
func (st *stage) fence(err error) {
	st.fenceMu.Lock()
	defer st.fenceMu.Unlock()
	st.fenced = err
	if st.fenceTo != nil {
		st.fenceTo.Fence(err)
	}
}

// setDCD makes d the DCD volume that fence fences, fencing it at once if the
// lease is already lost.
func (st *stage) setDCD(d *dcd.Volume) {
	st.fenceMu.Lock()
	defer st.fenceMu.Unlock()
	st.fenceTo = d
	if st.fenced != nil {
		d.Fence(st.fenced)
	}
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

func readOnlyInfo(m volume.Meta, suffix string) nbdfront.ExportInfo {
	info := exportInfo(m)
	info.Name = m.Name + suffix
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

// splitExport splits an export name into its volume and access suffix:
// "" (read-write), readOnlySuffix or staleSuffix.
func splitExport(name string) (vol, suffix string) {
	for _, sfx := range []string{staleSuffix, readOnlySuffix} {
		if base, ok := strings.CutSuffix(name, sfx); ok {
			return base, sfx
		}
	}
	return name, ""
}

// lookup resolves an export name to its volume and access mode: suffix is
// "" (read-write), readOnlySuffix or staleSuffix.
func (b *nbdBackend) lookup(name string) (v *volume.Volume, suffix string, err error) {
	vol, suffix := splitExport(name)
	if vol == "" {
		return nil, "", fmt.Errorf("%w: robib has no default export; name a volume (or VOLUME%s for read-only)", nbdfront.ErrUnknownExport, readOnlySuffix)
	}
	v, err = b.store.Get(vol)
	if err != nil {
		return nil, "", fmt.Errorf("%w: %w", nbdfront.ErrUnknownExport, err)
	}
	return v, suffix, nil
}

func (b *nbdBackend) Info(name string) (nbdfront.ExportInfo, error) {
	v, suffix, err := b.lookup(name)
	if err != nil {
		return nbdfront.ExportInfo{}, err
	}
	if suffix != "" {
		return readOnlyInfo(v.Meta(), suffix), nil
	}
	return exportInfo(v.Meta()), nil
}

func (b *nbdBackend) Open(name string) (nbdfront.Export, error) {
	v, suffix, err := b.lookup(name)
	if err != nil {
		return nil, err
	}
	if suffix != "" {
		return b.openReadOnly(v, suffix)
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

// openReadOnly opens a read-only attach. With readOnlySuffix it first waits
// (bounded) until this site has applied everything committed when the
// attach began, so a lagging site never serves data older than a flush
// acknowledged before the attach; a site that cannot learn that (cut off
// from the majority) refuses and names the stale export instead.
func (b *nbdBackend) openReadOnly(v *volume.Volume, suffix string) (nbdfront.Export, error) {
	m := v.Meta()
	info := readOnlyInfo(m, suffix)
	site := b.node.Name()
	if suffix == staleSuffix {
		info.Description = fmt.Sprintf("robib volume %s, read-only copy at site %s as applied there (index %d), not checked against the leader: may be stale",
			m.Name, site, b.node.FSM().AppliedIndex())
		return &roExport{vol: v, rd: healingReader{vol: v, node: b.node}, info: info}, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), catchUpTimeout)
	defer cancel()
	rctx, rcancel := context.WithTimeout(ctx, readIndexTimeout)
	idx, err := b.node.ReadIndex(rctx)
	rcancel()
	if err != nil {
		return nil, fmt.Errorf("site %s cannot reach the leader to learn how current its copy of %s is (%w); attach %s%s to read this site's copy as it is",
			site, m.Name, err, m.Name, staleSuffix)
	}
	applied := b.node.FSM().AppliedIndex()
	if err := b.node.WaitApplied(ctx, idx); err != nil {
		return nil, fmt.Errorf("site %s has not caught up with the log (applied %d of %d) within %v: %w; attach %s%s to read this site's copy as it is",
			site, b.node.FSM().AppliedIndex(), idx, catchUpTimeout, err, m.Name, staleSuffix)
	}
	behind := uint64(0)
	if idx > applied {
		behind = idx - applied
		b.log.Info("read-only attach waited for this site to catch up", "volume", m.Name,
			"read_index", idx, "entries_behind", behind)
	}
	info.Description = fmt.Sprintf("robib volume %s, read-only copy at site %s, current as of log index %d (%d entries behind the leader when attached)",
		m.Name, site, idx, behind)
	return &roExport{vol: v, rd: healingReader{vol: v, node: b.node}, info: info}, nil
}

// openStage takes the volume's lease for this site, waits until this site
// has applied the log up to the grant, and opens the stage's DCD volume
// under its epoch. Nothing is served before that wait ends: the overlay of
// a new stage is empty, so until the site has applied every batch
// committed before the grant (by another site's writer, or by a stage of
// this site that this one replaces) its reads would return older data, and
// a read-modify-write by the client would spread it to every site.
func (b *nbdBackend) openStage(name string, st *stage) error {
	meta := st.vol.Meta()
	ctx, cancel := context.WithTimeout(context.Background(), attachTimeout)
	defer cancel()
	g, err := b.acquire(ctx, name, meta.Created.UnixNano())
	if err != nil {
		return err
	}
	st.epoch, st.lease = g.Epoch, newLeaseClock(g.Sent, b.ttl())
	st.stopRenew, st.renewDone = make(chan struct{}), make(chan struct{})
	go b.renewLoop(name, st)
	fail := func(err error) error {
		st.stopRenewal()
		b.releaseLease(name, g.Epoch)
		return err
	}

	wctx, wcancel := context.WithTimeout(context.Background(), catchUpTimeout)
	err = b.node.WaitApplied(wctx, g.Index)
	wcancel()
	if err != nil {
		return fail(fmt.Errorf("site %s has not applied the log up to the write lease of %s (index %d, applied %d) within %v: %w",
			b.node.Name(), name, g.Index, b.node.FSM().AppliedIndex(), catchUpTimeout, err))
	}
	cfg := b.dcd
	cfg.SyncWrites = meta.SyncWrites
	cfg.VolumeCreated = meta.Created.UnixNano()
	cfg.Epoch = g.Epoch
	cfg.Logger = b.log.With("volume", name, "epoch", g.Epoch)
	d, err := dcd.New(name, healingReader{vol: st.vol, node: b.node}, b.node, cfg)
	if err != nil {
		return fail(fmt.Errorf("opening write-back stage for %s: %w", name, err))
	}
	st.dcd = d
	st.setDCD(d)
	return nil
}

func (b *nbdBackend) ttl() time.Duration {
	if b.leaseTTL <= 0 {
		return cluster.DefaultLeaseTTL
	}
	return b.leaseTTL
}

// acquire takes the lease, asking again for a short while if another site
// holds it (it may be releasing it right now).
func (b *nbdBackend) acquire(ctx context.Context, name string, created int64) (cluster.Grant, error) {
	deadline := time.Now().Add(heldWait)
	for {
		g, err := b.node.AcquireLease(ctx, name, created)
		switch {
		case err == nil:
			return g, nil
		case errors.Is(err, cluster.ErrLeaseHeld) && time.Now().Before(deadline):
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
				continue
			}
			fallthrough
		case errors.Is(err, cluster.ErrLeaseHeld):
			return g, fmt.Errorf("%w: %w; attach it read-only as %s%s, or detach it there first",
				nbdfront.ErrBusy, err, name, readOnlySuffix)
		case errors.Is(err, fsm.ErrUnknownVolume):
			return g, fmt.Errorf("%w: %w", nbdfront.ErrUnknownExport, err)
		default:
			return g, fmt.Errorf("taking the write lease of %s (it needs a majority of sites): %w", name, err)
		}
	}
}

// renewLoop renews the stage's lease every TTL/8 until the stage closes.
// Each success extends the stage's leaseClock from the moment its request
// was sent; while the clock has run out, the stage's connections get EIO
// (self-fencing; logged once per lapse). If the lease turns out to be lost
// (another site took it after this one failed to renew it, e.g. behind a
// partition), the stage is fenced for good: its buffered writes are dropped
// and every later write or flush fails.
func (b *nbdBackend) renewLoop(name string, st *stage) {
	defer close(st.renewDone)
	log := b.log.With("volume", name, "epoch", st.epoch)
	ttl := b.ttl()
	t := time.NewTicker(ttl / 8)
	defer t.Stop()
	var lastErr error
	lapsed := false
	for {
		select {
		case <-st.stopRenew:
			return
		case <-t.C:
		}
		sent := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), ttl/4)
		err := b.node.RenewLease(ctx, name, st.epoch)
		cancel()
		switch {
		case err == nil:
			st.lease.renewed(sent)
			if lapsed {
				log.Info("volume lease renewed again; serving the volume again")
				lapsed = false
			}
			continue
		case errors.Is(err, cluster.ErrLeaseLost):
			log.Error("volume lease lost to another site; this site's writers are fenced", "err", err)
			st.fence(err)
			st.lease.lose()
			return
		}
		lastErr = err
		if !lapsed && st.lease.check() != nil {
			lapsed = true
			log.Error("volume lease not renewed in time: this site stops serving the volume (EIO) until a renewal succeeds",
				"valid_for", st.lease.guard, "err", lastErr)
		}
	}
}

// leaseClock says how long a lease holder may keep serving without hearing
// from the leader: until guard after it sent its last successful renewal
// (or acquisition). The leader counts a renewal from when it received it,
// after it confirmed its leadership, so its expiry is at least TTL after
// the send; guard (3/4 TTL) leaves a quarter of the TTL for the two clocks'
// rates to differ. See cmd/DESIGN.md, "Self-fencing".
type leaseClock struct {
	base  time.Time     // monotonic reference
	guard time.Duration // immutable
	until atomic.Int64  // nanoseconds after base; math.MinInt64 once lost
}

func newLeaseClock(sent time.Time, ttl time.Duration) *leaseClock {
	c := &leaseClock{base: sent, guard: ttl * 3 / 4}
	c.until.Store(int64(c.guard))
	return c
}

// renewed extends the validity to guard after sent (never shortens it).
func (c *leaseClock) renewed(sent time.Time) {
	v := int64(sent.Sub(c.base) + c.guard)
	for {
		cur := c.until.Load()
		if v <= cur || c.until.CompareAndSwap(cur, v) {
			return
		}
	}
}

// lose makes the clock run out for good.
func (c *leaseClock) lose() { c.until.Store(math.MinInt64) }

// check returns errLeaseSuspended once the validity has run out.
func (c *leaseClock) check() error {
	if int64(time.Since(c.base)) > c.until.Load() {
		return errLeaseSuspended
	}
	return nil
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
// committed within timeout), then releases its lease. The release also
// ends the stage's writer session in the FSM (the session is pinned to the
// lease epoch until then, see fsm/DESIGN.md), so no EndSession is sent.
func (b *nbdBackend) closeStage(name string, st *stage, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	err := st.dcd.Shutdown(ctx)
	st.stopRenewal()
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
// volume (everything applied here; damaged blocks from another site's
// copy, see healingReader), needs no lease and buffers nothing.
type roExport struct {
	vol  *volume.Volume
	rd   healingReader
	info nbdfront.ExportInfo
}

func (e *roExport) Info() nbdfront.ExportInfo               { return e.info }
func (e *roExport) ReadAt(p []byte, off int64) (int, error) { return e.rd.ReadAt(p, off) }
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

// The export's operations check the stage's lease clock: writes before
// (nothing is buffered while the lease may be gone) and after (no write is
// acknowledged once it may be), reads after (a read that returns finished
// before the clock ran out, so before another site could take the lease).
// A successful Flush needs no check: its writes were committed under this
// stage's epoch, which the FSM accepts only while the lease is this site's.

func (e *export) Info() nbdfront.ExportInfo { return e.info }
func (e *export) ReadAt(p []byte, off int64) (int, error) {
	n, err := e.st.dcd.ReadAt(p, off)
	if err == nil {
		err = e.st.lease.check()
	}
	if err != nil {
		return 0, err
	}
	return n, nil
}
func (e *export) WriteAt(p []byte, off int64) (int, error) {
	if err := e.st.lease.check(); err != nil {
		return 0, err
	}
	n, err := e.st.dcd.WriteAt(p, off)
	if err == nil {
		err = e.st.lease.check()
	}
	return n, beyondEnd(err)
}
func (e *export) Flush() error {
	if err := e.st.lease.check(); err != nil {
		return err
	}
	return e.st.dcd.Flush()
}
func (e *export) Trim(off, length int64) error {
	return e.checked(func() error { return e.st.dcd.Trim(off, length) })
}
func (e *export) WriteZeroes(off, length int64, noHole bool) error {
	return beyondEnd(e.checked(func() error { return e.st.dcd.WriteZeroes(off, length, noHole) }))
}

// beyondEnd marks a write or write zeroes that the DCD stage refused
// because it ends past the volume's end as nbdfront.ErrNoSpace: the NBD
// spec asks for ENOSPC there (and EINVAL for reads and trims, which keep
// their error). The server already refused such requests against the size
// the client was told; this is a volume that shrank since the attach.
func beyondEnd(err error) error {
	if errors.Is(err, dcd.ErrOutOfRange) {
		return fmt.Errorf("%w: %w", nbdfront.ErrNoSpace, err)
	}
	return err
}

// checked runs a write-like operation between two lease checks.
func (e *export) checked(op func() error) error {
	if err := e.st.lease.check(); err != nil {
		return err
	}
	if err := op(); err != nil {
		return err
	}
	return e.st.lease.check()
}

func (e *export) Close() error {
	var err error
	e.once.Do(func() { err = e.b.release(e.name, e.st) })
	return err
}

// testHookExtents, if set (tests only, before any export is opened), is
// called by export.BlockStatus between reading the local allocation and
// returning it.
var testHookExtents func(e *export, exts []volume.Extent)

// BlockStatus reports the local copy's allocation, except that ranges with
// buffered (not yet applied) operations are reported as data. The buffered
// ranges are captured before the local allocation is read, as reads do: an
// operation applied locally and released in between is then in the local
// allocation already. (The other order reported such a range as a hole,
// and sparse copies skipped written data.)
func (e *export) BlockStatus(off, length int64) ([]nbdfront.Extent, error) {
	buffered := e.st.dcd.Buffered(off, length)
	exts, err := e.st.vol.BlockStatus(off, length)
	if err != nil {
		return nil, err
	}
	if testHookExtents != nil {
		testHookExtents(e, exts)
	}
	out := make([]nbdfront.Extent, 0, len(exts))
	for _, x := range exts {
		hole := x.Hole && !overlapsAny(buffered, x.Offset, x.Length)
		out = append(out, nbdfront.Extent{Length: x.Length, Hole: hole, Zero: hole})
	}
	if err := e.st.lease.check(); err != nil {
		return nil, err
	}
	return out, nil
}

// overlapsAny reports whether [off, off+length) overlaps one of rs.
func overlapsAny(rs []dcd.Range, off, length int64) bool {
	for _, r := range rs {
		if r.Off < off+length && off < r.Off+r.Len {
			return true
		}
	}
	return false
}

// nbdErrors is the one table from errors to NBD error values at this
// site's NBD edge (the server's Config.ErrorCode is nbdErrors.Code): first
// the rows for the sentinels of the layers below nbdfront, then
// nbdfront.DefaultErrorTable (nbdfront's sentinels, context.Canceled, host
// errno values); anything else is EIO. The first row an error matches
// (errors.Is) wins, so the order is part of the table:
//
//   - nbdfront.ErrNoSpace: ENOSPC, first, because a write beyond the end
//     carries it on top of dcd.ErrOutOfRange (beyondEnd)
//   - out of range (volume, dcd, fsm): EINVAL
//   - closed (volume, dcd, cluster): ESHUTDOWN — the client reconnects
//     elsewhere
//   - lost writes (dcd.ErrFailed, dcd.ErrFenced, which wraps it), flushes
//     without a majority (dcd.ErrFlushTimeout), a lapsed lease
//     (errLeaseSuspended): EIO, ahead of the nbdfront rows because a
//     sticky failure wraps its cause (a batch's rejection, the reason for
//     a fence), which must not pick the code there: the client must see
//     an I/O error, not e.g. a shutdown it would retry elsewhere as if
//     nothing happened (the rows above still win: a batch refused out of
//     range stays EINVAL, one refused because the node closed ESHUTDOWN)
//   - a request this site made for another site's identity
//     (cluster.ErrForbidden): EPERM
//
// Every other sentinel of the layers below (cluster.ErrRetry,
// fsm.ErrStaleEpoch, ...) gets EIO; errors_test.go lists every sentinel of
// the module with the value it must get.
var nbdErrors = append(nbdfront.ErrorTable{
	{Err: nbdfront.ErrNoSpace, Code: nbdfront.ENOSPC},
	{Err: volume.ErrOutOfRange, Code: nbdfront.EINVAL},
	{Err: dcd.ErrOutOfRange, Code: nbdfront.EINVAL},
	{Err: fsm.ErrOutOfRange, Code: nbdfront.EINVAL},
	{Err: volume.ErrClosed, Code: nbdfront.ESHUTDOWN},
	{Err: dcd.ErrClosed, Code: nbdfront.ESHUTDOWN},
	{Err: cluster.ErrClosed, Code: nbdfront.ESHUTDOWN},
	{Err: dcd.ErrFailed, Code: nbdfront.EIO},
	{Err: dcd.ErrFlushTimeout, Code: nbdfront.EIO},
	{Err: errLeaseSuspended, Code: nbdfront.EIO},
	{Err: auth.ErrUnauthenticated, Code: nbdfront.EPERM},
	{Err: auth.ErrDenied, Code: nbdfront.EPERM},
	{Err: cluster.ErrForbidden, Code: nbdfront.EPERM},
}, nbdfront.DefaultErrorTable()...)
