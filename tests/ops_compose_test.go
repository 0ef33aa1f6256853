package tests

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/robib/robib/tests/harness"
)

// composeSmokeTimeout bounds ops/scripts/compose-smoke.sh (it usually needs
// 15-30s; its own waits give up after 2 minutes each).
const composeSmokeTimeout = 5 * time.Minute

// TestComposeSmoke runs ops/scripts/compose-smoke.sh: the FROM scratch
// image around this tree's static binary, three sites from
// ops/compose/docker-compose.yml on a private network, a volume written at
// one site over NBD from the host and read back byte-exact at the others
// through their published ports, `volume verify`, and a tear-down that
// leaves no container, network or volume behind. Without docker (or a
// daemon that answers) or docker-compose the test is skipped, or fails
// under ROBIB_REQUIRE_TOOLS=1.
func TestComposeSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: builds an image and starts three containers")
	}
	docker := harness.RequireTool(t, "docker")
	if r := harness.Run(t, 30*time.Second, nil, docker, "compose", "version"); r.Err != nil {
		harness.RequireTool(t, "docker-compose")
	}
	requireTools(t, "nbdcopy", "jq", "sha256sum", "timeout", "python3-nbd")
	if r := harness.Run(t, 30*time.Second, nil, docker, "info", "--format", "{{.ServerVersion}}"); r.Err != nil {
		harness.Unavailable(t, "the docker daemon does not answer (docker info: %v)\n%s", r.Err, harness.Tail(r.Stderr, 10))
	}
	root, err := harness.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}

	// The harness's binary is static (CGO_ENABLED=0) unless ROBIB_E2E_RACE=1
	// asks for a -race build, which the scratch image cannot run: the
	// script then builds bin/robib itself with make.
	var env []string
	if os.Getenv("ROBIB_E2E_RACE") != "1" || os.Getenv("ROBIB_BIN") != "" {
		env = append(env, "ROBIB_BIN="+harness.Build(t))
	} else {
		requireTools(t, "make")
	}
	// harness.Run's environment drops ROBIB_*; pass the script's own on.
	for _, k := range []string{"ROBIB_IMAGE", "ROBIB_SMOKE_PROJECT", "ROBIB_SMOKE_TIMEOUT", "ROBIB_SMOKE_KEEP"} {
		if v, ok := os.LookupEnv(k); ok {
			env = append(env, k+"="+v)
		}
	}

	start := time.Now()
	out, code, err := runComposeSmoke(filepath.Join(root, "ops", "scripts", "compose-smoke.sh"), root, env)
	if err != nil {
		t.Fatalf("compose-smoke.sh failed after %v (exit %d): %v\n%s", time.Since(start).Round(time.Second), code, err, out)
	}
	if !strings.Contains(out, "compose smoke OK") {
		t.Fatalf("compose-smoke.sh exited 0 without its OK report:\n%s", out)
	}
	t.Logf("compose-smoke.sh passed in %v:\n%s", time.Since(start).Round(time.Second), out)
}

// runComposeSmoke runs the script with the test environment plus env and
// returns its combined output. The script runs in its own process group; at
// composeSmokeTimeout the group gets SIGTERM, not SIGKILL, so the tool the
// script waits on stops and the script's trap still removes the
// containers, network and volumes. The script is killed only if that takes
// longer than a minute.
func runComposeSmoke(script, dir string, env []string) (string, int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), composeSmokeTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, script)
	cmd.Dir = dir
	cmd.Env = append(harness.CleanEnv(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM) }
	cmd.WaitDelay = time.Minute
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if ctx.Err() != nil {
		err = errors.Join(errors.New("timed out after "+composeSmokeTimeout.String()), err)
	}
	code := -1
	if cmd.ProcessState != nil {
		code = cmd.ProcessState.ExitCode()
	}
	return out.String(), code, err
}
