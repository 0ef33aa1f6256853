package wire

import "errors"

// Errors of this package. Frame and connection errors wrap one of these
// with %w and the detail (which peer, which field, which length).
var (
	// ErrInvalidConfig: a Config or an argument that cannot work (no listener,
	// no dialer, a negative size).
	ErrInvalidConfig = errors.New("wire: invalid argument")
	// ErrMagic: the bytes received are not a frame of this protocol (a
	// stranger, a msgpack NetworkTransport peer, garbage).
	ErrMagic = errors.New("wire: not a robib wire frame (bad magic)")
	// ErrVersion: the peer speaks another version of the frame format.
	ErrVersion = errors.New("wire: unsupported frame version")
	// ErrChecksum: a header, metadata, payload or snapshot checksum does
	// not match.
	ErrChecksum = errors.New("wire: checksum mismatch")
	// ErrTooLarge: a frame whose declared length is above the configured
	// maximum; it is refused before anything is allocated.
	ErrTooLarge = errors.New("wire: frame too large")
	// ErrMalformed: a frame whose header checks out but whose contents do
	// not decode (unknown kind, lengths past the end, trailing bytes,
	// a boolean that is neither 0 nor 1, a response of the wrong kind).
	ErrMalformed = errors.New("wire: malformed frame")
	// ErrTruncated: the connection ended in the middle of a frame.
	ErrTruncated = errors.New("wire: truncated frame")
	// ErrSlow: a peer started a frame and did not finish it within its
	// deadline (Timeout, scaled by the frame's size).
	ErrSlow = errors.New("wire: peer too slow to finish a frame")
	// ErrRejected: the peer refused our frame and said why before closing
	// the connection.
	ErrRejected = errors.New("wire: rejected by peer")
	// ErrPeerMismatch: a request's header names another server than the
	// one the connection comes from (Config.PeerName).
	ErrPeerMismatch = errors.New("wire: request names another server than the connection's peer")
	// ErrShutdown: the transport or pipeline is closed.
	ErrShutdown = errors.New("wire: transport closed")
)
