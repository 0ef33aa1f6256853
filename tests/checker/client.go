package checker

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Protocol constants, from the NBD protocol specification (doc/proto.md of
// the reference implementation). Only what this client uses is named.
const (
	magicNBD          = 0x4e42444d41474943 // "NBDMAGIC", first server word of every handshake
	magicOpt          = 0x49484156454f5054 // "IHAVEOPT", newstyle server word and option request prefix
	magicCliserv      = 0x00420281861253   // oldstyle negotiation (unsupported)
	magicOptReply     = 0x3e889045565a9    // option reply prefix
	magicRequest      = 0x25609513         // transmission request
	magicSimpleReply  = 0x67446698         // transmission simple reply
	magicStructReply  = 0x668e33ef         // structured reply chunk (never negotiated here)
	hsFlagFixed       = 1 << 0             // NBD_FLAG_FIXED_NEWSTYLE
	hsFlagNoZeroes    = 1 << 1             // NBD_FLAG_NO_ZEROES
	cFlagFixed        = 1 << 0             // NBD_FLAG_C_FIXED_NEWSTYLE
	cFlagNoZeroes     = 1 << 1             // NBD_FLAG_C_NO_ZEROES
	optExportName     = 1
	optAbort          = 2
	optGo             = 7
	repAck            = 1
	repInfo           = 3
	repErrBit         = 1 << 31
	infoExport        = 0
	infoBlockSize     = 3
	cmdRead           = 0
	cmdWrite          = 1
	cmdDisc           = 2
	cmdFlush          = 3
	cmdFlagFUA        = 1 << 0
	maxOptReplyLen    = 1 << 16 // larger option replies are treated as a protocol violation
	maxExportNameLen  = 4096    // the spec's limit on strings
	requestHeaderLen  = 28
	replyHeaderLen    = 16
	defaultCloseGrace = 2 * time.Second
)

// Transmission flags, as sent by the server in NBD_INFO_EXPORT.
const (
	FlagHasFlags        uint16 = 1 << 0
	FlagReadOnly        uint16 = 1 << 1
	FlagSendFlush       uint16 = 1 << 2
	FlagSendFUA         uint16 = 1 << 3
	FlagRotational      uint16 = 1 << 4
	FlagSendTrim        uint16 = 1 << 5
	FlagSendWriteZeroes uint16 = 1 << 6
	FlagSendDF          uint16 = 1 << 7
	FlagCanMultiConn    uint16 = 1 << 8
)

// Errno is the error field of an NBD reply. It is an error itself, so
// errors.Is(err, checker.EIO) tells what a server answered.
type Errno uint32

// Error values defined by the NBD protocol.
const (
	EPERM     Errno = 1
	EIO       Errno = 5
	ENOMEM    Errno = 12
	EINVAL    Errno = 22
	ENOSPC    Errno = 28
	EOVERFLOW Errno = 75
	ENOTSUP   Errno = 95
	ESHUTDOWN Errno = 108
)

var errnoNames = map[Errno]string{
	EPERM: "EPERM", EIO: "EIO", ENOMEM: "ENOMEM", EINVAL: "EINVAL",
	ENOSPC: "ENOSPC", EOVERFLOW: "EOVERFLOW", ENOTSUP: "ENOTSUP", ESHUTDOWN: "ESHUTDOWN",
}

func (e Errno) Error() string {
	if n, ok := errnoNames[e]; ok {
		return fmt.Sprintf("%s (%d)", n, uint32(e))
	}
	return fmt.Sprintf("errno %d", uint32(e))
}

// ServerError is a reply whose error field was nonzero. It unwraps to its
// Errno.
type ServerError struct {
	Cmd    string // "read", "write", "flush"
	Offset uint64
	Length uint32
	Errno  Errno
}

func (e *ServerError) Error() string {
	if e.Cmd == "flush" {
		return fmt.Sprintf("nbd: server failed flush: %v", e.Errno)
	}
	return fmt.Sprintf("nbd: server failed %s at %d+%d: %v", e.Cmd, e.Offset, e.Length, e.Errno)
}

func (e *ServerError) Unwrap() error { return e.Errno }

// RepError is the reply type of an option reply with bit 31 set
// (NBD_REP_ERR_*). The constants are errors, so errors.Is(err,
// checker.ErrPolicy) tells which refusal a server gave.
type RepError uint32

// Option reply error types defined by the NBD protocol.
const (
	ErrUnsup         RepError = repErrBit + 1
	ErrPolicy        RepError = repErrBit + 2
	ErrInvalid       RepError = repErrBit + 3
	ErrPlatform      RepError = repErrBit + 4
	ErrTLSReqd       RepError = repErrBit + 5
	ErrUnknown       RepError = repErrBit + 6
	ErrShutdown      RepError = repErrBit + 7
	ErrBlockSizeReqd RepError = repErrBit + 8
	ErrTooBig        RepError = repErrBit + 9
	ErrExtHeaderReqd RepError = repErrBit + 10
)

var repErrNames = [...]string{"UNSUP", "POLICY", "INVALID", "PLATFORM", "TLS_REQD", "UNKNOWN", "SHUTDOWN", "BLOCK_SIZE_REQD", "TOO_BIG", "EXT_HEADER_REQD"}

func (e RepError) Error() string {
	if i := int(uint32(e) &^ repErrBit); e&repErrBit != 0 && i >= 1 && i <= len(repErrNames) {
		return "NBD_REP_ERR_" + repErrNames[i-1]
	}
	return fmt.Sprintf("NBD_REP_ERR(%#x)", uint32(e))
}

// ErrOptionRefused is matched (errors.Is) by every *OptionError: the server
// answered an option with an NBD_REP_ERR_* reply.
var ErrOptionRefused = errors.New("nbd: option refused")

// OptionError is a refused option: the server's error type and the message
// text it sent with it. It unwraps to both ErrOptionRefused and Code.
type OptionError struct {
	Option  string // "NBD_OPT_GO"
	Export  string
	Code    RepError
	Message string // the server's text, possibly empty
}

func (e *OptionError) Error() string {
	msg := e.Message
	if msg == "" {
		msg = "(no message)"
	}
	return fmt.Sprintf("nbd: %s for export %q refused: %v: %s", e.Option, e.Export, e.Code, msg)
}

func (e *OptionError) Unwrap() []error { return []error{ErrOptionRefused, e.Code} }

var (
	// ErrDisconnected is wrapped by the error of every request that failed
	// because the connection ended (server closed it, I/O error, protocol
	// violation, or another request's context expired) before its reply.
	// The cause is wrapped too.
	ErrDisconnected = errors.New("nbd: connection lost")
	// ErrClosed: the client was closed (Close, or a soft disconnect after
	// the server answered ESHUTDOWN) before the request was sent.
	ErrClosed = errors.New("nbd: client closed")
	// ErrProtocol: the server broke the protocol; the connection is dropped.
	ErrProtocol = errors.New("nbd: protocol violation")
	// ErrUnsupported: the export does not offer what the call needs (flush
	// or FUA without the transmission flag); nothing was sent.
	ErrUnsupported = errors.New("nbd: not supported by the export")
	// ErrBadRequest: the request breaks a limit the server announced (block
	// size constraints, 32-bit length); nothing was sent.
	ErrBadRequest = errors.New("nbd: invalid request")
)

// DialFunc opens the byte stream to an NBD server.
type DialFunc func(ctx context.Context, addr string) (net.Conn, error)

// DefaultDial dials "unix:PATH" (or an absolute PATH) as a Unix socket and
// anything else as TCP host:port.
func DefaultDial(ctx context.Context, addr string) (net.Conn, error) {
	var d net.Dialer
	switch {
	case strings.HasPrefix(addr, "unix:"):
		return d.DialContext(ctx, "unix", strings.TrimPrefix(addr, "unix:"))
	case strings.HasPrefix(addr, "/"):
		return d.DialContext(ctx, "unix", addr)
	}
	return d.DialContext(ctx, "tcp", addr)
}

// Client is one NBD connection in the transmission phase. Its methods are
// safe for concurrent use; requests from several goroutines are pipelined
// on the connection and their replies matched by cookie, in whatever order
// the server sends them. Only simple replies are used.
//
// Every call honours its context: when the context ends before the reply
// arrives, the connection is closed (an NBD simple reply cannot be
// abandoned individually), the call fails with the context's error, and
// every other outstanding request fails with ErrDisconnected.
type Client struct {
	conn   net.Conn
	br     *bufio.Reader
	export string
	size   uint64
	flags  uint16

	minBlock, prefBlock, maxPayload uint32

	sendq      chan *request
	dead       chan struct{} // closed once the connection is gone
	readerDone chan struct{}
	writerDone chan struct{}
	cookie     atomic.Uint64

	mu      sync.Mutex
	pending map[uint64]*request
	err     error // why the client stopped accepting requests
	cause   error // why the connection ended (set with dead)
	closing bool
}

type request struct {
	cookie uint64
	cmd    uint16
	flags  uint16
	off    uint64
	length uint32
	data   []byte // write payload: a private copy
	sent   bool   // the writer began sending it (under Client.mu)
	reply  chan result
}

type result struct {
	data []byte
	err  error
}

// Dial connects to addr with dial (DefaultDial when nil) and negotiates
// export with NBD_OPT_GO. ctx bounds the dial and the handshake only.
func Dial(ctx context.Context, dial DialFunc, addr, export string) (*Client, error) {
	if dial == nil {
		dial = DefaultDial
	}
	conn, err := dial(ctx, addr)
	if err != nil {
		return nil, fmt.Errorf("nbd: dial %s: %w", addr, err)
	}
	c, err := Handshake(ctx, conn, export)
	if err != nil {
		return nil, fmt.Errorf("%w (server %s)", err, addr)
	}
	return c, nil
}

// Handshake runs the fixed newstyle handshake on conn and enters the
// transmission phase on export. On failure conn is closed. ctx bounds the
// handshake.
func Handshake(ctx context.Context, conn net.Conn, export string) (*Client, error) {
	if len(export) > maxExportNameLen {
		conn.Close()
		return nil, fmt.Errorf("%w: export name longer than %d bytes", ErrBadRequest, maxExportNameLen)
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	c := &Client{
		conn:       conn,
		br:         bufio.NewReaderSize(conn, 64<<10),
		export:     export,
		sendq:      make(chan *request),
		dead:       make(chan struct{}),
		readerDone: make(chan struct{}),
		writerDone: make(chan struct{}),
		pending:    make(map[uint64]*request),
	}
	err := c.handshake()
	if !stop() {
		// The context ended during the handshake and the connection was
		// (or is being) closed: report that, not the I/O error it caused.
		conn.Close()
		return nil, fmt.Errorf("nbd: handshake: %w", ctx.Err())
	}
	if err != nil {
		conn.Close()
		return nil, err
	}
	go c.readLoop()
	go c.writeLoop()
	return c, nil
}

func (c *Client) handshake() error {
	var hdr [18]byte
	if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
		return fmt.Errorf("nbd: handshake: reading greeting: %w", err)
	}
	if m := binary.BigEndian.Uint64(hdr[0:]); m != magicNBD {
		return fmt.Errorf("%w: greeting magic %#x, want NBDMAGIC", ErrProtocol, m)
	}
	switch m := binary.BigEndian.Uint64(hdr[8:]); m {
	case magicOpt:
	case magicCliserv:
		return fmt.Errorf("%w: server uses oldstyle negotiation, which this client does not speak", ErrProtocol)
	default:
		return fmt.Errorf("%w: greeting magic %#x, want IHAVEOPT", ErrProtocol, m)
	}
	hsFlags := binary.BigEndian.Uint16(hdr[16:])
	if hsFlags&hsFlagFixed == 0 {
		return fmt.Errorf("%w: server does not offer fixed newstyle negotiation (handshake flags %#x)", ErrProtocol, hsFlags)
	}
	cflags := uint32(cFlagFixed)
	noZeroes := hsFlags&hsFlagNoZeroes != 0
	if noZeroes {
		cflags |= cFlagNoZeroes
	}
	// NBD_OPT_GO: name length, name, one information request
	// (NBD_INFO_BLOCK_SIZE, so a server with size constraints tells us;
	// having asked, the client abides by them).
	data := make([]byte, 0, 4+len(c.export)+4)
	data = binary.BigEndian.AppendUint32(data, uint32(len(c.export)))
	data = append(data, c.export...)
	data = binary.BigEndian.AppendUint16(data, 1)
	data = binary.BigEndian.AppendUint16(data, infoBlockSize)
	msg := binary.BigEndian.AppendUint32(nil, cflags)
	msg = appendOption(msg, optGo, data)
	if _, err := c.conn.Write(msg); err != nil {
		return fmt.Errorf("nbd: handshake: sending NBD_OPT_GO: %w", err)
	}
	gotExport := false
	for {
		typ, payload, err := c.readOptReply(optGo)
		if err != nil {
			return err
		}
		switch {
		case typ == repInfo:
			if len(payload) < 2 {
				return fmt.Errorf("%w: NBD_REP_INFO of %d bytes", ErrProtocol, len(payload))
			}
			switch binary.BigEndian.Uint16(payload) {
			case infoExport:
				if len(payload) != 12 {
					return fmt.Errorf("%w: NBD_INFO_EXPORT of %d bytes, want 12", ErrProtocol, len(payload))
				}
				c.size = binary.BigEndian.Uint64(payload[2:])
				c.flags = binary.BigEndian.Uint16(payload[10:])
				gotExport = true
			case infoBlockSize:
				if len(payload) != 14 {
					return fmt.Errorf("%w: NBD_INFO_BLOCK_SIZE of %d bytes, want 14", ErrProtocol, len(payload))
				}
				c.minBlock = binary.BigEndian.Uint32(payload[2:])
				c.prefBlock = binary.BigEndian.Uint32(payload[6:])
				c.maxPayload = binary.BigEndian.Uint32(payload[10:])
			default:
				// Information types we do not understand are ignored.
			}
		case typ == repAck:
			if !gotExport {
				return fmt.Errorf("%w: NBD_REP_ACK to NBD_OPT_GO without NBD_INFO_EXPORT", ErrProtocol)
			}
			return c.checkFlags()
		case typ&repErrBit != 0:
			code := RepError(typ)
			if code == ErrUnsup {
				// A server without NBD_OPT_GO: fall back to
				// NBD_OPT_EXPORT_NAME, as the spec asks clients to.
				return c.exportName(noZeroes)
			}
			c.abort()
			return &OptionError{Option: "NBD_OPT_GO", Export: c.export, Code: code, Message: string(payload)}
		default:
			return fmt.Errorf("%w: unexpected reply type %d to NBD_OPT_GO", ErrProtocol, typ)
		}
	}
}

func appendOption(b []byte, opt uint32, data []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, magicOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// readOptReply reads one option reply to opt and returns its type and data.
func (c *Client) readOptReply(opt uint32) (uint32, []byte, error) {
	var hdr [20]byte
	if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
		return 0, nil, fmt.Errorf("nbd: handshake: reading option reply: %w", err)
	}
	if m := binary.BigEndian.Uint64(hdr[0:]); m != magicOptReply {
		return 0, nil, fmt.Errorf("%w: option reply magic %#x", ErrProtocol, m)
	}
	if o := binary.BigEndian.Uint32(hdr[8:]); o != opt {
		return 0, nil, fmt.Errorf("%w: reply for option %d, sent %d", ErrProtocol, o, opt)
	}
	typ := binary.BigEndian.Uint32(hdr[12:])
	n := binary.BigEndian.Uint32(hdr[16:])
	if n > maxOptReplyLen {
		return 0, nil, fmt.Errorf("%w: option reply of %d bytes", ErrProtocol, n)
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(c.br, payload); err != nil {
		return 0, nil, fmt.Errorf("nbd: handshake: reading option reply data: %w", err)
	}
	return typ, payload, nil
}

// abort initiates a soft disconnect during option haggling. The server's
// reply, if any, is not awaited (the spec allows either).
func (c *Client) abort() {
	c.conn.SetWriteDeadline(time.Now().Add(time.Second))
	c.conn.Write(appendOption(nil, optAbort, nil))
}

// exportName enters transmission with NBD_OPT_EXPORT_NAME (no error reply
// exists for it: a server that refuses closes the connection).
func (c *Client) exportName(noZeroes bool) error {
	if _, err := c.conn.Write(appendOption(nil, optExportName, []byte(c.export))); err != nil {
		return fmt.Errorf("nbd: handshake: sending NBD_OPT_EXPORT_NAME: %w", err)
	}
	n := 10
	if !noZeroes {
		n += 124
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(c.br, buf); err != nil {
		return fmt.Errorf("nbd: handshake: server refused export %q after NBD_OPT_EXPORT_NAME: %w", c.export, err)
	}
	c.size = binary.BigEndian.Uint64(buf)
	c.flags = binary.BigEndian.Uint16(buf[8:])
	return c.checkFlags()
}

func (c *Client) checkFlags() error {
	if c.flags&FlagHasFlags == 0 {
		return fmt.Errorf("%w: transmission flags %#x lack NBD_FLAG_HAS_FLAGS", ErrProtocol, c.flags)
	}
	if c.minBlock != 0 || c.prefBlock != 0 || c.maxPayload != 0 {
		if c.minBlock == 0 || c.minBlock&(c.minBlock-1) != 0 || c.minBlock > 1<<16 {
			return fmt.Errorf("%w: minimum block size %d", ErrProtocol, c.minBlock)
		}
	}
	return nil
}

// Export is the negotiated export name.
func (c *Client) Export() string { return c.export }

// Size is the export size in bytes.
func (c *Client) Size() uint64 { return c.size }

// TransmissionFlags are the flags the server sent (Flag*).
func (c *Client) TransmissionFlags() uint16 { return c.flags }

// ReadOnly reports NBD_FLAG_READ_ONLY.
func (c *Client) ReadOnly() bool { return c.flags&FlagReadOnly != 0 }

// CanFlush reports NBD_FLAG_SEND_FLUSH.
func (c *Client) CanFlush() bool { return c.flags&FlagSendFlush != 0 }

// CanFUA reports NBD_FLAG_SEND_FUA.
func (c *Client) CanFUA() bool { return c.flags&FlagSendFUA != 0 }

// BlockSizes returns the server's size constraints (minimum block,
// preferred block, maximum payload), all zero if it sent none.
func (c *Client) BlockSizes() (min, preferred, maxPayload uint32) {
	return c.minBlock, c.prefBlock, c.maxPayload
}

// Err is nil while the client accepts requests; afterwards it is why it
// stopped (wrapping ErrClosed or ErrDisconnected).
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Done is closed once the connection is gone.
func (c *Client) Done() <-chan struct{} { return c.dead }

// Read reads len(buf) bytes at off.
func (c *Client) Read(ctx context.Context, off uint64, buf []byte) error {
	if err := c.checkRange("read", off, len(buf)); err != nil {
		return err
	}
	res := c.do(ctx, &request{cmd: cmdRead, off: off, length: uint32(len(buf))})
	if res.err != nil {
		return res.err
	}
	copy(buf, res.data)
	return nil
}

// Write writes data at off; with fua the server must persist it before
// replying (NBD_CMD_FLAG_FUA), which needs NBD_FLAG_SEND_FUA. data is
// copied before Write returns or sends anything, and not kept.
func (c *Client) Write(ctx context.Context, off uint64, data []byte, fua bool) error {
	if err := c.checkRange("write", off, len(data)); err != nil {
		return err
	}
	req := &request{cmd: cmdWrite, off: off, length: uint32(len(data))}
	if fua {
		if !c.CanFUA() {
			return fmt.Errorf("%w: FUA write (no NBD_FLAG_SEND_FUA)", ErrUnsupported)
		}
		req.flags = cmdFlagFUA
	}
	req.data = append([]byte(nil), data...)
	return c.do(ctx, req).err
}

// Flush sends NBD_CMD_FLUSH: on success, every write whose reply arrived
// before Flush was called is on the server's permanent storage.
func (c *Client) Flush(ctx context.Context) error {
	if !c.CanFlush() {
		return fmt.Errorf("%w: flush (no NBD_FLAG_SEND_FLUSH)", ErrUnsupported)
	}
	return c.do(ctx, &request{cmd: cmdFlush}).err
}

func (c *Client) checkRange(op string, off uint64, n int) error {
	if uint64(n) > 1<<32-1 {
		return fmt.Errorf("%w: %s of %d bytes", ErrBadRequest, op, n)
	}
	if c.maxPayload != 0 && uint64(n) > uint64(c.maxPayload) {
		return fmt.Errorf("%w: %s of %d bytes exceeds the server's maximum payload %d", ErrBadRequest, op, n, c.maxPayload)
	}
	if m := uint64(c.minBlock); m > 1 && (off%m != 0 || uint64(n)%m != 0) {
		return fmt.Errorf("%w: %s at %d+%d not aligned to the server's minimum block size %d", ErrBadRequest, op, off, n, m)
	}
	return nil
}

func cmdName(cmd uint16) string {
	switch cmd {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdFlush:
		return "flush"
	case cmdDisc:
		return "disconnect"
	}
	return fmt.Sprintf("command %d", cmd)
}

// do sends req and waits for its reply.
func (c *Client) do(ctx context.Context, req *request) result {
	if err := ctx.Err(); err != nil {
		return result{err: fmt.Errorf("nbd: %s: %w", cmdName(req.cmd), err)}
	}
	req.cookie = c.cookie.Add(1)
	req.reply = make(chan result, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return result{err: fmt.Errorf("nbd: %s: %w", cmdName(req.cmd), err)}
	}
	c.pending[req.cookie] = req
	c.mu.Unlock()

	select {
	case c.sendq <- req:
	case <-c.dead:
		// kill failed every pending request, this one included.
	case <-ctx.Done():
		c.mu.Lock()
		_, mine := c.pending[req.cookie]
		delete(c.pending, req.cookie)
		c.mu.Unlock()
		if mine {
			// Never handed to the writer: nothing was sent.
			return result{err: fmt.Errorf("nbd: %s: %w", cmdName(req.cmd), ctx.Err())}
		}
		// Already failed by kill; its result is in req.reply.
	}
	select {
	case res := <-req.reply:
		return res
	case <-ctx.Done():
		c.kill(fmt.Errorf("%s request (cookie %d) abandoned: %w", cmdName(req.cmd), req.cookie, ctx.Err()))
		res := <-req.reply
		if res.err == nil {
			return res // the reply won the race
		}
		return result{err: fmt.Errorf("nbd: %s: %w", cmdName(req.cmd), ctx.Err())}
	}
}

// kill drops the connection: every outstanding request fails with
// ErrDisconnected wrapping cause. Only the first call has an effect.
func (c *Client) kill(cause error) {
	c.mu.Lock()
	if c.cause != nil {
		c.mu.Unlock()
		return
	}
	c.cause = cause
	if c.err == nil {
		c.err = fmt.Errorf("%w: %w", ErrDisconnected, cause)
	}
	pending := c.pending
	c.pending = map[uint64]*request{}
	close(c.dead)
	c.mu.Unlock()
	c.conn.Close()
	for _, req := range pending {
		req.reply <- result{err: fmt.Errorf("nbd: %s: %w: %w", cmdName(req.cmd), ErrDisconnected, cause)}
	}
}

func (c *Client) writeLoop() {
	defer close(c.writerDone)
	buf := make([]byte, 0, requestHeaderLen+4096)
	for {
		var req *request
		select {
		case req = <-c.sendq:
		case <-c.dead:
			return
		}
		c.mu.Lock()
		req.sent = true
		c.mu.Unlock()
		buf = buf[:0]
		buf = binary.BigEndian.AppendUint32(buf, magicRequest)
		buf = binary.BigEndian.AppendUint16(buf, req.flags)
		buf = binary.BigEndian.AppendUint16(buf, req.cmd)
		buf = binary.BigEndian.AppendUint64(buf, req.cookie)
		buf = binary.BigEndian.AppendUint64(buf, req.off)
		buf = binary.BigEndian.AppendUint32(buf, req.length)
		buf = append(buf, req.data...)
		if _, err := c.conn.Write(buf); err != nil {
			c.kill(fmt.Errorf("sending %s request: %w", cmdName(req.cmd), err))
			return
		}
		if cap(buf) > 1<<20 {
			buf = make([]byte, 0, requestHeaderLen+4096)
		}
		if req.cmd == cmdDisc {
			return // nothing may follow NBD_CMD_DISC
		}
	}
}

func (c *Client) readLoop() {
	defer close(c.readerDone)
	var hdr [replyHeaderLen]byte
	for {
		if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
			c.mu.Lock()
			closing := c.closing
			c.mu.Unlock()
			if closing && (errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed)) {
				c.kill(ErrClosed)
			} else {
				c.kill(fmt.Errorf("reading reply: %w", err))
			}
			return
		}
		magic := binary.BigEndian.Uint32(hdr[0:])
		errno := Errno(binary.BigEndian.Uint32(hdr[4:]))
		cookie := binary.BigEndian.Uint64(hdr[8:])
		if magic != magicSimpleReply {
			what := fmt.Sprintf("reply magic %#x", magic)
			if magic == magicStructReply {
				what = "structured reply, which was not negotiated"
			}
			c.kill(fmt.Errorf("%w: %s", ErrProtocol, what))
			return
		}
		c.mu.Lock()
		req := c.pending[cookie]
		sent := req != nil && req.sent
		if sent {
			delete(c.pending, cookie)
		}
		c.mu.Unlock()
		if !sent {
			c.kill(fmt.Errorf("%w: reply for unknown cookie %d", ErrProtocol, cookie))
			return
		}
		var res result
		if errno != 0 {
			res.err = &ServerError{Cmd: cmdName(req.cmd), Offset: req.off, Length: req.length, Errno: errno}
		} else if req.cmd == cmdRead {
			res.data = make([]byte, req.length)
			if _, err := io.ReadFull(c.br, res.data); err != nil {
				cause := fmt.Errorf("reading read payload: %w", err)
				req.reply <- result{err: fmt.Errorf("nbd: read: %w: %w", ErrDisconnected, cause)}
				c.kill(cause)
				return
			}
		}
		req.reply <- res
		if errno == ESHUTDOWN {
			// The spec: a client receiving ESHUTDOWN must initiate a
			// soft disconnect.
			go c.Close()
		}
	}
}

// Close ends the session with a soft disconnect: it stops accepting
// requests, sends NBD_CMD_DISC after those already queued, gives the server
// a short grace period to answer outstanding requests and close the
// connection, then closes it. Requests still unanswered fail with
// ErrDisconnected. Close is idempotent and returns once both I/O goroutines
// have stopped.
func (c *Client) Close() error {
	c.mu.Lock()
	first := !c.closing
	c.closing = true
	if c.err == nil {
		c.err = ErrClosed
	}
	c.mu.Unlock()
	if first {
		disc := &request{cmd: cmdDisc, cookie: c.cookie.Add(1)}
		select {
		case c.sendq <- disc:
			timer := time.NewTimer(defaultCloseGrace)
			select {
			case <-c.dead:
			case <-timer.C:
			}
			timer.Stop()
		case <-c.dead:
		}
		c.kill(ErrClosed)
	}
	<-c.readerDone
	<-c.writerDone
	return nil
}
