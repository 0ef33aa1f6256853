package fsm

// Golden files freeze the bytes that sites exchange (raft log entries,
// snapshot streams) and store (the state file, a local snapshot's state
// stream). Each test decodes a file under testdata/golden, checks the
// decoded value field by field against the Go value written here, and
// re-encodes it and compares the bytes exactly. A change to an encoder or a
// decoder that alters any format fails here, instead of passing every other
// test and making sites of different builds diverge.
//
// Regenerating: `go test ./fsm -run Golden -update` (or
// ROBIB_UPDATE_GOLDEN=1) rewrites the files of the current versions from
// the values below. That is allowed only together with a version bump of
// the format concerned (codecVersion, stateVersion, streamVersion) and the
// compatibility rule of DESIGN.md ("Format versions"): the old version's
// file then moves to a *_vN name, is never regenerated again, and must keep
// decoding. Files of old versions are built by hand below, byte by byte
// from the documented layout, never with today's encoder; -update only
// creates them when missing.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/robib/robib/volume"
)

var updateGolden = flag.Bool("update", false, "rewrite the golden files of the current format versions (only with a version bump)")

func updating() bool { return *updateGolden || os.Getenv("ROBIB_UPDATE_GOLDEN") == "1" }

const goldenDir = "testdata/golden"

// goldenCurrent returns the golden file name, after rewriting it from
// encoded when updating.
func goldenCurrent(t *testing.T, name string, encoded []byte) []byte {
	t.Helper()
	path := filepath.Join(goldenDir, name)
	if updating() {
		if err := os.MkdirAll(goldenDir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, encoded, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("golden file: %v (a new format gets its file with -update)", err)
	}
	return b
}

// goldenOld returns the golden file of an old format version and checks
// that it holds exactly the hand-built bytes. Updating creates a missing
// file but never rewrites one.
func goldenOld(t *testing.T, name string, handBuilt []byte) []byte {
	t.Helper()
	path := filepath.Join(goldenDir, name)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) && updating() {
		if err := os.WriteFile(path, handBuilt, 0o644); err != nil {
			t.Fatal(err)
		}
		b, err = handBuilt, nil
	}
	if err != nil {
		t.Fatalf("golden file: %v", err)
	}
	if !bytes.Equal(b, handBuilt) {
		t.Fatalf("%s differs from its hand-built layout:\nfile  %x\nbuilt %x", name, b, handBuilt)
	}
	return b
}

// sameBytes fails unless re-encoding gave the golden bytes.
func sameBytes(t *testing.T, name string, got, golden []byte) {
	t.Helper()
	if bytes.Equal(got, golden) {
		return
	}
	i := 0
	for i < len(got) && i < len(golden) && got[i] == golden[i] {
		i++
	}
	t.Errorf("%s: re-encoding differs from the golden file at byte %d (len %d, golden %d):\ngot    %x\ngolden %x",
		name, i, len(got), len(golden), window(got, i), window(golden, i))
}

func window(b []byte, i int) []byte {
	lo, hi := max(0, i-8), min(len(b), i+24)
	return b[lo:hi]
}

// checkFields compares got with want field by field (recursing into
// pointers, structs and slices; time.Time by Equal) and reports every
// differing field by its path.
func checkFields(t *testing.T, what string, got, want any) {
	t.Helper()
	var diffs []string
	diffValues(&diffs, what, reflect.ValueOf(got), reflect.ValueOf(want))
	for _, d := range diffs {
		t.Error(d)
	}
}

var timeType = reflect.TypeOf(time.Time{})

func diffValues(diffs *[]string, path string, got, want reflect.Value) {
	if got.IsValid() != want.IsValid() {
		*diffs = append(*diffs, fmt.Sprintf("%s: got %v, want %v", path, got, want))
		return
	}
	if !got.IsValid() {
		return
	}
	if got.Type() != want.Type() {
		*diffs = append(*diffs, fmt.Sprintf("%s: got type %s, want %s", path, got.Type(), want.Type()))
		return
	}
	switch {
	case got.Type() == timeType:
		g, w := got.Interface().(time.Time), want.Interface().(time.Time)
		if !g.Equal(w) || g.Location() != w.Location() {
			*diffs = append(*diffs, fmt.Sprintf("%s: got %v, want %v", path, g, w))
		}
	case got.Kind() == reflect.Pointer || got.Kind() == reflect.Interface:
		if got.IsNil() || want.IsNil() {
			if got.IsNil() != want.IsNil() {
				*diffs = append(*diffs, fmt.Sprintf("%s: got %v, want %v", path, got, want))
			}
			return
		}
		diffValues(diffs, path, got.Elem(), want.Elem())
	case got.Kind() == reflect.Struct:
		for i := range got.NumField() {
			f := got.Type().Field(i)
			p := path + "." + f.Name
			if f.Anonymous {
				p = path
			}
			diffValues(diffs, p, got.Field(i), want.Field(i))
		}
	case got.Kind() == reflect.Slice:
		if got.Type().Elem().Kind() == reflect.Uint8 {
			if !bytes.Equal(got.Bytes(), want.Bytes()) {
				*diffs = append(*diffs, fmt.Sprintf("%s: got %q, want %q", path, got.Bytes(), want.Bytes()))
			}
			return
		}
		if got.Len() != want.Len() {
			*diffs = append(*diffs, fmt.Sprintf("%s: got %d elements, want %d", path, got.Len(), want.Len()))
			return
		}
		for i := range got.Len() {
			diffValues(diffs, fmt.Sprintf("%s[%d]", path, i), got.Index(i), want.Index(i))
		}
	default:
		if !reflect.DeepEqual(got.Interface(), want.Interface()) {
			*diffs = append(*diffs, fmt.Sprintf("%s: got %v, want %v", path, got.Interface(), want.Interface()))
		}
	}
}

// Hand-built encodings, independent of codec.go's encoder: LEB128 varints
// in their shortest form, zigzag for signed values, length-prefixed
// strings, as the layouts in codec.go and state.go document them.

func hUv(v uint64) []byte {
	var b []byte
	for v >= 0x80 {
		b = append(b, byte(v)|0x80)
		v >>= 7
	}
	return append(b, byte(v))
}

func hSv(v int64) []byte { return hUv(uint64(v<<1) ^ uint64(v>>63)) }

func hStr(s string) []byte { return append(hUv(uint64(len(s))), s...) }

func cat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

func crcLE(b []byte) []byte {
	return binary.LittleEndian.AppendUint32(nil, crc32.Checksum(b, crc32.MakeTable(crc32.Castagnoli)))
}

// ---- commands ----

const goldenSession = 0x1234567890abcdef

// goldenCommands has one value per command type, WriteBatch with every op
// kind (and NoHole), with multi-byte varints and a negative-free zigzag
// field in each type that has one.
func goldenCommands() []struct {
	file string
	cmd  Command
} {
	return []struct {
		file string
		cmd  Command
	}{
		{"cmd_create_volume.bin", &CreateVolume{Name: "vol-a", Size: 1 << 30, BlockSize: 4096, Created: testCreated, SyncWrites: true}},
		{"cmd_delete_volume.bin", &DeleteVolume{Name: "vol-a"}},
		{"cmd_resize_volume.bin", &ResizeVolume{Name: "vol-a", Size: 2 << 30}},
		{"cmd_write_batch.bin", &WriteBatch{Volume: "vol-a", Session: goldenSession, Seq: 300, Epoch: 7, Created: testCreated, Ops: []Op{
			{Kind: OpWrite, Off: 4096, Len: 13, Data: []byte("robib golden\n")},
			{Kind: OpTrim, Off: 8192, Len: 4096},
			{Kind: OpZero, Off: 16384, Len: 65536},
			{Kind: OpZero, NoHole: true, Off: 1 << 20, Len: 4096},
		}}},
		{"cmd_end_session.bin", &EndSession{Session: goldenSession}},
		{"cmd_verify_chunks.bin", &VerifyChunks{ID: "verify-1", Volume: "vol-a", Off: 0, Len: 1 << 20, ChunkSize: 65536}},
		{"cmd_acquire_lease.bin", &AcquireLease{Volume: "vol-a", Site: "site-1", Created: testCreated, Prev: 6}},
		{"cmd_release_lease.bin", &ReleaseLease{Volume: "vol-a", Site: "site-1", Epoch: 7}},
		{"cmd_set_cluster_id.bin", &SetClusterID{ID: "c0ffee-42"}},
	}
}

func TestGoldenCommands(t *testing.T) {
	seen := map[reflect.Type]bool{}
	for _, g := range goldenCommands() {
		t.Run(g.file, func(t *testing.T) {
			seen[reflect.TypeOf(g.cmd)] = true
			enc, err := Encode(g.cmd)
			if err != nil {
				t.Fatal(err)
			}
			golden := goldenCurrent(t, g.file, enc)
			got, err := Decode(golden)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			checkFields(t, g.file, got, g.cmd)
			re, err := Encode(got)
			if err != nil {
				t.Fatalf("re-encode: %v", err)
			}
			sameBytes(t, g.file, re, golden)
		})
	}
	// Every command type has a golden file.
	for _, cmd := range []Command{&CreateVolume{}, &DeleteVolume{}, &ResizeVolume{}, &WriteBatch{}, &EndSession{},
		&VerifyChunks{}, &AcquireLease{}, &ReleaseLease{}, &SetClusterID{}} {
		if !seen[reflect.TypeOf(cmd)] {
			t.Errorf("no golden file for %T", cmd)
		}
	}
}

// TestGoldenCommandLayout checks the golden files against the layout that
// codec.go documents, built by hand: the golden files are not merely what
// today's encoder happens to write.
func TestGoldenCommandLayout(t *testing.T) {
	frame := func(typ byte, body ...[]byte) []byte {
		b := cat(append([]byte{0xB7, 1, typ}, cat(body...)...))
		return append(b, crcLE(b)...)
	}
	for file, want := range map[string][]byte{
		"cmd_create_volume.bin": frame(1, hStr("vol-a"), hUv(1<<30), hUv(4096), hSv(testCreated), []byte{1}),
		"cmd_delete_volume.bin": frame(2, hStr("vol-a")),
		"cmd_resize_volume.bin": frame(3, hStr("vol-a"), hUv(2<<30)),
		"cmd_write_batch.bin": frame(4, hStr("vol-a"), hUv(goldenSession), hUv(300), hUv(7), hSv(testCreated), hUv(4),
			[]byte{1, 0}, hUv(4096), hUv(13), []byte("robib golden\n"),
			[]byte{2, 0}, hUv(8192), hUv(4096),
			[]byte{3, 0}, hUv(16384), hUv(65536),
			[]byte{3, 1}, hUv(1<<20), hUv(4096)),
		"cmd_end_session.bin":    frame(5, hUv(goldenSession)),
		"cmd_verify_chunks.bin":  frame(6, hStr("verify-1"), hStr("vol-a"), hUv(0), hUv(1<<20), hUv(65536)),
		"cmd_acquire_lease.bin":  frame(7, hStr("vol-a"), hStr("site-1"), hSv(testCreated), hUv(6)),
		"cmd_release_lease.bin":  frame(8, hStr("vol-a"), hStr("site-1"), hUv(7)),
		"cmd_set_cluster_id.bin": frame(9, hStr("c0ffee-42")),
	} {
		b, err := os.ReadFile(filepath.Join(goldenDir, file))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, want) {
			t.Errorf("%s does not follow the documented layout:\nfile   %x\nlayout %x", file, b, want)
		}
	}
}

// ---- state file and state record ----

// goldenImage is the state of the golden state files and records: every
// field set, so each one is covered. withVolumes adds the volume list
// (state records only; a state file never lists volumes).
func goldenImage(version byte, withVolumes bool) *stateImage {
	img := &stateImage{
		Applied:    123456,
		FuzzyUntil: 1000,
		Restoring:  true,
		Sessions: []sessionEntry{
			{ID: 5, session: session{LastSeq: 9, LastIndex: 120, Volume: "vol-a", Epoch: 7}},
			{ID: goldenSession, session: session{LastSeq: 300, LastIndex: 123000, Failed: "stale_epoch", Volume: "vol-b", Epoch: 3}},
		},
		Leases: []leaseEntry{
			{Volume: "vol-a", Lease: Lease{Holder: "site-1", Epoch: 7}},
			{Volume: "vol-b", Lease: Lease{Epoch: 3}},
		},
		ClusterID: "c0ffee-42",
	}
	if withVolumes {
		// A state record travels in a snapshot stream: no local fields.
		img.Restoring, img.FuzzyUntil = false, 0
		img.Volumes = []volume.Meta{
			{Name: "vol-a", Size: 1 << 30, BlockSize: 4096, Created: time.Unix(0, testCreated).UTC(), SyncWrites: true},
			{Name: "vol-b", Size: 64 << 10, BlockSize: 512, Created: time.Unix(0, -1).UTC()},
		}
	}
	if version < 3 {
		img.ClusterID = ""
		for i := range img.Sessions {
			img.Sessions[i].Volume, img.Sessions[i].Epoch = "", 0
		}
	}
	if version < 2 {
		img.Leases = nil
	}
	return img
}

// handState builds the encodeState layout of goldenImage for an old (or the
// current) version by hand, from state.go's documentation: version 1 is
// the layout of bb36e39 (sessions with failed, no leases), version 2 that
// of adbce42 (plus the lease list).
func handState(version byte, withVolumes bool) []byte {
	img := goldenImage(version, withVolumes)
	var flags byte
	if img.Restoring {
		flags = 1
	}
	b := cat([]byte{version, flags}, hUv(img.Applied), hUv(img.FuzzyUntil), hUv(uint64(len(img.Volumes))))
	for _, m := range img.Volumes {
		var vf byte
		if m.SyncWrites {
			vf = 1
		}
		b = cat(b, hStr(m.Name), hUv(uint64(m.Size)), hUv(uint64(m.BlockSize)), hSv(m.Created.UnixNano()), []byte{vf})
	}
	b = cat(b, hUv(uint64(len(img.Sessions))))
	for _, s := range img.Sessions {
		b = cat(b, hUv(s.ID), hUv(s.LastSeq), hUv(s.LastIndex), hStr(s.Failed))
		if version >= 3 {
			b = cat(b, hStr(s.Volume), hUv(s.Epoch))
		}
	}
	if version >= 2 {
		b = cat(b, hUv(uint64(len(img.Leases))))
		for _, l := range img.Leases {
			b = cat(b, hStr(l.Volume), hStr(l.Holder), hUv(l.Epoch))
		}
	}
	if version >= 3 {
		b = cat(b, hStr(img.ClusterID))
	}
	return b
}

// handStateFile frames a state body as the state file: "RBFS", body,
// crc32c (LE) of both.
func handStateFile(body []byte) []byte {
	b := cat([]byte("RBFS"), body)
	return append(b, crcLE(b)...)
}

func encodeStateFile(img *stateImage) []byte {
	b := cat([]byte(stateFileMagic), encodeState(img))
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

func TestGoldenStateFile(t *testing.T) {
	for _, version := range []byte{1, 2, 3} {
		name := fmt.Sprintf("state_file_v%d.bin", version)
		t.Run(name, func(t *testing.T) {
			hand := handStateFile(handState(version, false))
			var golden []byte
			if version == stateVersion {
				golden = goldenCurrent(t, name, encodeStateFile(goldenImage(version, false)))
				sameBytes(t, name+" (documented layout)", golden, hand)
			} else {
				golden = goldenOld(t, name, hand)
			}
			// The state file is written through writeStateFile; check that
			// path's framing too.
			if version == stateVersion {
				dir := t.TempDir()
				if err := writeStateFile(dir, goldenImage(version, false)); err != nil {
					t.Fatal(err)
				}
				written, err := os.ReadFile(filepath.Join(dir, stateFileName))
				if err != nil {
					t.Fatal(err)
				}
				sameBytes(t, name+" (writeStateFile)", written, golden)
			}
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, stateFileName), golden, 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := readStateFile(dir)
			if err != nil {
				t.Fatalf("readStateFile: %v", err)
			}
			checkFields(t, name, got, goldenImage(version, false))
			re := encodeStateFile(got)
			if version == stateVersion {
				sameBytes(t, name, re, golden)
				return
			}
			// An old version re-encodes as the current one.
			if re[len(stateFileMagic)] != stateVersion {
				t.Fatalf("re-encoding of %s has version %d, want %d", name, re[len(stateFileMagic)], stateVersion)
			}
			sameBytes(t, name+" re-encoded", re, handStateFile(handUpgrade(got)))
		})
	}
}

// handUpgrade is the hand-built current-version body of an image decoded
// from an old version: the new fields at their zero values.
func handUpgrade(img *stateImage) []byte {
	var flags byte
	if img.Restoring {
		flags = 1
	}
	b := cat([]byte{3, flags}, hUv(img.Applied), hUv(img.FuzzyUntil), hUv(uint64(len(img.Volumes))))
	for _, m := range img.Volumes {
		var vf byte
		if m.SyncWrites {
			vf = 1
		}
		b = cat(b, hStr(m.Name), hUv(uint64(m.Size)), hUv(uint64(m.BlockSize)), hSv(m.Created.UnixNano()), []byte{vf})
	}
	b = cat(b, hUv(uint64(len(img.Sessions))))
	for _, s := range img.Sessions {
		b = cat(b, hUv(s.ID), hUv(s.LastSeq), hUv(s.LastIndex), hStr(s.Failed), hStr(s.Volume), hUv(s.Epoch))
	}
	b = cat(b, hUv(uint64(len(img.Leases))))
	for _, l := range img.Leases {
		b = cat(b, hStr(l.Volume), hStr(l.Holder), hUv(l.Epoch))
	}
	return cat(b, hStr(img.ClusterID))
}

// TestGoldenStateRecord covers the state record of a snapshot (the same
// encoding with the volume list), in every version: a local snapshot taken
// by an older build is a state stream holding such a record.
func TestGoldenStateRecord(t *testing.T) {
	for _, version := range []byte{1, 2, 3} {
		name := fmt.Sprintf("state_record_v%d.bin", version)
		t.Run(name, func(t *testing.T) {
			hand := handState(version, true)
			var golden []byte
			if version == stateVersion {
				golden = goldenCurrent(t, name, encodeState(goldenImage(version, true)))
				sameBytes(t, name+" (documented layout)", golden, hand)
			} else {
				golden = goldenOld(t, name, hand)
			}
			got, err := decodeState(golden)
			if err != nil {
				t.Fatalf("decodeState: %v", err)
			}
			checkFields(t, name, got, goldenImage(version, true))
			re := encodeState(got)
			if version == stateVersion {
				sameBytes(t, name, re, golden)
				return
			}
			if re[0] != stateVersion {
				t.Fatalf("re-encoding has version %d, want %d", re[0], stateVersion)
			}
			sameBytes(t, name+" re-encoded", re, handUpgrade(got))
		})
	}
}

// ---- snapshot streams ----

func TestGoldenStateStream(t *testing.T) {
	const name = "stream_state.bin"
	img := goldenImage(stateVersion, true)
	golden := goldenCurrent(t, name, encodeStateStream(img))
	rr := newRecordReader(bytes.NewReader(golden))
	h, got, err := rr.readPrologue()
	if err != nil {
		t.Fatalf("readPrologue: %v", err)
	}
	checkFields(t, "header", h, streamHeader{Version: 1, Kind: kindState})
	checkFields(t, "state", got, img)
	end, err := rr.readEpilogue()
	if err != nil {
		t.Fatalf("readEpilogue: %v", err)
	}
	checkFields(t, "end", end, streamEnd{Records: 2})
	sameBytes(t, name, encodeStateStream(got), golden)

	// The documented record layout, by hand.
	rec := func(typ byte, payload []byte) []byte {
		b := cat([]byte{typ}, binary.LittleEndian.AppendUint32(nil, uint32(len(payload))), payload)
		return append(b, crcLE(b)...)
	}
	hand := cat([]byte("robibsnp"),
		rec(1, cat([]byte{1, 1}, make([]byte, 8))),
		rec(2, handState(3, true)),
		rec(6, cat(binary.LittleEndian.AppendUint64(nil, 2), make([]byte, 8))))
	sameBytes(t, name+" (documented layout)", golden, hand)
}

// streamEvent is one call of an imageSink.
type streamEvent struct {
	Kind string // "volume", "data", "zero", "keep"
	I    int
	Off  int64
	N    int64
	Data []byte
}

type recordingSink struct{ events []streamEvent }

func (s *recordingSink) volume(i int, _ volume.Meta) error {
	s.events = append(s.events, streamEvent{Kind: "volume", I: i})
	return nil
}

func (s *recordingSink) data(off int64, p []byte) error {
	s.events = append(s.events, streamEvent{Kind: "data", Off: off, N: int64(len(p)), Data: bytes.Clone(p)})
	return nil
}

func (s *recordingSink) zero(off, n int64) error {
	s.events = append(s.events, streamEvent{Kind: "zero", Off: off, N: n})
	return nil
}

func (s *recordingSink) keep(off, n int64) error {
	s.events = append(s.events, streamEvent{Kind: "keep", Off: off, N: n})
	return nil
}

// goldenFull is the content of the golden full stream: three volumes, one
// written in full, one never written (a zero run), one with a zero run of
// a whole chunk before a written one.
func goldenFull() (*stateImage, map[string][]streamEvent, []streamEvent) {
	created := time.Unix(0, testCreated).UTC()
	img := &stateImage{
		Applied: 42,
		Volumes: []volume.Meta{
			{Name: "a", Size: 4096, BlockSize: 4096, Created: created},
			{Name: "b", Size: 4096, BlockSize: 512, Created: created, SyncWrites: true},
			{Name: "c", Size: streamChunk + 4096, BlockSize: 4096, Created: created},
		},
		Sessions:  []sessionEntry{{ID: 5, session: session{LastSeq: 9, LastIndex: 40, Volume: "a", Epoch: 1}}},
		Leases:    []leaseEntry{{Volume: "a", Lease: Lease{Holder: "site-1", Epoch: 1}}},
		ClusterID: "c0ffee-42",
	}
	pattern := func(n int, seed byte) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = seed + byte(i*7)
		}
		return b
	}
	writes := map[string][]streamEvent{
		"a": {{Off: 0, Data: pattern(4096, 1)}},
		"c": {{Off: streamChunk, Data: pattern(4096, 2)}},
	}
	events := []streamEvent{
		{Kind: "volume", I: 0},
		{Kind: "data", Off: 0, N: 4096, Data: pattern(4096, 1)},
		{Kind: "volume", I: 1},
		{Kind: "zero", Off: 0, N: 4096},
		{Kind: "volume", I: 2},
		{Kind: "zero", Off: 0, N: streamChunk},
		{Kind: "data", Off: streamChunk, N: 4096, Data: pattern(4096, 2)},
	}
	return img, writes, events
}

// liveFullStream is the live full-stream generator (snapshot.go) over a
// store, open until the test ends, holding img's volumes with the given
// writes.
func liveFullStream(t *testing.T, img *stateImage, writes map[string][]streamEvent, index, fuzzy uint64) *fullStream {
	t.Helper()
	st, err := volume.Open(t.TempDir(), testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	for _, m := range img.Volumes {
		v, err := st.Create(m)
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range writes[m.Name] {
			if _, err := v.WriteAt(w.Data, w.Off); err != nil {
				t.Fatal(err)
			}
		}
	}
	s, err := newFullStream(st, index, img, func() uint64 { return fuzzy })
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// produceFullStream runs the live full-stream generator (snapshot.go) over
// a store holding img's volumes with the given writes.
func produceFullStream(t *testing.T, img *stateImage, writes map[string][]streamEvent, index, fuzzy uint64) []byte {
	t.Helper()
	s := liveFullStream(t, img, writes, index, fuzzy)
	b, err := io.ReadAll(s)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(b)) != s.Size() {
		t.Fatalf("stream of %d bytes, announced %d", len(b), s.Size())
	}
	return b
}

func TestGoldenFullStream(t *testing.T) {
	const name = "stream_full.bin"
	const index, fuzzy = 50, 43
	img, writes, events := goldenFull()
	var produced []byte
	if updating() {
		produced = produceFullStream(t, img, writes, index, fuzzy)
	}
	golden := goldenCurrent(t, name, produced)

	rr := newRecordReader(bytes.NewReader(golden))
	h, got, err := rr.readPrologue()
	if err != nil {
		t.Fatalf("readPrologue: %v", err)
	}
	checkFields(t, "header", h, streamHeader{Version: 1, Kind: kindFull, Index: index})
	checkFields(t, "state", got, img)
	var sink recordingSink
	if err := rr.readImage(h, got, &sink); err != nil {
		t.Fatalf("readImage: %v", err)
	}
	checkFields(t, "records", sink.events, events)
	end, err := rr.readEpilogue()
	if err != nil {
		t.Fatalf("readEpilogue: %v", err)
	}
	checkFields(t, "end", end, streamEnd{Records: uint64(2 + len(events)), FuzzyUntil: fuzzy})
	if _, _, err := validateStream(bytes.NewReader(golden)); err != nil {
		t.Fatalf("validateStream: %v", err)
	}
	// Re-encode from the decoded state with the live generator.
	sameBytes(t, name, produceFullStream(t, got, writes, h.Index, end.FuzzyUntil), golden)
}

// goldenThin is the content of the golden thin (version 2) stream: four
// volumes against a base at index 40 that holds a, c and d in the same
// incarnation and b in another: a was written after the base (sent), b is
// sent (its zeros), c keeps its first and last chunk around a chunk
// trimmed after the base (a zero run), d is kept whole (one merged keep
// record of 2 MiB + 4 KiB).
func goldenThin() (img *stateImage, writes map[string][]streamEvent, marks map[string][]uint64, base CatchUpBase, events []streamEvent) {
	created := time.Unix(0, testCreated).UTC()
	img = &stateImage{
		Applied: 46,
		Volumes: []volume.Meta{
			{Name: "a", Size: 4096, BlockSize: 4096, Created: created},
			{Name: "b", Size: 4096, BlockSize: 4096, Created: created},
			{Name: "c", Size: 3 * streamChunk, BlockSize: 4096, Created: created},
			{Name: "d", Size: 2*streamChunk + 4096, BlockSize: 4096, Created: created, SyncWrites: true},
		},
		Sessions:  []sessionEntry{{ID: 5, session: session{LastSeq: 9, LastIndex: 45, Volume: "a", Epoch: 1}}},
		Leases:    []leaseEntry{{Volume: "a", Lease: Lease{Holder: "site-1", Epoch: 1}}},
		ClusterID: "c0ffee-42",
	}
	fill := func(n int, b byte) []byte { return bytes.Repeat([]byte{b}, n) }
	writes = map[string][]streamEvent{
		"a": {{Off: 0, Data: fill(4096, 0xa1)}},
		"c": {{Off: 0, Data: fill(4096, 0xc0)}, {Off: 2 * streamChunk, Data: fill(4096, 0xc2)}},
		"d": {{Off: streamChunk, Data: fill(4096, 0xd1)}},
	}
	marks = map[string][]uint64{"a": {41}, "b": {3}, "c": {12, 45, 12}, "d": {30, 30, 30}}
	bm := slices.Clone(img.Volumes)
	bm[1].Created = created.Add(-time.Second) // another incarnation of b
	base = CatchUpBase{Index: 40, Volumes: bm}
	events = []streamEvent{
		{Kind: "volume", I: 0},
		{Kind: "data", Off: 0, N: 4096, Data: fill(4096, 0xa1)},
		{Kind: "volume", I: 1},
		{Kind: "zero", Off: 0, N: 4096},
		{Kind: "volume", I: 2},
		{Kind: "keep", Off: 0, N: streamChunk},
		{Kind: "zero", Off: streamChunk, N: streamChunk},
		{Kind: "keep", Off: 2 * streamChunk, N: streamChunk},
		{Kind: "volume", I: 3},
		{Kind: "keep", Off: 0, N: 2*streamChunk + 4096},
	}
	return img, writes, marks, base, events
}

// produceThinStream runs the live generator with a last-write map holding
// marks and plans it against base.
func produceThinStream(t *testing.T, img *stateImage, writes map[string][]streamEvent, marks map[string][]uint64,
	base CatchUpBase, index, fuzzy uint64) []byte {
	t.Helper()
	s := liveFullStream(t, img, writes, index, fuzzy)
	var w writeMap
	w.reset(10, img.Volumes)
	for name, ms := range marks {
		for c, idx := range ms {
			w.vols[name].mark(int64(c), int64(c)+1, idx)
		}
	}
	s.marks = &w
	size, err := s.SetBase(base)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(s)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(b)) != size {
		t.Fatalf("stream of %d bytes, announced %d", len(b), size)
	}
	return b
}

func TestGoldenThinStream(t *testing.T) {
	const name = "stream_thin.bin"
	const index, fuzzy = 50, 47
	img, writes, marks, base, events := goldenThin()
	var produced []byte
	if updating() {
		produced = produceThinStream(t, img, writes, marks, base, index, fuzzy)
	}
	golden := goldenCurrent(t, name, produced)

	rr := newRecordReader(bytes.NewReader(golden))
	h, got, err := rr.readPrologue()
	if err != nil {
		t.Fatalf("readPrologue: %v", err)
	}
	wantBase := &streamBase{Index: 40, KeepEnd: []int64{0, 0, 3 * streamChunk, 2*streamChunk + 4096}}
	checkFields(t, "header", h, streamHeader{Version: 2, Kind: kindFull, Index: index, Base: wantBase})
	checkFields(t, "state", got, img)
	var sink recordingSink
	if err := rr.readImage(h, got, &sink); err != nil {
		t.Fatalf("readImage: %v", err)
	}
	checkFields(t, "records", sink.events, events)
	end, err := rr.readEpilogue()
	if err != nil {
		t.Fatalf("readEpilogue: %v", err)
	}
	checkFields(t, "end", end, streamEnd{Records: uint64(3 + len(events)), FuzzyUntil: fuzzy})
	if _, _, err := validateStream(bytes.NewReader(golden)); err != nil {
		t.Fatalf("validateStream: %v", err)
	}
	sameBytes(t, name, produceThinStream(t, got, writes, marks, base, h.Index, end.FuzzyUntil), golden)

	// The documented layout of the version 2 records, by hand: header,
	// base and keep records.
	rec := func(typ byte, payload []byte) []byte {
		b := cat([]byte{typ}, binary.LittleEndian.AppendUint32(nil, uint32(len(payload))), payload)
		return append(b, crcLE(b)...)
	}
	le := func(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }
	prologue := cat([]byte("robibsnp"),
		rec(1, cat([]byte{2, 2}, le(index))),
		rec(2, encodeState(img)),
		rec(8, cat(le(40), []byte{4, 0, 0}, binary.AppendUvarint(nil, 3*streamChunk), binary.AppendUvarint(nil, 2*streamChunk+4096))))
	if !bytes.HasPrefix(golden, prologue) {
		t.Fatalf("%s: the prologue is not the documented layout", name)
	}
	keepD := rec(7, le(2*streamChunk+4096))
	if !bytes.Contains(golden, cat(rec(3, cat([]byte{3, 1}, []byte("d"))), keepD)) {
		t.Fatalf("%s: volume d is not one keep record of the documented layout", name)
	}
}

// ---- newer versions are refused ----

// TestNewerFormatRefused checks the compatibility rule (DESIGN.md, "Format
// versions"): every decoder refuses a version newer than it knows, with an
// error naming that version, before anything is applied.
func TestNewerFormatRefused(t *testing.T) {
	read := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join(goldenDir, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	wantVersion := func(what string, err error, v byte) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s of version %d accepted", what, v)
		}
		if !strings.Contains(err.Error(), fmt.Sprintf("version %d", v)) {
			t.Fatalf("%s of version %d: error %q does not name the version", what, v, err)
		}
	}

	// Command: a raft entry of codec version 2.
	cmd := reCRC(func() []byte { b := bytes.Clone(read("cmd_create_volume.bin")); b[1] = codecVersion + 1; return b }())
	_, err := Decode(cmd)
	wantVersion("command", err, codecVersion+1)
	if !errors.Is(err, ErrUnsupportedVersion) {
		t.Fatalf("command error %v does not wrap ErrUnsupportedVersion", err)
	}

	// State record and state file of version 4.
	rec := bytes.Clone(read("state_record_v3.bin"))
	rec[0] = stateVersion + 1
	_, err = decodeState(rec)
	wantVersion("state record", err, stateVersion+1)
	if !errors.Is(err, errCorruptState) {
		t.Fatalf("state error %v does not wrap errCorruptState", err)
	}
	file := bytes.Clone(read("state_file_v3.bin"))
	file[len(stateFileMagic)] = stateVersion + 1
	binary.LittleEndian.PutUint32(file[len(file)-4:], crc32.Checksum(file[:len(file)-4], castagnoli))
	dir := t.TempDir()
	st, err := volume.Open(filepath.Join(dir, "volumes"), testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if err := os.MkdirAll(filepath.Join(dir, "fsm"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "fsm", stateFileName), file, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := New(st, filepath.Join(dir, "fsm"), Options{Logger: testLogger(t)})
	if err == nil {
		f.Close()
	}
	wantVersion("state file", err, stateVersion+1)

	// Streams: a newer stream version, and a current stream carrying a
	// newer state record.
	stream := bytes.Clone(read("stream_full.bin"))
	stream[len(streamMagic)+5] = streamVersion + 1 // header payload byte 0
	hdrEnd := len(streamMagic) + recOverhead + headerPayload
	binary.LittleEndian.PutUint32(stream[hdrEnd-4:], crc32.Checksum(stream[len(streamMagic):hdrEnd-4], castagnoli))
	_, _, err = validateStream(bytes.NewReader(stream))
	wantVersion("stream", err, streamVersion+1)

	img := goldenImage(stateVersion, true)
	state := encodeState(img)
	state[0] = stateVersion + 1
	b := append([]byte(streamMagic), appendRecord(nil, recHeader, headerRecordPayload(streamHeader{Kind: kindState}))...)
	b = appendRecord(b, recState, state)
	b = appendRecord(b, recEnd, endRecordPayload(streamEnd{Records: 2}))
	_, _, err = validateStream(bytes.NewReader(b))
	wantVersion("stream state record", err, stateVersion+1)
}

// TestNewerFormatAppliesNothing: a site refuses a newer command or
// snapshot whole; its replicated state is exactly as before.
func TestNewerFormatAppliesNothing(t *testing.T) {
	s := newSite(t, t.TempDir(), Options{})
	l := &testLog{t: t}
	s.mustApply(l, create("v", 64*KiB))
	s.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 1, Ops: []Op{write(0, []byte("before"))}})
	before := s.read("v")
	sessions := sessionList(s.fsm.sessions)

	// A newer command: a verdict, nothing written, no session changed.
	e := entry(t, uint64(len(l.entries)+1), &WriteBatch{Volume: "v", Session: 1, Seq: 2, Ops: []Op{write(0, []byte("after!"))}})
	e.Data[1] = codecVersion + 1
	reCRC(e.Data)
	l.entries = append(l.entries, e)
	if r := s.applyLog(e); !errors.Is(r.Err, ErrUnsupportedVersion) {
		t.Fatalf("newer command: %v, want ErrUnsupportedVersion", r.Err)
	}
	if got := s.read("v"); !bytes.Equal(got, before) {
		t.Fatalf("newer command changed the volume: %q", got[:8])
	}
	if got := sessionList(s.fsm.sessions); !reflect.DeepEqual(got, sessions) {
		t.Fatalf("newer command changed the sessions: %v, want %v", got, sessions)
	}

	// A snapshot whose stream is of a newer version: Restore refuses it
	// before touching a volume. The stream would delete "v" (it does not
	// list it) and create its own volumes.
	stream := bytes.Clone(mustRead(t, filepath.Join(goldenDir, "stream_full.bin")))
	stream[len(streamMagic)+5] = streamVersion + 1
	hdrEnd := len(streamMagic) + recOverhead + headerPayload
	binary.LittleEndian.PutUint32(stream[hdrEnd-4:], crc32.Checksum(stream[len(streamMagic):hdrEnd-4], castagnoli))
	err := s.fsm.Restore(io.NopCloser(bytes.NewReader(stream)))
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("version %d", streamVersion+1)) {
		t.Fatalf("Restore of a newer stream: %v", err)
	}
	if ms := s.store.List(); len(ms) != 1 || ms[0].Name != "v" {
		t.Fatalf("Restore of a newer stream changed the volumes: %v", ms)
	}
	if got := s.read("v"); !bytes.Equal(got, before) {
		t.Fatalf("Restore of a newer stream changed the volume bytes")
	}
	// The snapshot store refuses to keep it: the install fails, nothing is
	// listed.
	ss := s.snapStore()
	_, err = receive(t, ss, &raft.SnapshotMeta{Index: 50, Term: 3, Configuration: testConfig, ConfigurationIndex: 1}, bytes.NewReader(stream))
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("version %d", streamVersion+1)) {
		t.Fatalf("receiving a newer stream: %v", err)
	}
	if list, err := ss.List(); err != nil || len(list) != 0 {
		t.Fatalf("after a refused install List = %v, %v", list, err)
	}
	// The site is not failed: it still applies the next command.
	s.mustApply(l, &WriteBatch{Volume: "v", Session: 1, Seq: 2, Ops: []Op{write(0, []byte("later!"))}})
	if got := s.read("v"); string(got[:6]) != "later!" {
		t.Fatalf("after the refusals: %q", got[:6])
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
