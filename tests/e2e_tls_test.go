package tests

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/robib/robib/tests/harness"
)

// The identities of the TLS tests' policy: harness.AdminClient is an admin
// and may attach every volume read-write; viewer reads the API and may
// attach tlsvol read-only; the token reporter reads the API.
const (
	tlsViewer      = "viewer"
	tlsReportToken = "robib_test-reporter-token"
)

func tlsPolicy(t *testing.T) string {
	t.Helper()
	return writeFile(t, t.TempDir(), "policy.yaml", []byte(fmt.Sprintf(`version: 1
api:
  admin: [%s]
  read: [%s]
tokens:
  - {name: reporter, sha256: %s, role: read}
volumes:
  "*": {rw: [%s]}
  tlsvol: {ro: [%s]}
`, harness.AdminClient, tlsViewer, sha256Hex([]byte(tlsReportToken)), harness.AdminClient, tlsViewer)))
}

// startTLSCluster starts three sites with TLS on every link, NBD client
// certificates required and the test policy.
func startTLSCluster(t *testing.T) (*harness.Cluster, *harness.PKI) {
	t.Helper()
	bin := harness.Build(t)
	p := harness.NewPKI(t, bin)
	c := harness.StartCluster(t, harness.ClusterOptions{Bin: bin, TLS: p,
		Args: []string{"--nbd-tls-verify-peer", "--auth-policy", tlsPolicy(t)}})
	return c, p
}

// nbdsURI is the nbds:// URI of export at a with the certificates in dir.
func nbdsURI(a *harness.Agent, export, dir string) string {
	return "nbds://" + a.NBDAddr + "/" + export + "?tls-certificates=" + url.QueryEscape(dir)
}

// TestTLSClusterRealClients (issue 14): with TLS on every link, nbdcopy,
// nbdinfo and qemu-img read and write over TLS, and every stranger is
// refused: a plaintext NBD client, client certificates of another CA,
// expired ones, a site certificate used as a client, a client without the
// right on a volume; API calls without credentials, a read-only identity
// on admin calls, and a client posting to the site-to-site endpoints. No
// refusal changes anything.
func TestTLSClusterRealClients(t *testing.T) {
	requireTools(t, "nbdcopy", "nbdinfo", "qemu-img")
	c, p := startTLSCluster(t)
	a1, a2, a3 := c.Agents[0], c.Agents[1], c.Agents[2]
	const size = 8 * MiB
	a1.CreateVolume("tlsvol", "8MiB")
	waitVolumeEverywhere(t, c, "tlsvol", size)

	// Data over TLS: written at site2, read back at site3 (read-only) with
	// nbdcopy and at site1 with qemu-img over its own TLS stack.
	data := randomBytes(1401, size)
	nbdcopyIn(t, writeFile(t, t.TempDir(), "in.img", data), a2.NBDURI("tlsvol"))
	assertSameBytes(t, "nbdcopy over TLS at site3", nbdcopyOut(t, a3.NBDURI("tlsvol@ro")), data)
	out := filepath.Join(t.TempDir(), "qemu.img")
	harness.MustRun(t, toolTimeout, "qemu-img", "convert", "-O", "raw",
		"--object", "tls-creds-x509,id=tls0,dir="+p.Client(harness.AdminClient)+",endpoint=client",
		"--image-opts", "driver=nbd,host=127.0.0.1,port="+a1.NBDPort()+",export=tlsvol@ro,tls-creds=tls0", out)
	assertSameBytes(t, "qemu-img over TLS at site1", readFile(t, out), data)
	info := nbdinfoJSON(t, nbdsURI(a1, "tlsvol@ro", p.Client(tlsViewer)))
	if len(info.Exports) != 1 {
		t.Fatalf("nbdinfo as viewer: %+v", info)
	}

	// Refused at the NBD handshake, each with its reason.
	refused := func(what, uri, want string) {
		t.Helper()
		r := harness.Run(t, toolTimeout, nil, "nbdinfo", uri)
		if r.Err == nil {
			t.Errorf("%s: nbdinfo was served:\n%s", what, r.Stdout)
			return
		}
		if !strings.Contains(strings.ToLower(r.Stderr), strings.ToLower(want)) {
			t.Errorf("%s: nbdinfo failed without %q:\n%s", what, want, r.Stderr)
		}
	}
	refused("plaintext client", "nbd://"+a1.NBDAddr+"/tlsvol", "TLS")
	other := harness.NewPKI(t, a1.Bin)
	refused("client certificate of another CA", nbdsURI(a1, "tlsvol@ro", mixedDir(t, p, other.Client("admin"), "client")), "")
	refused("expired client certificate", nbdsURI(a1, "tlsvol@ro", expiredClientDir(t, p, harness.AdminClient)), "")
	refused("site certificate as a client", nbdsURI(a1, "tlsvol@ro", mixedDir(t, p, p.Site("site2"), "server")), "")
	refused("viewer attaching read-write", nbdsURI(a1, "tlsvol", p.Client(tlsViewer)), "")
	refused("unlisted client", nbdsURI(a1, "tlsvol@ro", p.Client("stranger")), "")
	// Each refusal is logged at the site that made it (site1): the TLS
	// handshakes it refused, and the policy's denials with the identity.
	harness.WaitFor(t, clusterWait, "site1 to log the refusals", func() (bool, error) {
		log := a1.CurrentLog()
		for _, want := range []string{"nbd TLS handshake failed", "nbd access denied", "client " + tlsViewer + " may not attach", "client stranger may not attach"} {
			if !strings.Contains(log, want) {
				return false, fmt.Errorf("no %q in site1's log", want)
			}
		}
		return true, nil
	})

	// The admin API.
	before := volumeNames(t, a1, p)
	status := func(hc *http.Client, method, path, token string, body []byte) int {
		t.Helper()
		req, err := http.NewRequest(method, a1.APIURL()+path, bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	anon, admin, viewer := p.HTTPClient(""), p.HTTPClient(harness.AdminClient), p.HTTPClient(tlsViewer)
	create := []byte(`{"name":"intruder","size":1048576}`)
	for _, tc := range []struct {
		what         string
		hc           *http.Client
		method, path string
		token        string
		body         []byte
		want         int
	}{
		{"no credentials, list", anon, "GET", "/v1/volumes", "", nil, http.StatusUnauthorized},
		{"no credentials, create", anon, "POST", "/v1/volumes", "", create, http.StatusUnauthorized},
		{"health needs nothing", anon, "GET", "/v1/health", "", nil, http.StatusOK},
		{"viewer lists", viewer, "GET", "/v1/volumes", "", nil, http.StatusOK},
		{"viewer deletes", viewer, "DELETE", "/v1/volumes/tlsvol", "", nil, http.StatusForbidden},
		{"viewer profiles", viewer, "GET", "/debug/pprof/", "", nil, http.StatusForbidden},
		{"read token lists", anon, "GET", "/v1/cluster/status", tlsReportToken, nil, http.StatusOK},
		{"read token creates", anon, "POST", "/v1/volumes", tlsReportToken, create, http.StatusForbidden},
		{"unknown token", anon, "GET", "/v1/volumes", "robib_guess", nil, http.StatusUnauthorized},
		{"stranger posts to apply", anon, "POST", "/internal/v1/apply", "", []byte("junk"), http.StatusUnauthorized},
		{"admin client posts to apply", admin, "POST", "/internal/v1/apply", "", []byte("junk"), http.StatusForbidden},
		{"admin token-less lists", admin, "GET", "/v1/volumes", "", nil, http.StatusOK},
	} {
		if got := status(tc.hc, tc.method, tc.path, tc.token, tc.body); got != tc.want {
			t.Errorf("%s: %s %s: HTTP %d, want %d", tc.what, tc.method, tc.path, got, tc.want)
		}
	}
	// Plain HTTP to the HTTPS port is not served.
	if resp, err := http.Get("http://" + a1.APIAddr + "/v1/volumes"); err == nil {
		resp.Body.Close()
		if resp.StatusCode < 400 {
			t.Errorf("plain HTTP to the API: HTTP %d", resp.StatusCode)
		}
	}
	if after := volumeNames(t, a1, p); after != before {
		t.Errorf("refused calls changed the volumes: %q, then %q", before, after)
	}
	assertSameBytes(t, "tlsvol after the refusals", nbdcopyOut(t, a2.NBDURI("tlsvol@ro")), data)
}

// volumeNames lists the volumes as the admin client sees them.
func volumeNames(t *testing.T, a *harness.Agent, p *harness.PKI) string {
	t.Helper()
	resp, err := p.HTTPClient(harness.AdminClient).Get(a.APIURL() + "/v1/volumes")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var vols []struct{ Name string }
	if err := json.NewDecoder(resp.Body).Decode(&vols); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, v := range vols {
		names = append(names, v.Name)
	}
	return strings.Join(names, ",")
}

// mixedDir is a GnuTLS-layout client directory with p's CA and the
// certificate and key of kind ("client" or "server") found in src: a
// certificate the server must refuse although the client trusts it.
func mixedDir(t *testing.T, p *harness.PKI, src, kind string) string {
	t.Helper()
	d := t.TempDir()
	copyFile(t, filepath.Join(p.CA(), "ca-cert.pem"), filepath.Join(d, "ca-cert.pem"))
	copyFile(t, filepath.Join(src, kind+"-cert.pem"), filepath.Join(d, "client-cert.pem"))
	copyFile(t, filepath.Join(src, kind+"-key.pem"), filepath.Join(d, "client-key.pem"))
	return d
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	if err := os.WriteFile(to, readFile(t, from), 0o600); err != nil {
		t.Fatal(err)
	}
}

// expiredClientDir is a client directory whose certificate for name was
// signed by p's CA and expired an hour ago.
func expiredClientDir(t *testing.T, p *harness.PKI, name string) string {
	t.Helper()
	caCertPEM, _ := pem.Decode(readFile(t, filepath.Join(p.CA(), "ca-cert.pem")))
	caKeyPEM, _ := pem.Decode(readFile(t, filepath.Join(p.CA(), "ca-key.pem")))
	if caCertPEM == nil || caKeyPEM == nil {
		t.Fatal("CA files are not PEM")
	}
	caCert, err := x509.ParseCertificate(caCertPEM.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	caKey, err := x509.ParsePKCS8PrivateKey(caKeyPEM.Bytes)
	if err != nil {
		if caKey, err = x509.ParseECPrivateKey(caKeyPEM.Bytes); err != nil {
			t.Fatalf("CA key: %v", err)
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse("robib://client/" + name)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-48 * time.Hour),
		NotAfter:     time.Now().Add(-time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{u},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	d := t.TempDir()
	copyFile(t, filepath.Join(p.CA(), "ca-cert.pem"), filepath.Join(d, "ca-cert.pem"))
	if err := os.WriteFile(filepath.Join(d, "client-cert.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d, "client-key.pem"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return d
}
