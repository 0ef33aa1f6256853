package dcd

import (
	"slices"
	"time"
)

// latencyWindow is how many of the newest successful Commit calls the
// commit latency percentiles cover.
const latencyWindow = 1024

// latencyRing keeps the durations of the newest latencyWindow commits. The
// Volume's mu guards it.
type latencyRing struct {
	d    [latencyWindow]time.Duration
	next int // where the next duration goes
	n    int // how many slots hold one
}

func (r *latencyRing) add(d time.Duration) {
	r.d[r.next] = d
	r.next = (r.next + 1) % latencyWindow
	r.n = min(r.n+1, latencyWindow)
}

// snapshot copies the durations held (in no particular order).
func (r *latencyRing) snapshot() []time.Duration {
	return slices.Clone(r.d[:r.n])
}

// percentile returns the q-quantile (0..1, nearest rank) of ds, sorting ds
// in place; 0 when ds is empty.
func percentile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	i := int(q*float64(len(ds))+0.5) - 1
	return ds[min(max(i, 0), len(ds)-1)]
}
