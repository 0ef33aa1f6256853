package agent

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/robib/robib/cmd/internal/api"
	"github.com/robib/robib/cmd/internal/config"
	"github.com/robib/robib/cmd/internal/pki"
)

// tlsCA makes a cluster CA and returns a function that issues a site's
// credentials into cfg (and a client's directory).
func tlsCA(t *testing.T) (caDir string, site func(cfg *config.Config), client func(name string) string) {
	t.Helper()
	caDir = filepath.Join(t.TempDir(), "ca")
	if err := pki.CreateCA(caDir, pki.CAOptions{}); err != nil {
		t.Fatal(err)
	}
	site = func(cfg *config.Config) {
		t.Helper()
		dir := filepath.Join(t.TempDir(), "tls-"+cfg.Name)
		if err := pki.Issue(caDir, pki.IssueRequest{Name: cfg.Name, Kind: pki.KindSite, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, OutDir: dir}); err != nil {
			t.Fatal(err)
		}
		cfg.Insecure = false
		cfg.TLSCA, cfg.TLSCert, cfg.TLSKey = filepath.Join(dir, pki.CACertFile), filepath.Join(dir, pki.ServerCertFile), filepath.Join(dir, pki.ServerKeyFile)
	}
	client = func(name string) string {
		t.Helper()
		dir := filepath.Join(t.TempDir(), "client-"+name)
		if err := pki.Issue(caDir, pki.IssueRequest{Name: name, Kind: pki.KindClient, OutDir: dir}); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	return caDir, site, client
}

// TestTLSCluster: three sites with TLS on every link elect a leader (Raft
// over mTLS), forward a follower's write to the leader's API and collect
// every site's status (the internal HTTP client over mTLS); the admin API
// answers a client over mTLS and refuses plaintext and other clusters.
func TestTLSCluster(t *testing.T) {
	_, issueSite, issueClient := tlsCA(t)
	sites := startCluster(t, 3, issueSite)
	for _, s := range sites {
		if s.a.net.Creds == nil || s.a.net.Creds.Identity().Name != s.cfg.Name {
			t.Fatalf("%s runs without its credentials", s.cfg.Name)
		}
	}
	_, followers := leaderOf(t, sites)
	createVolume(t, followers[0], "secret", 4<<20) // forwarded to the leader's API
	st, err := followers[1].a.Node().Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Sites) != 3 {
		t.Fatalf("status: %+v", st)
	}
	for _, s := range st.Sites {
		if s.Error != "" || s.AppliedIndex == 0 {
			t.Fatalf("status of %s over TLS: %+v", s.Name, s)
		}
	}

	ctx := context.Background()
	dir := issueClient("alice")
	cfg, err := pki.ClientConfig(filepath.Join(dir, pki.CACertFile), filepath.Join(dir, pki.ClientCertFile), filepath.Join(dir, pki.ClientKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	c, err := api.NewClient(sites[2].a.APIAddr(), api.ClientOptions{TLS: cfg})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the volume at every site", func() (bool, error) {
		vols, err := c.ListVolumes(ctx)
		return err == nil && len(vols) == 1 && vols[0].Name == "secret", err
	})

	plain, err := api.NewClient("http://"+sites[2].a.APIAddr(), api.ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if vols, err := plain.ListVolumes(ctx); err == nil {
		t.Fatalf("a plaintext client listed %v", vols)
	}

	// A client of another cluster's CA: refused by the site, and it
	// refuses the site.
	_, _, otherClient := tlsCA(t)
	od := otherClient("mallory")
	ocfg, err := pki.ClientConfig(filepath.Join(od, pki.CACertFile), filepath.Join(od, pki.ClientCertFile), filepath.Join(od, pki.ClientKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	oc, err := api.NewClient(sites[2].a.APIAddr(), api.ClientOptions{TLS: ocfg})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := oc.ListVolumes(ctx); err == nil || !strings.Contains(err.Error(), "unknown authority") {
		t.Fatalf("another cluster's client: %v", err)
	}
}

// TestTLSStartRefusesWrongCredentials: a site does not start with another
// site's certificate or unreadable TLS files.
func TestTLSStartRefusesWrongCredentials(t *testing.T) {
	_, issueSite, _ := tlsCA(t)
	cfg := siteConfig(t, "s1", nil, 0)
	issueSite(&cfg)
	cfg.Name = "s2"
	if a, err := New(cfg, testLogger(t, "s2"), nil); !errors.Is(err, pki.ErrCredentials) || !strings.Contains(err.Error(), `is the certificate of site/s1, but this site is "s2"`) {
		if a != nil {
			a.Close()
		}
		t.Fatalf("another site's certificate: %v", err)
	}
	cfg = siteConfig(t, "s1", nil, 0)
	issueSite(&cfg)
	cfg.TLSKey = cfg.TLSCert
	if a, err := New(cfg, testLogger(t, "s1"), nil); !errors.Is(err, pki.ErrCredentials) {
		if a != nil {
			a.Close()
		}
		t.Fatalf("certificate as key: %v", err)
	}
}
