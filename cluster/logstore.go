package cluster

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	wal "github.com/hashicorp/raft-wal"
	"github.com/hashicorp/raft-wal/metadb"
	"go.etcd.io/bbolt"
	"golang.org/x/sys/unix"

	"github.com/robib/robib/cluster/dcdlog"
)

// Raft log stores (Config.LogStore). Both also serve as the stable store
// (current term, vote).
const (
	LogStoreDCD    = "dcd"    // the DCD log (cluster/dcdlog) in dcdlog/, term and vote in stable.db (raft-boltdb)
	LogStoreBoltDB = "boltdb" // raft-boltdb: one bbolt file, raft.db
	LogStoreWAL    = "wal"    // raft-wal: append-only segment files in wal/
)

// DefaultLogStore is the log store of new data directories.
const DefaultLogStore = LogStoreDCD

// logStoreMarker, in the Raft directory, names the log store the directory
// was created with.
const logStoreMarker = "log-store"

// ErrLogStoreMismatch: the data directory's Raft log is kept in another kind
// of store than the one configured.
var ErrLogStoreMismatch = errors.New("raft log store differs from the one this data directory was created with")

// openLogStore opens (creating if needed) the Raft log and stable store of
// kind in dir, the Raft directory. The kind is fixed per directory: it is
// recorded in dir/log-store when the store is created, and asking for
// another kind later fails with ErrLogStoreMismatch, since switching would
// start from an empty log. A directory from before the marker existed that
// holds raft.db is a boltdb one. The returned Closer closes the store and
// releases the directory's lock (a second agent on the same directory fails
// at once instead of waiting).
func openLogStore(kind, dir string, log hclog.Logger) (raft.LogStore, raft.StableStore, io.Closer, error) {
	if kind == "" {
		kind = DefaultLogStore
	}
	if kind != LogStoreDCD && kind != LogStoreBoltDB && kind != LogStoreWAL {
		return nil, nil, nil, fmt.Errorf("%w: raft log store %q: want %s, %s or %s", ErrInvalidRequest, kind, LogStoreDCD, LogStoreBoltDB, LogStoreWAL)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, nil, fmt.Errorf("raft dir: %w", err)
	}
	lock, err := lockLogStore(kind, dir)
	if err != nil {
		return nil, nil, nil, err
	}
	if kind == LogStoreDCD {
		return openDCDLog(dir, lock)
	}
	var store interface {
		raft.LogStore
		raft.StableStore
		io.Closer
	}
	switch kind {
	case LogStoreBoltDB:
		store, err = raftboltdb.New(raftboltdb.Options{
			Path: filepath.Join(dir, "raft.db"),
			BoltOptions: &bbolt.Options{
				Timeout: time.Second, // a second agent on the same data dir fails instead of hanging
				// The log churns: entries are appended and compacted away all
				// the time. A hashmap freelist that is rebuilt on open instead
				// of written on every commit keeps appends cheap as the file
				// accumulates free pages.
				NoFreelistSync:  true,
				FreelistType:    bbolt.FreelistMapType,
				InitialMmapSize: 1 << 30,
			},
		})
	case LogStoreWAL:
		walDir := filepath.Join(dir, "wal")
		if err = os.MkdirAll(walDir, 0o700); err != nil {
			break
		}
		// WAL.Close (v0.4.0) leaves its meta database open, and with it
		// that file's lock, so a reopen in the same process would hang:
		// hand it one we close ourselves, after the WAL.
		meta := &metadb.BoltMetaDB{}
		var w *wal.WAL
		if w, err = wal.Open(walDir, wal.WithLogger(log), wal.WithMetaStore(meta)); err != nil {
			meta.Close()
			break
		}
		store = walStore{w, meta}
	}
	if err != nil {
		lock.Close()
		return nil, nil, nil, fmt.Errorf("opening raft log (%s) in %s: %w", kind, dir, err)
	}
	return store, store, closers{store, lock}, nil
}

// openDCDLog opens the DCD log in dir/dcdlog and, for the term and vote,
// a small raft-boltdb file, dir/stable.db.
func openDCDLog(dir string, lock *os.File) (raft.LogStore, raft.StableStore, io.Closer, error) {
	logs, err := dcdlog.Open(filepath.Join(dir, "dcdlog"), dcdlog.Options{})
	if err != nil {
		lock.Close()
		return nil, nil, nil, fmt.Errorf("opening raft log (%s) in %s: %w", LogStoreDCD, dir, err)
	}
	stable, err := raftboltdb.New(raftboltdb.Options{
		Path:        filepath.Join(dir, "stable.db"),
		BoltOptions: &bbolt.Options{Timeout: time.Second},
	})
	if err != nil {
		logs.Close()
		lock.Close()
		return nil, nil, nil, fmt.Errorf("opening raft stable store in %s: %w", dir, err)
	}
	return logs, stable, closers{logs, stable, lock}, nil
}

// lockLogStore takes an exclusive lock on dir's marker file, held until the
// returned file is closed, then checks the kind recorded there against kind,
// or records kind (durably) if the marker is new.
func lockLogStore(kind, dir string) (*os.File, error) {
	marker := filepath.Join(dir, logStoreMarker)
	f, err := os.OpenFile(marker, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("raft log store marker: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("raft log in %s is in use by another process (another agent on this data directory?)", dir)
		}
		return nil, fmt.Errorf("locking the raft log %s: %w", dir, err)
	}
	if err := checkLogStoreKind(f, kind, dir); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// checkLogStoreKind compares the kind recorded in the (locked) marker f
// with kind. An empty marker is new: the kind of an existing log is
// inferred from its files (a directory from before the marker holds
// raft.db), and kind is recorded if it matches.
func checkLogStoreKind(f *os.File, kind, dir string) error {
	b, err := io.ReadAll(io.LimitReader(f, 64))
	if err != nil {
		return fmt.Errorf("reading %s: %w", f.Name(), err)
	}
	if have := strings.TrimSpace(string(b)); have != "" {
		if have != kind {
			return fmt.Errorf("%w: %s says %q, configured %q (keep --raft-log-store=%s for this data directory)",
				ErrLogStoreMismatch, f.Name(), have, kind, have)
		}
		return nil
	}
	have := ""
	if _, err := os.Stat(filepath.Join(dir, "dcdlog")); err == nil {
		have = LogStoreDCD
	} else if _, err := os.Stat(filepath.Join(dir, "raft.db")); err == nil {
		have = LogStoreBoltDB
	} else if _, err := os.Stat(filepath.Join(dir, "wal")); err == nil {
		have = LogStoreWAL
	}
	if have != "" && have != kind {
		return fmt.Errorf("%w: %s holds a %s log, configured %q (keep --raft-log-store=%s for this data directory)",
			ErrLogStoreMismatch, dir, have, kind, have)
	}
	if _, err := f.WriteAt([]byte(kind+"\n"), 0); err != nil {
		return fmt.Errorf("recording the raft log store in %s: %w", f.Name(), err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("recording the raft log store in %s: %w", f.Name(), err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// walStore is a raft-wal WAL (whose methods, IsMonotonic included, it
// keeps) that also closes the meta database it was given.
type walStore struct {
	*wal.WAL
	meta *metadb.BoltMetaDB
}

func (s walStore) Close() error { return errors.Join(s.WAL.Close(), s.meta.Close()) }

// closers closes each in order and joins the errors.
type closers []io.Closer

func (cs closers) Close() error {
	var errs []error
	for _, c := range cs {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}

// Raft keeps a WAL's indexes gapless (it clears the log when it installs a
// snapshot) only if it sees the store as monotonic.
var _ raft.MonotonicLogStore = walStore{}
