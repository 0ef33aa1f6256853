package tests

import (
	"os"
	"testing"
	"time"

	"github.com/robib/robib/tests/harness"
)

// TestClusterFilesystemOnFollower puts ext4 on a volume attached at a
// follower (nbdfuse → loop device), writes a tree, and mounts the same
// volume read-only at another site once it caught up: same files, same
// bytes, clean fsck at both sites.
func TestClusterFilesystemOnFollower(t *testing.T) {
	requireTools(t, "nbdfuse", "fuse", "loop", "mkfs.ext4", "fsck.ext4", "mount", "umount", "blockdev")
	if os.Geteuid() != 0 {
		harness.Unavailable(t, "the file system test needs root (losetup, mount)")
	}
	c := harness.StartCluster(t, harness.ClusterOptions{})
	fs := c.Followers()
	writer, reader := fs[0], fs[1]
	const size = 128 * MiB
	writer.CreateVolume("fsv", "128MiB")
	waitVolumeEverywhere(t, c, "fsv", size)

	d := attachFuseDisk(t, writer.NBDURI("fsv"), size)
	mustSys(t, 2*time.Minute, "mkfs.ext4", "-q", "-F", d.loop)
	d.Mount()
	sums := writeTree(t, d.mountDir)
	checkTree(t, d.mountDir, sums, "at the writing site "+writer.Name)
	d.Unmount()
	fsck(t, d.loop, "at the writing site "+writer.Name)
	d.Detach()

	idx := c.WaitCaughtUp(clusterWait)
	t.Logf("file system written at %s, applied everywhere by command index %d", writer.Name, idx)

	r := attachFuseDisk(t, reader.NBDURI("fsv"), size)
	fsck(t, r.loop, "at the other site "+reader.Name)
	mustSys(t, time.Minute, "mount", "-t", "ext4", "-o", "ro,noload", r.loop, r.mountDir)
	checkTree(t, r.mountDir, sums, "mounted read-only at "+reader.Name)
	mustSys(t, time.Minute, "umount", r.mountDir)
	r.Detach()

	mustVerify(t, c.Agents[0], "fsv", 3)
}
