package tests

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/robib/robib/tests/checker"
)

// TestVolumeStatsShowsTheWriteStage: `robib volume stats` reports no stage
// for a volume nobody attached, then, while a client holds a read-write
// attach and has flushed writes, the commits and their latency; unknown
// volumes and bad arguments are errors.
func TestVolumeStatsShowsTheWriteStage(t *testing.T) {
	a := startAgent(t, "st", "16MiB")
	if out := a.MustCLI("volume", "stats", "st"); !strings.Contains(out, "not attached read-write") {
		t.Fatalf("stats before any attach:\n%s", out)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cl, err := checker.Dial(ctx, nil, a.NBDAddr, "st")
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	const writes = 10
	for i := 0; i < writes; i++ {
		if err := cl.Write(ctx, uint64(i)*4096, randomBytes(uint64(i), 4096), false); err != nil {
			t.Fatal(err)
		}
		if err := cl.Flush(ctx); err != nil {
			t.Fatal(err)
		}
	}
	var st struct {
		Volume      string `json:"volume"`
		Attached    bool   `json:"attached"`
		Accepted    uint64 `json:"accepted"`
		Bytes       uint64 `json:"bytes"`
		Commits     uint64 `json:"commits"`
		CommitP50US int64  `json:"commit_p50_us"`
		CommitP99US int64  `json:"commit_p99_us"`
	}
	out := a.MustCLI("volume", "stats", "st", "--json")
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("stats --json: %v\n%s", err, out)
	}
	if !st.Attached || st.Volume != "st" || st.Accepted != writes || st.Bytes != writes*4096 || st.Commits == 0 {
		t.Fatalf("stats after %d flushed 4 KiB writes: %+v", writes, st)
	}
	if st.CommitP50US <= 0 || st.CommitP99US < st.CommitP50US {
		t.Fatalf("commit latency p50 %dµs p99 %dµs: want 0 < p50 <= p99", st.CommitP50US, st.CommitP99US)
	}
	if text := a.MustCLI("volume", "stats", "st"); !strings.Contains(text, "commit latency") || !strings.Contains(text, "p50") {
		t.Fatalf("stats text:\n%s", text)
	}

	for _, bad := range [][]string{{"volume", "stats", "nope"}, {"volume", "stats"}, {"volume", "stats", "a", "b"}} {
		if _, _, err := a.CLI(bad...); err == nil {
			t.Errorf("robib %s succeeded", strings.Join(bad, " "))
		}
	}
	if _, stderr, _ := a.CLI("volume", "stats", "nope"); !strings.Contains(stderr, "not found") && !strings.Contains(stderr, "unknown") {
		t.Errorf("stats of an unknown volume: stderr %q does not say it is unknown", stderr)
	}
}
