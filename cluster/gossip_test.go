package cluster

import (
	"context"
	"encoding/base64"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// gossipSite is one site's gossip on loopback: real memberlist (with the
// keyring from its data directory), its keyring role and its internal
// keyring endpoint. No Raft.
type gossipSite struct {
	t    *testing.T
	name string
	dir  string
	addr string // gossip address, kept across restarts
	logs *logRecords

	srv   *httptest.Server
	m     *membership
	keys  *gossipKeyring
	admin *keyAdmin
	stop  chan struct{}
	wg    sync.WaitGroup
	down  bool
}

// startGossipSite starts a site whose configured gossip keys are keys,
// joining through join (a gossip address, or "").
func startGossipSite(t *testing.T, name, join string, keys ...[]byte) *gossipSite {
	t.Helper()
	s := &gossipSite{t: t, name: name, dir: t.TempDir(), addr: freeAddr(t)}
	if err := os.MkdirAll(filepath.Join(s.dir, "raft"), 0o700); err != nil {
		t.Fatal(err)
	}
	s.start(join, "", keys...)
	t.Cleanup(s.shutdown)
	return s
}

// start (re)opens the site's keyring and gossip; nbd is gossiped as its
// NBD address, so a restart can be told from the old incarnation.
func (s *gossipSite) start(join, nbd string, keys ...[]byte) {
	t := s.t
	t.Helper()
	s.logs = &logRecords{}
	log := slog.New(s.logs)
	k, err := openKeyring(s.dir, keys, log)
	if err != nil {
		t.Fatal(err)
	}
	s.keys = k
	mux := http.NewServeMux()
	s.srv = httptest.NewServer(&peerGate{next: mux})
	cfg := Config{Name: s.name, DataDir: s.dir, GossipAddr: s.addr, RaftAddr: s.name + ":raft", APIAddr: s.srv.Listener.Addr().String(), NBDAddr: nbd}
	if join != "" {
		cfg.Join = []string{join}
	}
	s.stop = make(chan struct{})
	s.m = &membership{cfg: cfg, log: log, ids: fakeIDs("c1"), fresh: &atomic.Bool{}, refused: &refusals{},
		config: fakeConfig{}, left: notLeft{}, keyring: k.memberlistRing(), events: make(chan struct{}, 1), stop: s.stop, wg: &s.wg}
	s.admin = &keyAdmin{self: s.name, log: log, keys: k, members: s.m, rpc: &rpcClient{http: s.srv.Client()}}
	mux.HandleFunc("POST "+pathKeyring, s.admin.handleKeyring)
	if err := s.m.open(); err != nil {
		t.Fatal(err)
	}
	s.down = false
}

func (s *gossipSite) shutdown() {
	if s.down {
		return
	}
	s.down = true
	close(s.stop)
	s.wg.Wait()
	s.m.shutdown()
	s.srv.Close()
}

// restart stops the site and starts it again on the same data directory
// and gossip address, with keys configured.
func (s *gossipSite) restart(join, nbd string, keys ...[]byte) {
	s.shutdown()
	s.start(join, nbd, keys...)
}

// sees reports whether s's member table holds every one of names.
func (s *gossipSite) sees(names ...string) bool {
	got := map[string]bool{}
	for _, m := range s.m.members() {
		got[m.Name] = true
	}
	for _, n := range names {
		if !got[n] {
			return false
		}
	}
	return true
}

func memberNames(s *gossipSite) []string { return names(s.m.members()) }

// waitAllSee waits until every site's member table holds every site.
func waitAllSee(t *testing.T, sites ...*gossipSite) {
	t.Helper()
	var all []string
	for _, s := range sites {
		all = append(all, s.name)
	}
	waitFor(t, "every site gossiping with every other", 20*time.Second, func() bool {
		for _, s := range sites {
			if !s.sees(all...) {
				return false
			}
		}
		return true
	})
}

// talking proves that fresh gossip still flows from each site to every
// other: each changes its metadata (the fresh flag, toggled) and the
// others must receive it.
func talking(t *testing.T, what string, sites ...*gossipSite) {
	t.Helper()
	for _, from := range sites {
		want := !from.m.fresh.Load()
		from.m.fresh.Store(want)
		from.m.refreshMeta()
		waitFor(t, what+": "+from.name+"'s metadata update reaching every site", 20*time.Second, func() bool {
			for _, to := range sites {
				if to == from {
					continue
				}
				meta, ok := to.m.memberMeta(from.name)
				if !ok || meta.Fresh != want {
					return false
				}
			}
			return true
		})
	}
}

// Sites sharing a key gossip; a site with another key, or none, never
// becomes a member, on either side.
func TestGossipEncryptedMembership(t *testing.T) {
	k1, k2 := seqKey(1, 32), seqKey(2, 32)
	a := startGossipSite(t, "a", "", k1)
	b := startGossipSite(t, "b", a.addr, k1)
	c := startGossipSite(t, "c", a.addr, k1)
	waitAllSee(t, a, b, c)
	talking(t, "one key", a, b, c)

	// The intruders keep trying to join through a in the background.
	wrong := startGossipSite(t, "wrong", a.addr, k2)
	plain := startGossipSite(t, "plain", a.addr)
	for _, s := range []*gossipSite{wrong, plain} {
		if _, err := s.m.ml.Join([]string{a.addr}); err == nil {
			t.Fatalf("%s joined the encrypted pool", s.name)
		}
	}
	// Meanwhile a site with the right key joins and is seen everywhere,
	// so gossip rounds and state exchanges have run: the intruders are
	// still nobody's member.
	d := startGossipSite(t, "d", b.addr, k1)
	waitAllSee(t, a, b, c, d)
	talking(t, "after the intruders", a, b, c, d)
	for _, s := range []*gossipSite{a, b, c, d} {
		if got := memberNames(s); slices.Contains(got, "wrong") || slices.Contains(got, "plain") {
			t.Fatalf("%s's members %v include an intruder", s.name, got)
		}
	}
	for _, s := range []*gossipSite{wrong, plain} {
		if got := memberNames(s); !slices.Equal(got, []string{s.name}) {
			t.Fatalf("%s sees %v", s.name, got)
		}
	}
}

// A rotation (install, use, remove) keeps every site talking; a restarted
// site comes back with the rotated ring even though its configuration
// still names the old key; a site with only the old key cannot join any
// more, one with the new key can.
func TestGossipKeyRotation(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	k1, k2 := seqKey(1, 32), seqKey(2, 16)
	a := startGossipSite(t, "a", "", k1)
	b := startGossipSite(t, "b", a.addr, k1)
	c := startGossipSite(t, "c", a.addr, k1)
	waitAllSee(t, a, b, c)

	rep, err := b.admin.Install(ctx, k2)
	if err != nil {
		t.Fatalf("install: %v (%+v)", err, rep)
	}
	checkKeyringReport(t, rep, "install", KeyFingerprint(k2), KeyFingerprint(k1), []string{KeyFingerprint(k1), KeyFingerprint(k2)}, "a", "b", "c")
	talking(t, "after install", a, b, c)

	if rep, err = b.admin.Use(ctx, k2); err != nil {
		t.Fatalf("use: %v (%+v)", err, rep)
	}
	checkKeyringReport(t, rep, "use", KeyFingerprint(k2), KeyFingerprint(k2), []string{KeyFingerprint(k2), KeyFingerprint(k1)}, "a", "b", "c")
	talking(t, "after use", a, b, c)

	if rep, err = a.admin.Remove(ctx, k1); err != nil {
		t.Fatalf("remove: %v (%+v)", err, rep)
	}
	checkKeyringReport(t, rep, "remove", KeyFingerprint(k1), KeyFingerprint(k2), []string{KeyFingerprint(k2)}, "a", "b", "c")
	talking(t, "after remove", a, b, c)

	list, err := c.admin.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	checkKeyringReport(t, list, "list", "", KeyFingerprint(k2), []string{KeyFingerprint(k2)}, "a", "b", "c")

	// c restarts configured with the old key only: the persisted ring
	// wins (with a warning), and c is back in the pool.
	c.restart(a.addr, "restarted", k1)
	if c.logs.count(slog.LevelWarn, "configured primary key is not in the persisted ring") != 1 {
		t.Fatalf("restart log:\n%s", c.logs.texts())
	}
	waitFor(t, "the restarted site's new metadata reaching the others", 20*time.Second, func() bool {
		for _, s := range []*gossipSite{a, b} {
			if meta, ok := s.m.memberMeta("c"); !ok || meta.NBD != "restarted" {
				return false
			}
		}
		return c.sees("a", "b", "c")
	})
	talking(t, "after the restart", a, b, c)

	old := startGossipSite(t, "old", "", k1)
	if _, err := old.m.ml.Join([]string{a.addr}); err == nil {
		t.Fatal("a site with only the removed key joined")
	}
	fresh := startGossipSite(t, "new", c.addr, k2)
	waitAllSee(t, a, b, c, fresh)
	for _, s := range []*gossipSite{a, b, c, fresh} {
		if slices.Contains(memberNames(s), "old") {
			t.Fatalf("%s lists the site with the removed key", s.name)
		}
	}
	for _, s := range []*gossipSite{a, b, c} {
		for _, key := range [][]byte{k1, k2} {
			if strings.Contains(s.logs.texts(), base64.StdEncoding.EncodeToString(key)) || strings.Contains(s.logs.texts(), keyHash(key)) {
				t.Fatalf("%s logged a key or its full hash", s.name)
			}
		}
	}
}

// checkReport checks a report's op, key and every site's ring.
func checkKeyringReport(t *testing.T, r KeyringReport, op, key, primary string, keys []string, sites ...string) {
	t.Helper()
	if r.Op != op || r.Key != key || len(r.Sites) != len(sites) {
		t.Fatalf("report %+v, want op %s key %s at %v", r, op, key, sites)
	}
	for i, s := range r.Sites {
		if s.Site != sites[i] || s.Error != "" || s.Primary != primary || !slices.Equal(s.Keys, keys) {
			t.Fatalf("%s: %+v, want primary %s keys %v", sites[i], s, primary, keys)
		}
	}
	if f := r.Failed(); f != nil {
		t.Fatalf("failed at %v", f)
	}
}

// Use is refused, changing nothing, while a live site lacks the key or
// does not answer; remove is refused while a site encrypts with the key.
func TestGossipKeyringRefusals(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	k1, k2 := seqKey(1, 32), seqKey(2, 24)
	a := startGossipSite(t, "a", "", k1)
	b := startGossipSite(t, "b", a.addr, k1)
	c := startGossipSite(t, "c", a.addr, k1)
	waitAllSee(t, a, b, c)
	// Only a holds k2.
	if err := a.keys.change("install", k2); err != nil {
		t.Fatal(err)
	}
	rep, err := a.admin.Use(ctx, k2)
	if !errors.Is(err, ErrKeyringRefused) || !strings.Contains(err.Error(), "b, c") || strings.Contains(err.Error(), "a,") {
		t.Fatalf("use of a key only a holds: %v, want ErrKeyringRefused naming b and c", err)
	}
	if len(rep.Sites) != 3 {
		t.Fatalf("refusal report %+v", rep)
	}
	list, err := c.admin.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range list.Sites {
		want := []string{KeyFingerprint(k1)}
		if s.Site == "a" {
			want = append(want, KeyFingerprint(k2))
		}
		if s.Error != "" || s.Primary != KeyFingerprint(k1) || !slices.Equal(s.Keys, want) {
			t.Fatalf("after the refused use, %s's ring %+v, want %v", s.Site, s, want)
		}
	}
	talking(t, "after the refused use", a, b, c)

	// Installed everywhere, but c's endpoint does not answer: refused too.
	if _, err := a.admin.Install(ctx, k2); err != nil {
		t.Fatal(err)
	}
	c.srv.Close()
	if _, err := b.admin.Use(ctx, k2); !errors.Is(err, ErrKeyringRefused) || !strings.Contains(err.Error(), "c (did not answer)") {
		t.Fatalf("use with c not answering: %v", err)
	}
	rep, err = b.admin.Install(ctx, seqKey(3, 16))
	if !errors.Is(err, ErrKeyringIncomplete) || !slices.Equal(rep.Failed(), []string{"c"}) {
		t.Fatalf("install with c not answering: %v, failed at %v", err, rep.Failed())
	}

	// Removing the primary is refused, naming every site that uses it.
	if _, err := b.admin.Remove(ctx, k1); !errors.Is(err, ErrKeyringRefused) || !strings.Contains(err.Error(), "a, b, c (did not answer)") {
		t.Fatalf("removing the primary: %v", err)
	}
	if _, err := a.admin.Install(ctx, seqKey(0, 10)); !errors.Is(err, ErrInvalidRequest) {
		t.Fatalf("a 10-byte key: %v", err)
	}
	if got := a.keys.hashes(); got[0] != keyHash(k1) {
		t.Fatal("the primary changed")
	}
}

// The keyring endpoint refuses an operation coordinated by another site
// than the sender, and one from no site identity when it is required.
func TestKeyringEndpointPeerBinding(t *testing.T) {
	k := seqKey(1, 16)
	s := startGossipSite(t, "a", "", k)
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+pathKeyring, s.admin.handleKeyring)
	peer := func(r *http.Request) (string, bool) {
		name := r.Header.Get("Test-Peer")
		return name, name != ""
	}
	for _, require := range []bool{false, true} {
		srv := httptest.NewServer(&peerGate{name: peer, require: require, next: mux})
		defer srv.Close()
		post := func(from, as string) error {
			req, _ := http.NewRequest(http.MethodPost, srv.URL+pathKeyring, strings.NewReader(`{"op":"list","from":"`+from+`"}`))
			if as != "" {
				req.Header.Set("Test-Peer", as)
			}
			resp, err := srv.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return statusError(resp)
			}
			return nil
		}
		if err := post("b", "b"); err != nil {
			t.Fatalf("from b as b: %v", err)
		}
		if err := post("b", "x"); !errors.Is(err, ErrForbidden) || !strings.Contains(err.Error(), `"x" may not`) {
			t.Fatalf("from x claiming b: %v", err)
		}
		err := post("b", "")
		if require != errors.Is(err, ErrForbidden) {
			t.Fatalf("require %v, no identity: %v", require, err)
		}
	}
}
