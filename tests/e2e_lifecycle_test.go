package tests

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"
	"time"
)

// TestDeleteWhileConnected deletes a volume that has an open connection
// and recreates it under the same name: the old connection must not reach
// the new volume, and the new volume must start empty.
func TestDeleteWhileConnected(t *testing.T) {
	a := startAgent(t, "life", "8MiB")
	old := rawConnect(t, a.NBDAddr, "life")
	first := randomBytes(7, 64*KiB)
	old.mustWrite(0, first)

	_, errOut, err := a.CLI("volume", "delete", "life")
	if err != nil {
		// Refusing to delete a volume in use is fine, if it says so.
		t.Logf("delete with a connection open refused: %s", strings.TrimSpace(errOut))
		if got := old.mustRead(0, len(first)); !bytes.Equal(got, first) {
			t.Fatal("a refused delete changed the data")
		}
		return
	}
	// Deleted: the old connection gets errors or is closed, never data.
	code, _, rerr := old.try(0, cmdRead, 0, 4096, nil)
	t.Logf("read on the deleted volume's connection: NBD error %d, %v", code, rerr)

	a.CreateVolume("life", "8MiB")
	fresh := rawConnect(t, a.NBDAddr, "life")
	if got := fresh.mustRead(0, len(first)); !bytes.Equal(got, make([]byte, len(first))) {
		t.Fatal("recreated volume shows the deleted volume's data")
	}
	// A write on the old connection must not land in the new volume.
	stray := bytes.Repeat([]byte{0xbd}, 4096)
	if rerr == nil {
		code, _, werr := old.try(cmdFlagFUA, cmdWrite, 8192, uint32(len(stray)), stray)
		t.Logf("write on the deleted volume's connection: NBD error %d, %v", code, werr)
		old.try(0, cmdFlush, 0, 0, nil)
	}
	if code, _, err := fresh.try(0, cmdFlush, 0, 0, nil); code != 0 || err != nil {
		t.Fatalf("flush on the new volume: %d %v", code, err)
	}
	if got := fresh.mustRead(8192, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("a write on a connection to the deleted volume landed in the new volume of the same name")
	}
	if err := a.Health(); err != nil {
		t.Fatal(err)
	}
}

// TestShrinkWhileConnected shrinks a volume under an open connection, then
// grows it again: writes past the new end must fail, and the old data past
// it must not come back.
func TestShrinkWhileConnected(t *testing.T) {
	a := startAgent(t, "shr", "8MiB")
	c := rawConnect(t, a.NBDAddr, "shr")
	tail := randomBytes(8, 64*KiB)
	c.mustWrite(6*MiB, tail)
	if code, _, err := c.try(0, cmdFlush, 0, 0, nil); code != 0 || err != nil {
		t.Fatalf("flush: %d %v", code, err)
	}

	a.MustCLI("volume", "resize", "shr", "--size", "4MiB")
	// The connection still believes in 8 MiB; the server must not.
	stray := bytes.Repeat([]byte{0x5c}, 4096)
	code, _, err := c.try(cmdFlagFUA, cmdWrite, 7*MiB, uint32(len(stray)), stray)
	t.Logf("write past the new end on an old connection: NBD error %d, %v", code, err)
	if err == nil && code == 0 {
		t.Errorf("a write at 7 MiB of a volume shrunk to 4 MiB succeeded")
	}
	if v := listVolumes(t, a)["shr"]; v.Size != 4*MiB {
		t.Fatalf("size after shrink and a stray write = %d, want 4 MiB", v.Size)
	}
	c.c.Close()

	a.MustCLI("volume", "resize", "shr", "--size", "8MiB")
	n := rawConnect(t, a.NBDAddr, "shr")
	if n.size != 8*MiB {
		t.Fatalf("size after growing = %d", n.size)
	}
	if got := n.mustRead(4*MiB, 4*MiB); !bytes.Equal(got, make([]byte, 4*MiB)) {
		i := bytes.IndexFunc(got, func(r rune) bool { return r != 0 })
		t.Fatalf("after shrink to 4 MiB and grow to 8 MiB, the regrown range is not zero (first non-zero byte at %d MiB + %d)", 4+i/MiB, i%MiB)
	}
}

// TestDurability checks what must survive: FUA writes and flushed writes
// across SIGKILL, unflushed writes across a graceful stop (the agent
// flushes its write-back stage when it shuts down), and a SIGKILL in the
// middle of a write storm leaves a volume the agent can serve again.
func TestDurability(t *testing.T) {
	a := startAgent(t, "dur", "32MiB")

	// FUA writes, no flush, SIGKILL.
	c := rawConnect(t, a.NBDAddr, "dur")
	fua := randomBytes(9, 256*KiB)
	for i := 0; i < len(fua); i += 64 * KiB {
		code, _, err := c.try(cmdFlagFUA, cmdWrite, uint64(i), 64*KiB, fua[i:i+64*KiB])
		if code != 0 || err != nil {
			t.Fatalf("FUA write: %d %v", code, err)
		}
	}
	// Flushed writes.
	flushed := randomBytes(10, 256*KiB)
	c.mustWrite(MiB, flushed)
	if code, _, err := c.try(0, cmdFlush, 0, 0, nil); code != 0 || err != nil {
		t.Fatalf("flush: %d %v", code, err)
	}
	a.KillAndRestart()
	c = rawConnect(t, a.NBDAddr, "dur")
	if got := c.mustRead(0, len(fua)); !bytes.Equal(got, fua) {
		t.Error("FUA writes lost across SIGKILL")
	}
	if got := c.mustRead(MiB, len(flushed)); !bytes.Equal(got, flushed) {
		t.Error("flushed writes lost across SIGKILL")
	}

	// Unflushed writes with the connection still open, then SIGTERM.
	unflushed := randomBytes(11, 2*MiB)
	for i := 0; i < len(unflushed); i += 128 * KiB {
		c.mustWrite(uint64(4*MiB+i), unflushed[i:i+128*KiB])
	}
	if err := a.Stop(); err != nil {
		t.Errorf("graceful stop with a connection open: %v", err)
	}
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	c = rawConnect(t, a.NBDAddr, "dur")
	if got := c.mustRead(4*MiB, len(unflushed)); !bytes.Equal(got, unflushed) {
		t.Error("acknowledged writes lost across a graceful stop (SIGTERM) of the agent")
	}

	// SIGKILL during a write storm: 400 writes in flight, no flush.
	storm := rawConnect(t, a.NBDAddr, "dur")
	blk := bytes.Repeat([]byte{0x77}, 32*KiB)
	go func() {
		for i := range 400 {
			var b bytes.Buffer
			b.Write(encodeRequest(cmdWrite, uint64(i), uint64(8*MiB+(i%512)*32*KiB), 32*KiB))
			b.Write(blk)
			if _, err := storm.c.Write(b.Bytes()); err != nil {
				return
			}
		}
	}()
	// Kill once the agent has answered 50 of them.
	storm.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	for i := range 50 {
		var hdr struct {
			Magic, Error uint32
			Cookie       uint64
		}
		if err := binary.Read(storm.c, binary.BigEndian, &hdr); err != nil || hdr.Error != 0 {
			t.Fatalf("storm reply %d: %+v %v", i, hdr, err)
		}
	}
	a.KillAndRestart()
	if err := a.Health(); err != nil {
		t.Fatal(err)
	}
	c = rawConnect(t, a.NBDAddr, "dur")
	if got := c.mustRead(0, len(fua)); !bytes.Equal(got, fua) {
		t.Error("old FUA data damaged by a crash during later writes")
	}
	if got := c.mustRead(4*MiB, len(unflushed)); !bytes.Equal(got, unflushed) {
		t.Error("old data damaged by a crash during later writes")
	}
	// Whatever of the storm survived is whole 0x77 or zero per request.
	got := c.mustRead(8*MiB, 16*MiB)
	for i := 0; i < len(got); i += 32 * KiB {
		chunk := got[i : i+32*KiB]
		if !bytes.Equal(chunk, blk) && !bytes.Equal(chunk, make([]byte, len(chunk))) {
			t.Logf("storm chunk at %d MiB + %d KiB is torn (allowed without a flush, noted)", 8+i/MiB, (i%MiB)/KiB)
		}
	}
}

func encodeRequest(typ uint16, cookie, off uint64, length uint32) []byte {
	var b bytes.Buffer
	binary.Write(&b, binary.BigEndian, nbdRequest{reqMagic, 0, typ, cookie, off, length})
	return b.Bytes()
}
