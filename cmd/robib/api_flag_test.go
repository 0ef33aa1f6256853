package main

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
)

// countingAPI is an admin API stand-in that counts the requests it gets
// and answers every one with an empty volume list.
func countingAPI(t *testing.T) (*httptest.Server, *atomic.Int64) {
	t.Helper()
	var n atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte("[]"))
	}))
	t.Cleanup(srv.Close)
	return srv, &n
}

func runCLI(t *testing.T, args ...string) error {
	t.Helper()
	root := newRootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	return root.Execute()
}

// TestCLIAPIFromEnvAndFlag: client commands talk to ROBIB_API, and --api
// wins over it.
func TestCLIAPIFromEnvAndFlag(t *testing.T) {
	env, envHits := countingAPI(t)
	flag, flagHits := countingAPI(t)
	t.Setenv("ROBIB_API", env.URL)
	if err := runCLI(t, "volume", "list", "--json"); err != nil {
		t.Fatalf("volume list via ROBIB_API: %v", err)
	}
	if envHits.Load() == 0 || flagHits.Load() != 0 {
		t.Fatalf("ROBIB_API: %d requests there, %d elsewhere", envHits.Load(), flagHits.Load())
	}
	before := envHits.Load()
	if err := runCLI(t, "--api", flag.URL, "volume", "list", "--json"); err != nil {
		t.Fatalf("volume list via --api: %v", err)
	}
	if flagHits.Load() == 0 || envHits.Load() != before {
		t.Fatalf("--api: %d requests there, %d more to ROBIB_API", flagHits.Load(), envHits.Load()-before)
	}
}
