package tests

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/robib/robib/tests/harness"
)

// fuseDisk is an export attached as a kernel block device: nbdfuse exposes
// it as a file, and a loop device sits on that file; the file system on it
// may be mounted.
type fuseDisk struct {
	t        *testing.T
	fuseDir  string // nbdfuse mount point; the file is fuseDir/disk
	mountDir string
	loop     string
	nbdfuse  *exec.Cmd
	done     chan struct{}
	mu       sync.Mutex
	mounted  bool
}

// sys runs a system command with a timeout and returns its combined output
// and error.
func sys(timeout time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("timed out after %v: %v", timeout, err)
	}
	return string(out), err
}

func mustSys(t *testing.T, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	out, err := sys(timeout, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// isMountPoint reports whether dir is a mount point (per /proc/self/mountinfo).
func isMountPoint(dir string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

// attachFuseDisk starts nbdfuse for uri and puts a loop device on its file.
// Detach (also run at cleanup, even after a failure) undoes it all.
func attachFuseDisk(t *testing.T, uri string, size int64) *fuseDisk {
	t.Helper()
	base := t.TempDir()
	d := &fuseDisk{t: t, fuseDir: filepath.Join(base, "fuse"), mountDir: filepath.Join(base, "mnt"), done: make(chan struct{})}
	for _, dir := range []string{d.fuseDir, d.mountDir} {
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	logPath := filepath.Join(base, "nbdfuse.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	d.nbdfuse = exec.Command("nbdfuse", filepath.Join(d.fuseDir, "disk"), uri)
	d.nbdfuse.Stdout, d.nbdfuse.Stderr = logf, logf
	if err := d.nbdfuse.Start(); err != nil {
		logf.Close()
		t.Fatalf("starting nbdfuse: %v", err)
	}
	go func() {
		d.nbdfuse.Wait()
		logf.Close()
		close(d.done)
	}()
	t.Cleanup(d.Detach)
	disk := filepath.Join(d.fuseDir, "disk")
	harness.WaitFor(t, 30*time.Second, "nbdfuse to expose "+disk, func() (bool, error) {
		select {
		case <-d.done:
			log, _ := os.ReadFile(logPath)
			t.Fatalf("nbdfuse exited early: %v\n%s", d.nbdfuse.ProcessState, log)
		default:
		}
		fi, err := os.Stat(disk)
		if err != nil {
			return false, err
		}
		if fi.Size() != size {
			return false, fmt.Errorf("%s has size %d, want %d", disk, fi.Size(), size)
		}
		return true, nil
	})
	d.loop = strings.TrimSpace(mustSys(t, time.Minute, "losetup", "--find", "--show", disk))
	return d
}

func (d *fuseDisk) Mount() {
	d.t.Helper()
	mustSys(d.t, time.Minute, "mount", "-t", "ext4", d.loop, d.mountDir)
	d.mu.Lock()
	d.mounted = true
	d.mu.Unlock()
}

func (d *fuseDisk) Unmount() {
	d.t.Helper()
	mustSys(d.t, time.Minute, "sync", "-f", d.mountDir)
	mustSys(d.t, time.Minute, "umount", d.mountDir)
	d.mu.Lock()
	d.mounted = false
	d.mu.Unlock()
}

// Detach unmounts, removes the loop device, unmounts the FUSE file system
// and waits for nbdfuse to exit, escalating (lazy unmount, kill) when the
// gentle way fails. It reports what it had to force. Safe to call twice.
func (d *fuseDisk) Detach() {
	t := d.t
	if isMountPoint(d.mountDir) {
		if out, err := sys(time.Minute, "umount", d.mountDir); err != nil {
			t.Logf("umount %s: %v %s; trying lazy unmount", d.mountDir, err, out)
			sys(time.Minute, "umount", "-l", d.mountDir)
		}
	}
	d.mu.Lock()
	d.mounted = false
	d.mu.Unlock()
	if d.loop != "" {
		if out, err := sys(time.Minute, "blockdev", "--flushbufs", d.loop); err != nil {
			t.Logf("blockdev --flushbufs %s: %v %s", d.loop, err, out)
		}
		if out, err := sys(time.Minute, "losetup", "-d", d.loop); err != nil {
			t.Errorf("losetup -d %s: %v %s", d.loop, err, out)
		}
		d.loop = ""
	}
	if isMountPoint(d.fuseDir) {
		if out, err := sys(time.Minute, "fusermount3", "-u", d.fuseDir); err != nil {
			t.Logf("fusermount3 -u %s: %v %s; trying lazy unmount", d.fuseDir, err, out)
			sys(time.Minute, "fusermount3", "-uz", d.fuseDir)
		}
	}
	select {
	case <-d.done:
	case <-time.After(30 * time.Second):
		t.Errorf("nbdfuse did not exit after its file system was unmounted; killing it")
		d.nbdfuse.Process.Kill()
		<-d.done
	}
}

// writeTree writes files of random content in nested directories under
// root and returns their sha256 by relative path.
func writeTree(t *testing.T, root string) map[string]string {
	t.Helper()
	sums := map[string]string{}
	sizes := []int{0, 1, 511, 4096, 4097, 65536, 100_000, MiB, 3*MiB + 17, 8 * MiB}
	for i, size := range sizes {
		rel := filepath.Join(fmt.Sprintf("dir%d", i%3), fmt.Sprintf("sub%d", i%2), fmt.Sprintf("file-%02d.bin", i))
		if i%4 == 0 {
			rel = fmt.Sprintf("top-%02d.bin", i)
		}
		p := filepath.Join(root, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		data := randomBytes(uint64(1000+i), size)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		sums[rel] = sha256Hex(data)
	}
	// Plus a deep empty directory and a symlink.
	if err := os.MkdirAll(filepath.Join(root, "a/b/c/d/e"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../dir0", filepath.Join(root, "a/link")); err != nil {
		t.Fatal(err)
	}
	return sums
}

// checkTree compares the regular files under root with sums.
func checkTree(t *testing.T, root string, sums map[string]string, when string) {
	t.Helper()
	got := map[string]string{}
	err := filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !e.Type().IsRegular() {
			return nil
		}
		rel, _ := filepath.Rel(root, p)
		got[rel] = sha256File(t, p)
		return nil
	})
	if err != nil {
		t.Fatalf("%s: walking %s: %v", when, root, err)
	}
	var problems []string
	for rel, want := range sums {
		if g, ok := got[rel]; !ok {
			problems = append(problems, "missing "+rel)
		} else if g != want {
			problems = append(problems, fmt.Sprintf("%s: sha256 %s, want %s", rel, g, want))
		}
	}
	for rel := range got {
		if _, ok := sums[rel]; !ok {
			problems = append(problems, "unexpected file "+rel)
		}
	}
	slices.Sort(problems)
	if len(problems) > 0 {
		t.Fatalf("%s: file tree differs:\n%s", when, strings.Join(problems, "\n"))
	}
	if target, err := os.Readlink(filepath.Join(root, "a/link")); err != nil || target != "../dir0" {
		t.Fatalf("%s: symlink a/link = %q, %v", when, target, err)
	}
	if fi, err := os.Stat(filepath.Join(root, "a/b/c/d/e")); err != nil || !fi.IsDir() {
		t.Fatalf("%s: directory a/b/c/d/e: %v", when, err)
	}
}

func fsck(t *testing.T, dev, when string) {
	t.Helper()
	out, err := sys(2*time.Minute, "fsck.ext4", "-fn", dev)
	if err != nil {
		t.Fatalf("fsck.ext4 -fn %s %s: %v\n%s", dev, when, err, out)
	}
}

// TestFilesystem puts ext4 on a robib volume through the kernel (nbdfuse,
// loop device), writes a file tree, checks fsck and checksums, and checks
// again after a graceful restart and after SIGKILL.
func TestFilesystem(t *testing.T) {
	for _, tool := range []string{"nbdfuse", "fuse", "loop", "mkfs.ext4", "fsck.ext4", "mount", "umount", "blockdev"} {
		harness.RequireTool(t, tool)
	}
	if os.Geteuid() != 0 {
		harness.Unavailable(t, "the file system test needs root (losetup, mount)")
	}
	const size = 256 * MiB
	a := startAgent(t, "fs", "256MiB")

	d := attachFuseDisk(t, a.NBDURI("fs"), size)
	mustSys(t, 2*time.Minute, "mkfs.ext4", "-q", "-F", d.loop)
	d.Mount()
	sums := writeTree(t, d.mountDir)
	checkTree(t, d.mountDir, sums, "before unmount")
	d.Unmount()
	fsck(t, d.loop, "after the first unmount")
	d.Mount()
	checkTree(t, d.mountDir, sums, "after remount")
	// Change something: delete a file, add one, append to one.
	if err := os.Remove(filepath.Join(d.mountDir, "top-00.bin")); err != nil {
		t.Fatal(err)
	}
	delete(sums, "top-00.bin")
	extra := randomBytes(77, 2*MiB+3)
	if err := os.WriteFile(filepath.Join(d.mountDir, "dir1/late.bin"), extra, 0o644); err != nil {
		t.Fatal(err)
	}
	sums["dir1/late.bin"] = sha256Hex(extra)
	d.Unmount()
	d.Detach()

	// Graceful restart, then attach again.
	a.Restart()
	d = attachFuseDisk(t, a.NBDURI("fs"), size)
	fsck(t, d.loop, "after a graceful restart")
	d.Mount()
	checkTree(t, d.mountDir, sums, "after a graceful restart")
	// fstrim sends discards down to robib (loop → FUSE fallocate → NBD trim).
	if p, err := exec.LookPath("fstrim"); err == nil {
		if out, err := sys(time.Minute, p, "-v", d.mountDir); err != nil {
			t.Logf("fstrim (optional): %v %s", err, out)
		}
	}
	d.Unmount()
	fsck(t, d.loop, "after fstrim")
	d.Detach()

	// SIGKILL after everything was flushed: nothing may be lost.
	a.KillAndRestart()
	d = attachFuseDisk(t, a.NBDURI("fs"), size)
	fsck(t, d.loop, "after SIGKILL and restart")
	d.Mount()
	checkTree(t, d.mountDir, sums, "after SIGKILL and restart")
	d.Unmount()
	d.Detach()
}
