package tests

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/robib/robib/tests/harness"
)

const (
	KiB = 1 << 10
	MiB = 1 << 20
)

// toolTimeout bounds any single external tool invocation.
const toolTimeout = 2 * time.Minute

// startAgent starts an agent with default options and creates the named
// volumes (name, size pairs).
func startAgent(t *testing.T, vols ...string) *harness.Agent {
	t.Helper()
	a := harness.StartAgent(t, harness.Options{})
	if len(vols)%2 != 0 {
		t.Fatal("startAgent: vols must be name, size pairs")
	}
	for i := 0; i < len(vols); i += 2 {
		a.CreateVolume(vols[i], vols[i+1])
	}
	return a
}

// randomBytes returns n deterministic pseudo-random bytes.
func randomBytes(seed uint64, n int) []byte {
	var s [32]byte
	for i := range 8 {
		s[i] = byte(seed >> (8 * i))
	}
	r := rand.NewChaCha8(s)
	b := make([]byte, n)
	_, _ = r.Read(b)
	return b
}

// writeFile writes data to a new file under dir and returns its path.
func writeFile(t *testing.T, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func sha256File(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// assertSameBytes fails with the first differing offset when got != want.
func assertSameBytes(t *testing.T, what string, got, want []byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: got %d bytes, want %d", what, len(got), len(want))
	}
	if sha256Hex(got) == sha256Hex(want) {
		return
	}
	for i := range got {
		if got[i] != want[i] {
			end := min(i+16, len(got))
			t.Fatalf("%s: sha256 %s != %s; first difference at offset %d (%#x): got % x, want % x",
				what, sha256Hex(got), sha256Hex(want), i, i, got[i:end], want[i:end])
		}
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// nbdcopyIn copies a local file into an export (with a final flush).
func nbdcopyIn(t *testing.T, src, uri string, extra ...string) {
	t.Helper()
	harness.MustRun(t, toolTimeout, "nbdcopy", append(append([]string{"--flush"}, extra...), src, uri)...)
}

// nbdcopyOut copies a whole export into a new local file and returns its
// contents.
func nbdcopyOut(t *testing.T, uri string) []byte {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "out.img")
	harness.MustRun(t, toolTimeout, "nbdcopy", uri, dst)
	return readFile(t, dst)
}

// nbdinfoExport is the part of `nbdinfo --json` output the tests read.
type nbdinfoOutput struct {
	Protocol string           `json:"protocol"`
	Exports  []map[string]any `json:"exports"`
}

func nbdinfoJSON(t *testing.T, args ...string) nbdinfoOutput {
	t.Helper()
	out := harness.MustRun(t, toolTimeout, "nbdinfo", append([]string{"--json"}, args...)...)
	var info nbdinfoOutput
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo --json output: %v\n%s", err, out)
	}
	return info
}

// qemuIO runs qemu-io commands on an export; it returns the combined
// output and whether the run was clean (exit 0, no pattern mismatch, no
// error lines).
func qemuIO(t *testing.T, uri string, cmds ...string) (string, bool) {
	t.Helper()
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, uri)
	r := harness.Run(t, toolTimeout, nil, "qemu-io", args...)
	out := r.Stdout + r.Stderr
	clean := r.Err == nil && !strings.Contains(out, "Pattern verification failed") &&
		!strings.Contains(strings.ToLower(out), "error") && !strings.Contains(out, "failed")
	return out, clean
}

// mustQemuIO is qemuIO that fails the test unless the run was clean.
func mustQemuIO(t *testing.T, uri string, cmds ...string) string {
	t.Helper()
	out, ok := qemuIO(t, uri, cmds...)
	if !ok {
		t.Fatalf("qemu-io %q on %s was not clean:\n%s", cmds, uri, out)
	}
	return out
}

func fmtSize(n int64) string { return fmt.Sprintf("%d", n) }
