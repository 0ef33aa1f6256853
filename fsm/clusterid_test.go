package fsm

import (
	"errors"
	"strings"
	"testing"
)

func TestSetClusterIDIsCompareAndSet(t *testing.T) {
	s := newSite(t, t.TempDir(), Options{})
	l := &testLog{t: t}
	if id := s.fsm.ClusterID(); id != "" {
		t.Fatalf("new FSM has cluster ID %q", id)
	}
	s.mustApply(l, &SetClusterID{ID: "first"})
	if r := s.mustApply(l, &SetClusterID{ID: "first"}); !r.Duplicate {
		t.Fatalf("same ID again: %+v, want a duplicate", r)
	}
	if r := s.applyLog(l.add(&SetClusterID{ID: "second"})); !errors.Is(r.Err, ErrClusterIDSet) {
		t.Fatalf("another ID: %v, want ErrClusterIDSet", r.Err)
	}
	if id := s.fsm.ClusterID(); id != "first" {
		t.Fatalf("cluster ID = %q, want first", id)
	}
	// The verdict travels between sites by its code.
	if code := ErrorCode(ErrClusterIDSet); code != "cluster_id_set" || !errors.Is(ErrorFromCode(code, "x"), ErrClusterIDSet) {
		t.Fatalf("error code %q does not map back", code)
	}
}

func TestClusterIDSurvivesRestartAndCrash(t *testing.T) {
	s := newSite(t, t.TempDir(), Options{})
	l := &testLog{t: t}
	s.mustApply(l, create("v", MiB)) // checkpoints before and after
	s.mustApply(l, &SetClusterID{ID: "c1"})
	// A crash before any checkpoint loses the ID from the state file; the
	// replayed entry sets it again.
	s.crash()
	if id := s.fsm.ClusterID(); id != "" {
		t.Fatalf("after crash before a checkpoint: cluster ID %q (state file wrote it early?)", id)
	}
	for _, e := range l.entries {
		s.applyLog(e)
	}
	if id := s.fsm.ClusterID(); id != "c1" {
		t.Fatalf("after replay: cluster ID %q", id)
	}
	s.restart() // a clean close checkpoints the ID
	if id := s.fsm.ClusterID(); id != "c1" {
		t.Fatalf("after restart: cluster ID %q", id)
	}
	if r := s.applyLog(l.add(&SetClusterID{ID: "c2"})); !errors.Is(r.Err, ErrClusterIDSet) {
		t.Fatalf("after restart, another ID: %v", r.Err)
	}
}

func TestClusterIDTravelsInSnapshots(t *testing.T) {
	src := newSite(t, t.TempDir(), Options{})
	l := &testLog{t: t}
	src.mustApply(l, &SetClusterID{ID: "abc-123"})
	src.mustApply(l, create("v", MiB))
	srcSS := src.snapStore()
	id := takeSnapshot(t, src, srcSS, l.entries[len(l.entries)-1].Index)
	dst := newSite(t, t.TempDir(), Options{})
	install(t, srcSS, id, dst, dst.snapStore())
	if got := dst.fsm.ClusterID(); got != "abc-123" {
		t.Fatalf("restored cluster ID = %q", got)
	}
	dst.restart()
	if got := dst.fsm.ClusterID(); got != "abc-123" {
		t.Fatalf("restored cluster ID after restart = %q", got)
	}
}

func TestStateDecodesVersion2(t *testing.T) {
	img := &stateImage{Applied: 9, Leases: []leaseEntry{{Volume: "v", Lease: Lease{Holder: "a", Epoch: 3}}}}
	b := encodeState(img)
	// Version 2 is version 3 without the trailing cluster ID (empty: one byte).
	v2 := append([]byte{stateVersionV2}, b[1:len(b)-1]...)
	got, err := decodeState(v2)
	if err != nil {
		t.Fatalf("version 2 state: %v", err)
	}
	if got.Applied != 9 || len(got.Leases) != 1 || got.ClusterID != "" {
		t.Fatalf("version 2 state decoded as %+v", got)
	}
	// A version 2 state with a trailing cluster ID is corrupt (trailing bytes).
	img.ClusterID = "x"
	b = encodeState(img)
	if _, err := decodeState(append([]byte{stateVersionV2}, b[1:]...)); !errors.Is(err, errCorruptState) {
		t.Fatalf("version 2 with a cluster ID: %v, want errCorruptState", err)
	}
	got, err = decodeState(b)
	if err != nil || got.ClusterID != "x" {
		t.Fatalf("version 3 round trip: %+v, %v", got, err)
	}
	for _, bad := range []string{"UPPER", "has space", strings.Repeat("a", MaxClusterIDLen+1)} {
		img.ClusterID = bad
		if _, err := decodeState(encodeState(img)); !errors.Is(err, errCorruptState) || !strings.Contains(err.Error(), "cluster ID") {
			t.Fatalf("state with cluster ID %q: %v", bad, err)
		}
	}
}

func TestSetClusterIDValidated(t *testing.T) {
	for _, bad := range []string{"", "UPPER", "a/b", "a b", strings.Repeat("a", MaxClusterIDLen+1)} {
		if _, err := Encode(&SetClusterID{ID: bad}); !errors.Is(err, ErrBadCommand) || !errors.Is(err, ErrBadClusterID) {
			t.Fatalf("Encode(SetClusterID %q): %v", bad, err)
		}
		// Hand-built encoding: Decode refuses it too.
		e := encoder{}
		e.byte(codecMagic)
		e.byte(codecVersion)
		e.byte(cmdClusterID)
		e.string(bad)
		if _, err := Decode(reCRC(append(e.buf, 0, 0, 0, 0))); !errors.Is(err, ErrBadCommand) {
			t.Fatalf("Decode(SetClusterID %q): %v", bad, err)
		}
	}
}
