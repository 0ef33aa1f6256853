package agent

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/robib/robib/cluster"
	"github.com/robib/robib/cluster/dcdlog"
	"github.com/robib/robib/cluster/wire"
	"github.com/robib/robib/cmd/internal/api"
	"github.com/robib/robib/cmd/internal/auth"
	"github.com/robib/robib/cmd/internal/config"
	"github.com/robib/robib/cmd/internal/pki"
	"github.com/robib/robib/dcd"
	"github.com/robib/robib/fsm"
	"github.com/robib/robib/nbdfront"
	"github.com/robib/robib/volume"
)

// sentinel is one exported error variable of the module and what it must
// become at the two edges: the NBD error value a client sees when a Device
// call fails with it (nbdErrors), and the HTTP status of an admin API call
// failing with it (apiClasses, then api.StatusOf).
type sentinel struct {
	name   string // package path inside the module + "." + variable
	err    error
	errno  uint32
	status int
}

const (
	eio       = nbdfront.EIO
	einval    = nbdfront.EINVAL
	eperm     = nbdfront.EPERM
	enospc    = nbdfront.ENOSPC
	enotsup   = nbdfront.ENOTSUP
	eshutdown = nbdfront.ESHUTDOWN

	s400 = http.StatusBadRequest
	s404 = http.StatusNotFound
	s401 = http.StatusUnauthorized
	s403 = http.StatusForbidden
	s409 = http.StatusConflict
	s500 = http.StatusInternalServerError
	s503 = http.StatusServiceUnavailable
)

// sentinels lists every exported Err* variable of the module (outside
// tests/, the end-to-end harness, whose errors never reach an edge).
// TestSentinelRegistryIsComplete fails when a package gains one that is
// not here: add it with the NBD error value and HTTP status it must get,
// and give it a row in nbdErrors (nbd.go) or apiClasses (service.go) when
// the default (EIO, 500) is not what it must get.
var sentinels = []sentinel{
	{"fsm.ErrBadCommand", fsm.ErrBadCommand, eio, s500},
	{"fsm.ErrUnsupportedVersion", fsm.ErrUnsupportedVersion, eio, s500},
	{"fsm.ErrUnknownVolume", fsm.ErrUnknownVolume, eio, s404},
	{"fsm.ErrVolumeExists", fsm.ErrVolumeExists, eio, s409},
	{"fsm.ErrOutOfRange", fsm.ErrOutOfRange, einval, s400},
	{"fsm.ErrInvalidCommand", fsm.ErrInvalidCommand, eio, s400},
	{"fsm.ErrSeqGap", fsm.ErrSeqGap, eio, s500},
	{"fsm.ErrStaleEpoch", fsm.ErrStaleEpoch, eio, s500},
	{"fsm.ErrLeaseConflict", fsm.ErrLeaseConflict, eio, s500},
	{"fsm.ErrClusterIDSet", fsm.ErrClusterIDSet, eio, s500},
	{"fsm.ErrFailed", fsm.ErrFailed, eio, s500},
	{"fsm.ErrClosed", fsm.ErrClosed, eio, s500},
	{"fsm.ErrBadClusterID", fsm.ErrBadClusterID, eio, s500},

	{"volume.ErrNotFound", volume.ErrNotFound, eio, s404},
	{"volume.ErrExists", volume.ErrExists, eio, s409},
	{"volume.ErrInvalidName", volume.ErrInvalidName, eio, s400},
	{"volume.ErrInvalidSize", volume.ErrInvalidSize, eio, s400},
	{"volume.ErrOutOfRange", volume.ErrOutOfRange, einval, s500},
	{"volume.ErrCorrupt", volume.ErrCorrupt, eio, s500},
	{"volume.ErrClosed", volume.ErrClosed, eshutdown, s500},
	// Reads reach NBD through the repair path (heal.go), which turns a
	// damaged read into the right bytes or cluster.ErrNoHealthyCopy; a
	// damage error that gets through anyway is an I/O error.
	{"volume.ErrDamaged", volume.ErrDamaged, eio, s500},

	{"dcd.ErrClosed", dcd.ErrClosed, eshutdown, s500},
	{"dcd.ErrOutOfRange", dcd.ErrOutOfRange, einval, s500},
	{"dcd.ErrFailed", dcd.ErrFailed, eio, s500},
	{"dcd.ErrFenced", dcd.ErrFenced, eio, s500},
	{"dcd.ErrFlushTimeout", dcd.ErrFlushTimeout, eio, s500},

	{"cluster.ErrRetry", cluster.ErrRetry, eio, s503},
	{"cluster.ErrNoLeader", cluster.ErrNoLeader, eio, s503},
	{"cluster.ErrNotLeader", cluster.ErrNotLeader, eio, s503},
	{"cluster.ErrUnreachable", cluster.ErrUnreachable, eio, s503},
	{"cluster.ErrClosed", cluster.ErrClosed, eshutdown, s503},
	{"cluster.ErrUnknownSite", cluster.ErrUnknownSite, eio, s404},
	{"cluster.ErrInvalidRequest", cluster.ErrInvalidRequest, eio, s400},
	{"cluster.ErrLeaseHeld", cluster.ErrLeaseHeld, eio, s500},
	{"cluster.ErrLeaseLost", cluster.ErrLeaseLost, eio, s500},
	{"cluster.ErrForeignCluster", cluster.ErrForeignCluster, eio, s500},
	{"cluster.ErrLogStoreMismatch", cluster.ErrLogStoreMismatch, eio, s500},
	{"cluster.ErrForbidden", cluster.ErrForbidden, eperm, s403},
	{"cluster.ErrKeyringRefused", cluster.ErrKeyringRefused, eio, s400},
	{"cluster.ErrKeyringIncomplete", cluster.ErrKeyringIncomplete, eio, s500},
	{"cluster.ErrBadKeyring", cluster.ErrBadKeyring, eio, s500},
	{"cluster.ErrPeerRefused", cluster.ErrPeerRefused, eio, s503},
	{"cluster.ErrNoHealthyCopy", cluster.ErrNoHealthyCopy, eio, s503},
	{"cluster.ErrBadCatchUpBase", cluster.ErrBadCatchUpBase, eio, s500},

	{"cluster/dcdlog.ErrClosed", dcdlog.ErrClosed, eio, s500},
	{"cluster/dcdlog.ErrLocked", dcdlog.ErrLocked, eio, s500},
	{"cluster/dcdlog.ErrFormat", dcdlog.ErrFormat, eio, s500},
	{"cluster/dcdlog.ErrCorrupt", dcdlog.ErrCorrupt, eio, s500},
	{"cluster/dcdlog.ErrNotMonotonic", dcdlog.ErrNotMonotonic, eio, s500},
	{"cluster/dcdlog.ErrRange", dcdlog.ErrRange, eio, s500},
	{"cluster/dcdlog.ErrFailed", dcdlog.ErrFailed, eio, s500},

	// The Raft transport's errors reach users only inside raft's own
	// (a failed replication, a lost leader): EIO / 500 like any other.
	{"cluster/wire.ErrInvalidConfig", wire.ErrInvalidConfig, eio, s500},
	{"cluster/wire.ErrMagic", wire.ErrMagic, eio, s500},
	{"cluster/wire.ErrVersion", wire.ErrVersion, eio, s500},
	{"cluster/wire.ErrChecksum", wire.ErrChecksum, eio, s500},
	{"cluster/wire.ErrTooLarge", wire.ErrTooLarge, eio, s500},
	{"cluster/wire.ErrMalformed", wire.ErrMalformed, eio, s500},
	{"cluster/wire.ErrTruncated", wire.ErrTruncated, eio, s500},
	{"cluster/wire.ErrSlow", wire.ErrSlow, eio, s500},
	{"cluster/wire.ErrRejected", wire.ErrRejected, eio, s500},
	{"cluster/wire.ErrPeerMismatch", wire.ErrPeerMismatch, eio, s500},
	{"cluster/wire.ErrShutdown", wire.ErrShutdown, eio, s500},

	{"nbdfront.ErrUnknownExport", nbdfront.ErrUnknownExport, eio, s500},
	{"nbdfront.ErrReadOnly", nbdfront.ErrReadOnly, eperm, s500},
	{"nbdfront.ErrUnsupported", nbdfront.ErrUnsupported, enotsup, s500},
	{"nbdfront.ErrInvalidArgument", nbdfront.ErrInvalidArgument, einval, s500},
	{"nbdfront.ErrNoSpace", nbdfront.ErrNoSpace, enospc, s500},
	{"nbdfront.ErrBusy", nbdfront.ErrBusy, eperm, s500},
	{"nbdfront.ErrShutdown", nbdfront.ErrShutdown, eshutdown, s500},
	// Only Config.Authorize returns it, in the NBD option phase; it never
	// reaches the admin API (which has no 403 class).
	{"nbdfront.ErrDenied", nbdfront.ErrDenied, eperm, s403},

	{"cmd/internal/api.ErrNotFound", api.ErrNotFound, eio, s404},
	{"cmd/internal/api.ErrExists", api.ErrExists, eio, s409},
	{"cmd/internal/api.ErrBadRequest", api.ErrBadRequest, eio, s400},
	{"cmd/internal/api.ErrUnavailable", api.ErrUnavailable, eio, s503},
	{"cmd/internal/api.ErrUnauthenticated", api.ErrUnauthenticated, eio, s401},
	{"cmd/internal/api.ErrForbidden", api.ErrForbidden, eio, s403},

	// Authorization refusals: 401 / 403 on the API, NBD_REP_ERR_POLICY
	// in the option phase (EPERM where an errno is asked for).
	{"cmd/internal/auth.ErrUnauthenticated", auth.ErrUnauthenticated, eperm, s401},
	{"cmd/internal/auth.ErrDenied", auth.ErrDenied, eperm, s403},
	{"cmd/internal/auth.ErrInvalidPolicy", auth.ErrInvalidPolicy, eio, s400},

	{"cmd/internal/config.ErrInvalidConfig", config.ErrInvalidConfig, eio, s500},
	{"cmd/internal/config.ErrBadSize", config.ErrBadSize, eio, s500},

	// TLS material and peers: refused at start or in a handshake, before
	// any NBD request or API call could fail with them.
	{"cmd/internal/pki.ErrExists", pki.ErrExists, eio, s500},
	{"cmd/internal/pki.ErrInvalidRequest", pki.ErrInvalidRequest, eio, s500},
	{"cmd/internal/pki.ErrCredentials", pki.ErrCredentials, eio, s500},
	{"cmd/internal/pki.ErrNotIdentity", pki.ErrNotIdentity, eio, s500},
	{"cmd/internal/pki.ErrPeerRefused", pki.ErrPeerRefused, eio, s500},
}

// moduleSentinel is an exported Err* variable found in the module's source.
type moduleSentinel struct {
	name string // as in sentinel.name
	msg  string // the errors.New message, "" if not declared with one
	pos  string
}

// moduleRoot returns the directory of go.mod above the working directory,
// and the module path.
func moduleRoot(t *testing.T) (dir, module string) {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil {
			for _, line := range strings.Split(string(b), "\n") {
				if m, ok := strings.CutPrefix(strings.TrimSpace(line), "module "); ok {
					return dir, strings.TrimSpace(m)
				}
			}
			t.Fatalf("%s/go.mod names no module", dir)
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the working directory")
		}
		dir = parent
	}
}

// parseSentinels returns every exported package-level variable whose name
// starts with Err in the module's non-test Go files, outside tests/,
// testdata and hidden directories.
func parseSentinels(t *testing.T) []moduleSentinel {
	t.Helper()
	root, _ := moduleRoot(t)
	fset := token.NewFileSet()
	var out []moduleSentinel
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		rel = filepath.ToSlash(rel)
		if d.IsDir() {
			base := d.Name()
			if rel == "tests" || base == "testdata" || (rel != "." && (strings.HasPrefix(base, ".") || strings.HasPrefix(base, "_"))) {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		pkg := filepath.ToSlash(filepath.Dir(rel))
		for _, decl := range f.Decls {
			gd, ok := decl.(*ast.GenDecl)
			if !ok || gd.Tok != token.VAR {
				continue
			}
			for _, spec := range gd.Specs {
				vs := spec.(*ast.ValueSpec)
				for i, id := range vs.Names {
					if !id.IsExported() || !strings.HasPrefix(id.Name, "Err") {
						continue
					}
					s := moduleSentinel{name: pkg + "." + id.Name, pos: fset.Position(id.Pos()).String()}
					if i < len(vs.Values) {
						s.msg = errorsNewMessage(vs.Values[i])
					}
					out = append(out, s)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// errorsNewMessage returns the message of errors.New("..."), or "".
func errorsNewMessage(e ast.Expr) string {
	call, ok := e.(*ast.CallExpr)
	if !ok || len(call.Args) != 1 {
		return ""
	}
	sel, ok := call.Fun.(*ast.SelectorExpr)
	if !ok || sel.Sel.Name != "New" {
		return ""
	}
	if x, ok := sel.X.(*ast.Ident); !ok || x.Name != "errors" {
		return ""
	}
	lit, ok := call.Args[0].(*ast.BasicLit)
	if !ok || lit.Kind != token.STRING {
		return ""
	}
	msg, err := strconv.Unquote(lit.Value)
	if err != nil {
		return ""
	}
	return msg
}

// TestSentinelRegistryIsComplete checks sentinels against the source: every
// exported Err* variable of the module is listed exactly once, under its
// own name (for those made with errors.New, the value's message is the
// one in the source), and nothing else is listed.
func TestSentinelRegistryIsComplete(t *testing.T) {
	found := parseSentinels(t)
	if len(found) < 50 {
		t.Fatalf("parsed only %d sentinels; is the walk broken?", len(found))
	}
	listed := map[string]sentinel{}
	for _, s := range sentinels {
		if _, dup := listed[s.name]; dup {
			t.Errorf("%s listed twice", s.name)
		}
		listed[s.name] = s
	}
	inSource := map[string]bool{}
	for _, f := range found {
		inSource[f.name] = true
		s, ok := listed[f.name]
		if !ok {
			t.Errorf("%s (%s) is not in the sentinels registry of %s: add it with the NBD error value and HTTP status it must get, and a row in nbdErrors or apiClasses if that is not EIO / 500",
				f.name, f.pos, "cmd/internal/agent/errors_test.go")
			continue
		}
		if f.msg != "" && s.err.Error() != f.msg {
			t.Errorf("%s: registry holds an error %q, the source declares %q", f.name, s.err.Error(), f.msg)
		}
	}
	for _, s := range sentinels {
		if !inSource[s.name] {
			t.Errorf("%s is listed but no longer declared", s.name)
		}
	}
}

// wrappings are the ways a sentinel reaches an edge: as it is, wrapped once
// or twice with %w, joined with an unrelated error.
func wrappings(err error) map[string]error {
	return map[string]error{
		"bare":    err,
		"wrapped": fmt.Errorf("volume v: write at 4096: %w", err),
		"twice":   fmt.Errorf("site s1: %w", fmt.Errorf("op: %w", err)),
		"joined":  errors.Join(errors.New("unrelated"), err),
	}
}

func TestNBDErrorTableMapsEverySentinel(t *testing.T) {
	for _, s := range sentinels {
		for how, err := range wrappings(s.err) {
			if got := nbdErrors.Code(err); got != s.errno {
				t.Errorf("%s (%s): NBD error %d, want %d", s.name, how, got, s.errno)
			}
		}
		if strings.HasPrefix(s.name, "fsm.") && s.name != "fsm.ErrBadClusterID" {
			// An FSM verdict forwarded from the leader is rebuilt from
			// its wire code and must map the same.
			remote := fsm.ErrorFromCode(fsm.ErrorCode(s.err), "remote: "+s.err.Error())
			if got := nbdErrors.Code(remote); got != s.errno {
				t.Errorf("%s (from another site): NBD error %d, want %d", s.name, got, s.errno)
			}
		}
	}
	for _, tc := range []struct {
		what string
		err  error
		want uint32
	}{
		{"nil", nil, 0},
		{"unknown error", errors.New("disk on fire"), eio},
		{"lease suspended", fmt.Errorf("read: %w", errLeaseSuspended), eio},
		{"cancelled (shutting down)", fmt.Errorf("x: %w", context.Canceled), eshutdown},
		{"deadline (transient)", fmt.Errorf("x: %w", context.DeadlineExceeded), eio},
		{"EROFS from the host", &os.PathError{Op: "write", Path: "/v", Err: syscall.EROFS}, eperm},
		{"EDQUOT from the host", &os.PathError{Op: "write", Path: "/v", Err: syscall.EDQUOT}, enospc},
		{"EINVAL from the host", syscall.EINVAL, einval},
		{"EIO from the host", syscall.EIO, eio},
		// Precedence: the more specific row wins.
		{"fenced because the lease moved", fmt.Errorf("%w: volume v: %w", dcd.ErrFenced, cluster.ErrLeaseLost), eio},
		{"batch rejected while shutting down", fmt.Errorf("%w: batch 3 rejected: %w", dcd.ErrFailed, context.Canceled), eio},
		// (Today's order: the out-of-range and closed rows come before the
		// sticky-failure ones.)
		{"batch rejected out of range", fmt.Errorf("%w: batch 3 rejected: %w", dcd.ErrFailed, fsm.ErrOutOfRange), einval},
		{"failed, then closed", fmt.Errorf("%w: %w", dcd.ErrClosed, dcd.ErrFailed), eshutdown},
		{"read-only and out of range", fmt.Errorf("%w: %w", volume.ErrOutOfRange, nbdfront.ErrReadOnly), einval},
		// A write beyond a shrunk volume's end is ENOSPC, as the spec asks;
		// reads and trims there stay EINVAL.
		{"write beyond the end", beyondEnd(fmt.Errorf("write at 1 MiB: %w", dcd.ErrOutOfRange)), enospc},
		{"read beyond the end", fmt.Errorf("read at 1 MiB: %w", dcd.ErrOutOfRange), einval},
		{"write: other errors unchanged", beyondEnd(fmt.Errorf("w: %w", dcd.ErrFlushTimeout)), eio},
		{"write: a batch rejected out of range earlier is not a write beyond the end", beyondEnd(fmt.Errorf("%w: %w", dcd.ErrFailed, fsm.ErrOutOfRange)), einval},
	} {
		if got := nbdErrors.Code(tc.err); got != tc.want {
			t.Errorf("%s (%v): NBD error %d, want %d", tc.what, tc.err, got, tc.want)
		}
	}
}

func TestHTTPStatusTableMapsEverySentinel(t *testing.T) {
	for _, s := range sentinels {
		for how, err := range wrappings(s.err) {
			tagged := apiErr(err)
			if got := api.StatusOf(tagged); got != s.status {
				t.Errorf("%s (%s): HTTP %d, want %d", s.name, how, got, s.status)
			}
			if !errors.Is(tagged, s.err) || !strings.Contains(tagged.Error(), err.Error()) {
				t.Errorf("%s (%s): tagged error %q lost the original", s.name, how, tagged)
			}
		}
		// The client side: a status maps back to the API sentinel that
		// produced it, and 500 to none.
		se := &api.StatusError{Status: s.status, Message: s.err.Error()}
		for _, cls := range []error{api.ErrNotFound, api.ErrExists, api.ErrBadRequest, api.ErrUnavailable, api.ErrUnauthenticated, api.ErrForbidden} {
			if want := api.StatusOf(cls) == s.status; errors.Is(se, cls) != want {
				t.Errorf("%s: client error for HTTP %d matches %v: %v, want %v", s.name, s.status, cls, !want, want)
			}
		}
	}
	if apiErr(nil) != nil {
		t.Error("apiErr(nil) is not nil")
	}
	for _, tc := range []struct {
		what string
		err  error
		want int
	}{
		{"unknown error", errors.New("disk on fire"), s500},
		{"deadline (no leader in time)", fmt.Errorf("x: %w", context.DeadlineExceeded), s503},
		{"cancelled", context.Canceled, s500},
		// Precedence: the first row matched wins.
		{"unknown volume at the leader, retried", fmt.Errorf("%w: %w", cluster.ErrNotLeader, fsm.ErrUnknownVolume), s404},
		{"invalid request, no leader", fmt.Errorf("%w: %w", cluster.ErrInvalidRequest, cluster.ErrNoLeader), s400},
	} {
		if got := api.StatusOf(apiErr(tc.err)); got != tc.want {
			t.Errorf("%s: HTTP %d, want %d", tc.what, got, tc.want)
		}
	}
	// Statuses are distinct, so the client's reverse mapping is a function.
	var statuses []int
	for _, cls := range []error{api.ErrNotFound, api.ErrExists, api.ErrBadRequest, api.ErrUnavailable, api.ErrUnauthenticated, api.ErrForbidden} {
		statuses = append(statuses, api.StatusOf(cls))
	}
	slices.Sort(statuses)
	if len(slices.Compact(statuses)) != 6 {
		t.Errorf("API sentinels share statuses: %v", statuses)
	}
}

// retryableSentinels are the sentinels after which a writer proposes the
// same batch again (cluster.IsRetryable, the DCD stage's Retryable);
// every other one is final.
var retryableSentinels = map[string]bool{
	"cluster.ErrRetry":       true,
	"cluster.ErrNoLeader":    true,
	"cluster.ErrNotLeader":   true,
	"cluster.ErrUnreachable": true,
	"fsm.ErrSeqGap":          true,
	"fsm.ErrFailed":          true,
}

func TestRetryableSentinels(t *testing.T) {
	for _, s := range sentinels {
		for how, err := range wrappings(s.err) {
			if got := cluster.IsRetryable(err); got != retryableSentinels[s.name] {
				t.Errorf("%s (%s): IsRetryable %v, want %v", s.name, how, got, !got)
			}
		}
	}
	if !cluster.IsRetryable(fmt.Errorf("x: %w", context.DeadlineExceeded)) || cluster.IsRetryable(context.Canceled) || cluster.IsRetryable(nil) {
		t.Error("IsRetryable: deadline must be retryable, cancellation and nil not")
	}
}

// TestAPIEdgeEndToEnd sends real admin API requests to the service over
// HTTP: a missing volume is 404, bad names and modes 400, a volume that
// exists is found.
func TestAPIEdgeEndToEnd(t *testing.T) {
	store, err := volume.Open(t.TempDir(), testLogger(t, "volume"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	if _, err := store.Create(volume.Meta{Name: "v", Size: 1 << 20, BlockSize: 4096, Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	svc := &clusterService{store: store} // no node: these requests never reach the cluster
	srv := httptest.NewServer(api.NewHandler(svc, testLogger(t, "api")))
	t.Cleanup(srv.Close)
	c, err := api.NewClient(srv.URL, api.ClientOptions{HTTP: srv.Client()})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	expect := func(what string, err error, status int, sentinel error) {
		t.Helper()
		var se *api.StatusError
		if !errors.As(err, &se) || se.Status != status || !errors.Is(err, sentinel) {
			t.Errorf("%s: %v, want HTTP %d (%v)", what, err, status, sentinel)
		}
	}
	_, err = c.GetVolume(ctx, "missing")
	expect("get a missing volume", err, s404, api.ErrNotFound)
	if err != nil && !strings.Contains(err.Error(), volume.ErrNotFound.Error()) {
		t.Errorf("message %q does not say why", err)
	}
	_, err = c.ResizeVolume(ctx, "missing", 2<<20)
	expect("resize a missing volume", err, s404, api.ErrNotFound)
	_, err = c.WriteStage(ctx, "missing")
	expect("stage of a missing volume", err, s404, api.ErrNotFound)
	err = c.DeleteVolume(ctx, "bad/name")
	expect("delete a bad name", err, s400, api.ErrBadRequest)
	_, err = c.CreateVolume(ctx, api.CreateVolumeRequest{Name: "..", Size: 1 << 20})
	expect("create a bad name", err, s400, api.ErrBadRequest)
	_, err = c.CreateVolume(ctx, api.CreateVolumeRequest{Name: "w", Size: 1000})
	expect("create a bad size", err, s400, api.ErrBadRequest)
	_, err = c.CreateVolume(ctx, api.CreateVolumeRequest{Name: "w", Size: 1 << 20, Sync: "sometimes"})
	expect("create with a bad sync mode", err, s400, api.ErrBadRequest)
	_, err = c.ResizeVolume(ctx, "v", 1000)
	expect("resize to a bad size", err, s400, api.ErrBadRequest)
	if v, err := c.GetVolume(ctx, "v"); err != nil || v.Name != "v" || v.Size != 1<<20 {
		t.Errorf("get v: %+v %v", v, err)
	}
}

// NBD wire values for the raw client below (doc/proto.md).
const (
	nbdMagic         uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	nbdOptMagic      uint64 = 0x49484156454f5054 // "IHAVEOPT"
	nbdOptReplyMagic uint64 = 0x0003e889045565a9
	nbdRequestMagic  uint32 = 0x25609513
	nbdSimpleMagic   uint32 = 0x67446698

	nbdOptExportName uint32 = 1
	nbdOptAbort      uint32 = 2
	nbdOptInfo       uint32 = 6

	nbdRepErrPolicy   uint32 = 1<<31 | 2
	nbdRepErrInvalid  uint32 = 1<<31 | 3
	nbdRepErrUnknown  uint32 = 1<<31 | 6
	nbdRepErrShutdown uint32 = 1<<31 | 7

	nbdCmdRead  uint16 = 0
	nbdCmdWrite uint16 = 1
	nbdCmdTrim  uint16 = 4
)

// rawNBD is the least NBD client these tests need: fixed newstyle, simple
// replies only.
type rawNBD struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

// dialNBD serves one end of a pipe with srv and greets it from the other.
func dialNBD(t *testing.T, srv *nbdfront.Server) *rawNBD {
	t.Helper()
	client, server := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.ServeConn(server)
	}()
	t.Cleanup(func() {
		client.Close()
		<-done
	})
	if err := client.SetDeadline(time.Now().Add(20 * time.Second)); err != nil {
		t.Fatal(err)
	}
	c := &rawNBD{t: t, conn: client, r: bufio.NewReader(client)}
	hello := c.read(8 + 8 + 2)
	if binary.BigEndian.Uint64(hello) != nbdMagic || binary.BigEndian.Uint64(hello[8:]) != nbdOptMagic {
		t.Fatalf("greeting % x", hello)
	}
	c.write(binary.BigEndian.AppendUint32(nil, 1|2)) // FIXED_NEWSTYLE | NO_ZEROES
	return c
}

func (c *rawNBD) read(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.r, b); err != nil {
		c.t.Fatalf("reading %d bytes: %v", n, err)
	}
	return b
}

func (c *rawNBD) write(b []byte) {
	c.t.Helper()
	if _, err := c.conn.Write(b); err != nil {
		c.t.Fatalf("writing: %v", err)
	}
}

func (c *rawNBD) option(opt uint32, data []byte) {
	c.t.Helper()
	b := binary.BigEndian.AppendUint64(nil, nbdOptMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	c.write(append(b, data...))
}

// infoErr sends NBD_OPT_INFO for name and returns the type and text of the
// server's error reply (it fails the test on success).
func (c *rawNBD) infoErr(name string) (uint32, string) {
	c.t.Helper()
	data := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	data = append(data, name...)
	data = binary.BigEndian.AppendUint16(data, 0) // no info requests
	c.option(nbdOptInfo, data)
	h := c.read(8 + 4 + 4 + 4)
	if binary.BigEndian.Uint64(h) != nbdOptReplyMagic || binary.BigEndian.Uint32(h[8:]) != nbdOptInfo {
		c.t.Fatalf("option reply header % x", h)
	}
	typ, n := binary.BigEndian.Uint32(h[12:]), binary.BigEndian.Uint32(h[16:])
	msg := c.read(int(n))
	if typ&(1<<31) == 0 {
		c.t.Fatalf("NBD_OPT_INFO %q succeeded (reply type %d)", name, typ)
	}
	return typ, string(msg)
}

// exportName enters transmission with NBD_OPT_EXPORT_NAME and returns the
// export's size.
func (c *rawNBD) exportName(name string) uint64 {
	c.t.Helper()
	c.option(nbdOptExportName, []byte(name))
	b := c.read(8 + 2)
	return binary.BigEndian.Uint64(b)
}

// do sends one request and returns the reply's error value (and the data of
// a successful read).
func (c *rawNBD) do(typ uint16, cookie, off uint64, length uint32, data []byte) (uint32, []byte) {
	c.t.Helper()
	b := binary.BigEndian.AppendUint32(nil, nbdRequestMagic)
	b = binary.BigEndian.AppendUint16(b, 0)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	c.write(append(b, data...))
	h := c.read(4 + 4 + 8)
	if binary.BigEndian.Uint32(h) != nbdSimpleMagic || binary.BigEndian.Uint64(h[8:]) != cookie {
		c.t.Fatalf("reply header % x for cookie %d", h, cookie)
	}
	errno := binary.BigEndian.Uint32(h[4:])
	if errno == 0 && typ == nbdCmdRead {
		return 0, c.read(int(length))
	}
	return errno, nil
}

// errBackend is an nbdfront.Backend whose exports are fixed, and whose
// other names fail with err.
type errBackend struct {
	exports map[string]nbdfront.Export
	err     error
}

func (b *errBackend) List() ([]nbdfront.ExportInfo, error) { return nil, nil }
func (b *errBackend) Info(name string) (nbdfront.ExportInfo, error) {
	if e, ok := b.exports[name]; ok {
		return e.Info(), nil
	}
	return nbdfront.ExportInfo{}, b.err
}
func (b *errBackend) Open(name string) (nbdfront.Export, error) {
	if e, ok := b.exports[name]; ok {
		return e, nil
	}
	return nil, b.err
}

func newNBDServer(t *testing.T, be nbdfront.Backend) *nbdfront.Server {
	t.Helper()
	srv, err := nbdfront.NewServer(nbdfront.Config{Backend: be, Logger: testLogger(t, "nbd"), ErrorCode: nbdErrors.Code})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv
}

// TestNBDEdgeEndToEnd serves a real volume over NBD with the agent's error
// table. The export was opened at 1 MiB and the volume then shrank to
// 512 KiB (a resize while attached): a read the server lets through (it is
// inside the size the client was told) but the volume refuses is EINVAL,
// as the spec asks for a read beyond the end; requests beyond the
// announced size are refused by the server itself (EINVAL for reads and
// trims, EPERM for writes to this read-only export).
func TestNBDEdgeEndToEnd(t *testing.T) {
	store, err := volume.Open(t.TempDir(), testLogger(t, "volume"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	v, err := store.Create(volume.Meta{Name: "v", Size: 1 << 20, BlockSize: 4096, Created: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	ro := &roExport{vol: v, rd: healingReader{vol: v}, info: readOnlyInfo(v.Meta(), staleSuffix)}
	if err := store.Resize("v", 512<<10); err != nil {
		t.Fatal(err)
	}
	srv := newNBDServer(t, &errBackend{exports: map[string]nbdfront.Export{"v" + staleSuffix: ro}})
	c := dialNBD(t, srv)
	if size := c.exportName("v" + staleSuffix); size != 1<<20 {
		t.Fatalf("export size %d, want %d", size, 1<<20)
	}
	if errno, data := c.do(nbdCmdRead, 1, 0, 4096, nil); errno != 0 || len(data) != 4096 || data[0] != 0 {
		t.Fatalf("read inside the volume: error %d, %d bytes", errno, len(data))
	}
	for _, tc := range []struct {
		what   string
		typ    uint16
		off    uint64
		length uint32
		data   []byte
		want   uint32
	}{
		{"read past the shrunk end (the volume refuses)", nbdCmdRead, 768 << 10, 4096, nil, einval},
		{"read across the shrunk end", nbdCmdRead, 512<<10 - 512, 1024, nil, einval},
		{"read past the announced end (the server refuses)", nbdCmdRead, 1<<20 - 1, 2, nil, einval},
		{"trim on the read-only export", nbdCmdTrim, 0, 4096, nil, eperm},
		{"write to the read-only export", nbdCmdWrite, 0, 4, []byte{1, 2, 3, 4}, eperm},
	} {
		if errno, _ := c.do(tc.typ, 2, tc.off, tc.length, tc.data); errno != tc.want {
			t.Errorf("%s: NBD error %d, want %d", tc.what, errno, tc.want)
		}
	}
	if errno, data := c.do(nbdCmdRead, 3, 4096, 512, nil); errno != 0 || len(data) != 512 {
		t.Fatalf("the connection no longer serves: error %d", errno)
	}
}

// optionReplies are the NBD_REP_ERR_* replies a Backend error of a
// sentinel gets in the option phase, for the sentinels that do not get
// the default NBD_REP_ERR_UNKNOWN ("not available", with the error text).
var optionReplies = map[string]uint32{
	"nbdfront.ErrReadOnly":        nbdRepErrPolicy,
	"nbdfront.ErrBusy":            nbdRepErrPolicy,
	"nbdfront.ErrDenied":          nbdRepErrPolicy,
	"nbdfront.ErrUnsupported":     nbdRepErrPolicy,
	"nbdfront.ErrInvalidArgument": nbdRepErrInvalid,
	"nbdfront.ErrShutdown":        nbdRepErrShutdown,
}

// TestNBDOptionRepliesForEverySentinel makes the Backend fail with every
// sentinel of the module, wrapped as the agent wraps them, and checks the
// option reply the client gets, with the error text.
func TestNBDOptionRepliesForEverySentinel(t *testing.T) {
	be := &errBackend{}
	srv := newNBDServer(t, be)
	c := dialNBD(t, srv)
	for name := range optionReplies {
		if !slices.ContainsFunc(sentinels, func(s sentinel) bool { return s.name == name }) {
			t.Errorf("optionReplies names %s, which is not a sentinel", name)
		}
	}
	for _, s := range sentinels {
		want, ok := optionReplies[s.name]
		if !ok {
			want = nbdRepErrUnknown
		}
		be.err = fmt.Errorf("opening volume v: %w", s.err) // read by the server's goroutine only after the option is sent
		typ, msg := c.infoErr("v")
		if typ != want {
			t.Errorf("%s: option reply %#x, want %#x", s.name, typ, want)
		}
		if msg != be.err.Error() {
			t.Errorf("%s: option reply text %q, want %q", s.name, msg, be.err.Error())
		}
	}
	c.option(nbdOptAbort, nil)
}
