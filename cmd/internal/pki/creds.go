package pki

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// reloadInterval: a handshake looks at the certificate and key files at
// most this often.
const reloadInterval = time.Second

// Credentials are a site's TLS material: the cluster CA and the site's
// certificate and key. The certificate and key are read again when their
// files change (checked at most once a second, during a handshake), so
// rotating is issuing a new certificate into the same files; the CA is
// read once. A reload that fails (a file half replaced, a certificate of
// another site) keeps the previous pair and is retried when the files
// change again. Safe for concurrent use.
type Credentials struct {
	caFile, certFile, keyFile string
	roots                     *x509.CertPool
	ca                        *x509.Certificate
	id                        Identity
	now                       func() time.Time

	mu      sync.Mutex
	pair    *tls.Certificate // current certificate (Leaf set) and key
	seen    [2]fileStamp     // cert and key files when last read (or tried)
	checked time.Time        // when the files were last looked at
	lastErr error            // the last reload's failure, nil after a success
	log     *slog.Logger

	revoked atomic.Pointer[func(name string) bool] // SetRevoked; nil: none
}

// SetRevoked installs the revocation check of the site links: a site whose
// name revoked reports is refused in the TLS handshake of every Raft
// connection and site-to-site dial, in both directions (the deny list of
// the authorization policy, read at each handshake, so a new list takes
// effect without a restart; connections already open are not cut). The API
// and NBD listeners leave revocation to the authorization layer, which
// answers with a reason (HTTP 403, NBD_REP_ERR_POLICY).
func (c *Credentials) SetRevoked(revoked func(name string) bool) {
	c.revoked.Store(&revoked)
}

// checkSite is checkPeer for a site link, plus the revocation check.
func (c *Credentials) checkSite(cs tls.ConnectionState, expect string) error {
	if err := checkPeer(cs, "site link", KindSite, expect); err != nil {
		return err
	}
	if f := c.revoked.Load(); f != nil && *f != nil {
		id, _ := IdentityOf(cs.VerifiedChains[0][0]) // checkPeer parsed it
		if (*f)(id.Name) {
			return fmt.Errorf("%w: site link: peer %s is revoked", ErrPeerRefused, id)
		}
	}
	return nil
}

// fileStamp tells a changed file from an unchanged one.
type fileStamp struct {
	mod  time.Time
	size int64
}

func stamp(path string) fileStamp {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{}
	}
	return fileStamp{fi.ModTime(), fi.Size()}
}

// Load reads and checks a site's credentials: the CA certificate, and a
// site certificate signed by it, valid now, with the key that matches it.
// Errors (ErrCredentials) name the file and what is wrong with it.
func Load(caFile, certFile, keyFile string) (*Credentials, error) {
	return load(caFile, certFile, keyFile, time.Now)
}

func load(caFile, certFile, keyFile string, now func() time.Time) (*Credentials, error) {
	ca, err := readCACert(caFile)
	if err != nil {
		return nil, err
	}
	c := &Credentials{caFile: caFile, certFile: certFile, keyFile: keyFile, roots: x509.NewCertPool(), ca: ca, now: now}
	c.roots.AddCert(ca)
	c.seen = [2]fileStamp{stamp(certFile), stamp(keyFile)}
	pair, id, err := c.readPair()
	if err != nil {
		return nil, err
	}
	if id.Kind != KindSite {
		return nil, fmt.Errorf("%w: %s is the certificate of %s, not of a site", ErrCredentials, certFile, id)
	}
	if !slices.Contains(pair.Leaf.ExtKeyUsage, x509.ExtKeyUsageServerAuth) {
		return nil, fmt.Errorf("%w: %s (%s) may not serve: no server authentication usage", ErrCredentials, certFile, id)
	}
	c.pair, c.id, c.checked = pair, id, now()
	return c, nil
}

// readPair reads the certificate and key files and checks them against the
// CA at the current time.
func (c *Credentials) readPair() (*tls.Certificate, Identity, error) {
	return readPair(c.roots, c.caFile, c.certFile, c.keyFile, c.now())
}

func readPair(roots *x509.CertPool, caFile, certFile, keyFile string, now time.Time) (*tls.Certificate, Identity, error) {
	chain, err := readCerts(certFile)
	if err != nil {
		return nil, Identity{}, err
	}
	key, err := readKey(keyFile)
	if err != nil {
		return nil, Identity{}, err
	}
	leaf := chain[0]
	if !samePublicKey(leaf.PublicKey, key.Public()) {
		return nil, Identity{}, fmt.Errorf("%w: key %s does not match certificate %s", ErrCredentials, keyFile, certFile)
	}
	if now.After(leaf.NotAfter) {
		return nil, Identity{}, fmt.Errorf("%w: certificate %s expired at %s", ErrCredentials, certFile, leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	if now.Before(leaf.NotBefore) {
		return nil, Identity{}, fmt.Errorf("%w: certificate %s is not valid before %s", ErrCredentials, certFile, leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return nil, Identity{}, fmt.Errorf("%w: certificate %s is not signed by the CA in %s: %v", ErrCredentials, certFile, caFile, err)
	}
	id, err := IdentityOf(leaf)
	if err != nil {
		return nil, Identity{}, fmt.Errorf("%w: %s: %w", ErrCredentials, certFile, err)
	}
	pair := &tls.Certificate{PrivateKey: key, Leaf: leaf}
	for _, c := range chain {
		pair.Certificate = append(pair.Certificate, c.Raw)
	}
	return pair, id, nil
}

// Identity is the site the credentials belong to. It does not change on a
// reload (a reload to another identity is refused).
func (c *Credentials) Identity() Identity { return c.id }

// NotAfter is when the current certificate expires.
func (c *Credentials) NotAfter() time.Time {
	return c.current().Leaf.NotAfter
}

// ReloadError is the last failed reload's error, nil if the current files
// were read successfully.
func (c *Credentials) ReloadError() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lastErr
}

// SetLogger makes reloads and failed reloads logged to log.
func (c *Credentials) SetLogger(log *slog.Logger) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.log = log
}

// current returns the certificate to present, first reading the files
// again if they changed (looked at most once per reloadInterval).
func (c *Credentials) current() *tls.Certificate {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	if d := now.Sub(c.checked); d >= 0 && d < reloadInterval {
		return c.pair
	}
	c.checked = now
	st := [2]fileStamp{stamp(c.certFile), stamp(c.keyFile)}
	if st == c.seen {
		return c.pair
	}
	c.seen = st
	pair, id, err := c.readPair()
	if err == nil && id != c.id {
		err = fmt.Errorf("%w: %s is now the certificate of %s, not of %s: keeping the old one", ErrCredentials, c.certFile, id, c.id)
	}
	if err != nil {
		c.lastErr = err
		if c.log != nil {
			c.log.Error("TLS certificate not reloaded; still using the previous one", "cert", c.certFile, "err", err)
		}
		return c.pair
	}
	c.pair, c.lastErr = pair, nil
	if c.log != nil {
		c.log.Info("TLS certificate reloaded", "cert", c.certFile, "identity", id.String(), "not_after", pair.Leaf.NotAfter)
	}
	return c.pair
}

func (c *Credentials) getCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return c.current(), nil
}

func (c *Credentials) getClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return c.current(), nil
}

// base is what every configuration shares: TLS 1.3, the cluster CA only.
func (c *Credentials) base() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: c.roots, ClientCAs: c.roots}
}

// SiteServer is the configuration of a site-to-site listener (Raft): the
// peer must present a certificate of the cluster CA with a site identity
// that is not revoked (SetRevoked).
func (c *Credentials) SiteServer() *tls.Config {
	cfg := c.base()
	cfg.GetCertificate = c.getCertificate
	cfg.ClientAuth = tls.RequireAndVerifyClientCert
	cfg.VerifyConnection = func(cs tls.ConnectionState) error { return c.checkSite(cs, "") }
	return cfg
}

// SiteClient is the configuration for dialing another site (Raft, API
// forwarding): it presents this site's certificate, and the server must be
// a site of the cluster CA, not revoked (SetRevoked); if expect is not "",
// the site named expect (one site cannot pose as another). The caller sets ServerName to the
// dialed host (netx does), which the server's certificate must list.
func (c *Credentials) SiteClient(expect string) *tls.Config {
	cfg := c.base()
	cfg.GetClientCertificate = c.getClientCertificate
	cfg.VerifyConnection = func(cs tls.ConnectionState) error { return c.checkSite(cs, expect) }
	return cfg
}

// APIServer is the configuration of the admin API listener. A client
// certificate is verified if one is given (any robib identity: sites
// forward, clients administer); none is allowed at the TLS level, since
// API tokens exist: the HTTP layer decides, reading PeerIdentity(r.TLS).
func (c *Credentials) APIServer() *tls.Config {
	cfg := c.base()
	cfg.GetCertificate = c.getCertificate
	cfg.ClientAuth = tls.VerifyClientCertIfGiven
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return nil
		}
		return checkPeer(cs, "admin API", "", "")
	}
	return cfg
}

// NBDServer is the configuration of NBD's STARTTLS. With verifyPeer the
// client must present a client certificate of the cluster CA (a site's
// certificate is refused); without, no client certificate is asked for.
func (c *Credentials) NBDServer(verifyPeer bool) *tls.Config {
	cfg := c.base()
	cfg.GetCertificate = c.getCertificate
	if verifyPeer {
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
		cfg.VerifyConnection = func(cs tls.ConnectionState) error { return checkPeer(cs, "NBD", KindClient, "") }
	}
	return cfg
}

// checkPeer refuses a verified peer whose identity is not kind (any kind
// if "") or not named expect (any name if "").
func checkPeer(cs tls.ConnectionState, link string, kind Kind, expect string) error {
	if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return fmt.Errorf("%w: %s: the peer's certificate was not verified", ErrPeerRefused, link)
	}
	id, err := IdentityOf(cs.VerifiedChains[0][0])
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrPeerRefused, link, err)
	}
	if kind != "" && id.Kind != kind {
		return fmt.Errorf("%w: %s: peer %s is not a %s", ErrPeerRefused, link, id, kind)
	}
	if expect != "" && id.Name != expect {
		return fmt.Errorf("%w: %s: peer is %s, want %s/%s", ErrPeerRefused, link, id, kind, expect)
	}
	return nil
}

// ClientConfig is the CLI's configuration for the admin API: the server
// must be a site of the CA in caFile (and its certificate must list the
// host dialed); certFile and keyFile, both or neither, are the certificate
// to present (a client's, or a site's). Read once: the CLI is short-lived.
func ClientConfig(caFile, certFile, keyFile string) (*tls.Config, error) {
	if caFile == "" {
		return nil, fmt.Errorf("%w: no CA certificate given", ErrCredentials)
	}
	if (certFile == "") != (keyFile == "") {
		return nil, fmt.Errorf("%w: a client certificate needs both a certificate and a key file", ErrCredentials)
	}
	ca, err := readCACert(caFile)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	cfg := &tls.Config{
		MinVersion:       tls.VersionTLS13,
		RootCAs:          roots,
		VerifyConnection: func(cs tls.ConnectionState) error { return checkPeer(cs, "admin API", KindSite, "") },
	}
	if certFile != "" {
		pair, _, err := readPair(roots, caFile, certFile, keyFile, time.Now())
		if err != nil {
			return nil, err
		}
		cfg.Certificates = []tls.Certificate{*pair}
	}
	return cfg, nil
}

// ParseGossipKey decodes a gossip key file's content: one line of base64
// holding 16, 24 or 32 bytes (AES-128, -192 or -256; CreateCA writes 32).
func ParseGossipKey(data []byte) ([]byte, error) {
	s := strings.TrimSpace(string(data))
	key, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("%w: gossip key: not base64: %v", ErrCredentials, err)
	}
	switch len(key) {
	case 16, 24, 32:
		return key, nil
	}
	return nil, fmt.Errorf("%w: gossip key: %d bytes, want 16, 24 or 32", ErrCredentials, len(key))
}

// LoadGossipKey reads a gossip key file (see ParseGossipKey).
func LoadGossipKey(path string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: gossip key: %v", ErrCredentials, err)
	}
	key, err := ParseGossipKey(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return key, nil
}

// readCACert reads a CA certificate file.
func readCACert(path string) (*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: CA certificate: %v", ErrCredentials, err)
	}
	return parseCACert(path, data)
}

func parseCACert(path string, data []byte) (*x509.Certificate, error) {
	certs, err := parseCerts(path, data)
	if err != nil {
		return nil, err
	}
	ca := certs[0]
	if !ca.IsCA || !ca.BasicConstraintsValid {
		return nil, fmt.Errorf("%w: %s is not a CA certificate", ErrCredentials, path)
	}
	if len(certs) > 1 {
		return nil, fmt.Errorf("%w: %s holds %d certificates, want the cluster CA alone", ErrCredentials, path, len(certs))
	}
	return ca, nil
}

// readCerts reads a certificate file: the certificate, then any
// intermediates.
func readCerts(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: certificate: %v", ErrCredentials, err)
	}
	return parseCerts(path, data)
}

func parseCerts(path string, data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	rest := data
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("%w: %s: PEM block %q, want CERTIFICATE", ErrCredentials, path, b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrCredentials, path, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("%w: %s: no PEM certificate in it", ErrCredentials, path)
	}
	if strings.TrimSpace(string(rest)) != "" {
		return nil, fmt.Errorf("%w: %s: data after the last PEM block", ErrCredentials, path)
	}
	return certs, nil
}

// readKey reads a PEM private key: PKCS#8, or SEC 1 ("EC PRIVATE KEY"), or
// PKCS#1 RSA.
func readKey(path string) (crypto.Signer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: key: %v", ErrCredentials, err)
	}
	b, rest := pem.Decode(data)
	if b == nil {
		return nil, fmt.Errorf("%w: %s: no PEM key in it", ErrCredentials, path)
	}
	if strings.TrimSpace(string(rest)) != "" {
		return nil, fmt.Errorf("%w: %s: data after the key", ErrCredentials, path)
	}
	var key any
	switch b.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(b.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(b.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(b.Bytes)
	default:
		return nil, fmt.Errorf("%w: %s: PEM block %q, want PRIVATE KEY", ErrCredentials, path, b.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCredentials, path, err)
	}
	s, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("%w: %s: %T cannot sign", ErrCredentials, path, key)
	}
	return s, nil
}

func samePublicKey(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}
