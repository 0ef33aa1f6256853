package dcd

import "testing"

// TestZeroConfigTakesDefaultConfig: New fills a zero Config's limits with
// DefaultConfig's values, and leaves FlushTimeout unbounded.
func TestZeroConfigTakesDefaultConfig(t *testing.T) {
	v := newVolume(t, newFakeCluster(t, 1<<20), Config{})
	d := DefaultConfig()
	got := v.cfg
	if got.MaxBufferBytes != d.MaxBufferBytes || got.MaxBatchBytes != d.MaxBatchBytes ||
		got.MaxInflight != d.MaxInflight || got.CommitTimeout != d.CommitTimeout {
		t.Fatalf("zero Config became %+v; DefaultConfig is %+v", got, d)
	}
	if got.FlushTimeout != 0 || d.FlushTimeout != DefaultFlushTimeout || d.FlushTimeout <= 0 {
		t.Fatalf("FlushTimeout: zero Config got %v (want 0, unbounded); DefaultConfig %v", got.FlushTimeout, d.FlushTimeout)
	}
}
