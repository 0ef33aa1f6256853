package main

import (
	"bytes"
	"regexp"
	"strings"
	"testing"

	"github.com/robib/robib/cmd/internal/auth"
)

// TestTokenNew: the printed entry is a valid policy entry that grants the
// printed token its role, and bad arguments are refused.
func TestTokenNew(t *testing.T) {
	root := newRootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetArgs([]string{"token", "new", "nightly", "--role", "admin"})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	tok := regexp.MustCompile(`robib_[A-Za-z0-9_-]{43}`).FindString(out.String())
	entry := out.String()[strings.Index(out.String(), "  - name:"):]
	p, err := auth.Parse([]byte("version: 1\ntokens:\n" + entry))
	if tok == "" || err != nil {
		t.Fatalf("token %q, entry %q: %v", tok, entry, err)
	}
	id, err := p.Token(tok)
	if err != nil || p.Role(id) != auth.RoleAdmin || id.Name != "nightly" {
		t.Fatalf("printed token: %v %v %v", id, p.Role(id), err)
	}
	for _, args := range [][]string{
		{"token", "new", "nightly", "--role", "root"},
		{"token", "new", "bad name"},
		{"token", "new"},
		{"token", "hash", ""},
	} {
		if err := runCLI(t, args...); err == nil {
			t.Errorf("%v: accepted", args)
		}
	}
}
