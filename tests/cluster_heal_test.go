package tests

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/robib/robib/tests/harness"
)

// TestClusterReadsThroughDamage is the seed's "remote disk": ext4 with a
// file tree on a volume; at one site the volume's data file is damaged
// behind the agent's back, as a failing disk would (bytes overwritten all
// over the file; in the second case the file cut to its first MiB).
// Reads at that site through NBD must return the right data at once (fsck
// clean, every file's checksum right), and the site must repair its copy
// by itself: `volume verify` reports identical copies and the file holds
// the same bytes as a healthy site's.
func TestClusterReadsThroughDamage(t *testing.T) {
	requireTools(t, "nbdfuse", "fuse", "loop", "mkfs.ext4", "fsck.ext4", "mount", "umount", "blockdev")
	if os.Geteuid() != 0 {
		harness.Unavailable(t, "the file system test needs root (losetup, mount)")
	}
	c := harness.StartCluster(t, harness.ClusterOptions{})
	fs := c.Followers()
	writer, damaged := fs[0], fs[1]
	healthy := c.Leader()
	const size = 64 * MiB

	for _, tc := range []struct {
		name   string
		damage func(t *testing.T, path string)
	}{
		{"overwritten", func(t *testing.T, path string) {
			// 16 bytes of garbage every 64 KiB: metadata, file data
			// and blocks that were never written (holes) alike.
			f, err := os.OpenFile(path, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			junk := randomBytes(7, 16)
			for off := int64(0); off < size; off += 64 << 10 {
				if _, err := f.WriteAt(junk, off+1000); err != nil {
					t.Fatal(err)
				}
			}
		}},
		{"truncated", func(t *testing.T, path string) {
			// Past the first MiB: most of the file system's metadata
			// and every file's data, and blocks no read will meet
			// (backup superblocks), which the scrub that follows the
			// first damaged read finds.
			if err := os.Truncate(path, 1<<20); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vol := "heal-" + tc.name
			writer.CreateVolume(vol, fmt.Sprint(size))
			waitVolumeEverywhere(t, c, vol, size)

			d := attachFuseDisk(t, writer.NBDURI(vol), size)
			mustSys(t, 2*time.Minute, "mkfs.ext4", "-q", "-F", d.loop)
			d.Mount()
			sums := writeTree(t, d.mountDir)
			d.Unmount()
			d.Detach()
			c.WaitCaughtUp(clusterWait)
			mustVerify(t, healthy, vol, 3)

			path := volumeDataFile(damaged, vol)
			want := paddedFile(t, volumeDataFile(healthy, vol), size)
			tc.damage(t, path)
			if bytes.Equal(paddedFile(t, path, size), want) {
				t.Fatalf("damaging %s changed nothing", path)
			}

			r := attachFuseDisk(t, damaged.NBDURI(vol+"@ro"), size)
			fsck(t, r.loop, "at the damaged site "+damaged.Name)
			mustSys(t, time.Minute, "mount", "-t", "ext4", "-o", "ro,noload", r.loop, r.mountDir)
			checkTree(t, r.mountDir, sums, "mounted read-only at the damaged site "+damaged.Name)
			mustSys(t, time.Minute, "umount", r.mountDir)
			r.Detach()

			t.Cleanup(func() {
				if t.Failed() {
					for _, l := range strings.Split(damaged.Logs(), "\n") {
						if strings.Contains(l, "damage") || strings.Contains(l, "scrub") || strings.Contains(l, "repair") {
							t.Logf("%s: %s", damaged.Name, l)
						}
					}
				}
			})
			harness.WaitFor(t, 2*time.Minute, "the damaged site to repair its copy of "+vol, func() (bool, error) {
				if diff := firstDiff(paddedFile(t, path, size), want); diff != "" {
					return false, fmt.Errorf("%s still differs from %s's copy: %s", path, healthy.Name, diff)
				}
				return true, nil
			})
			mustVerify(t, healthy, vol, 3)
			var seen, scrubbed bool
			for _, l := range strings.Split(damaged.Logs(), "\n") {
				if strings.Contains(l, "volume="+vol+" ") {
					seen = seen || strings.Contains(l, "damaged; read its damaged blocks from other sites")
					scrubbed = scrubbed || strings.Contains(l, "scrub found damaged blocks")
				}
			}
			if !seen || !scrubbed {
				t.Errorf("%s logged a read served from other sites %v, a scrub that found the rest %v", damaged.Name, seen, scrubbed)
			}
		})
	}
}

// paddedFile reads path as a volume's data file of the given size: bytes
// past its end read as zeros, as the volume reads them.
func paddedFile(t *testing.T, path string, size int64) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(b)) > size {
		return b[:size]
	}
	return append(b, make([]byte, size-int64(len(b)))...)
}
