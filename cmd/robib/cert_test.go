package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/robib/robib/cmd/internal/netx"
	"github.com/robib/robib/cmd/internal/pki"
)

// runCLIOut runs the CLI and returns what it printed.
func runCLIOut(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

// TestCertCommands: robib cert ca and issue write the layout the agent and
// the NBD clients read; the credentials load and work.
func TestCertCommands(t *testing.T) {
	dir := t.TempDir()
	ca, site, client := filepath.Join(dir, "ca"), filepath.Join(dir, "site1"), filepath.Join(dir, "alice")
	out, err := runCLIOut(t, "cert", "ca", "--out", ca)
	if err != nil || !strings.Contains(out, "created the cluster CA in "+ca) {
		t.Fatalf("cert ca: %q, %v", out, err)
	}
	out, err = runCLIOut(t, "cert", "issue", "--ca", ca, "--name", "site1", "--kind", "site", "--ip", "127.0.0.1,10.0.0.1", "--ip", "::1", "--dns", "site1.example", "--out", site)
	if err != nil || !strings.Contains(out, "issued site/site1, valid until ") || !strings.Contains(out, "server-cert.pem, server-key.pem, gossip.key") {
		t.Fatalf("cert issue site: %q, %v", out, err)
	}
	creds, err := pki.Load(filepath.Join(site, pki.CACertFile), filepath.Join(site, pki.ServerCertFile), filepath.Join(site, pki.ServerKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if creds.Identity() != (pki.Identity{Name: "site1", Kind: pki.KindSite}) {
		t.Fatalf("identity %v", creds.Identity())
	}
	if d := time.Until(creds.NotAfter()); d < pki.DefaultSiteLifetime-time.Hour {
		t.Errorf("site certificate for %v", d)
	}
	out, err = runCLIOut(t, "cert", "issue", "--ca", ca, "--name", "alice", "--kind", "client", "--lifetime", "24h", "--out", client)
	if err != nil || !strings.Contains(out, "issued client/alice") {
		t.Fatalf("cert issue client: %q, %v", out, err)
	}
	if _, err := pki.ClientConfig(filepath.Join(client, pki.CACertFile), filepath.Join(client, pki.ClientCertFile), filepath.Join(client, pki.ClientKeyFile)); err != nil {
		t.Fatal(err)
	}
	if until, _ := notAfter(filepath.Join(client, pki.ClientCertFile)); time.Until(until) > 24*time.Hour {
		t.Errorf("--lifetime 24h: valid until %v", until)
	}
	for _, f := range []string{filepath.Join(ca, pki.CAKeyFile), filepath.Join(site, pki.ServerKeyFile), filepath.Join(client, pki.ClientKeyFile), filepath.Join(site, pki.GossipKeyFile)} {
		if fi, err := os.Stat(f); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v, %v", f, fi.Mode(), err)
		}
	}

	// Nothing is overwritten without --force.
	if _, err := runCLIOut(t, "cert", "ca", "--out", ca); !errors.Is(err, pki.ErrExists) {
		t.Errorf("cert ca again: %v", err)
	}
	if _, err := runCLIOut(t, "cert", "issue", "--ca", ca, "--name", "site1", "--kind", "site", "--ip", "127.0.0.1", "--out", site); !errors.Is(err, pki.ErrExists) {
		t.Errorf("cert issue again: %v", err)
	}
	if _, err := runCLIOut(t, "cert", "issue", "--ca", ca, "--name", "site1", "--kind", "site", "--ip", "127.0.0.1", "--out", site, "--force"); err != nil {
		t.Errorf("cert issue --force: %v", err)
	}

	for name, tc := range map[string]struct {
		args []string
		want string
	}{
		"ca without --out":     {[]string{"cert", "ca"}, "usage: --out is required"},
		"issue without --ca":   {[]string{"cert", "issue", "--name", "a", "--kind", "client", "--out", dir}, "usage: --ca is required"},
		"issue without --name": {[]string{"cert", "issue", "--ca", ca, "--kind", "client", "--out", dir}, "usage: --name is required"},
		"issue without --kind": {[]string{"cert", "issue", "--ca", ca, "--name", "a", "--out", dir}, "usage: --kind is required"},
		"issue without --out":  {[]string{"cert", "issue", "--ca", ca, "--name", "a", "--kind", "client"}, "usage: --out is required"},
		"unknown kind":         {[]string{"cert", "issue", "--ca", ca, "--name", "a", "--kind", "server", "--out", dir}, `usage: --kind "server": want site or client`},
		"bad name":             {[]string{"cert", "issue", "--ca", ca, "--name", "a/b", "--kind", "client", "--out", dir}, `usage: --name "a/b": 1-63 characters of letters, digits, '.', '_' or '-', starting with a letter or digit`},
		"bad IP":               {[]string{"cert", "issue", "--ca", ca, "--name", "a", "--kind", "site", "--ip", "10.0.0.300", "--out", dir}, `usage: --ip "10.0.0.300": not an IP address`},
		"bad DNS name":         {[]string{"cert", "issue", "--ca", ca, "--name", "a", "--kind", "site", "--dns", "-x.example", "--out", dir}, `invalid certificate request: bad DNS name "-x.example"`},
		"negative lifetime":    {[]string{"cert", "issue", "--ca", ca, "--name", "a", "--kind", "client", "--lifetime", "-1h", "--out", dir}, "usage: --lifetime -1h0m0s: negative"},
		"bad lifetime":         {[]string{"cert", "issue", "--ca", ca, "--name", "a", "--kind", "client", "--lifetime", "1y", "--out", dir}, `invalid argument "1y" for "--lifetime" flag`},
		"site without address": {[]string{"cert", "issue", "--ca", ca, "--name", "a", "--kind", "site", "--out", dir}, "usage: a site certificate needs --ip or --dns: the addresses other sites and clients reach it at"},
		"missing CA":           {[]string{"cert", "issue", "--ca", filepath.Join(dir, "nope"), "--name", "a", "--kind", "client", "--out", filepath.Join(dir, "x")}, "bad TLS credentials: CA directory: stat " + filepath.Join(dir, "nope") + ": no such file or directory"},
		"CA directory as out":  {[]string{"cert", "issue", "--ca", ca, "--name", "a", "--kind", "client", "--out", ca}, "is the CA directory: keep the CA key apart from issued credentials"},
		"not a CA directory":   {[]string{"cert", "issue", "--ca", site, "--name", "a", "--kind", "client", "--out", filepath.Join(dir, "y")}, "ca-key.pem: no such file or directory"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := runCLIOut(t, tc.args...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("%v; want %q", err, tc.want)
			}
		})
	}
}

// tlsAPI is an admin API stand-in on a TLS listener of a site's
// credentials, recording who called and with what token.
type tlsAPI struct {
	addr string
	mu   sync.Mutex
	seen []string // "IDENTITY TOKEN"
}

func (a *tlsAPI) calls() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.seen...)
}

func startTLSAPI(t *testing.T, creds *pki.Credentials) *tlsAPI {
	t.Helper()
	l, err := (&netx.Network{Creds: creds}).Listen(netx.LinkAPI, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := &tlsAPI{addr: l.Addr().String()}
	srv := &http.Server{ErrorLog: log.New(io.Discard, "", 0), Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		who := "anonymous"
		if id, ok := pki.PeerIdentity(*r.TLS); ok {
			who = id.String()
		}
		a.mu.Lock()
		a.seen = append(a.seen, who+" "+r.Header.Get("Authorization"))
		a.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte("[]"))
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Shutdown(context.Background()) })
	return a
}

// TestCLIOverTLS: with --tls-ca the CLI talks https (an http:// --api is
// upgraded), presents --tls-cert if given, sends --token as a bearer
// token, and refuses https without a CA and a server of another CA.
func TestCLIOverTLS(t *testing.T) {
	for _, v := range []string{"ROBIB_API", "ROBIB_TLS_CA", "ROBIB_TLS_CERT", "ROBIB_TLS_KEY", "ROBIB_TOKEN"} {
		t.Setenv(v, "")
	}
	dir := t.TempDir()
	ca, site, client := filepath.Join(dir, "ca"), filepath.Join(dir, "s1"), filepath.Join(dir, "alice")
	must := func(args ...string) {
		t.Helper()
		if out, err := runCLIOut(t, args...); err != nil {
			t.Fatalf("%q: %v (%s)", args, err, out)
		}
	}
	must("cert", "ca", "--out", ca)
	must("cert", "issue", "--ca", ca, "--name", "s1", "--kind", "site", "--ip", "127.0.0.1", "--out", site)
	must("cert", "issue", "--ca", ca, "--name", "alice", "--kind", "client", "--out", client)
	creds, err := pki.Load(filepath.Join(site, pki.CACertFile), filepath.Join(site, pki.ServerCertFile), filepath.Join(site, pki.ServerKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	api := startTLSAPI(t, creds)
	caFile := filepath.Join(client, pki.CACertFile)
	certArgs := []string{"--tls-cert", filepath.Join(client, pki.ClientCertFile), "--tls-key", filepath.Join(client, pki.ClientKeyFile)}

	must(append([]string{"--api", "https://" + api.addr, "--tls-ca", caFile}, append(certArgs, "volume", "list")...)...)
	must("--api", "http://"+api.addr, "--tls-ca", caFile, "--token", "t0k", "volume", "list")
	must("--api", api.addr, "--tls-ca", caFile, "volume", "list")
	t.Setenv("ROBIB_TLS_CA", caFile)
	t.Setenv("ROBIB_TOKEN", "from-env")
	must("--api", api.addr, "volume", "list")
	t.Setenv("ROBIB_TLS_CA", "")
	t.Setenv("ROBIB_TOKEN", "")
	want := []string{"client/alice ", "anonymous Bearer t0k", "anonymous ", "anonymous Bearer from-env"}
	if got := api.calls(); strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("the API saw %q, want %q", got, want)
	}

	for name, tc := range map[string]struct {
		args []string
		want string
	}{
		"https without a CA": {[]string{"--api", "https://" + api.addr, "volume", "list"},
			"invalid request: API address https://" + api.addr + " is https: the cluster CA is needed to check the agent (--tls-ca, ROBIB_TLS_CA)"},
		"plain HTTP to the TLS API": {[]string{"--api", "http://" + api.addr, "volume", "list"}, "400 Bad Request"},
		"certificate without a CA":  {append(append([]string{"--api", api.addr}, certArgs...), "volume", "list"), "invalid configuration: tls-cert needs tls-ca"},
		"certificate without a key": {[]string{"--api", api.addr, "--tls-ca", caFile, "--tls-cert", certArgs[1], "volume", "list"}, "invalid configuration: tls-cert and tls-key go together"},
		"missing CA file":           {[]string{"--api", api.addr, "--tls-ca", filepath.Join(dir, "nope.pem"), "volume", "list"}, "bad TLS credentials: CA certificate: open " + filepath.Join(dir, "nope.pem") + ": no such file or directory"},
		"another cluster's API":     {[]string{"--api", api.addr, "--tls-ca", otherCA(t), "volume", "list"}, "certificate signed by unknown authority"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := runCLIOut(t, tc.args...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("%v; want %q", err, tc.want)
			}
		})
	}
}

func otherCA(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "other")
	if err := pki.CreateCA(dir, pki.CAOptions{}); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, pki.CACertFile)
}
