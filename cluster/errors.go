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
	// ErrForbidden: an internal request acting for another site than the
	// one it comes from (Config.PeerName), or from no site identity at
	// all when Config.RequirePeer is set.
	ErrForbidden = errors.New("forbidden: the request does not come from the site it acts for")
	// ErrKeyringRefused: a gossip keyring change refused before anything
	// changed, because it would cut a live site off gossip (using a key
	// some site lacks, removing a key some site encrypts with or the
	// primary), or because gossip is not encrypted at the site.
	ErrKeyringRefused = fmt.Errorf("%w: gossip keyring change refused", ErrInvalidRequest)
	// ErrKeyringIncomplete: a gossip keyring change failed at some live
	// sites (the report names them). Every change is idempotent: run it
	// again once they answer.
	ErrKeyringIncomplete = errors.New("gossip keyring change did not reach every live site")
	// ErrBadKeyring: the persisted gossip keyring cannot be read.
	ErrBadKeyring = errors.New("unreadable gossip keyring file")
	// ErrPeerRefused: a site refused to serve a range of its copy to
	// another site's repair: its copy is damaged there, not exact at its
	// applied index (replaying, installing a snapshot, failed), behind
	// the index asked for, or it has no such volume. Another site may
	// serve it. Served as 503.
	ErrPeerRefused = errors.New("the site cannot serve this range of its copy")
	// ErrNoHealthyCopy: a damaged range of this site's copy could not be
	// read from any other site (all refused or were unreachable, or the
	// range kept being written during each repair). The read fails rather
	// than return other bytes.
	ErrNoHealthyCopy = errors.New("no healthy copy of a damaged range could be read from another site")
	// ErrBadCatchUpBase: a site's answer to the catch-up base request is
	// not a valid catch-up base (the leader then sends the whole
	// snapshot).
	ErrBadCatchUpBase = errors.New("malformed catch-up base")
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
