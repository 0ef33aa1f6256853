package nbdfront

import "testing"

// TestZeroConfigTakesDefaultConfig: NewServer fills a zero Config's limits
// with DefaultConfig's values, and DefaultConfig itself is accepted.
func TestZeroConfigTakesDefaultConfig(t *testing.T) {
	s, err := NewServer(Config{Backend: newMemBackend()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	d := DefaultConfig()
	got := s.cfg
	if got.MaxPayload != d.MaxPayload || got.MaxConnBuffer != d.MaxConnBuffer || got.MaxWorkers != d.MaxWorkers ||
		got.HandshakeTimeout != d.HandshakeTimeout || got.ErrorCode == nil || d.ErrorCode == nil {
		t.Fatalf("zero Config became %+v; DefaultConfig is %+v", got, d)
	}
	d.Backend = newMemBackend()
	s2, err := NewServer(d)
	if err != nil {
		t.Fatalf("DefaultConfig refused: %v", err)
	}
	s2.Close()
}
