package dcdlog

import (
	"bytes"
	"encoding/binary"
	"flag"
	"hash/crc32"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

var update = flag.Bool("update", false, "rewrite the golden files (only for a new format version)")

const goldenSegSize = 64 << 10

// goldenLogs are the entries of testdata/segment-v1.golden.
func goldenLogs() []*raft.Log {
	data := make([]byte, 300)
	for i := range data {
		data[i] = byte(i * 13)
	}
	return []*raft.Log{
		{Index: 41, Term: 3, Type: raft.LogCommand, Data: []byte("hello")},
		{Index: 42, Term: 3, Type: raft.LogConfiguration, Data: data, Extensions: []byte("ext"),
			AppendedAt: time.Unix(1700000000, 123456789)},
		{Index: 43, Term: 4, Type: raft.LogNoop},
	}
}

// goldenImage is the golden segment built by the encoder.
func goldenImage() []byte {
	b := make([]byte, segHdrSize)
	segHeader{Seq: 1, Base: 41, Capacity: goldenSegSize}.encode(b)
	for _, l := range goldenLogs() {
		b = appendRecord(b, 1, l)
	}
	return b
}

func golden(t *testing.T, name string, b []byte) []byte {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	g, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// The segment format is frozen: the encoder, the store's vectored write
// path and the decoder all agree with the bytes in testdata.
func TestGoldenSegment(t *testing.T) {
	g := golden(t, "segment-v1.golden", goldenImage())
	if !bytes.Equal(goldenImage(), g) {
		t.Fatalf("the encoder no longer writes testdata/segment-v1.golden: the v1 format is frozen")
	}
	var got []raft.Log
	sc, ok, err := parseSegment(g, func(l *raft.Log) {
		c := *l
		c.Data, c.Extensions = bytes.Clone(l.Data), bytes.Clone(l.Extensions)
		got = append(got, c)
	})
	if err != nil || !ok {
		t.Fatalf("parse golden: ok %v, %v", ok, err)
	}
	if sc.hdr != (segHeader{Seq: 1, Base: 41, Capacity: goldenSegSize}) || sc.offs[len(sc.offs)-1] != int64(len(g)) {
		t.Fatalf("golden header %+v, end %d of %d", sc.hdr, sc.offs[len(sc.offs)-1], len(g))
	}
	want := goldenLogs()
	if len(got) != len(want) {
		t.Fatalf("%d records, want %d", len(got), len(want))
	}
	for i := range want {
		sameLog(t, &got[i], want[i])
	}

	// The store writes the same bytes (a new store's first generation is 1).
	dir := t.TempDir()
	s := mustOpen(t, dir, Options{SegmentSize: goldenSegSize})
	mustStore(t, s, goldenLogs()...)
	path, _, _ := where(t, s, 41)
	s.Close()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b[:len(g)], g) {
		t.Fatalf("the store's segment differs from testdata/segment-v1.golden")
	}
	if !bytes.Equal(b[len(g):], make([]byte, len(b)-len(g))) {
		t.Fatalf("the pre-written segment is not zeros past the records")
	}
}

func TestGoldenMeta(t *testing.T) {
	var b [metaSlotSize]byte
	m := meta{Counter: 3, First: 10, MinSeq: 2, SeqLimit: 1025}
	m.encode(b[:])
	g := golden(t, "meta-v1.golden", b[:])
	if !bytes.Equal(b[:], g) {
		t.Fatalf("the encoder no longer writes testdata/meta-v1.golden: the v1 format is frozen")
	}
	got, ok, err := decodeMeta(g)
	if err != nil || !ok || got != m {
		t.Fatalf("decode golden meta: %+v %v %v", got, ok, err)
	}
}

// A header of another version is refused with ErrFormat, not read as
// garbage nor as an empty segment.
func TestOtherVersionRefused(t *testing.T) {
	g := goldenImage()
	binary.LittleEndian.PutUint32(g[8:], 2)
	binary.LittleEndian.PutUint32(g[60:], crc32.Checksum(g[:60], castagnoli))
	if _, _, err := parseSegment(g, nil); err == nil {
		t.Fatal("a version 2 segment was accepted")
	}
}

// FuzzSegment: the parser never panics, and every record it accepts has a
// correct checksum (recomputed here independently) and encodes back to
// the bytes it was read from.
func FuzzSegment(f *testing.F) {
	g := goldenImage()
	f.Add(g)
	f.Add(g[:len(g)-3])
	f.Add(append(bytes.Clone(g), make([]byte, 100)...))
	bad := bytes.Clone(g)
	bad[segHdrSize+recHdrSize+2] ^= 1
	f.Add(bad)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		sc, ok, err := parseSegment(b, nil)
		if !ok || err != nil {
			return
		}
		for k := 0; k+1 < len(sc.offs); k++ {
			start, end := sc.offs[k], sc.offs[k+1]
			if start < segHdrSize || end <= start || end > int64(len(b)) {
				t.Fatalf("record %d at [%d, %d) of %d bytes", k, start, end, len(b))
			}
			rec := b[start:end]
			dl := int64(binary.LittleEndian.Uint32(rec[4:]))
			el := int64(binary.LittleEndian.Uint32(rec[8:]))
			var gen [8]byte
			binary.LittleEndian.PutUint64(gen[:], sc.hdr.Seq)
			c := crc32.New(crc32.MakeTable(crc32.Castagnoli))
			c.Write(gen[:])
			c.Write(rec[4 : recHdrSize+dl+el])
			if c.Sum32() != binary.LittleEndian.Uint32(rec) {
				t.Fatalf("record %d accepted with a wrong checksum", k)
			}
			var l raft.Log
			if _, ok := decodeRecord(rec, genSeed(sc.hdr.Seq), sc.hdr.Base+uint64(k), &l); !ok {
				t.Fatalf("record %d accepted by the scan, refused alone", k)
			}
			re := appendRecord(nil, sc.hdr.Seq, &l)
			if !bytes.Equal(re[:recHdrSize+dl+el], rec[:recHdrSize+dl+el]) {
				t.Fatalf("record %d does not encode back to its bytes", k)
			}
		}
	})
}

// FuzzDamagedSegment builds a valid segment from the fuzzer's entry sizes
// and generation, damages it (a byte changed, the image cut) and checks
// that the parser returns exactly a prefix of the entries written, each
// equal to what was written.
func FuzzDamagedSegment(f *testing.F) {
	f.Add(uint64(1), uint64(5), []byte{3, 0, 200, 17, 1}, uint16(70), byte(1), uint16(0))
	f.Add(uint64(9), uint64(1), []byte{255, 255}, uint16(300), byte(0x80), uint16(10))
	f.Add(uint64(2), uint64(100), []byte{0}, uint16(0), byte(0), uint16(0))
	f.Fuzz(func(t *testing.T, gen, base uint64, sizes []byte, at uint16, flip byte, cut uint16) {
		if gen == 0 || base == 0 || base > 1<<60 || len(sizes) > 64 {
			return
		}
		b := make([]byte, segHdrSize)
		segHeader{Seq: gen, Base: base, Capacity: 1 << 20}.encode(b)
		var logs []*raft.Log
		for k, sz := range sizes {
			l := entry(base+uint64(k), gen+uint64(sz), int(sz)*3)
			logs = append(logs, l)
			b = appendRecord(b, gen, l)
		}
		if int(at) < len(b) {
			b[at] ^= flip
		}
		if int(cut) < len(b) && cut > 0 {
			b = b[:len(b)-int(cut)]
		}
		var got []raft.Log
		_, ok, err := parseSegment(b, func(l *raft.Log) {
			c := *l
			c.Data, c.Extensions = bytes.Clone(l.Data), bytes.Clone(l.Extensions)
			got = append(got, c)
		})
		if err != nil || !ok {
			return // a damaged header: no segment at all
		}
		if len(got) > len(logs) {
			t.Fatalf("%d entries parsed from %d written", len(got), len(logs))
		}
		for k := range got {
			sameLog(t, &got[k], logs[k])
		}
		if flip == 0 && cut == 0 && len(got) != len(logs) {
			t.Fatalf("undamaged: %d of %d entries parsed", len(got), len(logs))
		}
	})
}
