package checker

import (
	"context"
	"fmt"
	"time"
)

// rmwPlan is what a read-modify-write must respect, taken when the write
// is issued (just before its read is sent): the block's durable seq then,
// and per segment the oldest seq a correct read can return there.
type rmwPlan struct {
	floor uint64
	need  []uint64
}

// needOf is what a block holding write w (or a descendant of it) must
// carry at least, per segment: w's own segments, and what w itself had to
// carry if it was a read-modify-write.
func needOf(w *WriteRecord) []uint64 {
	m := append([]uint64(nil), segsOf(w)...)
	for i := range w.Must {
		m[i] = max(m[i], w.Must[i])
	}
	return m
}

// planRMW is called with c.mu held, before b's next write is allocated.
func (c *Checker) planRMW(b *blockState) *rmwPlan {
	p := &rmwPlan{floor: b.durable, need: make([]uint64, RMWSegments)}
	if w := b.find(b.durable); w != nil {
		p.need = needOf(w)
	}
	return p
}

// readModify reads block blk on the writing connection and turns w into a
// read-modify-write of what it read: the same segments, one of them
// replaced by w's seq. A read older than the plan's floor is counted as a
// stale read (and the write goes ahead: a file system would write it, and
// Verify must then see the damage). An unreadable block or content that
// is no single write of the block leaves w a plain write.
func (c *Checker) readModify(ctx context.Context, s *session, blk uint64, w *WriteRecord, plan *rmwPlan, buf []byte) {
	opCtx, cancel := context.WithTimeout(ctx, c.opts.OpTimeout)
	err := s.cl.Read(opCtx, c.blockOffset(blk), buf)
	cancel()
	if err != nil {
		return // the write will most likely fail the same way
	}
	segs, base, ok := segmentMap(buf, c.runID, blk)
	c.mu.Lock()
	defer c.mu.Unlock()
	b := &c.blocks[blk]
	if !ok || base >= w.Seq {
		c.stats.RMWBadReads++
		c.addReadProblem(ReadProblem{Time: time.Now(), Reader: "writer (read-modify-write)", Addr: s.addr, Export: c.opts.Export,
			Block: blk, Floor: plan.floor, Found: base, Class: Torn, Detail: "the read of a read-modify-write returned content that is no single write of the block"})
		return
	}
	must := append([]uint64(nil), plan.need...)
	if bw := b.find(base); bw != nil {
		for i := range bw.Must {
			must[i] = max(must[i], bw.Must[i])
		}
	}
	if base < plan.floor {
		c.stats.RMWStaleReads++
		c.addReadProblem(ReadProblem{Time: time.Now(), Reader: "writer (read-modify-write)", Addr: s.addr, Export: c.opts.Export,
			Block: blk, Floor: plan.floor, Found: base, Class: Stale,
			Detail: fmt.Sprintf("the read of read-modify-write seq %d returned seq %d although seq %d was durable before it began", w.Seq, base, plan.floor)})
	}
	j := int(w.ID % RMWSegments)
	segs[j], must[j] = w.Seq, w.Seq
	w.Segs, w.Base, w.Must = segs, base, must
	if rec := b.find(w.Seq); rec != nil {
		rec.Segs, rec.Base, rec.Must = segs, base, must
	}
	c.stats.RMWWrites++
}

// addReadProblem keeps the first problems of the writer's own reads.
// Called with c.mu held.
func (c *Checker) addReadProblem(p ReadProblem) {
	if len(c.readProblems) < 50 {
		c.logf("checker: bad read: %v", p)
		c.readProblems = append(c.readProblems, p)
	}
}

// ReadProblems returns the problems of the writer's read-modify-write
// reads (a Reader keeps its own).
func (c *Checker) ReadProblems() []ReadProblem {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]ReadProblem(nil), c.readProblems...)
}
