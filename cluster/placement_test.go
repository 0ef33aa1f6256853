package cluster

import (
	"strings"
	"sync"
	"testing"
	"time"
)

func TestDominantWriter(t *testing.T) {
	for _, tc := range []struct {
		name   string
		counts map[string]int
		want   string
	}{
		{"nothing written", nil, ""},
		{"too few batches", map[string]int{"b": placementMinBatches - 1}, ""},
		{"one writer", map[string]int{"b": 100}, "b"},
		{"exactly the share", map[string]int{"b": 90, "a": 10}, "b"},
		{"just under the share", map[string]int{"b": 89, "a": 11}, ""},
		{"two writers", map[string]int{"a": 50, "b": 50}, ""},
		{"three writers, one dominant", map[string]int{"a": 2, "b": 95, "c": 3}, "b"},
		{"minimum batches, one writer", map[string]int{"c": placementMinBatches}, "c"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := dominantWriter(tc.counts)
			if got != tc.want || ok != (tc.want != "") {
				t.Fatalf("dominantWriter(%v) = %q, %v; want %q", tc.counts, got, ok, tc.want)
			}
		})
	}
}

// TestPlacerMovesOnlyForASustainedWriter steps the placer through windows
// and checks when it asks to move leadership.
func TestPlacerMovesOnlyForASustainedWriter(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	win := func(i int) time.Time { return t0.Add(time.Duration(i) * placementWindow) }
	heavy := func(site string) map[string]int { return map[string]int{site: 200} }
	settleWindows := int(placementSettle / placementWindow)

	t.Run("waits out the settle time after taking office", func(t *testing.T) {
		p := placer{self: "a"}
		moved := -1
		for i := 0; i <= settleWindows+placementStreak; i++ {
			if got := p.observe(win(i), true, heavy("b")); got != "" {
				if got != "b" {
					t.Fatalf("window %d: moved to %q, want b", i, got)
				}
				moved = i
				break
			}
		}
		if moved != settleWindows {
			t.Fatalf("moved at window %d, want %d (settle %v)", moved, settleWindows, placementSettle)
		}
	})

	t.Run("needs the streak", func(t *testing.T) {
		p := placer{self: "a"}
		p.observe(win(0), true, nil) // took office long ago
		i := settleWindows + 1
		if got := p.observe(win(i), true, heavy("b")); got != "" && placementStreak > 1 {
			t.Fatalf("moved to %q after one window", got)
		}
		// Another writer interrupts the streak.
		if got := p.observe(win(i+1), true, heavy("c")); got != "" {
			t.Fatalf("moved to %q when the dominant site changed", got)
		}
		if got := p.observe(win(i+2), true, map[string]int{"b": 50, "c": 50}); got != "" {
			t.Fatalf("moved to %q with two writers", got)
		}
		var got string
		for j := 0; j < placementStreak; j++ {
			got = p.observe(win(i+3+j), true, heavy("b"))
		}
		if got != "b" {
			t.Fatalf("after %d windows of b: got %q, want b", placementStreak, got)
		}
		// The streak starts again after a move request.
		if got := p.observe(win(i+3+placementStreak), true, heavy("b")); got != "" && placementStreak > 1 {
			t.Fatalf("moved again at once to %q", got)
		}
	})

	t.Run("never moves to itself", func(t *testing.T) {
		p := placer{self: "a"}
		for i := 0; i < 3*settleWindows; i++ {
			if got := p.observe(win(i), true, heavy("a")); got != "" {
				t.Fatalf("window %d: moved to %q while the leader itself writes", i, got)
			}
		}
	})

	t.Run("a follower forgets", func(t *testing.T) {
		p := placer{self: "a"}
		for i := 0; i < settleWindows; i++ {
			p.observe(win(i), true, heavy("b"))
		}
		p.observe(win(settleWindows), false, heavy("b"))
		if !p.leaderSince.IsZero() || p.streak != 0 {
			t.Fatalf("placer kept state while not leader: %+v", p)
		}
		// Back in office: the settle time counts from now.
		j := settleWindows + 1
		if got := p.observe(win(j), true, heavy("b")); got != "" {
			t.Fatalf("moved to %q right after taking office again", got)
		}
	})
}

func TestWriteOriginsCounts(t *testing.T) {
	var w writeOrigins
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 100; j++ {
				w.note("b")
			}
		}()
	}
	w.note("")                                   // no origin header: ignored
	w.note(strings.Repeat("x", maxOriginName+1)) // oversized: ignored
	wg.Wait()
	got := w.take()
	if len(got) != 1 || got["b"] != 800 {
		t.Fatalf("counts %v, want b=800 only", got)
	}
	if again := w.take(); len(again) != 0 {
		t.Fatalf("a new window starts empty, got %v", again)
	}
}
