package api

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/robib/robib/cluster"
)

// fakeService records calls and fails with err when set.
type fakeService struct {
	err        error
	last       CreateVolumeRequest
	lastRepair RepairRequest
}

func (f *fakeService) CreateVolume(_ context.Context, r CreateVolumeRequest) (Volume, error) {
	f.last = r
	return Volume{Name: r.Name, Size: r.Size, BlockSize: 4096, Sync: "flush"}, f.err
}
func (f *fakeService) ListVolumes(context.Context) ([]Volume, error) { return nil, f.err }
func (f *fakeService) GetVolume(_ context.Context, n string) (Volume, error) {
	return Volume{Name: n}, f.err
}
func (f *fakeService) DeleteVolume(context.Context, string) error { return f.err }
func (f *fakeService) ResizeVolume(_ context.Context, n string, s int64) (Volume, error) {
	return Volume{Name: n, Size: s}, f.err
}
func (f *fakeService) VerifyVolume(context.Context, string, VerifyRequest) (cluster.VerifyResult, error) {
	return cluster.VerifyResult{}, f.err
}
func (f *fakeService) RepairVolume(_ context.Context, n string, r RepairRequest) (cluster.RepairResult, error) {
	f.lastRepair = r
	return cluster.RepairResult{Volume: n, Offset: r.Offset, Length: r.Length}, f.err
}
func (f *fakeService) WriteStage(_ context.Context, n string) (WriteStage, error) {
	return WriteStage{Volume: n, Site: "s1", Attached: true, Commits: 3, CommitP50US: 800}, f.err
}
func (f *fakeService) ClusterStatus(context.Context) (cluster.Status, error) {
	return cluster.Status{Leader: "s1"}, f.err
}
func (f *fakeService) Leave(context.Context) error                                { return f.err }
func (f *fakeService) RemoveSite(context.Context, string) error                   { return f.err }
func (f *fakeService) TransferLeadership(context.Context, string) (string, error) { return "s2", f.err }
func (f *fakeService) Keyring(context.Context) (cluster.KeyringReport, error) {
	return cluster.KeyringReport{Op: "list", Sites: []cluster.SiteKeyring{{Site: "s1", Primary: "abcd1234", Keys: []string{"abcd1234"}}}}, f.err
}
func (f *fakeService) ChangeKeyring(_ context.Context, req KeyringRequest) (cluster.KeyringReport, error) {
	return cluster.KeyringReport{Op: req.Op, Sites: []cluster.SiteKeyring{{Site: "s1", Error: "no"}}}, f.err
}

// TestKeyringEndpoints: the list and a change come back as reports; a
// failed change carries its per-site report with the error's status.
func TestKeyringEndpoints(t *testing.T) {
	svc := &fakeService{}
	_, c := newTestServer(t, svc)
	ctx := context.Background()
	rep, err := c.Keyring(ctx)
	if err != nil || len(rep.Sites) != 1 || rep.Sites[0].Primary != "abcd1234" {
		t.Fatalf("list: %+v %v", rep, err)
	}
	if rep, err = c.ChangeKeyring(ctx, "use", "a2V5"); err != nil || rep.Op != "use" {
		t.Fatalf("use: %+v %v", rep, err)
	}
	svc.err = fmt.Errorf("%w: site s1 lacks the key", ErrBadRequest)
	if _, err := c.ChangeKeyring(ctx, "use", "a2V5"); !errors.Is(err, ErrBadRequest) || !strings.Contains(err.Error(), "lacks the key") {
		t.Fatalf("refused use: %v", err)
	}
}

func newTestServer(t *testing.T, svc Service) (*httptest.Server, *Client) {
	t.Helper()
	srv := httptest.NewServer(NewHandler(svc, slog.New(slog.NewTextHandler(io.Discard, nil))))
	t.Cleanup(srv.Close)
	c, err := NewClient(srv.URL, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return srv, c
}

func TestClientServerRoundTrip(t *testing.T) {
	svc := &fakeService{}
	_, c := newTestServer(t, svc)
	ctx := context.Background()
	v, err := c.CreateVolume(ctx, CreateVolumeRequest{Name: "db", Size: 1 << 30, Sync: "always"})
	if err != nil || v.Name != "db" || svc.last.Sync != "always" {
		t.Fatalf("create: %+v %v (service saw %+v)", v, err, svc.last)
	}
	if vs, err := c.ListVolumes(ctx); err != nil || len(vs) != 0 {
		t.Fatalf("list: %v %v", vs, err)
	}
	if st, err := c.ClusterStatus(ctx); err != nil || st.Leader != "s1" {
		t.Fatalf("status: %+v %v", st, err)
	}
	if l, err := c.TransferLeadership(ctx, "s2"); err != nil || l != "s2" {
		t.Fatalf("transfer: %q %v", l, err)
	}
	if v, err := c.ResizeVolume(ctx, "a b/c", 42); err != nil || v.Name != "a b/c" {
		t.Fatalf("resize with an escaped name: %+v %v", v, err)
	}
	if st, err := c.WriteStage(ctx, "a b/c"); err != nil || st.Volume != "a b/c" || !st.Attached || st.CommitP50US != 800 {
		t.Fatalf("write stage with an escaped name: %+v %v", st, err)
	}
	want := RepairRequest{Offset: 4096, Length: 8192, ChunkSize: 4096, Site: "s2"}
	if res, err := c.RepairVolume(ctx, "a b/c", want); err != nil || res.Volume != "a b/c" || res.Length != 8192 || svc.lastRepair != want {
		t.Fatalf("repair: %+v %v (service saw %+v)", res, err, svc.lastRepair)
	}
}

func TestErrorsMapToStatusAndBack(t *testing.T) {
	for _, sentinel := range []error{ErrNotFound, ErrExists, ErrBadRequest, ErrUnavailable} {
		svc := &fakeService{err: fmt.Errorf("%w: volume \"x\"", sentinel)}
		_, c := newTestServer(t, svc)
		err := c.DeleteVolume(context.Background(), "x")
		if !errors.Is(err, sentinel) {
			t.Errorf("%v: client got %v", sentinel, err)
		}
		if !strings.Contains(err.Error(), `volume "x"`) {
			t.Errorf("%v: message lost: %v", sentinel, err)
		}
	}
	svc := &fakeService{err: errors.New("disk on fire")}
	_, c := newTestServer(t, svc)
	var se *StatusError
	if err := c.Leave(context.Background()); !errors.As(err, &se) || se.Status != http.StatusInternalServerError {
		t.Fatalf("unknown error: %v", err)
	}
}

func TestServerRejectsBadBodies(t *testing.T) {
	srv, _ := newTestServer(t, &fakeService{})
	cases := map[string]string{
		"not json":       "{{{",
		"unknown field":  `{"name":"a","size":1,"sise":2}`,
		"trailing data":  `{"name":"a","size":1} {"x":1}`,
		"wrong type":     `{"name":"a","size":"big"}`,
		"empty":          ``,
		"too big":        `{"name":"` + strings.Repeat("a", 2<<20) + `"}`,
		"array not obj":  `[1,2]`,
		"negative block": `{"name":"a","size":1,"block_size":"x"}`,
	}
	for name, body := range cases {
		resp, err := http.Post(srv.URL+"/v1/volumes", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(b), "error") {
			t.Errorf("%s: status %d body %s", name, resp.StatusCode, b)
		}
	}
	resp, err := http.Post(srv.URL+"/v1/volumes/x/repair", "application/json", strings.NewReader(`{"offset":0,"length":1,"sites":"s2"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("repair with an unknown field: %d", resp.StatusCode)
	}
	resp, err = http.Get(srv.URL + "/v1/nope")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("unknown path: %d", resp.StatusCode)
	}
}

func TestNewClientRejectsBadAddresses(t *testing.T) {
	for _, a := range []string{"", "ftp://x:1", "http://", "::::"} {
		if _, err := NewClient(a, ClientOptions{}); err == nil {
			t.Errorf("NewClient(%q) accepted", a)
		}
	}
	if _, err := NewClient("127.0.0.1:10810", ClientOptions{}); err != nil {
		t.Errorf("host:port: %v", err)
	}
}

// TestStatusTable checks the table both ways: every sentinel of this
// package has one row and a status of its own, StatusOf finds it however
// wrapped, and StatusError maps the status back to it (and anything else,
// 500 included, to none of them).
func TestStatusTable(t *testing.T) {
	want := map[error]int{
		ErrNotFound:        http.StatusNotFound,
		ErrExists:          http.StatusConflict,
		ErrBadRequest:      http.StatusBadRequest,
		ErrUnavailable:     http.StatusServiceUnavailable,
		ErrForbidden:       http.StatusForbidden,
		ErrUnauthenticated: http.StatusUnauthorized,
	}
	if len(statusTable) != len(want) {
		t.Fatalf("statusTable has %d rows, want %d", len(statusTable), len(want))
	}
	seen := map[int]bool{}
	for _, r := range statusTable {
		if want[r.err] != r.status {
			t.Errorf("%v: row status %d, want %d", r.err, r.status, want[r.err])
		}
		if seen[r.status] {
			t.Errorf("status %d appears twice", r.status)
		}
		seen[r.status] = true
	}
	for sentinel, status := range want {
		for _, err := range []error{sentinel, fmt.Errorf("x: %w", sentinel), fmt.Errorf("a: %w", fmt.Errorf("b: %w", sentinel))} {
			if got := StatusOf(err); got != status {
				t.Errorf("StatusOf(%v) = %d, want %d", err, got, status)
			}
		}
		se := &StatusError{Status: status, Message: "m"}
		for other := range want {
			if errors.Is(se, other) != (other == sentinel) {
				t.Errorf("HTTP %d matches %v: %v", status, other, !(other == sentinel))
			}
		}
	}
	if StatusOf(errors.New("disk on fire")) != http.StatusInternalServerError || StatusOf(nil) != http.StatusInternalServerError {
		t.Error("an unclassified error is not 500")
	}
	for _, status := range []int{http.StatusInternalServerError, http.StatusTeapot, 0} {
		if u := (&StatusError{Status: status}).Unwrap(); u != nil {
			t.Errorf("HTTP %d unwraps to %v", status, u)
		}
	}
	// Precedence: the first row wins.
	if got := StatusOf(fmt.Errorf("%w: %w", ErrUnavailable, ErrNotFound)); got != http.StatusNotFound {
		t.Errorf("not found and unavailable: %d, want 404", got)
	}
}

// TestNewClientOptions: a TLS configuration makes the client use https
// (an http:// or bare address too); https without one is refused; the
// token travels as a bearer token.
func TestNewClientOptions(t *testing.T) {
	for _, a := range []string{"127.0.0.1:10810", "http://127.0.0.1:10810", "https://127.0.0.1:10810/"} {
		c, err := NewClient(a, ClientOptions{TLS: &tls.Config{}})
		if err != nil || c.Base() != "https://127.0.0.1:10810" {
			t.Errorf("%s with TLS: %v, %v", a, c, err)
		}
	}
	_, err := NewClient("https://10.0.0.1:10810", ClientOptions{})
	if !errors.Is(err, ErrBadRequest) || !strings.Contains(err.Error(), "is https: the cluster CA is needed to check the agent (--tls-ca, ROBIB_TLS_CA)") {
		t.Errorf("https without a CA: %v", err)
	}
	if _, err := NewClient("x:1", ClientOptions{TLS: &tls.Config{}, HTTP: &http.Client{}}); !errors.Is(err, ErrBadRequest) {
		t.Errorf("TLS and HTTP client together: %v", err)
	}
	var auth []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		auth = append(auth, r.Header.Get("Authorization"))
		w.Write([]byte("[]"))
	}))
	defer srv.Close()
	for _, tok := range []string{"s3cret", ""} {
		c, err := NewClient(srv.URL, ClientOptions{Token: tok})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.ListVolumes(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if len(auth) != 2 || auth[0] != "Bearer s3cret" || auth[1] != "" {
		t.Fatalf("Authorization headers %q", auth)
	}
	// An https test server through its own client.
	tsrv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("[]")) }))
	defer tsrv.Close()
	c, err := NewClient(tsrv.URL, ClientOptions{HTTP: tsrv.Client()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.ListVolumes(context.Background()); err != nil {
		t.Fatal(err)
	}
}
