package nbdfront

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
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
