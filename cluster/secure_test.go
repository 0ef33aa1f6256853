package cluster

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/robib/robib/fsm"
	"github.com/robib/robib/volume"
)

// verifyGate is a VerifyPeer that fails until opened, counting calls by
// site.
type verifyGate struct {
	open  atomic.Bool
	mu    sync.Mutex
	calls map[string]int
}

func (g *verifyGate) verify(_ context.Context, site, _ string) error {
	g.mu.Lock()
	g.calls[site]++
	g.mu.Unlock()
	if !g.open.Load() {
		return errors.New("no certificate for " + site)
	}
	return nil
}

func (g *verifyGate) count(site string) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.calls[site]
}

// secureSite is a whole Node with every security hook set: gossip keys,
// VerifyPeer, PeerName/RequirePeer on its internal endpoints (its HTTP
// client names itself), RaftPeerName.
type secureSite struct {
	name string
	dir  string
	node *Node
}

func openSecureSite(t *testing.T, name, peer, gossipAddr, peerGossip string, keys [][]byte, verify *verifyGate) *secureSite {
	t.Helper()
	s := &secureSite{name: name, dir: t.TempDir()}
	log := slog.New(slog.DiscardHandler)
	store, err := volume.Open(filepath.Join(s.dir, "volumes"), log)
	if err != nil {
		t.Fatal(err)
	}
	f, err := fsm.New(store, filepath.Join(s.dir, "fsm"), fsm.Options{Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	raftLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	apiLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n, err := Open(Config{
		Name: name, DataDir: s.dir, RaftAddr: raftLn.Addr().String(), GossipAddr: gossipAddr, APIAddr: apiLn.Addr().String(),
		Join: []string{peerGossip}, BootstrapExpect: 2,
		GossipKeys: keys, VerifyPeer: verify.verify, PeerName: testPeerName, RequirePeer: true,
		// Two sites: every inbound Raft connection comes from the other.
		RaftPeerName: func(net.Conn) (string, bool) { return peer, true },
		HTTPClient:   &http.Client{Transport: asPeer{name}, Timeout: 30 * time.Second},
		RaftListener: raftLn,
		Dial: func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", addr)
		},
		Logger: log,
	}, f)
	if err != nil {
		t.Fatal(err)
	}
	s.node = n
	srv := &http.Server{Handler: n.Handler()}
	go srv.Serve(apiLn)
	t.Cleanup(func() {
		srv.Close()
		n.Close()
		f.Close()
		store.Close()
	})
	return s
}

// Two sites with every security hook on: bootstrap-expect waits while the
// other site fails verification and founds the cluster once it passes;
// forwarded proposals pass the peer binding; a full key rotation through
// the Node methods leaves only the new key persisted, and the sites still
// gossip and replicate.
func TestSecureSitesBootstrapAndRotate(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	k1, k2 := seqKey(1, 32), seqKey(2, 32)
	g1, g2 := freeAddr(t), freeAddr(t)
	v1, v2 := &verifyGate{calls: map[string]int{}}, &verifyGate{calls: map[string]int{}}
	s1 := openSecureSite(t, "s1", "s2", g1, g2, [][]byte{k1}, v1)
	s2 := openSecureSite(t, "s2", "s1", g2, g1, [][]byte{k1}, v2)

	waitFor(t, "both sites refusing to bootstrap with an unverified other", 30*time.Second, func() bool {
		return v1.count("s2") >= 3 && v2.count("s1") >= 3
	})
	for _, s := range []*secureSite{s1, s2} {
		if l := s.node.Leader(); l != "" {
			t.Fatalf("%s: leader %s although verification fails", s.name, l)
		}
		if fut := s.node.raft.GetConfiguration(); fut.Error() != nil || len(fut.Configuration().Servers) != 0 {
			t.Fatalf("%s bootstrapped with an unverified site: %+v", s.name, fut.Configuration())
		}
	}
	v1.open.Store(true)
	v2.open.Store(true)
	leader, err := s1.node.WaitForLeader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	follower := s1
	if leader == "s1" {
		follower = s2
	}
	// A proposal forwarded from the follower (internal API, peer bound).
	if _, err := follower.node.ApplyAndWait(ctx, &fsm.CreateVolume{Name: "v1", Size: 1 << 20, BlockSize: 4096, Created: 1}); err != nil {
		t.Fatal(err)
	}

	rep, err := follower.node.KeyringList(ctx)
	if err != nil || len(rep.Sites) != 2 || rep.Sites[0].Primary != KeyFingerprint(k1) || rep.Sites[1].Primary != KeyFingerprint(k1) {
		t.Fatalf("list: %+v, %v", rep, err)
	}
	if rep, err = s1.node.KeyringInstall(ctx, k2); err != nil {
		t.Fatalf("install: %+v, %v", rep, err)
	}
	if rep, err = s2.node.KeyringUse(ctx, k2); err != nil {
		t.Fatalf("use: %+v, %v", rep, err)
	}
	if _, err = s2.node.KeyringRemove(ctx, k2); !errors.Is(err, ErrKeyringRefused) {
		t.Fatalf("removing the primary: %v", err)
	}
	if rep, err = s1.node.KeyringRemove(ctx, k1); err != nil {
		t.Fatalf("remove: %+v, %v", rep, err)
	}
	for _, st := range rep.Sites {
		if st.Error != "" || !slices.Equal(st.Keys, []string{KeyFingerprint(k2)}) {
			t.Fatalf("after the rotation %s: %+v", st.Site, st)
		}
	}
	for _, s := range []*secureSite{s1, s2} {
		b, err := os.ReadFile(filepath.Join(s.dir, keyringFileName))
		if err != nil {
			t.Fatal(err)
		}
		if keys, err := decodeKeyring(b); err != nil || len(keys) != 1 || string(keys[0]) != string(k2) {
			t.Fatalf("%s persisted %d keys, %v", s.name, len(keys), err)
		}
	}
	// Still one cluster: gossip shows both, and a forwarded proposal
	// commits.
	waitFor(t, "both sites gossiping after the rotation", 20*time.Second, func() bool {
		_, ok1 := s1.node.gossip.memberMeta("s2")
		_, ok2 := s2.node.gossip.memberMeta("s1")
		return ok1 && ok2
	})
	if _, err := follower.node.ApplyAndWait(ctx, &fsm.CreateVolume{Name: "v2", Size: 1 << 20, BlockSize: 4096, Created: 2}); err != nil {
		t.Fatal(err)
	}
	fut := s1.node.raft.GetConfiguration()
	if err := fut.Error(); err != nil {
		t.Fatal(err)
	}
	for _, srv := range fut.Configuration().Servers {
		if srv.Suffrage != raft.Voter {
			t.Fatalf("configuration %+v", fut.Configuration())
		}
	}
}
