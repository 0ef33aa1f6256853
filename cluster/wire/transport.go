// Package wire is a raft.Transport for hashicorp/raft that moves log entry
// payloads without copying them in user space: the sender writes each
// entry's Data and Extensions straight from the caller's slices with one
// vectored write per frame, the receiver reads a whole frame body into one
// buffer and the decoded entries slice into it. The frame format is
// binary, little-endian, versioned and checksummed (DESIGN.md).
//
// It imports nothing of robib: it gets a listener, a dialer and the
// advertised address from its caller, like raft.NetworkTransport's
// StreamLayer.
package wire

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
)

// Defaults for the zero values of Config.
const (
	DefaultTimeout         = 10 * time.Second
	DefaultMaxPool         = 4
	DefaultMaxRPCsInFlight = 2
	// timeoutScale: I/O deadlines grow by one Timeout per this many bytes
	// of a frame body or snapshot, as raft.NetworkTransport does for
	// snapshots.
	timeoutScale = 256 << 10
	// snapBufSize is the copy buffer of a snapshot stream.
	snapBufSize = 256 << 10
)

// Config is what New needs. Listener and Dial are required.
type Config struct {
	// Listener accepts the Raft connections of peers. Close closes it.
	Listener net.Listener
	// Dial opens a connection to a peer's advertised address; ctx carries
	// the dial timeout and is cancelled by Close.
	Dial func(ctx context.Context, addr string) (net.Conn, error)
	// Advertise is this node's address as peers dial it (LocalAddr);
	// empty means Listener.Addr().
	Advertise string
	// Timeout bounds each RPC's I/O, scaled up by one Timeout per 256 KiB
	// of frame body or snapshot. It also bounds dials and how long a peer
	// may take to finish a frame it started (slow senders are cut off).
	// Zero means DefaultTimeout.
	Timeout time.Duration
	// MaxPool is how many idle connections are kept per peer; zero means
	// DefaultMaxPool, negative is invalid.
	MaxPool int
	// MaxRPCsInFlight bounds pipelined AppendEntries per follower, as in
	// raft.NetworkTransportConfig; zero means DefaultMaxRPCsInFlight, 1
	// disables pipelining.
	MaxRPCsInFlight int
	// MaxFrame caps a frame's body (metadata + payload) in both
	// directions; zero means DefaultMaxFrame. A larger frame is refused
	// before any allocation (ErrTooLarge). Peers must agree on it.
	MaxFrame int
	// PayloadChecksum adds a crc32c of each frame's payload (entry Data
	// and Extensions). Headers and metadata are always checksummed.
	PayloadChecksum bool
	// Logger gets connection-level errors; nil discards them.
	Logger *slog.Logger
	// PeerName, if set, names the server an inbound connection comes
	// from (for example the site a verified TLS client certificate
	// names); ok=false means unknown, and nothing is checked. It is
	// called once per connection, after the connection's first frame was
	// read (so a TLS handshake is complete). A request on a connection
	// with a known peer whose header names another server ID (or none)
	// is refused with a reject frame and the connection closed
	// (ErrPeerMismatch); nothing reaches raft.
	PeerName func(net.Conn) (name string, ok bool)
}

// Transport is a raft.Transport, raft.WithClose and raft.WithPreVote over
// the frame format of this package.
type Transport struct {
	cfg   Config
	local raft.ServerAddress
	log   *slog.Logger

	consumeCh  chan raft.RPC
	shutdownCh chan struct{}
	dialCtx    context.Context
	cancel     context.CancelFunc
	wg         sync.WaitGroup // the accept loop and the connection handlers

	accepted, received atomic.Int64 // connections accepted, requests decoded (tests)

	peerRefusals atomic.Int64 // requests refused by the PeerName check
	refusedMu    sync.Mutex
	refusedSeen  map[string]bool // (peer, claimed ID) pairs already logged

	hbMu sync.Mutex
	hbFn func(raft.RPC)

	mu     sync.Mutex
	closed bool
	pool   map[raft.ServerAddress][]*conn
	live   map[net.Conn]struct{} // every open connection, both directions
	pipes  map[*pipeline]struct{}
}

var (
	_ raft.Transport   = (*Transport)(nil)
	_ raft.WithClose   = (*Transport)(nil)
	_ raft.WithPreVote = (*Transport)(nil)
)

// New starts a transport accepting on cfg.Listener.
func New(cfg Config) (*Transport, error) {
	switch {
	case cfg.Listener == nil:
		return nil, fmt.Errorf("%w: no listener", ErrInvalidConfig)
	case cfg.Dial == nil:
		return nil, fmt.Errorf("%w: no dial func", ErrInvalidConfig)
	case cfg.Timeout < 0, cfg.MaxPool < 0, cfg.MaxRPCsInFlight < 0, cfg.MaxFrame < 0:
		return nil, fmt.Errorf("%w: negative timeout, pool, in-flight or frame size", ErrInvalidConfig)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.MaxPool == 0 {
		cfg.MaxPool = DefaultMaxPool
	}
	if cfg.MaxRPCsInFlight == 0 {
		cfg.MaxRPCsInFlight = DefaultMaxRPCsInFlight
	}
	if cfg.MaxFrame == 0 {
		cfg.MaxFrame = DefaultMaxFrame
	}
	if cfg.Advertise == "" {
		cfg.Advertise = cfg.Listener.Addr().String()
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t := &Transport{
		cfg:        cfg,
		local:      raft.ServerAddress(cfg.Advertise),
		log:        log,
		consumeCh:  make(chan raft.RPC),
		shutdownCh: make(chan struct{}),
		pool:       make(map[raft.ServerAddress][]*conn),
		live:       make(map[net.Conn]struct{}),
		pipes:      make(map[*pipeline]struct{}),
	}
	t.dialCtx, t.cancel = context.WithCancel(context.Background())
	t.wg.Add(1)
	go t.listen()
	return t, nil
}

// Consumer implements raft.Transport.
func (t *Transport) Consumer() <-chan raft.RPC { return t.consumeCh }

// LocalAddr implements raft.Transport: the advertised address.
func (t *Transport) LocalAddr() raft.ServerAddress { return t.local }

// SetHeartbeatHandler implements raft.Transport: heartbeats go to cb
// instead of the consumer channel, as in raft.NetworkTransport.
func (t *Transport) SetHeartbeatHandler(cb func(rpc raft.RPC)) {
	t.hbMu.Lock()
	t.hbFn = cb
	t.hbMu.Unlock()
}

// EncodePeer implements raft.Transport.
func (t *Transport) EncodePeer(_ raft.ServerID, addr raft.ServerAddress) []byte {
	return []byte(addr)
}

// DecodePeer implements raft.Transport.
func (t *Transport) DecodePeer(b []byte) raft.ServerAddress { return raft.ServerAddress(b) }

// Close implements raft.WithClose: it closes the listener, every
// connection and pipeline, fails RPCs in progress and waits for the
// connection handlers to end. It may be called more than once.
func (t *Transport) Close() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	close(t.shutdownCh)
	t.cancel()
	live, pipes := t.live, t.pipes
	t.live, t.pipes, t.pool = nil, nil, nil
	t.mu.Unlock()
	err := t.cfg.Listener.Close()
	for c := range live {
		c.Close()
	}
	for p := range pipes {
		p.Close()
	}
	t.wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

// track registers an open connection so that Close can close it; it
// refuses (and closes c) once the transport is closed.
func (t *Transport) track(c net.Conn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		c.Close()
		return false
	}
	t.live[c] = struct{}{}
	return true
}

func (t *Transport) untrack(c net.Conn) {
	c.Close()
	t.mu.Lock()
	delete(t.live, c)
	t.mu.Unlock()
}

// deadline is the I/O deadline for size bytes.
func (t *Transport) deadline(size int64) time.Time {
	d := t.cfg.Timeout
	if f := size / timeoutScale; f > 1 {
		d *= time.Duration(f)
	}
	return time.Now().Add(d)
}

// conn is a client-side connection to one peer.
type conn struct {
	target raft.ServerAddress
	nc     net.Conn
	enc    encoder
	hdr    [headerSize]byte
}

// getConn takes a pooled connection to target or dials one.
func (t *Transport) getConn(target raft.ServerAddress) (*conn, error) {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil, ErrShutdown
	}
	if cs := t.pool[target]; len(cs) > 0 {
		c := cs[len(cs)-1]
		cs[len(cs)-1] = nil
		t.pool[target] = cs[:len(cs)-1]
		t.mu.Unlock()
		return c, nil
	}
	t.mu.Unlock()
	ctx, cancel := context.WithTimeout(t.dialCtx, t.cfg.Timeout)
	nc, err := t.cfg.Dial(ctx, string(target))
	cancel()
	if err != nil {
		if t.isClosed() {
			return nil, ErrShutdown
		}
		return nil, fmt.Errorf("wire: dialing %s: %w", target, err)
	}
	if !t.track(nc) {
		return nil, ErrShutdown
	}
	return &conn{target: target, nc: nc}, nil
}

func (t *Transport) isClosed() bool {
	select {
	case <-t.shutdownCh:
		return true
	default:
		return false
	}
}

// putConn pools a connection in a known state (between frames).
func (t *Transport) putConn(c *conn) {
	t.mu.Lock()
	if !t.closed && len(t.pool[c.target]) < t.cfg.MaxPool {
		t.pool[c.target] = append(t.pool[c.target], c)
		t.mu.Unlock()
		return
	}
	t.mu.Unlock()
	t.untrack(c.nc)
}

// send encodes msg and writes it in one vectored write. A frame that
// cannot be encoded leaves c usable (nothing was written).
func (t *Transport) send(c *conn, msg any, deadline func(size int64) time.Time) (written bool, err error) {
	bufs, err := c.enc.encode(msg, "", t.cfg.MaxFrame, t.cfg.PayloadChecksum)
	if err != nil {
		return false, err
	}
	size := int64(len(bufs[0])) + int64(c.enc.plen)
	if deadline != nil {
		if err := c.nc.SetWriteDeadline(deadline(size)); err != nil {
			return true, err
		}
	}
	err = c.enc.writeFrame(c.nc, bufs)
	c.enc.drop()
	if err != nil {
		return true, fmt.Errorf("wire: sending to %s: %w", c.target, err)
	}
	return true, nil
}

// readFrame reads one frame: the header, then the body in one read into
// one buffer.
func readFrame(r io.Reader, hdr *[headerSize]byte, maxFrame int) (frame, error) {
	if err := readHeader(r, hdr, 0); err != nil {
		return frame{}, err
	}
	h, err := parseHeader(hdr[:], maxFrame)
	if err != nil {
		return frame{}, err
	}
	return readBody(r, h)
}

// readResponse reads the answer to a request of kind into resp.
func (t *Transport) readResponse(c *conn, kind uint8, resp any) (rpcErr string, err error) {
	f, err := readFrame(c.nc, &c.hdr, t.cfg.MaxFrame)
	if errors.Is(err, io.EOF) {
		err = fmt.Errorf("%w: the peer closed the connection without answering (it restarted or shut down, or does not speak wire version %d)", ErrTruncated, Version)
	}
	if err != nil {
		return "", fmt.Errorf("wire: response from %s: %w", c.target, t.shutdownErr(err))
	}
	rpcErr, err = decodeResponse(f, kind, resp)
	if err != nil {
		return "", fmt.Errorf("wire: response from %s: %w", c.target, err)
	}
	return rpcErr, nil
}

// shutdownErr reports ErrShutdown for an I/O error caused by Close.
func (t *Transport) shutdownErr(err error) error {
	if t.isClosed() {
		return fmt.Errorf("%w (%v)", ErrShutdown, err)
	}
	return err
}

// roundTrip sends a request and waits for its response on a pooled
// connection; the connection goes back to the pool unless the exchange
// failed at the frame level.
func (t *Transport) roundTrip(target raft.ServerAddress, kind uint8, req, resp any) error {
	c, err := t.getConn(target)
	if err != nil {
		return err
	}
	if err := c.nc.SetDeadline(time.Now().Add(t.cfg.Timeout)); err != nil {
		t.untrack(c.nc)
		return err
	}
	if written, err := t.send(c, req, t.deadline); err != nil {
		if written {
			t.untrack(c.nc)
		} else {
			t.putConn(c)
		}
		return t.shutdownErr(err)
	}
	if err := c.nc.SetReadDeadline(time.Now().Add(t.cfg.Timeout)); err != nil {
		t.untrack(c.nc)
		return err
	}
	rpcErr, err := t.readResponse(c, kind, resp)
	if err != nil {
		t.untrack(c.nc)
		return err
	}
	t.putConn(c)
	if rpcErr != "" {
		return errors.New(rpcErr)
	}
	return nil
}

// AppendEntries implements raft.Transport.
func (t *Transport) AppendEntries(_ raft.ServerID, target raft.ServerAddress, args *raft.AppendEntriesRequest, resp *raft.AppendEntriesResponse) error {
	return t.roundTrip(target, kindAppendEntries, args, resp)
}

// RequestVote implements raft.Transport.
func (t *Transport) RequestVote(_ raft.ServerID, target raft.ServerAddress, args *raft.RequestVoteRequest, resp *raft.RequestVoteResponse) error {
	return t.roundTrip(target, kindRequestVote, args, resp)
}

// RequestPreVote implements raft.WithPreVote.
func (t *Transport) RequestPreVote(_ raft.ServerID, target raft.ServerAddress, args *raft.RequestPreVoteRequest, resp *raft.RequestPreVoteResponse) error {
	return t.roundTrip(target, kindRequestPreVote, args, resp)
}

// TimeoutNow implements raft.Transport.
func (t *Transport) TimeoutNow(_ raft.ServerID, target raft.ServerAddress, args *raft.TimeoutNowRequest, resp *raft.TimeoutNowResponse) error {
	return t.roundTrip(target, kindTimeoutNow, args, resp)
}

// InstallSnapshot implements raft.Transport: the request frame, then
// args.Size bytes read from data, then a crc32c of them; the connection
// is closed afterwards, as raft.NetworkTransport does.
func (t *Transport) InstallSnapshot(_ raft.ServerID, target raft.ServerAddress, args *raft.InstallSnapshotRequest, resp *raft.InstallSnapshotResponse, data io.Reader) error {
	if args.Size < 0 {
		return fmt.Errorf("%w: snapshot size %d", ErrInvalidConfig, args.Size)
	}
	c, err := t.getConn(target)
	if err != nil {
		return err
	}
	defer t.untrack(c.nc)
	if err := c.nc.SetDeadline(t.deadline(args.Size)); err != nil {
		return err
	}
	if _, err := t.send(c, args, nil); err != nil {
		return t.shutdownErr(err)
	}
	sum := crc32.New(castagnoli)
	n, err := io.CopyBuffer(io.MultiWriter(c.nc, sum), io.LimitReader(data, args.Size), make([]byte, snapBufSize))
	if err != nil {
		return fmt.Errorf("wire: streaming the snapshot to %s: %w", target, t.shutdownErr(err))
	}
	if n != args.Size {
		return fmt.Errorf("%w: snapshot reader ended after %d of %d bytes", ErrInvalidConfig, n, args.Size)
	}
	if _, err := c.nc.Write(binary.LittleEndian.AppendUint32(nil, sum.Sum32())); err != nil {
		return fmt.Errorf("wire: streaming the snapshot to %s: %w", target, t.shutdownErr(err))
	}
	rpcErr, err := t.readResponse(c, kindInstallSnap, resp)
	if err != nil {
		return err
	}
	if rpcErr != "" {
		return errors.New(rpcErr)
	}
	return nil
}
