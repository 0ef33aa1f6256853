package harness

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// PKI is a cluster trust root made with the binary's own `robib cert`
// commands, in a test's temporary directory: a CA, site certificates
// (ca-cert.pem, server-cert.pem, server-key.pem, gossip.key) and client
// certificates (ca-cert.pem, client-cert.pem, client-key.pem), each in a
// directory of its own, the layout libnbd, qemu and nbdkit read.
type PKI struct {
	t   testing.TB
	bin string
	// Dir holds the CA (Dir/ca) and one directory per issued name.
	Dir string

	mu     sync.Mutex
	issued map[string]string // "kind/name" → directory
}

// AdminClient is the client identity the harness's CLI and health probes
// use with a TLS agent (an admin under the policy-less default).
const AdminClient = "admin"

// NewPKI creates a cluster CA with bin's `robib cert ca`.
func NewPKI(t testing.TB, bin string) *PKI {
	t.Helper()
	p := &PKI{t: t, bin: bin, Dir: t.TempDir(), issued: map[string]string{}}
	if r := Run(t, 30*time.Second, nil, bin, "cert", "ca", "--out", filepath.Join(p.Dir, "ca")); r.Err != nil {
		t.Fatalf("robib cert ca: %v\n%s%s", r.Err, r.Stdout, r.Stderr)
	}
	return p
}

// CA is the CA's directory (for `robib cert issue --ca`).
func (p *PKI) CA() string { return filepath.Join(p.Dir, "ca") }

// Site returns the directory of site name's certificate (for 127.0.0.1
// and localhost), issuing it on first use.
func (p *PKI) Site(name string) string {
	return p.issue("site", name, "--ip", "127.0.0.1", "--dns", "localhost")
}

// Client returns the directory of client name's certificate, issuing it on
// first use.
func (p *PKI) Client(name string) string { return p.issue("client", name) }

// Issue issues a certificate of kind for name into a directory of its own
// with extra arguments for `robib cert issue` (for example --lifetime),
// every call a new one; it returns the directory.
func (p *PKI) Issue(kind, name string, extra ...string) string {
	p.t.Helper()
	dir, err := os.MkdirTemp(p.Dir, kind+"-"+name+"-")
	if err != nil {
		p.t.Fatal(err)
	}
	args := append([]string{"cert", "issue", "--ca", p.CA(), "--name", name, "--kind", kind, "--out", dir, "--force"}, extra...)
	if r := Run(p.t, 30*time.Second, nil, p.bin, args...); r.Err != nil {
		p.t.Fatalf("robib %v: %v\n%s%s", args, r.Err, r.Stdout, r.Stderr)
	}
	return dir
}

func (p *PKI) issue(kind, name string, extra ...string) string {
	p.t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	key := kind + "/" + name
	if d, ok := p.issued[key]; ok {
		return d
	}
	d := p.Issue(kind, name, extra...)
	p.issued[key] = d
	return d
}

// AgentArgs are the TLS flags of an agent running as site name.
func (p *PKI) AgentArgs(name string) []string {
	d := p.Site(name)
	return []string{
		"--tls-ca", filepath.Join(d, "ca-cert.pem"),
		"--tls-cert", filepath.Join(d, "server-cert.pem"),
		"--tls-key", filepath.Join(d, "server-key.pem"),
	}
}

// ClientEnv is the CLI environment that authenticates as client name.
func (p *PKI) ClientEnv(name string) []string {
	d := p.Client(name)
	return []string{
		"ROBIB_TLS_CA=" + filepath.Join(d, "ca-cert.pem"),
		"ROBIB_TLS_CERT=" + filepath.Join(d, "client-cert.pem"),
		"ROBIB_TLS_KEY=" + filepath.Join(d, "client-key.pem"),
	}
}

// HTTPClient is an HTTPS client that trusts the cluster CA and presents
// client name's certificate ("" for none).
func (p *PKI) HTTPClient(name string) *http.Client {
	p.t.Helper()
	cfg, err := p.TLSConfig(name)
	if err != nil {
		p.t.Fatal(err)
	}
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
}

// TLSConfig is a client TLS configuration that trusts the cluster CA and
// presents client name's certificate ("" for none).
func (p *PKI) TLSConfig(name string) (*tls.Config, error) {
	caPEM, err := os.ReadFile(filepath.Join(p.CA(), "ca-cert.pem"))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("no CA certificate in %s", p.CA())
	}
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}
	if name != "" {
		d := p.Client(name)
		cert, err := tls.LoadX509KeyPair(filepath.Join(d, "client-cert.pem"), filepath.Join(d, "client-key.pem"))
		if err != nil {
			return nil, err
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}
