package fsm

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"log/slog"
	"maps"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/robib/robib/volume"
)

const (
	KiB = 1 << 10
	MiB = 1 << 20
)

var testCreated = time.Date(2024, 5, 6, 7, 8, 9, 123456789, time.UTC).UnixNano()

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// site is one FSM with its volume store, in dir.
type site struct {
	t     testing.TB
	dir   string
	opts  Options
	store *volume.Store
	fsm   *FSM
}

// newSite opens (or reopens) a site in dir. The store is closed when the
// test ends unless crash or close was called.
func newSite(t testing.TB, dir string, opts Options) *site {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = testLogger(t)
	}
	s := &site{t: t, dir: dir, opts: opts}
	s.open()
	t.Cleanup(func() {
		if s.store != nil {
			s.store.Close()
		}
	})
	return s
}

func (s *site) open() {
	s.t.Helper()
	st, err := volume.Open(filepath.Join(s.dir, "volumes"), s.opts.Logger)
	if err != nil {
		s.t.Fatalf("volume.Open: %v", err)
	}
	f, err := New(st, filepath.Join(s.dir, "fsm"), s.opts)
	if err != nil {
		st.Close()
		s.t.Fatalf("New: %v", err)
	}
	s.store, s.fsm = st, f
}

// crash drops the FSM without Close (no final checkpoint) and closes the
// store (to release its lock), then reopens both.
func (s *site) crash() {
	s.t.Helper()
	s.store.Close()
	s.open()
}

// restart closes the FSM cleanly and reopens.
func (s *site) restart() {
	s.t.Helper()
	if err := s.fsm.Close(); err != nil {
		s.t.Fatalf("Close: %v", err)
	}
	s.store.Close()
	s.open()
}

// entry encodes cmd as a raft log entry.
func entry(t testing.TB, index uint64, cmd Command) *raft.Log {
	t.Helper()
	data, err := Encode(cmd)
	if err != nil {
		t.Fatalf("Encode(%#v): %v", cmd, err)
	}
	return &raft.Log{Index: index, Term: 1, Type: raft.LogCommand, Data: data}
}

func (s *site) applyLog(l *raft.Log) *Result {
	s.t.Helper()
	r, ok := s.fsm.Apply(l).(*Result)
	if !ok || r == nil || r.Index != l.Index {
		s.t.Fatalf("Apply(%d) returned %#v", l.Index, r)
	}
	return r
}

// log is a raft log being built by a test.
type testLog struct {
	t       testing.TB
	entries []*raft.Log
}

func (l *testLog) add(cmd Command) *raft.Log {
	e := entry(l.t, uint64(len(l.entries)+1), cmd)
	l.entries = append(l.entries, e)
	return e
}

// mustApply applies cmd as the next entry and fails on a non-nil error.
func (s *site) mustApply(l *testLog, cmd Command) *Result {
	s.t.Helper()
	r := s.applyLog(l.add(cmd))
	if r.Err != nil {
		s.t.Fatalf("Apply(%d, %T): %v", r.Index, cmd, r.Err)
	}
	return r
}

func create(name string, size int64) *CreateVolume {
	return &CreateVolume{Name: name, Size: size, BlockSize: 4096, Created: testCreated}
}

func write(off int64, data []byte) Op {
	return Op{Kind: OpWrite, Off: off, Len: int64(len(data)), Data: data}
}

func randBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// read returns the contents of volume name.
func (s *site) read(name string) []byte {
	s.t.Helper()
	v, err := s.store.Get(name)
	if err != nil {
		s.t.Fatalf("Get(%q): %v", name, err)
	}
	b := make([]byte, v.Size())
	if _, err := v.ReadAt(b, 0); err != nil {
		s.t.Fatalf("ReadAt(%q): %v", name, err)
	}
	return b
}

// sameState fails unless a and b hold the same replicated state: volumes
// (metadata and bytes), session tables and lease tables.
func sameState(t testing.TB, a, b *site) {
	t.Helper()
	if err := diffState(a, b); err != nil {
		t.Fatal(err)
	}
}

// diffState describes the first difference between the replicated states
// of a and b (volume metadata and bytes, broken volumes, sessions, leases),
// or returns nil.
func diffState(a, b *site) error {
	am, bm := a.store.List(), b.store.List()
	if !slices.EqualFunc(am, bm, sameMeta) {
		return fmt.Errorf("volume metadata differs:\n%v\n%v", am, bm)
	}
	if ab, bb := len(a.store.Broken()), len(b.store.Broken()); ab != 0 || bb != 0 {
		return fmt.Errorf("broken volumes: %v / %v", a.store.Broken(), b.store.Broken())
	}
	for _, m := range am {
		if !bytes.Equal(a.read(m.Name), b.read(m.Name)) {
			return fmt.Errorf("volume %q bytes differ", m.Name)
		}
	}
	if as, bs := sessionList(a.fsm.sessions), sessionList(b.fsm.sessions); !slices.Equal(as, bs) {
		return fmt.Errorf("sessions differ:\n%v\n%v", as, bs)
	}
	if al, bl := a.fsm.Leases(), b.fsm.Leases(); !maps.Equal(al, bl) {
		return fmt.Errorf("lease tables differ:\n%v\n%v", al, bl)
	}
	return nil
}

// reCRC recomputes the trailing CRC of an encoded command.
func reCRC(b []byte) []byte {
	end := len(b) - 4
	binary.LittleEndian.PutUint32(b[end:], crc32.Checksum(b[:end], castagnoli))
	return b
}
