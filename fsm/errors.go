package fsm

import "errors"

// Errors returned by this package, always wrapped with context; test for
// them with errors.Is. A Result's Err wraps exactly one of them.
//
// Every error except ErrFailed and ErrClosed is a deterministic verdict: it
// depends only on the command and the replicated state, so every site
// reaches the same one for the same log entry. ErrFailed is local to one
// site.
var (
	// ErrBadCommand: the entry is not a well-formed command (bad magic,
	// checksum, lengths, op kinds, names, trailing bytes, ...).
	ErrBadCommand = errors.New("malformed command")
	// ErrUnsupportedVersion: the entry was encoded with a format version
	// this build does not understand.
	ErrUnsupportedVersion = errors.New("unsupported command format version")
	// ErrUnknownVolume: the command names a volume that does not exist.
	ErrUnknownVolume = errors.New("unknown volume")
	// ErrVolumeExists: CreateVolume names an existing volume whose
	// metadata differs from the command's.
	ErrVolumeExists = errors.New("volume already exists")
	// ErrOutOfRange: an op or verify range does not lie within the volume.
	ErrOutOfRange = errors.New("range outside the volume")
	// ErrInvalidCommand: the command is well-formed but its values are not
	// acceptable (session or seq 0, bad size or block size, verify
	// limits).
	ErrInvalidCommand = errors.New("invalid command")
	// ErrSeqGap: a WriteBatch's Seq is more than one past its session's
	// last applied Seq, or the session is unknown (never seen or evicted)
	// and Seq is not 1. Nothing was applied; the writer must resend the
	// missing batches in order, or start a new session if it was evicted.
	ErrSeqGap = errors.New("write batch sequence gap")
	// ErrStaleEpoch: a WriteBatch's lease epoch is not the volume's
	// current one, or the lease was released: its writer was fenced.
	ErrStaleEpoch = errors.New("stale lease epoch")
	// ErrLeaseConflict: an AcquireLease whose Prev is not the current
	// epoch (someone else acquired it first), or a ReleaseLease of a lease
	// the site does not hold at that epoch.
	ErrLeaseConflict = errors.New("volume lease conflict")
	// ErrClusterIDSet: a SetClusterID whose ID differs from the one the
	// state already holds (the cluster ID never changes).
	ErrClusterIDSet = errors.New("cluster ID already set")
	// ErrFailed: this site could not apply an entry because of a local
	// I/O error, or has not finished installing a snapshot. The site stops
	// applying (every later entry also returns ErrFailed) until it is
	// restarted or a snapshot is installed; see DESIGN.md. The entry may
	// well have been applied at the other sites.
	ErrFailed = errors.New("state machine failed at this site")
	// ErrClosed: the FSM was closed.
	ErrClosed = errors.New("state machine closed")
)

// errorCodes maps each sentinel to its wire code. Codes never change once
// released: sites of different versions exchange them.
var errorCodes = []struct {
	code string
	err  error
}{
	{"bad_command", ErrBadCommand},
	{"unsupported_version", ErrUnsupportedVersion},
	{"unknown_volume", ErrUnknownVolume},
	{"volume_exists", ErrVolumeExists},
	{"out_of_range", ErrOutOfRange},
	{"invalid", ErrInvalidCommand},
	{"seq_gap", ErrSeqGap},
	{"stale_epoch", ErrStaleEpoch},
	{"lease_conflict", ErrLeaseConflict},
	{"cluster_id_set", ErrClusterIDSet},
	{"failed", ErrFailed},
	{"closed", ErrClosed},
}

// codeOther is the code of a non-nil error that wraps none of this
// package's errors.
const codeOther = "other"

// ErrorCode returns the stable wire code of err: "" for nil, the code of the
// first of this package's errors that err wraps, or "other". Send it with
// err.Error() and rebuild the error on the other side with ErrorFromCode.
func ErrorCode(err error) string {
	if err == nil {
		return ""
	}
	for _, c := range errorCodes {
		if errors.Is(err, c.err) {
			return c.code
		}
	}
	return codeOther
}

// ErrorFromCode rebuilds an error from ErrorCode's code and the original
// message: nil for code "", an error whose Error() is msg and that matches
// the code's sentinel with errors.Is for a known code, and a plain error
// with msg for "other" or a code this build does not know.
func ErrorFromCode(code, msg string) error {
	if code == "" {
		return nil
	}
	for _, c := range errorCodes {
		if c.code == code {
			if msg == "" {
				msg = c.err.Error()
			}
			return &remoteError{msg: msg, sentinel: c.err}
		}
	}
	if msg == "" {
		msg = "error code " + code
	}
	return errors.New(msg)
}

// remoteError is an error received from another site: its original message,
// matching its sentinel.
type remoteError struct {
	msg      string
	sentinel error
}

func (e *remoteError) Error() string { return e.msg }
func (e *remoteError) Unwrap() error { return e.sentinel }
