package cluster

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"
)

func randData(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// A read of damaged blocks gets them from a peer, repairs them, and
// returns the right bytes, for aligned and unaligned ranges.
func TestHealReadFetchesAndRepairs(t *testing.T) {
	const size = 64 << 10
	sites := newHealSites(t, size, "a", "b", "c")
	a, b := sites[0], sites[1]
	truth := randData(1, size)
	writeAt(truth, 0, sites...)
	a.vol.corrupt(4096, 8192) // blocks 1 and 2
	a.vol.corrupt(40000, 10)  // inside block 9
	if bytes.Equal(a.vol.bytesAt(0, size), truth) {
		t.Fatal("corruption changed nothing")
	}

	p := make([]byte, 10000)
	if err := a.heal.ReadAt(testCtx(t), a.vol, p, 5000); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p, truth[5000:15000]) {
		t.Fatal("unaligned read of damaged blocks returned wrong bytes")
	}
	if got := a.vol.Damaged(); len(got) != 1 || got[0] != (Range{Off: 36864, Len: 4096}) {
		t.Fatalf("after repairing blocks 1-3: damaged %v, want only block 9", got)
	}
	const warned = "read its damaged blocks from other sites"
	if a.log.count(slog.LevelWarn, warned) != 1 || !strings.Contains(a.log.texts(), "ranges=[4096,+8192)") ||
		!strings.Contains(a.log.texts(), "sources=[b]") || !strings.Contains(a.log.texts(), "site=a") {
		t.Fatalf("the damaged read was not logged with its ranges and source:\n%s", a.log.texts())
	}
	p = make([]byte, size)
	if err := a.heal.ReadAt(testCtx(t), a.vol, p, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p, truth) || !bytes.Equal(a.vol.bytesAt(0, size), b.vol.bytesAt(0, size)) {
		t.Fatal("whole read or the repaired copy differs from the peer's")
	}
	if d := a.vol.Damaged(); len(d) != 0 {
		t.Fatalf("still damaged: %v", d)
	}
	if n := a.log.count(slog.LevelWarn, warned); n != 1 {
		t.Fatalf("a second damaged read within %v logged at WARN again (%d records)", readWarnEvery, n)
	}
	if got := a.heal.repairedBytes.Load(); got != 3*4096 {
		t.Fatalf("repaired %d bytes, want %d", got, 3*4096)
	}
	if got := a.heal.remoteBytes.Load(); got != 3*4096 {
		t.Fatalf("read %d bytes from peers, want %d (only the damaged blocks)", got, 3*4096)
	}
}

// The interleaving that repair must survive: a peer's bytes are read at
// index 1; before they are written back, this site applies entry 2, a
// partial write into the damaged block (which stays damaged). Writing the
// peer's bytes now would lose entry 2's write. Repair must leave the block
// alone (it was touched after the token), and the read must fetch again
// with a fresh token and return the block as entry 2 left it.
func TestHealNeverWritesStaleRemoteBytes(t *testing.T) {
	const size = 16 << 10
	sites := newHealSites(t, size, "a", "b")
	a, b := sites[0], sites[1]
	x := randData(2, size)
	writeAt(x, 0, a, b) // index 1
	a.vol.corrupt(0, 4096)
	y := []byte("entry two wrote this")
	want := append([]byte(nil), x...)
	copy(want[100:], y)

	var hookErr error
	a.vol.onRepair = func(call int) {
		switch call {
		case 1:
			// The peer's bytes (index 1) are in hand and this site has
			// applied index 1: entry 2 lands now, here and at the peer.
			writeAt(y, 100, a, b)
		case 2:
			a.vol.mu.Lock()
			if _, ok := a.vol.written[0]; ok {
				hookErr = errors.New("the first repair wrote the peer's index-1 bytes over a block written at index 2")
			}
			a.vol.mu.Unlock()
		}
	}
	p := make([]byte, size)
	if err := a.heal.ReadAt(testCtx(t), a.vol, p, 0); err != nil {
		t.Fatal(err)
	}
	if hookErr != nil {
		t.Fatal(hookErr)
	}
	if a.vol.repairs != 2 {
		t.Fatalf("%d repairs, want 2 (one refused for the block written after the token, one with a fresh token)", a.vol.repairs)
	}
	if !bytes.Equal(p, want) {
		t.Fatal("the read lost entry 2's write")
	}
	if !bytes.Equal(a.vol.bytesAt(0, size), want) || !bytes.Equal(a.vol.written[0], want[:4096]) {
		t.Fatal("the repaired copy lost entry 2's write")
	}
}

// A peer ahead of this site: the repair waits until this site has applied
// the index the peer's bytes reflect.
func TestHealWaitsForLocalApply(t *testing.T) {
	const size = 16 << 10
	sites := newHealSites(t, size, "a", "b")
	a, b := sites[0], sites[1]
	x := randData(3, size)
	writeAt(x, 0, a, b) // index 1
	w := randData(4, 4096)
	writeAt(w, 4096, b) // index 2, at b only so far: it touches block 1
	a.vol.corrupt(0, 4096)
	waiting := make(chan uint64, 1)
	a.fsm.mu.Lock()
	a.fsm.waiting = waiting
	a.fsm.mu.Unlock()

	done := make(chan error, 1)
	p := make([]byte, size)
	go func() { done <- a.heal.ReadAt(testCtx(t), a.vol, p, 0) }()
	select {
	case idx := <-waiting:
		if idx != 2 {
			t.Fatalf("waited for index %d, want 2 (the peer's)", idx)
		}
	case err := <-done:
		t.Fatalf("returned before this site applied the peer's index: %v", err)
	}
	select {
	case err := <-done:
		t.Fatalf("returned while this site is at index 1: %v", err)
	default:
	}
	writeAt(w, 4096, a)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	want := append([]byte(nil), x...)
	copy(want[4096:], w)
	if !bytes.Equal(p, want) || !bytes.Equal(a.vol.bytesAt(0, size), want) {
		t.Fatal("wrong bytes after the wait")
	}
}

// Peers that refuse (damaged there too, behind, not exact) are skipped; a
// healthy one serves.
func TestHealSkipsRefusingPeers(t *testing.T) {
	const size = 16 << 10
	for _, c := range []struct {
		name   string
		spoil  func(b *healSite)
		reason string
	}{
		{"damaged there too", func(b *healSite) { b.vol.corrupt(0, 10) }, "its own copy of v is damaged at [0,+4096)"},
		{"behind", func(b *healSite) { b.fsm.mu.Lock(); b.fsm.applied = 0; b.fsm.mu.Unlock() }, "it has applied index 0, the read needs 1"},
		{"not exact", func(b *healSite) { b.fsm.mu.Lock(); b.fsm.inexact = true; b.fsm.mu.Unlock() }, "not exact at its applied index"},
		{"no such volume", func(b *healSite) { b.heal.vols = fakeVolumes{} }, `volume "v": volume not found`},
	} {
		t.Run(c.name, func(t *testing.T) {
			sites := newHealSites(t, size, "a", "b", "c")
			a, b, cc := sites[0], sites[1], sites[2]
			b.heal.catchUp = 20 * time.Millisecond
			x := randData(5, size)
			writeAt(x, 0, sites...)
			a.vol.corrupt(0, 4096)
			c.spoil(b)
			p := make([]byte, size)
			if err := a.heal.ReadAt(testCtx(t), a.vol, p, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(p, x) || !bytes.Equal(a.vol.bytesAt(0, size), cc.vol.bytesAt(0, size)) {
				t.Fatal("wrong bytes")
			}
			// b's refusal, seen directly.
			_, _, err := a.heal.rpc.readRange(testCtx(t), b.api, "v", 0, 4096, 1)
			if !errors.Is(err, ErrPeerRefused) || !strings.Contains(err.Error(), c.reason) {
				t.Fatalf("refusal %v, want ErrPeerRefused saying %q", err, c.reason)
			}
		})
	}
}

// When no peer can serve a damaged block the read fails with
// ErrNoHealthyCopy naming every peer's reason, and nothing is written.
func TestHealAllPeersRefuse(t *testing.T) {
	const size = 16 << 10
	sites := newHealSites(t, size, "a", "b", "c")
	a, b, c := sites[0], sites[1], sites[2]
	writeAt(randData(6, size), 0, sites...)
	a.vol.corrupt(8192, 4096)
	b.vol.corrupt(8192, 1)
	c.vol.corrupt(9000, 1)
	p := make([]byte, size)
	err := a.heal.ReadAt(testCtx(t), a.vol, p, 0)
	if !errors.Is(err, ErrNoHealthyCopy) {
		t.Fatalf("err %v, want ErrNoHealthyCopy", err)
	}
	for _, want := range []string{"b: ", "c: ", "damaged at [8192,+4096)"} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("error %q does not say %q", err, want)
		}
	}
	if a.vol.repairs != 0 || len(a.vol.Damaged()) != 1 {
		t.Fatalf("%d repairs, damaged %v: nothing should have changed", a.vol.repairs, a.vol.Damaged())
	}
	if a.log.count(slog.LevelWarn, "could not be served") != 1 {
		t.Fatalf("the failed read was not logged: %s", a.log.texts())
	}

	// A lone site has nobody to ask.
	lone := newHealSites(t, size, "z")[0]
	lone.vol.corrupt(0, 1)
	if err := lone.heal.ReadAt(testCtx(t), lone.vol, p, 0); !errors.Is(err, ErrNoHealthyCopy) || !strings.Contains(err.Error(), "no other voter") {
		t.Fatalf("lone site: %v", err)
	}
}

// A disk that refuses the repair: the read still returns the peer's bytes
// (nothing was written to the volume since the token), and the blocks
// stay damaged. If every attempt sees a write since its token, the read
// fails instead of guessing.
func TestHealServesRemoteWhenDiskUnwritable(t *testing.T) {
	const size = 16 << 10
	sites := newHealSites(t, size, "a", "b")
	a, b := sites[0], sites[1]
	x := randData(7, size)
	writeAt(x, 0, a, b)
	a.vol.corrupt(4096, 4096)
	a.vol.repairErr = errDiskFull
	p := make([]byte, size)
	if err := a.heal.ReadAt(testCtx(t), a.vol, p, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p, x) {
		t.Fatal("wrong bytes served from the peer")
	}
	if d := a.vol.Damaged(); len(d) != 1 || a.heal.servedRemote.Load() != 4096 {
		t.Fatalf("damaged %v, served %d remote bytes: want the block still damaged and 4096 served", d, a.heal.servedRemote.Load())
	}

	// A writer that lands an entry (elsewhere in the volume) during every
	// attempt: the peer's bytes can never be shown correct.
	a.vol.onRepair = func(int) { writeAt([]byte{1}, 0, a, b) }
	err := a.heal.ReadAt(testCtx(t), a.vol, p, 0)
	if !errors.Is(err, ErrNoHealthyCopy) || !strings.Contains(err.Error(), "attempts") {
		t.Fatalf("err %v, want ErrNoHealthyCopy after %d attempts", err, maxHealAttempts)
	}
}

// The background rebuild repairs every damaged range, in chunks, logs the
// damage at WARN and the repair at INFO, once.
func TestRebuildPassRepairsEverything(t *testing.T) {
	const size = 3 << 20
	sites := newHealSites(t, size, "a", "b", "c")
	a, b := sites[0], sites[1]
	writeAt(randData(8, size), 0, sites...)
	a.vol.corrupt(512<<10, 2<<20) // across three 1 MiB chunks
	a.vol.corrupt(size-100, 100)
	a.heal.rate = 1 << 30
	want := rangeBytes(blockSpan(a.vol.Damaged(), 0, size, size))
	st := a.heal.degraded()
	if len(st) != 1 || st[0].Volume != "v" || st[0].DamagedBytes != want || st[0].Ranges != 2 || len(st[0].First) != 2 {
		t.Fatalf("degraded %+v", st)
	}
	a.heal.rebuildPass(testCtx(t))
	if d := a.vol.Damaged(); len(d) != 0 {
		t.Fatalf("still damaged after a pass: %v", d)
	}
	if !bytes.Equal(a.vol.bytesAt(0, size), b.vol.bytesAt(0, size)) {
		t.Fatal("rebuilt copy differs")
	}
	if a.heal.degraded() != nil {
		t.Fatal("still reported degraded")
	}
	if w, i := a.log.count(slog.LevelWarn, "damaged"), a.log.count(slog.LevelInfo, "repaired"); w != 1 || i != 1 {
		t.Fatalf("%d WARN, %d INFO records, want one each:\n%s", w, i, a.log.texts())
	}
	for _, want := range []string{"site=a", "volume=v", "[524288,+2097152)"} {
		if !strings.Contains(a.log.texts(), want) {
			t.Fatalf("log does not say %q:\n%s", want, a.log.texts())
		}
	}
	a.heal.rebuildPass(testCtx(t))
	if n := len(a.log.recs); n != 2 {
		t.Fatalf("a pass over a healthy copy logged: %s", a.log.texts())
	}
}

// A read that finds damage starts a rebuild pass at once, which repairs
// the rest of the volume.
func TestRebuildRunsAfterDamagedRead(t *testing.T) {
	const size = 64 << 10
	sites := newHealSites(t, size, "a", "b")
	a, b := sites[0], sites[1]
	writeAt(randData(9, size), 0, sites...)
	a.vol.corrupt(0, 10)
	a.vol.corrupt(60000, 10)
	stop := make(chan struct{})
	a.heal.stop, a.heal.interval = stop, time.Hour
	var wg sync.WaitGroup
	wg.Add(1)
	go a.heal.run(&wg)
	defer func() { close(stop); wg.Wait() }()
	p := make([]byte, 4096)
	if err := a.heal.ReadAt(testCtx(t), a.vol, p, 0); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the rebuild after the read", 10*time.Second, func() bool { return len(a.vol.Damaged()) == 0 })
	if !bytes.Equal(a.vol.bytesAt(0, size), b.vol.bytesAt(0, size)) {
		t.Fatal("rebuilt copy differs")
	}
}

// Damage that no client reads is found by a scrub: right after a read
// found damage somewhere in the volume, and every ScrubInterval; never
// at start-up, and never periodically with a negative interval.
func TestScrubFindsUnreadDamage(t *testing.T) {
	const size = 3 << 20
	t.Run("after a damaged read", func(t *testing.T) {
		sites := newHealSites(t, size, "a", "b")
		a, b := sites[0], sites[1]
		writeAt(randData(10, size), 0, sites...)
		a.vol.corruptLatent(100, 10)
		a.vol.corruptLatent(size-5000, 10) // never read
		a.heal.rate = 1 << 30
		a.heal.rebuildPass(testCtx(t)) // the first pass only notes the time
		if a.vol.scrubbed != 0 {
			t.Fatalf("the first pass scrubbed %d bytes", a.vol.scrubbed)
		}
		if err := a.heal.ReadAt(testCtx(t), a.vol, make([]byte, 4096), 0); err != nil {
			t.Fatal(err)
		}
		a.heal.rebuildPass(testCtx(t))
		if a.vol.scrubbed != size || len(a.vol.Damaged()) != 0 {
			t.Fatalf("scrubbed %d of %d bytes; still damaged %v", a.vol.scrubbed, size, a.vol.Damaged())
		}
		if !bytes.Equal(a.vol.bytesAt(0, size), b.vol.bytesAt(0, size)) {
			t.Fatal("the damage no read found was not repaired")
		}
		if a.log.count(slog.LevelWarn, "scrub found damaged") != 1 {
			t.Fatalf("no WARN about what the scrub found:\n%s", a.log.texts())
		}
		a.heal.rebuildPass(testCtx(t))
		if a.vol.scrubbed != size {
			t.Fatalf("a second pass scrubbed again (%d bytes in all)", a.vol.scrubbed)
		}
	})
	t.Run("periodic", func(t *testing.T) {
		sites := newHealSites(t, size, "a", "b")
		a, b := sites[0], sites[1]
		writeAt(randData(11, size), 0, sites...)
		a.heal.rate, a.heal.scrubEvery = 1<<30, time.Nanosecond
		a.heal.rebuildPass(testCtx(t))
		a.vol.corruptLatent(2<<20, 100)
		a.heal.rebuildPass(testCtx(t))
		if !bytes.Equal(a.vol.bytesAt(0, size), b.vol.bytesAt(0, size)) {
			t.Fatal("the periodic scrub did not find and repair the damage")
		}
		if a.log.count(slog.LevelInfo, "scrub found the local copy of a volume intact") != 0 {
			t.Fatalf("logged intact:\n%s", a.log.texts())
		}
	})
	t.Run("off", func(t *testing.T) {
		sites := newHealSites(t, size, "a", "b")
		a := sites[0]
		writeAt(randData(12, size), 0, sites...)
		a.heal.rate, a.heal.scrubEvery = 1<<30, -1
		a.heal.rebuildPass(testCtx(t))
		a.vol.corruptLatent(0, 10)
		a.heal.rebuildPass(testCtx(t))
		if a.vol.scrubbed != 0 {
			t.Fatalf("scrubbed %d bytes with scrubs off", a.vol.scrubbed)
		}
	})
}

// The pacer keeps a pass at the configured rate.
func TestPacer(t *testing.T) {
	pace := pacer(10 << 20) // 10 MiB/s
	start := time.Now()
	for range 4 {
		if err := pace(context.Background(), 1<<20); err != nil {
			t.Fatal(err)
		}
	}
	if el := time.Since(start); el < 350*time.Millisecond {
		t.Fatalf("4 MiB at 10 MiB/s took %v", el)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := pacer(1)(ctx, 1<<20); !errors.Is(err, context.Canceled) {
		t.Fatalf("canceled pace: %v", err)
	}
	if pacer(0) != nil {
		t.Fatal("rate 0 paces")
	}
}

func TestBlockSpan(t *testing.T) {
	for _, c := range []struct {
		in           []Range
		lo, hi, size int64
		want         []Range
	}{
		{[]Range{{Off: 5000, Len: 10}}, 0, 1 << 20, 1 << 20, []Range{{Off: 4096, Len: 4096}}},
		{[]Range{{Off: 8192, Len: 4096}, {Off: 0, Len: 4096}}, 0, 1 << 20, 1 << 20, []Range{{Off: 0, Len: 4096}, {Off: 8192, Len: 4096}}},
		{[]Range{{Off: 0, Len: 4096}, {Off: 4096, Len: 4096}}, 0, 1 << 20, 1 << 20, []Range{{Off: 0, Len: 8192}}},
		{[]Range{{Off: 0, Len: 1 << 20}}, 5000, 6000, 1 << 20, []Range{{Off: 4096, Len: 4096}}},
		{[]Range{{Off: 10000, Len: 100}}, 0, 10050, 10050, []Range{{Off: 8192, Len: 10050 - 8192}}},
		{[]Range{{Off: 0, Len: 100}}, 200, 300, 1 << 20, nil},
	} {
		if got := blockSpan(c.in, c.lo, c.hi, c.size); !equalRanges(got, c.want) {
			t.Errorf("blockSpan(%v, %d, %d, %d) = %v, want %v", c.in, c.lo, c.hi, c.size, got, c.want)
		}
	}
	got := subtractRanges([]Range{{Off: 0, Len: 16384}}, []remoteCopy{{r: Range{Off: 4096, Len: 4096}}, {r: Range{Off: 12288, Len: 4096}}})
	if want := []Range{{Off: 0, Len: 4096}, {Off: 8192, Len: 4096}}; !equalRanges(got, want) {
		t.Errorf("subtractRanges = %v, want %v", got, want)
	}
}

func equalRanges(a, b []Range) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
