// Package nbdfront is an NBD (Network Block Device) server implementing the
// fixed newstyle handshake and the transmission phase of the protocol
// described in doc/proto.md of github.com/NetworkBlockDevice/nbd. Exports
// come from a Backend; each connection gets its own Export, whose Device
// methods are called concurrently by that connection's workers.
//
// See DESIGN.md for the concurrency and memory model.
package nbdfront

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"time"
)

// Device is the block device behind one export. Implementations must be
// safe for concurrent use: the server calls them from several goroutines
// at once, with no ordering between requests that are in flight together.
type Device interface {
	// ReadAt reads len(p) bytes at off. The server only asks for ranges
	// inside [0, size); the read must be full, and holes read as zeros.
	io.ReaderAt
	// WriteAt writes p at off; the range is inside [0, size).
	io.WriterAt
	// Flush puts every write completed (returned) before the call on
	// stable storage.
	Flush() error
	// Trim discards the range (a hint; the content is undefined afterwards).
	Trim(off, length int64) error
	// WriteZeroes makes the range read as zeros; with noHole the range must
	// stay allocated.
	WriteZeroes(off, length int64, noHole bool) error
	// BlockStatus describes contiguous extents starting at off. It may cover
	// less than length but must return at least one extent, and never
	// extends past the export.
	BlockStatus(off, length int64) ([]Extent, error)
}

// Extent is one run of the base:allocation metadata context.
type Extent struct {
	Length int64 // bytes, > 0
	Hole   bool  // not allocated: NBD_STATE_HOLE, and NBD_STATE_ZERO since holes read as zeros
	Zero   bool  // reads as zeros: NBD_STATE_ZERO
}

// ExportInfo describes an export. Values are copied; it carries no
// concurrency concerns.
type ExportInfo struct {
	Name, Description string
	Size              int64 // bytes
	ReadOnly          bool
	// Block size constraints; 0 selects the server default (1, 4096,
	// Config.MaxPayload). MaxBlock is clamped to Config.MaxPayload.
	// MinBlock must be a power of two ≤ 64 KiB, PrefBlock a power of two
	// ≥ max(MinBlock, 512), MaxBlock ≥ PrefBlock. With MinBlock > 1 the
	// server rejects unaligned requests with EINVAL.
	MinBlock, PrefBlock, MaxBlock uint32
	// MultiConn advertises NBD_FLAG_CAN_MULTI_CONN. Set it only if a flush
	// on one connection covers writes completed on all connections.
	MultiConn bool
	// Optional features; each one advertises the matching transmission
	// flag and enables the command. Trim and zeroing are not advertised
	// on read-only exports. CanFastZero (meaningful only with CanZero)
	// promises that WriteZeroes is always faster than writing zeros;
	// without it NBD_CMD_FLAG_FAST_ZERO is not advertised and a request
	// carrying it gets EINVAL. CanBlockStatus offers base:allocation.
	CanTrim, CanZero, CanFastZero, CanBlockStatus bool
}

// Export is one connection's handle on an export.
type Export interface {
	Device
	// Info describes the export. It is called once, right after Open, and
	// its answer holds for the whole connection.
	Info() ExportInfo
	// Close is called exactly once, after the last Device call made for
	// that connection returned (also when the handshake fails after Open).
	Close() error
}

// Backend resolves export names. Its methods are called concurrently from
// all connections in the option phase.
type Backend interface {
	// List returns the exports for NBD_OPT_LIST.
	List() ([]ExportInfo, error)
	// Info describes an export without opening it (NBD_OPT_INFO and the
	// metadata context options).
	Info(name string) (ExportInfo, error)
	// Open opens an export for one connection (NBD_OPT_GO,
	// NBD_OPT_EXPORT_NAME). Name "" asks for the default export; the
	// backend decides what that is. Return ErrUnknownExport (wrapped or
	// not) for a missing export.
	Open(name string) (Export, error)
}

// Config configures a Server. Zero fields take the documented defaults.
type Config struct {
	Backend Backend      // required
	Logger  *slog.Logger // nil means slog.Default()
	// MaxPayload caps one WRITE payload and one READ length (the maximum
	// block size advertised). Default 32 MiB; must be in [64 KiB, 1 GiB].
	MaxPayload uint32
	// MaxConnBuffer bounds the request and reply payload bytes held in
	// memory per connection; the reader blocks when it is reached.
	// Default max(64 MiB, MaxPayload); must be ≥ MaxPayload.
	MaxConnBuffer int64
	// MaxWorkers bounds the requests served concurrently per connection.
	// Default 32.
	MaxWorkers int
	// HandshakeTimeout bounds the whole option phase. Default 30s.
	HandshakeTimeout time.Duration
	// ErrorCode maps Device errors to NBD error values; nil means
	// DefaultErrorCode. It must be safe for concurrent use. A result of 0
	// for a non-nil error is replaced by EIO.
	ErrorCode func(error) uint32
	// Observe, if set, is told where each served request's time went,
	// once its reply is written (on the worker's goroutine; it must be
	// cheap and safe for concurrent use). Rejected requests are not
	// observed.
	Observe func(cmd string, t Timing)
	// TLS is the server side of NBD_OPT_STARTTLS. It must provide a
	// certificate (Certificates, GetCertificate or GetConfigForClient)
	// and must not be changed after NewServer. Whether client
	// certificates are asked for and verified is its business
	// (ClientAuth, ClientCAs); Authorize sees the outcome. Used only
	// when TLSMode is TLSOn or TLSRequire.
	TLS *tls.Config
	// TLSMode selects whether TLS is not offered (TLSOff, the zero value:
	// NBD_OPT_STARTTLS is answered NBD_REP_ERR_UNSUP even when TLS is
	// set), offered (TLSOn) or required before any other option
	// (TLSRequire). TLSOn and TLSRequire need TLS.
	TLSMode TLSMode
	// Authorize, if set, decides whether the peer may list the exports
	// (OpList, export ""), describe an export (OpInfo: NBD_OPT_INFO and the
	// metadata context options) or open it (OpOpen: NBD_OPT_GO and
	// NBD_OPT_EXPORT_NAME); export is the name as the client sent it (""
	// is the default export). It is called before the Backend, from many
	// connections at once. Return an error wrapping ErrDenied to refuse:
	// the client gets NBD_REP_ERR_POLICY with the error's text (after
	// NBD_OPT_EXPORT_NAME, which cannot fail, the connection is closed).
	// Other errors get the reply of their row in the option error table
	// (NBD_REP_ERR_UNKNOWN for an unclassified one, with a generic text).
	// nil allows everything.
	Authorize func(p Peer, export string, op Op) error
}

// Timing is where one request's time went at the server: Recv reading its
// payload after the header, Queue waiting for a worker, Device in the
// Device call (with FUA, the write and its flush), Reply writing the reply
// (with the replies group-written before it).
type Timing struct {
	Recv, Queue, Device, Reply time.Duration
}

// Default configuration values.
const (
	DefaultMaxPayload       = 32 << 20
	DefaultMaxConnBuffer    = 64 << 20
	DefaultMaxWorkers       = 32
	DefaultHandshakeTimeout = 30 * time.Second
)

// DefaultConfig returns the recommended limits (NewServer fills zero
// fields with the same values); Backend is left for the caller.
func DefaultConfig() Config {
	return Config{
		MaxPayload:       DefaultMaxPayload,
		MaxConnBuffer:    DefaultMaxConnBuffer,
		MaxWorkers:       DefaultMaxWorkers,
		HandshakeTimeout: DefaultHandshakeTimeout,
		ErrorCode:        DefaultErrorCode,
	}
}

const (
	minMaxPayload = 64 << 10 // unfragmented reads up to 64 KiB must work
	maxMaxPayload = 1 << 30
	// shutdownWriteGrace bounds how long Close lets in-flight replies drain
	// to a client that does not read them.
	shutdownWriteGrace = 10 * time.Second
	readBufferSize     = 64 << 10
)

// Server serves NBD connections. Its methods are safe for concurrent use.
type Server struct {
	cfg  Config
	log  *slog.Logger
	pool *bufferPool

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[*serverConn]struct{}
	handlers  sync.WaitGroup // one per ServeConn in progress
}

// NewServer validates cfg, fills in defaults and returns a Server.
func NewServer(cfg Config) (*Server, error) {
	if cfg.Backend == nil {
		return nil, errors.New("nbdfront: Config.Backend is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.MaxPayload == 0 {
		cfg.MaxPayload = DefaultMaxPayload
	}
	if cfg.MaxPayload < minMaxPayload || cfg.MaxPayload > maxMaxPayload {
		return nil, fmt.Errorf("nbdfront: MaxPayload %d outside [%d, %d]", cfg.MaxPayload, minMaxPayload, maxMaxPayload)
	}
	if cfg.MaxConnBuffer == 0 {
		cfg.MaxConnBuffer = max(DefaultMaxConnBuffer, int64(cfg.MaxPayload))
	}
	if cfg.MaxConnBuffer < int64(cfg.MaxPayload) {
		return nil, fmt.Errorf("nbdfront: MaxConnBuffer %d below MaxPayload %d", cfg.MaxConnBuffer, cfg.MaxPayload)
	}
	if cfg.MaxWorkers == 0 {
		cfg.MaxWorkers = DefaultMaxWorkers
	}
	if cfg.MaxWorkers < 0 {
		return nil, fmt.Errorf("nbdfront: MaxWorkers %d is negative", cfg.MaxWorkers)
	}
	if cfg.HandshakeTimeout == 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.HandshakeTimeout < 0 {
		return nil, fmt.Errorf("nbdfront: HandshakeTimeout %v is negative", cfg.HandshakeTimeout)
	}
	if cfg.ErrorCode == nil {
		cfg.ErrorCode = DefaultErrorCode
	}
	if err := validateTLS(cfg.TLSMode, cfg.TLS); err != nil {
		return nil, err
	}
	return &Server{
		cfg:       cfg,
		log:       cfg.Logger,
		pool:      newBufferPool(int(cfg.MaxPayload)),
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*serverConn]struct{}),
	}, nil
}

// Serve accepts connections on l and serves each in its own goroutine until
// Close is called, then returns nil. It closes l when it returns. Other
// accept errors are retried with backoff unless the listener is closed.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return nil
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()

	var backoff time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if s.isClosed() {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("nbdfront: accept: %w", err)
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("nbd accept failed; retrying", "err", err, "backoff", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		go s.ServeConn(c)
	}
}

// ServeConn serves one accepted connection and returns when it is done; it
// always closes c. After Close it closes c immediately.
func (s *Server) ServeConn(c net.Conn) {
	sc := &serverConn{Conn: c}
	if !s.track(sc) {
		c.Close()
		return
	}
	defer s.untrack(sc)

	log := s.log.With("remote", c.RemoteAddr().String())
	defer func() {
		// A panic here is a bug in this package; contain it to this
		// connection.
		if r := recover(); r != nil {
			log.Error("nbd connection handler panicked", "panic", r, "stack", string(debug.Stack()))
		}
		c.Close()
	}()

	if err := sc.setDeadline(time.Now().Add(s.cfg.HandshakeTimeout)); err != nil {
		log.Debug("nbd connection closed before handshake", "err", err)
		return
	}
	h := &handshake{s: s, sc: sc, conn: c, br: bufio.NewReaderSize(c, readBufferSize), log: log,
		peer: Peer{Addr: c.RemoteAddr()}}
	sess, err := h.run()
	if err != nil {
		var logged *loggedError
		switch {
		case errors.Is(err, errAbort):
			log.Debug("nbd client aborted negotiation")
		case sc.isClosing():
			log.Debug("nbd handshake interrupted by shutdown", "err", err)
		case errors.As(err, &logged):
			// Logged where it happened.
		default:
			log.Info("nbd handshake failed", "err", err)
		}
		if h.tls != nil {
			h.tls.Close() // close_notify first (crypto/tls bounds it to 5s)
		}
		return
	}
	if err := sc.enterTransmission(); err != nil {
		closeExport(sess.exp, log)
		return
	}
	log = log.With("export", sess.name)
	log.Debug("nbd transmission phase", "size", sess.info.Size, "flags", sess.flags,
		"structured", sess.structured, "block_status", sess.metaID != 0, "tls", sess.tls != nil)
	t := newTransmission(s, sc, h.br, log, sess)
	t.run()
}

// Close stops all listeners, shuts connections down and waits until every
// handler has returned. Connections still negotiating are closed at once;
// connections in the transmission phase stop reading requests, finish the
// requests in flight (their replies get 10 seconds to drain to the client),
// close the export and the connection. Close waits for Device calls in
// flight however long they take. It may be called more than once.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	var errs []error
	for l := range s.listeners {
		if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	for sc := range s.conns {
		sc.shutdown()
	}
	s.mu.Unlock()
	s.handlers.Wait()
	return errors.Join(errs...)
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// track registers a connection; it fails once Close has begun, which keeps
// handlers.Add from racing with handlers.Wait.
func (s *Server) track(sc *serverConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[sc] = struct{}{}
	s.handlers.Add(1)
	return true
}

func (s *Server) untrack(sc *serverConn) {
	s.mu.Lock()
	delete(s.conns, sc)
	s.mu.Unlock()
	s.handlers.Done()
}

// serverConn is a connection plus its shutdown state. mu orders deadline
// changes made by the connection's handler against Server.Close, so a
// handshake finishing concurrently cannot clear the shutdown deadline.
type serverConn struct {
	net.Conn

	mu           sync.Mutex
	closing      bool // Server.Close was called
	transmitting bool // handshake is over
}

// setDeadline sets the connection deadline unless shutdown has begun.
func (sc *serverConn) setDeadline(t time.Time) error {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.closing {
		return ErrShutdown
	}
	return sc.Conn.SetDeadline(t)
}

// enterTransmission clears the handshake deadline and marks the connection
// as transmitting, unless shutdown has begun.
func (sc *serverConn) enterTransmission() error {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.closing {
		return ErrShutdown
	}
	sc.transmitting = true
	return sc.Conn.SetDeadline(time.Time{})
}

// shutdown starts a graceful close (see Server.Close).
func (sc *serverConn) shutdown() {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	sc.closing = true
	if !sc.transmitting {
		sc.Conn.Close()
		return
	}
	now := time.Now()
	sc.Conn.SetReadDeadline(now)
	sc.Conn.SetWriteDeadline(now.Add(shutdownWriteGrace))
}

func (sc *serverConn) isClosing() bool {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return sc.closing
}

// closeExport closes an export, containing a panic.
func closeExport(exp Export, log *slog.Logger) {
	if err := safeCall(exp.Close); err != nil {
		log.Warn("nbd export close failed", "err", err)
	}
}

// bufferPool recycles payload buffers by size class: powers of two from
// 4 KiB up to, and capped at, the maximum payload. It is safe for
// concurrent use.
type bufferPool struct {
	sizes []int
	pools []sync.Pool // of *[]byte with cap == sizes[i]
}

const minBufferClass = 4 << 10

func newBufferPool(maxPayload int) *bufferPool {
	p := &bufferPool{}
	for size := minBufferClass; ; size *= 2 {
		if size >= maxPayload {
			p.sizes = append(p.sizes, maxPayload)
			break
		}
		p.sizes = append(p.sizes, size)
	}
	p.pools = make([]sync.Pool, len(p.sizes))
	return p
}

// class returns the index of the smallest class holding n bytes, or -1.
func (p *bufferPool) class(n int) int {
	for i, size := range p.sizes {
		if n <= size {
			return i
		}
	}
	return -1
}

// classSize is the capacity of the buffer get(n) returns, which is what
// it costs against a connection's budget.
func (p *bufferPool) classSize(n int) int {
	return p.sizes[p.class(n)]
}

// get returns a buffer of length n; n must not exceed the largest class.
func (p *bufferPool) get(n int) *[]byte {
	i := p.class(n)
	if i < 0 {
		panic(fmt.Sprintf("nbdfront: buffer of %d bytes exceeds the pool", n))
	}
	if v, ok := p.pools[i].Get().(*[]byte); ok {
		*v = (*v)[:n]
		return v
	}
	b := make([]byte, n, p.sizes[i])
	return &b
}

// put returns a buffer obtained from get.
func (p *bufferPool) put(b *[]byte) {
	i := p.class(cap(*b))
	if i < 0 || p.sizes[i] != cap(*b) {
		return
	}
	p.pools[i].Put(b)
}
