package nbdfront

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// ---------------------------------------------------------------------
// In-memory device and backend.

const memBlock = 4096 // allocation granularity of memDevice

// memDevice is an in-memory Device with per-block allocation tracking.
// hook, if set, runs at the start of every operation (outside the lock);
// it may block, fail the operation or panic.
type memDevice struct {
	mu    sync.Mutex
	data  []byte
	alloc []bool // per memBlock

	hook    atomic.Pointer[func(op string, off, length int64) error]
	flushes atomic.Int64

	logMu sync.Mutex
	log   []string // operations in completion order
}

func newMemDevice(size int64) *memDevice {
	return &memDevice{
		data:  make([]byte, size),
		alloc: make([]bool, (size+memBlock-1)/memBlock),
	}
}

// setHook installs f (nil removes it); safe while requests run.
func (d *memDevice) setHook(f func(op string, off, length int64) error) {
	if f == nil {
		d.hook.Store(nil)
		return
	}
	d.hook.Store(&f)
}

func (d *memDevice) enter(op string, off, length int64) error {
	if f := d.hook.Load(); f != nil {
		return (*f)(op, off, length)
	}
	return nil
}

func (d *memDevice) record(op string) {
	d.logMu.Lock()
	d.log = append(d.log, op)
	d.logMu.Unlock()
}

func (d *memDevice) ops() []string {
	d.logMu.Lock()
	defer d.logMu.Unlock()
	return append([]string(nil), d.log...)
}

func (d *memDevice) check(off, length int64) error {
	if off < 0 || length < 0 || off+length > int64(len(d.data)) {
		return fmt.Errorf("memDevice: [%d,+%d) out of range %d", off, length, len(d.data))
	}
	return nil
}

func (d *memDevice) ReadAt(p []byte, off int64) (int, error) {
	if err := d.enter("read", off, int64(len(p))); err != nil {
		return 0, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	d.record("read")
	return copy(p, d.data[off:]), nil
}

func (d *memDevice) WriteAt(p []byte, off int64) (int, error) {
	if err := d.enter("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	copy(d.data[off:], p)
	d.setAlloc(off, int64(len(p)), true, false)
	d.record("write")
	return len(p), nil
}

func (d *memDevice) Flush() error {
	if err := d.enter("flush", 0, 0); err != nil {
		return err
	}
	d.flushes.Add(1)
	d.record("flush")
	return nil
}

func (d *memDevice) Trim(off, length int64) error {
	if err := d.enter("trim", off, length); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.check(off, length); err != nil {
		return err
	}
	clear(d.data[off : off+length])
	d.setAlloc(off, length, false, true)
	d.record("trim")
	return nil
}

func (d *memDevice) WriteZeroes(off, length int64, noHole bool) error {
	if err := d.enter("zero", off, length); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.check(off, length); err != nil {
		return err
	}
	clear(d.data[off : off+length])
	if noHole {
		d.setAlloc(off, length, true, false)
	} else {
		d.setAlloc(off, length, false, true)
	}
	d.record("zero")
	return nil
}

// setAlloc marks blocks touched by the range (or, with whole, only blocks
// entirely inside it) as allocated or not.
func (d *memDevice) setAlloc(off, length int64, v, whole bool) {
	first, last := off/memBlock, (off+length-1)/memBlock
	if whole {
		first = (off + memBlock - 1) / memBlock
		last = (off+length)/memBlock - 1
		if off+length == int64(len(d.data)) {
			last = int64(len(d.alloc)) - 1
		}
	}
	for b := first; b <= last && b < int64(len(d.alloc)); b++ {
		d.alloc[b] = v
	}
}

// BlockStatus reports allocation runs from off, extending to the end of
// the block holding off+length-1 (clipped to the device).
func (d *memDevice) BlockStatus(off, length int64) ([]Extent, error) {
	if err := d.enter("status", off, length); err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.check(off, length); err != nil {
		return nil, err
	}
	size := int64(len(d.data))
	end := min(((off+length+memBlock-1)/memBlock)*memBlock, size)
	var exts []Extent
	for pos := off; pos < end; {
		b := pos / memBlock
		next := min((b+1)*memBlock, end)
		hole := !d.alloc[b]
		if n := len(exts); n > 0 && exts[n-1].Hole == hole {
			exts[n-1].Length += next - pos
		} else {
			exts = append(exts, Extent{Length: next - pos, Hole: hole, Zero: hole})
		}
		pos = next
	}
	return exts, nil
}

func (d *memDevice) bytes(off, n int64) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]byte(nil), d.data[off:off+n]...)
}

func (d *memDevice) allocated(block int) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.alloc[block]
}

// memExport is one Open of an export.
type memExport struct {
	*memDevice
	info   ExportInfo
	closes atomic.Int32
}

func (e *memExport) Info() ExportInfo { return e.info }
func (e *memExport) Close() error {
	e.closes.Add(1)
	return nil
}

// memBackend serves a fixed set of exports; "" is an alias for the export
// named by def.
type memBackend struct {
	mu      sync.Mutex
	exports map[string]*memTarget
	def     string
	openErr error // if set, Open and Info fail with it
	handles []*memExport
}

type memTarget struct {
	info ExportInfo
	dev  *memDevice
}

func newMemBackend() *memBackend {
	return &memBackend{exports: map[string]*memTarget{}}
}

func (b *memBackend) add(info ExportInfo) *memDevice {
	dev := newMemDevice(max(info.Size, 0))
	b.mu.Lock()
	defer b.mu.Unlock()
	b.exports[info.Name] = &memTarget{info: info, dev: dev}
	if b.def == "" {
		b.def = info.Name
	}
	return dev
}

func (b *memBackend) lookup(name string) (*memTarget, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.openErr != nil {
		return nil, b.openErr
	}
	if name == "" {
		name = b.def
	}
	t, ok := b.exports[name]
	if !ok {
		return nil, fmt.Errorf("export %q: %w", name, ErrUnknownExport)
	}
	return t, nil
}

func (b *memBackend) List() ([]ExportInfo, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []ExportInfo
	for _, t := range b.exports {
		out = append(out, t.info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (b *memBackend) Info(name string) (ExportInfo, error) {
	t, err := b.lookup(name)
	if err != nil {
		return ExportInfo{}, err
	}
	return t.info, nil
}

func (b *memBackend) Open(name string) (Export, error) {
	t, err := b.lookup(name)
	if err != nil {
		return nil, err
	}
	e := &memExport{memDevice: t.dev, info: t.info}
	b.mu.Lock()
	b.handles = append(b.handles, e)
	b.mu.Unlock()
	return e, nil
}

// waitAllClosed waits until every opened handle was closed exactly once.
func (b *memBackend) waitAllClosed(t testing.TB) {
	t.Helper()
	waitFor(t, "all exports closed", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		for _, h := range b.handles {
			if h.closes.Load() != 1 {
				return false
			}
		}
		return true
	})
	b.mu.Lock()
	defer b.mu.Unlock()
	for i, h := range b.handles {
		if n := h.closes.Load(); n != 1 {
			t.Fatalf("handle %d closed %d times", i, n)
		}
	}
}

func (b *memBackend) handle(i int) *memExport {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.handles[i]
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// ---------------------------------------------------------------------
// Test server.

const testSize = 1 << 20

// testEnv is a server on a loopback listener with two exports:
// "disk" (read-write, every feature) and "ro" (read-only).
type testEnv struct {
	t    testing.TB
	srv  *Server
	addr string
	be   *memBackend
	disk *memDevice
	ro   *memDevice
}

func quietLogger() *slog.Logger {
	if os.Getenv("NBDFRONT_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func newEnv(t testing.TB, mod func(*Config)) *testEnv {
	t.Helper()
	be := newMemBackend()
	disk := be.add(ExportInfo{Name: "disk", Description: "test disk", Size: testSize,
		MultiConn: true, CanTrim: true, CanZero: true, CanFastZero: true, CanBlockStatus: true})
	ro := be.add(ExportInfo{Name: "ro", Size: testSize, ReadOnly: true, CanBlockStatus: true})
	cfg := Config{Backend: be, Logger: quietLogger(), MaxPayload: 256 << 10, HandshakeTimeout: 10 * time.Second}
	if mod != nil {
		mod(&cfg)
	}
	srv, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		select {
		case err := <-served:
			if err != nil {
				t.Errorf("Serve returned %v after Close", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return after Close")
		}
		be.waitAllClosed(t)
	})
	return &testEnv{t: t, srv: srv, addr: l.Addr().String(), be: be, disk: disk, ro: ro}
}

// ---------------------------------------------------------------------
// Test client.

type testClient struct {
	t          testing.TB
	conn       net.Conn
	r          *bufio.Reader
	structured bool
	cookie     atomic.Uint64

	mu    sync.Mutex
	reads map[uint64]int // pending simple-reply READ lengths by cookie
}

func newClient(t testing.TB, conn net.Conn) *testClient {
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	c := &testClient{t: t, conn: conn, r: bufio.NewReader(conn), reads: map[uint64]int{}}
	t.Cleanup(func() { conn.Close() })
	return c
}

// pipeClient serves one end of a net.Pipe with srv.ServeConn.
func pipeClient(t testing.TB, srv *Server) *testClient {
	client, server := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.ServeConn(server)
	}()
	t.Cleanup(func() {
		client.Close()
		<-done
	})
	return newClient(t, client)
}

func (e *testEnv) dial() *testClient {
	e.t.Helper()
	conn, err := net.Dial("tcp", e.addr)
	if err != nil {
		e.t.Fatal(err)
	}
	return newClient(e.t, conn)
}

// dialGreet connects and completes the initial flag exchange.
func (e *testEnv) dialGreet(flags uint32) *testClient {
	c := e.dial()
	c.greet(flags)
	return c
}

// open connects, optionally negotiates structured replies and
// base:allocation, and enters transmission with NBD_OPT_GO.
func (e *testEnv) open(name string, structured, meta bool) (*testClient, uint16) {
	e.t.Helper()
	c := e.dialGreet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	if structured {
		c.mustAck(optStructuredReply, nil)
	}
	if meta {
		rs := c.option(optSetMetaContext, metaData(name, metaBaseAllocation))
		if len(rs) != 2 || rs[0].typ != repMetaContext || rs[1].typ != repAck {
			e.t.Fatalf("SET_META_CONTEXT replies: %+v", rs)
		}
	}
	_, flags := c.goExport(name)
	return c, flags
}

func (c *testClient) fatalf(format string, args ...any) {
	c.t.Helper()
	c.t.Fatalf(format, args...)
}

func (c *testClient) write(b []byte) {
	c.t.Helper()
	if _, err := c.conn.Write(b); err != nil {
		c.fatalf("client write: %v", err)
	}
}

func (c *testClient) readN(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.r, b); err != nil {
		c.fatalf("client read %d bytes: %v", n, err)
	}
	return b
}

// expectClosed asserts that the server closes the connection without
// sending anything more.
func (c *testClient) expectClosed() {
	c.t.Helper()
	var b [1]byte
	n, err := c.r.Read(b[:])
	if err == nil {
		c.fatalf("expected connection close, read %d bytes (%#x)", n, b[0])
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		c.fatalf("expected connection close, got timeout")
	}
}

func (c *testClient) greet(flags uint32) uint16 {
	c.t.Helper()
	g := c.readN(greetingLen)
	if m := binary.BigEndian.Uint64(g); m != magicNBD {
		c.fatalf("greeting magic %#x", m)
	}
	if m := binary.BigEndian.Uint64(g[8:]); m != magicOption {
		c.fatalf("greeting option magic %#x", m)
	}
	hs := binary.BigEndian.Uint16(g[16:])
	c.write(binary.BigEndian.AppendUint32(nil, flags))
	return hs
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (c *testClient) sendOption(opt uint32, data []byte) {
	c.t.Helper()
	b := binary.BigEndian.AppendUint64(nil, magicOption)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	c.write(append(b, data...))
}

func (c *testClient) readOptReply() optReply {
	c.t.Helper()
	h := c.readN(optionReplyLen)
	if m := binary.BigEndian.Uint64(h); m != magicOptionReply {
		c.fatalf("option reply magic %#x", m)
	}
	r := optReply{opt: binary.BigEndian.Uint32(h[8:]), typ: binary.BigEndian.Uint32(h[12:])}
	r.data = c.readN(int(binary.BigEndian.Uint32(h[16:])))
	return r
}

// option sends an option and reads replies up to the final one (ACK or
// an error).
func (c *testClient) option(opt uint32, data []byte) []optReply {
	c.t.Helper()
	c.sendOption(opt, data)
	var out []optReply
	for {
		r := c.readOptReply()
		if r.opt != opt {
			c.fatalf("reply for option %d, want %d", r.opt, opt)
		}
		out = append(out, r)
		if r.typ == repAck || r.typ&repErrBit != 0 {
			return out
		}
	}
}

func (c *testClient) mustAck(opt uint32, data []byte) {
	c.t.Helper()
	rs := c.option(opt, data)
	if len(rs) != 1 || rs[0].typ != repAck {
		c.fatalf("option %d: replies %+v, want a single ACK", opt, rs)
	}
	if opt == optStructuredReply {
		c.structured = true
	}
}

// expectErr sends an option and expects a single error reply of typ.
func (c *testClient) expectErr(opt uint32, data []byte, typ uint32) string {
	c.t.Helper()
	rs := c.option(opt, data)
	if len(rs) != 1 || rs[0].typ != typ {
		c.fatalf("option %d: replies %+v, want single %#x", opt, rs, typ)
	}
	return string(rs[0].data)
}

func goData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

func metaData(name string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// infoReplies decodes NBD_REP_INFO replies by type.
func infoReplies(t testing.TB, rs []optReply) map[uint16][]byte {
	t.Helper()
	out := map[uint16][]byte{}
	for _, r := range rs {
		if r.typ != repInfo {
			continue
		}
		if len(r.data) < 2 {
			t.Fatalf("short NBD_REP_INFO: %x", r.data)
		}
		it := binary.BigEndian.Uint16(r.data)
		if _, dup := out[it]; dup {
			t.Fatalf("info type %d sent twice", it)
		}
		out[it] = r.data[2:]
	}
	return out
}

func (c *testClient) goExport(name string, infos ...uint16) (uint64, uint16) {
	c.t.Helper()
	rs := c.option(optGo, goData(name, infos...))
	if last := rs[len(rs)-1]; last.typ != repAck {
		c.fatalf("GO %q failed: %#x %q", name, last.typ, last.data)
	}
	ex := infoReplies(c.t, rs)[infoExport]
	if len(ex) != 10 {
		c.fatalf("NBD_INFO_EXPORT payload %x", ex)
	}
	return binary.BigEndian.Uint64(ex), binary.BigEndian.Uint16(ex[8:])
}

// --- transmission

// msg is one reply message: a simple reply or a structured chunk.
type msg struct {
	simple  bool
	errno   uint32 // simple replies
	flags   uint16 // chunks
	typ     uint16 // chunks
	cookie  uint64
	payload []byte // chunk payload, or READ data of a simple reply
}

// send writes one request; it is safe to call concurrently with readMsg.
func (c *testClient) send(flags, typ uint16, cookie, off uint64, length uint32, data []byte) error {
	if typ == cmdRead && !c.structured {
		c.mu.Lock()
		c.reads[cookie] = int(length)
		c.mu.Unlock()
	}
	b := make([]byte, 0, requestHeaderLen+len(data))
	b = binary.BigEndian.AppendUint32(b, magicRequest)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	b = append(b, data...)
	_, err := c.conn.Write(b)
	return err
}

func (c *testClient) readMsg() (msg, error) {
	var h [4]byte
	if _, err := io.ReadFull(c.r, h[:]); err != nil {
		return msg{}, err
	}
	switch m := binary.BigEndian.Uint32(h[:]); m {
	case magicSimpleReply:
		var b [12]byte
		if _, err := io.ReadFull(c.r, b[:]); err != nil {
			return msg{}, err
		}
		r := msg{simple: true, errno: binary.BigEndian.Uint32(b[:]), cookie: binary.BigEndian.Uint64(b[4:])}
		c.mu.Lock()
		n, isRead := c.reads[r.cookie]
		delete(c.reads, r.cookie)
		c.mu.Unlock()
		if isRead && r.errno == 0 {
			r.payload = make([]byte, n)
			if _, err := io.ReadFull(c.r, r.payload); err != nil {
				return msg{}, err
			}
		}
		return r, nil
	case magicStructuredReply:
		var b [16]byte
		if _, err := io.ReadFull(c.r, b[:]); err != nil {
			return msg{}, err
		}
		r := msg{flags: binary.BigEndian.Uint16(b[:]), typ: binary.BigEndian.Uint16(b[2:]),
			cookie: binary.BigEndian.Uint64(b[4:])}
		r.payload = make([]byte, binary.BigEndian.Uint32(b[12:]))
		if _, err := io.ReadFull(c.r, r.payload); err != nil {
			return msg{}, err
		}
		return r, nil
	default:
		return msg{}, fmt.Errorf("reply magic %#x", m)
	}
}

// result is a complete reply to one request.
type result struct {
	errno  uint32
	errMsg string
	data   []byte   // READ data
	status []uint32 // BLOCK_STATUS: context id, then length/flags pairs
	chunks []msg
}

// collect reads messages for cookie until its reply is complete. It
// assumes no other request is outstanding.
func (c *testClient) collect(cookie, off uint64, length uint32, typ uint16) result {
	c.t.Helper()
	var res result
	for {
		m, err := c.readMsg()
		if err != nil {
			c.fatalf("read reply: %v", err)
		}
		if m.cookie != cookie {
			c.fatalf("reply cookie %d, want %d", m.cookie, cookie)
		}
		if m.simple {
			if c.structured && typ == cmdRead {
				c.fatalf("simple reply to READ with structured replies")
			}
			res.errno, res.data = m.errno, m.payload
			return res
		}
		if !c.structured {
			c.fatalf("structured chunk without negotiation")
		}
		res.chunks = append(res.chunks, m)
		switch m.typ {
		case replyTypeOffsetData:
			if len(m.payload) < 9 {
				c.fatalf("OFFSET_DATA payload %d bytes", len(m.payload))
			}
			o := binary.BigEndian.Uint64(m.payload)
			d := m.payload[8:]
			if o < off || o+uint64(len(d)) > off+uint64(length) {
				c.fatalf("OFFSET_DATA [%d,+%d) outside request [%d,+%d)", o, len(d), off, length)
			}
			if res.data == nil {
				res.data = make([]byte, length)
			}
			copy(res.data[o-off:], d)
		case replyTypeBlockStatus:
			if len(m.payload) < 12 || (len(m.payload)-4)%8 != 0 {
				c.fatalf("BLOCK_STATUS payload %d bytes", len(m.payload))
			}
			for i := 0; i < len(m.payload); i += 4 {
				res.status = append(res.status, binary.BigEndian.Uint32(m.payload[i:]))
			}
		case replyTypeError:
			if len(m.payload) < 6 {
				c.fatalf("ERROR payload %d bytes", len(m.payload))
			}
			res.errno = binary.BigEndian.Uint32(m.payload)
			n := int(binary.BigEndian.Uint16(m.payload[4:]))
			if n > len(m.payload)-6 || n > maxStringLen {
				c.fatalf("ERROR message length %d in %d bytes", n, len(m.payload))
			}
			res.errMsg = string(m.payload[6 : 6+n])
			if res.errno == 0 {
				c.fatalf("ERROR chunk with zero errno")
			}
		case replyTypeNone:
			if len(m.payload) != 0 {
				c.fatalf("NONE chunk with payload")
			}
		default:
			c.fatalf("unexpected chunk type %d", m.typ)
		}
		if m.flags&replyFlagDone != 0 {
			return res
		}
	}
}

// do sends one request and returns its complete reply.
func (c *testClient) do(flags, typ uint16, off uint64, length uint32, data []byte) result {
	c.t.Helper()
	cookie := c.cookie.Add(1) * 0x0101010101 // exercise all cookie bytes
	if err := c.send(flags, typ, cookie, off, length, data); err != nil {
		c.fatalf("send request: %v", err)
	}
	return c.collect(cookie, off, length, typ)
}

func (c *testClient) mustOK(flags, typ uint16, off uint64, length uint32, data []byte) result {
	c.t.Helper()
	r := c.do(flags, typ, off, length, data)
	if r.errno != 0 {
		c.fatalf("%s [%d,+%d): errno %d (%s)", cmdName(typ), off, length, r.errno, r.errMsg)
	}
	return r
}

func (c *testClient) expectErrno(flags, typ uint16, off uint64, length uint32, data []byte, want uint32) result {
	c.t.Helper()
	r := c.do(flags, typ, off, length, data)
	if r.errno != want {
		c.fatalf("%s flags %#x [%d,+%d): errno %d (%q), want %d", cmdName(typ), flags, off, length, r.errno, r.errMsg, want)
	}
	if r.data != nil && r.errno != 0 {
		c.fatalf("error reply carried data")
	}
	return r
}

func (c *testClient) disc() {
	c.t.Helper()
	if err := c.send(0, cmdDisc, 0, 0, 0, nil); err != nil {
		c.fatalf("send DISC: %v", err)
	}
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7+i/251)
	}
	return b
}

func mustEqual(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && i < len(want) && got[i] == want[i] {
			i++
		}
		t.Fatalf("%s: mismatch at byte %d (len got %d, want %d)", what, i, len(got), len(want))
	}
}
