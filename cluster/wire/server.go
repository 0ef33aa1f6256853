package wire

//lint:file-ignore SA1019 raft v1.7.3 still fills and reads the deprecated Leader and Candidate fields, so the frame format carries them

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"time"

	"github.com/hashicorp/raft"
)

// listen accepts connections until Close, backing off on errors as
// raft.NetworkTransport does.
func (t *Transport) listen() {
	defer t.wg.Done()
	const baseDelay, maxDelay = 5 * time.Millisecond, time.Second
	var delay time.Duration
	for {
		nc, err := t.cfg.Listener.Accept()
		if err != nil {
			if t.isClosed() {
				return
			}
			delay = min(max(2*delay, baseDelay), maxDelay)
			t.log.Error("raft wire: accept failed", "error", err)
			select {
			case <-t.shutdownCh:
				return
			case <-time.After(delay):
				continue
			}
		}
		delay = 0
		t.accepted.Add(1)
		if !t.track(nc) {
			return
		}
		t.wg.Add(1)
		go t.handleConn(nc)
	}
}

// handleConn serves one inbound connection: one request at a time, each
// answered before the next is read.
func (t *Transport) handleConn(nc net.Conn) {
	defer t.wg.Done()
	defer t.untrack(nc)
	s := &serverConn{t: t, nc: nc}
	for {
		again, err := s.serve()
		if err != nil {
			// A refused frame is worth a warning; a peer that went away
			// (reset, closed mid-response) is routine when sites restart.
			switch {
			case errors.Is(err, io.EOF), t.isClosed():
			case errors.Is(err, ErrPeerMismatch): // logged once per pair by checkPeer
			case isFrameErr(err):
				t.log.Warn("raft wire: refused a frame, closing the connection", "remote", nc.RemoteAddr().String(), "error", err)
			default:
				t.log.Debug("raft wire: connection ended", "remote", nc.RemoteAddr().String(), "error", err)
			}
			return
		}
		if !again {
			return
		}
	}
}

type serverConn struct {
	t   *Transport
	nc  net.Conn
	hdr [headerSize]byte
	enc encoder

	peerAsked bool   // Config.PeerName was called
	peerKnown bool   // and named the peer
	peer      string // the peer's server ID
}

// readRequest waits (without a deadline: pooled connections idle) for a
// frame to start, then gives the sender Timeout to finish the header and
// a size-scaled deadline for the body.
func (s *serverConn) readRequest() (frame, error) {
	if err := s.nc.SetReadDeadline(time.Time{}); err != nil {
		return frame{}, err
	}
	n, err := io.ReadAtLeast(s.nc, s.hdr[:], 1)
	if err != nil {
		return frame{}, err
	}
	if err := s.nc.SetReadDeadline(time.Now().Add(s.t.cfg.Timeout)); err != nil {
		return frame{}, err
	}
	if err := readHeader(s.nc, &s.hdr, n); err != nil {
		return frame{}, slow(err)
	}
	h, err := parseHeader(s.hdr[:], s.t.cfg.MaxFrame)
	if err != nil {
		return frame{}, err
	}
	if h.kind&respFlag != 0 || h.kind == kindReject {
		return frame{}, fmt.Errorf("%w: kind 0x%02x is not a request", ErrMalformed, h.kind)
	}
	if err := s.nc.SetReadDeadline(s.t.deadline(int64(h.metaLen) + int64(h.payloadLen))); err != nil {
		return frame{}, err
	}
	f, err := readBody(s.nc, h)
	return f, slow(err)
}

// slow turns a deadline hit inside a frame into ErrSlow.
func slow(err error) error {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("%w: %v", ErrSlow, err)
	}
	return err
}

// serve handles one request. It reports whether the connection may carry
// another; an error means the connection must be closed (after a reject
// frame saying why, if the peer sent something we refuse).
func (s *serverConn) serve() (again bool, err error) {
	f, err := s.readRequest()
	if err == nil {
		var msg any
		if msg, err = decodeRequest(f); err == nil {
			s.t.received.Add(1)
			if err = s.checkPeer(msg); err != nil {
				s.reject(err)
				return false, err
			}
			return s.dispatch(f.kind, msg)
		}
	}
	if isFrameErr(err) {
		s.reject(err)
	}
	return false, err
}

// checkPeer refuses a request whose header names another server ID than
// the connection's peer, when Config.PeerName knows the peer. Every request
// raft v1.7.3 sends carries its sender's ID in the header (the leader of an
// AppendEntries, InstallSnapshot or TimeoutNow, the candidate of a vote or
// pre-vote), so one check covers them all; a request naming no server on a
// connection with a known peer is refused too.
func (s *serverConn) checkPeer(msg any) error {
	if s.t.cfg.PeerName == nil {
		return nil
	}
	if !s.peerAsked {
		s.peer, s.peerKnown = s.t.cfg.PeerName(s.nc)
		s.peerAsked = true
	}
	if !s.peerKnown {
		return nil
	}
	var id []byte
	if h, ok := msg.(raft.WithRPCHeader); ok {
		id = h.GetRPCHeader().ID
	}
	if string(id) == s.peer && len(id) > 0 {
		return nil
	}
	s.t.peerRefused(s.peer, string(id), s.nc.RemoteAddr())
	return fmt.Errorf("%w: the connection is from %q, the request names %q", ErrPeerMismatch, s.peer, id)
}

// maxRefusalsLogged bounds the (peer, claimed ID) pairs remembered for
// logging; refusals past it are counted, not logged.
const maxRefusalsLogged = 64

// peerRefused counts a refusal and logs it once per (peer, claimed ID).
func (t *Transport) peerRefused(peer, claimed string, remote net.Addr) {
	t.peerRefusals.Add(1)
	key := peer + "\x00" + claimed
	t.refusedMu.Lock()
	if t.refusedSeen == nil {
		t.refusedSeen = make(map[string]bool)
	}
	first := !t.refusedSeen[key] && len(t.refusedSeen) < maxRefusalsLogged
	if first {
		t.refusedSeen[key] = true
	}
	t.refusedMu.Unlock()
	if first {
		t.log.Error("raft wire: refusing requests that name another server than the connection's peer",
			"peer", peer, "names", claimed, "remote", remote.String(), "error", ErrPeerMismatch)
	}
}

func isFrameErr(err error) bool {
	for _, e := range []error{ErrMagic, ErrVersion, ErrChecksum, ErrTooLarge, ErrMalformed, ErrTruncated, ErrSlow} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// reject tells the peer, best effort, why its frame was refused.
func (s *serverConn) reject(why error) {
	bufs, err := s.enc.reject(why.Error(), s.t.cfg.MaxFrame)
	if err != nil {
		return
	}
	_ = s.nc.SetWriteDeadline(time.Now().Add(s.t.cfg.Timeout))
	if err := s.enc.writeFrame(s.nc, bufs); err != nil {
		return
	}
	// Closing with the peer's bytes unread would reset the connection and
	// could destroy the reject frame before the peer reads it: end our
	// side, then drain a bounded amount of what the peer still sends.
	if cw, ok := s.nc.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
		_ = s.nc.SetReadDeadline(time.Now().Add(min(s.t.cfg.Timeout, rejectDrainTime)))
		_, _ = io.CopyN(io.Discard, s.nc, rejectDrainBytes)
	}
}

// How long and how much a rejecting server reads after its reject frame.
const (
	rejectDrainTime  = 2 * time.Second
	rejectDrainBytes = 1 << 20
)

// dispatch hands a decoded request to raft (or the heartbeat handler)
// and writes its response.
func (s *serverConn) dispatch(kind uint8, msg any) (bool, error) {
	t := s.t
	respCh := make(chan raft.RPCResponse, 1)
	rpc := raft.RPC{Command: msg, RespChan: respCh}
	var snap *snapReader
	heartbeat := false
	switch m := msg.(type) {
	case *raft.AppendEntriesRequest:
		leader := m.Addr
		if len(leader) == 0 {
			leader = m.Leader
		}
		heartbeat = m.Term != 0 && leader != nil && m.PrevLogEntry == 0 && m.PrevLogTerm == 0 &&
			len(m.Entries) == 0 && m.LeaderCommitIndex == 0
	case *raft.InstallSnapshotRequest:
		if err := s.nc.SetReadDeadline(t.deadline(m.Size)); err != nil {
			return false, err
		}
		snap = &snapReader{r: s.nc, left: m.Size}
		rpc.Reader = snap
	}
	handled := false
	if heartbeat {
		t.hbMu.Lock()
		fn := t.hbFn
		t.hbMu.Unlock()
		if fn != nil {
			fn(rpc)
			handled = true
		}
	}
	if !handled {
		select {
		case t.consumeCh <- rpc:
		case <-t.shutdownCh:
			return false, ErrShutdown
		}
	}
	var resp raft.RPCResponse
	select {
	case resp = <-respCh:
	case <-t.shutdownCh:
		return false, ErrShutdown
	}
	rpcErr := ""
	if resp.Error != nil {
		rpcErr = resp.Error.Error()
	}
	out := resp.Response
	if out == nil || !answers(out, kind) {
		out = responseFor(kind)
	}
	bufs, err := s.enc.encode(out, rpcErr, t.cfg.MaxFrame, false)
	if err != nil {
		return false, err
	}
	if err := s.nc.SetWriteDeadline(time.Now().Add(t.cfg.Timeout)); err != nil {
		return false, err
	}
	if err := s.enc.writeFrame(s.nc, bufs); err != nil {
		return false, fmt.Errorf("wire: sending a response: %w", err)
	}
	// A snapshot connection is used once (the sender closes it).
	return snap == nil, nil
}

// answers reports whether resp is the response type of a request kind.
func answers(resp any, kind uint8) bool {
	switch resp.(type) {
	case *raft.AppendEntriesResponse:
		return kind == kindAppendEntries
	case *raft.RequestVoteResponse:
		return kind == kindRequestVote
	case *raft.InstallSnapshotResponse:
		return kind == kindInstallSnap
	case *raft.TimeoutNowResponse:
		return kind == kindTimeoutNow
	case *raft.RequestPreVoteResponse:
		return kind == kindRequestPreVote
	}
	return false
}

// snapReader gives raft the snapshot stream: exactly left bytes from the
// connection, then, at their end, the sender's crc32c of them is read and
// checked; a mismatch or a short stream is an error, never io.EOF, so
// raft cancels the snapshot instead of installing it.
type snapReader struct {
	r    io.Reader
	left int64
	crc  uint32
	err  error
}

func (s *snapReader) Read(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	if s.left == 0 {
		var tr [4]byte
		if _, err := io.ReadFull(s.r, tr[:]); err != nil {
			s.err = fmt.Errorf("%w: snapshot checksum missing: %v", ErrTruncated, err)
		} else if got := binary.LittleEndian.Uint32(tr[:]); got != s.crc {
			s.err = fmt.Errorf("%w: snapshot crc %08x, computed %08x", ErrChecksum, got, s.crc)
		} else {
			s.err = io.EOF
		}
		return 0, s.err
	}
	if int64(len(p)) > s.left {
		p = p[:s.left]
	}
	n, err := s.r.Read(p)
	s.crc = crc32.Update(s.crc, castagnoli, p[:n])
	s.left -= int64(n)
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = fmt.Errorf("%w: snapshot stream ended %d bytes early", ErrTruncated, s.left)
		}
		s.err = err
		return n, err
	}
	return n, nil
}
