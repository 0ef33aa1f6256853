package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
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
type nbdBackend struct {
	store *volume.Store
	node  *cluster.Node
	dcd   dcd.Config
	log   *slog.Logger

	mu     sync.Mutex // guards stages
	stages map[string]*stage
}

// releaseTimeout bounds how long closing a volume's write-back stage waits
// for its buffered writes to commit. Writes not flushed by the client may be
// lost past it (they were never acknowledged as durable).
const releaseTimeout = 30 * time.Second

// stage is one volume's shared DCD stage and the connections using it.
// When the last connection goes, the stage stays in the map, marked
// closing, until its buffered writes are committed and applied: a new
// connection in that window waits for it, so it never reads the volume file
// without them.
type stage struct {
	vol     *volume.Volume
	dcd     *dcd.Volume
	refs    int
	closing chan struct{} // non-nil once the last reference is gone; closed when shut down
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

func (b *nbdBackend) List() ([]nbdfront.ExportInfo, error) {
	var out []nbdfront.ExportInfo
	for _, m := range b.store.List() {
		out = append(out, exportInfo(m))
	}
	return out, nil
}

func (b *nbdBackend) lookup(name string) (*volume.Volume, error) {
	if name == "" {
		return nil, fmt.Errorf("%w: robib has no default export; name a volume", nbdfront.ErrUnknownExport)
	}
	v, err := b.store.Get(name)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", nbdfront.ErrUnknownExport, err)
	}
	return v, nil
}

func (b *nbdBackend) Info(name string) (nbdfront.ExportInfo, error) {
	v, err := b.lookup(name)
	if err != nil {
		return nbdfront.ExportInfo{}, err
	}
	return exportInfo(v.Meta()), nil
}

func (b *nbdBackend) Open(name string) (nbdfront.Export, error) {
	v, err := b.lookup(name)
	if err != nil {
		return nil, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	st := b.stages[name]
	for st != nil && st.closing != nil {
		ch := st.closing
		b.mu.Unlock()
		<-ch
		b.mu.Lock()
		st = b.stages[name]
	}
	if st == nil || st.vol != v { // new, or the volume was deleted and recreated
		cfg := b.dcd
		cfg.SyncWrites = v.Meta().SyncWrites
		cfg.VolumeCreated = v.Meta().Created.UnixNano()
		cfg.Logger = b.log.With("volume", name)
		d, err := dcd.New(name, v, b.node, cfg)
		if err != nil {
			return nil, fmt.Errorf("opening write-back stage for %s: %w", name, err)
		}
		st = &stage{vol: v, dcd: d}
		b.stages[name] = st
	}
	st.refs++
	return &export{b: b, name: name, st: st, info: exportInfo(v.Meta())}, nil
}

// release drops one connection's reference; the last one closes the stage
// (flushing it) and ends its writer session in the FSM.
func (b *nbdBackend) release(name string, st *stage) error {
	b.mu.Lock()
	st.refs--
	if st.refs > 0 {
		b.mu.Unlock()
		return nil
	}
	st.closing = make(chan struct{})
	b.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), releaseTimeout)
	defer cancel()
	err := st.dcd.Shutdown(ctx)
	b.mu.Lock()
	if b.stages[name] == st {
		delete(b.stages, name)
	}
	close(st.closing)
	b.mu.Unlock()
	if _, e := b.node.Apply(ctx, &fsm.EndSession{Session: st.dcd.Session()}); e != nil {
		b.log.Debug("ending writer session", "volume", name, "err", e)
	}
	return err
}

// abortAll shuts every open stage down at once, abandoning writes that are
// not committed yet: their waiting flushes fail.
func (b *nbdBackend) abortAll() {
	b.mu.Lock()
	var stages []*stage
	for _, st := range b.stages {
		if st.closing == nil {
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

// closeAll flushes every stage at shutdown.
func (b *nbdBackend) closeAll() {
	b.mu.Lock()
	var stages = map[string]*stage{}
	for name, st := range b.stages {
		if st.closing == nil { // closing ones are being shut down by release
			stages[name] = st
		}
	}
	b.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), releaseTimeout)
	defer cancel()
	for name, st := range stages {
		if err := st.dcd.Shutdown(ctx); err != nil {
			b.log.Error("flushing volume at shutdown", "volume", name, "err", err)
		}
	}
}

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
	}
	return nbdfront.DefaultErrorCode(err)
}
