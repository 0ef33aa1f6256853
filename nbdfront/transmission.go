package nbdfront

// The transmission phase. Goroutines per connection:
//
//   - the reader (the connection handler goroutine) reads and validates
//     request headers, reads WRITE payloads, answers invalid requests
//     itself and hands each valid request to a worker: an idle one if one
//     is waiting, else a new one (at most MaxWorkers per connection);
//   - workers call the Device, write their reply, then wait for the next
//     request until the connection ends. Reusing them keeps the stack a
//     worker has grown (the Device's call chain can be deep) instead of
//     growing a fresh one per request.
//
// Replies never interleave; they may go out in any order. Replies that
// become ready while another is being written are gathered and written
// together by one of their workers (see send). The reader bounds
// concurrency: it takes a slot (at
// most MaxWorkers) and charges the payload buffer to the connection's byte
// budget (MaxConnBuffer) before allocating or reading anything a request
// needs; the worker gives both back after its reply is written.

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"time"
)

const (
	// maxBlockStatusExtents caps the descriptors in one
	// NBD_REPLY_TYPE_BLOCK_STATUS chunk (the spec asks for at most 2^20;
	// clients ask again for the rest).
	maxBlockStatusExtents = 1 << 16
	// minDiscardLimit: WRITE payloads up to this size are skipped after an
	// error reply instead of disconnecting, because the spec says payloads
	// up to 32 MiB should not be treated as a denial of service.
	minDiscardLimit = 1 << 25
	// tlsWriteBuffer is the reply buffer of a TLS connection: a group of
	// small replies becomes a few full TLS records instead of two records
	// (and two writes) per reply.
	tlsWriteBuffer = 64 << 10
)

// rules decides whether a request is acceptable on this connection. It is
// immutable after the handshake.
type rules struct {
	info       ExportInfo // normalized
	flags      uint16     // transmission flags sent to the client
	structured bool
	metaID     uint32
}

// check validates a request against the negotiated state and returns the
// NBD error and a message for an invalid request, or 0 for a valid one.
// NBD_CMD_DISC is not checked (it is never answered).
func (r *rules) check(req request) (uint32, string) {
	allowed := cmdFlagFUA // valid on every command once SEND_FUA is advertised
	switch req.Type {
	case cmdRead:
		if r.structured {
			allowed |= cmdFlagDF
		}
	case cmdWrite, cmdFlush, cmdTrim, cmdCache:
	case cmdWriteZeroes:
		allowed |= cmdFlagNoHole
		if r.flags&tFlagSendFastZero != 0 {
			allowed |= cmdFlagFastZero
		}
	case cmdBlockStatus:
		allowed |= cmdFlagReqOne
	default:
		return EINVAL, fmt.Sprintf("unknown command %d", req.Type)
	}
	if bad := req.Flags &^ allowed; bad != 0 {
		return EINVAL, fmt.Sprintf("command flags %#x not valid for %s", bad, cmdName(req.Type))
	}

	switch req.Type {
	case cmdWrite, cmdTrim, cmdWriteZeroes:
		if r.info.ReadOnly {
			return EPERM, "export is read-only"
		}
	}
	switch req.Type {
	case cmdFlush:
		if req.Offset != 0 || req.Length != 0 {
			return EINVAL, "flush offset and length must be zero"
		}
		return 0, ""
	case cmdTrim:
		if !r.info.CanTrim {
			return EINVAL, "trim is not supported by this export"
		}
	case cmdWriteZeroes:
		if !r.info.CanZero {
			return EINVAL, "write zeroes is not supported by this export"
		}
	case cmdBlockStatus:
		if r.metaID == 0 {
			return EINVAL, "block status requires a negotiated metadata context"
		}
	}

	if req.Length == 0 {
		return EINVAL, fmt.Sprintf("%s of zero length", cmdName(req.Type))
	}
	if (req.Type == cmdRead || req.Type == cmdWrite) && req.Length > r.info.MaxBlock {
		code := EINVAL
		if req.Type == cmdRead && r.structured {
			code = EOVERFLOW
		}
		return code, fmt.Sprintf("%s length %d exceeds maximum payload %d", cmdName(req.Type), req.Length, r.info.MaxBlock)
	}
	size := uint64(r.info.Size)
	end := req.Offset + uint64(req.Length)
	if end < req.Offset || end > size {
		code := EINVAL
		if req.Type == cmdWrite || req.Type == cmdWriteZeroes {
			code = ENOSPC
		}
		return code, fmt.Sprintf("%s [%d, +%d) beyond export size %d", cmdName(req.Type), req.Offset, req.Length, size)
	}
	if m := uint64(r.info.MinBlock); m > 1 {
		if req.Offset%m != 0 || (uint64(req.Length)%m != 0 && end != size) {
			return EINVAL, fmt.Sprintf("%s [%d, +%d) not aligned to minimum block size %d", cmdName(req.Type), req.Offset, req.Length, m)
		}
	}
	return 0, ""
}

// maxExtents is how many block status descriptors fit in one chunk whose
// variable part (context ID and descriptors) must stay within MaxBlock.
func (r *rules) maxExtents() int {
	return int(min(maxBlockStatusExtents, (r.info.MaxBlock-4)/8))
}

// transmission is one connection in the transmission phase.
type transmission struct {
	s   *Server
	sc  *serverConn
	br  *bufio.Reader // owned by the reader goroutine
	tls *tls.Conn     // nil in plaintext; replies then go to sc.Conn
	bw  *bufio.Writer // on tls; used by the worker writing a group
	log *slog.Logger
	exp Export
	rules

	discardLimit int64 // largest WRITE payload skipped after an error reply
	slots        chan struct{}
	budget       *budget
	inflight     sync.WaitGroup // requests handed to workers and not finished
	idle         chan *job      // unbuffered: a request for a worker waiting for one
	done         chan struct{}  // closed once no request is in flight: idle workers exit
	workers      int            // workers started; owned by the reader

	hdr [requestHeaderLen]byte // reader scratch

	// Replies (see send). wmu guards the fields below it.
	wmu      sync.Mutex
	wdone    sync.Cond   // broadcast when a reply write ends; L is &wmu
	writing  bool        // a worker is writing queued replies
	queue    net.Buffers // replies waiting for the next write
	spare    net.Buffers // the previous write's slice, reused
	queued   uint64      // replies ever queued
	written  uint64      // replies ever written (or failed)
	writes   uint64      // group writes done, for tests
	werr     error       // first reply write error
	failOnce sync.Once
}

func newTransmission(s *Server, sc *serverConn, br *bufio.Reader, log *slog.Logger, sess *session) *transmission {
	t := &transmission{
		s:   s,
		sc:  sc,
		br:  br,
		tls: sess.tls,
		log: log,
		exp: sess.exp,
		rules: rules{
			info:       sess.info,
			flags:      sess.flags,
			structured: sess.structured,
			metaID:     sess.metaID,
		},
		discardLimit: max(int64(s.cfg.MaxPayload), minDiscardLimit),
		slots:        make(chan struct{}, s.cfg.MaxWorkers),
		budget:       newBudget(s.cfg.MaxConnBuffer),
		idle:         make(chan *job),
		done:         make(chan struct{}),
	}
	t.wdone.L = &t.wmu
	if sess.tls != nil {
		t.bw = bufio.NewWriterSize(sess.tls, tlsWriteBuffer)
	}
	return t
}

// run serves requests until NBD_CMD_DISC, end of stream, a protocol error
// or server shutdown; then it waits for the workers, closes the connection
// and closes the export.
func (t *transmission) run() {
	err := t.readLoop()
	switch {
	case err == nil:
		t.log.Debug("nbd client disconnected")
	case errors.Is(err, io.EOF):
		t.log.Debug("nbd client closed the connection")
	case t.sc.isClosing():
		t.log.Debug("nbd connection shut down", "err", err)
	case t.writeFailed():
		t.log.Debug("nbd connection ended after a failed reply", "err", err)
	default:
		// Hard disconnect: replies still in flight are dropped.
		t.log.Info("nbd connection error; disconnecting", "err", err)
		t.sc.Conn.Close()
	}
	// Orderly ends let in-flight requests finish and reply, as NBD_CMD_DISC
	// and server shutdown require.
	t.inflight.Wait()
	close(t.done)
	if t.tls != nil {
		// Shut TLS down first (close_notify, which crypto/tls bounds to
		// 5s); after a hard disconnect this fails at once.
		t.tls.Close()
	}
	t.sc.Conn.Close()
	closeExport(t.exp, t.log)
}

// readLoop reads requests until NBD_CMD_DISC (nil), clean end of stream
// (io.EOF) or an error.
func (t *transmission) readLoop() (err error) {
	defer func() {
		if r := recover(); r != nil {
			t.log.Error("nbd request reader panicked", "panic", r, "stack", string(debug.Stack()))
			err = fmt.Errorf("%w: %v", errPanic, r)
		}
	}()
	for {
		if _, err := io.ReadFull(t.br, t.hdr[:]); err != nil {
			if err == io.EOF {
				return io.EOF
			}
			return fmt.Errorf("read request header: %w", err)
		}
		var at time.Time
		if t.s.cfg.Observe != nil {
			at = time.Now()
		}
		req, err := parseRequestHeader(t.hdr[:])
		if err != nil {
			return err
		}
		if req.Type == cmdDisc {
			return nil
		}
		if err := t.dispatch(req, at); err != nil {
			return err
		}
	}
}

// dispatch answers an invalid request or starts a worker for a valid one.
// An error ends the connection.
// headerAt is when its header was read (zero unless observed).
func (t *transmission) dispatch(req request, headerAt time.Time) error {
	if code, msg := t.check(req); code != 0 {
		return t.reject(req, code, msg)
	}

	// Payload buffer for READ data, WRITE data or block status
	// descriptors; nothing is allocated before the budget allows it.
	var need int
	switch req.Type {
	case cmdRead, cmdWrite:
		need = int(req.Length) // ≤ MaxBlock ≤ MaxPayload, checked above
	case cmdBlockStatus:
		need = 8 * t.maxExtents()
		if req.Flags&cmdFlagReqOne != 0 {
			need = 8
		}
	}

	t.slots <- struct{}{}
	j := getJob()
	j.req = req
	if need > 0 {
		j.charge = int64(t.s.pool.classSize(need))
		t.budget.acquire(j.charge)
		j.buf = t.s.pool.get(need)
	}
	if req.Type == cmdWrite {
		if _, err := io.ReadFull(t.br, *j.buf); err != nil {
			t.release(j)
			return fmt.Errorf("read write payload: %w", err)
		}
	}
	j.started = true
	if !headerAt.IsZero() {
		j.tHeader, j.tQueued = headerAt, time.Now()
	}
	t.inflight.Add(1)
	t.handOff(j)
	return nil
}

// handOff gives a request to an idle worker, or to a new one while fewer
// than MaxWorkers exist. With MaxWorkers workers, at most MaxWorkers-1
// hold a request (the reader holds the last slot), so one is idle or about
// to be, and the send completes.
func (t *transmission) handOff(j *job) {
	select {
	case t.idle <- j:
		return
	default:
	}
	if t.workers < t.s.cfg.MaxWorkers {
		t.workers++
		go t.worker(j)
		return
	}
	t.idle <- j
}

// worker serves requests until the connection ends.
func (t *transmission) worker(j *job) {
	for {
		t.work(j)
		select {
		case j = <-t.idle:
		case <-t.done:
			return
		}
	}
}

// reject answers an invalid request from the reader goroutine. A WRITE
// payload is skipped to keep the stream in sync, unless it is so large
// that the connection is dropped instead.
func (t *transmission) reject(req request, code uint32, msg string) error {
	t.log.Debug("nbd request rejected", "cmd", cmdName(req.Type), "flags", req.Flags,
		"offset", req.Offset, "length", req.Length, "errno", code, "msg", msg)
	j := getJob()
	j.req = req
	defer putJob(j)
	if req.Type == cmdWrite && req.Length > 0 {
		if int64(req.Length) > t.discardLimit {
			t.sendError(j, code, msg) // best effort before the hard disconnect
			return fmt.Errorf("write payload of %d bytes is too large to skip", req.Length)
		}
		if _, err := io.CopyN(io.Discard, t.br, int64(req.Length)); err != nil {
			return fmt.Errorf("skip write payload: %w", err)
		}
	}
	return t.sendError(j, code, msg)
}

// work executes one valid request on the device and replies.
func (t *transmission) work(j *job) {
	defer func() {
		if r := recover(); r != nil {
			t.log.Error("nbd device call panicked", "cmd", cmdName(j.req.Type), "offset", j.req.Offset,
				"length", j.req.Length, "panic", r, "stack", string(debug.Stack()))
			if !j.replied {
				t.sendError(j, EIO, "internal server error")
			} else {
				t.fail(fmt.Errorf("%w while replying: %v", errPanic, r))
			}
		}
		t.observe(j)
		t.release(j)
	}()
	if !j.tHeader.IsZero() {
		j.tStart = time.Now()
	}
	req := j.req
	off, length := int64(req.Offset), int64(req.Length)
	var err error
	switch req.Type {
	case cmdRead:
		if err = readFull(t.exp, *j.buf, off); err == nil {
			t.sendRead(j)
			return
		}
	case cmdWrite:
		err = writeFull(t.exp, *j.buf, off)
	case cmdFlush:
		err = t.exp.Flush()
	case cmdTrim:
		err = t.exp.Trim(off, length)
	case cmdCache:
		// Advisory only; the Device has no cache to warm.
	case cmdWriteZeroes:
		// NBD_CMD_FLAG_FAST_ZERO is only accepted when the export declared
		// CanFastZero, i.e. its WriteZeroes is always fast.
		err = t.exp.WriteZeroes(off, length, req.Flags&cmdFlagNoHole != 0)
	case cmdBlockStatus:
		var exts []Extent
		if exts, err = t.exp.BlockStatus(off, length); err == nil {
			var n int
			if n, err = encodeExtents(*j.buf, exts, off, length); err == nil {
				t.sendBlockStatus(j, n)
				return
			}
		}
	}
	if err == nil && req.Flags&cmdFlagFUA != 0 && isWriteCmd(req.Type) {
		err = t.exp.Flush()
	}
	if err != nil {
		code := t.errorCode(req, err)
		t.log.Warn("nbd request failed", "cmd", cmdName(req.Type), "offset", req.Offset,
			"length", req.Length, "errno", code, "err", err)
		t.sendError(j, code, err.Error())
		return
	}
	t.sendOK(j)
}

// observe reports a served request's timing to Config.Observe.
func (t *transmission) observe(j *job) {
	if j.tHeader.IsZero() || j.tStart.IsZero() || j.tDevice.IsZero() {
		return
	}
	t.s.cfg.Observe(cmdName(j.req.Type), Timing{
		Recv:   j.tQueued.Sub(j.tHeader),
		Queue:  j.tStart.Sub(j.tQueued),
		Device: j.tDevice.Sub(j.tStart),
		Reply:  time.Since(j.tDevice),
	})
}

// release returns a job's slot, budget and buffer.
func (t *transmission) release(j *job) {
	started := j.started
	if j.buf != nil {
		t.s.pool.put(j.buf)
		j.buf = nil
	}
	t.budget.release(j.charge)
	putJob(j)
	<-t.slots
	if started {
		t.inflight.Done()
	}
}

// errorCode maps a device error to the NBD error sent for req.
func (t *transmission) errorCode(req request, err error) uint32 {
	code := t.s.cfg.ErrorCode(err)
	if code == 0 {
		code = EIO
	}
	// The spec reserves ENOTSUP for fast-zero requests.
	if code == ENOTSUP && (req.Type != cmdWriteZeroes || req.Flags&cmdFlagFastZero == 0) {
		code = EINVAL
	}
	return code
}

// readFull reads exactly len(buf) bytes at off.
func readFull(d Device, buf []byte, off int64) error {
	n, err := d.ReadAt(buf, off)
	if n == len(buf) && (err == nil || err == io.EOF) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("read %d bytes at %d: got %d: %w", len(buf), off, n, err)
}

// writeFull writes all of buf at off.
func writeFull(d Device, buf []byte, off int64) error {
	n, err := d.WriteAt(buf, off)
	if err == nil && n != len(buf) {
		err = io.ErrShortWrite
	}
	if err != nil {
		return fmt.Errorf("write %d bytes at %d: %w", len(buf), off, err)
	}
	return nil
}

// encodeExtents encodes block status descriptors for the request [off,
// off+length) into dst (whose length bounds the count) and returns the
// bytes used. Extents are clipped to the request, adjacent extents with
// equal flags are merged, and at least one descriptor is produced.
func encodeExtents(dst []byte, exts []Extent, off, length int64) (int, error) {
	end := off + length
	pos := off
	n := 0
	var last uint32
	for _, e := range exts {
		if pos >= end {
			break
		}
		if e.Length <= 0 {
			break // device contract violation; keep what is valid
		}
		l := min(e.Length, end-pos) // ≤ length ≤ MaxUint32
		var flags uint32
		if e.Hole {
			flags |= stateHole | stateZero
		}
		if e.Zero {
			flags |= stateZero
		}
		if n > 0 && flags == last {
			prev := binary.BigEndian.Uint32(dst[n-8:])
			binary.BigEndian.PutUint32(dst[n-8:], prev+uint32(l))
		} else {
			if n+8 > len(dst) {
				break
			}
			binary.BigEndian.PutUint32(dst[n:], uint32(l))
			binary.BigEndian.PutUint32(dst[n+4:], flags)
			n += 8
			last = flags
		}
		pos += l
	}
	if n == 0 {
		return 0, fmt.Errorf("block status at %d: device returned no usable extent", off)
	}
	return n, nil
}

func isWriteCmd(typ uint16) bool {
	return typ == cmdWrite || typ == cmdTrim || typ == cmdWriteZeroes
}

func cmdName(typ uint16) string {
	switch typ {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdDisc:
		return "disconnect"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdCache:
		return "cache"
	case cmdWriteZeroes:
		return "write-zeroes"
	case cmdBlockStatus:
		return "block-status"
	default:
		return fmt.Sprintf("command-%d", typ)
	}
}

// Replies. Each builds its header in the job's scratch and sends it with
// its data as one message.

func (t *transmission) sendOK(j *job) error {
	return t.send(j, appendSimpleReply(j.hdr[:0], 0, j.req.Cookie), nil)
}

// sendError sends an error reply: a structured NBD_REPLY_TYPE_ERROR chunk
// with the message when structured replies are on, else a simple reply.
func (t *transmission) sendError(j *job, code uint32, msg string) error {
	if !t.structured {
		return t.send(j, appendSimpleReply(j.hdr[:0], code, j.req.Cookie), nil)
	}
	msg = sanitizeString(msg, maxStringLen)
	h := appendChunkHeader(j.hdr[:0], replyFlagDone, replyTypeError, j.req.Cookie, 4+2+len(msg))
	h = binary.BigEndian.AppendUint32(h, code)
	h = binary.BigEndian.AppendUint16(h, uint16(len(msg)))
	return t.send(j, h, []byte(msg))
}

// sendRead sends READ data: one NBD_REPLY_TYPE_OFFSET_DATA chunk (which
// also satisfies NBD_CMD_FLAG_DF) or a simple reply.
func (t *transmission) sendRead(j *job) error {
	data := *j.buf
	if !t.structured {
		return t.send(j, appendSimpleReply(j.hdr[:0], 0, j.req.Cookie), data)
	}
	h := appendChunkHeader(j.hdr[:0], replyFlagDone, replyTypeOffsetData, j.req.Cookie, 8+len(data))
	h = binary.BigEndian.AppendUint64(h, j.req.Offset)
	return t.send(j, h, data)
}

// sendBlockStatus sends the single NBD_REPLY_TYPE_BLOCK_STATUS chunk of
// n bytes of descriptors in j.buf.
func (t *transmission) sendBlockStatus(j *job, n int) error {
	h := appendChunkHeader(j.hdr[:0], replyFlagDone, replyTypeBlockStatus, j.req.Cookie, 4+n)
	h = binary.BigEndian.AppendUint32(h, t.metaID)
	return t.send(j, h, (*j.buf)[:n])
}

// send writes one reply message and returns once it is on the wire (or
// failed), so the caller may then reuse hdr and data. After the first
// write error every send fails and the connection is closed.
//
// Replies are group-written: a reply is queued, and if no write is under
// way its worker writes everything queued so far in one writev; replies
// queued meanwhile wait for that write to end, and one of their workers
// writes them all in the next. At queue depth 1 this is one write per
// reply, as before; under load it saves a system call (and a packet for
// the client to take in) per reply.
func (t *transmission) send(j *job, hdr, data []byte) error {
	if !j.tHeader.IsZero() && j.tDevice.IsZero() {
		j.tDevice = time.Now()
	}
	j.replied = true
	t.wmu.Lock()
	if t.werr == nil {
		t.queue = append(t.queue, hdr)
		if len(data) > 0 {
			t.queue = append(t.queue, data)
		}
		t.queued++
		for mine := t.queued; t.written < mine; {
			if t.writing {
				t.wdone.Wait()
			} else {
				t.writeQueued()
			}
		}
	}
	err := t.werr
	t.wmu.Unlock()
	if err != nil {
		t.fail(err)
	}
	return err
}

// writeQueued writes every queued reply in one go, with wmu released
// during the write. Called with wmu held and no write under way.
func (t *transmission) writeQueued() {
	bufs, upto := t.queue, t.queued
	t.queue, t.spare = t.spare[:0], nil
	t.writing = true
	t.wmu.Unlock()
	var w io.Writer = t.sc.Conn
	if t.bw != nil {
		w = t.bw
	}
	err := writeBuffers(w, bufs)
	clear(bufs) // drop the references to job buffers
	t.wmu.Lock()
	t.writing = false
	t.written = upto
	t.writes++
	t.spare = bufs[:0]
	if err != nil && t.werr == nil {
		t.werr = fmt.Errorf("write reply: %w", err)
	}
	t.wdone.Broadcast()
}

// writeBuffers writes bufs to w (with writev on a TCP or Unix socket;
// through the buffer, then flushed, for a *bufio.Writer). A panic is
// returned as an error, so the queue's waiters are never left waiting for
// a write that died.
func writeBuffers(w io.Writer, bufs net.Buffers) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: %v", errPanic, r)
		}
	}()
	if bw, ok := w.(*bufio.Writer); ok {
		for _, b := range bufs {
			if _, err := bw.Write(b); err != nil {
				return err
			}
		}
		return bw.Flush()
	}
	_, err = bufs.WriteTo(w) // consumes its copy of the slice header only
	return err
}

// fail closes the connection after a reply could not be written; the
// reader then stops.
func (t *transmission) fail(err error) {
	t.failOnce.Do(func() {
		if !t.sc.isClosing() {
			t.log.Info("nbd reply failed; closing connection", "err", err)
		}
		t.sc.Conn.Close()
	})
}

func (t *transmission) writeFailed() bool {
	t.wmu.Lock()
	defer t.wmu.Unlock()
	return t.werr != nil
}

// job is one request on its way through a worker. Jobs are pooled so the
// hot path allocates nothing per request.
type job struct {
	req     request
	buf     *[]byte // pooled payload buffer, nil if none
	charge  int64   // bytes charged to the connection budget
	started bool    // counted in inflight
	replied bool    // a reply was (at least partly) sent

	// Timestamps for Config.Observe (zero when it is nil): header read,
	// payload read (handed to a worker), worker started, device returned.
	tHeader, tQueued, tStart, tDevice time.Time

	hdr [32]byte // reply header scratch
}

var jobPool = sync.Pool{New: func() any { return new(job) }}

func getJob() *job { return jobPool.Get().(*job) }

func putJob(j *job) {
	*j = job{}
	jobPool.Put(j)
}

// budget is a counting semaphore over bytes. Only the reader acquires,
// workers release.
type budget struct {
	mu   sync.Mutex
	cond sync.Cond
	free int64
}

func newBudget(n int64) *budget {
	b := &budget{free: n}
	b.cond.L = &b.mu
	return b
}

// acquire blocks until n bytes are free and takes them. n must not exceed
// the total.
func (b *budget) acquire(n int64) {
	b.mu.Lock()
	for b.free < n {
		b.cond.Wait()
	}
	b.free -= n
	b.mu.Unlock()
}

func (b *budget) release(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	b.free += n
	b.mu.Unlock()
	b.cond.Broadcast()
}
