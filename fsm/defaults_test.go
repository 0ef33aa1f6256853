package fsm

import "testing"

// TestZeroOptionsTakeDefaultOptions: New fills zero Options with
// DefaultOptions' values.
func TestZeroOptionsTakeDefaultOptions(t *testing.T) {
	s := newSite(t, t.TempDir(), Options{})
	d := DefaultOptions()
	got := s.fsm.opts
	if got.CheckpointBytes != d.CheckpointBytes || got.CheckpointInterval != d.CheckpointInterval || got.MaxSessions != d.MaxSessions {
		t.Fatalf("zero Options became %+v; DefaultOptions is %+v", got, d)
	}
	if d.CheckpointBytes <= 0 || d.CheckpointInterval <= 0 || d.MaxSessions <= 0 {
		t.Fatalf("DefaultOptions has a zero limit: %+v", d)
	}
}
