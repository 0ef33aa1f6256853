package agent

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/robib/robib/cmd/internal/api"
	"github.com/robib/robib/cmd/internal/auth"
)

// TestPolicyReload: a changed policy file takes effect without a restart
// (a name added to the deny list is refused from the next check on); a
// changed file that does not parse, or a removed one, keeps the policy in
// force; a missing or invalid file at start is an error.
func TestPolicyReload(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "policy.yaml")
	write := func(body string, age time.Duration) {
		t.Helper()
		if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		when := time.Now().Add(-age)
		if err := os.Chtimes(path, when, when); err != nil {
			t.Fatal(err)
		}
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if _, err := newPolicySource(path, log); !errors.Is(err, auth.ErrInvalidPolicy) {
		t.Fatalf("missing policy file: %v", err)
	}
	write("version: 9", time.Hour)
	if _, err := newPolicySource(path, log); !errors.Is(err, auth.ErrInvalidPolicy) {
		t.Fatalf("invalid policy file: %v", err)
	}
	write("version: 1\napi: {admin: [alice]}", time.Hour)
	src, err := newPolicySource(path, log)
	if err != nil {
		t.Fatal(err)
	}
	alice := auth.Identity{Name: "alice", Kind: auth.KindClient}
	check := func(want error) {
		t.Helper()
		src.mu.Lock()
		src.checked = time.Time{} // as if the check interval had passed
		src.mu.Unlock()
		if err := src.get().Require(alice, auth.NeedAdmin, "x"); !errors.Is(err, want) || (want == nil) != (err == nil) {
			t.Fatalf("alice: %v, want %v", err, want)
		}
	}
	check(nil)
	write("version: 1\napi: {admin: [alice]}\ndeny: [alice]", 30*time.Minute)
	check(auth.ErrDenied)
	write("version: [", 20*time.Minute)
	check(auth.ErrDenied) // the last good policy stays
	write("version: 1\napi: {admin: [alice]}", 10*time.Minute)
	check(nil)
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	check(nil)
	// Without a file: the open policy.
	open, err := newPolicySource("", log)
	if err != nil || open.get().Require(alice, auth.NeedAdmin, "x") != nil {
		t.Fatalf("open policy: %v", err)
	}
}

// TestChangeKeyringBadInput: a key that is not base64 of 16, 24 or 32
// bytes, or an unknown operation, is a bad request, refused before any
// site is asked.
func TestChangeKeyringBadInput(t *testing.T) {
	s := &clusterService{} // no node: nothing may reach it
	good := "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
	for _, req := range []api.KeyringRequest{
		{Op: "install", Key: "not base64!"},
		{Op: "install", Key: "c2hvcnQ="}, // 5 bytes
		{Op: "use", Key: ""},
		{Op: "rotate", Key: good},
		{Op: "", Key: good},
	} {
		if _, err := s.ChangeKeyring(context.Background(), req); !errors.Is(err, api.ErrBadRequest) {
			t.Errorf("%+v: %v, want a bad request", req, err)
		}
	}
}
