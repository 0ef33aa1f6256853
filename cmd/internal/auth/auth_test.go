package auth

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const samplePolicy = `
version: 1
api:
  admin: [alice, revoked]
  read: [grafana]
tokens:
  - name: nightly
    sha256: ` + "%NIGHTLY%" + `
    role: read
  - name: deployer
    sha256: ` + "%DEPLOYER%" + `
    role: admin
volumes:
  db: {rw: [db-host], ro: [reporting]}
  "*": {ro: [auditor, revoked]}
deny: [revoked, site9]
`

func sample(t *testing.T) *Policy {
	t.Helper()
	src := strings.NewReplacer("%NIGHTLY%", TokenHash("tok-nightly"), "%DEPLOYER%", TokenHash("tok-deploy")).Replace(samplePolicy)
	p, err := Parse([]byte(src))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func client(n string) Identity { return Identity{Name: n, Kind: KindClient} }

func TestRoles(t *testing.T) {
	p := sample(t)
	nightly, err := p.Token("tok-nightly")
	if err != nil || nightly != (Identity{Name: "nightly", Kind: KindToken}) {
		t.Fatalf("token: %v %v", nightly, err)
	}
	deploy, _ := p.Token("tok-deploy")
	site := Identity{Name: "site1", Kind: KindSite}
	cases := []struct {
		id   Identity
		need Need
		err  error
	}{
		{Identity{}, NeedNone, nil},
		{Identity{}, NeedRead, ErrUnauthenticated},
		{Identity{}, NeedSite, ErrUnauthenticated},
		{client("alice"), NeedAdmin, nil},
		{client("alice"), NeedRead, nil},
		{client("alice"), NeedSite, ErrDenied},
		{client("grafana"), NeedRead, nil},
		{client("grafana"), NeedAdmin, ErrDenied},
		{client("stranger"), NeedRead, ErrDenied},
		{nightly, NeedRead, nil},
		{nightly, NeedAdmin, ErrDenied},
		{deploy, NeedAdmin, nil},
		{site, NeedSite, nil},
		{site, NeedRead, ErrDenied},
		{site, NeedAdmin, ErrDenied},
		{deploy, NeedSite, ErrDenied},
		{client("revoked"), NeedRead, ErrDenied},
		{Identity{Name: "site9", Kind: KindSite}, NeedSite, ErrDenied},
	}
	for _, c := range cases {
		err := p.Require(c.id, c.need, "GET /x")
		if !errors.Is(err, c.err) || (c.err == nil) != (err == nil) {
			t.Errorf("%v need %d: got %v, want %v", c.id, c.need, err, c.err)
		}
	}
	if _, err := p.Token("tok-nightly "); !errors.Is(err, ErrUnauthenticated) {
		t.Errorf("near-miss token accepted: %v", err)
	}
	if _, err := p.Token(""); !errors.Is(err, ErrUnauthenticated) {
		t.Errorf("empty token accepted: %v", err)
	}
}

func TestAttach(t *testing.T) {
	p := sample(t)
	cases := []struct {
		id       Identity
		vol      string
		readOnly bool
		err      error
	}{
		{client("db-host"), "db", false, nil},
		{client("db-host"), "db", true, nil},
		{client("db-host"), "other", true, ErrDenied},
		{client("reporting"), "db", true, nil},
		{client("reporting"), "db", false, ErrDenied},
		{client("auditor"), "anything", true, nil},
		{client("auditor"), "anything", false, ErrDenied},
		{client("auditor"), "db", true, nil}, // "*" rights add to the named ones
		{Identity{}, "db", true, ErrUnauthenticated},
		{Identity{Name: "site1", Kind: KindSite}, "db", true, ErrDenied},
		{Identity{Name: "nightly", Kind: KindToken}, "db", true, ErrDenied},
		{client("revoked"), "db", true, ErrDenied},
	}
	for _, c := range cases {
		err := p.Attach(c.id, c.vol, c.readOnly)
		if !errors.Is(err, c.err) || (c.err == nil) != (err == nil) {
			t.Errorf("%v %s ro=%v: got %v, want %v", c.id, c.vol, c.readOnly, err, c.err)
		}
	}
	// Volume keys follow the volumes' own name rule (up to 64 bytes),
	// identity names the certificates' (up to 63).
	long := strings.Repeat("v", 64)
	lp, err := Parse([]byte("version: 1\nvolumes: {" + long + ": {ro: [x]}}"))
	if err != nil || lp.Attach(client("x"), long, true) != nil {
		t.Errorf("64-byte volume name: %v", err)
	}
	if _, err := Parse([]byte("version: 1\napi: {admin: [" + long + "]}")); !errors.Is(err, ErrInvalidPolicy) {
		t.Errorf("64-byte identity name accepted: %v", err)
	}
	open := Open()
	if err := open.Attach(client("anyone"), "db", false); err != nil {
		t.Errorf("open policy: %v", err)
	}
	if err := open.Attach(Identity{Name: "s", Kind: KindSite}, "db", false); !errors.Is(err, ErrDenied) {
		t.Errorf("open policy lets a site certificate attach: %v", err)
	}
	if err := open.Require(client("anyone"), NeedAdmin, "x"); err != nil {
		t.Errorf("open policy: %v", err)
	}
	if err := open.Require(Identity{}, NeedRead, "x"); !errors.Is(err, ErrUnauthenticated) {
		t.Errorf("open policy lets anonymous read: %v", err)
	}
}

func TestParseErrors(t *testing.T) {
	h := TokenHash("t")
	cases := map[string]string{
		"":                        "empty file",
		"version: 2":              "version 2",
		"version: 1\nadmins: [x]": "field admins not found",
		"version: 1\napi: {admin: [\"bad name\"]}":                                                                 `bad name "bad name"`,
		"version: 1\napi: {admin: [a], read: [a]}":                                                                 `"a" is listed twice`,
		"version: 1\ntokens: [{name: t, sha256: abc, role: read}]":                                                 "64 lower-case hex",
		"version: 1\ntokens: [{name: t, sha256: " + h + ", role: root}]":                                           `role "root"`,
		"version: 1\ntokens: [{name: t, sha256: " + h + ", role: read}, {name: t, sha256: " + h + ", role: read}]": `name "t" is listed twice`,
		"version: 1\ntokens: [{name: t, sha256: " + h + ", role: read}, {name: u, sha256: " + h + ", role: read}]": `same token as "t"`,
		"version: 1\nvolumes: {\"bad/vol\": {rw: [a]}}":                                                            `bad volume name`,
		"version: 1\nvolumes: {v: {rw: [a], ro: [a]}}":                                                             `"a" is listed twice`,
		"version: 1\nvolumes: {v: {rx: [a]}}":                                                                      "field rx not found",
		"version: 1\ndeny: [\"a b\"]":                                                                              "deny: bad name",
		"version: 1\n---\nversion: 1":                                                                              "more than one document",
		"version: [1":                                                                                              "invalid authorization policy",
		strings.Repeat(" ", maxPolicy+1):                                                                           "at most",
	}
	for src, want := range cases {
		_, err := Parse([]byte(src))
		if !errors.Is(err, ErrInvalidPolicy) || !strings.Contains(err.Error(), want) {
			t.Errorf("%.40q: got %v, want %q", src, err, want)
		}
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.yaml")); !errors.Is(err, ErrInvalidPolicy) {
		t.Errorf("missing file: %v", err)
	}
	path := filepath.Join(t.TempDir(), "p.json")
	if err := os.WriteFile(path, []byte(`{"version": 1, "api": {"read": ["g"]}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := Load(path)
	if err != nil || p.Role(client("g")) != RoleRead || p.Source() != path {
		t.Fatalf("JSON policy: %v %v", p, err)
	}
}

func TestGuard(t *testing.T) {
	p := sample(t)
	var reached []string
	next := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, _ := FromContext(r.Context())
		reached = append(reached, r.Method+" "+r.URL.Path+" "+id.String())
	})
	var failed []error
	fail := func(w http.ResponseWriter, r *http.Request, err error) {
		failed = append(failed, err)
		w.WriteHeader(http.StatusForbidden)
	}
	cert := func(r *http.Request) (Identity, bool) {
		switch r.Header.Get("X-Test-Cert") {
		case "":
			return Identity{}, false
		case "site1":
			return Identity{Name: "site1", Kind: KindSite}, true
		default:
			return client(r.Header.Get("X-Test-Cert")), true
		}
	}
	g := Guard(next, func() *Policy { return p }, cert, fail)
	cases := []struct {
		method, path, cert, auth string
		err                      error
	}{
		{"GET", "/v1/health", "", "", nil},
		{"GET", "/v1/volumes", "", "", ErrUnauthenticated},
		{"GET", "/v1/volumes", "grafana", "", nil},
		{"POST", "/v1/volumes", "grafana", "", ErrDenied},
		{"DELETE", "/v1/volumes/db", "alice", "", nil},
		{"POST", "/internal/v1/apply", "", "", ErrUnauthenticated},
		{"POST", "/internal/v1/apply", "alice", "", ErrDenied},
		{"POST", "/internal/v1/apply", "site1", "", nil},
		{"GET", "/debug/pprof/", "grafana", "", ErrDenied},
		{"GET", "/debug/pprof/", "alice", "", nil},
		{"GET", "/v1/cluster/status", "", "Bearer tok-nightly", nil},
		{"POST", "/v1/cluster/leave", "", "Bearer tok-nightly", ErrDenied},
		{"POST", "/v1/cluster/leave", "alice", "Bearer wrong", ErrUnauthenticated},
		{"GET", "/v1/volumes", "", "Basic abc", ErrUnauthenticated},
		{"PUT", "/v2/unknown", "grafana", "", ErrDenied},
	}
	for _, c := range cases {
		reached, failed = nil, nil
		r := httptest.NewRequest(c.method, c.path, nil)
		if c.cert != "" {
			r.Header.Set("X-Test-Cert", c.cert)
		}
		if c.auth != "" {
			r.Header.Set("Authorization", c.auth)
		}
		w := httptest.NewRecorder()
		g.ServeHTTP(w, r)
		if c.err == nil {
			if len(reached) != 1 || len(failed) != 0 {
				t.Errorf("%s %s as %q: refused: %v", c.method, c.path, c.cert+c.auth, failed)
			}
			continue
		}
		if len(reached) != 0 || len(failed) != 1 || !errors.Is(failed[0], c.err) {
			t.Errorf("%s %s as %q: reached %v, failed %v, want %v", c.method, c.path, c.cert+c.auth, reached, failed, c.err)
		}
		if w.Header().Get("WWW-Authenticate") == "" {
			t.Errorf("%s %s: refusal without WWW-Authenticate", c.method, c.path)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(strings.NewReplacer("%NIGHTLY%", TokenHash("a"), "%DEPLOYER%", TokenHash("b")).Replace(samplePolicy)))
	f.Add([]byte(`{"version":1,"volumes":{"*":{"ro":["x"]}}}`))
	f.Add([]byte("version: 1\napi: {admin: [&a x, *a]}"))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := Parse(b)
		if err != nil {
			if !errors.Is(err, ErrInvalidPolicy) {
				t.Fatalf("error without ErrInvalidPolicy: %v", err)
			}
			return
		}
		// A parsed policy answers every question without panicking, and
		// never grants anything to anonymous callers or sites on /v1.
		for _, id := range []Identity{{}, {Name: "x", Kind: KindSite}} {
			if p.Require(id, NeedRead, "x") == nil || p.Attach(id, "x", true) == nil {
				t.Fatalf("%v granted access", id)
			}
		}
		_ = p.Summary()
	})
}
