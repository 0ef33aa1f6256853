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
// safe to compare with errors.Is from any goroutine. The two tables below
// are where they are mapped: DefaultErrorTable (Device errors to NBD error
// values) and optionErrors (Backend errors to NBD_REP_ERR_* replies).
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
	// ErrInvalidArgument reports an invalid request. It becomes
	// NBD_EINVAL, or NBD_REP_ERR_INVALID from the Backend.
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
	// ErrDenied reports that the peer may not do what it asked. From
	// Config.Authorize (or the Backend) it becomes NBD_REP_ERR_POLICY with
	// the error text for the user; from a Device, NBD_EPERM.
	ErrDenied = errors.New("nbd: access denied")
)

// errPanic marks errors produced by recovering a panic in a Device, Export
// or Backend call.
var errPanic = errors.New("nbd: panic in backend call")

// ErrorRule is one row of an ErrorTable: errors matching Err (errors.Is)
// get Code.
type ErrorRule struct {
	Err  error
	Code uint32
}

// ErrorTable maps errors to NBD error values: the first row whose Err the
// error matches with errors.Is wins, so more specific rows (an error that
// wraps another) come first. A non-nil error that matches no row gets EIO;
// nil gets 0.
type ErrorTable []ErrorRule

// Code returns the NBD error value of err in t. It is safe for concurrent
// use as long as t is not modified, so t.Code can be a Config.ErrorCode.
func (t ErrorTable) Code(err error) uint32 {
	if err == nil {
		return 0
	}
	return t.lookup(err, EIO)
}

// lookup returns the Code of the first row err matches, or def.
func (t ErrorTable) lookup(err error, def uint32) uint32 {
	for _, r := range t {
		if errors.Is(err, r.Err) {
			return r.Code
		}
	}
	return def
}

// DefaultErrorTable returns (a fresh copy of) the table behind
// DefaultErrorCode. Servers with errors of their own put their rows in
// front of it: append(ErrorTable{...}, DefaultErrorTable()...).
//
// Rows, in order (first match wins): this package's sentinels and the
// standard library's error values first, then the host errno values a
// Device may pass up (syscall.Errno, possibly inside an *fs.PathError).
//
//   - ErrReadOnly, ErrBusy, ErrDenied, fs.ErrPermission (also EPERM, EACCES): EPERM
//   - ErrNoSpace: ENOSPC (as the spec asks)
//   - ErrInvalidArgument: EINVAL
//   - ErrUnsupported: ENOTSUP
//   - ErrShutdown, context.Canceled: ESHUTDOWN — a cancelled operation
//     means this process is stopping, and ESHUTDOWN makes the client
//     disconnect and reconnect elsewhere
//   - EPERM, EACCES, EROFS: EPERM
//   - ENOSPC, EDQUOT, EFBIG: ENOSPC (as the spec asks)
//   - EINVAL: EINVAL
//   - EOPNOTSUPP/ENOTSUP: ENOTSUP
//   - ENOMEM: ENOMEM
//   - ESHUTDOWN: ESHUTDOWN
//   - anything else, including context.DeadlineExceeded (a timed out,
//     possibly transient, replication round): EIO
//
// The server itself never sends ENOTSUP except for fast-zero requests; it
// downgrades the code to EINVAL elsewhere, as the spec asks.
func DefaultErrorTable() ErrorTable {
	return ErrorTable{
		{ErrReadOnly, EPERM},
		{ErrBusy, EPERM},
		{ErrDenied, EPERM},
		{fs.ErrPermission, EPERM},
		{ErrNoSpace, ENOSPC},
		{ErrInvalidArgument, EINVAL},
		{ErrUnsupported, ENOTSUP},
		{ErrShutdown, ESHUTDOWN},
		{context.Canceled, ESHUTDOWN},
		{syscall.EPERM, EPERM},
		{syscall.EACCES, EPERM},
		{syscall.EROFS, EPERM},
		{syscall.ENOSPC, ENOSPC},
		{syscall.EDQUOT, ENOSPC},
		{syscall.EFBIG, ENOSPC},
		{syscall.EINVAL, EINVAL},
		{syscall.EOPNOTSUPP, ENOTSUP},
		{syscall.ENOMEM, ENOMEM},
		{syscall.ESHUTDOWN, ESHUTDOWN},
	}
}

// defaultErrors backs DefaultErrorCode; never modified.
var defaultErrors = DefaultErrorTable()

// DefaultErrorCode maps an error returned by a Device to an NBD error
// value with DefaultErrorTable. It is the Config.ErrorCode used when none
// is configured, and is safe for concurrent use.
func DefaultErrorCode(err error) uint32 { return defaultErrors.Code(err) }

// optionErrors maps an error from a Backend or Authorize call made during
// the option phase to an NBD_REP_ERR_* reply type (optionErrorReply);
// first match wins.
var optionErrors = ErrorTable{
	{ErrUnknownExport, repErrUnknown},
	{fs.ErrNotExist, repErrUnknown},
	{ErrShutdown, repErrShutdown},
	{context.Canceled, repErrShutdown},
	{ErrReadOnly, repErrPolicy},
	{ErrBusy, repErrPolicy},
	{ErrDenied, repErrPolicy},
	{ErrUnsupported, repErrPolicy},
	{fs.ErrPermission, repErrPolicy},
	{ErrInvalidArgument, repErrInvalid},
}

// optionErrorReply returns the NBD_REP_ERR_* reply type of a Backend
// error: its row in optionErrors, or NBD_REP_ERR_UNKNOWN. There is no
// generic failure reply; "not available" plus the error text is what
// clients handle best.
func optionErrorReply(err error) uint32 { return optionErrors.lookup(err, repErrUnknown) }

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
