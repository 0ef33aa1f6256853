// Package harness runs real robib binaries for the end-to-end tests: it
// builds the binary once per test process, starts agents on loopback
// addresses, captures their logs, stops, kills and restarts them, runs the
// CLI against them, and offers the polling and tool-availability helpers the
// tests share.
//
// Everything listens on 127.0.0.0/8 only. Agents are always killed when the
// test that started them ends; their logs are kept in a file under the
// test's temporary directory and the last lines are printed when the test
// fails (or when ROBIB_E2E_LOGS=1).
//
// Environment:
//
//	ROBIB_BIN            use this robib binary instead of building one
//	ROBIB_E2E_RACE=1     build the binary with -race
//	ROBIB_REQUIRE_TOOLS=1 a missing external tool fails the test instead of
//	                     skipping it
//	ROBIB_E2E_LOGS=1     print agent log tails even for passing tests
package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

var (
	buildOnce sync.Once
	buildBin  string
	buildErr  error
	buildDir  string
)

// ModuleRoot is the directory holding robib's go.mod.
func ModuleRoot() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", errors.New("harness: cannot locate source file")
	}
	dir := filepath.Dir(file)
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("harness: go.mod not found above " + filepath.Dir(file))
		}
		dir = parent
	}
}

// Build returns the path of a robib binary built from this source tree. The
// build happens once per test process; every later call returns the same
// path (or fails the same way). ROBIB_BIN overrides it.
func Build(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		if p := os.Getenv("ROBIB_BIN"); p != "" {
			buildBin, buildErr = filepath.Abs(p)
			if buildErr == nil {
				_, buildErr = os.Stat(buildBin)
			}
			return
		}
		root, err := ModuleRoot()
		if err != nil {
			buildErr = err
			return
		}
		buildDir, err = os.MkdirTemp("", "robib-e2e-bin-")
		if err != nil {
			buildErr = err
			return
		}
		buildBin = filepath.Join(buildDir, "robib")
		args := []string{"build", "-o", buildBin}
		env := os.Environ()
		if os.Getenv("ROBIB_E2E_RACE") == "1" {
			args = append(args, "-race")
		} else {
			env = append(env, "CGO_ENABLED=0")
		}
		args = append(args, "./cmd/robib")
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, GoTool(), args...)
		cmd.Dir = root
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	})
	if buildErr != nil {
		t.Fatalf("building robib: %v", buildErr)
	}
	return buildBin
}

// GoTool returns the path of the go command running the tests: the one on
// PATH (go test puts its own GOROOT/bin first), else $GOROOT/bin/go.
func GoTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	if root := os.Getenv("GOROOT"); root != "" {
		if p := filepath.Join(root, "bin", "go"); fileExists(p) {
			return p
		}
	}
	return "go"
}

// Cleanup removes the binary Build made. Call it from TestMain after m.Run.
func Cleanup() {
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	portsMu.Lock()
	defer portsMu.Unlock()
	for range 100 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("FreePort: %v", err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		// The kernel may offer a port again once its probe listener is
		// closed; one agent's Raft and gossip ports must differ.
		if !portsGiven[port] {
			portsGiven[port] = true
			return port
		}
	}
	t.Fatal("FreePort: no fresh port after 100 tries")
	return 0
}

var (
	portsMu    sync.Mutex
	portsGiven = map[int]bool{}
)

// FreeAddr returns "127.0.0.1:PORT" with a port from FreePort.
func FreeAddr(t testing.TB) string {
	return "127.0.0.1:" + strconv.Itoa(FreePort(t))
}

// WaitFor polls cond until it reports true, failing the test (t.Fatal) when
// timeout passes first. An error from cond means "not yet": polling goes on
// and the last error is reported on timeout. The interval starts at 2ms and
// grows to 100ms, so fast conditions cost little and slow ones do not spin.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	if err := Poll(timeout, cond); err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
}

// Poll is WaitFor without the test: it returns nil once cond holds, or an
// error naming the timeout and cond's last error.
func Poll(timeout time.Duration, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	interval := 2 * time.Millisecond
	var lastErr error
	for {
		ok, err := cond()
		if ok && err == nil {
			return nil
		}
		lastErr = err
		if time.Now().After(deadline) {
			if lastErr != nil {
				return fmt.Errorf("timed out after %v (last error: %v)", timeout, lastErr)
			}
			return fmt.Errorf("timed out after %v", timeout)
		}
		time.Sleep(interval)
		if interval < 100*time.Millisecond {
			interval *= 2
		}
	}
}

// RequireTools reports whether missing external tools must fail the tests
// (ROBIB_REQUIRE_TOOLS=1) rather than skip them.
func RequireTools() bool { return os.Getenv("ROBIB_REQUIRE_TOOLS") == "1" }

// Unavailable skips the test with the message, or fails it when
// ROBIB_REQUIRE_TOOLS=1.
func Unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if RequireTools() {
		t.Fatalf("%s (ROBIB_REQUIRE_TOOLS=1; run ops/scripts/install-test-tools.sh)", msg)
	}
	t.Skipf("%s (set ROBIB_REQUIRE_TOOLS=1 to make this a failure)", msg)
}

// RequireTool skips (or, with ROBIB_REQUIRE_TOOLS=1, fails) the test unless
// the named tool is usable. Besides executables on PATH it knows
// "python3-nbd" (/usr/bin/python3 with the libnbd bindings), "fuse"
// (/dev/fuse and fusermount3) and "loop" (losetup and a free loop device).
// It returns the tool's path where there is one.
func RequireTool(t testing.TB, name string) string {
	t.Helper()
	switch name {
	case "python3-nbd":
		if err := exec.Command(SystemPython, "-c", "import nbd").Run(); err != nil {
			Unavailable(t, "%s cannot import nbd (apt-get install python3-libnbd): %v", SystemPython, err)
		}
		return SystemPython
	case "fuse":
		f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
		if err != nil {
			Unavailable(t, "/dev/fuse is unusable: %v", err)
		}
		f.Close()
		return RequireTool(t, "fusermount3")
	case "loop":
		p := RequireTool(t, "losetup")
		out, err := exec.Command(p, "--find").CombinedOutput()
		if err != nil {
			Unavailable(t, "no free loop device (losetup --find: %v: %s)", err, bytes.TrimSpace(out))
		}
		return p
	}
	p, err := exec.LookPath(name)
	if err != nil {
		Unavailable(t, "tool %s not found on PATH", name)
	}
	return p
}

// SystemPython is the interpreter that has the libnbd bindings (Debian's
// python3-libnbd installs them for /usr/bin/python3 only).
const SystemPython = "/usr/bin/python3"

// Result is the outcome of Run.
type Result struct {
	Stdout, Stderr string
	ExitCode       int   // -1 if the process did not exit normally
	Err            error // nil on exit 0
}

// Run runs a command with a timeout, without failing the test; the caller
// asserts on the Result. The process is killed at the timeout.
func Run(t testing.TB, timeout time.Duration, env []string, name string, args ...string) Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(CleanEnv(), env...)
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	res := Result{Stdout: stdout.String(), Stderr: stderr.String(), Err: err}
	if ctx.Err() != nil {
		res.Err = fmt.Errorf("%s timed out after %v (%v)", name, timeout, err)
	}
	res.ExitCode = -1
	if cmd.ProcessState != nil {
		res.ExitCode = cmd.ProcessState.ExitCode()
	}
	return res
}

// MustRun is Run that fails the test unless the command exits 0; it
// returns stdout.
func MustRun(t testing.TB, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	r := Run(t, timeout, nil, name, args...)
	if r.Err != nil {
		t.Fatalf("%s %s: %v\nstdout:\n%s\nstderr:\n%s", name, strings.Join(args, " "), r.Err, Tail(r.Stdout, 40), Tail(r.Stderr, 40))
	}
	return r.Stdout
}

// CleanEnv is the environment of this process without ROBIB_* variables, so
// that a developer's settings never leak into the agents under test.
func CleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "ROBIB_") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// Tail returns the last n lines of s.
func Tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("... (%d lines omitted)", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}
