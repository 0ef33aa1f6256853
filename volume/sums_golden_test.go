package volume

// Golden files freeze the sums file format (format 1): the header alone
// (sums_header.bin) and the whole sums file of a small volume with a short
// last block (sums_small.bin). The layout is also rebuilt by hand here,
// from DESIGN.md, with an independent CRC-32C table, so a change to the
// code that still matches its own golden file but not the document fails.
// Regenerating follows the rule of golden_test.go: only with a bump of
// sumsFormat, the old files kept as *_vN.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// goldenSmallVolume is the volume behind sums_small.bin: 5 full blocks and
// a 1024-byte last block (block size 512), written as listed.
func goldenSmallVolume() (Meta, []byte) {
	m := Meta{Name: "golden", Size: 5*4096 + 1024, BlockSize: 512, Created: time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)}
	data := make([]byte, m.Size)
	// block 0: never written (a hole)
	for i := range 4096 { // block 1: a byte pattern
		data[4096+i] = byte(i % 251)
	}
	copy(data[2*4096:3*4096], bytes.Repeat([]byte{0xFF}, 4096)) // block 2
	// block 3: written, then trimmed
	copy(data[4*4096:5*4096], bytes.Repeat([]byte("robib"), 820)) // block 4
	for i := range 1024 {                                         // block 5, short
		data[5*4096+i] = byte(255 - i%256)
	}
	return m, data
}

func TestGoldenSums(t *testing.T) {
	headerPath := filepath.Join(goldenDir, "sums_header.bin")
	smallPath := filepath.Join(goldenDir, "sums_small.bin")

	// The volume, made through the store.
	dir := t.TempDir()
	s := openStore(t, dir)
	m, data := goldenSmallVolume()
	v, err := s.Create(m)
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, v, data[4096:], 4096)
	mustWrite(t, v, bytes.Repeat([]byte{7}, 4096), 3*4096)
	if err := v.Trim(3*4096, 4096); err != nil {
		t.Fatal(err)
	}
	if err := v.Sync(); err != nil {
		t.Fatal(err)
	}
	made, err := os.ReadFile(sumsPath(dir, m.Name))
	if err != nil {
		t.Fatal(err)
	}

	if *updateGolden || os.Getenv("ROBIB_UPDATE_GOLDEN") == "1" {
		if err := os.MkdirAll(goldenDir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(headerPath, encodeSumsHeader(), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(smallPath, made, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	header, err := os.ReadFile(headerPath)
	if err != nil {
		t.Fatal(err)
	}
	small, err := os.ReadFile(smallPath)
	if err != nil {
		t.Fatal(err)
	}

	// The documented layout, by hand.
	tab := crc32.MakeTable(crc32.Castagnoli)
	want := make([]byte, 4096)
	copy(want, "RBBSUMS\n")
	binary.LittleEndian.PutUint32(want[8:], 1)
	binary.LittleEndian.PutUint32(want[12:], 4096)
	binary.LittleEndian.PutUint32(want[24:], crc32.Checksum(want[:24], tab))
	if !bytes.Equal(header, want) {
		t.Fatalf("sums_header.bin does not follow the documented layout:\nfile   %x\nlayout %x", header[:32], want[:32])
	}
	zero := crc32.Checksum(make([]byte, 4096), tab)
	for off := 0; off < len(data); off += 4096 {
		blk := make([]byte, 4096) // padded with zeros
		copy(blk, data[off:min(off+4096, len(data))])
		want = binary.LittleEndian.AppendUint32(want, crc32.Checksum(blk, tab)^zero)
	}
	if !bytes.Equal(small, want) {
		t.Fatalf("sums_small.bin does not follow the documented layout:\nfile   %x\nlayout %x", small[4096:], want[4096:])
	}
	for i, b := range []int{0, 3} { // zero blocks store 0
		if got := binary.LittleEndian.Uint32(small[4096+4*b:]); got != 0 {
			t.Errorf("zero block %d (#%d) stores %08x", b, i, got)
		}
	}

	// The code reads the golden files and writes exactly them.
	if err := decodeSumsHeader(header); err != nil {
		t.Fatalf("decodeSumsHeader(golden): %v", err)
	}
	if !bytes.Equal(encodeSumsHeader(), header) {
		t.Fatal("encodeSumsHeader differs from the golden header")
	}
	if !bytes.Equal(made, small) {
		t.Fatalf("the store writes a different sums file:\ngot    %x\ngolden %x", made[4096:], small[4096:])
	}
	// A volume with the golden sums file opens without a rebuild and
	// reads without damage.
	s.Close()
	if err := os.WriteFile(sumsPath(dir, m.Name), small, 0o600); err != nil {
		t.Fatal(err)
	}
	rec := &logRecorder{}
	s2, err := Open(dir, testLoggerTo(rec))
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if rec.has("WARN") || rec.has("INFO built") {
		t.Fatalf("golden sums file was rebuilt: %q", rec.msgs)
	}
	v, err = s2.Get(m.Name)
	if err != nil {
		t.Fatal(err)
	}
	wantNoDamage(t, v, data)
}

// TestNewerSumsFormatRefused: a header of a newer format is refused with
// ErrCorrupt and an error naming the version (Open then rebuilds the file
// in the current format; TestCorruptSumsRebuilt).
func TestNewerSumsFormatRefused(t *testing.T) {
	h := encodeSumsHeader()
	binary.LittleEndian.PutUint32(h[8:], sumsFormat+1)
	binary.LittleEndian.PutUint32(h[24:], crc32.Checksum(h[:24], castagnoli))
	err := decodeSumsHeader(h)
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), fmt.Sprintf("version %d", sumsFormat+1)) {
		t.Fatalf("decodeSumsHeader of format %d: %v", sumsFormat+1, err)
	}
	// Even when the rest of a newer header would not parse as format 1.
	h[30] = 1
	if err := decodeSumsHeader(h); !strings.Contains(fmt.Sprint(err), fmt.Sprintf("version %d", sumsFormat+1)) {
		t.Fatalf("newer header with other fields: %v", err)
	}
}

// FuzzSumsHeader checks that decodeSumsHeader never panics, that every
// error wraps ErrCorrupt, and that the only header it accepts is the one
// encodeSumsHeader writes (format 1 has no variable field).
func FuzzSumsHeader(f *testing.F) {
	good := encodeSumsHeader()
	f.Add(good)
	f.Add(good[:100])
	f.Add(append(bytes.Clone(good), 0))
	bad := bytes.Clone(good)
	bad[12] = 2
	f.Add(bad)
	f.Add([]byte("RBBSUMS\n\x02\x00\x00\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		err := decodeSumsHeader(b)
		if err == nil {
			if !bytes.Equal(b, good) {
				t.Fatalf("accepted a header other than the format 1 one: %x", b[:32])
			}
			return
		}
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("error %v does not wrap ErrCorrupt", err)
		}
		// A valid header with one byte changed is always refused.
		if len(b) == sumsHeaderSize {
			c := bytes.Clone(good)
			i := int(b[0]) % sumsHeaderSize
			c[i] ^= b[1] | 1
			if decodeSumsHeader(c) == nil {
				t.Fatalf("accepted the header with byte %d changed", i)
			}
		}
	})
}
