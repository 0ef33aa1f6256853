package volume

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

const (
	volumesDirName = "volumes"
	lockFileName   = "LOCK"
	// Entries in the volumes directory with these prefixes belong to the
	// store. No valid volume name starts with '.', so they never collide.
	createPrefix = ".create-" // a Create in progress (or interrupted by a crash)
	trashPrefix  = ".trash-"  // a Delete that committed but has not finished removing
)

// Store is a directory of volumes. All methods are safe for concurrent use.
// Create, Delete, Resize and Close are serialized against each other;
// Get, List and Broken never wait for disk I/O.
//
// A Store holds an exclusive flock on <dir>/LOCK from Open to Close, so at
// most one Store (in any process) uses a directory at a time.
type Store struct {
	dir    string       // immutable
	volDir string       // immutable: <dir>/volumes
	log    *slog.Logger // immutable

	// nsMu serializes the operations that change the on-disk state of the
	// store: Create, Delete, Resize and Close. It is taken first; a
	// Volume's mu or s.mu may be taken while it is held, never the
	// reverse.
	nsMu sync.Mutex

	// mu guards the fields below. It is held only for map access, never
	// across disk I/O, and never together with a Volume's mu.
	mu     sync.Mutex
	vols   map[string]*Volume
	broken map[string]error
	lock   *os.File // the LOCK file; nil once the store is closed
}

// Open opens the store in dir, creating dir (mode 0700) if needed, and loads
// every volume. A volume that cannot be loaded does not make Open fail: it is
// logged, left on disk untouched, kept out of List and reported by Broken.
// Leftovers of operations interrupted by a crash are removed: unfinished
// creations, committed-but-unremoved deletions and, in loadable volumes,
// temporary meta files. A loadable volume's data file whose length differs
// from its metadata's size (a crash during Resize) is truncated or extended
// to that size. Entries in the volumes directory whose names are not valid
// volume names are logged and left alone.
//
// Open fails if another Store has dir open. A nil log means slog.Default().
func Open(dir string, log *slog.Logger) (*Store, error) {
	if log == nil {
		log = slog.Default()
	}
	dir = filepath.Clean(dir)
	volDir := filepath.Join(dir, volumesDirName)
	if err := os.MkdirAll(volDir, 0o700); err != nil {
		return nil, fmt.Errorf("volume store %s: %w", dir, err)
	}
	if err := SyncDir(dir); err != nil {
		return nil, fmt.Errorf("volume store %s: %w", dir, err)
	}
	lock, err := lockDir(filepath.Join(dir, lockFileName))
	if err != nil {
		return nil, fmt.Errorf("volume store %s: %w", dir, err)
	}
	s := &Store{
		dir:    dir,
		volDir: volDir,
		log:    log,
		vols:   make(map[string]*Volume),
		broken: make(map[string]error),
		lock:   lock,
	}
	if err := s.load(); err != nil {
		s.Close()
		return nil, fmt.Errorf("volume store %s: %w", dir, err)
	}
	log.Info("volume store opened", "dir", dir, "volumes", len(s.vols), "broken", len(s.broken))
	return s, nil
}

// shrinkLocked finishes a committed shrink from old to size bytes: the
// new last block, if short, gets the sum of the block cut at size (if it
// was damaged it stays so), the files are truncated and fsynced, and the
// damage past the size is forgotten. The caller holds v.mu for writing and
// has set v.meta.Size = size.
func (v *Volume) shrinkLocked(old, size int64, gen uint64) error {
	var last *edge
	if size%SumBlockSize != 0 {
		// The block as it was, up to the old end: a zeroing of its part
		// past size. v.meta.Size is already size, so load it by hand.
		var e edge
		lb := (size - 1) / SumBlockSize
		buf := make([]byte, SumBlockSize)
		e.b, e.blk = lb, buf[:min(SumBlockSize, old-lb*SumBlockSize)]
		var sb [4]byte
		if err := v.readSums(lb, sb[:]); err != nil {
			return fmt.Errorf("read block checksums: %w", err)
		}
		e.stored = binary.LittleEndian.Uint32(sb[:])
		e.ok = v.readData(e.blk, lb*SumBlockSize) == nil && blockSum(e.blk) == e.stored
		s := e.apply(nil, size, old) // the zeros are the padding of the cut block
		if err := v.writeSums(lb, binary.LittleEndian.AppendUint32(nil, s)); err != nil {
			return fmt.Errorf("write block checksums: %w", err)
		}
		last = &e
	}
	err := v.f.Truncate(size)
	if err == nil {
		err = v.sums.Truncate(sumsFileLen(size))
	}
	if err == nil {
		err = v.f.Sync()
	}
	if err == nil {
		err = v.sums.Sync()
	}
	if err != nil {
		return fmt.Errorf("truncate: %w", err)
	}
	nb := sumBlocks(size)
	v.dmg.mu.Lock()
	v.dmg.removeRangeLocked(nb, sumBlocks(old)-1)
	v.dmg.mu.Unlock()
	if last != nil {
		v.dmg.noteMutation(1, 0, last, nil, gen)
	}
	return nil
}

// load scans the volumes directory. Only Open calls it, before s is shared.
func (s *Store) load() error {
	entries, err := os.ReadDir(s.volDir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		name := e.Name()
		path := filepath.Join(s.volDir, name)
		switch {
		case strings.HasPrefix(name, createPrefix):
			// Never renamed into place, so never visible: discard.
			s.log.Warn("removing interrupted volume creation", "path", path)
			s.removeAll(path)
			continue
		case strings.HasPrefix(name, trashPrefix):
			// The delete committed with the rename; finish it.
			s.log.Info("removing leftover of deleted volume", "path", path)
			s.removeAll(path)
			continue
		}
		if err := ValidateName(name); err != nil {
			s.log.Warn("ignoring unexpected entry in volumes directory", "path", path, "err", err)
			continue
		}
		v, err := s.loadVolume(name, path)
		if err != nil {
			err = fmt.Errorf("volume %q: %w", name, err)
			s.broken[name] = err
			s.log.Error("volume cannot be loaded; leaving it untouched", "volume", name, "path", path, "err", err)
			continue
		}
		s.vols[name] = v
	}
	return nil
}

// loadVolume opens the volume directory at path. Errors wrap ErrCorrupt.
// Nothing on disk is modified unless the metadata is valid.
func (s *Store) loadVolume(name, path string) (*Volume, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("%w: %s is not a directory", ErrCorrupt, path)
	}
	m, err := readMetaFile(path)
	if err != nil {
		return nil, err
	}
	if m.Name != name {
		return nil, fmt.Errorf("%w: meta names volume %q but directory is %q", ErrCorrupt, m.Name, name)
	}
	v, err := openVolume(path, m, s.log)
	if err != nil {
		return nil, fmt.Errorf("%w: data file: %w", ErrCorrupt, err)
	}
	fail := func(err error) (*Volume, error) {
		v.closeLocked() // v is not shared yet
		return nil, fmt.Errorf("%w: data file: %w", ErrCorrupt, err)
	}
	st, err := v.f.Stat()
	if err != nil {
		return fail(err)
	}
	if !st.Mode().IsRegular() {
		return fail(fmt.Errorf("%s is not a regular file", v.f.Name()))
	}
	// The volume is sound. Repair what a crash may have left behind.
	if err := os.Remove(filepath.Join(path, metaTmpName)); err == nil {
		v.log.Info("removed leftover temporary meta file")
	} else if !errors.Is(err, fs.ErrNotExist) {
		v.log.Warn("cannot remove leftover temporary meta file", "err", err)
	}
	// loadSums reconciles the data file's length with the size, and
	// builds or rebuilds the sums file if it is missing or corrupt.
	if err := v.loadSums(st.Size()); err != nil {
		return fail(fmt.Errorf("block checksums: %w", err))
	}
	return v, nil
}

// Dir returns the store's directory.
func (s *Store) Dir() string { return s.dir }

// Create creates a volume described by m and returns it open. A zero
// m.BlockSize means DefaultBlockSize and a zero m.Created means now; Created
// is stored in UTC. m is then checked with ValidateMeta. It fails with
// ErrExists if the name is taken, by a live or a broken volume.
//
// Create is atomic across crashes: the data file (truncated to m.Size, all
// zeros) and meta.json are built and fsynced in a staging directory that is
// then renamed into place. After a crash either no volume exists (Open
// discards the staging directory) or the complete volume does. When Create
// returns successfully the volume is durable.
func (s *Store) Create(m Meta) (*Volume, error) {
	if m.BlockSize == 0 {
		m.BlockSize = DefaultBlockSize
	}
	if m.Created.IsZero() {
		m.Created = time.Now()
	}
	m.Created = m.Created.UTC() // also drops the monotonic clock reading
	if err := ValidateMeta(m); err != nil {
		return nil, err
	}
	name := m.Name

	s.nsMu.Lock()
	defer s.nsMu.Unlock()
	if err := s.checkFree(name); err != nil {
		return nil, err
	}
	staging, err := os.MkdirTemp(s.volDir, createPrefix+name+"-")
	if err != nil {
		return nil, fmt.Errorf("volume %q: create: %w", name, err)
	}
	path := filepath.Join(s.volDir, name)
	err = populate(staging, m)
	if err == nil {
		err = os.Rename(staging, path) // the commit point
	}
	if err != nil {
		s.removeAll(staging)
		return nil, fmt.Errorf("volume %q: create: %w", name, err)
	}
	err = SyncDir(s.volDir) // make the commit durable
	var v *Volume
	if err == nil {
		v, err = openVolume(path, m, s.log)
	}
	if err == nil {
		if err = v.openSums(); err != nil {
			v.closeLocked() // v is not shared yet
		}
	}
	if err != nil {
		// The volume is in place but may vanish in a crash or cannot
		// be opened. Do not hand it out; an operator can Delete it.
		err = fmt.Errorf("volume %q: %w: created but unusable: %w", name, ErrCorrupt, err)
		s.mu.Lock()
		s.broken[name] = err
		s.mu.Unlock()
		s.log.Error("volume created but unusable", "volume", name, "err", err)
		return nil, err
	}
	s.mu.Lock()
	s.vols[name] = v
	s.mu.Unlock()
	v.log.Info("volume created", "size", m.Size, "block_size", m.BlockSize)
	return v, nil
}

// populate writes a new volume's files into the empty directory dir and
// makes them durable: the data file, all zeros and m.Size long, the sums
// file (header, then a hole: the sums of zero blocks are 0) and meta.json,
// then an fsync of dir.
func populate(dir string, m Meta) error {
	if err := createSumsFile(filepath.Join(dir, sumsFileName), m.Size); err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(dir, dataFileName), os.O_RDWR|os.O_CREATE|os.O_EXCL|openFlags, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(m.Size)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return writeMetaFile(dir, m) // also fsyncs dir
}

// checkFree returns nil if no volume named name exists. The caller holds
// s.nsMu, so the answer stays true until it releases it.
func (s *Store) checkFree(name string) error {
	s.mu.Lock()
	closed := s.lock == nil
	_, live := s.vols[name]
	_, broken := s.broken[name]
	s.mu.Unlock()
	switch {
	case closed:
		return fmt.Errorf("volume %q: store is closed: %w", name, ErrClosed)
	case live || broken:
		return fmt.Errorf("volume %q: %w", name, ErrExists)
	}
	// Not known, but something may still sit there (e.g. an entry Open
	// refused to touch); never replace it.
	if _, err := os.Lstat(filepath.Join(s.volDir, name)); err == nil {
		return fmt.Errorf("volume %q: %w (unrecognized entry on disk)", name, ErrExists)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("volume %q: %w", name, err)
	}
	return nil
}

// Get returns the open volume called name. All callers share one *Volume per
// volume. It fails with ErrNotFound if there is no such volume, and for a
// broken volume with its load error (which wraps ErrCorrupt).
func (s *Store) Get(name string) (*Volume, error) {
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lock == nil {
		return nil, fmt.Errorf("volume %q: store is closed: %w", name, ErrClosed)
	}
	if v, ok := s.vols[name]; ok {
		return v, nil
	}
	if err, ok := s.broken[name]; ok {
		return nil, err
	}
	return nil, fmt.Errorf("volume %q: %w", name, ErrNotFound)
}

// List returns the metadata of all loadable volumes, sorted by name. Broken
// volumes are not included. It returns nil once the store is closed.
func (s *Store) List() []Meta {
	s.mu.Lock()
	vols := make([]*Volume, 0, len(s.vols))
	for _, v := range s.vols {
		vols = append(vols, v)
	}
	s.mu.Unlock()
	if len(vols) == 0 {
		return nil
	}
	// Read metas outside s.mu: s.mu is never held with a Volume's mu.
	metas := make([]Meta, len(vols))
	for i, v := range vols {
		metas[i] = v.Meta()
	}
	slices.SortFunc(metas, func(a, b Meta) int { return strings.Compare(a.Name, b.Name) })
	return metas
}

// Broken returns a new map from the name of every volume that exists on disk
// but could not be loaded to the reason, an error wrapping ErrCorrupt.
func (s *Store) Broken() map[string]error {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]error, len(s.broken))
	for name, err := range s.broken {
		out[name] = err
	}
	return out
}

// Delete removes the volume called name; broken volumes can be deleted too.
// It waits for in-flight I/O on the volume, then closes it: later I/O through
// any handle returns ErrClosed. The volume directory is renamed to a trash
// name (the commit point, made durable with a directory fsync) and then
// removed; if a crash interrupts the removal, Open finishes it.
func (s *Store) Delete(name string) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	s.nsMu.Lock()
	defer s.nsMu.Unlock()

	s.mu.Lock()
	closed := s.lock == nil
	v, live := s.vols[name]
	_, broken := s.broken[name]
	s.mu.Unlock()
	switch {
	case closed:
		return fmt.Errorf("volume %q: store is closed: %w", name, ErrClosed)
	case !live && !broken:
		return fmt.Errorf("volume %q: %w", name, ErrNotFound)
	}

	path := filepath.Join(s.volDir, name)
	trash := filepath.Join(s.volDir, fmt.Sprintf("%s%s-%016x", trashPrefix, name, rand.Uint64()))
	if live {
		// Hold the write lock across the rename so that no I/O runs
		// after the volume is committed as deleted.
		v.mu.Lock()
		err := os.Rename(path, trash)
		if err == nil {
			if cerr := v.closeLocked(); cerr != nil {
				v.log.Warn("closing deleted volume", "err", cerr)
			}
		}
		v.mu.Unlock()
		if err != nil {
			return fmt.Errorf("volume %q: delete: %w", name, err)
		}
	} else if err := os.Rename(path, trash); err != nil {
		return fmt.Errorf("volume %q: delete: %w", name, err)
	}

	s.mu.Lock()
	delete(s.vols, name)
	delete(s.broken, name)
	s.mu.Unlock()

	if err := SyncDir(s.volDir); err != nil {
		return fmt.Errorf("volume %q: delete: %w", name, err)
	}
	s.removeAll(trash) // failure is harmless: Open retries
	s.log.Info("volume deleted", "volume", name)
	return nil
}

// Resize changes the size of the volume called name. The new size is checked
// with ValidateMeta against the volume's block size. Resize waits for
// in-flight I/O and blocks new I/O until it is done. Growing exposes zeros;
// shrinking discards the data past the new size.
//
// meta.json is the commit point: growing extends (and fsyncs) the data file
// first and then commits, shrinking commits first and then truncates. Either
// way a crash leaves a data file at least as long as the committed size, with
// nothing but zeros or discarded data past it, and Open truncates it to that
// size. If Resize fails, the size seen after a restart is the old or the new
// one; in this process Size reports the one last committed.
func (s *Store) Resize(name string, size int64) error {
	s.nsMu.Lock()
	defer s.nsMu.Unlock()
	v, err := s.Get(name)
	if err != nil {
		return err
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.f == nil { // unreachable while nsMu is held; kept for safety
		return fmt.Errorf("volume %q: resize: %w", name, ErrClosed)
	}
	old := v.meta
	m := old
	m.Size = size
	if err := ValidateMeta(m); err != nil {
		return err
	}
	if size == old.Size {
		return nil
	}
	gen := v.gen.Add(1)
	if size > old.Size {
		// Cut the files to the old size first: if an earlier shrink
		// committed but failed to truncate, stale bytes (and sums) are
		// still past old.Size and must not reappear. Normally this is a
		// no-op. The grown blocks are zeros and their sums 0; the old
		// last block, if short, keeps its sum: it was computed padded
		// with zeros, which is what the grow adds.
		err := v.f.Truncate(old.Size)
		if err == nil {
			err = v.f.Truncate(size)
		}
		if err == nil {
			err = v.f.Sync()
		}
		if err == nil {
			err = v.sums.Truncate(sumsFileLen(old.Size))
		}
		if err == nil {
			err = v.sums.Truncate(sumsFileLen(size))
		}
		if err == nil {
			err = v.sums.Sync()
		}
		if err == nil {
			err = writeMetaFile(v.path, m)
		}
		if err != nil {
			// Not committed. Put the files back; if that fails too,
			// Open will do it.
			_ = v.f.Truncate(old.Size)
			_ = v.sums.Truncate(sumsFileLen(old.Size))
			return fmt.Errorf("volume %q: grow to %d: %w", name, size, err)
		}
		v.meta = m
	} else {
		if err := writeMetaFile(v.path, m); err != nil {
			return fmt.Errorf("volume %q: shrink to %d: write meta: %w", name, size, err)
		}
		v.meta = m // committed; Open reconciles the files if the rest fails
		if err := v.shrinkLocked(old.Size, size, gen); err != nil {
			return fmt.Errorf("volume %q: shrink to %d: %w", name, size, err)
		}
	}
	v.log.Info("volume resized", "old_size", old.Size, "size", size)
	return nil
}

// Close syncs and closes every volume (their later I/O returns ErrClosed) and
// releases the directory lock. Later store operations return ErrClosed.
// Close is idempotent.
func (s *Store) Close() error {
	s.nsMu.Lock()
	defer s.nsMu.Unlock()
	s.mu.Lock()
	lock, vols := s.lock, s.vols
	s.lock, s.vols, s.broken = nil, map[string]*Volume{}, map[string]error{}
	s.mu.Unlock()
	if lock == nil {
		return nil
	}
	var errs []error
	for _, v := range vols {
		v.mu.Lock()
		if v.f != nil {
			if err := v.syncLocked(); err != nil {
				errs = append(errs, err)
			}
		}
		errs = append(errs, v.closeLocked())
		v.mu.Unlock()
	}
	errs = append(errs, lock.Close())
	s.log.Info("volume store closed", "dir", s.dir)
	return errors.Join(errs...)
}

// removeAll removes path recursively, logging (not returning) failure: every
// caller removes something that Open removes again if it is still there.
func (s *Store) removeAll(path string) {
	if err := os.RemoveAll(path); err != nil {
		s.log.Warn("cannot remove", "path", path, "err", err)
	}
}
