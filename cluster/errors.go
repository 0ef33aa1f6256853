package cluster

import (
	"context"
	"errors"
	"fmt"

	"github.com/robib/robib/fsm"
)

// Errors of this package. Retryable ones (ErrNoLeader, ErrNotLeader,
// ErrUnreachable) wrap ErrRetry so writers can tell them from final answers.
var (
	ErrRetry          = errors.New("temporary cluster condition, retry")
	ErrNoLeader       = fmt.Errorf("%w: no leader", ErrRetry)
	ErrNotLeader      = fmt.Errorf("%w: not the leader", ErrRetry)
	ErrUnreachable    = fmt.Errorf("%w: leader unreachable", ErrRetry)
	ErrClosed         = errors.New("cluster node closed")
	ErrUnknownSite    = errors.New("unknown site")
	ErrInvalidRequest = errors.New("invalid cluster request")
	// ErrLeaseHeld: another site holds the volume's read-write lease and
	// keeps renewing it.
	ErrLeaseHeld = errors.New("volume is attached read-write at another site")
	// ErrLeaseLost: this site's volume lease was taken over or released;
	// its writes are fenced.
	ErrLeaseLost = errors.New("volume lease lost")
)

// retryable lists the errors after which the same command may be proposed
// again (writers dedupe by session and seq); IsRetryable looks an error up
// in it with errors.Is.
var retryable = []error{
	ErrRetry, // ErrNoLeader, ErrNotLeader, ErrUnreachable
	fsm.ErrSeqGap,
	context.DeadlineExceeded,
	// The leader's own copy failed while applying a committed entry: the
	// entry stands; the leader steps down and a resend reaches a healthy
	// one, where it is a duplicate.
	fsm.ErrFailed,
}

// IsRetryable reports whether err is a transient condition after which the
// same command may be proposed again: whether it matches one of retryable.
func IsRetryable(err error) bool {
	for _, r := range retryable {
		if errors.Is(err, r) {
			return true
		}
	}
	return false
}
