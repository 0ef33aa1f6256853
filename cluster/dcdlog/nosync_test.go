package dcdlog

import (
	"bytes"
	"fmt"
	"testing"

	"github.com/hashicorp/raft"
)

// TestStoreLogsNoSyncThenSync: entries appended without a sync are readable
// at once, across segment boundaries; Sync, a later StoreLogs, DeleteRange
// and Close each leave them durable, so a reopen finds every one.
func TestStoreLogsNoSyncThenSync(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{SegmentSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	entry := func(i uint64) *raft.Log {
		return &raft.Log{Index: i, Term: 1, Type: raft.LogCommand, Data: bytes.Repeat([]byte{byte(i)}, 9000)}
	}
	from := uint64(1) // the first entry not deleted
	check := func(s *Store, upto uint64) {
		t.Helper()
		for i := from; i <= upto; i++ {
			var l raft.Log
			if err := s.GetLog(i, &l); err != nil || l.Index != i || !bytes.Equal(l.Data, entry(i).Data) {
				t.Fatalf("entry %d: %v (index %d)", i, err, l.Index)
			}
		}
	}
	var next uint64 = 1
	for round := 0; round < 4; round++ {
		for k := 0; k < 10; k++ { // 90 KB: beyond one 64 KiB segment
			if err := s.StoreLogsNoSync([]*raft.Log{entry(next)}); err != nil {
				t.Fatal(err)
			}
			next++
		}
		check(s, next-1)
		switch round {
		case 0:
			err = s.Sync()
		case 1:
			err = s.StoreLogs([]*raft.Log{entry(next)})
			next++
		case 2:
			err = s.DeleteRange(1, 3) // head: entries 1..3 go
			from = 4
		}
		if err != nil {
			t.Fatal(fmt.Errorf("round %d: %w", round, err))
		}
	}
	if len(s.unsynced) == 0 {
		t.Fatal("the last round's writes should still be unsynced")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = Open(dir, Options{SegmentSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if first, _ := s.FirstIndex(); first != 4 {
		t.Fatalf("first index %d after deleting 1..3", first)
	}
	if last, _ := s.LastIndex(); last != next-1 {
		t.Fatalf("last index %d, want %d", last, next-1)
	}
	for i := uint64(4); i < next; i++ {
		var l raft.Log
		if err := s.GetLog(i, &l); err != nil || !bytes.Equal(l.Data, entry(i).Data) {
			t.Fatalf("entry %d after reopen: %v", i, err)
		}
	}
}
