package fsm

import (
	"bytes"
	"errors"
	"math"
	"reflect"
	"strings"
	"testing"
	"unsafe"
)

// sampleCommands returns one or more valid instances of every command.
func sampleCommands() []Command {
	return []Command{
		&CreateVolume{Name: "vol-1", Size: 8 * MiB, BlockSize: 4096, Created: testCreated},
		&CreateVolume{Name: "v", Size: 0, BlockSize: 0, Created: -5, SyncWrites: true},
		&CreateVolume{Name: "big.vol_2", Size: math.MaxInt64, BlockSize: math.MaxInt32, Created: math.MinInt64},
		&DeleteVolume{Name: "vol-1"},
		&ResizeVolume{Name: "vol-1", Size: 16 * MiB},
		&WriteBatch{Volume: "vol-1", Session: 1, Seq: 1},
		&WriteBatch{Volume: "vol-1", Session: math.MaxUint64, Seq: math.MaxUint64, Epoch: 7, Ops: []Op{
			write(0, []byte("hello")),
			{Kind: OpTrim, Off: 4096, Len: 8192},
			{Kind: OpZero, Off: 1 << 40, Len: 1},
			{Kind: OpZero, NoHole: true, Off: 12, Len: 100},
			write(math.MaxInt64-3, []byte("abc")),
			{Kind: OpTrim, Off: 5, Len: 0},
		}},
		&EndSession{Session: 42},
		&EndSession{Session: 0},
		&VerifyChunks{ID: "verify-1", Volume: "vol-1", Off: 0, Len: 4 * MiB, ChunkSize: MiB},
		&VerifyChunks{ID: strings.Repeat("x", maxIDLen), Volume: "a", Off: 1, Len: 2, ChunkSize: 3},
		&AcquireLease{Volume: "vol-1", Site: "site-1", Created: testCreated, Prev: 0},
		&AcquireLease{Volume: "v", Site: strings.Repeat("s", maxSiteLen), Created: -1, Prev: math.MaxUint64},
		&ReleaseLease{Volume: "vol-1", Site: "a.b_c", Epoch: 3},
		&SetClusterID{ID: "0123456789abcdef0123456789abcdef"},
		&SetClusterID{ID: strings.Repeat("z-9", MaxClusterIDLen/3)},
	}
}

func TestCodecRoundTrip(t *testing.T) {
	for _, cmd := range sampleCommands() {
		b, err := Encode(cmd)
		if err != nil {
			t.Fatalf("Encode(%#v): %v", cmd, err)
		}
		if len(b) != cap(b) {
			t.Errorf("Encode(%T): len %d cap %d: buffer not pre-sized exactly", cmd, len(b), cap(b))
		}
		if wb, ok := cmd.(*WriteBatch); ok && EncodedSize(wb) != len(b) {
			t.Errorf("EncodedSize = %d, len(Encode) = %d", EncodedSize(wb), len(b))
		}
		got, err := Decode(b)
		if err != nil {
			t.Fatalf("Decode(Encode(%#v)): %v", cmd, err)
		}
		if !reflect.DeepEqual(got, cmd) {
			t.Fatalf("round trip:\n got %#v\nwant %#v", got, cmd)
		}
		b2, _ := Encode(got)
		if !bytes.Equal(b, b2) {
			t.Fatalf("re-encoding differs")
		}
	}
}

func TestDecodeAliasesData(t *testing.T) {
	b, err := Encode(&WriteBatch{Volume: "v", Session: 1, Seq: 1, Ops: []Op{write(0, []byte("abcd")), write(9, []byte("xyz"))}})
	if err != nil {
		t.Fatal(err)
	}
	cmd, err := Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	ops := cmd.(*WriteBatch).Ops
	for _, op := range ops {
		p := uintptr(unsafe.Pointer(unsafe.SliceData(op.Data)))
		start := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
		if p < start || p >= start+uintptr(len(b)) {
			t.Fatalf("op data is not inside the input buffer")
		}
		if cap(op.Data) != len(op.Data) {
			t.Fatalf("op data cap %d > len %d: an append would clobber the entry", cap(op.Data), len(op.Data))
		}
	}
}

func TestEncodeRejects(t *testing.T) {
	var nilBatch *WriteBatch
	cases := map[string]Command{
		"nil":              nil,
		"nil pointer":      nilBatch,
		"bad name":         &DeleteVolume{Name: "../x"},
		"empty name":       &ResizeVolume{Name: "", Size: 1},
		"negative size":    &CreateVolume{Name: "v", Size: -1},
		"negative bs":      &CreateVolume{Name: "v", Size: 1, BlockSize: -1},
		"huge bs":          &CreateVolume{Name: "v", Size: 1, BlockSize: math.MaxInt32 + 1},
		"resize negative":  &ResizeVolume{Name: "v", Size: -4096},
		"len mismatch":     &WriteBatch{Volume: "v", Ops: []Op{{Kind: OpWrite, Off: 0, Len: 5, Data: []byte("abc")}}},
		"data on trim":     &WriteBatch{Volume: "v", Ops: []Op{{Kind: OpTrim, Off: 0, Len: 3, Data: []byte("abc")}}},
		"nohole on write":  &WriteBatch{Volume: "v", Ops: []Op{{Kind: OpWrite, NoHole: true, Len: 1, Data: []byte("a")}}},
		"nohole on trim":   &WriteBatch{Volume: "v", Ops: []Op{{Kind: OpTrim, NoHole: true, Len: 1}}},
		"unknown kind":     &WriteBatch{Volume: "v", Ops: []Op{{Kind: 9, Len: 1}}},
		"negative off":     &WriteBatch{Volume: "v", Ops: []Op{{Kind: OpZero, Off: -1, Len: 1}}},
		"range overflow":   &WriteBatch{Volume: "v", Ops: []Op{{Kind: OpZero, Off: math.MaxInt64, Len: 1}}},
		"empty id":         &VerifyChunks{ID: "", Volume: "v", Len: 1, ChunkSize: 4096},
		"long id":          &VerifyChunks{ID: strings.Repeat("x", maxIDLen+1), Volume: "v", Len: 1, ChunkSize: 4096},
		"verify neg chunk": &VerifyChunks{ID: "x", Volume: "v", Len: 1, ChunkSize: -1},
	}
	for name, cmd := range cases {
		if _, err := Encode(cmd); !errors.Is(err, ErrBadCommand) {
			t.Errorf("%s: Encode error %v, want ErrBadCommand", name, err)
		}
	}
}

// mustEncode encodes a valid command.
func mustEncode(t testing.TB, cmd Command) []byte {
	t.Helper()
	b, err := Encode(cmd)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDecodeMalformed(t *testing.T) {
	batch := mustEncode(t, &WriteBatch{Volume: "vol", Session: 1, Seq: 2, Ops: []Op{write(0, []byte("data")), {Kind: OpZero, NoHole: true, Off: 8, Len: 8}}})
	// Offsets in batch: magic 0, version 1, type 2, name len 3, "vol"
	// 4-6, session 7, seq 8, epoch 9, created 10, count 11, op0 kind 12,
	// flags 13, off 14, len 15, data 16-19, op1 kind 20, flags 21, off 22,
	// len 23.
	mod := func(f func(b []byte) []byte) []byte {
		b := f(append([]byte(nil), batch...))
		return reCRC(b)
	}
	cases := []struct {
		name string
		data []byte
		want error
	}{
		{"empty", nil, ErrBadCommand},
		{"short", []byte{codecMagic, codecVersion, cmdEndSession, 0, 0, 0}, ErrBadCommand},
		{"magic", mod(func(b []byte) []byte { b[0] = 'x'; return b }), ErrBadCommand},
		{"version", mod(func(b []byte) []byte { b[1] = 2; return b }), ErrUnsupportedVersion},
		{"crc", func() []byte { b := append([]byte(nil), batch...); b[len(b)-1] ^= 1; return b }(), ErrBadCommand},
		{"bit flip", func() []byte { b := append([]byte(nil), batch...); b[16] ^= 1; return b }(), ErrBadCommand},
		{"type", mod(func(b []byte) []byte { b[2] = 77; return b }), ErrBadCommand},
		{"trailing", mod(func(b []byte) []byte { return append(b[:len(b)-4], 0, 0, 0, 0, 0) }), ErrBadCommand},
		{"bad name", mod(func(b []byte) []byte { b[4] = '/'; return b }), ErrBadCommand},
		{"name too long", mod(func(b []byte) []byte { b[3] = 100; return b }), ErrBadCommand},
		{"count too big", mod(func(b []byte) []byte { b[11] = 100; return b }), ErrBadCommand},
		{"count too small", mod(func(b []byte) []byte { b[11] = 1; return b }), ErrBadCommand},
		{"op kind", mod(func(b []byte) []byte { b[12] = 0; return b }), ErrBadCommand},
		{"op kind 4", mod(func(b []byte) []byte { b[20] = 4; return b }), ErrBadCommand},
		{"flags", mod(func(b []byte) []byte { b[21] = 3; return b }), ErrBadCommand},
		{"nohole on write", mod(func(b []byte) []byte { b[13] = 1; return b }), ErrBadCommand},
		{"data too long", mod(func(b []byte) []byte { b[15] = 60; return b }), ErrBadCommand},
		{"non-canonical varint", mod(func(b []byte) []byte {
			// session 1 as 0x81 0x00
			return append(append(append([]byte(nil), b[:7]...), 0x81, 0x00), b[8:]...)
		}), ErrBadCommand},
		{"varint overflow", reCRC(append(append([]byte{codecMagic, codecVersion, cmdEndSession},
			0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02), 0, 0, 0, 0)), ErrBadCommand},
		{"varint too long", reCRC(append(append([]byte{codecMagic, codecVersion, cmdEndSession},
			0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01), 0, 0, 0, 0)), ErrBadCommand},
		{"size over int64", reCRC(append(append([]byte{codecMagic, codecVersion, cmdResize, 1, 'v'},
			0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01), 0, 0, 0, 0)), ErrBadCommand},
		{"range overflow", reCRC(append(append([]byte{codecMagic, codecVersion, cmdWriteBatch, 1, 'v', 1, 1, 0, 0, 1, byte(OpZero), 0},
			0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0x01), 0, 0, 0, 0)), ErrBadCommand},
		{"empty verify id", reCRC([]byte{codecMagic, codecVersion, cmdVerify, 0, 1, 'v', 0, 1, 1, 0, 0, 0, 0}), ErrBadCommand},
		{"block size", reCRC(append(append([]byte{codecMagic, codecVersion, cmdCreate, 1, 'v', 1},
			0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0), 0, 0, 0, 0)), ErrBadCommand},
		{"create flags", reCRC([]byte{codecMagic, codecVersion, cmdCreate, 1, 'v', 1, 1, 0, 2, 0, 0, 0, 0}), ErrBadCommand},
		{"create ok", reCRC([]byte{codecMagic, codecVersion, cmdCreate, 1, 'v', 1, 1, 0, 1, 0, 0, 0, 0}), nil},
	}
	for _, c := range cases {
		cmd, err := Decode(c.data)
		if !errors.Is(err, c.want) || (c.want == nil && err != nil) {
			t.Errorf("%s: Decode = %#v, %v; want %v", c.name, cmd, err, c.want)
		}
	}
	// Every truncation of every sample, with a valid CRC, is rejected.
	for _, cmd := range sampleCommands() {
		b := mustEncode(t, cmd)
		body := b[:len(b)-4]
		for n := 0; n < len(body); n++ {
			trunc := reCRC(append(append([]byte(nil), body[:n]...), 0, 0, 0, 0))
			if _, err := Decode(trunc); err == nil {
				t.Fatalf("%T truncated to %d bytes decodes", cmd, n)
			}
		}
	}
}

func FuzzDecode(f *testing.F) {
	for _, cmd := range sampleCommands() {
		b, err := Encode(cmd)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		in := append([]byte(nil), data...)
		cmd, err := Decode(data)
		if !bytes.Equal(in, data) {
			t.Fatalf("Decode modified its input")
		}
		if err != nil {
			if !errors.Is(err, ErrBadCommand) && !errors.Is(err, ErrUnsupportedVersion) {
				t.Fatalf("Decode error %v wraps neither ErrBadCommand nor ErrUnsupportedVersion", err)
			}
			return
		}
		b, err := Encode(cmd)
		if err != nil {
			t.Fatalf("Encode(Decode(x)): %v", err)
		}
		if !bytes.Equal(b, data) {
			t.Fatalf("Encode(Decode(x)) != x:\n%x\n%x", b, data)
		}
		cmd2, err := Decode(b)
		if err != nil || !reflect.DeepEqual(cmd, cmd2) {
			t.Fatalf("Decode(Encode(x)) = %#v, %v; want %#v", cmd2, err, cmd)
		}
		if wb, ok := cmd.(*WriteBatch); ok && EncodedSize(wb) != len(data) {
			t.Fatalf("EncodedSize %d, len %d", EncodedSize(wb), len(data))
		}
	})
}

func BenchmarkDecode(b *testing.B) {
	ops := make([]Op, 128)
	data := make([]byte, 4*KiB)
	for i := range ops {
		ops[i] = write(int64(i)*4*KiB, data)
	}
	enc, err := Encode(&WriteBatch{Volume: "bench", Session: 1, Seq: 1, Ops: ops})
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(enc)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Decode(enc); err != nil {
			b.Fatal(err)
		}
	}
}
