package agent

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/robib/robib/cmd/internal/api"
)

// corruptDataFile overwrites bytes of a site's data file of volume name
// behind the agent's back, as a failing disk would.
func corruptDataFile(t *testing.T, s *site, name string, off int64, junk []byte) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(s.a.store.Dir(), "volumes", name, "data"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(junk, off); err != nil {
		t.Fatal(err)
	}
}

func dataFileBytes(t *testing.T, s *site, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(s.a.store.Dir(), "volumes", name, "data"))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The agent path of a damaged copy: bytes of one site's data file are
// overwritten on disk; reads at that site through the read-only export
// and through the read-write export (DCD's local reader) return the right
// data and no error; cluster status shows the site degraded while known
// damage waits for the background rebuild, which repairs it; verify then
// finds every copy identical. A copy that diverged with valid checksums
// is repaired from the majority by volume repair.
func TestDamagedCopyServedAndRepaired(t *testing.T) {
	sites := startCluster(t, 3, nil)
	_, followers := leaderOf(t, sites)
	const size = 8 << 20
	createVolume(t, sites[0], "data", size)
	waitCaughtUp(t, sites)
	model := make([]byte, size)
	e := openExport(t, followers[0], "data")
	writeRandom(t, e, model, 200, 64<<10)
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	e.Close()
	waitCaughtUp(t, sites)
	victim := followers[1]
	v, err := victim.a.store.Get("data")
	if err != nil {
		t.Fatal(err)
	}

	// Read-only export.
	corruptDataFile(t, victim, "data", 1<<20+5, bytes.Repeat([]byte{0xAB}, 5000))
	ro, err := victim.a.backend.Open("data" + staleSuffix)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if _, err := ro.ReadAt(got, 0); err != nil {
		t.Fatalf("read-only export over a damaged copy: %v", err)
	}
	ro.Close()
	if !bytes.Equal(got, model) {
		t.Fatal("read-only export returned wrong bytes")
	}

	// Read-write export: DCD reads the local copy through the repair path.
	corruptDataFile(t, victim, "data", 3<<20, bytes.Repeat([]byte{0xCD}, 4096))
	if got := readAll(t, victim, "data", size); !bytes.Equal(got, model) {
		t.Fatal("read-write export returned wrong bytes")
	}
	if !bytes.Equal(dataFileBytes(t, victim, "data"), dataFileBytes(t, sites[0], "data")) {
		t.Fatal("repair on read left the data file different")
	}

	// Damage that a scrub found and no read touched: the site is degraded
	// until the rebuild (started by the next damaged read) repairs it.
	corruptDataFile(t, victim, "data", 6<<20, []byte("bit rot"))
	corruptDataFile(t, victim, "data", 7<<20, []byte("more rot"))
	if dmg, err := v.Scrub(6<<20, 1<<20); err != nil || len(dmg) != 1 {
		t.Fatalf("scrub: %v %v", dmg, err)
	}
	st, err := svc(sites[0]).ClusterStatus(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	degraded := 0
	for _, s := range st.Sites {
		if s.Name == victim.cfg.Name {
			if len(s.Degraded) != 1 || s.Degraded[0].Volume != "data" || s.Degraded[0].DamagedBytes != 4096 {
				t.Fatalf("status of the damaged site: %+v", s.Degraded)
			}
			degraded++
		} else if len(s.Degraded) != 0 {
			t.Fatalf("healthy site %s reported degraded: %+v", s.Name, s.Degraded)
		}
	}
	if degraded != 1 {
		t.Fatalf("status lists no damaged site: %+v", st.Sites)
	}
	p := make([]byte, 100)
	rd := healingReader{vol: v, node: victim.a.node}
	if _, err := rd.ReadAt(p, 7<<20); err != nil || !bytes.Equal(p, model[7<<20:7<<20+100]) {
		t.Fatalf("read of the second damaged place: %v", err)
	}
	waitFor(t, 30*time.Second, "the background rebuild", func() (bool, error) { return len(v.Damaged()) == 0, nil })
	if !bytes.Equal(dataFileBytes(t, victim, "data"), model) {
		t.Fatal("rebuilt data file differs")
	}
	res, err := svc(sites[2]).VerifyVolume(context.Background(), "data", api.VerifyRequest{Length: size, ChunkSize: 1 << 20})
	if err != nil || len(res.Sites) != 3 || len(res.Mismatches) != 0 {
		t.Fatalf("verify after the repairs: %+v %v", res, err)
	}

	// A divergence with valid checksums: volume repair from the majority.
	if _, err := v.WriteAt([]byte("corruption!"), 5<<20+100); err != nil {
		t.Fatal(err)
	}
	rep, err := svc(sites[0]).RepairVolume(context.Background(), "data", api.RepairRequest{Length: size})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Repairs) != 1 || rep.Repairs[0].Site != victim.cfg.Name || rep.Repairs[0].Offset != 5<<20 || rep.Repairs[0].Error != "" || len(rep.Remaining) != 0 {
		t.Fatalf("repair: %+v", rep)
	}
	if !bytes.Equal(dataFileBytes(t, victim, "data"), model) {
		t.Fatal("volume repair left the copy different")
	}
	if _, err := svc(sites[0]).RepairVolume(context.Background(), "data", api.RepairRequest{Length: size, Site: "nope"}); !errors.Is(err, api.ErrNotFound) {
		t.Fatalf("repair at an unknown site: %v", err)
	}
	if _, err := svc(sites[0]).RepairVolume(context.Background(), "data", api.RepairRequest{Offset: 100, Length: size}); !errors.Is(err, api.ErrBadRequest) {
		t.Fatalf("misaligned repair: %v", err)
	}
}

// --scrub-interval 0 turns the periodic scrub off, which the cluster
// package spells as a negative interval (its 0 means the default).
func TestScrubIntervalFlag(t *testing.T) {
	if got := scrubInterval(0); got >= 0 {
		t.Errorf("scrubInterval(0) = %v, want negative (off)", got)
	}
	if got := scrubInterval(24 * time.Hour); got != 24*time.Hour {
		t.Errorf("scrubInterval(24h) = %v", got)
	}
}
