package cluster

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/robib/robib/fsm"
)

// verifyProposer records the VerifyChunks it is asked to propose and
// answers with index 5.
type verifyProposer struct {
	mu   sync.Mutex
	cmds []*fsm.VerifyChunks
}

func (p *verifyProposer) ApplyAndWait(_ context.Context, cmd fsm.Command) (*fsm.Result, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cmds = append(p.cmds, cmd.(*fsm.VerifyChunks))
	return &fsm.Result{Index: 5}, nil
}

// verifyStore is this site's verify results, by ID once proposed.
type verifyStore struct {
	p      *verifyProposer
	hashes []string
}

func (s verifyStore) WaitApplied(context.Context, uint64) error { return nil }
func (s verifyStore) VerifyResult(id string) (fsm.VerifyReport, bool) {
	s.p.mu.Lock()
	defer s.p.mu.Unlock()
	if len(s.p.cmds) == 0 || s.p.cmds[0].ID != id {
		return fsm.VerifyReport{}, false
	}
	return fsm.VerifyReport{ID: id, Index: 5, Hashes: s.hashes}, true
}

// verifyPeers answers other sites' verify endpoints by API address.
type verifyPeers map[string]fsm.VerifyReport

func (v verifyPeers) getJSON(_ context.Context, addr, path string, out any) error {
	rep, ok := v[strings.TrimSuffix(addr, ":1")]
	if !ok || !strings.HasPrefix(path, pathVerify) || !strings.HasSuffix(path, "?index=5") {
		return errors.New("unreachable")
	}
	*out.(*fsm.VerifyReport) = rep
	return nil
}

func TestVerifyRangeComparesVoters(t *testing.T) {
	p := &verifyProposer{}
	v := &verifier{self: "a", prop: p, config: fakeConfig{"a", "b", "c", "d", "e"}, fsm: verifyStore{p: p, hashes: []string{"h0", "h1", "h2"}},
		book: fakeBook{"b": true, "d": true, "e": true},
		rpc: verifyPeers{
			"b": {Hashes: []string{"h0", "XX", "h2"}},
			"d": {Hashes: []string{"h0", "h1", "h2"}, Fuzzy: true},
			"e": {Error: "disk on fire"},
		}}
	// 2.5 chunks of 4 KiB at 8 KiB.
	res, err := v.VerifyRange(context.Background(), "vol", 8192, 10240, 4096)
	if err != nil {
		t.Fatal(err)
	}
	if len(p.cmds) != 1 || p.cmds[0].Volume != "vol" || p.cmds[0].Off != 8192 || p.cmds[0].Len != 10240 || p.cmds[0].ChunkSize != 4096 || p.cmds[0].ID == "" {
		t.Fatalf("proposed %+v", p.cmds)
	}
	if res.Index != 5 || res.Chunks != 3 || strings.Join(res.Sites, ",") != "a,b" {
		t.Fatalf("result %+v, want index 5, 3 chunks, sites a and b", res)
	}
	for _, site := range []string{"c", "d", "e"} { // not in gossip, replaying, failed
		if res.Unreachable[site] == "" {
			t.Errorf("site %s not reported unreachable: %v", site, res.Unreachable)
		}
	}
	if len(res.Mismatches) != 1 {
		t.Fatalf("mismatches %+v, want chunk 1 only", res.Mismatches)
	}
	if m := res.Mismatches[0]; m.Offset != 12288 || m.Length != 4096 || m.Hashes["a"] != "h1" || m.Hashes["b"] != "XX" {
		t.Fatalf("mismatch %+v", m)
	}
}

func TestVerifyRangeBadInput(t *testing.T) {
	p := &verifyProposer{}
	v := &verifier{self: "a", prop: p, config: fakeConfig{"a"}, fsm: verifyStore{p: p}, book: fakeBook{}, rpc: verifyPeers{}}
	for _, c := range []struct{ off, length, chunk int64 }{
		{0, 0, 4096}, {0, -1, 4096}, {0, MaxVerifyRange + 1, 4096}, {0, 4096, 0}, {0, 4096, -1}, {-1, 4096, 4096},
	} {
		if _, err := v.VerifyRange(context.Background(), "vol", c.off, c.length, c.chunk); !errors.Is(err, ErrInvalidRequest) || IsRetryable(err) {
			t.Errorf("range %+v: %v, want ErrInvalidRequest", c, err)
		}
	}
	if len(p.cmds) != 0 {
		t.Fatalf("a bad range was proposed: %+v", p.cmds)
	}
	// No site answering is an error, not an empty comparison.
	v.fsm = verifyStore{p: &verifyProposer{}}
	if _, err := v.VerifyRange(context.Background(), "vol", 0, 4096, 4096); err == nil {
		t.Fatal("a verify that no site answered succeeded")
	}
}

func TestVerifyEndpoint(t *testing.T) {
	p := &verifyProposer{}
	v := &verifier{self: "a", prop: p, fsm: verifyStore{p: p, hashes: []string{"h0"}}}
	if _, err := p.ApplyAndWait(context.Background(), &fsm.VerifyChunks{ID: "abc"}); err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+pathVerify+"{id}", v.handleVerify)
	srv := httptest.NewServer(mux)
	defer srv.Close()
	c := &rpcClient{http: srv.Client()}
	addr := srv.Listener.Addr().String()
	var rep fsm.VerifyReport
	if err := c.getJSON(context.Background(), addr, pathVerify+"abc?index=5", &rep); err != nil || rep.ID != "abc" || len(rep.Hashes) != 1 {
		t.Fatalf("verify result %+v, %v", rep, err)
	}
	for _, bad := range []string{"nope?index=5", "abc?index=x", "abc"} {
		err := c.getJSON(context.Background(), addr, pathVerify+bad, &rep)
		if bad == "nope?index=5" && (err == nil || !strings.Contains(err.Error(), "404")) {
			t.Errorf("%s: %v, want 404", bad, err)
		}
		// A missing or malformed index waits for index 0: the result is
		// served if it exists.
		if bad != "nope?index=5" && err != nil {
			t.Errorf("%s: %v", bad, err)
		}
	}
}
