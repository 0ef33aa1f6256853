package pki

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// result is one side of a handshake.
type result struct {
	err   error
	state tls.ConnectionState
}

// handshake connects a TLS client to a TLS server over loopback TCP. The
// server writes one byte after its handshake and the client reads it, so a
// client certificate the server refuses (TLS 1.3 checks it after the
// client's handshake returned) fails the client too.
func handshake(t *testing.T, server, client *tls.Config, serverName string) (srv, cli result) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	done := make(chan result, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		tc := tls.Server(c, server)
		err = tc.Handshake()
		if err == nil {
			_, err = tc.Write([]byte("k"))
		}
		done <- result{err, tc.ConnectionState()}
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	cfg := client.Clone()
	if serverName != "" {
		cfg.ServerName = serverName
	}
	tc := tls.Client(c, cfg)
	cli.err = tc.Handshake()
	if cli.err == nil {
		_, cli.err = io.ReadFull(tc, make([]byte, 1))
	}
	cli.state = tc.ConnectionState()
	c.Close()
	return <-done, cli
}

// world is one CA with its issued credentials, and a foreign CA's.
type world struct {
	s1, s2, s1Foreign  *Credentials
	client, site       *tls.Config // ClientConfig with a client's, a site's certificate
	anonymous, foreign *tls.Config // ClientConfig without a certificate; with another CA's client
	expiredSite        *Credentials
	expiredClient      *tls.Config
}

func newWorld(t *testing.T) world {
	t.Helper()
	caDir := newCA(t)
	var w world
	w.s1 = loadSite(t, issue(t, caDir, "s1", KindSite))
	s2 := issue(t, caDir, "s2", KindSite)
	w.s2 = loadSite(t, s2)
	clientDir := issue(t, caDir, "alice", KindClient)
	var err error
	if w.client, err = ClientConfig(clientFiles(clientDir)); err != nil {
		t.Fatal(err)
	}
	if w.site, err = ClientConfig(siteFiles(s2)); err != nil {
		t.Fatal(err)
	}
	if w.anonymous, err = ClientConfig(filepath.Join(clientDir, CACertFile), "", ""); err != nil {
		t.Fatal(err)
	}
	otherCA := newCA(t)
	w.s1Foreign = loadSite(t, issue(t, otherCA, "s1", KindSite))
	foreign := issue(t, otherCA, "alice", KindClient)
	// Trusts our CA, presents the other CA's certificate (whatever CAs
	// the server asks for: Go's client would otherwise send none).
	w.foreign = w.anonymous.Clone()
	pair, _, err := readPair(w.s1Foreign.roots, "", filepath.Join(foreign, ClientCertFile), filepath.Join(foreign, ClientKeyFile), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	foreignPair := pair
	w.foreign.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return foreignPair, nil }

	// Credentials that expired two minutes ago, loaded as if it were
	// three minutes ago (the CA dates from five minutes ago).
	expire := func(r *IssueRequest) { r.notBefore, r.Lifetime = time.Now().Add(-4*time.Minute), 2*time.Minute }
	old := issue(t, caDir, "s3", KindSite, expire)
	before := func() time.Time { return time.Now().Add(-3 * time.Minute) }
	if w.expiredSite, err = load(filepath.Join(old, CACertFile), filepath.Join(old, ServerCertFile), filepath.Join(old, ServerKeyFile), before); err != nil {
		t.Fatal(err)
	}
	oldClient := issue(t, caDir, "bob", KindClient, expire)
	pair, _, err = readPair(w.s1.roots, "", filepath.Join(oldClient, ClientCertFile), filepath.Join(oldClient, ClientKeyFile), before())
	if err != nil {
		t.Fatal(err)
	}
	w.expiredClient = w.anonymous.Clone()
	w.expiredClient.Certificates = []tls.Certificate{*pair}
	return w
}

func TestHandshakes(t *testing.T) {
	w := newWorld(t)
	type want int
	const (
		ok           want = iota
		serverRefuse      // the server refuses the client
		clientRefuse      // the client refuses the server
	)
	for _, tc := range []struct {
		name           string
		server, client *tls.Config
		serverName     string
		want           want
		msg            string // in the refusing side's error
		peer           string // identity the server sees ("" none)
	}{
		{"site link", w.s1.SiteServer(), w.s2.SiteClient(""), "127.0.0.1", ok, "", "site/s2"},
		{"site link, expected name", w.s1.SiteServer(), w.s2.SiteClient("s1"), "localhost", ok, "", "site/s2"},
		{"site link, wrong expected name", w.s1.SiteServer(), w.s2.SiteClient("s3"), "127.0.0.1", clientRefuse, "site link: peer is site/s1, want site/s3", ""},
		{"site link, address not in the certificate", w.s1.SiteServer(), w.s2.SiteClient(""), "10.9.9.9", clientRefuse, "not 10.9.9.9", ""},
		{"site link, client certificate", w.s1.SiteServer(), w.client, "127.0.0.1", serverRefuse, "site link: peer client/alice is not a site", ""},
		{"site link, no certificate", w.s1.SiteServer(), w.anonymous, "127.0.0.1", serverRefuse, "certificate", ""},
		{"site link, other CA's site dials", w.s1.SiteServer(), w.s1Foreign.SiteClient(""), "127.0.0.1", clientRefuse, "unknown authority", ""},
		{"site link, dials other CA's site", w.s1Foreign.SiteServer(), w.s2.SiteClient(""), "127.0.0.1", clientRefuse, "unknown authority", ""},
		{"site link, other CA's client cert", w.s1.SiteServer(), w.foreign, "127.0.0.1", serverRefuse, "unknown authority", ""},
		{"site link, expired site dials", w.s1.SiteServer(), w.expiredSite.SiteClient(""), "127.0.0.1", serverRefuse, "expired", ""},
		{"site link, dials expired site", w.expiredSite.SiteServer(), w.s1.SiteClient(""), "127.0.0.1", clientRefuse, "expired", ""},

		{"API, client certificate", w.s1.APIServer(), w.client, "127.0.0.1", ok, "", "client/alice"},
		{"API, site certificate", w.s1.APIServer(), w.site, "127.0.0.1", ok, "", "site/s2"},
		{"API, forwarding site", w.s1.APIServer(), w.s2.SiteClient("s1"), "127.0.0.1", ok, "", "site/s2"},
		{"API, no certificate", w.s1.APIServer(), w.anonymous, "localhost", ok, "", ""},
		{"API, other CA's client", w.s1.APIServer(), w.foreign, "127.0.0.1", serverRefuse, "unknown authority", ""},
		{"API, expired client", w.s1.APIServer(), w.expiredClient, "127.0.0.1", serverRefuse, "expired", ""},
		{"API of another CA", w.s1Foreign.APIServer(), w.client, "127.0.0.1", clientRefuse, "unknown authority", ""},

		{"NBD verify-peer, client", w.s1.NBDServer(true), w.client, "127.0.0.1", ok, "", "client/alice"},
		{"NBD verify-peer, site certificate as a client", w.s1.NBDServer(true), w.site, "127.0.0.1", serverRefuse, "NBD: peer site/s2 is not a client", ""},
		{"NBD verify-peer, no certificate", w.s1.NBDServer(true), w.anonymous, "127.0.0.1", serverRefuse, "certificate", ""},
		{"NBD verify-peer, other CA's client", w.s1.NBDServer(true), w.foreign, "127.0.0.1", serverRefuse, "unknown authority", ""},
		{"NBD verify-peer, expired client", w.s1.NBDServer(true), w.expiredClient, "127.0.0.1", serverRefuse, "expired", ""},
		{"NBD without verify-peer, no certificate", w.s1.NBDServer(false), w.anonymous, "127.0.0.1", ok, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, cli := handshake(t, tc.server, tc.client, tc.serverName)
			t.Logf("server: %v; client: %v", srv.err, cli.err)
			switch tc.want {
			case ok:
				if srv.err != nil || cli.err != nil {
					t.Fatalf("refused: server %v, client %v", srv.err, cli.err)
				}
				if srv.state.Version != tls.VersionTLS13 {
					t.Errorf("version %x, want TLS 1.3", srv.state.Version)
				}
				id, has := PeerIdentity(srv.state)
				if (tc.peer == "") == has || (has && id.String() != tc.peer) {
					t.Errorf("server sees peer %v (%v), want %q", id, has, tc.peer)
				}
				if id, has := PeerIdentity(cli.state); !has || id != (Identity{Name: "s1", Kind: KindSite}) {
					t.Errorf("client sees server %v (%v), want site/s1", id, has)
				}
			case serverRefuse:
				if srv.err == nil || cli.err == nil {
					t.Fatalf("accepted: server %v, client %v", srv.err, cli.err)
				}
				if !strings.Contains(srv.err.Error(), tc.msg) {
					t.Errorf("server error %q does not say %q", srv.err, tc.msg)
				}
			case clientRefuse:
				if cli.err == nil || srv.err == nil {
					t.Fatalf("accepted: server %v, client %v", srv.err, cli.err)
				}
				if !strings.Contains(cli.err.Error(), tc.msg) {
					t.Errorf("client error %q does not say %q", cli.err, tc.msg)
				}
			}
			if strings.Contains(tc.msg, "is not a") || strings.Contains(tc.msg, "want site/") {
				err := srv.err
				if tc.want == clientRefuse {
					err = cli.err
				}
				if !errors.Is(err, ErrPeerRefused) {
					t.Errorf("%v does not wrap ErrPeerRefused", err)
				}
			}
		})
	}
}

// TestTLS13Only: a peer limited to TLS 1.2 is refused on every link.
func TestTLS13Only(t *testing.T) {
	w := newWorld(t)
	old := w.client.Clone()
	old.MaxVersion = tls.VersionTLS12
	for name, server := range map[string]*tls.Config{"site": w.s1.SiteServer(), "API": w.s1.APIServer(), "NBD": w.s1.NBDServer(false)} {
		if srv, cli := handshake(t, server, old, "127.0.0.1"); srv.err == nil || cli.err == nil {
			t.Errorf("%s: TLS 1.2 accepted", name)
		}
	}
}

func TestClientConfigArguments(t *testing.T) {
	caDir := newCA(t)
	dir := issue(t, caDir, "alice", KindClient)
	ca, cert, key := clientFiles(dir)
	other := issue(t, newCA(t), "alice", KindClient)
	for name, tc := range map[string][3]string{
		"no CA":            {"", cert, key},
		"cert without key": {ca, cert, ""},
		"key without cert": {ca, "", key},
		"missing CA":       {filepath.Join(dir, "nope"), "", ""},
		"other CA's cert":  {ca, filepath.Join(other, ClientCertFile), filepath.Join(other, ClientKeyFile)},
		"mismatched key":   {ca, cert, filepath.Join(other, ClientKeyFile)},
	} {
		if _, err := ClientConfig(tc[0], tc[1], tc[2]); !errors.Is(err, ErrCredentials) {
			t.Errorf("%s: %v, want ErrCredentials", name, err)
		}
	}
	cfg, err := ClientConfig(ca, cert, key)
	if err != nil || len(cfg.Certificates) != 1 || cfg.MinVersion != tls.VersionTLS13 || cfg.InsecureSkipVerify {
		t.Fatalf("ClientConfig: %+v, %v", cfg, err)
	}
}

// fakeClock is a settable clock for Credentials.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// TestRotation: replacing the certificate and key files changes the
// certificate the next handshake presents (after the once-a-second look),
// without a restart; a bad replacement keeps the old one.
func TestRotation(t *testing.T) {
	caDir := newCA(t)
	dir := issue(t, caDir, "s1", KindSite)
	clock := &fakeClock{t: time.Now()}
	creds, err := load(filepath.Join(dir, CACertFile), filepath.Join(dir, ServerCertFile), filepath.Join(dir, ServerKeyFile), clock.now)
	if err != nil {
		t.Fatal(err)
	}
	peer := loadSite(t, issue(t, caDir, "s2", KindSite))
	served := func() string {
		t.Helper()
		srv, cli := handshake(t, creds.SiteServer(), peer.SiteClient("s1"), "127.0.0.1")
		if srv.err != nil || cli.err != nil {
			t.Fatalf("handshake: server %v, client %v", srv.err, cli.err)
		}
		// And as a dialing site: the client certificate rotates too.
		srv2, cli2 := handshake(t, peer.SiteServer(), creds.SiteClient("s2"), "127.0.0.1")
		if srv2.err != nil || cli2.err != nil {
			t.Fatalf("dialing: server %v, client %v", srv2.err, cli2.err)
		}
		a, b := cli.state.PeerCertificates[0].SerialNumber.String(), srv2.state.PeerCertificates[0].SerialNumber.String()
		if a != b {
			t.Fatalf("serves %s, dials with %s", a, b)
		}
		return a
	}
	first := served()
	notAfter := creds.NotAfter()

	if err := Issue(caDir, IssueRequest{Name: "s1", Kind: KindSite, IPs: loopback, Lifetime: 48 * time.Hour, OutDir: dir, Force: true}); err != nil {
		t.Fatal(err)
	}
	if got := served(); got != first {
		t.Fatalf("reloaded within the second: %s, was %s", got, first)
	}
	clock.advance(time.Second)
	second := served()
	if second == first {
		t.Fatal("the new certificate is not used after the files changed")
	}
	if creds.NotAfter().Equal(notAfter) || creds.ReloadError() != nil || creds.Identity().Name != "s1" {
		t.Fatalf("after reload: until %v (was %v), error %v, identity %v", creds.NotAfter(), notAfter, creds.ReloadError(), creds.Identity())
	}

	// A key that does not match (a half-done replacement): the old pair
	// stays, the error is kept, and the complete replacement is taken.
	other := issue(t, caDir, "s1", KindSite)
	copyFile(t, filepath.Join(other, ServerKeyFile), filepath.Join(dir, ServerKeyFile))
	clock.advance(time.Second)
	if got := served(); got != second {
		t.Fatalf("a mismatched pair was taken: %s", got)
	}
	if err := creds.ReloadError(); !errors.Is(err, ErrCredentials) || !strings.Contains(err.Error(), "does not match") {
		t.Fatalf("reload error %v", err)
	}
	copyFile(t, filepath.Join(other, ServerCertFile), filepath.Join(dir, ServerCertFile))
	clock.advance(time.Second)
	third := served()
	if third == second || creds.ReloadError() != nil {
		t.Fatalf("completed replacement not taken: %s, %v", third, creds.ReloadError())
	}

	// Another site's certificate is refused: the identity is fixed.
	s3 := issue(t, caDir, "s3", KindSite)
	copyFile(t, filepath.Join(s3, ServerKeyFile), filepath.Join(dir, ServerKeyFile))
	copyFile(t, filepath.Join(s3, ServerCertFile), filepath.Join(dir, ServerCertFile))
	clock.advance(time.Second)
	if got := served(); got != third || !strings.Contains(creds.ReloadError().Error(), "site/s3, not of site/s1") {
		t.Fatalf("took another site's certificate: %s, %v", got, creds.ReloadError())
	}
	// A removed file: keep serving.
	os.Remove(filepath.Join(dir, ServerKeyFile))
	clock.advance(time.Second)
	if got := served(); got != third {
		t.Fatalf("lost the certificate when its key file went away: %s", got)
	}
}

// TestRevokedSites: SetRevoked refuses a revoked site on the site links in
// both directions, reads the list at each handshake (a site revoked later
// is refused from then on, one taken off the list is accepted again), and
// leaves the API to the authorization layer.
func TestRevokedSites(t *testing.T) {
	w := newWorld(t)
	var mu sync.Mutex
	denied := map[string]bool{}
	revoked := func(name string) bool { mu.Lock(); defer mu.Unlock(); return denied[name] }
	set := func(name string, v bool) { mu.Lock(); denied[name] = v; mu.Unlock() }
	w.s1.SetRevoked(revoked)
	w.s2.SetRevoked(revoked)

	mustPass := func(what string, server, client *tls.Config) {
		t.Helper()
		if srv, cli := handshake(t, server, client, "127.0.0.1"); srv.err != nil || cli.err != nil {
			t.Fatalf("%s: refused: server %v, client %v", what, srv.err, cli.err)
		}
	}
	mustPass("nobody revoked", w.s1.SiteServer(), w.s2.SiteClient(""))

	set("s2", true)
	srv, cli := handshake(t, w.s1.SiteServer(), w.s2.SiteClient(""), "127.0.0.1")
	if srv.err == nil || !errors.Is(srv.err, ErrPeerRefused) || !strings.Contains(srv.err.Error(), "site/s2 is revoked") {
		t.Fatalf("revoked site dialing in: server %v, client %v; want the server to refuse it as revoked", srv.err, cli.err)
	}
	srv, cli = handshake(t, w.s2.SiteServer(), w.s1.SiteClient(""), "127.0.0.1")
	if cli.err == nil || !errors.Is(cli.err, ErrPeerRefused) || !strings.Contains(cli.err.Error(), "site/s2 is revoked") {
		t.Fatalf("dialing a revoked site: server %v, client %v; want the client to refuse it as revoked", srv.err, cli.err)
	}
	// The API leaves revocation to the HTTP layer, which says why.
	mustPass("revoked site at the API", w.s1.APIServer(), w.s2.SiteClient("s1"))

	set("s2", false)
	mustPass("taken off the list", w.s1.SiteServer(), w.s2.SiteClient(""))
}
