package dockerh

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/robib/robib/tests/harness"
)

// Labels put on every container and network the package creates.
const (
	// LabelTest marks a resource as made by this package ("1").
	LabelTest = "robib.test"
	// LabelRun is the per-cluster run id.
	LabelRun = "robib.test.run"
	// LabelOwner is "HOST:PID:STARTTIME" of the test process that made it.
	LabelOwner = "robib.test.owner"
	// LabelCreated is the creation time in Unix seconds.
	LabelCreated = "robib.test.created"
)

// StaleAge is how old a labeled resource of another host (or of an owner
// that cannot be checked) must be before CleanupStale removes it.
const StaleAge = time.Hour

// dockerTimeout bounds one ordinary docker command.
const dockerTimeout = 2 * time.Minute

var (
	dockerPath string

	availOnce sync.Once
	availErr  error

	binOnce sync.Once
	binPath string
	binDir  string
	binErr  error

	imageOnce sync.Once
	imageTag  string
	imageErr  error

	staleOnce sync.Once
)

// docker runs the docker CLI and returns its trimmed stdout; a non-zero
// exit is an error carrying stderr.
func docker(timeout time.Duration, args ...string) (string, error) {
	return dockerEnv(timeout, nil, args...)
}

func dockerEnv(timeout time.Duration, env []string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, dockerBin(), args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	out := strings.TrimSpace(stdout.String())
	if ctx.Err() != nil {
		return out, fmt.Errorf("docker %s: timed out after %v: %s", strings.Join(args, " "), timeout, strings.TrimSpace(stderr.String()))
	}
	if err != nil {
		return out, fmt.Errorf("docker %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

func dockerBin() string {
	if dockerPath != "" {
		return dockerPath
	}
	return "docker"
}

// dockerCombined runs docker with stdout and stderr into one buffer, as
// `docker logs` needs (the agent logs to stderr).
func dockerCombined(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, dockerBin(), args...)
	cmd.WaitDelay = 5 * time.Second
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	err := cmd.Run()
	if err != nil {
		return buf.String(), fmt.Errorf("docker %s: %v: %s", strings.Join(args, " "), err, harness.Tail(buf.String(), 5))
	}
	return buf.String(), nil
}

// Available reports whether the docker CLI is on PATH and its daemon
// answers. The check runs once per process.
func Available() error {
	availOnce.Do(func() {
		p, err := exec.LookPath("docker")
		if err != nil {
			availErr = errors.New("docker CLI not found on PATH")
			return
		}
		dockerPath = p
		v, err := docker(30*time.Second, "version", "--format", "{{.Server.Version}}")
		if err != nil {
			availErr = fmt.Errorf("docker daemon does not answer: %v", err)
			return
		}
		if v == "" {
			availErr = errors.New("docker version printed no server version")
		}
	})
	return availErr
}

// RequireDocker skips the test (or fails it with ROBIB_REQUIRE_TOOLS=1)
// unless Docker is usable.
func RequireDocker(t testing.TB) {
	t.Helper()
	if err := Available(); err != nil {
		harness.Unavailable(t, "docker is unavailable: %v", err)
	}
}

// Binary returns a statically linked robib binary (CGO_ENABLED=0, built
// once per process from the module root) that runs both in the scratch
// image and on the host. ROBIB_DOCKER_BIN names a prebuilt one instead
// (it must be static).
func Binary(t testing.TB) string {
	t.Helper()
	binOnce.Do(func() {
		if p := os.Getenv("ROBIB_DOCKER_BIN"); p != "" {
			binPath, binErr = filepath.Abs(p)
			if binErr == nil {
				_, binErr = os.Stat(binPath)
			}
			return
		}
		root, err := harness.ModuleRoot()
		if err != nil {
			binErr = err
			return
		}
		if binDir, err = os.MkdirTemp("", "robib-docker-bin-"); err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(binDir, "robib")
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, harness.GoTool(), "build", "-trimpath", "-o", binPath, "./cmd/robib")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			binErr = fmt.Errorf("CGO_ENABLED=0 go build -trimpath ./cmd/robib: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatalf("building robib for docker: %v", binErr)
	}
	return binPath
}

// Cleanup removes the binary Binary built. Call it from TestMain after
// m.Run. Images are kept (they are small and keyed by the binary's hash;
// CleanupStale removes old ones).
func Cleanup() {
	if binDir != "" {
		os.RemoveAll(binDir)
	}
}

// Image returns the tag of a FROM-scratch image holding Binary as
// /robib, built once per process; an image already present under the tag
// (robib-test:<hash of the binary>) is reused.
func Image(t testing.TB) string {
	t.Helper()
	RequireDocker(t)
	bin := Binary(t)
	imageOnce.Do(func() { imageTag, imageErr = buildImage(bin) })
	if imageErr != nil {
		t.Fatalf("building the robib image: %v", imageErr)
	}
	return imageTag
}

func buildImage(bin string) (string, error) {
	f, err := os.Open(bin)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	_, err = io.Copy(h, f)
	f.Close()
	if err != nil {
		return "", err
	}
	tag := "robib-test:" + hex.EncodeToString(h.Sum(nil))[:16]
	if _, err := docker(30*time.Second, "image", "inspect", "--format", "{{.Id}}", tag); err == nil {
		return tag, nil
	}
	dir, err := os.MkdirTemp("", "robib-docker-image-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(dir)
	if err := copyFile(bin, filepath.Join(dir, "robib"), 0o755); err != nil {
		return "", err
	}
	dockerfile := "FROM scratch\nCOPY robib /robib\nENTRYPOINT [\"/robib\"]\n"
	if err := os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(dockerfile), 0o644); err != nil {
		return "", err
	}
	// The classic builder: no buildx needed, nothing pulled for scratch.
	if _, err := dockerEnv(5*time.Minute, []string{"DOCKER_BUILDKIT=0"},
		"build", "--quiet", "--label", LabelTest+"=1", "--tag", tag, dir); err != nil {
		return "", err
	}
	return tag, nil
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// owner identifies this test process: host name, pid and the process's
// start time (so that a reused pid is not mistaken for it).
func owner() string {
	host, _ := os.Hostname()
	return fmt.Sprintf("%s:%d:%d", host, os.Getpid(), procStart(os.Getpid()))
}

// procStart is the start time of process pid in clock ticks since boot
// (field 22 of /proc/PID/stat), or 0 if unknown.
func procStart(pid int) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	return parseStatStart(string(b))
}

func parseStatStart(stat string) uint64 {
	// The command name (field 2) is in parentheses and may hold spaces;
	// the fields after the last ')' start with field 3.
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(stat[i+1:])
	if len(f) < 20 {
		return 0
	}
	v, _ := strconv.ParseUint(f[19], 10, 64)
	return v
}

// ownerAlive reports whether the owner label names a live process: of this
// host, with the same pid and start time. known is false when that cannot
// be told (another host, a malformed label).
func ownerAlive(label string) (alive, known bool) {
	parts := strings.Split(label, ":")
	if len(parts) != 3 {
		return false, false
	}
	host, _ := os.Hostname()
	if parts[0] != host {
		return false, false
	}
	pid, err1 := strconv.Atoi(parts[1])
	start, err2 := strconv.ParseUint(parts[2], 10, 64)
	if err1 != nil || err2 != nil || pid <= 0 {
		return false, false
	}
	if pid == os.Getpid() {
		return true, true
	}
	return start != 0 && procStart(pid) == start, true
}

// stale decides whether a labeled resource may be removed: its owner
// process is known to be gone, or (owner unknown) it is older than
// StaleAge.
func stale(labels map[string]string, now time.Time) bool {
	if labels[LabelTest] != "1" {
		return false
	}
	alive, known := ownerAlive(labels[LabelOwner])
	if known {
		return !alive
	}
	sec, err := strconv.ParseInt(labels[LabelCreated], 10, 64)
	if err != nil {
		return false
	}
	return now.Sub(time.Unix(sec, 0)) > StaleAge
}

type inspected struct {
	ID     string
	Name   string
	Labels map[string]string
	Config struct{ Labels map[string]string }
	State  struct{ Paused bool }
}

func (x inspected) labels() map[string]string {
	if x.Labels != nil {
		return x.Labels
	}
	return x.Config.Labels
}

func inspectAll(kind string, ids []string) ([]inspected, error) {
	if len(ids) == 0 {
		return nil, nil
	}
	out, err := docker(dockerTimeout, append([]string{kind, "inspect"}, ids...)...)
	var list []inspected
	if jerr := json.Unmarshal([]byte(out), &list); jerr != nil {
		if err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("docker %s inspect: %v", kind, jerr)
	}
	// A resource removed meanwhile makes inspect fail for it alone.
	return list, nil
}

// CleanupStale removes containers and networks labeled robib.test=1 whose
// test process is gone (same host, pid no longer alive with the same start
// time), or, when the owner cannot be checked, that are older than
// StaleAge. Resources of live test processes are never touched. It also
// removes robib-test images older than StaleAge, other than this
// process's, that no container uses. It is called once per process by
// StartCluster.
func CleanupStale() error {
	if err := Available(); err != nil {
		return err
	}
	now := time.Now()
	var errs []error
	ids, err := docker(dockerTimeout, "ps", "-aq", "--no-trunc", "--filter", "label="+LabelTest+"=1")
	if err != nil {
		return err
	}
	cs, err := inspectAll("container", strings.Fields(ids))
	if err != nil {
		errs = append(errs, err)
	}
	for _, c := range cs {
		if !stale(c.labels(), now) {
			continue
		}
		if c.State.Paused {
			_, _ = docker(dockerTimeout, "unpause", c.ID)
		}
		if _, err := docker(dockerTimeout, "rm", "-f", "-v", c.ID); err != nil && !isNoSuch(err) {
			errs = append(errs, err)
		}
	}
	ids, err = docker(dockerTimeout, "network", "ls", "-q", "--no-trunc", "--filter", "label="+LabelTest+"=1")
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	ns, err := inspectAll("network", strings.Fields(ids))
	if err != nil {
		errs = append(errs, err)
	}
	for _, n := range ns {
		if !stale(n.labels(), now) {
			continue
		}
		if _, err := docker(dockerTimeout, "network", "rm", n.ID); err != nil && !isNoSuch(err) {
			errs = append(errs, err)
		}
	}
	if err := removeOldImages(now); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// removeOldImages removes robib-test images older than StaleAge other
// than this process's; one that a container still uses stays (docker
// refuses without -f).
func removeOldImages(now time.Time) error {
	ids, err := docker(dockerTimeout, "image", "ls", "-q", "--no-trunc", "--filter", "label="+LabelTest+"=1")
	if err != nil || ids == "" {
		return err
	}
	out, err := docker(dockerTimeout, append([]string{"image", "inspect"}, strings.Fields(ids)...)...)
	var imgs []struct {
		ID       string `json:"Id"`
		RepoTags []string
		Created  time.Time
	}
	if jerr := json.Unmarshal([]byte(out), &imgs); jerr != nil {
		if err != nil {
			return err
		}
		return fmt.Errorf("docker image inspect: %v", jerr)
	}
	for _, im := range imgs {
		if slices.Contains(im.RepoTags, imageTag) || now.Sub(im.Created) < StaleAge {
			continue
		}
		refs := im.RepoTags
		if len(refs) == 0 {
			refs = []string{im.ID}
		}
		// Errors (in use, removed meanwhile) leave it for a later run.
		_, _ = docker(dockerTimeout, append([]string{"rmi"}, refs...)...)
	}
	return nil
}

func isNoSuch(err error) bool {
	s := strings.ToLower(err.Error())
	return strings.Contains(s, "no such") || strings.Contains(s, "not found")
}
