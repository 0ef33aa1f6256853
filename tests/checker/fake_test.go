package checker

import (
	"encoding/binary"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// fakeStore is the data behind one or more fake servers: what reads see
// (visible) and what survives a crash (durable). A FLUSH makes everything
// visible durable; a FUA write makes its own range durable; a crash resets
// visible to durable.
type fakeStore struct {
	mu      sync.Mutex
	visible []byte
	durable []byte
	writes  int // writes received, all connections
	// writeHook, if set, decides what a write does (under mu): it gets the
	// store-wide write number (1-based), the offset, the data and the
	// current visible content of that range, and returns the bytes to put
	// there, or apply=false to drop the write while still acknowledging it.
	writeHook func(n int, off uint64, data, cur []byte) (out []byte, apply bool)
	// readHook remaps the offset a read is served from.
	readHook func(off uint64) uint64
	// lieFlush: FLUSH succeeds without making anything durable.
	lieFlush bool
	// staleFrom, if set, is what reads return instead of visible (a copy
	// serving old data).
	staleFrom []byte
}

func newFakeStore(size int) *fakeStore {
	return &fakeStore{visible: make([]byte, size), durable: make([]byte, size)}
}

func (st *fakeStore) crash() {
	st.mu.Lock()
	copy(st.visible, st.durable)
	st.mu.Unlock()
}

// fakeServer speaks enough NBD (fixed newstyle, NBD_OPT_GO and
// NBD_OPT_EXPORT_NAME, simple replies) to test the client and the checker,
// and can misbehave on demand. Its knobs must be set before it serves.
type fakeServer struct {
	t      testing.TB
	store  *fakeStore
	export string
	flags  uint16 // transmission flags
	// blockSizes, if nonzero, are sent as NBD_INFO_BLOCK_SIZE.
	blockSizes [3]uint32
	// refuse, if nonzero, answers NBD_OPT_GO with this error and message.
	refuse    RepError
	refuseMsg string
	noGo      bool // answer NBD_OPT_GO with NBD_REP_ERR_UNSUP
	silent    bool // accept connections and never say anything
	blackhole bool // never answer transmission requests
	// reverseBatch > 0: hold replies until that many are due, then send
	// them in reverse order.
	reverseBatch int
	// errnoFor, if set, may fail a request with an NBD error.
	errnoFor func(cmd uint16, off uint64) uint32
	// badCookie / structured: answer the first request wrongly.
	badCookie, structured bool
	// crashAt > 0: when write number crashAt arrives, crash instead of
	// answering it (listener and connections closed, unflushed data lost).
	crashAt int
	// crashNeedsAcked: from write crashAt on, crash only at a write that
	// arrives while some answered write is still volatile (written and
	// acknowledged after the last FLUSH was processed), so the crash loses
	// an acknowledged write.
	crashNeedsAcked bool
	// replyDelay > 0: replies leave replyDelay after their request was
	// processed, while later requests are processed meanwhile. A FLUSH then
	// makes durable only the writes already answered, which is all the
	// protocol requires of it.
	replyDelay time.Duration
	// partialFlushes counts flushes that left an unanswered write volatile.
	partialFlushes int
	// snapshotReads: every connection reads the content visible when it
	// attached (a read-only copy as of the attach).
	snapshotReads bool

	ln       net.Listener
	mu       sync.Mutex
	conns    map[net.Conn]bool
	closed   bool
	crashed  time.Time
	discs    int
	requests int
	wg       sync.WaitGroup
}

const fakeFlags = FlagHasFlags | FlagSendFlush | FlagSendFUA

func newFakeServer(t testing.TB, store *fakeStore) *fakeServer {
	return &fakeServer{t: t, store: store, export: "disk", flags: fakeFlags, conns: map[net.Conn]bool{}}
}

// start listens on a loopback port and returns the address.
func (s *fakeServer) start() string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		s.t.Fatal(err)
	}
	s.ln = ln
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			if s.closed {
				s.mu.Unlock()
				nc.Close()
				return
			}
			s.conns[nc] = true
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				s.serve(nc)
				nc.Close()
				s.mu.Lock()
				delete(s.conns, nc)
				s.mu.Unlock()
			}()
		}
	}()
	s.t.Cleanup(s.close)
	return ln.Addr().String()
}

// dropConns closes every open connection (data is kept).
func (s *fakeServer) dropConns() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for nc := range s.conns {
		nc.Close()
	}
}

func (s *fakeServer) close() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	if s.ln != nil {
		s.ln.Close()
	}
	s.dropConns()
	s.wg.Wait()
}

// crash stops the server the hard way: no more connections, open ones
// dropped, unflushed data lost.
func (s *fakeServer) crash() {
	s.mu.Lock()
	if s.crashed.IsZero() {
		s.crashed = time.Now()
	}
	s.closed = true
	for nc := range s.conns {
		nc.Close()
	}
	s.mu.Unlock()
	s.ln.Close()
	s.store.crash()
}

func (s *fakeServer) crashTime() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.crashed
}

func (s *fakeServer) discCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.discs
}

func (s *fakeServer) serve(nc net.Conn) {
	if s.silent {
		io.Copy(io.Discard, nc)
		return
	}
	if !s.handshake(nc) {
		return
	}
	s.transmit(nc)
}

func optReply(nc net.Conn, opt, typ uint32, data []byte) error {
	b := binary.BigEndian.AppendUint64(nil, magicOptReply)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	_, err := nc.Write(append(b, data...))
	return err
}

func (s *fakeServer) handshake(nc net.Conn) bool {
	g := binary.BigEndian.AppendUint64(nil, magicNBD)
	g = binary.BigEndian.AppendUint64(g, magicOpt)
	g = binary.BigEndian.AppendUint16(g, hsFlagFixed|hsFlagNoZeroes)
	if _, err := nc.Write(g); err != nil {
		return false
	}
	var cf [4]byte
	if _, err := io.ReadFull(nc, cf[:]); err != nil {
		return false
	}
	noZeroes := binary.BigEndian.Uint32(cf[:])&cFlagNoZeroes != 0
	for {
		var hdr [16]byte
		if _, err := io.ReadFull(nc, hdr[:]); err != nil {
			return false
		}
		if binary.BigEndian.Uint64(hdr[:]) != magicOpt {
			return false
		}
		opt := binary.BigEndian.Uint32(hdr[8:])
		data := make([]byte, binary.BigEndian.Uint32(hdr[12:]))
		if _, err := io.ReadFull(nc, data); err != nil {
			return false
		}
		switch opt {
		case optGo:
			if s.noGo {
				optReply(nc, opt, uint32(ErrUnsup), nil)
				continue
			}
			if s.refuse != 0 {
				optReply(nc, opt, uint32(s.refuse), []byte(s.refuseMsg))
				continue
			}
			nameLen := binary.BigEndian.Uint32(data)
			name := string(data[4 : 4+nameLen])
			if name != s.export {
				optReply(nc, opt, uint32(ErrUnknown), []byte("no export named "+name))
				continue
			}
			info := binary.BigEndian.AppendUint16(nil, infoExport)
			info = binary.BigEndian.AppendUint64(info, uint64(len(s.store.visible)))
			info = binary.BigEndian.AppendUint16(info, s.flags)
			optReply(nc, opt, repInfo, info)
			if s.blockSizes[0] != 0 {
				bi := binary.BigEndian.AppendUint16(nil, infoBlockSize)
				for _, v := range s.blockSizes {
					bi = binary.BigEndian.AppendUint32(bi, v)
				}
				optReply(nc, opt, repInfo, bi)
			}
			// An information type the client must ignore.
			optReply(nc, opt, repInfo, []byte{0x7f, 0x7f, 1, 2, 3})
			return optReply(nc, opt, repAck, nil) == nil
		case optExportName:
			if string(data) != s.export {
				return false
			}
			b := binary.BigEndian.AppendUint64(nil, uint64(len(s.store.visible)))
			b = binary.BigEndian.AppendUint16(b, s.flags)
			if !noZeroes {
				b = append(b, make([]byte, 124)...)
			}
			_, err := nc.Write(b)
			return err == nil
		case optAbort:
			optReply(nc, opt, repAck, nil)
			return false
		default:
			optReply(nc, opt, uint32(ErrUnsup), nil)
		}
	}
}

func simpleReply(errno uint32, cookie uint64, data []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, magicSimpleReply)
	b = binary.BigEndian.AppendUint32(b, errno)
	b = binary.BigEndian.AppendUint64(b, cookie)
	return append(b, data...)
}

// unanswered is a write processed but not yet answered (replyDelay mode):
// what its range held before it.
type unanswered struct {
	off  uint64
	prev []byte
}

type delayedReply struct {
	at     time.Time
	cookie uint64
	b      []byte
}

func (s *fakeServer) transmit(nc net.Conn) {
	st := s.store
	size := uint64(len(st.visible))
	var held [][]byte
	first := true
	pendingWrites := map[uint64]unanswered{} // under st.mu
	ackedVolatile := 0                       // under st.mu: writes answered since the last flush that did not cover them
	var snap []byte
	if s.snapshotReads {
		st.mu.Lock()
		snap = append([]byte(nil), st.visible...)
		st.mu.Unlock()
	}
	var replies chan delayedReply
	if s.replyDelay > 0 {
		replies = make(chan delayedReply, 1024)
		done := make(chan struct{})
		defer func() { close(replies); <-done }()
		go func() {
			defer close(done)
			for r := range replies {
				time.Sleep(time.Until(r.at))
				st.mu.Lock()
				_, volatile := pendingWrites[r.cookie]
				delete(pendingWrites, r.cookie)
				st.mu.Unlock()
				if _, err := nc.Write(r.b); err == nil && volatile {
					st.mu.Lock()
					ackedVolatile++
					st.mu.Unlock()
				}
			}
		}()
	}
	for {
		var hdr [28]byte
		if _, err := io.ReadFull(nc, hdr[:]); err != nil {
			return
		}
		if binary.BigEndian.Uint32(hdr[:]) != magicRequest {
			return
		}
		flags := binary.BigEndian.Uint16(hdr[4:])
		cmd := binary.BigEndian.Uint16(hdr[6:])
		cookie := binary.BigEndian.Uint64(hdr[8:])
		off := binary.BigEndian.Uint64(hdr[16:])
		n := binary.BigEndian.Uint32(hdr[24:])
		var payload []byte
		if cmd == cmdWrite {
			payload = make([]byte, n)
			if _, err := io.ReadFull(nc, payload); err != nil {
				return
			}
		}
		s.mu.Lock()
		s.requests++
		if cmd == cmdDisc {
			s.discs++
		}
		s.mu.Unlock()
		if cmd == cmdDisc {
			return
		}
		if s.blackhole {
			continue
		}
		var errno uint32
		if s.errnoFor != nil {
			errno = s.errnoFor(cmd, off)
		}
		var data []byte
		if errno == 0 {
			switch cmd {
			case cmdRead:
				if off+uint64(n) > size {
					errno = uint32(EINVAL)
					break
				}
				st.mu.Lock()
				src := off
				if st.readHook != nil {
					src = st.readHook(off)
				}
				from := st.visible
				switch {
				case snap != nil:
					from = snap
				case st.staleFrom != nil:
					from = st.staleFrom
				}
				data = append([]byte(nil), from[src:src+uint64(n)]...)
				st.mu.Unlock()
			case cmdWrite:
				if s.flags&FlagReadOnly != 0 {
					errno = uint32(EPERM)
					break
				}
				if off+uint64(n) > size {
					errno = uint32(ENOSPC)
					break
				}
				st.mu.Lock()
				st.writes++
				wn := st.writes
				out, apply := payload, true
				if st.writeHook != nil {
					out, apply = st.writeHook(wn, off, payload, append([]byte(nil), st.visible[off:off+uint64(n)]...))
				}
				if apply {
					if replies != nil && flags&cmdFlagFUA == 0 {
						pendingWrites[cookie] = unanswered{off, append([]byte(nil), st.visible[off:off+uint64(len(out))]...)}
					}
					copy(st.visible[off:], out)
					if flags&cmdFlagFUA != 0 {
						copy(st.durable[off:], st.visible[off:off+uint64(n)])
					}
				}
				acked := ackedVolatile
				st.mu.Unlock()
				if s.crashAt > 0 && (wn == s.crashAt || s.crashNeedsAcked && wn > s.crashAt) && (!s.crashNeedsAcked || acked > 0) {
					s.crash()
					return
				}
			case cmdFlush:
				st.mu.Lock()
				if !st.lieFlush {
					ackedVolatile = 0
					copy(st.durable, st.visible)
					for _, w := range pendingWrites {
						copy(st.durable[w.off:], w.prev)
					}
					if len(pendingWrites) > 0 {
						s.mu.Lock()
						s.partialFlushes++
						s.mu.Unlock()
					}
				}
				st.mu.Unlock()
			default:
				errno = uint32(EINVAL)
			}
		}
		reply := simpleReply(errno, cookie, data)
		if first && s.badCookie {
			reply = simpleReply(0, cookie+1000, data)
		}
		if first && s.structured {
			binary.BigEndian.PutUint32(reply, magicStructReply)
		}
		first = false
		if replies != nil {
			replies <- delayedReply{at: time.Now().Add(s.replyDelay), cookie: cookie, b: reply}
			continue
		}
		if s.reverseBatch > 0 {
			held = append(held, reply)
			if len(held) < s.reverseBatch {
				continue
			}
			for i := len(held) - 1; i >= 0; i-- {
				if _, err := nc.Write(held[i]); err != nil {
					return
				}
			}
			held = held[:0]
			continue
		}
		if _, err := nc.Write(reply); err != nil {
			return
		}
	}
}

// pollUntil polls cond (no fixed sleeps for synchronisation: the interval
// only bounds how often it looks) until it holds or timeout passes.
func pollUntil(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for d := time.Millisecond; !cond(); d = min(2*d, 20*time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(d)
	}
}
