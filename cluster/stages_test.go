package cluster

import (
	"testing"
	"time"
)

func TestStagesPercentilesAndOrder(t *testing.T) {
	var none *Stages
	none.Record("x", time.Second) // a nil recorder records nothing
	if none.Snapshot() != nil {
		t.Fatal("nil recorder has a snapshot")
	}
	s := NewStages()
	for i := 1; i <= 100; i++ {
		s.Record("leader.store", time.Duration(i)*time.Microsecond)
	}
	for i := 0; i < stageWindow+10; i++ { // the ring keeps the newest
		s.Record("nbd.flush", time.Millisecond)
	}
	s.Record("zz.custom", time.Second)
	got := s.Snapshot()
	if len(got) != 3 || got[0].Stage != "nbd.flush" || got[1].Stage != "leader.store" || got[2].Stage != "zz.custom" {
		t.Fatalf("stages %+v, want nbd.flush, leader.store, then unlisted ones", got)
	}
	if got[0].Count != stageWindow+10 || got[0].P50 != time.Millisecond || got[0].P99 != time.Millisecond {
		t.Errorf("nbd.flush %+v", got[0])
	}
	if got[1].P50 != 50*time.Microsecond || got[1].P99 != 99*time.Microsecond || got[1].Count != 100 {
		t.Errorf("leader.store %+v, want p50 50µs, p99 99µs", got[1])
	}
}
