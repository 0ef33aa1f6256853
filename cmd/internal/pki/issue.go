package pki

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Default lifetimes. There is no revocation list: a lifetime is how long a
// lost key stays usable, so client certificates (held by people and VMs,
// easier to lose) live shorter than site certificates (whose expiry stops
// a site). Rotation needs no restart (Credentials reloads), so renewing is
// re-issuing into the same directory with Force.
const (
	DefaultCALifetime     = 10 * 365 * 24 * time.Hour // 10 years
	DefaultSiteLifetime   = 365 * 24 * time.Hour      // 1 year
	DefaultClientLifetime = 90 * 24 * time.Hour       // 90 days
)

// clockSkew backdates NotBefore so that a peer whose clock is a little
// behind accepts a certificate issued just now.
const clockSkew = 5 * time.Minute

// gossipKeySize is the size of the gossip key CreateCA writes (AES-256).
const gossipKeySize = 32

// fileMode is the mode of every file written here.
const fileMode = 0o600

// CAOptions configures CreateCA.
type CAOptions struct {
	// Name is the CA's common name; "" means "robib cluster CA" and 8 random
	// hex digits, so that two clusters' CAs are told apart in messages.
	Name string
	// Lifetime of the CA certificate; 0 means DefaultCALifetime. No
	// certificate it issues outlives it.
	Lifetime time.Duration
	// Force overwrites existing files.
	Force bool
}

// CreateCA makes a new cluster trust root in dir (created with mode 0700 if
// needed): an ECDSA P-256 self-signed CA certificate (ca-cert.pem), its key
// (ca-key.pem) and the cluster's gossip encryption key (gossip.key: 32
// random bytes, base64, one line). Every file gets mode 0600. It refuses
// to overwrite any of them (ErrExists) unless opts.Force.
func CreateCA(dir string, opts CAOptions) error {
	if strings.TrimSpace(dir) == "" {
		return fmt.Errorf("%w: no CA directory given", ErrInvalidRequest)
	}
	if opts.Lifetime < 0 {
		return fmt.Errorf("%w: CA lifetime %v is negative", ErrInvalidRequest, opts.Lifetime)
	}
	lifetime := opts.Lifetime
	if lifetime == 0 {
		lifetime = DefaultCALifetime
	}
	name := opts.Name
	if name == "" {
		tag := make([]byte, 4)
		if _, err := rand.Read(tag); err != nil {
			return err
		}
		name = fmt.Sprintf("robib cluster CA %x", tag)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	serial, err := newSerial()
	if err != nil {
		return err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name, Organization: []string{"robib"}},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(lifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return fmt.Errorf("creating the CA certificate: %w", err)
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return err
	}
	gossip := make([]byte, gossipKeySize)
	if _, err := rand.Read(gossip); err != nil {
		return err
	}
	return writeFiles(dir, opts.Force, []outFile{
		{CACertFile, encodeCert(der), false},
		{CAKeyFile, keyPEM, false},
		{GossipKeyFile, []byte(base64.StdEncoding.EncodeToString(gossip) + "\n"), false},
	})
}

// IssueRequest asks Issue for one certificate.
type IssueRequest struct {
	// Name is the site or client name (the site-name rule: 1-63 letters,
	// digits, '.', '_' or '-', starting with a letter or digit). A site's
	// is its --name.
	Name string
	Kind Kind
	// IPs and DNS are the certificate's address SANs: for a site, every
	// address other sites and clients dial it at (its Raft, API and NBD
	// addresses). A site certificate needs at least one (there is no
	// default: a certificate for 127.0.0.1 would fail on the first remote
	// peer). Clients need none.
	IPs []net.IP
	DNS []string
	// Lifetime: 0 means DefaultSiteLifetime or DefaultClientLifetime. It
	// is cut to the CA's own expiry.
	Lifetime time.Duration
	// OutDir receives the files (created with mode 0700 if needed). It
	// may not be the CA directory (the CA key stays apart from what is
	// handed out).
	OutDir string
	// Force overwrites existing files. Without it, an existing
	// ca-cert.pem or gossip.key with the same content is no conflict (a
	// directory may hold a site's and a client's credentials).
	Force bool

	// notBefore, if set, replaces the issue time (tests: expired and
	// not-yet-valid certificates).
	notBefore time.Time
}

// Issue signs a certificate with the CA in caDir and writes it to
// req.OutDir in the GnuTLS/qemu/libnbd layout: ca-cert.pem always; for
// KindSite server-cert.pem, server-key.pem and a copy of the CA's
// gossip.key; for KindClient client-cert.pem and client-key.pem. Site
// certificates may authenticate a server and a client (a site dials the
// others with the same certificate), client certificates only a client.
// The identity is bound as CN = Name and the URI SAN robib://KIND/NAME.
func Issue(caDir string, req IssueRequest) error {
	if err := req.check(); err != nil {
		return err
	}
	if err := apartFromCA(caDir, req.OutDir); err != nil {
		return err
	}
	ca, caKey, caPEM, err := readCA(caDir)
	if err != nil {
		return err
	}
	lifetime := req.Lifetime
	if lifetime == 0 {
		lifetime = DefaultClientLifetime
		if req.Kind == KindSite {
			lifetime = DefaultSiteLifetime
		}
	}
	start := req.notBefore
	if start.IsZero() {
		start = time.Now().Add(-clockSkew)
	}
	notAfter := start.Add(lifetime)
	if notAfter.After(ca.NotAfter) {
		notAfter = ca.NotAfter
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	serial, err := newSerial()
	if err != nil {
		return err
	}
	id := Identity{Name: req.Name, Kind: req.Kind}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: req.Name, Organization: []string{"robib"}, OrganizationalUnit: []string{string(req.Kind)}},
		NotBefore:    start,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{id.URI()},
		IPAddresses:  req.IPs,
		DNSNames:     req.DNS,
	}
	if req.Kind == KindSite {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("signing the certificate for %s: %w", id, err)
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return err
	}
	files := []outFile{{CACertFile, caPEM, true}}
	switch req.Kind {
	case KindSite:
		gossip, err := os.ReadFile(filepath.Join(caDir, GossipKeyFile))
		if err != nil {
			return fmt.Errorf("%w: CA directory %s: %v", ErrCredentials, caDir, err)
		}
		if _, err := ParseGossipKey(gossip); err != nil {
			return fmt.Errorf("%s: %w", filepath.Join(caDir, GossipKeyFile), err)
		}
		files = append(files, outFile{ServerKeyFile, keyPEM, false}, outFile{ServerCertFile, encodeCert(der), false}, outFile{GossipKeyFile, gossip, true})
	case KindClient:
		files = append(files, outFile{ClientKeyFile, keyPEM, false}, outFile{ClientCertFile, encodeCert(der), false})
	}
	return writeFiles(req.OutDir, req.Force, files)
}

func (req IssueRequest) check() error {
	if !validKind(req.Kind) {
		return fmt.Errorf("%w: kind %q: want %s or %s", ErrInvalidRequest, req.Kind, KindSite, KindClient)
	}
	if !ValidName(req.Name) {
		return fmt.Errorf("%w: name %q: 1-63 characters of letters, digits, '.', '_' or '-', starting with a letter or digit", ErrInvalidRequest, req.Name)
	}
	if req.Lifetime < 0 {
		return fmt.Errorf("%w: lifetime %v is negative", ErrInvalidRequest, req.Lifetime)
	}
	for _, ip := range req.IPs {
		if len(ip) != net.IPv4len && len(ip) != net.IPv6len {
			return fmt.Errorf("%w: bad IP address %v", ErrInvalidRequest, ip)
		}
	}
	for _, d := range req.DNS {
		if !validDNSName(d) {
			return fmt.Errorf("%w: bad DNS name %q", ErrInvalidRequest, d)
		}
	}
	if req.Kind == KindSite && len(req.IPs)+len(req.DNS) == 0 {
		return fmt.Errorf("%w: a site certificate needs at least one IP address or DNS name: the addresses other sites and clients dial it at", ErrInvalidRequest)
	}
	if strings.TrimSpace(req.OutDir) == "" {
		return fmt.Errorf("%w: no output directory given", ErrInvalidRequest)
	}
	return nil
}

// validDNSName: dot-separated labels of letters, digits and '-' (not at a
// label's ends), 1-63 each, 253 in all.
func validDNSName(s string) bool {
	if s == "" || len(s) > 253 {
		return false
	}
	for _, l := range strings.Split(s, ".") {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for _, r := range l {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
				return false
			}
		}
	}
	return true
}

// apartFromCA refuses an output directory that is the CA directory.
func apartFromCA(caDir, outDir string) error {
	ca, err := os.Stat(caDir)
	if err != nil {
		return fmt.Errorf("%w: CA directory: %v", ErrCredentials, err)
	}
	if out, err := os.Stat(outDir); err == nil && os.SameFile(ca, out) {
		return fmt.Errorf("%w: output directory %s is the CA directory: keep the CA key apart from issued credentials", ErrInvalidRequest, outDir)
	}
	return nil
}

// readCA reads and checks the CA certificate and key of caDir.
func readCA(caDir string) (*x509.Certificate, crypto.Signer, []byte, error) {
	certFile, keyFile := filepath.Join(caDir, CACertFile), filepath.Join(caDir, CAKeyFile)
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%w: CA certificate: %v", ErrCredentials, err)
	}
	ca, err := parseCACert(certFile, certPEM)
	if err != nil {
		return nil, nil, nil, err
	}
	key, err := readKey(keyFile)
	if err != nil {
		return nil, nil, nil, err
	}
	if !samePublicKey(ca.PublicKey, key.Public()) {
		return nil, nil, nil, fmt.Errorf("%w: %s does not match the CA certificate %s", ErrCredentials, keyFile, certFile)
	}
	return ca, key, certPEM, nil
}

func newSerial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}

func encodeCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// encodeKey writes a key as PKCS#8 ("PRIVATE KEY"), which GnuTLS reads too.
func encodeKey(key *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// outFile is one file to write; shared files (the CA certificate copy, the
// gossip key) are no conflict when they exist with the same content.
type outFile struct {
	name   string
	data   []byte
	shared bool
}

// writeFiles writes files into dir, each atomically (a temporary file
// renamed over the name, so a reader such as Credentials never sees half
// a file) with mode 0600. Unless force, it first checks that none exists,
// and writes nothing if one does.
func writeFiles(dir string, force bool, files []outFile) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if !force {
		var exist []string
		for _, f := range files {
			path := filepath.Join(dir, f.name)
			old, err := os.ReadFile(path)
			switch {
			case errors.Is(err, fs.ErrNotExist):
			case err != nil:
				return err
			case !f.shared || !bytes.Equal(old, f.data):
				exist = append(exist, path)
			}
		}
		if len(exist) > 0 {
			return fmt.Errorf("%w: %s (use force to overwrite)", ErrExists, strings.Join(exist, ", "))
		}
	}
	for _, f := range files {
		if err := writeAtomic(filepath.Join(dir, f.name), f.data); err != nil {
			return err
		}
	}
	return syncDir(dir)
}

func writeAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // after a successful rename: nothing there
	if err := tmp.Chmod(fileMode); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
