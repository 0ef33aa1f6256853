package volume

import (
	"errors"
	"os"

	"golang.org/x/sys/unix"
)

// openFlags are added to every open(2) of a store file. Go already sets
// O_CLOEXEC; it is spelled out to make the contract visible. O_DIRECT is
// deliberately not used: the page cache absorbs small writes and Sync makes
// them durable.
const openFlags = unix.O_CLOEXEC

// retryEINTR calls fn until it returns something other than EINTR. The Go
// runtime delivers signals (e.g. for goroutine preemption) that can interrupt
// long fallocate or fdatasync calls.
func retryEINTR(fn func() error) error {
	for {
		if err := fn(); !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// fallocateFunc has the signature of unix.Fallocate. Volumes call it through
// a field so tests can simulate filesystems without fallocate support.
type fallocateFunc func(fd int, mode uint32, off, length int64) error

// isNotSupported reports whether err means the filesystem or kernel does not
// implement the requested fallocate mode.
func isNotSupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS)
}

// SyncDir fsyncs the directory at path, making entries created, renamed or
// removed in it durable.
func SyncDir(path string) error {
	d, err := os.Open(path)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// lockDir takes an exclusive, non-blocking flock(2) on <dir>/LOCK and
// returns the open lock file; closing it releases the lock. The lock keeps a
// second Store (in this or another process) from opening the same directory.
func lockDir(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|openFlags, 0o600)
	if err != nil {
		return nil, err
	}
	err = retryEINTR(func() error { return unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) })
	if err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, errors.New("directory is in use by another store (flock held)")
		}
		return nil, err
	}
	return f, nil
}

// readFunc has the signature of (*os.File).ReadAt. Volumes read their data
// file through a field of this type so tests can inject I/O errors.
type readFunc func(f *os.File, p []byte, off int64) (int, error)
