package harness

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// ServingMessage is the log message an agent prints once its listeners are
// open; its nbd, api and data_dir attributes tell the harness where it is.
const ServingMessage = "robib site serving"

// Options configure an agent process. Zero fields get defaults.
type Options struct {
	// Name is the site name (--name); default "site1".
	Name string
	// DataDir is the data directory (--data-dir); default a new directory
	// under t.TempDir(). Restart keeps it.
	DataDir string
	// NBDAddr and APIAddr are the listen addresses; default 127.0.0.1 with
	// a port from FreePort. Port 0 works too: the harness learns the real
	// address from the serving log line (a restart then gets a new port).
	NBDAddr, APIAddr string
	// RaftAddr and GossipAddr are the cluster addresses (--raft-addr,
	// --gossip-addr); default 127.0.0.1 with a free port, so that agents of
	// concurrent tests never meet on the binary's default ports. Restart
	// keeps them.
	RaftAddr, GossipAddr string
	// LogLevel is passed as --log-level unless empty.
	LogLevel string
	// ExtraArgs are appended after the harness's own flags (for example
	// --raft-addr, --join, --config).
	ExtraArgs []string
	// Env is added to the agent's environment (KEY=VALUE). ROBIB_* variables
	// of the test process itself are never passed on.
	Env []string
	// Bare passes none of the flags above: only ExtraArgs (and Env). The
	// addresses and data directory are then learned from the serving line;
	// set NBDAddr and APIAddr too if the agent will not log it (a log level
	// above info), so readiness can be told from the health endpoint.
	Bare bool
	// Bin is the robib binary; default Build(t).
	Bin string
	// TLS runs the agent with a site certificate of this PKI (TLS and
	// mutual authentication on every link, the product's default); the
	// harness's CLI calls, health probes and NBD URIs then authenticate as
	// AdminClient. Nil runs it with --insecure (ROBIB_INSECURE, so Bare
	// agents get it too).
	TLS *PKI
	// StartTimeout bounds the wait for the serving line; default 30s.
	StartTimeout time.Duration
	// StopTimeout bounds the wait after SIGTERM before Stop kills the
	// process; default 20s.
	StopTimeout time.Duration
	// LogTail is how many log lines to keep for failure reports; default 200.
	LogTail int
}

// Agent is one robib agent process, restartable.
type Agent struct {
	t    testing.TB
	opts Options

	// Name, DataDir and the addresses describe the running (or last)
	// process. Addresses are host:port on 127.0.0.1.
	Name, DataDir, NBDAddr, APIAddr, RaftAddr, GossipAddr string
	// Bin is the robib binary the agent runs.
	Bin string
	// LogPath is the file that receives every line the agent prints, over
	// all its restarts.
	LogPath string

	mu     sync.Mutex
	proc   *process
	starts int
	ring   []string // last LogTail lines
	logf   *os.File
	alarms []string // panics, data races and the like seen in the log
}

type process struct {
	cmd      *exec.Cmd
	done     chan struct{} // closed when Wait returned and the log drained
	waitErr  error
	expected bool // Stop or Kill asked for the exit
	ready    chan servingInfo
}

type servingInfo struct{ nbd, api, dataDir string }

// NewAgent prepares an agent without starting it; see StartAgent. The agent
// is killed when the test ends.
func NewAgent(t testing.TB, opts Options) *Agent {
	t.Helper()
	if opts.Bin == "" {
		opts.Bin = Build(t)
	}
	if !opts.Bare {
		if opts.Name == "" {
			opts.Name = "site1"
		}
		if opts.DataDir == "" {
			opts.DataDir = filepath.Join(t.TempDir(), "data")
		}
		if opts.NBDAddr == "" {
			opts.NBDAddr = FreeAddr(t)
		}
		if opts.APIAddr == "" {
			opts.APIAddr = FreeAddr(t)
		}
		if opts.RaftAddr == "" {
			opts.RaftAddr = FreeAddr(t)
		}
		if opts.GossipAddr == "" {
			opts.GossipAddr = FreeAddr(t)
		}
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = 30 * time.Second
	}
	if opts.StopTimeout == 0 {
		opts.StopTimeout = 20 * time.Second
	}
	if opts.LogTail == 0 {
		opts.LogTail = 200
	}
	logName := opts.Name
	if logName == "" {
		logName = "agent"
	}
	a := &Agent{
		t: t, opts: opts, Bin: opts.Bin,
		Name: opts.Name, DataDir: opts.DataDir, NBDAddr: opts.NBDAddr, APIAddr: opts.APIAddr,
		RaftAddr: opts.RaftAddr, GossipAddr: opts.GossipAddr,
		LogPath: filepath.Join(t.TempDir(), logName+".log"),
	}
	f, err := os.OpenFile(a.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatalf("agent log: %v", err)
	}
	a.logf = f
	t.Cleanup(a.cleanup)
	return a
}

// StartAgent starts an agent and waits until it serves; it fails the test
// if the agent does not come up.
func StartAgent(t testing.TB, opts Options) *Agent {
	t.Helper()
	a := NewAgent(t, opts)
	if err := a.Start(); err != nil {
		t.Fatalf("starting agent %s: %v", a.Name, err)
	}
	return a
}

func (a *Agent) args() []string {
	var args []string
	args = append(args, "agent")
	if !a.opts.Bare {
		args = append(args, "--name", a.opts.Name, "--data-dir", a.opts.DataDir,
			"--nbd-addr", a.opts.NBDAddr, "--api-addr", a.opts.APIAddr,
			"--raft-addr", a.opts.RaftAddr, "--gossip-addr", a.opts.GossipAddr)
		if a.opts.LogLevel != "" {
			args = append(args, "--log-level", a.opts.LogLevel)
		}
		if a.opts.TLS != nil {
			args = append(args, a.opts.TLS.AgentArgs(a.opts.Name)...)
		}
	}
	return append(args, a.opts.ExtraArgs...)
}

// Start starts the process and waits for its serving line. It returns an
// error (with the log tail) if the process exits or does not serve in time;
// the test goes on, so tests of failing starts can use it.
func (a *Agent) Start() error {
	a.mu.Lock()
	if a.proc != nil && !a.exited(a.proc) {
		a.mu.Unlock()
		return errors.New("agent already running")
	}
	a.starts++
	n := a.starts
	a.mu.Unlock()

	args := a.args()
	a.logLine(fmt.Sprintf("=== harness: start #%d: %s %s", n, a.Bin, strings.Join(args, " ")))
	pr, pw, err := os.Pipe()
	if err != nil {
		return err
	}
	cmd := exec.Command(a.Bin, args...)
	cmd.Env = append(CleanEnv(), a.env()...)
	cmd.Stdout, cmd.Stderr = pw, pw
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		pr.Close()
		pw.Close()
		return err
	}
	pw.Close()
	p := &process{cmd: cmd, done: make(chan struct{}), ready: make(chan servingInfo, 1)}
	a.mu.Lock()
	a.proc = p
	a.mu.Unlock()
	logDone := make(chan struct{})
	go a.readLog(p, pr, logDone)
	go func() {
		err := cmd.Wait()
		<-logDone
		a.mu.Lock()
		p.waitErr = err
		a.mu.Unlock()
		a.logLine(fmt.Sprintf("=== harness: process %d exited: %v", cmd.Process.Pid, describeExit(err)))
		close(p.done)
	}()

	timer := time.NewTimer(a.opts.StartTimeout)
	defer timer.Stop()
	// Below info level the serving line never comes; then the health
	// endpoint on a known API address (and a listening NBD port) says it.
	healthy := make(chan servingInfo, 1)
	stopProbe := make(chan struct{})
	defer close(stopProbe)
	a.mu.Lock()
	apiAddr, nbdAddr := a.APIAddr, a.NBDAddr
	a.mu.Unlock()
	if apiAddr != "" && !strings.HasSuffix(apiAddr, ":0") && !strings.HasSuffix(nbdAddr, ":0") {
		go probe(p, a.apiBase(apiAddr), a.httpClient(), nbdAddr, healthy, stopProbe)
	}
	select {
	case <-healthy:
		return nil
	case info := <-p.ready:
		a.mu.Lock()
		if info.nbd != "" {
			a.NBDAddr = info.nbd
		}
		if info.api != "" {
			a.APIAddr = info.api
		}
		if info.dataDir != "" {
			a.DataDir = info.dataDir
		}
		a.mu.Unlock()
		return nil
	case <-p.done:
		return fmt.Errorf("agent exited before serving: %v\nlog tail:\n%s", describeExit(p.waitErr), a.LogTail(40))
	case <-timer.C:
		a.signal(p, syscall.SIGKILL, true)
		<-p.done
		return fmt.Errorf("agent did not log %q within %v\nlog tail:\n%s", ServingMessage, a.opts.StartTimeout, a.LogTail(40))
	}
}

func probe(p *process, apiBase string, hc *http.Client, nbdAddr string, healthy chan<- servingInfo, stop <-chan struct{}) {
	// Give the serving line a head start: it carries more information.
	select {
	case <-stop:
		return
	case <-time.After(time.Second):
	}
	for {
		if healthAt(apiBase, hc) == nil && (nbdAddr == "" || dialable(nbdAddr)) {
			healthy <- servingInfo{}
			return
		}
		select {
		case <-stop:
			return
		case <-p.done:
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func dialable(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func describeExit(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

var alarmPatterns = []string{"panic:", "fatal error:", "WARNING: DATA RACE", "SIGSEGV"}

func (a *Agent) readLog(p *process, r io.ReadCloser, done chan struct{}) {
	defer close(done)
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		line := sc.Text()
		a.logLine(line)
		for _, pat := range alarmPatterns {
			if strings.Contains(line, pat) {
				a.mu.Lock()
				a.alarms = append(a.alarms, line)
				a.mu.Unlock()
			}
		}
		if strings.Contains(line, ServingMessage) {
			select {
			case p.ready <- parseServing(line):
			default:
			}
		}
	}
	// Drain anything left (an overlong line) so the child never blocks.
	io.Copy(io.Discard, r)
}

func (a *Agent) logLine(line string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.logf != nil {
		fmt.Fprintln(a.logf, line)
	}
	a.ring = append(a.ring, line)
	if over := len(a.ring) - a.opts.LogTail; over > 0 {
		a.ring = append(a.ring[:0], a.ring[over:]...)
	}
}

var textAttr = map[string]*regexp.Regexp{}

func init() {
	for _, k := range []string{"nbd", "api", "data_dir"} {
		textAttr[k] = regexp.MustCompile(`(?:^|\s)` + k + `=("(?:[^"\\]|\\.)*"|\S+)`)
	}
}

// parseServing reads the nbd, api and data_dir attributes of a serving
// line in slog's text or JSON format.
func parseServing(line string) servingInfo {
	get := func(k string) string {
		if i := strings.Index(line, "{"); i >= 0 {
			var m map[string]any
			if json.Unmarshal([]byte(line[i:]), &m) == nil {
				s, _ := m[k].(string)
				return s
			}
		}
		m := textAttr[k].FindStringSubmatch(line)
		if m == nil {
			return ""
		}
		v := m[1]
		if strings.HasPrefix(v, `"`) {
			if u, err := strconv.Unquote(v); err == nil {
				v = u
			}
		}
		return v
	}
	return servingInfo{nbd: loopback(get("nbd")), api: loopback(get("api")), dataDir: get("data_dir")}
}

// loopback turns a wildcard listen address into one a client can dial.
func loopback(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}

func (a *Agent) exited(p *process) bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (a *Agent) current() *process {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.proc
}

func (a *Agent) signal(p *process, sig syscall.Signal, expected bool) {
	a.mu.Lock()
	if expected {
		p.expected = true
	}
	a.mu.Unlock()
	_ = p.cmd.Process.Signal(sig)
}

// Running reports whether the agent process is alive.
func (a *Agent) Running() bool {
	p := a.current()
	return p != nil && !a.exited(p)
}

// Pid is the current process id (0 if never started).
func (a *Agent) Pid() int {
	if p := a.current(); p != nil {
		return p.cmd.Process.Pid
	}
	return 0
}

// Stop sends SIGTERM and waits for the exit. It returns nil for a clean
// exit (status 0); if the agent does not exit within StopTimeout it is
// killed and an error returned.
func (a *Agent) Stop() error {
	p := a.current()
	if p == nil {
		return errors.New("agent never started")
	}
	if a.exited(p) {
		return fmt.Errorf("agent was not running (%s)", describeExit(p.waitErr))
	}
	a.signal(p, syscall.SIGTERM, true)
	select {
	case <-p.done:
		return p.waitErr
	case <-time.After(a.opts.StopTimeout):
		a.signal(p, syscall.SIGKILL, true)
		<-p.done
		return fmt.Errorf("agent did not exit within %v of SIGTERM; killed", a.opts.StopTimeout)
	}
}

// Kill sends SIGKILL and waits for the process to be gone.
func (a *Agent) Kill() {
	p := a.current()
	if p == nil || a.exited(p) {
		return
	}
	a.signal(p, syscall.SIGKILL, true)
	<-p.done
}

// Restart stops the agent gracefully (a non-clean stop is a test error)
// and starts it again with the same options; a failed start is fatal.
func (a *Agent) Restart() {
	a.t.Helper()
	if a.Running() {
		if err := a.Stop(); err != nil {
			a.t.Errorf("stopping agent %s for restart: %v", a.Name, err)
		}
	}
	if err := a.Start(); err != nil {
		a.t.Fatalf("restarting agent %s: %v", a.Name, err)
	}
}

// KillAndRestart kills the agent with SIGKILL and starts it again.
func (a *Agent) KillAndRestart() {
	a.t.Helper()
	a.Kill()
	if err := a.Start(); err != nil {
		a.t.Fatalf("restarting agent %s after SIGKILL: %v", a.Name, err)
	}
}

// Wait waits for the process to exit by itself and returns its exit error.
func (a *Agent) Wait(timeout time.Duration) error {
	p := a.current()
	if p == nil {
		return errors.New("agent never started")
	}
	select {
	case <-p.done:
		a.mu.Lock()
		p.expected = true
		a.mu.Unlock()
		return p.waitErr
	case <-time.After(timeout):
		return fmt.Errorf("agent still running after %v", timeout)
	}
}

// LogTail returns the last n captured log lines.
func (a *Agent) LogTail(n int) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	lines := a.ring
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Logs returns the whole log file so far.
func (a *Agent) Logs() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	b, _ := os.ReadFile(a.LogPath)
	return string(b)
}

// WaitForLog waits until the log contains substr.
func (a *Agent) WaitForLog(timeout time.Duration, substr string) {
	a.t.Helper()
	WaitFor(a.t, timeout, fmt.Sprintf("agent %s to log %q", a.Name, substr), func() (bool, error) {
		return strings.Contains(a.Logs(), substr), nil
	})
}

func (a *Agent) cleanup() {
	t := a.t
	p := a.current()
	if p != nil {
		a.mu.Lock()
		unexpected := a.exited(p) && !p.expected
		a.mu.Unlock()
		if unexpected {
			t.Errorf("agent %s (pid %d) exited on its own during the test: %v", a.Name, p.cmd.Process.Pid, describeExit(p.waitErr))
		}
		if !a.exited(p) {
			a.signal(p, syscall.SIGKILL, true)
			select {
			case <-p.done:
			case <-time.After(10 * time.Second):
				t.Errorf("agent %s (pid %d) did not die after SIGKILL", a.Name, p.cmd.Process.Pid)
			}
		}
	}
	a.mu.Lock()
	alarms := append([]string(nil), a.alarms...)
	a.mu.Unlock()
	if len(alarms) > 0 {
		t.Errorf("agent %s logged %d alarming lines (panic/race/fatal), first: %s", a.Name, len(alarms), alarms[0])
	}
	if t.Failed() || os.Getenv("ROBIB_E2E_LOGS") == "1" {
		t.Logf("agent %s log (full log in %s), last lines:\n%s", a.Name, a.LogPath, a.LogTail(a.opts.LogTail))
	}
	a.mu.Lock()
	if a.logf != nil {
		a.logf.Close()
		a.logf = nil
	}
	a.mu.Unlock()
}

// env is the agent's environment beyond CleanEnv: ROBIB_INSECURE unless it
// runs with TLS, then Options.Env (which may override it).
func (a *Agent) env() []string {
	var env []string
	if a.opts.TLS == nil {
		env = append(env, "ROBIB_INSECURE=true")
	}
	return append(env, a.opts.Env...)
}

// APIURL is the agent's admin API base URL.
func (a *Agent) APIURL() string { return a.apiBase(a.APIAddr) }

// apiBase is the API base URL for an API address: https when the agent
// runs with TLS.
func (a *Agent) apiBase(addr string) string {
	if a.opts.TLS != nil {
		return "https://" + addr
	}
	return "http://" + addr
}

// NBDURI is the NBD URI of an export on this agent: nbds:// with the admin
// client's certificates when the agent runs with TLS.
func (a *Agent) NBDURI(export string) string {
	if a.opts.TLS != nil {
		return "nbds://" + a.NBDAddr + "/" + export + "?tls-certificates=" + a.opts.TLS.Client(AdminClient)
	}
	return "nbd://" + a.NBDAddr + "/" + export
}

// CLIEnv is the environment the harness's CLI calls run with.
func (a *Agent) CLIEnv() []string {
	if a.opts.TLS != nil {
		return a.opts.TLS.ClientEnv(AdminClient)
	}
	return nil
}

// NBDPort is the port of the NBD listener.
func (a *Agent) NBDPort() string {
	_, port, _ := net.SplitHostPort(a.NBDAddr)
	return port
}

// Health does GET /v1/health and returns an error unless it answers 200.
func (a *Agent) Health() error { return healthAt(a.APIURL(), a.httpClient()) }

// httpClient is the client for this agent's API: plain, or HTTPS as the
// admin client.
func (a *Agent) httpClient() *http.Client {
	if a.opts.TLS != nil {
		return a.opts.TLS.HTTPClient(AdminClient)
	}
	return http.DefaultClient
}

func healthAt(base string, hc *http.Client) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v1/health", nil)
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("health: %s: %s", resp.Status, body)
	}
	return nil
}

// CLI runs `robib --api <this agent> args...` and returns its output; err
// is non-nil for a non-zero exit (or a timeout).
func (a *Agent) CLI(args ...string) (stdout, stderr string, err error) {
	a.t.Helper()
	r := Run(a.t, time.Minute, a.CLIEnv(), a.Bin, append([]string{"--api", a.APIURL()}, args...)...)
	return r.Stdout, r.Stderr, r.Err
}

// MustCLI is CLI that fails the test on a non-zero exit; it returns stdout.
func (a *Agent) MustCLI(args ...string) string {
	a.t.Helper()
	out, errOut, err := a.CLI(args...)
	if err != nil {
		a.t.Fatalf("robib %s: %v\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, out, errOut)
	}
	return out
}

// CreateVolume creates a volume through the CLI.
func (a *Agent) CreateVolume(name, size string, extra ...string) {
	a.t.Helper()
	a.MustCLI(append([]string{"volume", "create", name, "--size", size}, extra...)...)
}
