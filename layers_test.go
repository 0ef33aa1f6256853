package robib_test

// TestLayers enforces the layering of cmd/DESIGN.md and the house rules:
// lower layers never import upper ones. The request path is nbdfront -> dcd
// -> cluster -> Raft -> fsm -> volume, and cmd/internal/agent wires them;
// nbdfront knows nothing of the rest, fsm never touches the network, and
// volume is the floor.
//
// The rules are on direct imports of every robib package, its test files
// included (an upper layer's type in a lower layer's test is the first
// step to a lower layer importing it). Since every package is checked, the
// transitive closure follows: a package reaches only what its allowed
// imports reach. A new package fails the test until it gets a rule here.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/robib/robib"

// layerRule says which robib packages (paths relative to the module) a
// package may import.
type layerRule struct {
	// pkg matches one package, or with a trailing "/..." a package tree.
	pkg string
	// allowed imports: package paths, or trees with "/...", or "*" for any
	// robib package (still subject to the global rules below).
	allowed []string
	why     string
}

var layerRules = []layerRule{
	{"volume", nil, "volume is the floor: it imports no robib package"},
	{"fsm", []string{"volume"}, "the state machine applies commands to volumes and never touches the network"},
	{"cluster/dcdlog", nil, "a cluster building block: it imports no robib package"},
	{"cluster/...", nil, "cluster's building blocks import no robib package (give one a rule of its own if it needs fsm or volume)"},
	{"cluster", []string{"fsm", "volume", "cluster/..."}, "cluster carries fsm commands over Raft; it knows neither the DCD stage nor NBD"},
	{"dcd", []string{"fsm", "volume"}, "the write-back stage builds fsm commands and reads volumes; it reaches cluster only through the interface the agent hands it"},
	{"nbdfront", nil, "the NBD server knows nothing of Raft, fsm or volumes: the agent adapts it"},
	{"cmd/internal/pki", nil, "the cluster's trust root (CA, certificates, TLS configurations) imports no robib package"},
	{"cmd/...", []string{"*"}, "cmd wires the layers together"},
	{"tests/...", []string{"*"}, "the end-to-end tests may import anything"},
	{"tests", []string{"*"}, "the end-to-end tests may import anything"},
	{"", nil, "the module root holds only this test"},
}

// externalRule forbids a robib package imports from outside the module
// (the standard library or a dependency): each entry of deny is an import
// path, or a prefix ending in "/".
type externalRule struct {
	pkg  string
	deny []string
	why  string
}

var externalRules = []externalRule{
	{"volume", []string{"github.com/hashicorp/", "net", "net/http"}, "volume is the floor: no Raft, no network"},
	{"fsm", []string{"net", "net/http", "github.com/hashicorp/memberlist"}, "the state machine never touches the network (it implements raft.FSM, nothing else of Raft's)"},
	{"dcd", []string{"github.com/hashicorp/", "net", "net/http"}, "the write-back stage reaches the cluster only through the Committer the agent hands it"},
	{"nbdfront", []string{"github.com/hashicorp/", "net/http"}, "the NBD server knows nothing of Raft or the admin API"},
}

// checkExternal returns why pkg may not import the non-robib path imp.
func checkExternal(pkg, imp string) string {
	for _, r := range externalRules {
		if !matchPkg(r.pkg, pkg) {
			continue
		}
		for _, d := range r.deny {
			if imp == d || (strings.HasSuffix(d, "/") && strings.HasPrefix(imp, d)) {
				return r.why
			}
		}
	}
	return ""
}

// ruleFor returns the first rule matching pkg.
func ruleFor(pkg string) (layerRule, bool) {
	for _, r := range layerRules {
		if matchPkg(r.pkg, pkg) {
			return r, true
		}
	}
	return layerRule{}, false
}

func matchPkg(pattern, pkg string) bool {
	if tree, ok := strings.CutSuffix(pattern, "/..."); ok {
		return strings.HasPrefix(pkg, tree+"/")
	}
	return pattern == pkg
}

// checkImport returns why pkg may not import imp ("" if it may).
func checkImport(pkg, imp string) string {
	// Global rules, whatever a package's own rule says.
	if imp == "cmd" || strings.HasPrefix(imp, "cmd/") {
		if pkg != "cmd" && !strings.HasPrefix(pkg, "cmd/") && !isTests(pkg) {
			return "nothing outside cmd imports cmd/..."
		}
	}
	if isTests(imp) {
		if !isTests(pkg) {
			return "production code never imports the test harness (tests/...)"
		}
	}
	r, ok := ruleFor(pkg)
	if !ok {
		return "package has no layer rule in layers_test.go"
	}
	for _, a := range r.allowed {
		if a == "*" || matchPkg(a, imp) {
			return ""
		}
	}
	if len(r.allowed) == 0 {
		return r.why
	}
	return fmt.Sprintf("%s (allowed: %s)", r.why, strings.Join(r.allowed, ", "))
}

func isTests(pkg string) bool { return pkg == "tests" || strings.HasPrefix(pkg, "tests/") }

type listedPackage struct {
	ImportPath   string
	Module       *struct{ Path string }
	Imports      []string
	TestImports  []string
	XTestImports []string
	Error        *struct{ Err string }
}

// robibPackages lists the module's packages with `go list -deps -json`.
func robibPackages(t *testing.T) []listedPackage {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("go command: %v", err)
	}
	cmd := exec.Command(goBin, "list", "-deps", "-json=ImportPath,Module,Imports,TestImports,XTestImports,Error", "./...")
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("go list: %v\n%s", err, ee.Stderr)
		}
		t.Fatalf("go list: %v", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	var pkgs []listedPackage
	for {
		var p listedPackage
		if err := dec.Decode(&p); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("go list output: %v", err)
		}
		if p.Module == nil || p.Module.Path != module {
			continue // standard library and third-party packages
		}
		if p.Error != nil {
			t.Fatalf("go list %s: %s", p.ImportPath, p.Error.Err)
		}
		pkgs = append(pkgs, p)
	}
	return pkgs
}

func relPkg(path string) (string, bool) {
	if path == module {
		return "", true
	}
	rel, ok := strings.CutPrefix(path, module+"/")
	return rel, ok
}

func TestLayers(t *testing.T) {
	pkgs := robibPackages(t)
	seen := map[string]bool{}
	for _, p := range pkgs {
		pkg, _ := relPkg(p.ImportPath)
		seen[pkg] = true
		for kind, imports := range map[string][]string{"imports": p.Imports, "test imports": p.TestImports, "external test imports": p.XTestImports} {
			for _, path := range imports {
				imp, ok := relPkg(path)
				if !ok {
					if why := checkExternal(pkg, path); why != "" && kind == "imports" {
						t.Errorf("%s imports %s: forbidden: %s", p.ImportPath, path, why)
					}
					continue
				}
				if imp == pkg {
					continue
				}
				if why := checkImport(pkg, imp); why != "" {
					t.Errorf("%s %s %s: forbidden: %s", p.ImportPath, kind, path, why)
				}
			}
		}
	}
	// The test would pass vacuously if go list found nothing.
	for _, want := range []string{"volume", "fsm", "cluster", "dcd", "nbdfront", "cmd/robib", "cmd/internal/agent"} {
		if !seen[want] {
			t.Errorf("go list did not report package %s (found %v)", want, slices.Sorted(maps.Keys(seen)))
		}
	}
}

// TestLayerRules checks the rule table itself on known cases, so a rule
// that stopped matching (a typo, a reordered entry) is noticed.
func TestLayerRules(t *testing.T) {
	for _, c := range []struct {
		pkg, imp string
		ok       bool
	}{
		{"volume", "fsm", false},
		{"fsm", "volume", true},
		{"fsm", "cluster", false},
		{"fsm", "dcd", false},
		{"cluster", "fsm", true},
		{"cluster", "volume", true},
		{"cluster", "cluster/dcdlog", true},
		{"cluster", "dcd", false},
		{"cluster", "nbdfront", false},
		{"cluster/dcdlog", "fsm", false},
		{"cluster/dcdlog", "volume", false},
		{"dcd", "fsm", true},
		{"dcd", "volume", true},
		{"dcd", "cluster", false},
		{"dcd", "nbdfront", false},
		{"nbdfront", "volume", false},
		{"nbdfront", "dcd", false},
		{"cmd/internal/agent", "cluster", true},
		{"cmd/internal/api", "cluster", true},
		{"cluster", "cmd/internal/config", false},
		{"cluster", "tests/harness", false},
		{"cmd/internal/agent", "tests/harness", false},
		{"tests/faults", "cmd/internal/config", true},
		{"tests/harness", "cluster", true},
		{"newpkg", "volume", false},
	} {
		why := checkImport(c.pkg, c.imp)
		if (why == "") != c.ok {
			t.Errorf("%s importing %s: allowed=%v (%q), want allowed=%v", c.pkg, c.imp, why == "", why, c.ok)
		}
	}
}

// TestExternalRules checks the external import rules on known cases.
func TestExternalRules(t *testing.T) {
	for _, c := range []struct {
		pkg, imp string
		ok       bool
	}{
		{"nbdfront", "github.com/hashicorp/raft", false},
		{"nbdfront", "net", true},
		{"fsm", "github.com/hashicorp/raft", true},
		{"fsm", "net/http", false},
		{"volume", "github.com/hashicorp/go-hclog", false},
		{"volume", "golang.org/x/sys/unix", true},
		{"dcd", "net", false},
		{"cluster", "net/http", true},
	} {
		if got := checkExternal(c.pkg, c.imp) == ""; got != c.ok {
			t.Errorf("%s importing %s: allowed %v, want %v", c.pkg, c.imp, got, c.ok)
		}
	}
}
