package tests

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/robib/robib/tests/harness"
)

// Helpers of the multi-site tests (cluster_*_test.go).

// clusterWait bounds the waits of the cluster tests (leader, catch-up).
const clusterWait = 90 * time.Second

func requireTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		harness.RequireTool(t, tool)
	}
}

// others returns the running agents of c except the given ones.
func others(c *harness.Cluster, except ...*harness.Agent) []*harness.Agent {
	var out []*harness.Agent
outer:
	for _, a := range c.Running() {
		for _, e := range except {
			if a == e {
				continue outer
			}
		}
		out = append(out, a)
	}
	return out
}

// waitVolumeEverywhere waits until every running site lists the volume with
// the given size.
func waitVolumeEverywhere(t *testing.T, c *harness.Cluster, name string, size int64) {
	t.Helper()
	for _, a := range c.Running() {
		harness.WaitFor(t, clusterWait, fmt.Sprintf("volume %s listed at %s", name, a.Name), func() (bool, error) {
			out, errOut, err := a.CLI("volume", "list", "--json")
			if err != nil {
				return false, fmt.Errorf("%v: %s", err, errOut)
			}
			var vols []volumeJSON
			if err := json.Unmarshal([]byte(out), &vols); err != nil {
				return false, err
			}
			for _, v := range vols {
				if v.Name == name {
					if v.Size != size {
						return false, fmt.Errorf("%s lists %s with size %d, want %d", a.Name, name, v.Size, size)
					}
					return true, nil
				}
			}
			return false, fmt.Errorf("%s does not list %s: %s", a.Name, name, out)
		})
	}
}

// verifyReport is `robib volume verify --json`.
type verifyReport struct {
	Volume      string            `json:"volume"`
	Size        int64             `json:"size"`
	ChunkSize   int64             `json:"chunk_size"`
	Chunks      int               `json:"chunks"`
	Sites       []string          `json:"sites"`
	Unreachable map[string]string `json:"unreachable"`
	Partial     []string          `json:"partial"`
	Mismatches  []struct {
		Offset int64             `json:"offset"`
		Length int64             `json:"length"`
		Hashes map[string]string `json:"hashes"`
	} `json:"mismatches"`
	OK bool `json:"ok"`
}

// verifyVolume runs `robib volume verify NAME --json -q` at a and returns
// the report and the exit code.
func verifyVolume(t *testing.T, a *harness.Agent, name string) (verifyReport, int) {
	t.Helper()
	r := harness.Run(t, 5*time.Minute, a.CLIEnv(), a.Bin, "--api", a.APIURL(), "volume", "verify", name, "--json", "-q")
	var rep verifyReport
	if err := json.Unmarshal([]byte(r.Stdout), &rep); err != nil {
		t.Fatalf("volume verify %s --json at %s (exit %d): unreadable output: %v\nstdout: %s\nstderr: %s", name, a.Name, r.ExitCode, err, r.Stdout, r.Stderr)
	}
	return rep, r.ExitCode
}

// mustVerify asserts that `volume verify` exits 0 and compared exactly the
// given number of sites with no mismatch.
func mustVerify(t *testing.T, a *harness.Agent, name string, sites int) verifyReport {
	t.Helper()
	rep, code := verifyVolume(t, a, name)
	if code != 0 || !rep.OK || len(rep.Sites) != sites || len(rep.Mismatches) != 0 || len(rep.Unreachable) != 0 || len(rep.Partial) != 0 {
		t.Fatalf("volume verify %s at %s: exit %d, want 0 with %d sites identical: %+v", name, a.Name, code, sites, rep)
	}
	if want := int((rep.Size + rep.ChunkSize - 1) / rep.ChunkSize); rep.Chunks != want {
		t.Fatalf("volume verify %s compared %d chunks, want %d", name, rep.Chunks, want)
	}
	return rep
}

// nbdWrite is one write of a plan: Len bytes of the source file at SrcOff
// go to Off.
type nbdWrite struct{ Off, Len, SrcOff int64 }

// nbdPlanScript writes a plan through libnbd's Python bindings: pwrite per
// entry, an NBD FLUSH after each one when asked, and always a final flush.
// It prints the number of flushes done.
const nbdPlanScript = `
import json, sys, nbd
uri, src_path, plan_path, flush_each = sys.argv[1:5]
h = nbd.NBD()
h.connect_uri(uri)
assert h.can_flush(), "server does not offer FLUSH"
src = open(src_path, "rb").read()
plan = json.load(open(plan_path))
flushes = 0
for off, n, soff in plan:
    h.pwrite(src[soff:soff + n], off)
    if flush_each == "1":
        h.flush()
        flushes += 1
h.flush()
flushes += 1
h.shutdown()
print(flushes)
`

// runNBDPlan applies plan to the export at uri with python libnbd, taking
// the data from src, and applies the same writes to model.
func runNBDPlan(t *testing.T, uri string, src []byte, plan []nbdWrite, flushEach bool, model []byte) {
	t.Helper()
	dir := t.TempDir()
	srcPath := writeFile(t, dir, "src.bin", src)
	rows := make([][3]int64, len(plan))
	for i, w := range plan {
		rows[i] = [3]int64{w.Off, w.Len, w.SrcOff}
		copy(model[w.Off:w.Off+w.Len], src[w.SrcOff:w.SrcOff+w.Len])
	}
	pj, _ := json.Marshal(rows)
	planPath := writeFile(t, dir, "plan.json", pj)
	fe := "0"
	if flushEach {
		fe = "1"
	}
	out := harness.MustRun(t, 5*time.Minute, harness.SystemPython, "-c", nbdPlanScript, uri, srcPath, planPath, fe)
	want := 1
	if flushEach {
		want += len(plan)
	}
	if n, _ := strconv.Atoi(strings.TrimSpace(out)); n != want {
		t.Fatalf("nbd plan script reported %q flushes, want %d", out, want)
	}
}

// sequentialPlan covers [0, size) in chunks of chunk bytes, data from the
// same offsets of the source.
func sequentialPlan(size, chunk int64) []nbdWrite {
	var p []nbdWrite
	for off := int64(0); off < size; off += chunk {
		p = append(p, nbdWrite{Off: off, Len: min(chunk, size-off), SrcOff: off})
	}
	return p
}

// assertExportEquals reads the whole export with nbdcopy and compares it
// with want byte for byte.
func assertExportEquals(t *testing.T, a *harness.Agent, vol string, want []byte) {
	t.Helper()
	got := nbdcopyOut(t, a.NBDURI(vol))
	assertSameBytes(t, fmt.Sprintf("volume %s read back at %s", vol, a.Name), got, want)
}

// volumeDataFile is where a site keeps a volume's bytes.
func volumeDataFile(a *harness.Agent, vol string) string {
	return filepath.Join(a.DataDir, "volumes", vol, "data")
}

var stateLoadedRe = regexp.MustCompile(`msg="fsm: state loaded".* applied=(\d+)`)

// stateLoadedIndex returns the applied index the agent's current process
// loaded from its FSM state file at start-up.
func stateLoadedIndex(t *testing.T, a *harness.Agent) uint64 {
	t.Helper()
	m := stateLoadedRe.FindStringSubmatch(a.CurrentLog())
	if m == nil {
		t.Fatalf("%s: no 'fsm: state loaded' line in the log of its current process", a.Name)
	}
	n, _ := strconv.ParseUint(m[1], 10, 64)
	return n
}

// fileSize returns the size of path, or -1.
func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return -1
	}
	return fi.Size()
}

// stopwatch returns a function that logs a step with the time since the
// stopwatch started, so slow steps show in -v output.
func stopwatch(t *testing.T) func(step string) {
	start := time.Now()
	return func(step string) {
		t.Helper()
		t.Logf("[%6.2fs] %s", time.Since(start).Seconds(), step)
	}
}
