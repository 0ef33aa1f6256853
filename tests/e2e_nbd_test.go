package tests

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/robib/robib/tests/harness"
)

// TestNBDInfo checks what libnbd's nbdinfo sees of robib's exports: sizes,
// transmission flags, block size constraints, the export list, and a clean
// failure for names that do not exist.
func TestNBDInfo(t *testing.T) {
	harness.RequireTool(t, "nbdinfo")
	a := startAgent(t, "alpha", "64MiB")
	a.CreateVolume("beta", "100MiB", "--block-size", "8192")
	a.CreateVolume("gamma", "1028KiB") // not a power of two

	for _, tc := range []struct {
		name      string
		size      int64
		blockSize int64
	}{
		{"alpha", 64 * MiB, 4096},
		{"beta", 100 * MiB, 8192},
		{"gamma", 1028 * KiB, 4096},
	} {
		t.Run(tc.name, func(t *testing.T) {
			info := nbdinfoJSON(t, "--no-content", a.NBDURI(tc.name))
			if info.Protocol != "newstyle-fixed" {
				t.Errorf("protocol = %q, want newstyle-fixed", info.Protocol)
			}
			if len(info.Exports) != 1 {
				t.Fatalf("nbdinfo reported %d exports, want 1: %+v", len(info.Exports), info.Exports)
			}
			e := info.Exports[0]
			if got := e["export-name"]; got != tc.name {
				t.Errorf("export-name = %v, want %s", got, tc.name)
			}
			if got := num(e["export-size"]); got != tc.size {
				t.Errorf("export-size = %d, want %d", got, tc.size)
			}
			for flag, want := range map[string]bool{
				"can_flush": true, "can_fua": true, "can_trim": true, "can_zero": true,
				"can_fast_zero": true, "can_multi_conn": true, "is_read_only": false,
			} {
				got, ok := e[flag].(bool)
				if !ok || got != want {
					t.Errorf("%s = %v, want %v", flag, e[flag], want)
				}
			}
			if ctxs, _ := e["contexts"].([]any); !slices.Contains(ctxs, any("base:allocation")) {
				t.Errorf("contexts = %v, want base:allocation among them", e["contexts"])
			}
			minB, prefB, maxB := num(e["block_size_minimum"]), num(e["block_size_preferred"]), num(e["block_size_maximum"])
			if minB != 1 {
				t.Errorf("block_size_minimum = %d, want 1", minB)
			}
			if prefB != tc.blockSize {
				t.Errorf("block_size_preferred = %d, want the volume block size %d", prefB, tc.blockSize)
			}
			if maxB < prefB || maxB < 64*KiB || maxB > 1<<30 {
				t.Errorf("block_size_maximum = %d, want in [max(pref, 64KiB), 1GiB]", maxB)
			}
		})
	}

	t.Run("list", func(t *testing.T) {
		info := nbdinfoJSON(t, "--list", "nbd://"+a.NBDAddr)
		var names []string
		for _, e := range info.Exports {
			names = append(names, fmt.Sprint(e["export-name"]))
		}
		slices.Sort(names)
		if want := []string{"alpha", "beta", "gamma"}; !slices.Equal(names, want) {
			t.Fatalf("nbdinfo --list exports = %v, want %v", names, want)
		}
	})

	t.Run("size", func(t *testing.T) {
		out := strings.TrimSpace(harness.MustRun(t, toolTimeout, "nbdinfo", "--size", a.NBDURI("beta")))
		if out != strconv.Itoa(100*MiB) {
			t.Fatalf("nbdinfo --size = %q, want %d", out, 100*MiB)
		}
	})

	t.Run("unknown-export", func(t *testing.T) {
		for _, name := range []string{"nope", "alph", "alpha%2Fx", ""} {
			r := harness.Run(t, toolTimeout, nil, "nbdinfo", "--no-content", a.NBDURI(name))
			if r.Err == nil {
				t.Errorf("nbdinfo on unknown export %q succeeded:\n%s", name, r.Stdout)
				continue
			}
			if r.ExitCode != 1 || strings.TrimSpace(r.Stderr) == "" {
				t.Errorf("nbdinfo on unknown export %q: exit %d (want 1) with stderr %q", name, r.ExitCode, r.Stderr)
			}
			if strings.Contains(r.Stderr, "handshake") && strings.Contains(r.Stderr, "EOF") {
				t.Errorf("unknown export %q made the server drop the connection instead of an error reply: %s", name, r.Stderr)
			}
		}
		// The server is still fine.
		nbdinfoJSON(t, "--no-content", a.NBDURI("alpha"))
	})
}

func num(v any) int64 {
	switch x := v.(type) {
	case float64:
		return int64(x)
	case json.Number:
		n, _ := x.Int64()
		return n
	}
	return -1
}

// TestNBDCopy copies random data in and out with nbdcopy (several
// connections, large requests, zero detection) and compares byte for byte.
func TestNBDCopy(t *testing.T) {
	harness.RequireTool(t, "nbdcopy")
	const size = 32 * MiB
	a := startAgent(t, "copy", "32MiB")
	dir := t.TempDir()

	// Round 1: random data everywhere.
	first := randomBytes(1, size)
	nbdcopyIn(t, writeFile(t, dir, "first.img", first), a.NBDURI("copy"))
	got := nbdcopyOut(t, a.NBDURI("copy"))
	assertSameBytes(t, "nbdcopy round trip", got, first)

	// Round 2: new data with a zero run in the middle and at the end; nbdcopy
	// sends those as zero/trim requests, which must overwrite round 1's data.
	second := randomBytes(2, size)
	clear(second[5*MiB : 9*MiB])
	clear(second[size-3*MiB-123:])
	nbdcopyIn(t, writeFile(t, dir, "second.img", second), a.NBDURI("copy"))
	got = nbdcopyOut(t, a.NBDURI("copy"))
	assertSameBytes(t, "nbdcopy with zero runs", got, second)

	// Round 3: a single connection with small requests, read back with
	// qemu-img compare (another client implementation).
	third := randomBytes(3, size)
	src := writeFile(t, dir, "third.img", third)
	nbdcopyIn(t, src, a.NBDURI("copy"), "--connections=1", "--request-size=65536", "--requests=4")
	if harness.RequireTool(t, "qemu-img") != "" {
		r := harness.Run(t, toolTimeout, nil, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, a.NBDURI("copy"))
		if r.Err != nil {
			t.Fatalf("qemu-img compare: %v\n%s%s", r.Err, r.Stdout, r.Stderr)
		}
	}
	if s := sha256Hex(nbdcopyOut(t, a.NBDURI("copy"))); s != sha256File(t, src) {
		t.Fatalf("sha256 after single-connection copy = %s, want %s", s, sha256Hex(third))
	}
}

// TestQemuIO drives the export with qemu's NBD client: plain and vectored
// writes, asynchronous writes, write-zeroes, discard, FUA and flush, each
// checked with qemu-io's pattern verification.
func TestQemuIO(t *testing.T) {
	harness.RequireTool(t, "qemu-io")
	a := startAgent(t, "qio", "64MiB")
	uri := a.NBDURI("qio")

	mustQemuIO(t, uri,
		"write -P 0xab 0 1M",
		"read -P 0xab 0 1M",
		"write -P 0x11 1M 1M",
		"write -z 1M 512k", // write-zeroes over half of it
		"read -P 0 1M 512k",
		"read -P 0x11 1536k 512k",
		"write -z -u 2M 1M", // write-zeroes that may unmap
		"write -P 0x12 2M 64k",
		"write -z -n 2M 64k", // fast zero (NBD_CMD_FLAG_FAST_ZERO)
		"read -P 0 2M 1M",
		"write -P 0x22 3M 1M",
		"discard 3M 1M",
		"write -P 0x33 3M 4k",
		"read -P 0x33 3M 4k",
		"aio_write -P 0xcd 4M 64k 64k",
		"aio_write -P 0xce 5M 4k",
		"aio_write -P 0xcf 6M 1M",
		"aio_flush",
		"read -P 0xcd 4M 128k",
		"read -P 0xce 5M 4k",
		"read -P 0xcf 6M 1M",
		"writev -P 0x44 8M 4k 60k 1k 3k",
		"readv -P 0x44 8M 4k 64k",
		"write -f -P 0x55 10M 4k", // FUA
		"write -P 0x66 63M 1M",    // last MiB
		"read -P 0x66 63M 1M",
		"write -P 0x77 12345 777", // unaligned
		"read -P 0x77 12345 777",
		"read -P 0xab 0 12345",
		"flush",
	)
	// A second qemu-io process (a new connection, via --image-opts) sees it all.
	r := harness.Run(t, toolTimeout, nil, "qemu-io", "--image-opts",
		"-c", "read -P 0xab 0 12345",
		"-c", "read -P 0x77 12345 777",
		"-c", "read -P 0 1M 512k",
		"-c", "read -P 0x33 3M 4k",
		"-c", "read -P 0xcf 6M 1M",
		"-c", "read -P 0x55 10M 4k",
		"-c", "read -P 0x66 63M 1M",
		fmt.Sprintf("driver=nbd,host=127.0.0.1,port=%s,export=qio", a.NBDPort()))
	if out := r.Stdout + r.Stderr; r.Err != nil || strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("second connection: %v\n%s", r.Err, out)
	}

	// The check is real: a wrong expected pattern fails.
	out, ok := qemuIO(t, uri, "read -P 0xac 0 1M")
	if ok || !strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("qemu-io accepted a wrong pattern (the checks above prove nothing):\n%s", out)
	}
	// Beyond the end is refused by qemu itself; the export is still usable.
	out, ok = qemuIO(t, uri, "read 64M 4k")
	if ok {
		t.Fatalf("qemu-io read past the end succeeded:\n%s", out)
	}
	mustQemuIO(t, uri, "read -P 0x66 63M 1M")
}

// TestFio runs fio's libnbd engine with several jobs (one connection each),
// a deep queue and mixed block sizes, verifying every block it wrote; then
// verifies again from new connections, and proves the verification is real
// by corrupting one block.
func TestFio(t *testing.T) {
	harness.RequireTool(t, "fio")
	a := startAgent(t, "fio", "64MiB")
	dir := t.TempDir()
	common := []string{
		"--name=e2e", "--ioengine=nbd", "--uri=" + a.NBDURI("fio"),
		"--rw=randwrite", "--bsrange=4k-64k", "--numjobs=4", "--iodepth=16",
		"--size=16M", "--offset_increment=16M", // each job owns 16 MiB
		"--verify=crc32c", "--randrepeat=1", "--output-format=json",
		"--verify_state_save=0", // no *.state files in the source tree on failure
	}
	run := func(name string, extra ...string) (fioOutput, harness.Result) {
		out := filepath.Join(dir, name+".json")
		r := harness.Run(t, toolTimeout, nil, "fio", append(append(slices.Clone(common), extra...), "--output="+out)...)
		var res fioOutput
		if b, err := os.ReadFile(out); err == nil {
			if err := json.Unmarshal(b, &res); err != nil && r.Err == nil {
				t.Fatalf("fio %s JSON: %v\n%s", name, err, b)
			}
		}
		return res, r
	}

	res, r := run("write", "--do_verify=1", "--verify_fatal=1")
	if r.Err != nil {
		t.Fatalf("fio write+verify: %v\n%s\n%s", r.Err, r.Stdout, r.Stderr)
	}
	if len(res.Jobs) != 4 {
		t.Fatalf("fio reported %d jobs, want 4", len(res.Jobs))
	}
	for _, j := range res.Jobs {
		if j.Error != 0 {
			t.Errorf("fio job %s: error %d", j.Name, j.Error)
		}
		if j.Write.IOBytes < 16*MiB {
			t.Errorf("fio job %s wrote %d bytes, want >= 16 MiB", j.Name, j.Write.IOBytes)
		}
		if j.Read.IOBytes < 16*MiB {
			t.Errorf("fio job %s verified (read) %d bytes, want >= 16 MiB", j.Name, j.Read.IOBytes)
		}
	}
	if strings.Contains(r.Stdout+r.Stderr, "verify:") {
		t.Fatalf("fio reported verify problems:\n%s\n%s", r.Stdout, r.Stderr)
	}

	// Verify only, from four new connections.
	res, r = run("verify", "--verify_only=1")
	if r.Err != nil {
		t.Fatalf("fio verify_only: %v\n%s\n%s", r.Err, r.Stdout, r.Stderr)
	}
	var read int64
	for _, j := range res.Jobs {
		read += j.Read.IOBytes
	}
	if read < 64*MiB {
		t.Fatalf("fio verify_only read %d bytes, want 64 MiB", read)
	}

	// Negative control: overwrite one block in job 1's range; verification
	// must now fail.
	if harness.RequireTool(t, "qemu-io") != "" {
		mustQemuIO(t, a.NBDURI("fio"), "write -P 0 20M 4k", "flush")
		_, r = run("corrupt", "--verify_only=1")
		if r.Err == nil {
			t.Fatalf("fio verify passed after a block was overwritten: the verification proves nothing\n%s", r.Stdout)
		}
		if !strings.Contains(r.Stdout+r.Stderr, "verify") {
			t.Fatalf("fio failed, but not with a verify error: %v\n%s\n%s", r.Err, r.Stdout, r.Stderr)
		}
	}
}

type fioOutput struct {
	Jobs []struct {
		Name  string `json:"jobname"`
		Error int    `json:"error"`
		Read  fioIO  `json:"read"`
		Write fioIO  `json:"write"`
	} `json:"jobs"`
}

type fioIO struct {
	IOBytes int64 `json:"io_bytes"`
}

// TestLibnbdPython runs the checks in testdata/nbd_checks.py with libnbd's
// Python bindings: block status after trim, write-zeroes flags, FUA,
// multi-connection consistency, and out-of-range requests.
func TestLibnbdPython(t *testing.T) {
	py := harness.RequireTool(t, "python3-nbd")
	a := startAgent(t, "other", "8MiB")
	script, err := filepath.Abs("testdata/nbd_checks.py")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []string{"block_status", "zero", "fua", "multi_conn", "aio", "out_of_range", "model", "reconnect"} {
		t.Run(c, func(t *testing.T) {
			vol := strings.ReplaceAll(c, "_", "-")
			a.CreateVolume(vol, "48MiB") // a fresh volume per case
			r := harness.Run(t, toolTimeout, nil, py, script, c, a.NBDURI(vol), a.NBDURI("other"))
			if r.Err != nil || !strings.Contains(r.Stdout, "PASS "+c) {
				t.Fatalf("%s: %v\nstdout:\n%s\nstderr:\n%s", c, r.Err, r.Stdout, r.Stderr)
			}
			t.Log(strings.TrimSpace(r.Stdout))
		})
	}
	if err := a.Health(); err != nil {
		t.Fatalf("agent unhealthy after the checks: %v", err)
	}
}

// TestRestartKeepsData writes with nbdcopy, flushes, SIGKILLs the agent,
// restarts it and reads everything back; then the same with a graceful stop.
func TestRestartKeepsData(t *testing.T) {
	harness.RequireTool(t, "nbdcopy")
	a := startAgent(t, "keep", "48MiB", "other", "4MiB")
	dir := t.TempDir()
	data := randomBytes(42, 40*MiB)
	clear(data[10*MiB : 12*MiB])
	want := append(slices.Clone(data), make([]byte, 8*MiB)...)
	nbdcopyIn(t, writeFile(t, dir, "keep.img", data), a.NBDURI("keep"))
	a.MustCLI("volume", "resize", "other", "--size", "6MiB")

	a.KillAndRestart()
	assertSameBytes(t, "after SIGKILL and restart", nbdcopyOut(t, a.NBDURI("keep")), want)
	vols := listVolumes(t, a)
	if len(vols) != 2 || vols["keep"].Size != 48*MiB || vols["other"].Size != 6*MiB {
		t.Fatalf("volumes after restart = %+v, want keep 48MiB and other 6MiB", vols)
	}

	// Overwrite part of it, then a graceful restart.
	patch := randomBytes(43, 3*MiB)
	copy(want[20*MiB:], patch)
	if harness.RequireTool(t, "qemu-io") != "" {
		p := writeFile(t, dir, "patch.img", patch)
		mustQemuIO(t, a.NBDURI("keep"), "write -s "+p+" 20M 3M", "flush")
	}
	a.Restart()
	assertSameBytes(t, "after graceful restart", nbdcopyOut(t, a.NBDURI("keep")), want)
}
