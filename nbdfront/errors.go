package nbdfront

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"syscall"
)

// NBD error values sent in replies (doc/proto.md "Error values"). They are
// protocol constants, not host errno values.
const (
	EPERM     uint32 = 1   // operation not permitted (write to a read-only export)
	EIO       uint32 = 5   // input/output error (default for unclassified failures)
	ENOMEM    uint32 = 12  // cannot allocate memory
	EINVAL    uint32 = 22  // invalid argument (bad range, flags, command)
	ENOSPC    uint32 = 28  // no space left (write beyond the end, out of space)
	EOVERFLOW uint32 = 75  // value too large (read longer than the maximum payload)
	ENOTSUP   uint32 = 95  // operation not supported (only for NBD_CMD_FLAG_FAST_ZERO)
	ESHUTDOWN uint32 = 108 // server is shutting down; the client must disconnect
)

// Sentinel errors for Backend and Device implementations. Return them
// (possibly wrapped with %w) to choose the error the client sees; all are
// safe to compare with errors.Is from any goroutine.
var (
	// ErrUnknownExport reports that an export does not exist. From
	// Backend.Info/Open it becomes NBD_REP_ERR_UNKNOWN; from a Device it
	// becomes NBD_EIO.
	ErrUnknownExport = errors.New("nbd: unknown export")
	// ErrReadOnly reports a write to something read-only. From a Device it
	// becomes NBD_EPERM; from Backend.Open it becomes NBD_REP_ERR_POLICY.
	ErrReadOnly = errors.New("nbd: read-only")
	// ErrUnsupported reports an operation the device cannot perform. From a
	// Device it becomes NBD_ENOTSUP for a fast-zero request and NBD_EINVAL
	// otherwise (the protocol reserves ENOTSUP for fast zeroes); from the
	// Backend it becomes NBD_REP_ERR_POLICY.
	ErrUnsupported = errors.New("nbd: operation not supported")
	// ErrInvalidArgument reports an invalid request. It becomes NBD_EINVAL, or
	// NBD_REP_ERR_INVALID from the Backend.
	ErrInvalidArgument = errors.New("nbd: invalid argument")
	// ErrNoSpace reports that storage is exhausted. It becomes NBD_ENOSPC.
	ErrNoSpace = errors.New("nbd: no space left")
	// ErrBusy reports that an export cannot be opened the way it was asked
	// for because someone else is using it (a read-write attach at another
	// server). From Backend.Open it becomes NBD_REP_ERR_POLICY, with the
	// error text for the user; from a Device, NBD_EPERM.
	ErrBusy = errors.New("nbd: export in use")
	// ErrShutdown reports that the service is going away. It becomes
	// NBD_ESHUTDOWN (the client then disconnects), or NBD_REP_ERR_SHUTDOWN
	// from the Backend.
	ErrShutdown = errors.New("nbd: shutting down")
)

// errPanic marks errors produced by recovering a panic in a Device, Export
// or Backend call.
var errPanic = errors.New("nbd: panic in backend call")

// DefaultErrorCode maps an error returned by a Device to an NBD error
// value. It is the Config.ErrorCode used when none is configured, and is
// safe for concurrent use. Mapping, first match wins:
//
//   - nil: 0
//   - ErrReadOnly, ErrBusy, fs.ErrPermission, EPERM, EACCES, EROFS: EPERM
//   - ErrNoSpace, ENOSPC, EDQUOT, EFBIG: ENOSPC (as the spec asks)
//   - ErrInvalidArgument, EINVAL: EINVAL
//   - ErrUnsupported, EOPNOTSUPP/ENOTSUP: ENOTSUP
//   - ENOMEM: ENOMEM
//   - ErrShutdown, ESHUTDOWN, context.Canceled: ESHUTDOWN — a cancelled
//     operation means this process is stopping, and ESHUTDOWN makes the
//     client disconnect and reconnect elsewhere
//   - anything else, including context.DeadlineExceeded (a timed out,
//     possibly transient, replication round): EIO
//
// The server itself never sends ENOTSUP except for fast-zero requests; it
// downgrades the code to EINVAL elsewhere, as the spec asks.
func DefaultErrorCode(err error) uint32 {
	if err == nil {
		return 0
	}
	switch {
	case errors.Is(err, ErrReadOnly), errors.Is(err, ErrBusy), errors.Is(err, fs.ErrPermission):
		return EPERM
	case errors.Is(err, ErrNoSpace):
		return ENOSPC
	case errors.Is(err, ErrInvalidArgument):
		return EINVAL
	case errors.Is(err, ErrUnsupported):
		return ENOTSUP
	case errors.Is(err, ErrShutdown), errors.Is(err, context.Canceled):
		return ESHUTDOWN
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		switch errno {
		case syscall.EPERM, syscall.EACCES, syscall.EROFS:
			return EPERM
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			return ENOSPC
		case syscall.EINVAL:
			return EINVAL
		case syscall.EOPNOTSUPP:
			return ENOTSUP
		case syscall.ENOMEM:
			return ENOMEM
		case syscall.ESHUTDOWN:
			return ESHUTDOWN
		}
	}
	return EIO
}

// optionErrorReply maps an error from a Backend call made during the
// option phase to an NBD_REP_ERR_* reply type.
func optionErrorReply(err error) uint32 {
	switch {
	case errors.Is(err, ErrUnknownExport), errors.Is(err, fs.ErrNotExist):
		return repErrUnknown
	case errors.Is(err, ErrShutdown), errors.Is(err, context.Canceled):
		return repErrShutdown
	case errors.Is(err, ErrReadOnly), errors.Is(err, ErrBusy), errors.Is(err, ErrUnsupported), errors.Is(err, fs.ErrPermission):
		return repErrPolicy
	case errors.Is(err, ErrInvalidArgument):
		return repErrInvalid
	default:
		// There is no generic failure reply; "not available" plus the
		// error text is what clients handle best.
		return repErrUnknown
	}
}

// safeCall runs fn and turns a panic into an error wrapping errPanic, so a
// faulty Device or Backend fails one request instead of the process.
func safeCall(fn func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: %v", errPanic, r)
		}
	}()
	return fn()
}
