package netx

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/robib/robib/cmd/internal/pki"
)

// tlsWorld is a CA with two sites' credentials and a client's directory.
type tlsWorld struct {
	s1, s2    *pki.Credentials
	clientDir string
}

func newTLSWorld(t *testing.T) tlsWorld {
	t.Helper()
	ca := filepath.Join(t.TempDir(), "ca")
	if err := pki.CreateCA(ca, pki.CAOptions{}); err != nil {
		t.Fatal(err)
	}
	load := func(name string) *pki.Credentials {
		dir := filepath.Join(t.TempDir(), name)
		if err := pki.Issue(ca, pki.IssueRequest{Name: name, Kind: pki.KindSite, IPs: []net.IP{net.ParseIP("127.0.0.1")}, OutDir: dir}); err != nil {
			t.Fatal(err)
		}
		c, err := pki.Load(filepath.Join(dir, pki.CACertFile), filepath.Join(dir, pki.ServerCertFile), filepath.Join(dir, pki.ServerKeyFile))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	w := tlsWorld{s1: load("s1"), s2: load("s2"), clientDir: filepath.Join(t.TempDir(), "alice")}
	if err := pki.Issue(ca, pki.IssueRequest{Name: "alice", Kind: pki.KindClient, OutDir: w.clientDir}); err != nil {
		t.Fatal(err)
	}
	return w
}

// echoServer accepts on l, echoes each connection and reports the peer
// identity each one had after its first read.
func echoServer(t *testing.T, l net.Listener) <-chan string {
	t.Helper()
	peers := make(chan string, 16)
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				buf := make([]byte, 64)
				n, err := c.Read(buf)
				id, ok := PeerIdentity(c)
				switch {
				case err != nil:
					peers <- "error: " + err.Error()
					return
				case ok:
					peers <- id.String()
				default:
					peers <- "anonymous"
				}
				c.Write(buf[:n])
			}()
		}
	}()
	return peers
}

func echo(t *testing.T, c net.Conn) error {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		return err
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != "ping" {
		return errors.New("echo: " + string(buf))
	}
	return nil
}

func TestTLSRaftLink(t *testing.T) {
	w := newTLSWorld(t)
	n1, n2 := &Network{Creds: w.s1}, &Network{Creds: w.s2}
	l, err := n1.Listen(LinkRaft, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	peers := echoServer(t, l)
	addr := l.Addr().String()

	c, err := n2.DialContext(context.Background(), LinkRaft, addr)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := c.(*corkedTLS); !ok {
		t.Fatalf("dialed a %T, want a corked TLS connection", c)
	}
	if id, ok := PeerIdentity(c); !ok || id.String() != "site/s1" {
		t.Fatalf("dialer sees %v (%v), want site/s1", id, ok)
	}
	if err := echo(t, c); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if p := <-peers; p != "site/s2" {
		t.Fatalf("listener saw %q, want site/s2", p)
	}

	// ExpectName: the site at addr must be the one named.
	var asked []string
	var mu sync.Mutex
	n2.ExpectName = func(link Link, a string) string {
		mu.Lock()
		asked = append(asked, string(link)+" "+a)
		mu.Unlock()
		return "s1"
	}
	c, err = n2.DialContext(context.Background(), LinkRaft, addr)
	if err != nil {
		t.Fatalf("expecting s1: %v", err)
	}
	c.Close()
	<-peers // the server side, closed without data
	n2.ExpectName = func(Link, string) string { return "s3" }
	_, err = n2.DialContext(context.Background(), LinkRaft, addr)
	if !errors.Is(err, pki.ErrPeerRefused) || !strings.Contains(err.Error(), "peer is site/s1, want site/s3") {
		t.Fatalf("expecting s3 at s1's address: %v", err)
	}
	<-peers
	if len(asked) != 1 || asked[0] != "raft "+addr {
		t.Fatalf("ExpectName asked %q", asked)
	}

	// Plaintext against the TLS listener: no data crosses.
	plain, err := (&Network{}).DialContext(context.Background(), LinkRaft, addr)
	if err != nil {
		t.Fatal(err)
	}
	plain.SetDeadline(time.Now().Add(10 * time.Second))
	plain.Write([]byte("more than a TLS record header"))
	if n, err := io.ReadFull(plain, make([]byte, 29)); err == nil {
		t.Fatalf("a plaintext dialer got %d bytes back from a TLS Raft listener", n)
	}
	plain.Close()
	if p := <-peers; !strings.HasPrefix(p, "error: ") {
		t.Fatalf("listener accepted plaintext: %q", p)
	}

	// A client certificate on a site link is refused.
	cfg, err := pki.ClientConfig(filepath.Join(w.clientDir, pki.CACertFile), filepath.Join(w.clientDir, pki.ClientCertFile), filepath.Join(w.clientDir, pki.ClientKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	cfg.ServerName = "127.0.0.1"
	cc, err := tls.Dial("tcp", addr, cfg)
	if err == nil {
		err = echo(t, cc)
		cc.Close()
	}
	if err == nil {
		t.Fatal("a client certificate was accepted on the Raft link")
	}
	if p := <-peers; !strings.Contains(p, "peer client/alice is not a site") {
		t.Fatalf("listener: %q", p)
	}

	// A TLS dialer refuses a plaintext listener.
	pl, err := (&Network{}).Listen(LinkRaft, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	echoServer(t, pl)
	if c, err := n1.DialContext(context.Background(), LinkRaft, pl.Addr().String()); err == nil {
		c.Close()
		t.Fatal("TLS dial to a plaintext listener succeeded")
	}
}

// TestTLSDialTimeoutAndDelay: the handshake is bounded by the dial timeout,
// and runs over the link delay.
func TestTLSDialTimeoutAndDelay(t *testing.T) {
	w := newTLSWorld(t)
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	var held []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c) // accepted, never answered
			mu.Unlock()
		}
	}()
	defer func() {
		mu.Lock()
		for _, c := range held {
			c.Close()
		}
		mu.Unlock()
	}()
	n := &Network{Creds: w.s2, DialTimeout: 200 * time.Millisecond}
	start := time.Now()
	if _, err := n.DialContext(context.Background(), LinkAPI, silent.Addr().String()); err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("handshake with a silent server: %v", err)
	}
	if el := time.Since(start); el > 200*time.Millisecond+slack {
		t.Fatalf("handshake timeout took %v", el)
	}

	const d = 50 * time.Millisecond
	l, err := (&Network{Creds: w.s1}).Listen(LinkRaft, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	echoServer(t, l)
	start = time.Now()
	c, err := (&Network{Creds: w.s2, LinkDelay: d}).DialContext(context.Background(), LinkRaft, l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// A connection round trip, then TLS 1.3's one.
	if el := time.Since(start); el < 4*d {
		t.Fatalf("delayed TLS dial took %v, want at least %v", el, 4*d)
	}
	start = time.Now()
	if err := echo(t, c); err != nil {
		t.Fatal(err)
	}
	if rtt := time.Since(start); rtt < 2*d {
		t.Fatalf("round trip over delayed TLS %v, want at least %v", rtt, 2*d)
	}
}

// TestNBDStaysPlain: the NBD listener is plain TCP even with Creds (TLS
// starts inside NBD); NBDTLS gives its configuration.
func TestNBDStaysPlain(t *testing.T) {
	w := newTLSWorld(t)
	n := &Network{Creds: w.s1}
	l, err := n.Listen(LinkNBD, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	peers := echoServer(t, l)
	c, err := n.DialContext(context.Background(), LinkNBD, l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, ok := c.(*tls.Conn); ok {
		t.Fatal("NBD dial is TLS")
	}
	if err := echo(t, c); err != nil {
		t.Fatal(err)
	}
	if p := <-peers; p != "anonymous" {
		t.Fatalf("NBD listener: %q", p)
	}
	if cfg := n.NBDTLS(true); cfg == nil || cfg.ClientAuth != tls.RequireAndVerifyClientCert || cfg.MinVersion != tls.VersionTLS13 {
		t.Fatalf("NBDTLS(true) = %+v", cfg)
	}
	if cfg := n.NBDTLS(false); cfg == nil || cfg.ClientAuth != tls.NoClientCert {
		t.Fatalf("NBDTLS(false) = %+v", cfg)
	}
	if cfg := (&Network{}).NBDTLS(true); cfg != nil {
		t.Fatal("NBDTLS without Creds is not nil")
	}
	if _, ok := PeerIdentity(c); ok {
		t.Fatal("PeerIdentity of a plain connection")
	}
}

// TestHTTPOverTLSDialer: an http.Transport whose dialers are netx's talks
// to a TLS API listener with an http:// URL (DialContext returns a TLS
// connection the transport writes HTTP/1.1 on) and with an https:// URL
// (DialTLSContext); the server sees the dialing site either way, and a
// plain HTTP client gets nothing.
func TestHTTPOverTLSDialer(t *testing.T) {
	w := newTLSWorld(t)
	l, err := (&Network{Creds: w.s1}).Listen(LinkAPI, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		id, ok := pki.PeerIdentity(*r.TLS)
		if !ok {
			rw.Write([]byte("anonymous"))
			return
		}
		rw.Write([]byte(id.String()))
	}), ErrorLog: log.New(io.Discard, "", 0)}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })

	n := &Network{Creds: w.s2}
	dial := func(ctx context.Context, _, addr string) (net.Conn, error) { return n.DialContext(ctx, LinkAPI, addr) }
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: dial, DialTLSContext: dial}}
	defer hc.CloseIdleConnections()
	for _, scheme := range []string{"http", "https"} {
		resp, err := hc.Get(scheme + "://" + l.Addr().String() + "/")
		if err != nil {
			t.Fatalf("%s: %v", scheme, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(body) != "site/s2" {
			t.Fatalf("%s: server saw %q", scheme, body)
		}
		if (resp.TLS != nil) != (scheme == "https") {
			t.Errorf("%s: response TLS state %v", scheme, resp.TLS != nil)
		}
	}
	plain := &http.Client{Timeout: 10 * time.Second}
	if resp, err := plain.Get("http://" + l.Addr().String() + "/"); err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Fatal("plain HTTP client got an answer from the TLS API")
		}
	}
}
