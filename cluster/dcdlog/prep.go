package dcdlog

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// spare is a segment file ready to be written from offset 0: every block up
// to size is written (zeros, or records of an earlier generation) and
// synced, its directory entry is durable, and its header is not valid.
type spare struct {
	f    *os.File
	name string
	size int64
}

// preparer keeps spares ready in the background so that StoreLogs never
// waits for a file to be zeroed: it zeroes fresh files and invalidates
// recycled ones (files of deleted segments).
type preparer struct {
	dir       string
	dirF      *os.File
	size      int64 // capacity of a fresh spare
	maxSpares int   // ready spares kept at least (see keepLocked)

	mu      sync.Mutex
	cond    *sync.Cond
	ready   []*spare
	recycle []*spare // dead segment files still to invalidate
	closed  bool
	err     error // last failure to zero a fresh file; retried after the next take
	nextID  uint64
	busy    bool // run is preparing a file outside mu (tests wait for !busy)
	live    int  // live segments of the store (it tells us: setLive, give)
	peak    int  // most files ever live or ready at once since open
	done    chan struct{}

	stats prepStats // guarded by mu
}

// prepStats count what the preparer did (benchmarks report them).
type prepStats struct {
	zeroed, reused, removed, grown int
	waited                         time.Duration // StoreLogs waiting for a spare
}

func newPreparer(dir string, dirF *os.File, size int64, maxSpares int, nextID uint64, live int, ready, recycle []*spare) *preparer {
	p := &preparer{dir: dir, dirF: dirF, size: size, maxSpares: maxSpares, nextID: nextID,
		ready: ready, recycle: recycle, done: make(chan struct{}),
		live: live, peak: live + len(ready) + len(recycle)}
	p.cond = sync.NewCond(&p.mu)
	go p.run()
	return p
}

func (p *preparer) run() {
	defer close(p.done)
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		for !p.closed && len(p.recycle) == 0 && (len(p.ready) > 0 || p.err != nil) {
			// A failure to zero (disk full?) is retried only once a
			// segment is taken, and take does not depend on it.
			p.cond.Wait()
		}
		if p.closed {
			return
		}
		if n := len(p.recycle); n > 0 {
			sp := p.recycle[n-1]
			p.recycle = p.recycle[:n-1]
			keep := p.keepLocked()
			p.busy = true
			p.mu.Unlock()
			err := p.invalidate(sp, keep)
			p.mu.Lock()
			p.busy = false
			if err == nil && keep {
				p.ready = append(p.ready, sp)
				p.stats.reused++
				p.cond.Broadcast()
			} else {
				p.stats.removed++
			}
			continue
		}
		id := p.nextID
		p.nextID++
		p.busy = true
		p.mu.Unlock()
		sp, err := p.zeroed(id)
		p.mu.Lock()
		p.busy = false
		if err != nil {
			p.err = err
		} else {
			p.ready = append(p.ready, sp)
			p.stats.zeroed++
			p.notePeakLocked()
		}
		p.cond.Broadcast()
	}
}

// invalidate makes a dead segment file a spare: its header is zeroed and
// synced, so it can never again be read as a segment; its old records
// carry the old generation, which no later header has. A file not kept is
// removed instead.
func (p *preparer) invalidate(sp *spare, keep bool) error {
	if !keep {
		sp.f.Close()
		return os.Remove(filepath.Join(p.dir, sp.name))
	}
	var zero [segHdrSize]byte
	if _, err := sp.f.WriteAt(zero[:], 0); err != nil {
		sp.f.Close()
		return err
	}
	if err := unix.Fdatasync(int(sp.f.Fd())); err != nil {
		sp.f.Close()
		return err
	}
	return nil
}

// zeroed creates a fresh spare: written with zeros and synced under a
// temporary name, then renamed and the directory synced.
func (p *preparer) zeroed(id uint64) (*spare, error) {
	name := segName(id)
	tmp := filepath.Join(p.dir, name+".tmp")
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("dcdlog: creating a segment: %w", err)
	}
	fail := func(err error) (*spare, error) {
		f.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("dcdlog: preparing segment %s: %w", name, err)
	}
	// Zeros go out in chunks, each started as soon as it is written and
	// waited for after the next one is written: at most two chunks are
	// queued ahead of a StoreLogs' sync, and the final fdatasync has
	// little left to do.
	const chunk = 4 << 20
	buf := make([]byte, chunk)
	fd := int(f.Fd())
	for off := int64(0); off < p.size; off += chunk {
		n := min(chunk, p.size-off)
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			return fail(err)
		}
		if err := unix.SyncFileRange(fd, off, n, unix.SYNC_FILE_RANGE_WRITE); err != nil {
			return fail(err)
		}
		if off > 0 {
			if err := unix.SyncFileRange(fd, off-chunk, chunk, unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER); err != nil {
				return fail(err)
			}
		}
		p.mu.Lock()
		closed := p.closed
		p.mu.Unlock()
		if closed {
			return fail(ErrClosed)
		}
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp, filepath.Join(p.dir, name)); err != nil {
		return fail(err)
	}
	if err := p.dirF.Sync(); err != nil {
		return fail(err)
	}
	return &spare{f: f, name: name, size: p.size}, nil
}

// growAfter bounds how long take waits for a file being zeroed.
const growAfter = 20 * time.Millisecond

// take returns a ready spare; if none is ready, a dead file invalidated on
// the spot, or the fresh file being zeroed if that comes within growAfter.
// Otherwise (a new store writing faster than zeros can be laid ahead of it,
// or zeroing failed, perhaps for lack of room for a whole segment) it
// returns a new empty file that grows as it is written: just as safe
// (nothing stale can be in it, a torn tail fails its checksum), but each of
// its syncs also allocates blocks and writes the new size, which measured
// up to tens of milliseconds at the tail with 4 MiB batches.
func (p *preparer) take() (*spare, error) {
	p.mu.Lock()
	t0 := time.Now()
	var timer *time.Timer
	for len(p.ready) == 0 && !p.closed {
		if n := len(p.recycle); n > 0 {
			sp := p.recycle[n-1]
			p.recycle = p.recycle[:n-1]
			p.mu.Unlock()
			err := p.invalidate(sp, true)
			p.mu.Lock()
			if err == nil {
				p.stats.reused++
				p.stats.waited += time.Since(t0)
				p.mu.Unlock()
				if timer != nil {
					timer.Stop()
				}
				return sp, nil
			}
			p.stats.removed++
			continue
		}
		if p.err != nil || time.Since(t0) >= growAfter {
			break
		}
		if timer == nil {
			timer = time.AfterFunc(growAfter, func() {
				p.mu.Lock()
				p.cond.Broadcast()
				p.mu.Unlock()
			})
		}
		p.cond.Wait()
	}
	if timer != nil {
		timer.Stop()
	}
	p.stats.waited += time.Since(t0)
	if p.closed {
		p.mu.Unlock()
		return nil, ErrClosed
	}
	if n := len(p.ready); n > 0 {
		// The most recently added first: recycled files go last, and
		// reusing them saves zeroing a fresh one.
		sp := p.ready[n-1]
		p.ready = p.ready[:n-1]
		p.cond.Broadcast()
		p.mu.Unlock()
		return sp, nil
	}
	id := p.nextID
	p.nextID++
	p.stats.grown++
	p.err = nil // let the preparer try again
	p.cond.Broadcast()
	p.mu.Unlock()
	name := segName(id)
	f, err := os.OpenFile(filepath.Join(p.dir, name), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("dcdlog: creating a segment: %w", err)
	}
	if err := p.dirF.Sync(); err != nil {
		f.Close()
		os.Remove(filepath.Join(p.dir, name))
		return nil, fmt.Errorf("dcdlog: creating a segment: %w", err)
	}
	return &spare{f: f, name: name}, nil
}

// keepLocked reports whether a recycled file is kept as a spare rather
// than removed: while fewer than maxSpares are ready, or while keeping it
// does not make more files than the most the log has had at once (live
// segments plus spares). The log's size breathes with snapshots: it grows
// for a snapshot interval, then compaction frees several segments at
// once. Removing the freed files beyond a fixed count made the store zero
// fresh ones again before the next compaction: measured with 1 MiB
// sequential writes on three sites, 20 of 35 segments taken were freshly
// zeroed, so the log was written about 1.6 times, and zeroing was 10% of
// the leader's CPU and 20% of a follower's. Keeping them bounds the
// directory by its own high-water mark, which it reached anyway.
func (p *preparer) keepLocked() bool {
	return len(p.ready) < p.maxSpares || p.live+len(p.ready) < p.peak
}

func (p *preparer) notePeakLocked() { p.peak = max(p.peak, p.live+len(p.ready)) }

// setLive tells the preparer how many live segments the store has.
func (p *preparer) setLive(n int) {
	p.mu.Lock()
	p.live = n
	p.notePeakLocked()
	p.mu.Unlock()
}

// give hands dead segment files over to be invalidated and reused; live
// is the store's count of live segments after it dropped them.
func (p *preparer) give(live int, sps ...*spare) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.live = live
	p.recycle = append(p.recycle, sps...)
	p.cond.Broadcast()
}

// close stops the goroutine and closes the files it holds. Spares stay on
// disk for the next open; dead files not yet invalidated are recognized as
// dead again on open.
func (p *preparer) close() {
	p.mu.Lock()
	p.closed = true
	p.cond.Broadcast()
	p.mu.Unlock()
	<-p.done
	for _, sp := range p.ready {
		sp.f.Close()
	}
	for _, sp := range p.recycle {
		sp.f.Close()
	}
	p.ready, p.recycle = nil, nil
}

func segName(id uint64) string { return fmt.Sprintf("seg-%016x", id) }

func (p *preparer) statsNow() prepStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stats
}
