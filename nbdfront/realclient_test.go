package nbdfront

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// Quick interoperability checks with real NBD clients, skipped when they
// are not installed unless ROBIB_REQUIRE_TOOLS=1 (as in tests/harness).
// The full real-client suite lives in tests/.

func runTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("ROBIB_REQUIRE_TOOLS") == "1" {
			t.Fatalf("%s not installed (ROBIB_REQUIRE_TOOLS=1)", name)
		}
		t.Skipf("%s not installed", name)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\nstdout:\n%s\nstderr:\n%s", name, strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

func TestNbdinfo(t *testing.T) {
	e := newEnv(t, nil)
	out := runTool(t, "nbdinfo", "--json", "nbd://"+e.addr+"/disk")
	var info struct {
		Protocol string `json:"protocol"`
		Exports  []struct {
			Name        string   `json:"export-name"`
			Description string   `json:"description"`
			Size        int64    `json:"export-size"`
			ReadOnly    bool     `json:"is_read_only"`
			CanFlush    bool     `json:"can_flush"`
			CanFUA      bool     `json:"can_fua"`
			CanTrim     bool     `json:"can_trim"`
			CanZero     bool     `json:"can_zero"`
			CanFastZero bool     `json:"can_fast_zero"`
			CanMulti    bool     `json:"can_multi_conn"`
			CanCache    bool     `json:"can_cache"`
			Contexts    []string `json:"contexts"`
			MinBlock    int      `json:"block_size_minimum"`
			PrefBlock   int      `json:"block_size_preferred"`
			MaxBlock    int      `json:"block_size_maximum"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo output: %v\n%s", err, out)
	}
	if info.Protocol != "newstyle-fixed" || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo: %s", out)
	}
	x := info.Exports[0]
	if x.Name != "disk" || x.Description != "test disk" || x.Size != testSize || x.ReadOnly ||
		!x.CanFlush || !x.CanFUA || !x.CanTrim || !x.CanZero || !x.CanFastZero || !x.CanMulti || !x.CanCache ||
		len(x.Contexts) != 1 || x.Contexts[0] != metaBaseAllocation ||
		x.MinBlock != 1 || x.PrefBlock != 4096 || x.MaxBlock != 256<<10 {
		t.Fatalf("nbdinfo reports %+v", x)
	}

	list := runTool(t, "nbdinfo", "--list", "--json", "nbd://"+e.addr)
	if !strings.Contains(list, `"export-name": "disk"`) || !strings.Contains(list, `"export-name": "ro"`) {
		t.Fatalf("nbdinfo --list: %s", list)
	}

	if _, err := e.disk.WriteAt(pattern(8192, 1), 16384); err != nil {
		t.Fatal(err)
	}
	m := runTool(t, "nbdinfo", "--map", "nbd://"+e.addr+"/disk")
	want := "         0       16384    3  hole,zero\n     16384        8192    0  data\n     24576     1024000    3  hole,zero\n"
	if m != want {
		t.Fatalf("nbdinfo --map:\n%s\nwant:\n%s", m, want)
	}
}

func TestQemuIO(t *testing.T) {
	e := newEnv(t, nil)
	out := runTool(t, "qemu-io", "-f", "raw",
		"-c", "write -P 0x5a 4096 64k",
		"-c", "read -P 0x5a 4096 64k",
		"-c", "write -z 8192 4k",
		"-c", "read -P 0 8192 4k",
		"-c", "discard 0 4k",
		"-c", "flush",
		"nbd://"+e.addr+"/disk")
	if strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("qemu-io: %s", out)
	}
	got := e.disk.bytes(4096, 64<<10)
	want := bytes.Repeat([]byte{0x5a}, 64<<10)
	clear(want[4096 : 4096+4096])
	mustEqual(t, "device after qemu-io", got, want)
	if e.disk.flushes.Load() == 0 {
		t.Fatalf("qemu-io flush did not reach the device")
	}
}

// runToolFail runs a tool that must fail, with env added to the
// environment, and returns its stderr.
func runToolFail(t *testing.T, env []string, name string, args ...string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("ROBIB_REQUIRE_TOOLS") == "1" {
			t.Fatalf("%s not installed (ROBIB_REQUIRE_TOOLS=1)", name)
		}
		t.Skipf("%s not installed", name)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.Env = append(os.Environ(), env...)
	if err := cmd.Run(); err == nil {
		t.Fatalf("%s %s succeeded:\n%s", name, strings.Join(args, " "), stdout.String())
	}
	return stderr.String()
}

// tlsToolEnv is a require-mode server whose Authorize records whether
// each peer used TLS and which client certificate it showed, and a
// GnuTLS certificate directory for client "alice".
func tlsToolEnv(t *testing.T) (e *testEnv, dir string, peers func() []string) {
	t.Helper()
	var mu sync.Mutex
	var seen []string
	e, pki, _ := newTLSEnv(t, TLSRequire, func(c *Config) {
		c.Authorize = func(p Peer, export string, op Op) error {
			mu.Lock()
			defer mu.Unlock()
			seen = append(seen, fmt.Sprintf("%s %q tls=%v client=%s", op, export, p.TLS != nil, clientName(p.TLS)))
			return nil
		}
	})
	dir = pki.gnutlsDir(t, pki.issue(t, "alice", false))
	return e, dir, func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), seen...)
	}
}

func checkTLSPeers(t *testing.T, peers []string) {
	t.Helper()
	if len(peers) == 0 {
		t.Fatal("the client never reached Authorize")
	}
	for _, p := range peers {
		if !strings.Contains(p, "tls=true") || !strings.Contains(p, "CN=alice") {
			t.Fatalf("peer %s did not use TLS with alice's certificate (all: %q)", p, peers)
		}
	}
}

// TestNbdinfoTLS: libnbd upgrades with NBD_OPT_STARTTLS and presents the
// client certificate; a plaintext libnbd is refused with the server's
// TLS-required message.
func TestNbdinfoTLS(t *testing.T) {
	e, dir, peers := tlsToolEnv(t)
	if _, err := e.disk.WriteAt(pattern(8192, 1), 16384); err != nil {
		t.Fatal(err)
	}
	uri := "nbds://" + e.addr + "/disk?tls-certificates=" + dir
	out := runTool(t, "nbdinfo", "--json", uri)
	var info struct {
		Protocol string `json:"protocol"`
		TLS      bool   `json:"TLS"`
		Exports  []struct {
			Name     string   `json:"export-name"`
			Size     int64    `json:"export-size"`
			Contexts []string `json:"contexts"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo output: %v\n%s", err, out)
	}
	if !info.TLS || len(info.Exports) != 1 || info.Exports[0].Name != "disk" || info.Exports[0].Size != testSize ||
		len(info.Exports[0].Contexts) != 1 || info.Exports[0].Contexts[0] != metaBaseAllocation {
		t.Fatalf("nbdinfo over TLS: %s", out)
	}
	// Structured replies and base:allocation negotiated under TLS work.
	want := "         0       16384    3  hole,zero\n     16384        8192    0  data\n     24576     1024000    3  hole,zero\n"
	if m := runTool(t, "nbdinfo", "--map", uri); m != want {
		t.Fatalf("nbdinfo --map over TLS:\n%s\nwant:\n%s", m, want)
	}
	list := runTool(t, "nbdinfo", "--list", "--json", "nbds://"+e.addr+"?tls-certificates="+dir)
	if !strings.Contains(list, `"export-name": "disk"`) || !strings.Contains(list, `"export-name": "ro"`) {
		t.Fatalf("nbdinfo --list over TLS: %s", list)
	}
	checkTLSPeers(t, peers())

	// Plaintext: every option is refused with NBD_REP_ERR_TLS_REQD and the
	// server's message (libnbd 1.14 shows it in its debug output and
	// reports NBD_OPT_GO failing with ENOTSUP, its code for TLS_REQD).
	msg := runToolFail(t, []string{"LIBNBD_DEBUG=1"}, "nbdinfo", "nbd://"+e.addr+"/disk")
	if !strings.Contains(msg, "server error message: this server requires TLS: send NBD_OPT_STARTTLS first") ||
		!strings.Contains(msg, "server replied with error to opt_go request: Operation not supported") {
		t.Fatalf("plaintext nbdinfo against a TLS-only server: %s", msg)
	}
	checkTLSPeers(t, peers()) // the plaintext client reached nothing
}

// TestQemuImgTLS: qemu's NBD client over TLS (GnuTLS x509 credentials)
// reads the right bytes; nbdcopy writes over TLS.
func TestQemuImgTLS(t *testing.T) {
	e, dir, peers := tlsToolEnv(t)
	_, port, _ := net.SplitHostPort(e.addr)
	want := pattern(testSize, 7)
	if _, err := e.disk.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	creds := "tls-creds-x509,id=tls0,dir=" + dir + ",endpoint=client"
	opts := "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=" + port + ",export=disk,tls-creds=tls0"
	out := runTool(t, "qemu-img", "info", "--output=json", "--object", creds, "--image-opts", opts)
	if !strings.Contains(out, fmt.Sprintf(`"virtual-size": %d`, testSize)) {
		t.Fatalf("qemu-img info over TLS: %s", out)
	}
	img := filepath.Join(t.TempDir(), "copy.raw")
	runTool(t, "qemu-img", "convert", "--object", creds, "--image-opts", opts, "-O", "raw", img)
	got, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "qemu-img convert over TLS", got, want)

	// A write path: nbdcopy from a local file to the export over TLS.
	src := filepath.Join(t.TempDir(), "src.raw")
	data := pattern(testSize, 42)
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	runTool(t, "nbdcopy", src, "nbds://"+e.addr+"/disk?tls-certificates="+dir)
	mustEqual(t, "device after nbdcopy over TLS", e.disk.bytes(0, testSize), data)
	checkTLSPeers(t, peers())

	// Without credentials qemu cannot get in, and shows the server's reason.
	msg := runToolFail(t, nil, "qemu-img", "info", "--image-opts",
		"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port="+port+",export=disk")
	if !strings.Contains(msg, "TLS negotiation required") || !strings.Contains(msg, "server reported: this server requires TLS") {
		t.Fatalf("plaintext qemu-img against a TLS-only server: %s", msg)
	}
}
