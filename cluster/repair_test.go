package cluster

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// hashVerifier verifies by hashing the fake sites' volumes directly, as
// every site's FSM would at one index.
type hashVerifier struct {
	sites       []*healSite
	unreachable map[string]string
	calls       int
}

func (h *hashVerifier) VerifyRange(_ context.Context, vol string, off, length, chunk int64) (VerifyResult, error) {
	h.calls++
	res := VerifyResult{Volume: vol, Index: 1, Offset: off, Length: length, ChunkSize: chunk, Unreachable: maps.Clone(h.unreachable)}
	if res.Unreachable == nil {
		res.Unreachable = map[string]string{}
	}
	var live []*healSite
	for _, s := range h.sites {
		if _, ok := h.unreachable[s.name]; !ok {
			live = append(live, s)
			res.Sites = append(res.Sites, s.name)
		}
	}
	for co := off; co < off+length; co += chunk {
		n := min(chunk, off+length-co)
		res.Chunks++
		hashes := map[string]string{}
		differ := false
		for _, s := range live {
			sum := sha256.Sum256(s.vol.bytesAt(co, n))
			hashes[s.name] = hex.EncodeToString(sum[:])
			differ = differ || hashes[s.name] != hashes[live[0].name]
		}
		if differ {
			res.Mismatches = append(res.Mismatches, VerifyChunkDiff{Offset: co, Length: n, Hashes: hashes})
		}
	}
	return res, nil
}

// healBook is the sites' address book.
type healBook []*healSite

func (b healBook) memberMeta(site string) (siteMeta, bool) {
	for _, s := range b {
		if s.name == site {
			return siteMeta{API: s.api}, true
		}
	}
	return siteMeta{}, false
}

func newRepairer(coord *healSite, v *hashVerifier, book healBook) *repairer {
	return &repairer{self: coord.name, log: slog.New(slog.DiscardHandler), verify: v, heal: coord.heal, book: book,
		rpc: coord.heal.rpc.(*rpcClient)}
}

// A chunk that one site holds differently from the two others is repaired
// there from those two only (not from a fourth site that also has other
// bytes and that the minority site would otherwise ask first); the range
// verifies identical afterwards.
func TestRepairRangeFromMajority(t *testing.T) {
	const size = 256 << 10
	sites := newHealSites(t, size, "a", "b", "c", "x")
	a, b, c, x := sites[0], sites[1], sites[2], sites[3]
	writeAt(randData(20, size), 0, sites...)
	bad := randData(21, 4096)
	c.vol.write(bad, 70000) // behind the log: c diverges in chunk 1 (64 KiB chunks)
	x.vol.write(bad, 70000) // so does x, which is no voter
	c.heal.sources = fixedSources{{name: "x", api: x.api}, {name: "a", api: a.api}, {name: "b", api: b.api}}
	v := &hashVerifier{sites: sites[:3]}
	res, err := newRepairer(a, v, healBook(sites)).RepairRange(testCtx(t), "v", 0, size, 64<<10, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Repairs) != 1 || len(res.NoMajority) != 0 || len(res.Remaining) != 0 || res.Voters != 3 || res.Chunks != 4 {
		t.Fatalf("result %+v", res)
	}
	r := res.Repairs[0]
	if r.Site != "c" || r.Offset != 64<<10 || r.Length != 64<<10 || !slices.Equal(r.Sources, []string{"a", "b"}) || r.Error != "" || r.RepairedBytes != 64<<10 {
		t.Fatalf("repair %+v", r)
	}
	if !bytes.Equal(c.vol.bytesAt(0, size), a.vol.bytesAt(0, size)) {
		t.Fatal("c was not repaired to the majority's bytes")
	}
	if v.calls != 2 {
		t.Fatalf("%d verifies, want 2 (find, then check)", v.calls)
	}
	if c.log.count(slog.LevelWarn, "differs from the majority") != 1 {
		t.Fatalf("the minority site did not log its repair: %s", c.log.texts())
	}
}

// The coordinator may itself hold the minority copy.
func TestRepairRangeAtCoordinator(t *testing.T) {
	const size = 64 << 10
	sites := newHealSites(t, size, "a", "b", "c")
	a, b := sites[0], sites[1]
	writeAt(randData(22, size), 0, sites...)
	a.vol.write([]byte("wrong"), 5) // behind the log: a divergence
	res, err := newRepairer(a, &hashVerifier{sites: sites}, healBook(sites)).RepairRange(testCtx(t), "v", 0, size, 16<<10, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Repairs) != 1 || res.Repairs[0].Site != "a" || res.Repairs[0].Error != "" || len(res.Remaining) != 0 {
		t.Fatalf("result %+v", res)
	}
	if !bytes.Equal(a.vol.bytesAt(0, size), b.vol.bytesAt(0, size)) {
		t.Fatal("a not repaired")
	}
}

// No strict majority of the voters, no repair: three different copies, a
// two-voter split, and a split where the third voter did not answer.
func TestRepairRangeNeedsStrictMajority(t *testing.T) {
	const size = 16 << 10
	for _, c := range []struct {
		name        string
		sites       []string
		differ      []string // each writes its own bytes
		unreachable string
	}{
		{"all differ", []string{"a", "b", "c"}, []string{"b", "c"}, ""},
		{"two voters", []string{"a", "b"}, []string{"b"}, ""},
		{"one of three unreachable", []string{"a", "b", "c"}, []string{"b"}, "c"},
	} {
		t.Run(c.name, func(t *testing.T) {
			sites := newHealSites(t, size, c.sites...)
			writeAt(randData(23, size), 0, sites...)
			before := map[string][]byte{}
			for i, s := range sites {
				if slices.Contains(c.differ, s.name) {
					s.vol.write(randData(uint64(30+i), 100), 0) // behind the log: a divergence
				}
				before[s.name] = s.vol.bytesAt(0, size)
			}
			v := &hashVerifier{sites: sites}
			if c.unreachable != "" {
				v.unreachable = map[string]string{c.unreachable: "down"}
			}
			res, err := newRepairer(sites[0], v, healBook(sites)).RepairRange(testCtx(t), "v", 0, size, 4096, "")
			if err != nil {
				t.Fatal(err)
			}
			if len(res.NoMajority) != 1 || len(res.Repairs) != 0 || res.Voters != len(c.sites) {
				t.Fatalf("result %+v", res)
			}
			for _, s := range sites {
				if !bytes.Equal(s.vol.bytesAt(0, size), before[s.name]) || s.vol.repairs != 0 {
					t.Fatalf("site %s changed", s.name)
				}
			}
			if v.calls != 1 {
				t.Fatalf("%d verifies: nothing was repaired, nothing to check", v.calls)
			}
		})
	}
}

// --site limits the repairs to one site; other minority chunks are
// reported as remaining.
func TestRepairRangeOneSite(t *testing.T) {
	const size = 32 << 10
	sites := newHealSites(t, size, "a", "b", "c")
	a, b, c := sites[0], sites[1], sites[2]
	writeAt(randData(24, size), 0, sites...)
	c.vol.write([]byte("c is wrong"), 0)     // behind the log: a divergence
	b.vol.write([]byte("b is wrong"), 20000) // behind the log: a divergence
	v := &hashVerifier{sites: sites}
	rep := newRepairer(a, v, healBook(sites))
	res, err := rep.RepairRange(testCtx(t), "v", 0, size, 16<<10, "c")
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Repairs) != 1 || res.Repairs[0].Site != "c" || len(res.Remaining) != 1 || res.Remaining[0].Offset != 16<<10 {
		t.Fatalf("result %+v", res)
	}
	if b.vol.repairs != 0 || !bytes.Equal(c.vol.bytesAt(0, 16<<10), a.vol.bytesAt(0, 16<<10)) {
		t.Fatal("repaired the wrong site")
	}
	if _, err := rep.RepairRange(testCtx(t), "v", 0, size, 16<<10, "zz"); !errors.Is(err, ErrUnknownSite) {
		t.Fatalf("unknown site: %v", err)
	}
	v.unreachable = map[string]string{"c": "down"}
	if _, err := rep.RepairRange(testCtx(t), "v", 0, size, 16<<10, "c"); !errors.Is(err, ErrRetry) || !strings.Contains(err.Error(), "down") {
		t.Fatalf("unreachable site: %v", err)
	}
	for _, bad := range [][2]int64{{100, 4096}, {0, 1000}, {-4096, 4096}, {0, 0}} {
		if _, err := rep.RepairRange(testCtx(t), "v", bad[0], size, bad[1], ""); !errors.Is(err, ErrInvalidRequest) {
			t.Fatalf("offset %d chunk %d: %v", bad[0], bad[1], err)
		}
	}
}

// Every malformed internal repair request is a 400 with its reason, and
// changes nothing.
func TestRepairRequestBadInput(t *testing.T) {
	s := newHealSites(t, 64<<10, "a")[0]
	for _, c := range []struct{ body, reason string }{
		{``, "EOF"},
		{`not json`, "invalid character"},
		{`[]`, "cannot unmarshal array"},
		{`{"version":1,"volume":"v","offset":0,"length":4096,"sources":["b"]} {}`, "trailing data"},
		{`{"version":1,"volume":"v","offset":0,"length":4096,"sources":["b"],"x":1}`, `unknown field "x"`},
		{`{"version":2,"volume":"v","offset":0,"length":4096,"sources":["b"]}`, "version 2 (this site reads 1)"},
		{`{"volume":"v","offset":0,"length":4096,"sources":["b"]}`, "version 0"},
		{`{"version":1,"volume":"..","offset":0,"length":4096,"sources":["b"]}`, "volume: "},
		{`{"version":1,"volume":"v","offset":-1,"length":4096,"sources":["b"]}`, "range [-1, +4096)"},
		{`{"version":1,"volume":"v","offset":0,"length":0,"sources":["b"]}`, "range [0, +0)"},
		{`{"version":1,"volume":"v","offset":0,"length":67108865,"sources":["b"]}`, "at most 67108864"},
		{`{"version":1,"volume":"v","offset":1125899906842620,"length":4096,"sources":["b"]}`, "range ["},
		{`{"version":1,"volume":"v","offset":0,"length":4096,"sources":[]}`, "0 sources"},
		{`{"version":1,"volume":"v","offset":0,"length":4096}`, "0 sources"},
		{`{"version":1,"volume":"v","offset":0,"length":4096,"sources":["a"]}`, "cannot repair from itself"},
		{`{"version":1,"volume":"v","offset":0,"length":4096,"sources":["b","b"]}`, "source b twice"},
		{`{"version":1,"volume":"v","offset":0,"length":4096,"sources":[""]}`, `source ""`},
	} {
		resp, err := http.Post("http://"+s.api+pathRepair, "application/json", strings.NewReader(c.body))
		if err != nil {
			t.Fatal(err)
		}
		e := statusError(resp)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(e.Error(), c.reason) {
			t.Errorf("%s: %d %v, want 400 saying %q", c.body, resp.StatusCode, e, c.reason)
		}
	}
	if s.vol.repairs != 0 || len(s.vol.Damaged()) != 0 {
		t.Fatal("a bad request changed the volume")
	}
	// A well-formed request for a volume the site lacks fails without a 400.
	_, err := s.heal.rpc.(*rpcClient).repair(testCtx(t), s.api, repairRequest{Version: 1, Volume: "w", Length: 4096, Sources: []string{"b"}})
	if err == nil || errors.Is(err, ErrInvalidRequest) || !strings.Contains(err.Error(), "volume not found") {
		t.Fatalf("unknown volume: %v", err)
	}
}

// The internal repair request and reply (version 1) are frozen.
func TestRepairRequestGolden(t *testing.T) {
	for _, c := range []struct {
		file string
		v    any
	}{
		{"repair-request.v1", repairRequest{Version: 1, Volume: "vol-1", Offset: 1 << 20, Length: 1 << 20, Sources: []string{"site1", "site3"}}},
		{"repair-reply.v1", repairReply{Version: 1, RepairedBytes: 8192, DamagedBytes: 4096}},
	} {
		got, err := json.Marshal(c.v)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, '\n')
		path := filepath.Join("testdata", c.file)
		if *updateGolden {
			if err := os.WriteFile(path, got, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%s changed (needs a version bump):\n%s\nwant (frozen):\n%s", c.file, got, want)
		}
	}
	want, _ := os.ReadFile(filepath.Join("testdata", "repair-request.v1"))
	req, err := parseRepairRequest(bytes.TrimSpace(want), "site2")
	if err != nil || req.Volume != "vol-1" || req.Offset != 1<<20 || !slices.Equal(req.Sources, []string{"site1", "site3"}) {
		t.Fatalf("golden request parses to %+v, %v", req, err)
	}
	if string(want) != `{"version":1,"volume":"vol-1","offset":1048576,"length":1048576,"sources":["site1","site3"]}`+"\n" {
		t.Fatalf("unexpected layout: %s", want)
	}
}

func FuzzParseRepairRequest(f *testing.F) {
	f.Add([]byte(`{"version":1,"volume":"v","offset":0,"length":4096,"sources":["b"]}`))
	f.Add([]byte(`{"version":1,"volume":"v","offset":0,"length":4096,"sources":["a","b"]} `))
	f.Fuzz(func(t *testing.T, body []byte) {
		req, err := parseRepairRequest(body, "a")
		if err != nil {
			if !errors.Is(err, ErrInvalidRequest) {
				t.Fatalf("error %v does not wrap ErrInvalidRequest", err)
			}
			return
		}
		again, err := json.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		back, err := parseRepairRequest(again, "a")
		if err != nil || back.Volume != req.Volume || back.Offset != req.Offset || back.Length != req.Length || !slices.Equal(back.Sources, req.Sources) {
			t.Fatalf("%s does not round-trip: %+v %v", body, back, err)
		}
	})
}
