package dcdlog

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	wal "github.com/hashicorp/raft-wal"
	"github.com/hashicorp/raft-wal/metadb"
)

// A contract suite every Raft log store robib can use runs through: the
// same cases, the same assertions, a reopen after every step.

type storeKind struct {
	name string
	open func(t testing.TB, dir string) (raft.LogStore, io.Closer)
	// readsBelowFirst: after a head compaction GetLog may still return
	// entries below FirstIndex (raft-wal v0.4.0 keeps serving them until
	// the whole segment goes). Raft never reads below FirstIndex, so this
	// is tolerated for that store only; the suite found it.
	readsBelowFirst bool
	// brokenTailReopen: after a tail truncation the store cannot be
	// reopened with its entries readable (raft-wal v0.4.0, see
	// TestWALTailTruncationThenReopen), so the suite stops reopening it
	// from then on and only checks it in place.
	brokenTailReopen bool
}

type closeFunc func() error

func (f closeFunc) Close() error { return f() }

var storeKinds = []storeKind{
	{"boltdb", func(t testing.TB, dir string) (raft.LogStore, io.Closer) {
		s, err := raftboltdb.New(raftboltdb.Options{Path: filepath.Join(dir, "raft.db")})
		if err != nil {
			t.Fatal(err)
		}
		return s, s
	}, false, false},
	{"wal", func(t testing.TB, dir string) (raft.LogStore, io.Closer) {
		meta := &metadb.BoltMetaDB{}
		w, err := wal.Open(dir, wal.WithMetaStore(meta))
		if err != nil {
			t.Fatal(err)
		}
		return w, closeFunc(func() error { return errors.Join(w.Close(), meta.Close()) })
	}, true, true},
	{"dcdlog", func(t testing.TB, dir string) (raft.LogStore, io.Closer) {
		s, err := Open(dir, Options{})
		if err != nil {
			t.Fatal(err)
		}
		return s, s
	}, false, false},
	{"dcdlog-small-segments", func(t testing.TB, dir string) (raft.LogStore, io.Closer) {
		s, err := Open(dir, Options{SegmentSize: 64 << 10})
		if err != nil {
			t.Fatal(err)
		}
		return s, s
	}, false, false},
}

// entry is the log the suite stores at index i in term term: its content
// follows from both, so a stale or resurrected entry is told apart.
func entry(i, term uint64, size int) *raft.Log {
	data := make([]byte, size)
	x := i*0x9e3779b97f4a7c15 ^ term*0xbf58476d1ce4e5b9
	for k := range data {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		data[k] = byte(x)
	}
	l := &raft.Log{Index: i, Term: term, Type: raft.LogCommand, Data: data}
	if i%3 == 0 {
		l.Extensions = []byte(fmt.Sprintf("ext-%d-%d", i, term))
	}
	if i%2 == 0 {
		l.AppendedAt = time.Unix(1700000000+int64(i), int64(term)*1000).UTC()
	}
	if i%7 == 0 {
		l.Type = raft.LogNoop
		l.Data = nil
	}
	return l
}

func sameLog(t testing.TB, got *raft.Log, want *raft.Log) {
	t.Helper()
	if got.Index != want.Index || got.Term != want.Term || got.Type != want.Type ||
		!bytes.Equal(got.Data, want.Data) || !bytes.Equal(got.Extensions, want.Extensions) ||
		!got.AppendedAt.Equal(want.AppendedAt) {
		t.Fatalf("log %d: got index %d term %d type %v %d bytes ext %q at %v; want term %d type %v %d bytes ext %q at %v",
			want.Index, got.Index, got.Term, got.Type, len(got.Data), got.Extensions, got.AppendedAt,
			want.Term, want.Type, len(want.Data), want.Extensions, want.AppendedAt)
	}
}

type contract struct {
	t     *testing.T
	kind  storeKind
	dir   string
	s     raft.LogStore
	c     io.Closer
	model map[uint64]*raft.Log
	first uint64
	last  uint64

	noReopen bool
}

func (c *contract) reopen() {
	c.t.Helper()
	if c.noReopen {
		c.check()
		return
	}
	if c.c != nil {
		if err := c.c.Close(); err != nil {
			c.t.Fatal(err)
		}
	}
	c.s, c.c = c.kind.open(c.t, c.dir)
	c.check()
}

// check compares the store with the model: bounds, every entry, and
// exactly raft.ErrLogNotFound just outside them.
func (c *contract) check() {
	t := c.t
	t.Helper()
	first, err := c.s.FirstIndex()
	if err != nil {
		t.Fatal(err)
	}
	last, err := c.s.LastIndex()
	if err != nil {
		t.Fatal(err)
	}
	if first != c.first || last != c.last {
		t.Fatalf("indexes %d..%d, want %d..%d", first, last, c.first, c.last)
	}
	for i := c.first; i <= c.last && c.last != 0; i++ {
		var l raft.Log
		if err := c.s.GetLog(i, &l); err != nil {
			t.Fatalf("GetLog(%d): %v", i, err)
		}
		sameLog(t, &l, c.model[i])
	}
	for _, i := range []uint64{0, c.first - 1, c.last + 1, c.last + 2, 1 << 40} {
		if i >= c.first && i <= c.last && c.last != 0 {
			continue
		}
		if c.kind.readsBelowFirst && i < c.first && i != 0 {
			continue
		}
		var l raft.Log
		if err := c.s.GetLog(i, &l); err != raft.ErrLogNotFound {
			t.Fatalf("GetLog(%d) outside %d..%d: %v, want exactly raft.ErrLogNotFound", i, c.first, c.last, err)
		}
	}
}

func (c *contract) store(logs ...*raft.Log) {
	c.t.Helper()
	var err error
	if len(logs) == 1 {
		err = c.s.StoreLog(logs[0])
	} else {
		err = c.s.StoreLogs(logs)
	}
	if err != nil {
		c.t.Fatal(err)
	}
	for _, l := range logs {
		c.model[l.Index] = l
		if c.first == 0 {
			c.first = l.Index
		}
		c.last = l.Index
	}
	c.check()
}

func (c *contract) del(lo, hi uint64) {
	c.t.Helper()
	if err := c.s.DeleteRange(lo, hi); err != nil {
		c.t.Fatal(err)
	}
	for i := lo; i <= hi; i++ {
		delete(c.model, i)
	}
	switch {
	case lo <= c.first && hi >= c.last:
		c.first, c.last = 0, 0
	case lo <= c.first:
		c.first = hi + 1
	default:
		c.last = lo - 1
		c.noReopen = c.noReopen || c.kind.brokenTailReopen
	}
	c.check()
}

func batch(lo, hi, term uint64, size int) []*raft.Log {
	var logs []*raft.Log
	for i := lo; i <= hi; i++ {
		logs = append(logs, entry(i, term, size+int(i%5)*37))
	}
	return logs
}

func TestContract(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind.name, func(t *testing.T) {
			c := &contract{t: t, kind: kind, dir: t.TempDir(), model: map[uint64]*raft.Log{}}
			defer func() { c.c.Close() }()
			c.reopen() // empty
			c.reopen() // still empty after a reopen

			c.store(entry(1, 1, 100))
			c.reopen()
			c.store(batch(2, 40, 1, 1000)...)
			c.reopen()
			for i := uint64(41); i <= 60; i++ {
				c.store(entry(i, 2, int(i)*10))
			}
			c.reopen()

			if m, ok := c.s.(raft.MonotonicLogStore); ok && m.IsMonotonic() {
				// A gap after the last entry, and one inside a batch, are
				// refused and change nothing.
				if err := c.s.StoreLogs([]*raft.Log{entry(62, 2, 10)}); err == nil {
					t.Fatal("a gap after the last entry was accepted")
				}
				if err := c.s.StoreLogs([]*raft.Log{entry(61, 2, 10), entry(63, 2, 10)}); err == nil {
					t.Fatal("a gap inside a batch was accepted")
				}
				c.check()
				c.reopen()
			}

			c.del(1, 20) // head compaction
			c.reopen()
			c.del(c.first, 25)
			c.reopen()

			c.del(45, c.last) // a conflict: the tail goes...
			c.reopen()
			c.store(batch(45, 70, 3, 700)...) // ...and other terms take its indexes
			c.reopen()
			c.del(50, c.last)
			c.store(batch(50, 55, 4, 300)...) // without a reopen in between
			c.reopen()

			// Large entries, one by one and in a batch.
			c.store(entry(56, 4, 512<<10))
			c.store(batch(57, 64, 4, 512<<10)...)
			c.reopen()
			c.del(c.first, 60)
			c.reopen()

			// Everything goes (a snapshot restore), then the log restarts
			// at another index.
			c.del(c.first, c.last)
			c.reopen()
			c.store(batch(1000, 1010, 5, 200)...)
			c.reopen()
			c.store(batch(1011, 1020, 5, 200)...)
			c.del(1000, 1005)
			c.del(1015, 1020)
			c.reopen()
		})
	}
}

// TestWALTailTruncationThenReopen pins a defect of raft-wal v0.4.0 the
// contract suite found: after a tail truncation (raft's conflict path) and
// a reopen, entries before the truncation point cannot be read (raft then
// panics in NewRaft). Upstream this is hashicorp/raft-wal issue 31, fixed
// by pull request 33 (ForceSeal), which v0.4.0 does not have. The test
// fails once robib moves to a fixed raft-wal: then drop it and
// brokenTailReopen.
func TestWALTailTruncationThenReopen(t *testing.T) {
	var k storeKind
	for _, kk := range storeKinds {
		if kk.name == "wal" {
			k = kk
		}
	}
	dir := t.TempDir()
	s, c := k.open(t, dir)
	if err := s.StoreLogs(batch(1, 60, 1, 1000)); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteRange(45, 60); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	s, c = k.open(t, dir)
	defer c.Close()
	var l raft.Log
	err := s.GetLog(26, &l)
	if err == nil {
		t.Fatal("raft-wal now reads entries after a tail truncation and a reopen: drop brokenTailReopen for it")
	}
	t.Logf("raft-wal after tail truncation and reopen: GetLog(26): %v", err)
}
