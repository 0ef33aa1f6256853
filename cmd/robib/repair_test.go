package main

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/robib/robib/cluster"
	"github.com/robib/robib/cmd/internal/api"
)

// repairAPI is an admin API stand-in for `volume repair`: volume v of 3
// MiB, and a repair answer per range offset.
func repairAPI(t *testing.T, answers map[int64]cluster.RepairResult) (*httptest.Server, *[]api.RepairRequest) {
	t.Helper()
	var mu sync.Mutex
	var got []api.RepairRequest
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		switch {
		case r.Method == http.MethodGet && r.URL.Path == "/v1/volumes/v":
			json.NewEncoder(w).Encode(api.Volume{Name: "v", Size: 3 << 20, BlockSize: 4096})
		case r.Method == http.MethodPost && r.URL.Path == "/v1/volumes/v/repair":
			var req api.RepairRequest
			if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
				t.Errorf("repair request: %v", err)
			}
			mu.Lock()
			got = append(got, req)
			mu.Unlock()
			res := answers[req.Offset]
			res.Volume, res.Offset, res.Length, res.ChunkSize = "v", req.Offset, req.Length, req.ChunkSize
			json.NewEncoder(w).Encode(res)
		default:
			w.WriteHeader(http.StatusNotFound)
			w.Write([]byte(`{"error":"not found"}`))
		}
	}))
	t.Cleanup(srv.Close)
	return srv, &got
}

// `volume repair` walks the volume range by range, prints every change
// with site, offset and length, reports chunks without a majority and
// exits non-zero for them; --site reaches every request; --json gives the
// same as JSON.
func TestVolumeRepairCLI(t *testing.T) {
	sites := []string{"s1", "s2", "s3"}
	answers := map[int64]cluster.RepairResult{
		0: {Chunks: 1, Sites: sites, Repairs: []cluster.ChunkRepair{{Site: "s2", Offset: 0, Length: 1 << 20, Sources: []string{"s1", "s3"}, RepairedBytes: 1 << 20}}},
		1 << 20: {Chunks: 1, Sites: sites, NoMajority: []cluster.VerifyChunkDiff{{Offset: 1 << 20, Length: 1 << 20,
			Hashes: map[string]string{"s1": "aaaaaaaaaaaaaaaa", "s2": "bbbbbbbbbbbbbbbb", "s3": "cccccccccccccccc"}}}},
		2 << 20: {Chunks: 1, Sites: sites},
	}
	srv, got := repairAPI(t, answers)
	out, err := runCLIOut(t, "--api", srv.URL, "volume", "repair", "v", "--range-size", "1MiB", "--site", "s2", "-q")
	if !errors.Is(err, errRepairIncomplete) {
		t.Fatalf("err %v, want errRepairIncomplete (a chunk has no majority)", err)
	}
	for _, want := range []string{
		"repaired site s2 offset 0 length 1048576 from [s1 s3] (1MiB written)",
		"NO MAJORITY at offset 1048576 (+1048576): not repaired; s1=aaaaaaaaaaaa s2=bbbbbbbbbbbb s3=cccccccccccc",
		"1 chunk repairs (0 failed), 1MiB written; 1 chunks without a majority, 0 still differing",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output does not say %q:\n%s", want, out)
		}
	}
	if len(*got) != 3 {
		t.Fatalf("%d repair requests, want 3", len(*got))
	}
	for i, r := range *got {
		if r.Offset != int64(i)<<20 || r.Length != 1<<20 || r.ChunkSize != 1<<20 || r.Site != "s2" {
			t.Errorf("request %d: %+v", i, r)
		}
	}

	answers[1<<20] = cluster.RepairResult{Chunks: 1, Sites: sites}
	out, err = runCLIOut(t, "--api", srv.URL, "volume", "repair", "v", "--range-size", "1MiB", "--json")
	if err != nil {
		t.Fatalf("repair with nothing left: %v", err)
	}
	var sum repairSummary
	if err := json.Unmarshal([]byte(out), &sum); err != nil {
		t.Fatalf("--json output: %v\n%s", err, out)
	}
	if !sum.OK || sum.Chunks != 3 || len(sum.Repairs) != 1 || sum.RepairedBytes != 1<<20 || sum.Repairs[0].Site != "s2" || len(sum.Sites) != 3 {
		t.Fatalf("summary %+v", sum)
	}

	for _, bad := range [][]string{
		{"--chunk-size", "1000"},
		{"--chunk-size", "1MiB", "--range-size", "1536KiB"},
		{"--range-size", "128MiB"},
	} {
		if _, err := runCLIOut(t, append([]string{"--api", srv.URL, "volume", "repair", "v"}, bad...)...); err == nil || !strings.Contains(err.Error(), "must be a multiple") {
			t.Errorf("%v: %v, want a usage error", bad, err)
		}
	}
}
