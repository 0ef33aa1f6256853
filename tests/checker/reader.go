package checker

import (
	"context"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"sync"
	"time"
)

// Reads while things break. A Reader is a second client of the same run:
// while Run writes (and faults happen), it attaches again and again at the
// sites its Targets name and reads blocks of the working set, checking each
// read against the record at once, with no wait for catch-up. The rule: a
// read must return a write at least as new as every write of that block
// whose durability (FLUSH or FUA acknowledgement) the checker had learnt
// before the read began. An acknowledged but unflushed write may be lost
// with its site and a write in flight may be seen or not, so neither sets
// the floor. For a read-only attach (VOLUME@ro), which promises data at
// least as new as what was committed when the attach began, the floor of
// every read of the session is what was durable when the attach began.

// ReadTarget is one place a Reader can attach.
type ReadTarget struct {
	Addr   string `json:"addr"`
	Export string `json:"export"`
	// FloorAtAttach: the floor of the session's reads is what was durable
	// when the attach began (read-only attaches); otherwise what was
	// durable when each read began (a read-write attach at the site
	// holding the lease).
	FloorAtAttach bool `json:"floor_at_attach,omitempty"`
}

// ReaderOptions configure a Reader. Zero values take the defaults noted.
type ReaderOptions struct {
	// Name labels the reader in logs and problems.
	Name string
	// Targets is asked before every attach; the reader goes round the
	// targets it returns (an empty answer: wait and ask again).
	Targets func() []ReadTarget
	// ReadsPerSession: after this many reads the reader detaches and
	// attaches again (the next target), so that fresh attaches are read
	// at once. Default 64.
	ReadsPerSession int
	// QueueDepth concurrent reads per session. Default 4.
	QueueDepth int
	// OpTimeout bounds each dial+handshake and each read. Default: the
	// checker's OpTimeout.
	OpTimeout time.Duration
	// Pause between sessions and after a failure. Default 50ms.
	Pause time.Duration
	// MaxProblems kept (all are counted). Default 50.
	MaxProblems int
}

// ReadProblem is one read that broke the rule (or could not be judged as a
// write of the block).
type ReadProblem struct {
	Time    time.Time `json:"time"`
	Reader  string    `json:"reader"`
	Addr    string    `json:"addr"`
	Export  string    `json:"export"`
	Session int       `json:"session"` // the reader's session number (0: a read-modify-write of the writer)
	Nth     int       `json:"nth"`     // the read's number within its session, 1-based
	Block   uint64    `json:"block"`
	Floor   uint64    `json:"floor"` // oldest acceptable seq
	Found   uint64    `json:"found"` // the seq read (0: zeros)
	Class   Class     `json:"class"`
	Detail  string    `json:"detail"`
}

func (p ReadProblem) String() string {
	return fmt.Sprintf("%s: read %d of session %d at %s (%s), block %d: %s: %s [floor %d, found %d]",
		p.Reader, p.Nth, p.Session, p.Addr, p.Export, p.Block, p.Class, p.Detail, p.Floor, p.Found)
}

// ReadStats summarise a Reader.
type ReadStats struct {
	Sessions       int64 `json:"sessions"`
	AttachFailures int64 `json:"attach_failures"`
	Reads          int64 `json:"reads"`       // reads answered and judged
	ReadErrors     int64 `json:"read_errors"` // error replies, lost connections, timeouts
	// Checked reads had a floor above zero: a durable write existed that
	// they had to return (or a newer one). FirstChecked of them were among
	// the first QueueDepth reads of their session.
	Checked      int64 `json:"checked"`
	FirstChecked int64 `json:"first_checked"`
	// Stale reads returned something older than the floor; Torn content
	// that is no single write of the block although none was in flight;
	// Foreign a block of another block, run or an unissued seq.
	Stale   int64 `json:"stale"`
	Torn    int64 `json:"torn"`
	Foreign int64 `json:"foreign"`
	// InFlightTorn: torn content of a block with a write in flight
	// during the read (allowed).
	InFlightTorn int64         `json:"in_flight_torn"`
	Problems     []ReadProblem `json:"problems,omitempty"`
}

// Violations is the number of reads that broke the rule.
func (s ReadStats) Violations() int64 { return s.Stale + s.Torn + s.Foreign }

// Err is nil when no read broke the rule.
func (s ReadStats) Err() error {
	if s.Violations() == 0 {
		return nil
	}
	msg := fmt.Sprintf("%d bad reads (%d stale, %d torn, %d foreign) of %d (%d with a durable floor)",
		s.Violations(), s.Stale, s.Torn, s.Foreign, s.Reads, s.Checked)
	for _, p := range s.Problems {
		msg += "\n  " + p.String()
	}
	return errors.New(msg)
}

// Reader reads a Checker's working set while it runs; see NewReader.
type Reader struct {
	c    *Checker
	opts ReaderOptions

	rng *mrand.Rand // guarded by c.mu

	mu    sync.Mutex
	stats ReadStats
}

// NewReader returns a reader of c's run; start it with Run.
func (c *Checker) NewReader(opts ReaderOptions) *Reader {
	if opts.Name == "" {
		opts.Name = "reader"
	}
	if opts.ReadsPerSession <= 0 {
		opts.ReadsPerSession = 64
	}
	if opts.QueueDepth <= 0 {
		opts.QueueDepth = 4
	}
	if opts.OpTimeout <= 0 {
		opts.OpTimeout = c.opts.OpTimeout
	}
	if opts.Pause <= 0 {
		opts.Pause = 50 * time.Millisecond
	}
	if opts.MaxProblems <= 0 {
		opts.MaxProblems = 50
	}
	seed := randomUint64()
	return &Reader{c: c, opts: opts, rng: mrand.New(mrand.NewPCG(seed, seed^0x2ead))}
}

// Stats returns the reader's figures so far (problems included).
func (r *Reader) Stats() ReadStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.stats
	s.Problems = append([]ReadProblem(nil), r.stats.Problems...)
	return s
}

// Run reads until ctx ends, then returns nil.
func (r *Reader) Run(ctx context.Context) error {
	next := 0
	session := 0
	for ctx.Err() == nil {
		targets := r.opts.Targets()
		if len(targets) == 0 {
			sleepCtx(ctx, r.opts.Pause)
			continue
		}
		tg := targets[next%len(targets)]
		next++
		session++
		r.session(ctx, tg, session)
		sleepCtx(ctx, r.opts.Pause)
	}
	return nil
}

// session attaches at tg and does ReadsPerSession reads.
func (r *Reader) session(ctx context.Context, tg ReadTarget, n int) {
	c := r.c
	var attachFloor []uint64
	if tg.FloorAtAttach {
		c.mu.Lock()
		attachFloor = make([]uint64, len(c.blocks))
		for i := range c.blocks {
			attachFloor[i] = c.blocks[i].durable
		}
		c.mu.Unlock()
	}
	dctx, cancel := context.WithTimeout(ctx, r.opts.OpTimeout)
	cl, err := Dial(dctx, c.opts.Dial, tg.Addr, tg.Export)
	cancel()
	if err != nil {
		if ctx.Err() == nil {
			r.mu.Lock()
			r.stats.AttachFailures++
			r.mu.Unlock()
			c.logf("checker: %s: attach %s at %s failed: %v", r.opts.Name, tg.Export, tg.Addr, err)
		}
		return
	}
	defer cl.Close()
	if cl.Size() < c.blockOffset(uint64(c.opts.Blocks)) {
		r.mu.Lock()
		r.stats.AttachFailures++
		r.mu.Unlock()
		return
	}
	r.mu.Lock()
	r.stats.Sessions++
	r.mu.Unlock()

	var mu sync.Mutex
	issued := 0
	var wg sync.WaitGroup
	for range r.opts.QueueDepth {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, c.opts.BlockSize)
			for {
				mu.Lock()
				if issued >= r.opts.ReadsPerSession || ctx.Err() != nil || cl.Err() != nil {
					mu.Unlock()
					return
				}
				issued++
				nth := issued
				mu.Unlock()
				if !r.readOne(ctx, cl, tg, n, nth, attachFloor, buf) {
					return
				}
			}
		}()
	}
	wg.Wait()
}

// readOne reads one block and judges it; false ends the session.
func (r *Reader) readOne(ctx context.Context, cl *Client, tg ReadTarget, session, nth int, attachFloor []uint64, buf []byte) bool {
	c := r.c
	c.mu.Lock()
	blk, ok := c.pickWritten(r.rng)
	if !ok {
		c.mu.Unlock()
		sleepCtx(ctx, r.opts.Pause)
		return true
	}
	b := &c.blocks[blk]
	floor := b.durable
	if attachFloor != nil {
		floor = attachFloor[blk]
	}
	startSeq, startInflight := b.lastSeq, b.inflight
	c.mu.Unlock()

	rctx, cancel := context.WithTimeout(ctx, r.opts.OpTimeout)
	err := cl.Read(rctx, c.blockOffset(blk), buf)
	cancel()
	if err != nil {
		if ctx.Err() == nil {
			r.mu.Lock()
			r.stats.ReadErrors++
			r.mu.Unlock()
		}
		return false
	}
	c.mu.Lock()
	overlapped := startInflight || b.inflight || b.lastSeq != startSeq
	lastSeq := b.lastSeq
	c.mu.Unlock()

	class, found, detail := c.judgeRead(blk, buf, floor, lastSeq)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stats.Reads++
	if floor > 0 {
		r.stats.Checked++
		if nth <= r.opts.QueueDepth {
			r.stats.FirstChecked++
		}
	}
	switch {
	case class == OK:
		return true
	case class == Torn && overlapped:
		r.stats.InFlightTorn++
		return true
	case class == Stale:
		r.stats.Stale++
	case class == Torn:
		r.stats.Torn++
	default:
		r.stats.Foreign++
	}
	if len(r.stats.Problems) < r.opts.MaxProblems {
		r.stats.Problems = append(r.stats.Problems, ReadProblem{Time: time.Now(), Reader: r.opts.Name, Addr: tg.Addr, Export: tg.Export,
			Session: session, Nth: nth, Block: blk, Floor: floor, Found: found, Class: class, Detail: detail})
		// Only the kept ones are logged: a stale copy yields thousands.
		c.logf("checker: %s: bad read: block %d at %s (%s), read %d of session %d: %s: %s", r.opts.Name, blk, tg.Addr, tg.Export, nth, session, class, detail)
	}
	return true
}

// pickWritten picks a block with a write issued, preferring one with a
// durable write (whose reads are checked). Called with c.mu held.
func (c *Checker) pickWritten(rng *mrand.Rand) (uint64, bool) {
	n := len(c.blocks)
	if n == 0 || c.stats.BlocksWritten == 0 {
		return 0, false
	}
	fallback, have := uint64(0), false
	for range 32 {
		i := rng.IntN(n)
		b := &c.blocks[i]
		if b.durable > 0 {
			return uint64(i), true
		}
		if b.lastSeq > 0 && !have {
			fallback, have = uint64(i), true
		}
	}
	return fallback, have
}

// judgeRead classifies data read from block blk against floor: OK, Stale
// (a write of the block, or zeros, older than floor), Torn (no single
// write) or Foreign (another block, run, or a seq never issued).
func (c *Checker) judgeRead(blk uint64, data []byte, floor, lastSeq uint64) (Class, uint64, string) {
	if allZero(data) {
		if floor > 0 {
			return Stale, 0, fmt.Sprintf("read zeros although seq %d was durable before the read began", floor)
		}
		return OK, 0, ""
	}
	h, magic := ParseHeader(data)
	if !magic {
		return Torn, 0, "unrecognisable content"
	}
	if !h.ChecksumOK {
		return Torn, h.Seq, fmt.Sprintf("checksum mismatch (header claims seq %d)", h.Seq)
	}
	switch {
	case h.Run != c.runID:
		return Foreign, h.Seq, fmt.Sprintf("a block of another run (%016x)", h.Run)
	case h.Block != blk:
		return Foreign, h.Seq, fmt.Sprintf("holds block %d's write seq %d", h.Block, h.Seq)
	case h.Seq == 0 || h.Seq > lastSeq:
		return Foreign, h.Seq, fmt.Sprintf("holds seq %d, never issued for this block", h.Seq)
	case h.Seq < floor:
		return Stale, h.Seq, fmt.Sprintf("read seq %d although seq %d was durable before the read began", h.Seq, floor)
	}
	return OK, h.Seq, ""
}
