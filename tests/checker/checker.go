package checker

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"sort"
	"sync"
	"time"
)

// Options configure a Checker. Zero values take the defaults noted.
type Options struct {
	// Addrs are the NBD endpoints, tried in order; after a connection
	// fails (or an attach is refused) the next one is used, cycling.
	// "unix:PATH" is a Unix socket, anything else TCP host:port (with the
	// default Dial).
	Addrs []string `json:"addrs"`
	// Export is the export name sent with NBD_OPT_GO.
	Export string `json:"export"`
	// Dial opens connections; nil means DefaultDial.
	Dial DialFunc `json:"-"`
	// BlockSize is the size of every write, a multiple of SectorSize
	// (512). Default 4096.
	BlockSize int `json:"block_size"`
	// Blocks is the number of blocks in the working set. Default 256.
	Blocks int `json:"blocks"`
	// BaseOffset is the export offset of block 0; a multiple of
	// SectorSize. Block b lives at BaseOffset + b*BlockSize.
	BaseOffset uint64 `json:"base_offset"`
	// QueueDepth is the number of writes kept outstanding. Default 8.
	QueueDepth int `json:"queue_depth"`
	// FlushEvery: a FLUSH is sent after this many writes have been issued
	// on a connection since the previous one was sent. Default 32;
	// negative: never flush (durability only through FUA writes).
	FlushEvery int `json:"flush_every"`
	// FUAFraction of the writes carry NBD_CMD_FLAG_FUA (when the server
	// offers it). 0..1.
	FUAFraction float64 `json:"fua_fraction"`
	// RMWFraction of the writes are read-modify-writes, as a file system
	// updating part of a block does: the block is read first (on the
	// writing connection) and only one of its RMWSegments payload segments
	// is replaced, the others are written back as read. A stale read so
	// becomes stale data on every site, which Verify detects. 0..1.
	RMWFraction float64 `json:"rmw_fraction,omitempty"`
	// Seed seeds the workload's choices (block, FUA); 0 picks one at
	// random. The run ID is random regardless.
	Seed uint64 `json:"seed"`
	// Duration bounds Run; 0 means until Writes are issued or ctx ends.
	Duration time.Duration `json:"duration"`
	// Writes bounds Run by the number of writes it issues; 0: no bound.
	Writes int64 `json:"writes"`
	// OpTimeout bounds each dial+handshake, write and flush; a request
	// that exceeds it closes the connection (and the runner moves to the
	// next address). Default 10s.
	OpTimeout time.Duration `json:"op_timeout"`
	// Backoff is the first pause after a failed attach; it doubles on
	// each consecutive failure up to MaxBackoff. Defaults 10ms and 500ms.
	Backoff    time.Duration `json:"backoff"`
	MaxBackoff time.Duration `json:"max_backoff"`
	// Logf, if set, receives one line per connection event.
	Logf func(format string, args ...any) `json:"-"`
}

const (
	defaultBlockSize  = 4096
	defaultBlocks     = 256
	defaultQueueDepth = 8
	defaultFlushEvery = 32
	defaultOpTimeout  = 10 * time.Second
	defaultBackoff    = 10 * time.Millisecond
	defaultMaxBackoff = 500 * time.Millisecond
	// keepHistory: at least this many of a block's newest writes stay in
	// the record even when older than its durable write, so a torn block
	// can be explained sector by sector.
	keepHistory = 16
	// maxConsecutiveErrors: after this many error replies in a row on one
	// connection (writes or flushes), the runner gives up on it.
	maxConsecutiveErrors = 8
	recordVersion        = 1
)

func (o *Options) normalise() error {
	if len(o.Addrs) == 0 {
		return errors.New("checker: Options.Addrs is empty")
	}
	if o.BlockSize == 0 {
		o.BlockSize = defaultBlockSize
	}
	if o.BlockSize < SectorSize || o.BlockSize%SectorSize != 0 {
		return fmt.Errorf("checker: BlockSize %d is not a positive multiple of %d", o.BlockSize, SectorSize)
	}
	if o.Blocks == 0 {
		o.Blocks = defaultBlocks
	}
	if o.Blocks < 0 {
		return fmt.Errorf("checker: Blocks %d < 0", o.Blocks)
	}
	if o.BaseOffset%SectorSize != 0 {
		return fmt.Errorf("checker: BaseOffset %d is not a multiple of %d", o.BaseOffset, SectorSize)
	}
	if o.QueueDepth <= 0 {
		o.QueueDepth = defaultQueueDepth
	}
	if o.FlushEvery == 0 {
		o.FlushEvery = defaultFlushEvery
	}
	if o.FUAFraction < 0 || o.FUAFraction > 1 {
		return fmt.Errorf("checker: FUAFraction %v outside 0..1", o.FUAFraction)
	}
	if o.RMWFraction < 0 || o.RMWFraction > 1 {
		return fmt.Errorf("checker: RMWFraction %v outside 0..1", o.RMWFraction)
	}
	if o.RMWFraction > 0 && o.BlockSize-HeaderSize-4 < RMWSegments*segTagSize {
		return fmt.Errorf("checker: BlockSize %d too small for read-modify-write segments", o.BlockSize)
	}
	if o.Seed == 0 {
		o.Seed = randomUint64()
	}
	if o.OpTimeout <= 0 {
		o.OpTimeout = defaultOpTimeout
	}
	if o.Backoff <= 0 {
		o.Backoff = defaultBackoff
	}
	if o.MaxBackoff < o.Backoff {
		o.MaxBackoff = max(defaultMaxBackoff, o.Backoff)
	}
	if o.Dial == nil {
		o.Dial = DefaultDial
	}
	return nil
}

func randomUint64() uint64 {
	var b [8]byte
	for {
		if _, err := rand.Read(b[:]); err != nil {
			panic(err)
		}
		if v := binary.LittleEndian.Uint64(b[:]); v != 0 {
			return v
		}
	}
}

// WriteState is what is known of a write.
type WriteState string

const (
	// WritePending: sent (or about to be), no answer yet.
	WritePending WriteState = "pending"
	// WriteAcked: the server replied success.
	WriteAcked WriteState = "acked"
	// WriteFailed: the server replied with an error. Maybe applied.
	WriteFailed WriteState = "failed"
	// WriteUnanswered: no reply ever came (connection lost, timeout,
	// cancellation). Maybe applied.
	WriteUnanswered WriteState = "unanswered"
)

// WriteRecord is one write the checker issued.
type WriteRecord struct {
	Seq     uint64     `json:"seq"` // per block, 1, 2, 3...
	ID      uint64     `json:"id"`  // unique within the run
	Writer  uint32     `json:"writer"`
	Session uint32     `json:"session"`
	FUA     bool       `json:"fua,omitempty"`
	State   WriteState `json:"state"`
	Err     string     `json:"err,omitempty"`
	// A read-modify-write: Segs is the seq each payload segment carries
	// (what the read returned, one segment replaced by this write's seq);
	// Base the seq the read returned (0: zeros); Must, per segment, the
	// oldest seq a correct read could have supplied: the segments of the
	// write that was durable when the read began, and what the base write
	// itself had to carry. A segment below Must is data a stale read
	// brought back.
	Segs []uint64 `json:"segs,omitempty"`
	Base uint64   `json:"base,omitempty"`
	Must []uint64 `json:"must,omitempty"`
}

// segsOf is the segment map of write w: its Segs, or every segment its
// own seq for a plain write.
func segsOf(w *WriteRecord) []uint64 {
	if w.Segs != nil {
		return w.Segs
	}
	m := make([]uint64, RMWSegments)
	for i := range m {
		m[i] = w.Seq
	}
	return m
}

// BlockRecord is everything the checker knows of one block.
type BlockRecord struct {
	Block   uint64 `json:"block"`
	LastSeq uint64 `json:"last_seq"` // newest seq issued
	Acked   uint64 `json:"acked"`    // newest seq acknowledged
	Durable uint64 `json:"durable"`  // newest seq covered by a successful FLUSH or FUA ack
	// Writes holds consecutive seqs up to LastSeq; older ones (below both
	// Durable and the newest keepHistory) are dropped.
	Writes []WriteRecord `json:"writes,omitempty"`
}

// FlushRecord is one FLUSH on the timeline.
type FlushRecord struct {
	ID      int       `json:"id"`
	Session int       `json:"session"`
	Addr    string    `json:"addr"`
	Sent    time.Time `json:"sent"`            // taken just before the request was queued
	Done    time.Time `json:"done,omitzero"`   // reply (or failure) time; zero while in flight
	OK      bool      `json:"ok"`              // acknowledged without error
	Err     string    `json:"err,omitempty"`   // why it failed
	Covered int       `json:"covered"`         // writes it made durable if OK
	Final   bool      `json:"final,omitempty"` // the flush at the end of a Run
}

// SessionRecord is one attached connection.
type SessionRecord struct {
	N      int       `json:"n"`
	Addr   string    `json:"addr"`
	Start  time.Time `json:"start"`
	End    time.Time `json:"end,omitzero"`
	Size   uint64    `json:"size"`
	Flags  uint16    `json:"flags"`
	Acked  int64     `json:"acked"`
	Reason string    `json:"reason,omitempty"` // why it ended
}

// AttemptRecord is a failed dial or handshake.
type AttemptRecord struct {
	Addr string    `json:"addr"`
	Time time.Time `json:"time"`
	Err  string    `json:"err"`
}

// Stats summarise a run so far.
type Stats struct {
	Started          time.Time     `json:"started,omitzero"`
	Elapsed          time.Duration `json:"elapsed"`
	Running          bool          `json:"running"`
	WritesIssued     int64         `json:"writes_issued"`
	WritesAcked      int64         `json:"writes_acked"`
	WritesFailed     int64         `json:"writes_failed"`     // error reply
	WritesUnanswered int64         `json:"writes_unanswered"` // no reply
	WritesInFlight   int64         `json:"writes_in_flight"`
	FUAWrites        int64         `json:"fua_writes"`
	// RMWWrites were read-modify-writes; RMWStaleReads of their reads
	// returned something older than a write whose flush had been
	// acknowledged before the read began (a violation); RMWBadReads
	// returned content that is not one write of the block (torn or
	// foreign; the write was then a plain one).
	RMWWrites      int64     `json:"rmw_writes,omitempty"`
	RMWStaleReads  int64     `json:"rmw_stale_reads,omitempty"`
	RMWBadReads    int64     `json:"rmw_bad_reads,omitempty"`
	Flushes        int64     `json:"flushes"`
	FlushesOK      int64     `json:"flushes_ok"`
	FlushesFailed  int64     `json:"flushes_failed"`
	Sessions       int64     `json:"sessions"`   // successful attaches
	Reconnects     int64     `json:"reconnects"` // Sessions - 1
	AttachFailures int64     `json:"attach_failures"`
	BlocksWritten  int64     `json:"blocks_written"` // blocks with at least one write issued
	BlocksDurable  int64     `json:"blocks_durable"` // blocks with a durable write
	FirstFlushAck  time.Time `json:"first_flush_ack,omitzero"`
	LastFlushAck   time.Time `json:"last_flush_ack,omitzero"`
	// LongestStall is the longest interval between two consecutive
	// successful flush acknowledgements, from LongestStallFrom to
	// LongestStallTo.
	LongestStall     time.Duration `json:"longest_stall"`
	LongestStallFrom time.Time     `json:"longest_stall_from,omitzero"`
	LongestStallTo   time.Time     `json:"longest_stall_to,omitzero"`
	CurrentAddr      string        `json:"current_addr,omitempty"`
}

// ErrUnsuitable is wrapped by Run's error when an export cannot host the
// workload (too small, no flush, incompatible block size constraints);
// retrying elsewhere would not help.
var ErrUnsuitable = errors.New("checker: export unsuitable")

// ErrRunning is returned by Verify while Run is in progress.
var ErrRunning = errors.New("checker: Run is in progress")

type blockState struct {
	lastSeq, acked, durable uint64
	inflight                bool
	writes                  []WriteRecord
}

func (b *blockState) find(seq uint64) *WriteRecord {
	if len(b.writes) == 0 || seq < b.writes[0].Seq {
		return nil
	}
	i := seq - b.writes[0].Seq
	if i >= uint64(len(b.writes)) {
		return nil
	}
	return &b.writes[i]
}

// Checker runs the workload and holds its record. Its methods are safe for
// concurrent use (Verify refuses to run while Run does).
type Checker struct {
	opts  Options
	runID uint64

	mu       sync.Mutex
	cond     *sync.Cond
	rng      *mrand.Rand
	blocks   []blockState
	nextID   uint64
	flushes  []FlushRecord
	sessions []SessionRecord
	attempts []AttemptRecord
	stats    Stats
	// readProblems: the first stale or bad reads of read-modify-writes.
	readProblems []ReadProblem
	ended        time.Time
	running      bool
	stopRun      context.CancelFunc
	runLimit     int64 // WritesIssued at which the current Run stops
}

// New validates opts and returns a Checker with a fresh random run ID.
func New(opts Options) (*Checker, error) {
	if err := opts.normalise(); err != nil {
		return nil, err
	}
	c := &Checker{
		opts:   opts,
		runID:  randomUint64(),
		blocks: make([]blockState, opts.Blocks),
		rng:    mrand.New(mrand.NewPCG(opts.Seed, opts.Seed^0x5deece66d)),
	}
	c.cond = sync.NewCond(&c.mu)
	return c, nil
}

// RunID is the random identifier stamped into every block of this run.
func (c *Checker) RunID() uint64 { return c.runID }

// Options returns the normalised options.
func (c *Checker) Options() Options { return c.opts }

func (c *Checker) logf(format string, args ...any) {
	if c.opts.Logf != nil {
		c.opts.Logf(format, args...)
	}
}

func (c *Checker) blockOffset(blk uint64) uint64 {
	return c.opts.BaseOffset + blk*uint64(c.opts.BlockSize)
}

// Run drives the workload: QueueDepth writers keep writing random blocks of
// the working set (never two writes to one block in flight at once), a
// FLUSH follows every FlushEvery writes, and connection failures move to
// the next address after a backoff. It returns nil when Duration elapsed
// or Writes were issued (after the outstanding writes were answered and a
// final FLUSH), ctx.Err() when ctx ended first (outstanding writes become
// unanswered), or an error wrapping ErrUnsuitable. Run may be called again
// after it returns; the record accumulates.
func (c *Checker) Run(ctx context.Context) error {
	stop, cancelStop := context.WithCancel(ctx)
	defer cancelStop()
	if c.opts.Duration > 0 {
		var cancel context.CancelFunc
		stop, cancel = context.WithTimeout(stop, c.opts.Duration)
		defer cancel()
	}
	c.mu.Lock()
	if c.running {
		c.mu.Unlock()
		return errors.New("checker: Run is already running")
	}
	c.running = true
	if c.stats.Started.IsZero() {
		c.stats.Started = time.Now()
	}
	c.stopRun = cancelStop
	c.runLimit = 0
	if c.opts.Writes > 0 {
		c.runLimit = c.stats.WritesIssued + c.opts.Writes
	}
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.running = false
		c.stopRun = nil
		c.ended = time.Now()
		c.stats.CurrentAddr = ""
		c.mu.Unlock()
	}()

	next := 0
	backoff := c.opts.Backoff
	pause := func() {
		sleepCtx(stop, backoff)
		backoff = min(2*backoff, c.opts.MaxBackoff)
	}
	for stop.Err() == nil {
		addr := c.opts.Addrs[next%len(c.opts.Addrs)]
		cl, err := c.attach(stop, addr)
		if err != nil {
			if errors.Is(err, ErrUnsuitable) {
				return err
			}
			if stop.Err() != nil {
				break
			}
			c.mu.Lock()
			c.stats.AttachFailures++
			c.attempts = append(c.attempts, AttemptRecord{Addr: addr, Time: time.Now(), Err: err.Error()})
			c.mu.Unlock()
			c.logf("checker: attach %s failed: %v", addr, err)
			next++
			pause()
			continue
		}
		backoff = c.opts.Backoff
		acked := c.runSession(ctx, stop, cl, addr)
		if stop.Err() == nil {
			next++
			if acked == 0 {
				pause()
			}
		}
	}
	return ctx.Err()
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// attach connects to addr and checks the export can host the workload.
func (c *Checker) attach(stop context.Context, addr string) (*Client, error) {
	dctx, cancel := context.WithTimeout(stop, c.opts.OpTimeout)
	defer cancel()
	cl, err := Dial(dctx, c.opts.Dial, addr, c.opts.Export)
	if err != nil {
		return nil, err
	}
	need := c.blockOffset(uint64(c.opts.Blocks))
	minB, _, maxP := cl.BlockSizes()
	bs := uint64(c.opts.BlockSize)
	switch {
	case cl.Size() < need:
		err = fmt.Errorf("%w: export %q at %s has %d bytes, the working set needs %d", ErrUnsuitable, c.opts.Export, addr, cl.Size(), need)
	case c.opts.FlushEvery > 0 && !cl.CanFlush():
		err = fmt.Errorf("%w: export %q at %s does not support NBD_CMD_FLUSH", ErrUnsuitable, c.opts.Export, addr)
	case minB > 0 && (bs%uint64(minB) != 0 || c.opts.BaseOffset%uint64(minB) != 0):
		err = fmt.Errorf("%w: export %q at %s has minimum block size %d", ErrUnsuitable, c.opts.Export, addr, minB)
	case maxP > 0 && uint64(maxP) < bs:
		err = fmt.Errorf("%w: export %q at %s has maximum payload %d", ErrUnsuitable, c.opts.Export, addr, maxP)
	case cl.ReadOnly():
		// Retryable: a site may serve read-only for a while.
		err = fmt.Errorf("checker: export %q at %s is read-only", c.opts.Export, addr)
	}
	if err != nil {
		cl.Close()
		return nil, err
	}
	return cl, nil
}

type blockSeq struct{ blk, seq uint64 }

// session is one attached connection. Fields below cl are guarded by
// Checker.mu.
type session struct {
	n        int
	rec      int // index in Checker.sessions
	addr     string
	cl       *Client
	fua      bool
	flushReq chan struct{}

	acked      []blockSeq // acks received and not covered by a sent flush
	sinceFlush int        // writes issued since the last flush was sent
	flushing   bool
	consecErrs int
	ackCount   int64
	abandoned  error
}

func (s *session) ended() bool { return s.abandoned != nil || s.cl.Err() != nil }

// runSession runs writers and the flusher on cl until the connection is
// lost or stop ends; on stop it lets outstanding writes finish and sends a
// final flush. It returns the number of writes acknowledged.
func (c *Checker) runSession(ctx, stop context.Context, cl *Client, addr string) int64 {
	s := &session{addr: addr, cl: cl, fua: cl.CanFUA(), flushReq: make(chan struct{}, 1)}
	c.mu.Lock()
	s.n = len(c.sessions) + 1
	s.rec = len(c.sessions)
	c.sessions = append(c.sessions, SessionRecord{N: s.n, Addr: addr, Start: time.Now(), Size: cl.Size(), Flags: cl.TransmissionFlags()})
	c.stats.Sessions++
	if s.n > 1 {
		c.stats.Reconnects++
	}
	c.stats.CurrentAddr = addr
	c.mu.Unlock()
	c.logf("checker: session %d attached to %s (size %d, flags %#x)", s.n, addr, cl.Size(), cl.TransmissionFlags())

	// Writers waiting for a free block must wake when the run stops or
	// the connection dies.
	unhookStop := context.AfterFunc(stop, c.broadcast)
	defer unhookStop()
	sessDone := make(chan struct{})
	go func() {
		select {
		case <-cl.Done():
			c.broadcast()
		case <-sessDone:
		}
	}()

	quit := make(chan struct{})
	flusherDone := make(chan struct{})
	go func() {
		defer close(flusherDone)
		for {
			select {
			case <-quit:
				return
			case <-s.flushReq:
				c.flushOnce(ctx, s, false)
			}
		}
	}()
	var wg sync.WaitGroup
	for slot := 0; slot < c.opts.QueueDepth; slot++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.writer(ctx, stop, s, uint32(slot))
		}()
	}
	wg.Wait()
	close(quit)
	<-flusherDone
	if stop.Err() != nil && ctx.Err() == nil && c.opts.FlushEvery > 0 {
		c.mu.Lock()
		ok := !s.ended()
		c.mu.Unlock()
		if ok {
			c.flushOnce(ctx, s, true)
		}
	}
	close(sessDone)
	cl.Close()

	c.mu.Lock()
	defer c.mu.Unlock()
	reason := "run stopped"
	switch {
	case ctx.Err() != nil:
		reason = "context ended: " + ctx.Err().Error()
	case s.abandoned != nil:
		reason = s.abandoned.Error()
	case stop.Err() == nil:
		if err := cl.Err(); err != nil {
			reason = err.Error()
		}
	}
	rec := &c.sessions[s.rec]
	rec.End = time.Now()
	rec.Acked = s.ackCount
	rec.Reason = reason
	c.logf("checker: session %d on %s ended after %d acks: %s", s.n, addr, s.ackCount, reason)
	return s.ackCount
}

func (c *Checker) broadcast() {
	c.mu.Lock()
	c.cond.Broadcast()
	c.mu.Unlock()
}

func (c *Checker) writer(ctx, stop context.Context, s *session, slot uint32) {
	buf := make([]byte, c.opts.BlockSize)
	for {
		blk, w, rmw, ok := c.issue(stop, s, slot)
		if !ok {
			return
		}
		if rmw != nil {
			c.readModify(ctx, s, blk, &w, rmw, buf)
		}
		encodeBlock(buf, c.runID, blk, &w)
		opCtx, cancel := context.WithTimeout(ctx, c.opts.OpTimeout)
		err := s.cl.Write(opCtx, c.blockOffset(blk), buf, w.FUA)
		cancel()
		if !c.complete(s, blk, w.Seq, err) {
			return
		}
	}
}

// issue picks a block with no write in flight, allocates the next write to
// it and records it as pending. It waits while every block is busy, and
// reports false once the run stops or the session ends.
func (c *Checker) issue(stop context.Context, s *session, slot uint32) (uint64, WriteRecord, *rmwPlan, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var blk uint64
	for {
		if stop.Err() != nil || s.ended() {
			return 0, WriteRecord{}, nil, false
		}
		if c.runLimit > 0 && c.stats.WritesIssued >= c.runLimit {
			c.stopRun()
			return 0, WriteRecord{}, nil, false
		}
		if b, ok := c.pickFree(); ok {
			blk = b
			break
		}
		c.cond.Wait()
	}
	b := &c.blocks[blk]
	var plan *rmwPlan
	if c.opts.RMWFraction > 0 && c.rng.Float64() < c.opts.RMWFraction {
		plan = c.planRMW(b)
	}
	b.inflight = true
	b.lastSeq++
	if b.lastSeq == 1 {
		c.stats.BlocksWritten++
	}
	c.nextID++
	w := WriteRecord{
		Seq:     b.lastSeq,
		ID:      c.nextID,
		Writer:  slot,
		Session: uint32(s.n),
		FUA:     s.fua && c.opts.FUAFraction > 0 && c.rng.Float64() < c.opts.FUAFraction,
		State:   WritePending,
	}
	b.writes = append(b.writes, w)
	c.stats.WritesIssued++
	c.stats.WritesInFlight++
	if w.FUA {
		c.stats.FUAWrites++
	}
	s.sinceFlush++
	c.maybeRequestFlush(s)
	return blk, w, plan, true
}

func (c *Checker) maybeRequestFlush(s *session) {
	if c.opts.FlushEvery > 0 && s.sinceFlush >= c.opts.FlushEvery && !s.flushing {
		select {
		case s.flushReq <- struct{}{}:
		default:
		}
	}
}

func (c *Checker) pickFree() (uint64, bool) {
	n := len(c.blocks)
	if n == 0 {
		return 0, false
	}
	start := c.rng.IntN(n)
	for i := 0; i < n; i++ {
		j := (start + i) % n
		if !c.blocks[j].inflight {
			return uint64(j), true
		}
	}
	return 0, false
}

// complete records the outcome of a write; false tells the writer to stop
// using the session.
func (c *Checker) complete(s *session, blk, seq uint64, err error) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.cond.Broadcast()
	b := &c.blocks[blk]
	b.inflight = false
	c.stats.WritesInFlight--
	w := b.find(seq)
	if w == nil {
		// Cannot happen: a pending write is its block's newest and is
		// never pruned. Keep the record honest anyway.
		w = &WriteRecord{}
	}
	var se *ServerError
	switch {
	case err == nil:
		w.State = WriteAcked
		c.stats.WritesAcked++
		s.ackCount++
		s.consecErrs = 0
		if seq > b.acked {
			b.acked = seq
		}
		if w.FUA {
			c.markDurable(blk, seq)
		} else {
			s.acked = append(s.acked, blockSeq{blk, seq})
		}
		return true
	case errors.As(err, &se):
		w.State = WriteFailed
		w.Err = err.Error()
		c.stats.WritesFailed++
		s.consecErrs++
	default:
		w.State = WriteUnanswered
		w.Err = err.Error()
		c.stats.WritesUnanswered++
	}
	if s.cl.Err() != nil || s.abandoned != nil {
		return false
	}
	if se == nil {
		// A local failure (bad request, unsupported) on a live
		// connection: nothing better will happen on it.
		s.abandoned = fmt.Errorf("write failed: %w", err)
		return false
	}
	if s.consecErrs >= maxConsecutiveErrors {
		s.abandoned = fmt.Errorf("%d consecutive error replies, last: %w", s.consecErrs, err)
		return false
	}
	return true
}

// markDurable records that write seq of blk reached permanent storage.
func (c *Checker) markDurable(blk, seq uint64) {
	b := &c.blocks[blk]
	if seq <= b.durable {
		return
	}
	if b.durable == 0 {
		c.stats.BlocksDurable++
	}
	b.durable = seq
	// Drop records no verification can accept, keeping keepHistory.
	if len(b.writes) > 2*keepHistory {
		keepFrom := b.durable
		if b.lastSeq >= keepHistory && b.lastSeq-keepHistory+1 < keepFrom {
			keepFrom = b.lastSeq - keepHistory + 1
		}
		if drop := keepFrom - b.writes[0].Seq; keepFrom > b.writes[0].Seq && drop < uint64(len(b.writes)) {
			b.writes = append([]WriteRecord(nil), b.writes[drop:]...)
		}
	}
}

// flushOnce sends one FLUSH covering the acks received so far on s.
func (c *Checker) flushOnce(ctx context.Context, s *session, final bool) {
	c.mu.Lock()
	if s.ended() || s.flushing {
		c.mu.Unlock()
		return
	}
	cover := s.acked
	s.acked = nil
	s.sinceFlush = 0
	s.flushing = true
	id := len(c.flushes)
	c.flushes = append(c.flushes, FlushRecord{ID: id + 1, Session: s.n, Addr: s.addr, Sent: time.Now(), Covered: len(cover), Final: final})
	c.stats.Flushes++
	c.mu.Unlock()

	opCtx, cancel := context.WithTimeout(ctx, c.opts.OpTimeout)
	err := s.cl.Flush(opCtx)
	cancel()
	now := time.Now()

	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.cond.Broadcast()
	s.flushing = false
	f := &c.flushes[id]
	f.Done = now
	if err == nil {
		f.OK = true
		c.stats.FlushesOK++
		s.consecErrs = 0
		for _, bs := range cover {
			c.markDurable(bs.blk, bs.seq)
		}
		if last := c.stats.LastFlushAck; !last.IsZero() {
			if d := now.Sub(last); d > c.stats.LongestStall {
				c.stats.LongestStall = d
				c.stats.LongestStallFrom = last
				c.stats.LongestStallTo = now
			}
		} else {
			c.stats.FirstFlushAck = now
		}
		c.stats.LastFlushAck = now
	} else {
		f.Err = err.Error()
		f.Covered = 0
		c.stats.FlushesFailed++
		if s.cl.Err() == nil {
			// The connection lives on, so the next flush on it covers
			// these writes too (their replies precede it).
			s.acked = append(cover, s.acked...)
			s.consecErrs++
			var se *ServerError
			if !errors.As(err, &se) {
				s.abandoned = fmt.Errorf("flush failed: %w", err)
			} else if s.consecErrs >= maxConsecutiveErrors {
				s.abandoned = fmt.Errorf("%d consecutive error replies, last: %w", s.consecErrs, err)
			}
		}
	}
	if !final {
		c.maybeRequestFlush(s)
	}
}

// Snapshot returns the statistics so far; safe to call while Run runs.
func (c *Checker) Snapshot() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.snapshotLocked()
}

func (c *Checker) snapshotLocked() Stats {
	st := c.stats
	st.Running = c.running
	if !st.Started.IsZero() {
		if c.running || c.ended.IsZero() {
			st.Elapsed = time.Since(st.Started)
		} else {
			st.Elapsed = c.ended.Sub(st.Started)
		}
	}
	return st
}

// StallAround measures failover time: the time from t to the
// acknowledgement of the first successful FLUSH that was sent after t.
// ok is false if no such flush exists (yet).
func (c *Checker) StallAround(t time.Time) (d time.Duration, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	i := sort.Search(len(c.flushes), func(i int) bool { return c.flushes[i].Sent.After(t) })
	var best time.Time
	for ; i < len(c.flushes); i++ {
		f := &c.flushes[i]
		if f.OK && (best.IsZero() || f.Done.Before(best)) {
			best = f.Done
		}
	}
	if best.IsZero() {
		return 0, false
	}
	return best.Sub(t), true
}

// Flushes returns a copy of the flush timeline.
func (c *Checker) Flushes() []FlushRecord {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]FlushRecord(nil), c.flushes...)
}

// Sessions returns a copy of the connection timeline.
func (c *Checker) Sessions() []SessionRecord {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]SessionRecord(nil), c.sessions...)
}

// Connect dials the addresses in order and returns the first client that
// attaches (for Verify, typically).
func (c *Checker) Connect(ctx context.Context) (*Client, error) {
	var errs []error
	for _, addr := range c.opts.Addrs {
		dctx, cancel := context.WithTimeout(ctx, c.opts.OpTimeout)
		cl, err := Dial(dctx, c.opts.Dial, addr, c.opts.Export)
		cancel()
		if err == nil {
			return cl, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	return nil, errors.Join(errs...)
}
