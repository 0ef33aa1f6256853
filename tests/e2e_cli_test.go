package tests

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/robib/robib/tests/harness"
)

type volumeJSON struct {
	Name      string    `json:"name"`
	Size      int64     `json:"size"`
	BlockSize int       `json:"block_size"`
	Created   time.Time `json:"created"`
}

func listVolumes(t *testing.T, a *harness.Agent) map[string]volumeJSON {
	t.Helper()
	out := a.MustCLI("volume", "list", "--json")
	var vols []volumeJSON
	if err := json.Unmarshal([]byte(out), &vols); err != nil {
		t.Fatalf("volume list --json: %v\n%s", err, out)
	}
	m := map[string]volumeJSON{}
	for _, v := range vols {
		if _, dup := m[v.Name]; dup {
			t.Fatalf("volume list --json lists %q twice:\n%s", v.Name, out)
		}
		m[v.Name] = v
	}
	return m
}

// cliMustFail runs the CLI and asserts a non-zero exit whose stderr matches
// every pattern (case-insensitive regexps); stdout must stay empty.
func cliMustFail(t *testing.T, a *harness.Agent, patterns []string, args ...string) {
	t.Helper()
	out, errOut, err := a.CLI(args...)
	if err == nil {
		t.Errorf("robib %q succeeded, want an error\nstdout: %s", args, out)
		return
	}
	if strings.TrimSpace(errOut) == "" {
		t.Errorf("robib %q failed (%v) without a message on stderr", args, err)
	}
	for _, p := range patterns {
		if !regexp.MustCompile("(?i)" + p).MatchString(errOut) {
			t.Errorf("robib %q: stderr %q does not match %q", args, strings.TrimSpace(errOut), p)
		}
	}
	if strings.Contains(errOut, "goroutine ") || strings.Contains(errOut, "panic") {
		t.Errorf("robib %q crashed:\n%s", args, errOut)
	}
}

func TestCLIVolumes(t *testing.T) {
	harness.RequireTool(t, "nbdinfo")
	a := startAgent(t)

	// Empty list, both formats.
	if out := strings.TrimSpace(a.MustCLI("volume", "list", "--json")); out != "[]" {
		t.Errorf("empty volume list --json = %q, want []", out)
	}
	if out := a.MustCLI("volume", "list"); !strings.Contains(out, "NAME") {
		t.Errorf("empty volume list has no header:\n%s", out)
	}

	out := a.MustCLI("volume", "create", "vol-a", "--size", "64MiB")
	if !strings.Contains(out, "vol-a") {
		t.Errorf("create output does not name the volume: %q", out)
	}
	a.MustCLI("volume", "create", "vol_b.2", "--size", "1G", "--block-size", "512")
	a.MustCLI("volume", "create", "Vol3", "--size", "4096KB") // decimal: 4,096,000 bytes
	a.MustCLI("volume", "create", "v4", "--size", "4096")

	want := map[string]volumeJSON{
		"vol-a":   {Size: 64 * MiB, BlockSize: 4096},
		"vol_b.2": {Size: 1 << 30, BlockSize: 512},
		"Vol3":    {Size: 4_096_000, BlockSize: 4096},
		"v4":      {Size: 4096, BlockSize: 4096},
	}
	vols := listVolumes(t, a)
	if len(vols) != len(want) {
		t.Fatalf("volume list --json = %+v, want %d volumes", vols, len(want))
	}
	for name, w := range want {
		v, ok := vols[name]
		if !ok {
			t.Errorf("volume %s missing from list", name)
			continue
		}
		if v.Size != w.Size || v.BlockSize != w.BlockSize {
			t.Errorf("volume %s: size %d block %d, want size %d block %d", name, v.Size, v.BlockSize, w.Size, w.BlockSize)
		}
		if v.Created.IsZero() || time.Since(v.Created) > time.Hour || time.Until(v.Created) > time.Minute {
			t.Errorf("volume %s: created %v is not now", name, v.Created)
		}
	}
	table := a.MustCLI("volume", "list")
	for _, re := range []string{`(?m)^NAME\s+SIZE\s+BLOCK SIZE\s.*CREATED`, `(?m)^vol-a\s+64MiB\s+4096\s`, `(?m)^vol_b\.2\s+1GiB\s+512\s`, `(?m)^Vol3\s+\S+\s+4096\s`, `(?m)^v4\s+4KiB\s+4096\s`} {
		if !regexp.MustCompile(re).MatchString(table) {
			t.Errorf("volume list table does not match %s:\n%s", re, table)
		}
	}

	// GET /v1/volumes/{name} agrees.
	resp, err := http.Get(a.APIURL() + "/v1/volumes/vol-a")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var got volumeJSON
	if resp.StatusCode != 200 || json.Unmarshal(body, &got) != nil || got.Size != 64*MiB {
		t.Errorf("GET /v1/volumes/vol-a = %s %s", resp.Status, body)
	}

	// Resize: grow and shrink; NBD clients see the new size.
	a.MustCLI("volume", "resize", "vol-a", "--size", "128MiB")
	if v := listVolumes(t, a)["vol-a"]; v.Size != 128*MiB {
		t.Errorf("after resize, size = %d, want %d", v.Size, 128*MiB)
	}
	if s := strings.TrimSpace(harness.MustRun(t, toolTimeout, "nbdinfo", "--size", a.NBDURI("vol-a"))); s != fmtSize(128*MiB) {
		t.Errorf("nbdinfo --size after grow = %s, want %d", s, 128*MiB)
	}
	a.MustCLI("volume", "resize", "vol-a", "--size", "32MiB")
	if s := strings.TrimSpace(harness.MustRun(t, toolTimeout, "nbdinfo", "--size", a.NBDURI("vol-a"))); s != fmtSize(32*MiB) {
		t.Errorf("nbdinfo --size after shrink = %s, want %d", s, 32*MiB)
	}

	// Delete: gone from the list and from NBD.
	out = a.MustCLI("volume", "delete", "Vol3")
	if !strings.Contains(out, "Vol3") {
		t.Errorf("delete output does not name the volume: %q", out)
	}
	if _, ok := listVolumes(t, a)["Vol3"]; ok {
		t.Error("Vol3 still listed after delete")
	}
	if r := harness.Run(t, toolTimeout, nil, "nbdinfo", "--no-content", a.NBDURI("Vol3")); r.Err == nil {
		t.Error("nbdinfo still opens Vol3 after delete")
	}
	// The name can be reused, and the new volume is empty.
	a.MustCLI("volume", "create", "Vol3", "--size", "1MiB")
	if harness.RequireTool(t, "qemu-io") != "" {
		mustQemuIO(t, a.NBDURI("Vol3"), "read -P 0 0 1M")
	}
}

func TestCLIErrors(t *testing.T) {
	a := startAgent(t, "exists", "1MiB")

	sizeErr := `size`
	for _, size := range []string{"", "abc", "-1", "10XB", "0", "1.5", "1.5B", "0x10", "9999999999999999999", "16EiB"} {
		cliMustFail(t, a, []string{sizeErr}, "volume", "create", "v", "--size="+size)
	}
	cliMustFail(t, a, []string{"size"}, "volume", "create", "v") // no --size
	cliMustFail(t, a, []string{"block"}, "volume", "create", "v", "--size", "1MiB", "--block-size", "3000")
	cliMustFail(t, a, []string{"exist"}, "volume", "create", "exists", "--size", "1MiB")
	for _, name := range []string{"../etc", "a/b", ".x", "..", "a b", strings.Repeat("x", 300), "-dash"} {
		// "-dash" is parsed as a flag by the CLI; it must fail either way.
		cliMustFail(t, a, nil, "volume", "create", "--size", "1MiB", "--", name)
	}
	for _, name := range []string{"../etc", "a/b", ".x"} {
		cliMustFail(t, a, []string{`name|invalid`}, "volume", "create", name, "--size", "1MiB")
	}
	cliMustFail(t, a, []string{"not found|no such|unknown"}, "volume", "delete", "ghost")
	cliMustFail(t, a, []string{"not found|no such|unknown"}, "volume", "resize", "ghost", "--size", "2MiB")
	cliMustFail(t, a, []string{"size"}, "volume", "resize", "exists", "--size", "abc")
	cliMustFail(t, a, []string{"size"}, "volume", "resize", "exists", "--size=0")
	cliMustFail(t, a, nil, "volume", "delete")                           // missing name
	cliMustFail(t, a, nil, "volume", "create", "a", "b", "--size", "1M") // too many names
	cliMustFail(t, a, nil, "volume", "frobnicate")
	cliMustFail(t, a, nil, "volume", "list", "--bogus-flag")

	// The failed attempts left nothing behind.
	vols := listVolumes(t, a)
	if len(vols) != 1 || vols["exists"].Size != MiB {
		t.Fatalf("volumes after failed commands = %+v, want only exists (1 MiB)", vols)
	}

	// An agent that is not there: a clear connection error.
	dead := harness.Run(t, time.Minute, nil, a.Bin, "--api", "http://"+harness.FreeAddr(t), "volume", "list")
	if dead.Err == nil || !regexp.MustCompile(`(?i)connect|refused|contact`).MatchString(dead.Stderr) {
		t.Errorf("volume list against no agent: %v, stderr %q", dead.Err, dead.Stderr)
	}
	bad := harness.Run(t, time.Minute, nil, a.Bin, "--api", "ftp://x", "volume", "list")
	if bad.Err == nil || strings.TrimSpace(bad.Stderr) == "" {
		t.Errorf("volume list with a bad --api: %v, stderr %q", bad.Err, bad.Stderr)
	}
}

// agentMustFail runs `robib agent args...` and asserts it exits non-zero
// promptly with stderr matching every pattern.
func agentMustFail(t *testing.T, env []string, patterns []string, args ...string) {
	t.Helper()
	bin := harness.Build(t)
	// Plaintext unless env says otherwise (the checks here are of other
	// settings; the TLS ones pass ROBIB_INSECURE=false).
	env = append([]string{"ROBIB_INSECURE=true"}, env...)
	r := harness.Run(t, 30*time.Second, env, bin, append([]string{"agent"}, args...)...)
	if r.Err == nil {
		t.Errorf("robib agent %q exited 0, want an error", args)
		return
	}
	if r.ExitCode <= 0 {
		t.Errorf("robib agent %q: %v (did it start serving instead of failing?)\nstderr: %s", args, r.Err, harness.Tail(r.Stderr, 10))
		return
	}
	for _, p := range patterns {
		if !regexp.MustCompile("(?i)" + p).MatchString(r.Stderr) {
			t.Errorf("robib agent %q: stderr %q does not match %q", args, strings.TrimSpace(r.Stderr), p)
		}
	}
	if strings.Contains(r.Stderr, "goroutine ") {
		t.Errorf("robib agent %q crashed:\n%s", args, r.Stderr)
	}
}

func TestAgentBadConfig(t *testing.T) {
	dir := t.TempDir()
	ok := func() []string {
		return []string{"--name", "s", "--data-dir", filepath.Join(dir, "d"), "--nbd-addr", harness.FreeAddr(t), "--api-addr", harness.FreeAddr(t),
			"--raft-addr", harness.FreeAddr(t), "--gossip-addr", harness.FreeAddr(t)}
	}
	with := func(args []string, kv ...string) []string {
		out := append([]string(nil), args...)
		for i := 0; i < len(kv); i += 2 {
			for j := 0; j < len(out); j += 2 {
				if out[j] == kv[i] {
					if kv[i+1] == "" {
						out = append(out[:j], out[j+2:]...)
					} else {
						out[j+1] = kv[i+1]
					}
					break
				}
			}
		}
		return out
	}

	agentMustFail(t, nil, []string{"data-dir"}, with(ok(), "--data-dir", "")...)
	agentMustFail(t, nil, []string{"nbd-addr"}, with(ok(), "--nbd-addr", "127.0.0.1")...)
	agentMustFail(t, nil, []string{"nbd-addr"}, with(ok(), "--nbd-addr", "127.0.0.1:99999")...)
	agentMustFail(t, nil, []string{"api-addr"}, with(ok(), "--api-addr", "nonsense")...)
	agentMustFail(t, nil, []string{"log"}, append(ok(), "--log-level", "loud")...)
	agentMustFail(t, nil, []string{"log-format|format"}, append(ok(), "--log-format", "xml")...)
	agentMustFail(t, nil, []string{"name"}, with(ok(), "--name", "bad/name")...)
	agentMustFail(t, nil, []string{"unknown flag"}, append(ok(), "--frobnicate")...)
	agentMustFail(t, nil, nil, append(ok(), "extra-arg")...)

	cfg := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(cfg, []byte("name: s\nbogus-key: 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	agentMustFail(t, nil, []string{"bogus-key"}, append(ok(), "--config", cfg)...)
	broken := filepath.Join(dir, "broken.yaml")
	if err := os.WriteFile(broken, []byte("name: [unterminated\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	agentMustFail(t, nil, []string{"broken.yaml"}, append(ok(), "--config", broken)...)
	agentMustFail(t, nil, []string{"missing.yaml"}, append(ok(), "--config", filepath.Join(dir, "missing.yaml"))...)
	// Bad values from the environment are reported like flags.
	agentMustFail(t, []string{"ROBIB_LOG_LEVEL=chatty"}, []string{"log"}, ok()...)
	agentMustFail(t, []string{"ROBIB_NBD_ADDR=nope"}, []string{"nbd-addr"}, with(ok(), "--nbd-addr", "")...)

	// A data dir that is a file.
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	agentMustFail(t, nil, []string{"file|director|not a dir"}, with(ok(), "--data-dir", file)...)

	// A port that is taken.
	a := startAgent(t)
	agentMustFail(t, nil, []string{"address already in use|bind"}, with(ok(), "--nbd-addr", a.NBDAddr)...)
	agentMustFail(t, nil, []string{"address already in use|bind"}, with(ok(), "--api-addr", a.APIAddr)...)

	// Secure by default: no TLS files and no --insecure, half the TLS
	// files, both, or files that are not what they say.
	tls := []string{"ROBIB_INSECURE=false"}
	agentMustFail(t, tls, []string{"tls-ca is required", "--insecure"}, ok()...)
	notPEM := writeFile(t, dir, "not.pem", []byte("not a certificate"))
	agentMustFail(t, tls, []string{"tls-cert|tls-key"}, append(ok(), "--tls-ca", notPEM)...)
	agentMustFail(t, nil, []string{"insecure"}, append(ok(), "--tls-ca", notPEM, "--tls-cert", notPEM, "--tls-key", notPEM)...)
	agentMustFail(t, tls, []string{"gossip-key is required"}, append(ok(), "--tls-ca", notPEM, "--tls-cert", notPEM, "--tls-key", notPEM)...)
	key := writeFile(t, dir, "gossip.key", []byte("bm90IGEga2V5\n"))
	agentMustFail(t, tls, []string{"gossip"}, append(ok(), "--tls-ca", notPEM, "--tls-cert", notPEM, "--tls-key", notPEM, "--gossip-key", key)...)
	goodKey := writeFile(t, dir, "good.key", []byte("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n"))
	agentMustFail(t, tls, []string{"not.pem"}, append(ok(), "--tls-ca", notPEM, "--tls-cert", notPEM, "--tls-key", notPEM, "--gossip-key", goodKey)...)
	agentMustFail(t, nil, []string{"nbd-tls"}, append(ok(), "--nbd-tls", "require")...)
	agentMustFail(t, nil, []string{"nbd-tls"}, append(ok(), "--nbd-tls", "maybe")...)
	agentMustFail(t, nil, []string{"nbd-tls-verify-peer"}, append(ok(), "--nbd-tls-verify-peer")...)
	if err := a.Health(); err != nil {
		t.Fatalf("the running agent was disturbed: %v", err)
	}
}

// TestAgentConfigSources starts agents configured only through ROBIB_*
// variables, only through a YAML file, and through both with flags on top.
func TestAgentConfigSources(t *testing.T) {
	t.Run("env", func(t *testing.T) {
		dataDir := filepath.Join(t.TempDir(), "envdata")
		nbdAddr, apiAddr := harness.FreeAddr(t), harness.FreeAddr(t)
		a := harness.StartAgent(t, harness.Options{Bare: true, Name: "envsite", Env: []string{
			"ROBIB_NAME=envsite", "ROBIB_DATA_DIR=" + dataDir, "ROBIB_NBD_ADDR=" + nbdAddr,
			"ROBIB_API_ADDR=" + apiAddr, "ROBIB_LOG_LEVEL=debug",
			"ROBIB_RAFT_ADDR=" + harness.FreeAddr(t), "ROBIB_GOSSIP_ADDR=" + harness.FreeAddr(t),
		}})
		checkAgentAt(t, a, "envsite", dataDir, nbdAddr, apiAddr)
		if !strings.Contains(a.Logs(), "level=DEBUG") {
			t.Errorf("ROBIB_LOG_LEVEL=debug: no debug lines in the log")
		}
	})
	t.Run("yaml", func(t *testing.T) {
		dir := t.TempDir()
		dataDir := filepath.Join(dir, "yamldata")
		nbdAddr, apiAddr := harness.FreeAddr(t), harness.FreeAddr(t)
		cfg := filepath.Join(dir, "robib.yaml")
		writeFile(t, dir, "robib.yaml", []byte(fmt.Sprintf(
			"# robib agent config\nname: yamlsite\ndata-dir: %s\nnbd-addr: %q\napi-addr: %q\nraft-addr: %q\ngossip-addr: %q\nlog-level: warn\nlog-format: json\n",
			dataDir, nbdAddr, apiAddr, harness.FreeAddr(t), harness.FreeAddr(t))))
		// At level warn the agent does not log that it serves: the harness
		// waits on the health endpoint of the addresses it was told.
		a := harness.StartAgent(t, harness.Options{Bare: true, Name: "yamlsite", NBDAddr: nbdAddr, APIAddr: apiAddr,
			ExtraArgs: []string{"--config", cfg}})
		checkAgentAt(t, a, "yamlsite", dataDir, nbdAddr, apiAddr)
	})
	t.Run("precedence", func(t *testing.T) {
		// File < environment < flags.
		dir := t.TempDir()
		fileData := filepath.Join(dir, "filedata")
		envAPI, flagNBD := harness.FreeAddr(t), harness.FreeAddr(t)
		cfg := filepath.Join(dir, "robib.yaml")
		writeFile(t, dir, "robib.yaml", []byte(fmt.Sprintf(
			"name: filesite\ndata-dir: %s\nnbd-addr: %q\napi-addr: %q\nraft-addr: %q\ngossip-addr: %q\n",
			fileData, harness.FreeAddr(t), harness.FreeAddr(t), harness.FreeAddr(t), harness.FreeAddr(t))))
		a := harness.StartAgent(t, harness.Options{Bare: true, Name: "flagsite",
			Env:       []string{"ROBIB_CONFIG=" + cfg, "ROBIB_API_ADDR=" + envAPI, "ROBIB_NAME=envsite"},
			ExtraArgs: []string{"--nbd-addr", flagNBD, "--name", "flagsite"},
		})
		checkAgentAt(t, a, "flagsite", fileData, flagNBD, envAPI)
	})
}

// checkAgentAt asserts an agent serves at the given addresses and keeps its
// volumes in dataDir.
func checkAgentAt(t *testing.T, a *harness.Agent, name, dataDir, nbdAddr, apiAddr string) {
	t.Helper()
	if a.NBDAddr != nbdAddr || a.APIAddr != apiAddr {
		t.Errorf("agent serves nbd=%s api=%s, want nbd=%s api=%s", a.NBDAddr, a.APIAddr, nbdAddr, apiAddr)
	}
	if err := a.Health(); err != nil {
		t.Fatalf("health: %v", err)
	}
	resp, err := http.Get(a.APIURL() + "/v1/cluster/status")
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Sites []struct {
			Name string `json:"name"`
		} `json:"sites"`
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err := json.Unmarshal(body, &st); err != nil || len(st.Sites) != 1 || st.Sites[0].Name != name {
		t.Errorf("cluster status = %s (%v), want one site named %q", body, err, name)
	}
	a.CreateVolume("cfgvol", "1MiB")
	found := false
	filepath.WalkDir(dataDir, func(p string, d os.DirEntry, err error) error {
		if err == nil && strings.Contains(d.Name(), "cfgvol") {
			found = true
		}
		return nil
	})
	if !found {
		t.Errorf("no file named after volume cfgvol under the configured data dir %s", dataDir)
	}
	if harness.RequireTool(t, "nbdinfo") != "" {
		harness.MustRun(t, toolTimeout, "nbdinfo", "--size", "nbd://"+nbdAddr+"/cfgvol")
	}
}
