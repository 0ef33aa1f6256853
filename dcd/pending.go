package dcd

import (
	"github.com/google/btree"

	"github.com/robib/robib/fsm"
)

// pendingOp is one buffered operation that is not yet in a batch. Its data
// is never modified once the op is in a pendingSet (readers use it without
// the lock); cutting an op re-slices or copies, it never writes.
type pendingOp struct {
	kind    fsm.OpKind
	noHole  bool
	off     int64
	end     int64
	data    []byte // OpWrite only: len(data) == end-off
	backing int    // length of the array data points into (for compaction)
	// age is the ID of the oldest accepted op whose effect this op carries:
	// its own ID, or an older one inherited from ops it overwrote or
	// absorbed. Flush waits for ages, see Volume.committedLocked.
	age        uint64
	prev, next *pendingOp // the age list
}

// cost is the op's charge against MaxBufferBytes.
func (p *pendingOp) cost() int64 { return opCost + int64(len(p.data)) }

// mergeable reports whether a and b are range ops of the same kind, which
// can be joined into one op when they touch.
func mergeable(a, b *pendingOp) bool {
	return a.kind != fsm.OpWrite && a.kind == b.kind && a.noHole == b.noHole
}

type pendingItem struct {
	off int64
	op  *pendingOp
}

func lessItem(a, b pendingItem) bool { return a.off < b.off }

// pendingSet holds the ops accepted and not yet cut into a batch. Its ops
// never overlap one another (insert cuts older ones), so applying them in
// any order gives the same bytes. They are indexed twice: by offset (a
// B-tree, for overlap queries) and by age (a doubly linked list, oldest
// first, so batches are cut from the oldest ops and Flush cannot starve).
// Not safe for concurrent use: Volume.mu guards it.
type pendingSet struct {
	tree       *btree.BTreeG[pendingItem]
	head, tail *pendingOp
	bytes      int64        // sum of cost()
	scratch    []*pendingOp // reused by insert
}

func newPendingSet() pendingSet {
	return pendingSet{tree: btree.NewG(16, lessItem)}
}

func (s *pendingSet) len() int { return s.tree.Len() }

// insert adds x, which is newer than every op in the set. Older ops it
// overlaps lose the overlapping part (dropped entirely if covered); older
// range ops of the same kind that overlap or touch it are absorbed into it.
// x inherits the smallest age among the ops it cut or absorbed and takes
// that op's place in the age list, so "every op with age <= N committed"
// still implies that the effects of every op accepted up to N are
// committed. It returns how many ops disappeared.
func (s *pendingSet) insert(x *pendingOp) (removed int) {
	ov := s.collect(x)
	var oldest *pendingOp
	for _, p := range ov {
		if oldest == nil || p.age < oldest.age {
			oldest = p
		}
	}
	if oldest != nil {
		x.age = oldest.age
		s.linkAfter(oldest, x)
	} else {
		s.linkAfter(s.tail, x)
	}
	xoff, xend := x.off, x.end
	for _, p := range ov {
		switch {
		case mergeable(p, x):
			x.off, x.end = min(x.off, p.off), max(x.end, p.end)
			s.remove(p)
			removed++
		case xoff <= p.off && p.end <= xend:
			s.remove(p)
			removed++
		case p.off < xoff && p.end > xend:
			s.split(p, xoff, xend)
		case p.off < xoff:
			s.reshape(p, p.off, xoff)
		default:
			s.reshape(p, xend, p.end)
		}
	}
	s.tree.ReplaceOrInsert(pendingItem{x.off, x})
	s.bytes += x.cost()
	clear(ov)
	s.scratch = ov[:0]
	return removed
}

// collect returns the ops that overlap x, and the range ops mergeable with
// x that touch it, in offset order.
func (s *pendingSet) collect(x *pendingOp) []*pendingOp {
	ov := s.scratch[:0]
	// Only the last op starting before x can reach into it (no overlaps).
	if x.off > 0 {
		s.tree.DescendLessOrEqual(pendingItem{off: x.off - 1}, func(it pendingItem) bool {
			if p := it.op; p.end > x.off || (p.end == x.off && mergeable(p, x)) {
				ov = append(ov, p)
			}
			return false
		})
	}
	s.tree.AscendGreaterOrEqual(pendingItem{off: x.off}, func(it pendingItem) bool {
		p := it.op
		if p.off < x.end || (p.off == x.end && mergeable(p, x)) {
			ov = append(ov, p)
			return true
		}
		return false
	})
	return ov
}

// split keeps the parts of p before lo and from hi on.
func (s *pendingSet) split(p *pendingOp, lo, hi int64) {
	r := &pendingOp{kind: p.kind, noHole: p.noHole, off: hi, end: p.end, backing: p.backing, age: p.age}
	if p.kind == fsm.OpWrite {
		r.data = p.data[hi-p.off:]
	}
	s.linkAfter(p, r)
	s.tree.ReplaceOrInsert(pendingItem{r.off, r})
	s.bytes += r.cost()
	compact(r)
	s.reshape(p, p.off, lo)
}

// reshape shrinks p to [off, end), a non-empty part of its range.
func (s *pendingSet) reshape(p *pendingOp, off, end int64) {
	before := p.cost()
	if off != p.off {
		s.tree.Delete(pendingItem{off: p.off})
	}
	if p.kind == fsm.OpWrite {
		p.data = p.data[off-p.off : end-p.off]
	}
	if off != p.off {
		p.off = off
		s.tree.ReplaceOrInsert(pendingItem{p.off, p})
	}
	p.end = end
	s.bytes += p.cost() - before
	compact(p)
}

// compact copies the data of a cut write op out of its array once it uses
// less than half of it, so the memory held stays within twice the bytes
// charged.
func compact(p *pendingOp) {
	if p.kind == fsm.OpWrite && 2*len(p.data) < p.backing {
		p.data = append([]byte(nil), p.data...)
		p.backing = len(p.data)
	}
}

// remove deletes p from the set.
func (s *pendingSet) remove(p *pendingOp) {
	s.tree.Delete(pendingItem{off: p.off})
	s.unlink(p)
	s.bytes -= p.cost()
}

// linkAfter inserts x into the age list after p (at the front if p is nil).
func (s *pendingSet) linkAfter(p, x *pendingOp) {
	x.prev = p
	if p == nil {
		x.next = s.head
		s.head = x
	} else {
		x.next = p.next
		p.next = x
	}
	if x.next == nil {
		s.tail = x
	} else {
		x.next.prev = x
	}
}

func (s *pendingSet) unlink(p *pendingOp) {
	if p.prev == nil {
		s.head = p.next
	} else {
		p.prev.next = p.next
	}
	if p.next == nil {
		s.tail = p.prev
	} else {
		p.next.prev = p.prev
	}
	p.prev, p.next = nil, nil
}

// take removes the oldest ops whose encoded size fits into budget bytes
// (each costs opOverhead plus its data) and returns them as fsm ops sorted
// by offset, with their buffer charge and smallest age. It takes at least
// one op if the set is not empty; the caller guarantees every op fits into
// an empty batch.
func (s *pendingSet) take(budget, opOverhead int) (ops []fsm.Op, cost int64, minAge uint64) {
	for p := s.head; p != nil; p = s.head {
		size := opOverhead + len(p.data)
		if size > budget && len(ops) > 0 {
			break
		}
		budget -= size
		if len(ops) == 0 {
			minAge = p.age
		}
		ops = append(ops, fsm.Op{Kind: p.kind, NoHole: p.noHole, Off: p.off, Len: p.end - p.off, Data: p.data})
		cost += p.cost()
		s.remove(p)
	}
	sortOps(ops)
	return ops, cost, minAge
}

// appendOverlapping appends the ops overlapping [off, end) to dst.
func (s *pendingSet) appendOverlapping(dst []fsm.Op, off, end int64) []fsm.Op {
	s.visit(off, end, func(p *pendingOp) bool {
		dst = append(dst, fsm.Op{Kind: p.kind, NoHole: p.noHole, Off: p.off, Len: p.end - p.off, Data: p.data})
		return true
	})
	return dst
}

// visit calls fn for the ops overlapping [off, end) in offset order until
// fn returns false.
func (s *pendingSet) visit(off, end int64, fn func(*pendingOp) bool) {
	if s.tree.Len() == 0 {
		return
	}
	more := true
	if off > 0 {
		s.tree.DescendLessOrEqual(pendingItem{off: off - 1}, func(it pendingItem) bool {
			if it.op.end > off {
				more = fn(it.op)
			}
			return false
		})
	}
	if !more {
		return
	}
	s.tree.AscendRange(pendingItem{off: off}, pendingItem{off: end}, func(it pendingItem) bool {
		return fn(it.op)
	})
}

// clear drops every op.
func (s *pendingSet) clear() {
	s.tree.Clear(false)
	s.head, s.tail, s.bytes = nil, nil, 0
}
