package nbdfront

import (
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// ownSentinels lists every exported Err* variable of this package with
// what it becomes from a Device (DefaultErrorTable) and from the Backend
// (optionErrors). TestErrorTablesCoverOwnSentinels fails when the package
// gains one that is not listed. (The agent's tests check its own table,
// which ends with DefaultErrorTable, against every sentinel of the module.)
var ownSentinels = map[string]struct {
	err    error
	errno  uint32
	option uint32
}{
	"ErrUnknownExport":   {ErrUnknownExport, EIO, repErrUnknown},
	"ErrReadOnly":        {ErrReadOnly, EPERM, repErrPolicy},
	"ErrUnsupported":     {ErrUnsupported, ENOTSUP, repErrPolicy},
	"ErrInvalidArgument": {ErrInvalidArgument, EINVAL, repErrInvalid},
	"ErrNoSpace":         {ErrNoSpace, ENOSPC, repErrUnknown},
	"ErrBusy":            {ErrBusy, EPERM, repErrPolicy},
	"ErrShutdown":        {ErrShutdown, ESHUTDOWN, repErrShutdown},
	"ErrDenied":          {ErrDenied, EPERM, repErrPolicy},
}

func TestErrorTablesCoverOwnSentinels(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	declared := map[string]bool{}
	for _, path := range files {
		if strings.HasSuffix(path, "_test.go") {
			continue
		}
		src, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		f, err := parser.ParseFile(fset, path, src, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		for _, decl := range f.Decls {
			if gd, ok := decl.(*ast.GenDecl); ok && gd.Tok == token.VAR {
				for _, spec := range gd.Specs {
					for _, id := range spec.(*ast.ValueSpec).Names {
						if id.IsExported() && strings.HasPrefix(id.Name, "Err") {
							declared[id.Name] = true
						}
					}
				}
			}
		}
	}
	for name := range declared {
		if _, ok := ownSentinels[name]; !ok {
			t.Errorf("%s is not in ownSentinels: add it with its NBD error value and option reply, and rows in DefaultErrorTable / optionErrors", name)
		}
	}
	for name, s := range ownSentinels {
		if !declared[name] {
			t.Errorf("ownSentinels lists %s, which is not declared", name)
		}
		for how, e := range map[string]error{
			"bare":    s.err,
			"wrapped": fmt.Errorf("volume v: %w", s.err),
			"twice":   fmt.Errorf("a: %w", fmt.Errorf("b: %w", s.err)),
			"joined":  errors.Join(errors.New("unrelated"), s.err),
		} {
			if got := DefaultErrorCode(e); got != s.errno {
				t.Errorf("%s (%s): DefaultErrorCode %d, want %d", name, how, got, s.errno)
			}
			if got := optionErrorReply(e); got != s.option {
				t.Errorf("%s (%s): option reply %#x, want %#x", name, how, got, s.option)
			}
		}
	}
}

func TestErrorTableLookup(t *testing.T) {
	a, b := errors.New("a"), errors.New("b")
	tab := ErrorTable{{a, EPERM}, {b, ENOSPC}}
	for _, tc := range []struct {
		what string
		err  error
		want uint32
	}{
		{"nil", nil, 0},
		{"first row", a, EPERM},
		{"second row, wrapped", fmt.Errorf("x: %w", b), ENOSPC},
		{"both: the first row wins", fmt.Errorf("%w: %w", b, a), EPERM},
		{"no row: EIO", errors.New("c"), EIO},
	} {
		if got := tab.Code(tc.err); got != tc.want {
			t.Errorf("%s: %d, want %d", tc.what, got, tc.want)
		}
	}
	if got := (ErrorTable{}).Code(ErrReadOnly); got != EIO {
		t.Errorf("empty table: %d, want EIO", got)
	}
	// DefaultErrorTable hands out copies: changing one changes neither
	// DefaultErrorCode nor the next copy.
	d := DefaultErrorTable()
	d[0].Code = ENOMEM
	if DefaultErrorCode(ErrReadOnly) != EPERM || DefaultErrorTable()[0].Code != EPERM {
		t.Error("DefaultErrorTable shares its rows")
	}
	// Rows put in front of it take precedence over it.
	ext := append(ErrorTable{{ErrReadOnly, EINVAL}}, DefaultErrorTable()...)
	if ext.Code(ErrReadOnly) != EINVAL || ext.Code(ErrNoSpace) != ENOSPC {
		t.Error("an extended table does not put its own rows first")
	}
}
