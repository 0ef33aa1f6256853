package pki

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// newCA makes a CA in a fresh directory.
func newCA(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	if err := CreateCA(dir, CAOptions{}); err != nil {
		t.Fatal(err)
	}
	return dir
}

var loopback = []net.IP{net.ParseIP("127.0.0.1")}

// issue issues name of kind from caDir into a fresh directory (a site gets
// 127.0.0.1 and localhost) and returns the directory.
func issue(t *testing.T, caDir, name string, kind Kind, tweak ...func(*IssueRequest)) string {
	t.Helper()
	req := IssueRequest{Name: name, Kind: kind, OutDir: filepath.Join(t.TempDir(), name)}
	if kind == KindSite {
		req.IPs, req.DNS = loopback, []string{"localhost"}
	}
	for _, f := range tweak {
		f(&req)
	}
	if err := Issue(caDir, req); err != nil {
		t.Fatal(err)
	}
	return req.OutDir
}

func siteFiles(dir string) (ca, cert, key string) {
	return filepath.Join(dir, CACertFile), filepath.Join(dir, ServerCertFile), filepath.Join(dir, ServerKeyFile)
}

func clientFiles(dir string) (ca, cert, key string) {
	return filepath.Join(dir, CACertFile), filepath.Join(dir, ClientCertFile), filepath.Join(dir, ClientKeyFile)
}

func loadSite(t *testing.T, dir string) *Credentials {
	t.Helper()
	c, err := Load(siteFiles(dir))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	certs, err := readCerts(path)
	if err != nil {
		t.Fatal(err)
	}
	return certs[0]
}

func checkMode(t *testing.T, path string) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("%s: mode %v, want 0600", path, fi.Mode().Perm())
	}
}

func TestCreateCA(t *testing.T) {
	dir := newCA(t)
	for _, f := range []string{CACertFile, CAKeyFile, GossipKeyFile} {
		checkMode(t, filepath.Join(dir, f))
	}
	ca := readCert(t, filepath.Join(dir, CACertFile))
	if !ca.IsCA || !regexp.MustCompile(`^robib cluster CA [0-9a-f]{8}$`).MatchString(ca.Subject.CommonName) || ca.KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Errorf("CA certificate: CA %v, CN %q, usage %v", ca.IsCA, ca.Subject.CommonName, ca.KeyUsage)
	}
	if pub, ok := ca.PublicKey.(*ecdsa.PublicKey); !ok || pub.Curve != elliptic.P256() {
		t.Errorf("CA key %T, want ECDSA P-256", ca.PublicKey)
	}
	if life := time.Until(ca.NotAfter); life < DefaultCALifetime-time.Hour || life > DefaultCALifetime {
		t.Errorf("CA lifetime %v, want %v", life, DefaultCALifetime)
	}
	if err := ca.CheckSignatureFrom(ca); err != nil {
		t.Errorf("not self-signed: %v", err)
	}
	gk, err := os.ReadFile(filepath.Join(dir, GossipKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if n := bytes.Count(gk, []byte("\n")); n != 1 || !bytes.HasSuffix(gk, []byte("\n")) {
		t.Errorf("gossip.key %q: want one line", gk)
	}
	if key, err := LoadGossipKey(filepath.Join(dir, GossipKeyFile)); err != nil || len(key) != 32 {
		t.Errorf("gossip key: %d bytes, %v", len(key), err)
	}

	// No overwrite without Force; nothing changes.
	before, _ := os.ReadFile(filepath.Join(dir, CAKeyFile))
	err = CreateCA(dir, CAOptions{})
	if !errors.Is(err, ErrExists) || !strings.Contains(err.Error(), CAKeyFile) {
		t.Fatalf("second CreateCA: %v, want ErrExists naming the files", err)
	}
	if after, _ := os.ReadFile(filepath.Join(dir, CAKeyFile)); !bytes.Equal(before, after) {
		t.Fatal("refused CreateCA changed the key")
	}
	// One existing file is enough to refuse.
	other := t.TempDir()
	os.WriteFile(filepath.Join(other, GossipKeyFile), []byte("x"), 0o600)
	if err := CreateCA(other, CAOptions{}); !errors.Is(err, ErrExists) {
		t.Fatalf("CreateCA over a gossip.key: %v", err)
	}
	if _, err := os.Stat(filepath.Join(other, CAKeyFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("refused CreateCA wrote a key")
	}
	if err := CreateCA(dir, CAOptions{Force: true, Name: "second", Lifetime: 48 * time.Hour}); err != nil {
		t.Fatal(err)
	}
	if after, _ := os.ReadFile(filepath.Join(dir, CAKeyFile)); bytes.Equal(before, after) {
		t.Fatal("Force did not replace the key")
	}
	ca = readCert(t, filepath.Join(dir, CACertFile))
	if ca.Subject.CommonName != "second" || time.Until(ca.NotAfter) > 48*time.Hour {
		t.Errorf("options ignored: CN %q until %v", ca.Subject.CommonName, ca.NotAfter)
	}
	for _, bad := range []CAOptions{{Lifetime: -time.Second}} {
		if err := CreateCA(t.TempDir(), bad); !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("CreateCA(%+v): %v", bad, err)
		}
	}
	if err := CreateCA(" ", CAOptions{}); !errors.Is(err, ErrInvalidRequest) {
		t.Errorf("CreateCA without a directory: %v", err)
	}
}

func TestIssueSite(t *testing.T) {
	caDir := newCA(t)
	dir := issue(t, caDir, "site-1", KindSite, func(r *IssueRequest) {
		r.IPs = append(r.IPs, net.ParseIP("::1"), net.ParseIP("10.0.0.1"))
	})
	for _, f := range []string{CACertFile, ServerCertFile, ServerKeyFile, GossipKeyFile} {
		checkMode(t, filepath.Join(dir, f))
	}
	for _, f := range []string{ClientCertFile, ClientKeyFile, CAKeyFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("site directory has %s", f)
		}
	}
	for _, f := range []string{CACertFile, GossipKeyFile} {
		a, _ := os.ReadFile(filepath.Join(caDir, f))
		b, _ := os.ReadFile(filepath.Join(dir, f))
		if !bytes.Equal(a, b) {
			t.Errorf("%s is not a copy of the CA's", f)
		}
	}
	cert := readCert(t, filepath.Join(dir, ServerCertFile))
	if cert.Subject.CommonName != "site-1" || len(cert.URIs) != 1 || cert.URIs[0].String() != "robib://site/site-1" {
		t.Errorf("identity: CN %q, URIs %v", cert.Subject.CommonName, cert.URIs)
	}
	if len(cert.ExtKeyUsage) != 2 || cert.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || cert.ExtKeyUsage[1] != x509.ExtKeyUsageClientAuth {
		t.Errorf("site usages %v, want server and client auth", cert.ExtKeyUsage)
	}
	if len(cert.IPAddresses) != 3 || len(cert.DNSNames) != 1 || cert.DNSNames[0] != "localhost" {
		t.Errorf("SANs %v %v", cert.IPAddresses, cert.DNSNames)
	}
	if err := cert.VerifyHostname("10.0.0.1"); err != nil {
		t.Error(err)
	}
	if life := time.Until(cert.NotAfter); life < DefaultSiteLifetime-time.Hour || life > DefaultSiteLifetime {
		t.Errorf("site lifetime %v, want %v", life, DefaultSiteLifetime)
	}
	c := loadSite(t, dir)
	if c.Identity() != (Identity{Name: "site-1", Kind: KindSite}) || !c.NotAfter().Equal(cert.NotAfter) {
		t.Errorf("loaded %v until %v", c.Identity(), c.NotAfter())
	}

	// Again into the same directory: refused, unless Force.
	again := IssueRequest{Name: "site-1", Kind: KindSite, IPs: loopback, OutDir: dir}
	if err := Issue(caDir, again); !errors.Is(err, ErrExists) || !strings.Contains(err.Error(), ServerKeyFile) || strings.Contains(err.Error(), CACertFile) {
		t.Fatalf("re-issue without force: %v (want ErrExists for the key and cert, not the identical CA copy)", err)
	}
	again.Force = true
	if err := Issue(caDir, again); err != nil {
		t.Fatal(err)
	}
	if readCert(t, filepath.Join(dir, ServerCertFile)).SerialNumber.Cmp(cert.SerialNumber) == 0 {
		t.Fatal("Force did not replace the certificate")
	}
	// A client's credentials may join a site's directory: the identical
	// ca-cert.pem is no conflict.
	if err := Issue(caDir, IssueRequest{Name: "admin", Kind: KindClient, OutDir: dir}); err != nil {
		t.Fatalf("client into a site directory: %v", err)
	}
}

func TestIssueClient(t *testing.T) {
	caDir := newCA(t)
	dir := issue(t, caDir, "vm.1_a", KindClient)
	for _, f := range []string{CACertFile, ClientCertFile, ClientKeyFile} {
		checkMode(t, filepath.Join(dir, f))
	}
	for _, f := range []string{ServerCertFile, ServerKeyFile, GossipKeyFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("client directory has %s", f)
		}
	}
	cert := readCert(t, filepath.Join(dir, ClientCertFile))
	if id, err := IdentityOf(cert); err != nil || id != (Identity{Name: "vm.1_a", Kind: KindClient}) {
		t.Errorf("identity %v, %v", id, err)
	}
	if len(cert.ExtKeyUsage) != 1 || cert.ExtKeyUsage[0] != x509.ExtKeyUsageClientAuth {
		t.Errorf("client usages %v, want client auth only", cert.ExtKeyUsage)
	}
	if life := time.Until(cert.NotAfter); life < DefaultClientLifetime-time.Hour || life > DefaultClientLifetime {
		t.Errorf("client lifetime %v, want %v", life, DefaultClientLifetime)
	}
	// A lifetime beyond the CA's is cut to it.
	short := filepath.Join(t.TempDir(), "ca")
	if err := CreateCA(short, CAOptions{Lifetime: 24 * time.Hour}); err != nil {
		t.Fatal(err)
	}
	dir = issue(t, short, "c", KindClient, func(r *IssueRequest) { r.Lifetime = 1000 * time.Hour })
	ca := readCert(t, filepath.Join(short, CACertFile))
	if got := readCert(t, filepath.Join(dir, ClientCertFile)).NotAfter; !got.Equal(ca.NotAfter) {
		t.Errorf("certificate until %v outlives the CA (%v)", got, ca.NotAfter)
	}
}

func TestIssueRejectsBadRequests(t *testing.T) {
	caDir := newCA(t)
	out := func() string { return filepath.Join(t.TempDir(), "out") }
	for name, tc := range map[string]struct {
		req  IssueRequest
		ca   string
		want error
		msg  string
	}{
		"unknown kind":        {IssueRequest{Name: "a", Kind: "server", OutDir: out()}, caDir, ErrInvalidRequest, `kind "server": want site or client`},
		"no kind":             {IssueRequest{Name: "a", OutDir: out()}, caDir, ErrInvalidRequest, `kind ""`},
		"empty name":          {IssueRequest{Kind: KindClient, OutDir: out()}, caDir, ErrInvalidRequest, `name ""`},
		"name with slash":     {IssueRequest{Name: "a/b", Kind: KindClient, OutDir: out()}, caDir, ErrInvalidRequest, `name "a/b"`},
		"name starts with -":  {IssueRequest{Name: "-a", Kind: KindClient, OutDir: out()}, caDir, ErrInvalidRequest, `name "-a"`},
		"name too long":       {IssueRequest{Name: strings.Repeat("a", 64), Kind: KindClient, OutDir: out()}, caDir, ErrInvalidRequest, "name"},
		"negative lifetime":   {IssueRequest{Name: "a", Kind: KindClient, Lifetime: -time.Hour, OutDir: out()}, caDir, ErrInvalidRequest, "lifetime -1h0m0s is negative"},
		"site without SANs":   {IssueRequest{Name: "a", Kind: KindSite, OutDir: out()}, caDir, ErrInvalidRequest, "needs at least one IP address or DNS name"},
		"bad DNS name":        {IssueRequest{Name: "a", Kind: KindSite, DNS: []string{"a..b"}, OutDir: out()}, caDir, ErrInvalidRequest, `bad DNS name "a..b"`},
		"DNS name with space": {IssueRequest{Name: "a", Kind: KindSite, DNS: []string{"a b"}, OutDir: out()}, caDir, ErrInvalidRequest, `bad DNS name`},
		"bad IP":              {IssueRequest{Name: "a", Kind: KindSite, IPs: []net.IP{{1, 2, 3}}, OutDir: out()}, caDir, ErrInvalidRequest, "bad IP address"},
		"no output directory": {IssueRequest{Name: "a", Kind: KindClient}, caDir, ErrInvalidRequest, "no output directory"},
		"output is the CA":    {IssueRequest{Name: "a", Kind: KindClient, OutDir: caDir}, caDir, ErrInvalidRequest, "is the CA directory"},
		"missing CA":          {IssueRequest{Name: "a", Kind: KindClient, OutDir: out()}, filepath.Join(caDir, "nope"), ErrCredentials, "no such file"},
		"CA without key":      {IssueRequest{Name: "a", Kind: KindClient, OutDir: out()}, partialCA(t, caDir, CAKeyFile), ErrCredentials, CAKeyFile},
		"CA without gossip":   {IssueRequest{Name: "a", Kind: KindSite, IPs: loopback, OutDir: out()}, partialCA(t, caDir, GossipKeyFile), ErrCredentials, GossipKeyFile},
		"CA with another key": {IssueRequest{Name: "a", Kind: KindClient, OutDir: out()}, mixedCA(t, caDir), ErrCredentials, "does not match the CA certificate"},
		"CA dir holds a leaf": {IssueRequest{Name: "a", Kind: KindClient, OutDir: out()}, leafAsCA(t, caDir), ErrCredentials, "is not a CA certificate"},
	} {
		t.Run(name, func(t *testing.T) {
			err := Issue(tc.ca, tc.req)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("%v; want %v saying %q", err, tc.want, tc.msg)
			}
			if tc.req.OutDir != "" && tc.req.OutDir != caDir {
				if _, err := os.Stat(filepath.Join(tc.req.OutDir, CACertFile)); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("a refused request wrote files")
				}
			}
		})
	}
}

// partialCA copies caDir without one file.
func partialCA(t *testing.T, caDir, without string) string {
	t.Helper()
	dir := t.TempDir()
	for _, f := range []string{CACertFile, CAKeyFile, GossipKeyFile} {
		if f != without {
			copyFile(t, filepath.Join(caDir, f), filepath.Join(dir, f))
		}
	}
	return dir
}

// mixedCA is caDir's certificate with another CA's key.
func mixedCA(t *testing.T, caDir string) string {
	t.Helper()
	dir := partialCA(t, caDir, "")
	copyFile(t, filepath.Join(newCA(t), CAKeyFile), filepath.Join(dir, CAKeyFile))
	return dir
}

// leafAsCA is a CA directory whose ca-cert.pem is a site certificate.
func leafAsCA(t *testing.T, caDir string) string {
	t.Helper()
	dir := partialCA(t, caDir, "")
	site := issue(t, caDir, "s", KindSite)
	copyFile(t, filepath.Join(site, ServerCertFile), filepath.Join(dir, CACertFile))
	copyFile(t, filepath.Join(site, ServerKeyFile), filepath.Join(dir, CAKeyFile))
	return dir
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestIdentityOf(t *testing.T) {
	u := func(s string) *url.URL {
		p, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := &x509.Certificate{URIs: []*url.URL{u("spiffe://x/y"), u("robib://client/c-1")}}
	if id, err := IdentityOf(good); err != nil || id != (Identity{Name: "c-1", Kind: KindClient}) || id.String() != "client/c-1" {
		t.Errorf("IdentityOf: %v, %v", id, err)
	}
	if s := (Identity{Name: "s1", Kind: KindSite}).URI().String(); s != "robib://site/s1" {
		t.Errorf("URI %q", s)
	}
	for name, uris := range map[string][]string{
		"none":            nil,
		"only foreign":    {"https://site/s1"},
		"two":             {"robib://site/a", "robib://site/b"},
		"bad kind":        {"robib://admin/a"},
		"bad name":        {"robib://site/a/b"},
		"empty name":      {"robib://site/"},
		"with a port":     {"robib://site:1/a"},
		"with a query":    {"robib://site/a?x=1"},
		"with a user":     {"robib://u@site/a"},
		"with a fragment": {"robib://site/a#f"},
	} {
		c := &x509.Certificate{}
		for _, s := range uris {
			c.URIs = append(c.URIs, u(s))
		}
		if id, err := IdentityOf(c); !errors.Is(err, ErrNotIdentity) {
			t.Errorf("%s: %v, %v; want ErrNotIdentity", name, id, err)
		}
	}
	if _, err := IdentityOf(nil); !errors.Is(err, ErrNotIdentity) {
		t.Errorf("nil: %v", err)
	}
}

func TestLoadRefusesBadCredentials(t *testing.T) {
	caDir := newCA(t)
	site := issue(t, caDir, "s1", KindSite)
	ca, cert, key := siteFiles(site)
	other := issue(t, newCA(t), "s1", KindSite)
	client := issue(t, caDir, "c1", KindClient)
	expired := issue(t, caDir, "old", KindSite, func(r *IssueRequest) {
		r.notBefore, r.Lifetime = time.Now().Add(-48*time.Hour), time.Hour
	})
	future := issue(t, caDir, "new", KindSite, func(r *IssueRequest) { r.notBefore = time.Now().Add(time.Hour) })
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	certPEM, _ := os.ReadFile(cert)
	keyPEM, _ := os.ReadFile(key)
	tampered := tamper(t, certPEM)
	corrupt := append([]byte{}, certPEM...)
	corrupt[len(corrupt)/2] = '!'
	missing := filepath.Join(dir, "missing.pem")
	for name, tc := range map[string]struct {
		ca, cert, key string
		msg           string
	}{
		"missing CA":         {missing, cert, key, "CA certificate: open " + missing + ": no such file or directory"},
		"missing cert":       {ca, missing, key, "certificate: open " + missing + ": no such file or directory"},
		"missing key":        {ca, cert, missing, "key: open " + missing + ": no such file or directory"},
		"CA not PEM":         {write("ca-garbage", []byte("hello")), cert, key, "no PEM certificate in it"},
		"cert not PEM":       {ca, write("cert-garbage", []byte("hello")), key, "no PEM certificate in it"},
		"key not PEM":        {ca, cert, write("key-garbage", []byte("hello")), "no PEM key in it"},
		"key in cert file":   {ca, key, key, `PEM block "PRIVATE KEY", want CERTIFICATE`},
		"cert in key file":   {ca, cert, cert, `PEM block "CERTIFICATE", want PRIVATE KEY`},
		"junk after cert":    {ca, write("cert-junk", append(append([]byte{}, certPEM...), "junk"...)), key, "data after the last PEM block"},
		"junk after key":     {ca, cert, write("key-junk", append(append([]byte{}, keyPEM...), "junk"...)), "data after the key"},
		"leaf as CA":         {cert, cert, key, "is not a CA certificate"},
		"tampered signature": {ca, write("tampered", tampered), key, "is not signed by the CA"},
		"corrupt base64":     {ca, write("corrupt", corrupt), key, "no PEM certificate in it"},
		"mismatched key":     {ca, cert, filepath.Join(other, ServerKeyFile), "does not match certificate"},
		"other CA's cert":    {ca, filepath.Join(other, ServerCertFile), filepath.Join(other, ServerKeyFile), "is not signed by the CA in " + ca},
		"expired":            {ca, filepath.Join(expired, ServerCertFile), filepath.Join(expired, ServerKeyFile), "expired at"},
		"not yet valid":      {ca, filepath.Join(future, ServerCertFile), filepath.Join(future, ServerKeyFile), "is not valid before"},
		"client certificate": {ca, filepath.Join(client, ClientCertFile), filepath.Join(client, ClientKeyFile), "is the certificate of client/c1, not of a site"},
	} {
		t.Run(name, func(t *testing.T) {
			c, err := Load(tc.ca, tc.cert, tc.key)
			if !errors.Is(err, ErrCredentials) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("Load: %v, %v; want ErrCredentials saying %q", c, err, tc.msg)
			}
		})
	}
	if _, err := Load(ca, cert, key); err != nil {
		t.Fatalf("the good files: %v", err)
	}
	// A site identity that may not serve (not one Issue makes).
	caCert, caKey, _, err := readCA(caDir)
	if err != nil {
		t.Fatal(err)
	}
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		URIs: []*url.URL{Identity{Name: "s9", Kind: KindSite}.URI()}, IPAddresses: loopback}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &leafKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM2, _ := encodeKey(leafKey)
	if _, err := Load(ca, write("noserve.pem", encodeCert(der)), write("noserve-key.pem", keyPEM2)); !errors.Is(err, ErrCredentials) || !strings.Contains(err.Error(), "may not serve") {
		t.Fatalf("site certificate without server auth: %v", err)
	}
}

// tamper flips a bit of the last byte of a PEM certificate's DER: its
// signature, so it still parses but no longer verifies.
func tamper(t *testing.T, p []byte) []byte {
	t.Helper()
	b, _ := pem.Decode(p)
	if b == nil {
		t.Fatal("not PEM")
	}
	der := append([]byte{}, b.Bytes...)
	der[len(der)-1] ^= 0x01
	return pem.EncodeToMemory(&pem.Block{Type: b.Type, Bytes: der})
}

func TestParseGossipKey(t *testing.T) {
	for _, n := range []int{16, 24, 32} {
		raw := bytes.Repeat([]byte{7}, n)
		key, err := ParseGossipKey([]byte(" " + base64.StdEncoding.EncodeToString(raw) + "\n"))
		if err != nil || !bytes.Equal(key, raw) {
			t.Errorf("%d bytes: %x, %v", n, key, err)
		}
	}
	for name, in := range map[string]string{
		"empty":      "",
		"not base64": "!!!!",
		"too short":  base64.StdEncoding.EncodeToString(make([]byte, 8)),
		"33 bytes":   base64.StdEncoding.EncodeToString(make([]byte, 33)),
		"two lines":  "AAAA\nAAAA",
	} {
		if key, err := ParseGossipKey([]byte(in)); !errors.Is(err, ErrCredentials) {
			t.Errorf("%s: %x, %v", name, key, err)
		}
	}
	if _, err := LoadGossipKey(filepath.Join(t.TempDir(), "nope")); !errors.Is(err, ErrCredentials) || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("missing file: %v", err)
	}
}

func FuzzParseGossipKey(f *testing.F) {
	f.Add([]byte(base64.StdEncoding.EncodeToString(make([]byte, 32)) + "\n"))
	f.Add([]byte("not a key"))
	f.Fuzz(func(t *testing.T, data []byte) {
		key, err := ParseGossipKey(data)
		if err != nil {
			if !errors.Is(err, ErrCredentials) {
				t.Fatalf("error %v does not wrap ErrCredentials", err)
			}
			return
		}
		if n := len(key); n != 16 && n != 24 && n != 32 {
			t.Fatalf("accepted a %d-byte key", n)
		}
	})
}

func FuzzParseCerts(f *testing.F) {
	dir := filepath.Join(f.TempDir(), "ca")
	if err := CreateCA(dir, CAOptions{}); err != nil {
		f.Fatal(err)
	}
	good, _ := os.ReadFile(filepath.Join(dir, CACertFile))
	f.Add(good)
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		certs, err := parseCerts("fuzz.pem", data)
		if err != nil {
			if !errors.Is(err, ErrCredentials) {
				t.Fatalf("error %v does not wrap ErrCredentials", err)
			}
			return
		}
		if len(certs) == 0 {
			t.Fatal("no error and no certificate")
		}
		for _, c := range certs {
			IdentityOf(c) // must not panic on whatever URIs it has
		}
	})
}
