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
	if table := a3.MustCLI("cluster", "status"); strings.Count(table, "mtls (cert until ") != 3 || strings.Contains(table, "INSECURE") {
		t.Errorf("cluster status does not show mtls with the certificate's expiry at every site:\n%s", table)
	}

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

// TestTLSJoinNeedsSiteCertificate (issue 14): a fourth agent with another
// cluster's site certificate (even holding the gossip key) or with no
// certificate at all (plaintext gossip) cannot join: it is never in the
// Raft configuration and receives no volume data, and the cluster keeps
// working.
func TestTLSJoinNeedsSiteCertificate(t *testing.T) {
	requireTools(t, "nbdcopy")
	bin := harness.Build(t)
	p := harness.NewPKI(t, bin)
	c := harness.StartCluster(t, harness.ClusterOptions{Bin: bin, TLS: p})
	const size = 4 * MiB
	c.Agents[0].CreateVolume("joinvol", "4MiB")
	waitVolumeEverywhere(t, c, "joinvol", size)
	data := randomBytes(1402, size)
	nbdcopyIn(t, writeFile(t, t.TempDir(), "in.img", data), c.Agents[1].NBDURI("joinvol"))

	var join []string
	for _, a := range c.Agents {
		join = append(join, a.GossipAddr)
	}
	joinArgs := append([]string{"--join", strings.Join(join, ",")}, harness.FastFailover...)
	// site4 holds the cluster's gossip key but a site certificate of
	// another CA: gossip lets it in, the leader's certificate check keeps
	// it out of Raft.
	other := harness.NewPKI(t, bin)
	forged := harness.StartAgent(t, harness.Options{Name: "site4", Bin: bin, TLS: other,
		ExtraArgs: append([]string{"--gossip-key", filepath.Join(p.Site("site1"), "gossip.key")}, joinArgs...)})
	// site5 has nothing: plaintext gossip, which the cluster drops.
	plain := harness.StartAgent(t, harness.Options{Name: "site5", Bin: bin, ExtraArgs: joinArgs})

	harness.WaitFor(t, clusterWait, "the cluster to refuse both newcomers", func() (bool, error) {
		var verified, encrypted bool
		for _, a := range c.Agents {
			log := a.CurrentLog()
			verified = verified || strings.Contains(log, "site failed verification") && strings.Contains(log, "site=site4")
			encrypted = encrypted || strings.Contains(strings.ToLower(log), "encrypt")
		}
		if !verified || !encrypted {
			return false, fmt.Errorf("refused site4 (certificate) %v, site5 (plaintext gossip) %v", verified, encrypted)
		}
		return true, nil
	})
	// A new write still commits on the three sites.
	data2 := randomBytes(1403, size)
	nbdcopyIn(t, writeFile(t, t.TempDir(), "in2.img", data2), c.Agents[2].NBDURI("joinvol"))
	c.WaitCaughtUp(clusterWait)
	for _, a := range c.Agents {
		st := c.MustStatus(a)
		for _, n := range []string{"site4", "site5"} {
			if s, ok := st.Site(n); ok && (s.Suffrage != "" || s.Voter) {
				t.Errorf("%s lists %s in the Raft configuration: %+v", a.Name, n, s)
			}
		}
		if got := len(st.Sites); got != 3 && got != 4 {
			t.Errorf("%s lists %d sites", a.Name, got)
		}
	}
	for _, a := range []*harness.Agent{forged, plain} {
		if _, err := os.Stat(volumeDataFile(a, "joinvol")); !os.IsNotExist(err) {
			t.Errorf("%s received the volume: %v", a.Name, err)
		}
	}
	assertSameBytes(t, "joinvol after the refused joins", nbdcopyOut(t, c.Agents[0].NBDURI("joinvol@ro")), data2)
}

// TestTLSGossipKeyRotation (issue 14): rotating the gossip key (install a
// new key, use it, remove the old one) keeps the cluster working, also
// across a restart, which keeps the rotated keyring; use is refused while
// the key is not installed everywhere, and removing the key in use is
// refused.
func TestTLSGossipKeyRotation(t *testing.T) {
	bin := harness.Build(t)
	p := harness.NewPKI(t, bin)
	c := harness.StartCluster(t, harness.ClusterOptions{Bin: bin, TLS: p})
	a1 := c.Agents[0]
	oldKey := strings.TrimSpace(string(readFile(t, filepath.Join(p.Site("site1"), "gossip.key"))))
	newKey := strings.TrimSpace(a1.MustCLI("cluster", "keyring", "generate"))
	if newKey == oldKey || len(newKey) != 44 {
		t.Fatalf("generated key %q", newKey)
	}
	type report struct {
		Sites []struct {
			Site, Primary, Error string
			Keys                 []string
		}
	}
	keyring := func(args ...string) (report, string, error) {
		out, errOut, err := a1.CLI(append([]string{"cluster", "keyring"}, append(args, "--json")...)...)
		var r report
		if err == nil {
			if jerr := json.Unmarshal([]byte(out), &r); jerr != nil {
				t.Fatalf("keyring %v: %v\n%s", args, jerr, out)
			}
		}
		return r, errOut, err
	}
	if _, errOut, err := keyring("use", newKey); err == nil || !strings.Contains(errOut, "site") {
		t.Fatalf("use before install: %v %s", err, errOut)
	}
	for _, step := range [][]string{{"install", newKey}, {"use", newKey}} {
		if r, errOut, err := keyring(step...); err != nil || len(r.Sites) != 3 {
			t.Fatalf("keyring %s: %v %s %+v", step[0], err, errOut, r)
		}
	}
	if _, errOut, err := keyring("remove", newKey); err == nil {
		t.Fatalf("removing the key in use was accepted: %s", errOut)
	}
	if r, errOut, err := keyring("remove", oldKey); err != nil || len(r.Sites) != 3 {
		t.Fatalf("keyring remove old: %v %s %+v", err, errOut, r)
	}
	r, _, err := keyring("list")
	if err != nil || len(r.Sites) != 3 {
		t.Fatalf("list: %v %+v", err, r)
	}
	primary := r.Sites[0].Primary
	for _, s := range r.Sites {
		if s.Primary != primary || len(s.Keys) != 1 || s.Keys[0] != primary || s.Error != "" {
			t.Errorf("after rotation %s: %+v", s.Site, s)
		}
	}
	// A site restarted with only the old key file still has the rotated
	// ring in its data directory, so it gossips again; the cluster works.
	victim := c.Agents[2]
	victim.Restart()
	c.WaitReady(clusterWait, 3)
	a1.CreateVolume("afterrotation", "1MiB")
	waitVolumeEverywhere(t, c, "afterrotation", 1*MiB)
}
