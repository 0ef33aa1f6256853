package fsm

import (
	"errors"
	"strings"
	"testing"
)

// batchAt is a one-write batch of session s at seq with a lease epoch.
func batchAt(s, seq, epoch uint64, off int64, data []byte) *WriteBatch {
	return &WriteBatch{Volume: "v", Session: s, Seq: seq, Epoch: epoch, Created: testCreated, Ops: []Op{write(off, data)}}
}

func TestLeaseAcquireFencesOldHolder(t *testing.T) {
	s := newSite(t, t.TempDir(), Options{})
	l := &testLog{t: t}
	s.mustApply(l, create("v", MiB))

	// Writes without an epoch are accepted only while no lease was ever taken.
	s.mustApply(l, batchAt(1, 1, 0, 0, []byte("legacy")))
	s.mustApply(l, &AcquireLease{Volume: "v", Site: "a", Created: testCreated, Prev: 0})
	if got, ok := s.fsm.Lease("v"); !ok || got != (Lease{Holder: "a", Epoch: 1}) {
		t.Fatalf("lease after acquire = %+v, %v", got, ok)
	}
	if r := s.applyLog(l.add(batchAt(1, 2, 0, 0, []byte("XXXXXX")))); !errors.Is(r.Err, ErrStaleEpoch) {
		t.Fatalf("epoch-0 batch after a lease: %v, want ErrStaleEpoch", r.Err)
	}

	s.mustApply(l, batchAt(2, 1, 1, 100, []byte("from-a")))

	// A second acquire with a stale Prev loses the compare-and-set.
	if r := s.applyLog(l.add(&AcquireLease{Volume: "v", Site: "b", Prev: 0})); !errors.Is(r.Err, ErrLeaseConflict) {
		t.Fatalf("acquire with stale prev: %v, want ErrLeaseConflict", r.Err)
	}
	// b takes over at epoch 2: a's next batch is fenced, and its session
	// stays failed even for a resend.
	s.mustApply(l, &AcquireLease{Volume: "v", Site: "b", Prev: 1})
	if r := s.applyLog(l.add(batchAt(2, 2, 1, 200, []byte("late-a")))); !errors.Is(r.Err, ErrStaleEpoch) {
		t.Fatalf("old holder's batch: %v, want ErrStaleEpoch", r.Err)
	}
	if r := s.applyLog(l.add(batchAt(2, 2, 2, 200, []byte("late-a")))); !errors.Is(r.Err, ErrStaleEpoch) {
		t.Fatalf("resend in a failed session: %v, want ErrStaleEpoch", r.Err)
	}
	s.mustApply(l, batchAt(3, 1, 2, 300, []byte("from-b")))

	got := s.read("v")
	for _, c := range []struct {
		off  int
		want string
	}{{0, "legacy"}, {100, "from-a"}, {200, "\x00\x00\x00\x00\x00\x00"}, {300, "from-b"}} {
		if string(got[c.off:c.off+len(c.want)]) != c.want {
			t.Errorf("at %d: %q, want %q", c.off, got[c.off:c.off+len(c.want)], c.want)
		}
	}
}

func TestLeaseRelease(t *testing.T) {
	s := newSite(t, t.TempDir(), Options{})
	l := &testLog{t: t}
	s.mustApply(l, create("v", MiB))
	s.mustApply(l, &AcquireLease{Volume: "v", Site: "a", Prev: 0})
	for _, bad := range []*ReleaseLease{
		{Volume: "v", Site: "b", Epoch: 1}, // not the holder
		{Volume: "v", Site: "a", Epoch: 2}, // wrong epoch
		{Volume: "w", Site: "a", Epoch: 1}, // no such lease
	} {
		if r := s.applyLog(l.add(bad)); !errors.Is(r.Err, ErrLeaseConflict) {
			t.Fatalf("release %+v: %v, want ErrLeaseConflict", bad, r.Err)
		}
	}
	s.mustApply(l, &ReleaseLease{Volume: "v", Site: "a", Epoch: 1})
	if got, _ := s.fsm.Lease("v"); got != (Lease{Epoch: 1}) {
		t.Fatalf("released lease = %+v", got)
	}
	if r := s.applyLog(l.add(batchAt(1, 1, 1, 0, []byte("x")))); !errors.Is(r.Err, ErrStaleEpoch) {
		t.Fatalf("batch after release: %v, want ErrStaleEpoch", r.Err)
	}
	s.mustApply(l, &AcquireLease{Volume: "v", Site: "b", Prev: 1})
	s.mustApply(l, batchAt(2, 1, 2, 0, []byte("y")))
}

func TestLeaseUnknownVolumeAndIncarnation(t *testing.T) {
	s := newSite(t, t.TempDir(), Options{})
	l := &testLog{t: t}
	if r := s.applyLog(l.add(&AcquireLease{Volume: "v", Site: "a"})); !errors.Is(r.Err, ErrUnknownVolume) {
		t.Fatalf("acquire on missing volume: %v", r.Err)
	}
	s.mustApply(l, create("v", MiB))
	if r := s.applyLog(l.add(&AcquireLease{Volume: "v", Site: "a", Created: testCreated + 1})); !errors.Is(r.Err, ErrUnknownVolume) {
		t.Fatalf("acquire on other incarnation: %v", r.Err)
	}
	s.mustApply(l, &AcquireLease{Volume: "v", Site: "a", Created: testCreated})
	s.mustApply(l, &DeleteVolume{Name: "v"})
	if _, ok := s.fsm.Lease("v"); ok {
		t.Fatal("lease survived the volume's deletion")
	}
	s.mustApply(l, create("v", MiB))
	s.mustApply(l, &AcquireLease{Volume: "v", Site: "b", Created: testCreated})
}

// TestLeasesSurviveRestartAndReplay: the lease table is part of the
// checkpointed state and is rebuilt by replaying the log tail.
func TestLeasesSurviveRestartAndReplay(t *testing.T) {
	dir := t.TempDir()
	s := newSite(t, dir, Options{})
	l := &testLog{t: t}
	s.mustApply(l, create("v", MiB))
	s.mustApply(l, create("w", MiB))
	s.mustApply(l, &AcquireLease{Volume: "v", Site: "a"})
	s.mustApply(l, &AcquireLease{Volume: "w", Site: "b"})
	if err := s.fsm.checkpoint(); err != nil {
		t.Fatal(err)
	}
	s.mustApply(l, &AcquireLease{Volume: "v", Site: "c", Prev: 1})
	s.crash()
	// The checkpoint has v at epoch 1; replaying the tail moves it to 2.
	if got, _ := s.fsm.Lease("v"); got != (Lease{Holder: "a", Epoch: 1}) {
		t.Fatalf("after crash, before replay: %+v", got)
	}
	for _, e := range l.entries {
		s.applyLog(e)
	}
	want := map[string]Lease{"v": {Holder: "c", Epoch: 2}, "w": {Holder: "b", Epoch: 1}}
	if got := s.fsm.Leases(); len(got) != 2 || got["v"] != want["v"] || got["w"] != want["w"] {
		t.Fatalf("leases after replay = %+v, want %+v", got, want)
	}
	s.restart()
	if got := s.fsm.Leases(); got["v"] != want["v"] || got["w"] != want["w"] {
		t.Fatalf("leases after restart = %+v, want %+v", got, want)
	}
}

func TestLeasesTravelInSnapshots(t *testing.T) {
	src := newSite(t, t.TempDir(), Options{})
	l := &testLog{t: t}
	src.mustApply(l, create("v", MiB))
	src.mustApply(l, &AcquireLease{Volume: "v", Site: "a"})
	src.mustApply(l, &AcquireLease{Volume: "v", Site: "b", Prev: 1})
	src.mustApply(l, batchAt(9, 1, 2, 0, []byte("snap")))
	srcSS := src.snapStore()
	id := takeSnapshot(t, src, srcSS, l.entries[len(l.entries)-1].Index)
	dst := newSite(t, t.TempDir(), Options{})
	install(t, srcSS, id, dst, dst.snapStore())
	if got, _ := dst.fsm.Lease("v"); got != (Lease{Holder: "b", Epoch: 2}) {
		t.Fatalf("restored lease = %+v", got)
	}
	// The restored site fences the old holder exactly as the source does.
	if r := dst.applyLog(l.add(batchAt(8, 1, 1, 0, []byte("old")))); !errors.Is(r.Err, ErrStaleEpoch) {
		t.Fatalf("old epoch on restored site: %v", r.Err)
	}
	if r := dst.applyLog(l.add(batchAt(7, 1, 2, 0, []byte("new")))); r.Err != nil {
		t.Fatalf("current epoch on restored site: %v", r.Err)
	}
}

func TestStateDecodesOlderVersions(t *testing.T) {
	// Written out byte by byte, as versions 1 and 2 wrote them: version,
	// flags, applied 7, fuzzy-until 0, no volumes, one session (id 3,
	// last seq 2, last index 6, not failed); version 2 adds the lease
	// list (volume "v", holder "a", epoch 4).
	v1 := []byte{1, 0, 7, 0, 0, 1, 3, 2, 6, 0}
	v2 := append([]byte{2}, v1[1:]...)
	v2 = append(v2, 1, 1, 'v', 1, 'a', 4)
	wantSession := sessionEntry{ID: 3, session: session{LastSeq: 2, LastIndex: 6}}
	for name, b := range map[string][]byte{"version 1": v1, "version 2": v2} {
		got, err := decodeState(b)
		if err != nil {
			t.Fatalf("%s state: %v", name, err)
		}
		if got.Applied != 7 || len(got.Sessions) != 1 || got.Sessions[0] != wantSession {
			t.Fatalf("%s state decoded as %+v", name, got)
		}
		if name == "version 2" && (len(got.Leases) != 1 || got.Leases[0] != (leaseEntry{Volume: "v", Lease: Lease{Holder: "a", Epoch: 4}})) {
			t.Fatalf("version 2 leases decoded as %+v", got.Leases)
		}
	}
	// Version 3 records each session's volume and epoch.
	img := &stateImage{Applied: 7, ClusterID: "c1", Sessions: []sessionEntry{{ID: 3, session: session{LastSeq: 2, LastIndex: 6, Volume: "v", Epoch: 4}}}}
	got, err := decodeState(encodeState(img))
	if err != nil || len(got.Sessions) != 1 || got.Sessions[0] != img.Sessions[0] || got.ClusterID != "c1" {
		t.Fatalf("version 3 round trip: %+v, %v", got, err)
	}
	if _, err := decodeState(append([]byte{stateVersion + 1}, v1[1:]...)); err == nil {
		t.Fatal("a state of a newer version decoded")
	}
	bad := []*stateImage{
		{Leases: []leaseEntry{{Volume: "v", Lease: Lease{Holder: "a", Epoch: 0}}}},
		{Leases: []leaseEntry{{Volume: "v", Lease: Lease{Holder: "bad site", Epoch: 1}}}},
		{Leases: []leaseEntry{{Volume: "w", Lease: Lease{Epoch: 1}}, {Volume: "v", Lease: Lease{Epoch: 1}}}},
		{Leases: []leaseEntry{{Volume: "v", Lease: Lease{Epoch: 1}}, {Volume: "v", Lease: Lease{Epoch: 2}}}},
	}
	for _, img := range bad {
		if _, err := decodeState(encodeState(img)); err == nil || !strings.Contains(err.Error(), "lease") && !strings.Contains(err.Error(), "site") {
			t.Errorf("bad lease table %+v: %v", img.Leases, err)
		}
	}
}

func TestLeaseCommandsRejectBadSites(t *testing.T) {
	for _, site := range []string{"", "has space", strings.Repeat("x", maxSiteLen+1), "a/b", "é"} {
		if _, err := Encode(&AcquireLease{Volume: "v", Site: site}); !errors.Is(err, ErrBadCommand) {
			t.Errorf("Encode acquire for site %q: %v", site, err)
		}
		if _, err := Encode(&ReleaseLease{Volume: "v", Site: site, Epoch: 1}); !errors.Is(err, ErrBadCommand) {
			t.Errorf("Encode release for site %q: %v", site, err)
		}
	}
}
