package checker

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"
)

// Class is the verdict on one block.
type Class string

const (
	// OK: zeros where no write is durable yet, or exactly one write the
	// checker issued to this block whose seq is at least the floor.
	OK Class = "OK"
	// Missing: zeros, or content that is neither a block nor a mixture of
	// this block's writes, although a durable write exists.
	Missing Class = "MISSING"
	// Stale: a valid write of this block, older than the floor.
	Stale Class = "STALE"
	// Torn: a block header whose checksum fails, or a mixture of sectors
	// from different writes of this block (and zeros).
	Torn Class = "TORN"
	// Foreign: a valid block, but for another block number, another run,
	// or a write this checker never issued.
	Foreign Class = "FOREIGN"
	// Corrupt: unrecognisable non-zero content where no write is durable
	// yet, or a valid header and checksum over a payload that differs from
	// what that write carried.
	Corrupt Class = "CORRUPT"
	// Unreadable: the read itself failed.
	Unreadable Class = "UNREADABLE"
)

// FloorRule chooses, per block, the oldest write Verify accepts.
type FloorRule int

const (
	// FloorDurable (default): the newest write covered by a successful
	// FLUSH or a FUA acknowledgement. What NBD promises across a crash.
	FloorDurable FloorRule = iota
	// FloorAcked: the newest acknowledged write, flushed or not. For
	// checks where nothing may be lost (no crash happened, or the server
	// promises that an acknowledged write is durable).
	FloorAcked
)

// BlockReader reads from an export; *Client is one.
type BlockReader interface {
	Read(ctx context.Context, off uint64, buf []byte) error
}

// VerifyOptions tune Verify.
type VerifyOptions struct {
	Floor FloorRule
	// Unwritten: also read up to this many blocks that were never
	// written: first those of the working set, then the blocks after it
	// (when the reader has a Size() uint64 method, as *Client does).
	// They must read as zeros.
	Unwritten int
	// MaxProblems listed in the report (all are counted). Default 20.
	MaxProblems int
	// QueueDepth concurrent reads. Default 8.
	QueueDepth int
	// OpTimeout bounds each read. Default: the checker's OpTimeout.
	OpTimeout time.Duration
}

// Problem is one block that failed verification.
type Problem struct {
	Block      uint64  `json:"block"`
	Offset     uint64  `json:"offset"`
	Class      Class   `json:"class"`
	Floor      uint64  `json:"floor"`       // oldest acceptable seq (0: zeros acceptable)
	LastIssued uint64  `json:"last_issued"` // newest seq issued
	Acked      uint64  `json:"acked"`       // newest seq acknowledged
	Found      *Header `json:"found,omitempty"`
	Detail     string  `json:"detail"`
}

func (p Problem) String() string {
	return fmt.Sprintf("block %d (offset %d): %s: %s [floor %d, acked %d, last issued %d]",
		p.Block, p.Offset, p.Class, p.Detail, p.Floor, p.Acked, p.LastIssued)
}

// Report is the outcome of Verify.
type Report struct {
	// Checked blocks in all; Written of them had at least one write
	// issued, Durable had a durable write (floor above zero under
	// FloorDurable), Unwritten were never written.
	Checked   int `json:"checked"`
	Written   int `json:"written"`
	Durable   int `json:"durable"`
	Unwritten int `json:"unwritten"`
	// OKData blocks held an acceptable write, OKZero read as zeros where
	// that was acceptable.
	OKData int `json:"ok_data"`
	OKZero int `json:"ok_zero"`
	// Counts per class (OK included).
	Counts map[Class]int `json:"counts"`
	// ProblemCount is the number of blocks not OK; Problems lists the
	// first MaxProblems of them by block number.
	ProblemCount int       `json:"problem_count"`
	Problems     []Problem `json:"problems,omitempty"`
}

// Err is nil when every checked block was OK, else an error listing the
// counts and the problems reported.
func (r *Report) Err() error {
	if r.ProblemCount == 0 {
		return nil
	}
	return errors.New(r.String())
}

func (r *Report) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "checked %d blocks (%d written, %d with a durable write, %d unwritten): %d ok with data, %d ok as zeros, %d problems",
		r.Checked, r.Written, r.Durable, r.Unwritten, r.OKData, r.OKZero, r.ProblemCount)
	if r.ProblemCount > 0 {
		var classes []string
		for cl, n := range r.Counts {
			if cl != OK && n > 0 {
				classes = append(classes, fmt.Sprintf("%s=%d", cl, n))
			}
		}
		sort.Strings(classes)
		fmt.Fprintf(&b, " (%s)", strings.Join(classes, " "))
		for _, p := range r.Problems {
			b.WriteString("\n  ")
			b.WriteString(p.String())
		}
		if len(r.Problems) < r.ProblemCount {
			fmt.Fprintf(&b, "\n  ... %d more", r.ProblemCount-len(r.Problems))
		}
	}
	return b.String()
}

type blockView struct {
	blk                     uint64
	lastSeq, acked, durable uint64
	writes                  []WriteRecord
	unwritten               bool
}

func (v *blockView) find(seq uint64) *WriteRecord {
	b := blockState{writes: v.writes}
	return b.find(seq)
}

// Verify reads every block that was ever written (and VerifyOptions
// .Unwritten others) through r and classifies each; see the package
// documentation for the rules. The error is non-nil only when Verify could
// not finish (Run in progress, ctx ended); per-block read failures are
// UNREADABLE problems.
func (c *Checker) Verify(ctx context.Context, r BlockReader, vo VerifyOptions) (*Report, error) {
	if vo.MaxProblems <= 0 {
		vo.MaxProblems = 20
	}
	if vo.QueueDepth <= 0 {
		vo.QueueDepth = 8
	}
	if vo.OpTimeout <= 0 {
		vo.OpTimeout = c.opts.OpTimeout
	}
	c.mu.Lock()
	if c.running {
		c.mu.Unlock()
		return nil, ErrRunning
	}
	var views []blockView
	for i := range c.blocks {
		b := &c.blocks[i]
		if b.lastSeq > 0 {
			views = append(views, blockView{blk: uint64(i), lastSeq: b.lastSeq, acked: b.acked, durable: b.durable,
				writes: append([]WriteRecord(nil), b.writes...)})
		}
	}
	extra := vo.Unwritten
	for i := range c.blocks {
		if extra == 0 {
			break
		}
		if c.blocks[i].lastSeq == 0 {
			views = append(views, blockView{blk: uint64(i), unwritten: true})
			extra--
		}
	}
	c.mu.Unlock()
	if sz, ok := r.(interface{ Size() uint64 }); ok && extra > 0 {
		bs := uint64(c.opts.BlockSize)
		for blk := uint64(c.opts.Blocks); extra > 0 && c.blockOffset(blk)+bs <= sz.Size(); blk++ {
			views = append(views, blockView{blk: blk, unwritten: true})
			extra--
		}
	}

	type outcome struct {
		class Class
		prob  *Problem
		zero  bool
	}
	results := make([]outcome, len(views))
	jobs := make(chan int)
	var wg sync.WaitGroup
	for w := 0; w < vo.QueueDepth; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, c.opts.BlockSize)
			for i := range jobs {
				v := &views[i]
				floor := v.durable
				if vo.Floor == FloorAcked {
					floor = max(v.durable, v.acked)
				}
				rctx, cancel := context.WithTimeout(ctx, vo.OpTimeout)
				err := r.Read(rctx, c.blockOffset(v.blk), buf)
				cancel()
				if err != nil {
					results[i] = outcome{class: Unreadable, prob: &Problem{Class: Unreadable, Detail: err.Error()}}
				} else {
					cl, p := c.classify(v, buf, floor)
					results[i] = outcome{class: cl, prob: p, zero: cl == OK && allZero(buf)}
				}
				if p := results[i].prob; p != nil {
					p.Block, p.Offset, p.Floor, p.LastIssued, p.Acked = v.blk, c.blockOffset(v.blk), floor, v.lastSeq, v.acked
				}
			}
		}()
	}
feed:
	for i := range views {
		select {
		case jobs <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(jobs)
	wg.Wait()

	rep := &Report{Counts: map[Class]int{}}
	var probs []Problem
	for i, o := range results {
		if o.class == "" {
			continue // not read: ctx ended
		}
		v := &views[i]
		rep.Checked++
		if v.unwritten {
			rep.Unwritten++
		} else {
			rep.Written++
		}
		if v.durable > 0 || (vo.Floor == FloorAcked && v.acked > 0) {
			rep.Durable++
		}
		rep.Counts[o.class]++
		switch {
		case o.class == OK && o.zero:
			rep.OKZero++
		case o.class == OK:
			rep.OKData++
		default:
			probs = append(probs, *o.prob)
		}
	}
	sort.Slice(probs, func(i, j int) bool { return probs[i].Block < probs[j].Block })
	rep.ProblemCount = len(probs)
	if len(probs) > vo.MaxProblems {
		probs = probs[:vo.MaxProblems]
	}
	rep.Problems = probs
	if err := ctx.Err(); err != nil {
		return rep, fmt.Errorf("checker: verify interrupted after %d of %d blocks: %w", rep.Checked, len(views), err)
	}
	return rep, nil
}

// classify judges the content data of block v against the floor.
func (c *Checker) classify(v *blockView, data []byte, floor uint64) (Class, *Problem) {
	problem := func(cl Class, h *Header, format string, args ...any) (Class, *Problem) {
		return cl, &Problem{Class: cl, Found: h, Detail: fmt.Sprintf(format, args...)}
	}
	if allZero(data) {
		if floor == 0 {
			return OK, nil
		}
		return problem(Missing, nil, "reads as zeros; write seq %d is durable%s", floor, c.describeWrite(v, floor))
	}
	h, magic := ParseHeader(data)
	if magic && h.ChecksumOK {
		hp := &h
		switch {
		case h.BlockSize != uint32(len(data)):
			return problem(Foreign, hp, "valid block written with block size %d", h.BlockSize)
		case h.Run != c.runID:
			return problem(Foreign, hp, "valid block from another run (%016x, this run is %016x)", h.Run, c.runID)
		case h.Block != v.blk:
			return problem(Foreign, hp, "holds block %d's write seq %d (write id %d)", h.Block, h.Seq, h.WriteID)
		case h.Seq == 0 || h.Seq > v.lastSeq:
			return problem(Foreign, hp, "holds seq %d (write id %d), which was never issued for this block", h.Seq, h.WriteID)
		}
		w := v.find(h.Seq)
		if w != nil && (w.ID != h.WriteID || w.Writer != h.Writer || w.Session != h.Session || w.FUA != h.FUA || (w.Segs != nil) != h.RMW) {
			return problem(Foreign, hp, "header of seq %d does not match the write issued with that seq (write id %d, writer %d, session %d, fua %v, read-modify-write %v)",
				h.Seq, w.ID, w.Writer, w.Session, w.FUA, w.Segs != nil)
		}
		if h.Seq < floor {
			return problem(Stale, hp, "holds seq %d (write id %d), older than durable seq %d%s", h.Seq, h.WriteID, floor, c.describeWrite(v, floor))
		}
		if w == nil {
			// Unreachable: records are kept down to the durable seq.
			return problem(Foreign, hp, "holds seq %d, which is not in the record", h.Seq)
		}
		exp := make([]byte, len(data))
		encodeBlock(exp, c.runID, v.blk, w)
		if string(exp) != string(data) {
			return problem(Corrupt, hp, "header and checksum valid for seq %d but the payload differs from what that write carried", h.Seq)
		}
		// Read-modify-writes: no segment may be older than what the
		// durable write carried, nor than what a correct read could have
		// given the write found here (or any write it descends from).
		have := segsOf(w)
		if fw := v.find(floor); fw != nil && floor > 0 {
			need := needOf(fw)
			for i := range have {
				if have[i] < need[i] {
					return problem(Stale, hp, "holds seq %d whose segment %d carries seq %d, older than seq %d that durable seq %d requires there (a read-modify-write built on stale data)",
						h.Seq, i, have[i], need[i], floor)
				}
			}
		}
		for i := range w.Must {
			if have[i] < w.Must[i] {
				return problem(Stale, hp, "holds read-modify-write seq %d built on seq %d: its segment %d carries seq %d, but seq %d was required there (durable when the read began): a stale read became stale data",
					h.Seq, w.Base, i, have[i], w.Must[i])
			}
		}
		return OK, nil
	}
	// Not one valid block: find out where each sector came from.
	cands := v.writes
	if len(cands) > 64 {
		cands = cands[len(cands)-64:]
	}
	cache := map[uint64][]byte{}
	expected := func(w *WriteRecord) []byte {
		if b, ok := cache[w.Seq]; ok {
			return b
		}
		b := make([]byte, len(data))
		encodeBlock(b, c.runID, v.blk, w)
		cache[w.Seq] = b
		return b
	}
	labels, known, distinct := sectorLabels(data, cands, expected)
	sectors := formatLabels(labels)
	var hp *Header
	if magic {
		hp = &h
	}
	switch {
	case magic:
		return problem(Torn, hp, "checksum mismatch (header claims seq %d, write id %d); %s", h.Seq, h.WriteID, sectors)
	case known && distinct > 1:
		return problem(Torn, nil, "mixture of writes; %s", sectors)
	case floor > 0:
		return problem(Missing, nil, "unrecognisable content although write seq %d is durable%s; %s", floor, c.describeWrite(v, floor), sectors)
	default:
		return problem(Corrupt, nil, "unrecognisable content; %s", sectors)
	}
}

func (c *Checker) describeWrite(v *blockView, seq uint64) string {
	w := v.find(seq)
	if w == nil {
		return ""
	}
	return fmt.Sprintf(" (write id %d, session %d, %s)", w.ID, w.Session, w.State)
}
