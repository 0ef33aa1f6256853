package main

import (
	"testing"
	"time"

	"github.com/robib/robib/cluster"
)

func TestCatchUpNote(t *testing.T) {
	for _, tc := range []struct {
		c    *cluster.CatchUpStatus
		want string
	}{
		{nil, ""},
		{&cluster.CatchUpStatus{Phase: "restoring", BytesDone: 12 << 20, BytesTotal: 48 << 20, ElapsedNanos: int64(3 * time.Second)},
			"catching up: 12.0 of 48.0 MiB, 4.0 MiB/s, ETA 9s"},
		{&cluster.CatchUpStatus{Phase: "restoring", BytesDone: 0, BytesTotal: 48 << 20, ElapsedNanos: int64(time.Second)},
			"catching up: 0.0 of 48.0 MiB, 0.0 MiB/s, ETA unknown"},
		{&cluster.CatchUpStatus{Phase: "receiving", BytesDone: 5 << 20, ElapsedNanos: int64(2 * time.Second)},
			"catching up: receiving 5.0 MiB, 2.5 MiB/s"},
	} {
		if got := catchUpNote(cluster.SiteStatus{Name: "s1", CatchUp: tc.c}); got != tc.want {
			t.Errorf("%+v: %q, want %q", tc.c, got, tc.want)
		}
	}
}
