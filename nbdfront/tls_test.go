package nbdfront

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// ---------------------------------------------------------------------
// Test PKI: a CA (ECDSA P-256), a server certificate for 127.0.0.1 and
// localhost, and client certificates by common name.

type testPKI struct {
	ca     *x509.Certificate
	caKey  *ecdsa.PrivateKey
	caPEM  []byte
	pool   *x509.CertPool
	server tls.Certificate
}

// testCert is an issued certificate with its key, as PEM and for crypto/tls.
type testCert struct {
	certPEM, keyPEM []byte
	tls             tls.Certificate
}

func newTestPKI(t testing.TB, caName string) *testPKI {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: caName, Organization: []string{"robib test"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	p := &testPKI{ca: ca, caKey: key, pool: x509.NewCertPool(),
		caPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
	p.pool.AddCert(ca)
	p.server = p.issue(t, "nbd server", true).tls
	return p
}

var testSerial atomic.Int64

// issue signs a leaf certificate: a server one (127.0.0.1, localhost) or
// a client one. Key usages are what GnuTLS-based clients (qemu) check.
func (p *testPKI) issue(t testing.TB, cn string, server bool) testCert {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(100 + testSerial.Add(1)),
		Subject:               pkix.Name{CommonName: cn, Organization: []string{"robib test"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
		tmpl.DNSNames = []string{"localhost"}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &key.PublicKey, p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	pk, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	c := testCert{
		certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		keyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pk}),
	}
	if c.tls, err = tls.X509KeyPair(c.certPEM, c.keyPEM); err != nil {
		t.Fatal(err)
	}
	return c
}

// serverConfig requires a client certificate signed by the CA.
func (p *testPKI) serverConfig() *tls.Config {
	return &tls.Config{
		Certificates: []tls.Certificate{p.server},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    p.pool,
	}
}

// clientConfig trusts the CA and presents cert (none if nil).
func (p *testPKI) clientConfig(cert *testCert) *tls.Config {
	cfg := &tls.Config{RootCAs: p.pool, ServerName: "localhost"}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{cert.tls}
	}
	return cfg
}

// gnutlsDir writes the CA and a client certificate in the layout of
// GnuTLS-based clients (libnbd's tls-certificates, qemu's
// tls-creds-x509 dir) and returns the directory.
func (p *testPKI) gnutlsDir(t testing.TB, client testCert) string {
	t.Helper()
	dir := t.TempDir()
	for name, b := range map[string][]byte{
		"ca-cert.pem":     p.caPEM,
		"client-cert.pem": client.certPEM,
		"client-key.pem":  client.keyPEM,
	} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// ---------------------------------------------------------------------
// Helpers.

// startTLS sends NBD_OPT_STARTTLS, expects the ACK and runs the TLS
// handshake; the client then talks over TLS, with nothing negotiated.
func (c *testClient) startTLS(cfg *tls.Config) tls.ConnectionState {
	c.t.Helper()
	c.mustAck(optStartTLS, nil)
	if n := c.r.Buffered(); n != 0 {
		c.fatalf("%d bytes after the STARTTLS ACK", n)
	}
	tc := tls.Client(c.conn, cfg)
	if err := tc.Handshake(); err != nil {
		c.fatalf("TLS handshake: %v", err)
	}
	c.conn, c.r, c.structured = tc, bufio.NewReader(tc), false
	return tc.ConnectionState()
}

// expectDropped asserts that the server ends the connection (it may send
// a TLS alert first) before the client's deadline.
func (c *testClient) expectDropped() {
	c.t.Helper()
	_, err := io.Copy(io.Discard, c.r)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		c.fatalf("expected the server to close the connection, got timeout")
	}
}

// logBuffer collects a server's log lines.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// lines returns the log lines containing every one of parts.
func (l *logBuffer) lines(parts ...string) []string {
	var out []string
	for _, line := range strings.Split(l.String(), "\n") {
		ok := line != ""
		for _, p := range parts {
			ok = ok && strings.Contains(line, p)
		}
		if ok {
			out = append(out, line)
		}
	}
	return out
}

func (l *logBuffer) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// newTLSEnv is newEnv with TLS in mode and the server's log collected.
func newTLSEnv(t *testing.T, mode TLSMode, mod func(*Config)) (*testEnv, *testPKI, *logBuffer) {
	t.Helper()
	pki := newTestPKI(t, "robib test CA")
	logs := &logBuffer{}
	e := newEnv(t, func(c *Config) {
		c.TLS, c.TLSMode, c.Logger = pki.serverConfig(), mode, logs.logger()
		if mod != nil {
			mod(c)
		}
	})
	return e, pki, logs
}

// ---------------------------------------------------------------------
// STARTTLS.

func TestNewServerTLSValidation(t *testing.T) {
	be := newMemBackend()
	pki := newTestPKI(t, "ca")
	good := pki.serverConfig()
	for _, tc := range []struct {
		what string
		cfg  Config
		ok   bool
	}{
		{"off, no TLS", Config{Backend: be}, true},
		{"off with TLS (STARTTLS unsupported)", Config{Backend: be, TLS: good}, true},
		{"on", Config{Backend: be, TLS: good, TLSMode: TLSOn}, true},
		{"require", Config{Backend: be, TLS: good, TLSMode: TLSRequire}, true},
		{"on without TLS", Config{Backend: be, TLSMode: TLSOn}, false},
		{"require without TLS", Config{Backend: be, TLSMode: TLSRequire}, false},
		{"no certificate", Config{Backend: be, TLS: &tls.Config{}, TLSMode: TLSOn}, false},
		{"GetCertificate", Config{Backend: be, TLSMode: TLSOn, TLS: &tls.Config{
			GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &pki.server, nil }}}, true},
		{"TLS 1.1 at most", Config{Backend: be, TLSMode: TLSOn, TLS: &tls.Config{
			Certificates: []tls.Certificate{pki.server}, MaxVersion: tls.VersionTLS11}}, false},
		{"unknown mode", Config{Backend: be, TLS: good, TLSMode: 7}, false},
	} {
		s, err := NewServer(tc.cfg)
		if (err == nil) != tc.ok {
			t.Errorf("%s: NewServer: %v", tc.what, err)
		}
		if s != nil {
			s.Close()
		}
	}
	if TLSRequire.String() != "require" || TLSMode(9).String() != "TLSMode(9)" || OpOpen.String() != "open" {
		t.Errorf("String methods: %v %v %v", TLSRequire, TLSMode(9), OpOpen)
	}
}

// TestStartTLSGo: STARTTLS, then structured replies, base:allocation and
// GO under TLS; reads, writes, block status and DISC work, in both modes.
func TestStartTLSGo(t *testing.T) {
	for _, mode := range []TLSMode{TLSOn, TLSRequire} {
		t.Run(mode.String(), func(t *testing.T) {
			e, pki, _ := newTLSEnv(t, mode, nil)
			alice := pki.issue(t, "alice", false)
			c := e.dialGreet(clientFlagFixedNewstyle | clientFlagNoZeroes)
			st := c.startTLS(pki.clientConfig(&alice))
			if st.Version < tls.VersionTLS12 {
				t.Fatalf("TLS version %#x", st.Version)
			}
			c.mustAck(optStructuredReply, nil)
			if rs := c.option(optSetMetaContext, metaData("disk", metaBaseAllocation)); len(rs) != 2 || rs[0].typ != repMetaContext {
				t.Fatalf("SET_META_CONTEXT under TLS: %+v", rs)
			}
			// LIST and INFO work under TLS.
			if rs := c.option(optList, nil); len(rs) != 3 {
				t.Fatalf("LIST under TLS: %+v", rs)
			}
			_, flags := c.goExport("disk")
			if flags&tFlagSendDF == 0 {
				t.Fatalf("structured replies negotiated under TLS not in effect: flags %#x", flags)
			}
			want := pattern(200<<10, 9) // several TLS records per request and reply
			c.mustOK(cmdFlagFUA, cmdWrite, 4096, uint32(len(want)), want)
			mustEqual(t, "device", e.disk.bytes(4096, int64(len(want))), want)
			mustEqual(t, "read back", c.mustOK(0, cmdRead, 4096, uint32(len(want)), nil).data, want)
			// [0, 4096) was never written, [4096, 8192) was.
			if r := c.mustOK(0, cmdBlockStatus, 0, 8192, nil); fmt.Sprint(r.status) != fmt.Sprint([]uint32{metaIDAllocation, 4096, stateHole | stateZero, 4096, 0}) {
				t.Fatalf("block status %v", r.status)
			}
			// Pipelined small requests: replies are group-written through
			// the TLS buffer; each must arrive whole.
			if err := runConcurrent(c, 1, 64, 4096); err != nil {
				t.Fatal(err)
			}
			c.disc()
			c.expectClosed()
		})
	}
}

// TestTLSRequireRefusesBeforeTLS: in require mode every option except
// STARTTLS and ABORT is refused with NBD_REP_ERR_TLS_REQD (with a message
// and no NBD_REP_INFO), and EXPORT_NAME closes the connection.
func TestTLSRequireRefusesBeforeTLS(t *testing.T) {
	e, pki, _ := newTLSEnv(t, TLSRequire, nil)
	alice := pki.issue(t, "alice", false)
	c := e.dialGreet(clientFlagFixedNewstyle)
	for _, o := range []struct {
		opt  uint32
		data []byte
	}{
		{optList, nil},
		{optInfo, goData("disk", infoName)},
		{optGo, goData("disk")},
		{optGo, goData("missing")},
		{optStructuredReply, nil},
		{optListMetaContext, metaData("disk")},
		{optSetMetaContext, metaData("disk", metaBaseAllocation)},
		{optExtendedHeaders, nil},
		{optPeekExport, nil},
		{999, []byte("junk")},
		{optInfo, []byte{1, 2, 3}},             // malformed: still TLS_REQD
		{optGo, make([]byte, maxOptionData+1)}, // oversized: skipped, TLS_REQD
	} {
		msg := c.expectErr(o.opt, o.data, repErrTLSReqd)
		if !strings.Contains(msg, "TLS") || !strings.Contains(msg, "STARTTLS") {
			t.Fatalf("option %d: TLS_REQD message %q", o.opt, msg)
		}
	}
	// STARTTLS with data is invalid, not TLS_REQD.
	c.expectErr(optStartTLS, []byte("x"), repErrInvalid)
	c.expectErr(optStartTLS, make([]byte, maxOptionData+1), repErrInvalid)
	// The session was only refused, never ended: TLS still works.
	c.startTLS(pki.clientConfig(&alice))
	c.goExport("disk")
	c.mustOK(0, cmdFlush, 0, 0, nil)

	// ABORT is allowed before TLS.
	c = e.dialGreet(clientFlagFixedNewstyle)
	c.expectErr(optList, nil, repErrTLSReqd)
	c.mustAck(optAbort, nil)
	c.expectClosed()

	// EXPORT_NAME before TLS cannot be refused: the server hangs up,
	// for an existing export too.
	for _, name := range []string{"disk", ""} {
		c = e.dialGreet(clientFlagFixedNewstyle | clientFlagNoZeroes)
		c.sendOption(optExportName, []byte(name))
		c.expectClosed()
	}
	// A client without fixed newstyle negotiation cannot use TLS (the spec
	// keeps it in plaintext), so it gets NBD_REP_ERR_POLICY, not TLS_REQD.
	c = e.dialGreet(0)
	c.expectErr(optStartTLS, nil, repErrPolicy)
	c.expectErr(optList, nil, repErrPolicy)
	c.sendOption(optExportName, []byte("disk"))
	c.expectClosed()
	e.be.mu.Lock()
	n := len(e.be.handles)
	e.be.mu.Unlock()
	if n != 1 {
		t.Fatalf("%d exports opened, want 1 (the TLS session)", n)
	}
	// Under TLS, EXPORT_NAME is served.
	c = e.dialGreet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	c.startTLS(pki.clientConfig(&alice))
	c.sendOption(optExportName, []byte("disk"))
	if size := binary.BigEndian.Uint64(c.readN(exportNameReplyLen)); size != testSize {
		t.Fatalf("EXPORT_NAME under TLS: size %d", size)
	}
	c.mustOK(0, cmdWrite, 0, 3, []byte("tls"))
	mustEqual(t, "device", e.disk.bytes(0, 3), []byte("tls"))
}

// TestTLSOnPlaintextServed: in on mode a client that never sends
// STARTTLS is served in plaintext, EXPORT_NAME included.
func TestTLSOnPlaintextServed(t *testing.T) {
	e, _, _ := newTLSEnv(t, TLSOn, nil)
	c, _ := e.open("disk", true, true)
	c.mustOK(0, cmdWrite, 0, 5, []byte("plain"))
	c.disc()
	c = e.dialGreet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	c.sendOption(optExportName, []byte("disk"))
	c.readN(exportNameReplyLen)
	mustEqual(t, "read", c.mustOK(0, cmdRead, 0, 5, nil).data, []byte("plain"))
	// Without fixed newstyle, STARTTLS is refused (NOTLS for that client).
	c = e.dialGreet(0)
	c.expectErr(optStartTLS, nil, repErrPolicy)
}

func TestStartTLSTwiceAndWithData(t *testing.T) {
	e, pki, _ := newTLSEnv(t, TLSOn, nil)
	alice := pki.issue(t, "alice", false)
	c := e.dialGreet(clientFlagFixedNewstyle)
	c.expectErr(optStartTLS, []byte{0}, repErrInvalid) // with data, before TLS
	c.startTLS(pki.clientConfig(&alice))
	if msg := c.expectErr(optStartTLS, nil, repErrInvalid); !strings.Contains(msg, "already") {
		t.Fatalf("second STARTTLS: %q", msg)
	}
	c.expectErr(optStartTLS, []byte("data"), repErrInvalid)
	// Never NBD_REP_ERR_TLS_REQD after TLS; unknown options are UNSUP.
	c.expectErr(999, nil, repErrUnsup)
	c.goExport("disk")
	c.mustOK(0, cmdFlush, 0, 0, nil)
}

func TestStartTLSModeOff(t *testing.T) {
	// TLS set but mode off: still unsupported.
	e, _, _ := newTLSEnv(t, TLSOff, nil)
	c := e.dialGreet(clientFlagFixedNewstyle)
	if msg := c.expectErr(optStartTLS, nil, repErrUnsup); msg == "" {
		t.Fatal("no message")
	}
	c.goExport("disk")
}

// TestStartTLSResetsState: structured replies and the metadata context
// negotiated before STARTTLS are forgotten, as the spec demands.
func TestStartTLSResetsState(t *testing.T) {
	e, pki, _ := newTLSEnv(t, TLSOn, nil)
	alice := pki.issue(t, "alice", false)
	c := e.dialGreet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	c.mustAck(optStructuredReply, nil)
	if rs := c.option(optSetMetaContext, metaData("disk", metaBaseAllocation)); len(rs) != 2 {
		t.Fatalf("SET_META_CONTEXT: %+v", rs)
	}
	c.startTLS(pki.clientConfig(&alice))
	// SET_META_CONTEXT needs structured replies, which are gone.
	c.expectErr(optSetMetaContext, metaData("disk", metaBaseAllocation), repErrInvalid)
	_, flags := c.goExport("disk")
	if flags&tFlagSendDF != 0 {
		t.Fatalf("SEND_DF set: structured replies survived STARTTLS (flags %#x)", flags)
	}
	// A READ gets a simple reply (testClient fails on a chunk).
	if _, err := e.disk.WriteAt([]byte("tls"), 0); err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "read", c.mustOK(0, cmdRead, 0, 3, nil).data, []byte("tls"))
	c.expectErrno(0, cmdBlockStatus, 0, 4096, nil, EINVAL)

	// The same with the context set again only before TLS, structured
	// replies negotiated again after it: still no context.
	c = e.dialGreet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	c.mustAck(optStructuredReply, nil)
	c.option(optSetMetaContext, metaData("disk", metaBaseAllocation))
	c.startTLS(pki.clientConfig(&alice))
	c.mustAck(optStructuredReply, nil)
	c.goExport("disk")
	if r := c.do(0, cmdBlockStatus, 0, 4096, nil); r.errno != EINVAL {
		t.Fatalf("block status with a context from before STARTTLS: errno %d", r.errno)
	}
}

// TestTLSHandshakeFailures: every way the TLS handshake can fail closes
// that connection, logs one line with the peer and the reason, and the
// server goes on serving.
func TestTLSHandshakeFailures(t *testing.T) {
	e, pki, logs := newTLSEnv(t, TLSRequire, func(c *Config) { c.HandshakeTimeout = 2 * time.Second })
	alice := pki.issue(t, "alice", false)
	other := newTestPKI(t, "another CA")
	mallory := other.issue(t, "mallory", false)

	for _, tc := range []struct {
		what   string
		client func(c *testClient)
		reason string
	}{
		{"garbage", func(c *testClient) {
			c.mustAck(optStartTLS, nil)
			c.write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n" + strings.Repeat("\x16\x03\x01", 50)))
		}, "tls"},
		{"client certificate from another CA", func(c *testClient) {
			c.mustAck(optStartTLS, nil)
			cfg := pki.clientConfig(nil)
			// Sent although the server does not name its CA.
			cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &mallory.tls, nil }
			tc := tls.Client(c.conn, cfg)
			tc.Handshake() // may succeed on the client side (TLS 1.3)
			c.r = bufio.NewReader(tc)
		}, "unknown authority"},
		{"no client certificate", func(c *testClient) {
			c.mustAck(optStartTLS, nil)
			tc := tls.Client(c.conn, pki.clientConfig(nil))
			tc.Handshake()
			c.r = bufio.NewReader(tc)
		}, "didn't provide a certificate"},
		{"client does not trust the server", func(c *testClient) {
			c.mustAck(optStartTLS, nil)
			cfg := other.clientConfig(&alice)
			if err := tls.Client(c.conn, cfg).Handshake(); err == nil {
				t.Errorf("client accepted a server certificate from an unknown CA")
			}
			c.conn.Close()
		}, "bad certificate"},
		{"plaintext after STARTTLS", func(c *testClient) {
			// Pipelined: bytes sent before the ACK could be read.
			c.write(cat(optBytes(optStartTLS, nil), optBytes(optList, nil)))
			c.readOptReply()
		}, "bytes sent after NBD_OPT_STARTTLS"},
		{"silence (handshake timeout)", func(c *testClient) {
			c.mustAck(optStartTLS, nil)
		}, "timeout"},
		{"hang-up", func(c *testClient) {
			c.mustAck(optStartTLS, nil)
			c.conn.(*net.TCPConn).CloseWrite()
		}, "EOF"},
	} {
		t.Run(tc.what, func(t *testing.T) {
			before := len(logs.lines("nbd TLS handshake failed"))
			c := e.dialGreet(clientFlagFixedNewstyle)
			local := c.conn.LocalAddr().String()
			start := time.Now()
			tc.client(c)
			c.expectDropped()
			if d := time.Since(start); d > 8*time.Second {
				t.Fatalf("closed after %v", d)
			}
			waitFor(t, "the failure logged", func() bool { return len(logs.lines("nbd TLS handshake failed")) > before })
			got := logs.lines("nbd TLS handshake failed", "remote="+local)
			if len(got) != 1 || !strings.Contains(got[0], tc.reason) || !strings.Contains(got[0], "level=INFO") {
				t.Fatalf("log lines for %s: %q (want one, at info, with %q)", local, got, tc.reason)
			}
			if other := logs.lines("remote="+local, "level=INFO"); len(other) != 1 {
				t.Fatalf("more than one info line for the failure: %q", other)
			}
			// The server still serves.
			ok := e.dialGreet(clientFlagFixedNewstyle)
			ok.startTLS(pki.clientConfig(&alice))
			ok.goExport("disk")
			ok.mustOK(0, cmdFlush, 0, 0, nil)
			ok.disc()
		})
	}
	if n := len(logs.lines("panic")); n != 0 {
		t.Fatalf("panics logged: %q", logs.lines("panic"))
	}
}

// TestServeConnTLSPipe: the upgrade works over a net.Pipe too (no
// address, no writev).
func TestServeConnTLSPipe(t *testing.T) {
	pki := newTestPKI(t, "ca")
	be := newMemBackend()
	be.add(ExportInfo{Name: "disk", Size: testSize})
	srv, err := NewServer(Config{Backend: be, Logger: quietLogger(), TLS: pki.serverConfig(), TLSMode: TLSRequire})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	alice := pki.issue(t, "alice", false)
	c := pipeClient(t, srv)
	c.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	c.startTLS(pki.clientConfig(&alice))
	c.goExport("")
	c.mustOK(0, cmdWrite, 100, 3, []byte("abc"))
	mustEqual(t, "read", c.mustOK(0, cmdRead, 100, 3, nil).data, []byte("abc"))
	c.disc()
	c.expectClosed()
	be.waitAllClosed(t)
}

// TestTLSShutdown: Server.Close ends TLS connections in both phases.
func TestTLSShutdown(t *testing.T) {
	pki := newTestPKI(t, "ca")
	be := newMemBackend()
	be.add(ExportInfo{Name: "disk", Size: testSize})
	srv, err := NewServer(Config{Backend: be, Logger: quietLogger(), TLS: pki.serverConfig(), TLSMode: TLSOn})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	e := &testEnv{t: t, addr: l.Addr().String()}
	alice := pki.issue(t, "alice", false)
	negotiating := e.dialGreet(clientFlagFixedNewstyle)
	negotiating.startTLS(pki.clientConfig(&alice))
	transmitting := e.dialGreet(clientFlagFixedNewstyle)
	transmitting.startTLS(pki.clientConfig(&alice))
	transmitting.goExport("disk")
	transmitting.mustOK(0, cmdFlush, 0, 0, nil)
	done := make(chan error, 1)
	go func() { done <- srv.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("Close did not return")
	}
	negotiating.expectDropped()
	transmitting.expectDropped()
	be.waitAllClosed(t)
}

// ---------------------------------------------------------------------
// Authorize.

// countingBackend counts the calls that reach the Backend.
type countingBackend struct {
	Backend
	lists, infos, opens atomic.Int32
}

func (b *countingBackend) List() ([]ExportInfo, error) {
	b.lists.Add(1)
	return b.Backend.List()
}

func (b *countingBackend) Info(name string) (ExportInfo, error) {
	b.infos.Add(1)
	return b.Backend.Info(name)
}

func (b *countingBackend) Open(name string) (Export, error) {
	b.opens.Add(1)
	return b.Backend.Open(name)
}

type authCall struct {
	peer   Peer
	export string
	op     Op
}

// TestAuthorizeDenials: a refusal wrapping ErrDenied is answered with
// NBD_REP_ERR_POLICY and the error's text, for every option that reaches
// the Backend, before the Backend is asked; other errors get their own
// reply without internal detail; the session goes on.
func TestAuthorizeDenials(t *testing.T) {
	var mu sync.Mutex
	var calls []authCall
	authorize := func(p Peer, export string, op Op) error {
		mu.Lock()
		calls = append(calls, authCall{p, export, op})
		mu.Unlock()
		switch {
		case op == OpList:
			return fmt.Errorf("listing exports is not allowed here: %w", ErrDenied)
		case export == "ro":
			return fmt.Errorf("%s of %q refused by policy: %w", op, export, ErrDenied)
		case export == "boom":
			return errors.New("directory at 10.1.2.3:389: connection refused")
		case export == "panic":
			panic("authorize exploded")
		case export == "gone":
			return fmt.Errorf("policy service: %w", ErrShutdown)
		case export == "hidden":
			return fmt.Errorf("export %q: %w", export, ErrUnknownExport)
		}
		return nil
	}
	logs := &logBuffer{}
	var cb *countingBackend
	e := newEnv(t, func(c *Config) {
		cb = &countingBackend{Backend: c.Backend}
		c.Backend, c.Authorize, c.Logger = cb, authorize, logs.logger()
	})
	c := e.dialGreet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	local := c.conn.LocalAddr().String()

	if msg := c.expectErr(optList, nil, repErrPolicy); msg != "listing exports is not allowed here: nbd: access denied" {
		t.Fatalf("LIST refusal message %q", msg)
	}
	for _, o := range []struct {
		opt  uint32
		data []byte
		op   Op
	}{
		{optInfo, goData("ro", infoName), OpInfo},
		{optGo, goData("ro"), OpOpen},
		{optListMetaContext, metaData("ro"), OpInfo},
	} {
		msg := c.expectErr(o.opt, o.data, repErrPolicy)
		if want := fmt.Sprintf("%s of \"ro\" refused by policy: nbd: access denied", o.op); msg != want {
			t.Fatalf("option %d: message %q, want %q", o.opt, msg, want)
		}
	}
	c.mustAck(optStructuredReply, nil)
	c.expectErr(optSetMetaContext, metaData("ro", metaBaseAllocation), repErrPolicy)

	// Other errors: no internal detail for an unclassified one or a panic;
	// a sentinel's own reply and text otherwise.
	for _, name := range []string{"boom", "panic"} {
		for _, opt := range []uint32{optInfo, optGo} {
			if msg := c.expectErr(opt, goData(name), repErrUnknown); msg != "authorization failed" {
				t.Fatalf("%s: message %q", name, msg)
			}
		}
	}
	if msg := c.expectErr(optGo, goData("gone"), repErrShutdown); !strings.Contains(msg, "policy service") {
		t.Fatalf("shutdown message %q", msg)
	}
	c.expectErr(optInfo, goData("hidden"), repErrUnknown)
	if n, m, o := cb.lists.Load(), cb.infos.Load(), cb.opens.Load(); n+m+o != 0 {
		t.Fatalf("refused options reached the backend: %d lists, %d infos, %d opens", n, m, o)
	}

	// Allowed names go through, in the same session.
	c.goExport("disk")
	c.mustOK(0, cmdFlush, 0, 0, nil)
	if cb.opens.Load() != 1 {
		t.Fatalf("%d opens", cb.opens.Load())
	}

	// EXPORT_NAME cannot be refused: the connection is closed.
	c2 := e.dialGreet(clientFlagFixedNewstyle)
	c2.sendOption(optExportName, []byte("ro"))
	c2.expectClosed()

	mu.Lock()
	defer mu.Unlock()
	for _, call := range calls {
		if call.peer.TLS != nil || call.peer.Addr == nil || !strings.HasPrefix(call.peer.Addr.String(), "127.0.0.1:") {
			t.Fatalf("peer %+v", call.peer)
		}
	}
	if last := calls[len(calls)-1]; last.export != "ro" || last.op != OpOpen {
		t.Fatalf("EXPORT_NAME asked %+v", last)
	}
	// Denials are logged at info with peer, export and reason; the
	// EXPORT_NAME one once.
	denied := logs.lines("nbd access denied", "level=INFO", "remote="+local, "export=ro", "op=info", "refused by policy")
	if len(denied) != 3 { // INFO, LIST_META_CONTEXT, SET_META_CONTEXT
		t.Fatalf("denial log lines: %q", denied)
	}
	waitFor(t, "EXPORT_NAME denial logged", func() bool { return len(logs.lines("nbd access denied", "op=open", "export=ro")) == 2 })
	if l := logs.lines("nbd handshake failed"); len(l) != 0 {
		t.Fatalf("EXPORT_NAME denial logged twice: %q", l)
	}
	if l := logs.lines("nbd authorization failed", "level=WARN", "10.1.2.3"); len(l) != 2 {
		t.Fatalf("authorization failures: %q", logs.lines("nbd authorization failed"))
	}
}

// TestAuthorizeSeesClientCertificate: Authorize gets the TLS state with
// the verified client certificate and decides on it.
func TestAuthorizeSeesClientCertificate(t *testing.T) {
	authorize := func(p Peer, export string, op Op) error {
		if p.TLS == nil || len(p.TLS.PeerCertificates) == 0 {
			return fmt.Errorf("a client certificate is required: %w", ErrDenied)
		}
		cn := p.TLS.PeerCertificates[0].Subject.CommonName
		if cn == "alice" || (cn == "bob" && export == "ro" && op != OpList) {
			return nil
		}
		return fmt.Errorf("%s may not %s %q: %w", cn, op, export, ErrDenied)
	}
	e, pki, _ := newTLSEnv(t, TLSOn, func(c *Config) {
		c.Authorize = authorize
		c.TLS.ClientAuth = tls.VerifyClientCertIfGiven
	})
	alice, bob := pki.issue(t, "alice", false), pki.issue(t, "bob", false)

	// Plaintext peer: no TLS state.
	c := e.dialGreet(clientFlagFixedNewstyle)
	if msg := c.expectErr(optGo, goData("disk"), repErrPolicy); !strings.Contains(msg, "client certificate is required") {
		t.Fatalf("plaintext: %q", msg)
	}
	// TLS without a client certificate.
	c.startTLS(pki.clientConfig(nil))
	c.expectErr(optGo, goData("disk"), repErrPolicy)

	c = e.dialGreet(clientFlagFixedNewstyle)
	c.startTLS(pki.clientConfig(&bob))
	if msg := c.expectErr(optGo, goData("disk"), repErrPolicy); msg != `bob may not open "disk": nbd: access denied` {
		t.Fatalf("bob: %q", msg)
	}
	c.expectErr(optList, nil, repErrPolicy)
	c.goExport("ro")
	c.disc()

	c = e.dialGreet(clientFlagFixedNewstyle)
	c.startTLS(pki.clientConfig(&alice))
	if rs := c.option(optList, nil); len(rs) != 3 {
		t.Fatalf("alice LIST: %+v", rs)
	}
	c.goExport("disk")
	c.mustOK(0, cmdWrite, 0, 5, []byte("alice"))
	mustEqual(t, "device", e.disk.bytes(0, 5), []byte("alice"))
}

// TestDeniedReplies checks the reply to a refusal without a connection.
func TestDeniedReplies(t *testing.T) {
	for _, tc := range []struct {
		err  error
		typ  uint32
		text string
	}{
		{fmt.Errorf("no: %w", ErrDenied), repErrPolicy, "no: nbd: access denied"},
		{ErrDenied, repErrPolicy, "nbd: access denied"},
		{fmt.Errorf("x: %w", ErrReadOnly), repErrPolicy, "x: nbd: read-only"},
		{errors.New("db password wrong"), repErrUnknown, "authorization failed"},
		{fmt.Errorf("%w: boom", errPanic), repErrUnknown, "authorization failed"},
	} {
		var out bytes.Buffer
		h := &handshake{conn: writerConn{&out}}
		if err := h.denied(optInfo, &loggedError{tc.err}); err != nil {
			t.Fatal(err)
		}
		b := out.Bytes()
		if typ := binary.BigEndian.Uint32(b[12:]); typ != tc.typ || string(b[optionReplyLen:]) != tc.text {
			t.Errorf("%v: reply %#x %q, want %#x %q", tc.err, typ, b[optionReplyLen:], tc.typ, tc.text)
		}
	}
}

// writerConn is a net.Conn that only writes.
type writerConn struct{ w io.Writer }

func (c writerConn) Read([]byte) (int, error)         { return 0, io.EOF }
func (c writerConn) Write(p []byte) (int, error)      { return c.w.Write(p) }
func (c writerConn) Close() error                     { return nil }
func (c writerConn) LocalAddr() net.Addr              { return pipeAddr{} }
func (c writerConn) RemoteAddr() net.Addr             { return pipeAddr{} }
func (c writerConn) SetDeadline(time.Time) error      { return nil }
func (c writerConn) SetReadDeadline(time.Time) error  { return nil }
func (c writerConn) SetWriteDeadline(time.Time) error { return nil }
