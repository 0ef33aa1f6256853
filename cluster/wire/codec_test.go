package wire

//lint:file-ignore SA1019 raft v1.7.3 still fills and reads the deprecated Leader and Candidate fields, so the frame format carries them

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

var at = time.Date(2026, 12, 3, 13, 52, 4, 123456789, time.UTC)

func hdr(id, addr string) raft.RPCHeader {
	return raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax, ID: []byte(id), Addr: []byte(addr)}
}

// sample is one golden message: a request or a response with its remote
// error text.
type sample struct {
	name   string
	msg    any
	rpcErr string
	crc    bool
}

func samples() []sample {
	return []sample{
		{name: "append_entries_request", msg: &raft.AppendEntriesRequest{
			RPCHeader: hdr("site-a", "10.0.0.1:7000"), Term: 7, Leader: []byte("10.0.0.1:7000"),
			PrevLogEntry: 41, PrevLogTerm: 6, LeaderCommitIndex: 40,
			Entries: []*raft.Log{
				{Index: 42, Term: 7, Type: raft.LogCommand, Data: []byte("block write 1"), Extensions: []byte("ext"), AppendedAt: at},
				{Index: 43, Term: 7, Type: raft.LogConfiguration, Data: []byte{}, Extensions: nil, AppendedAt: time.Time{}},
				{Index: 44, Term: 7, Type: raft.LogNoop, Data: nil, Extensions: []byte{}, AppendedAt: at.Add(time.Second)},
				{Index: 45, Term: 7, Type: raft.LogConfiguration, Data: []byte("config"), AppendedAt: at.Add(2 * time.Second)},
			}}},
		{name: "append_entries_request_crc", crc: true, msg: &raft.AppendEntriesRequest{
			RPCHeader: hdr("site-a", "10.0.0.1:7000"), Term: 8, Leader: []byte("10.0.0.1:7000"),
			PrevLogEntry: 44, PrevLogTerm: 7, LeaderCommitIndex: 44,
			Entries: []*raft.Log{{Index: 45, Term: 8, Type: raft.LogCommand, Data: []byte("payload"), AppendedAt: at}}}},
		{name: "append_entries_heartbeat", msg: &raft.AppendEntriesRequest{
			RPCHeader: hdr("site-a", "10.0.0.1:7000"), Term: 7, Leader: []byte("10.0.0.1:7000")}},
		{name: "append_entries_response", rpcErr: "", msg: &raft.AppendEntriesResponse{
			RPCHeader: hdr("site-b", "10.0.0.2:7000"), Term: 7, LastLog: 44, Success: true, NoRetryBackoff: true}},
		{name: "append_entries_response_error", rpcErr: "log store full", msg: &raft.AppendEntriesResponse{
			RPCHeader: hdr("site-b", "10.0.0.2:7000"), Term: 7, LastLog: 40}},
		{name: "request_vote_request", msg: &raft.RequestVoteRequest{
			RPCHeader: hdr("site-c", "10.0.0.3:7000"), Term: 9, Candidate: []byte("10.0.0.3:7000"),
			LastLogIndex: 44, LastLogTerm: 7, LeadershipTransfer: true}},
		{name: "request_vote_response", msg: &raft.RequestVoteResponse{
			RPCHeader: hdr("site-a", "10.0.0.1:7000"), Term: 9, Peers: []byte("peers"), Granted: true}},
		{name: "request_prevote_request", msg: &raft.RequestPreVoteRequest{
			RPCHeader: hdr("site-c", "10.0.0.3:7000"), Term: 10, LastLogIndex: 44, LastLogTerm: 7}},
		{name: "request_prevote_response", msg: &raft.RequestPreVoteResponse{
			RPCHeader: hdr("site-a", "10.0.0.1:7000"), Term: 9, Granted: true}},
		{name: "install_snapshot_request", msg: &raft.InstallSnapshotRequest{
			RPCHeader: hdr("site-a", "10.0.0.1:7000"), SnapshotVersion: raft.SnapshotVersionMax, Term: 7,
			Leader: []byte("10.0.0.1:7000"), LastLogIndex: 44, LastLogTerm: 7, Peers: []byte{},
			Configuration: []byte("configuration"), ConfigurationIndex: 3, Size: 1 << 30}},
		{name: "install_snapshot_response", msg: &raft.InstallSnapshotResponse{
			RPCHeader: hdr("site-b", "10.0.0.2:7000"), Term: 7, Success: true}},
		{name: "timeout_now_request", msg: &raft.TimeoutNowRequest{RPCHeader: hdr("site-a", "10.0.0.1:7000")}},
		{name: "timeout_now_response", msg: &raft.TimeoutNowResponse{RPCHeader: raft.RPCHeader{ProtocolVersion: 3, ID: nil, Addr: []byte{}}}},
	}
}

// frameBytes encodes msg into one contiguous frame.
func frameBytes(t testing.TB, msg any, rpcErr string, crc bool) []byte {
	t.Helper()
	var e encoder
	bufs, err := e.encode(msg, rpcErr, DefaultMaxFrame, crc)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Join(bufs, nil)
}

// decodeAny decodes a whole frame: a request, a response (into a new
// struct) or a reject (returned as its reason).
func decodeAny(b []byte, maxFrame int) (msg any, rpcErr string, f frame, err error) {
	f, err = decodeFrame(b, maxFrame)
	if err != nil {
		return nil, "", f, err
	}
	switch {
	case f.kind == kindReject:
		_, err = decodeResponse(f, 0, nil)
		var reason string
		if errors.Is(err, ErrRejected) {
			d := &decoder{meta: f.meta()}
			reason, err = d.str(), nil
		}
		return nil, reason, f, err
	case f.kind&respFlag != 0:
		req := f.kind &^ respFlag
		resp := responseFor(req)
		rpcErr, err = decodeResponse(f, req, resp)
		return resp, rpcErr, f, err
	default:
		msg, err = decodeRequest(f)
		return msg, "", f, err
	}
}

// reencode encodes a decoded frame again, the way it came.
func reencode(t testing.TB, msg any, rpcErr string, f frame) []byte {
	t.Helper()
	var e encoder
	var bufs [][]byte
	var err error
	if f.kind == kindReject {
		bufs, err = e.reject(rpcErr, DefaultMaxFrame)
	} else {
		bufs, err = e.encode(msg, rpcErr, DefaultMaxFrame, f.flags&flagPayloadCRC != 0)
	}
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Join(bufs, nil)
}

// TestGolden freezes the format: each golden file decodes to its sample
// message exactly and encodes back to the same bytes. Run with -update
// only when the format version changes.
func TestGolden(t *testing.T) {
	for _, s := range samples() {
		t.Run(s.name, func(t *testing.T) {
			path := filepath.Join("testdata", s.name+".bin")
			want := frameBytes(t, s.msg, s.rpcErr, s.crc)
			if *update {
				if err := os.WriteFile(path, want, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			golden, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			msg, rpcErr, f, err := decodeAny(golden, DefaultMaxFrame)
			if err != nil {
				t.Fatalf("decoding the golden file: %v", err)
			}
			if !reflect.DeepEqual(msg, s.msg) || rpcErr != s.rpcErr {
				t.Fatalf("golden decodes to\n%#v %q\nwant\n%#v %q", msg, rpcErr, s.msg, s.rpcErr)
			}
			if got := reencode(t, msg, rpcErr, f); !bytes.Equal(got, golden) {
				t.Fatalf("re-encoding differs from the golden file:\n got %x\nwant %x", got, golden)
			}
			if !bytes.Equal(want, golden) {
				t.Fatalf("the sample encodes differently from the golden file:\n got %x\nwant %x", want, golden)
			}
		})
	}
}

// TestGoldenDetectsChanges: changing any one field of a sample changes its
// encoding (so TestGolden would fail), and any flipped bit of a golden
// file fails to decode or decodes to something else.
func TestGoldenDetectsChanges(t *testing.T) {
	s := samples()[0]
	golden := frameBytes(t, s.msg, "", false)
	for name, change := range map[string]func(m *raft.AppendEntriesRequest){
		"ProtocolVersion":   func(m *raft.AppendEntriesRequest) { m.ProtocolVersion-- },
		"ID":                func(m *raft.AppendEntriesRequest) { m.ID = []byte("site-x") },
		"Addr":              func(m *raft.AppendEntriesRequest) { m.Addr = nil },
		"Term":              func(m *raft.AppendEntriesRequest) { m.Term++ },
		"Leader":            func(m *raft.AppendEntriesRequest) { m.Leader = []byte{} },
		"PrevLogEntry":      func(m *raft.AppendEntriesRequest) { m.PrevLogEntry++ },
		"PrevLogTerm":       func(m *raft.AppendEntriesRequest) { m.PrevLogTerm++ },
		"LeaderCommitIndex": func(m *raft.AppendEntriesRequest) { m.LeaderCommitIndex++ },
		"Index":             func(m *raft.AppendEntriesRequest) { m.Entries[0].Index++ },
		"LogTerm":           func(m *raft.AppendEntriesRequest) { m.Entries[0].Term++ },
		"Type":              func(m *raft.AppendEntriesRequest) { m.Entries[0].Type = raft.LogBarrier },
		"Data":              func(m *raft.AppendEntriesRequest) { m.Entries[0].Data = []byte("block write 2") },
		"DataNil":           func(m *raft.AppendEntriesRequest) { m.Entries[1].Data = nil },
		"Extensions":        func(m *raft.AppendEntriesRequest) { m.Entries[0].Extensions = []byte("exu") },
		"ExtensionsEmpty":   func(m *raft.AppendEntriesRequest) { m.Entries[2].Extensions = nil },
		"AppendedAt":        func(m *raft.AppendEntriesRequest) { m.Entries[0].AppendedAt = at.Add(time.Nanosecond) },
		"Entries":           func(m *raft.AppendEntriesRequest) { m.Entries = m.Entries[:2] },
		"ConfigData":        func(m *raft.AppendEntriesRequest) { m.Entries[3].Data = []byte("confih") },
	} {
		m := samples()[0].msg.(*raft.AppendEntriesRequest)
		change(m)
		if bytes.Equal(frameBytes(t, m, "", false), golden) {
			t.Errorf("changing %s leaves the encoding unchanged", name)
		}
	}
	for i := range len(golden) * 8 {
		b := bytes.Clone(golden)
		b[i/8] ^= 1 << (i % 8)
		msg, _, _, err := decodeAny(b, DefaultMaxFrame)
		if err == nil && reflect.DeepEqual(msg, s.msg) {
			t.Fatalf("flipping bit %d goes unnoticed", i)
		}
		// Only the Data of LogCommand entries ("block write 1", the payload's
		// first bytes) is left to robib's own checksum when the frame has no
		// payload crc; any other flipped bit is caught.
		cmdStart := len(golden) - len("block write 1extconfig")
		if inCmd := i/8 >= cmdStart && i/8 < cmdStart+len("block write 1"); err == nil && !inCmd {
			t.Fatalf("flipping bit %d (byte %d, outside command data) decodes", i, i/8)
		}
	}
}

// TestNilAndEmpty: nil and empty byte slices and entry lists stay apart.
func TestNilAndEmpty(t *testing.T) {
	for _, m := range []*raft.AppendEntriesRequest{
		{Entries: nil},
		{Entries: []*raft.Log{}},
		{Leader: []byte{}, RPCHeader: raft.RPCHeader{ID: []byte{}, Addr: nil}, Entries: []*raft.Log{{Data: []byte{}, Extensions: nil}, {Data: nil, Extensions: []byte{}}}},
	} {
		got, _, _, err := decodeAny(frameBytes(t, m, "", false), DefaultMaxFrame)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, m) {
			t.Fatalf("got %#v, want %#v", got, m)
		}
	}
}

// TestDecodedDataAliasesFrame: entries slice into the frame buffer, with
// their capacity capped (an append never reaches the next entry).
func TestDecodedDataAliasesFrame(t *testing.T) {
	m := &raft.AppendEntriesRequest{Entries: []*raft.Log{{Data: []byte("aaaa"), Extensions: []byte("bb")}, {Data: []byte("cccc")}}}
	b := frameBytes(t, m, "", false)
	got, _, f, err := decodeAny(b, DefaultMaxFrame)
	if err != nil {
		t.Fatal(err)
	}
	es := got.(*raft.AppendEntriesRequest).Entries
	p := f.payload()
	if &es[0].Data[0] != &p[0] || &es[0].Extensions[0] != &p[4] || &es[1].Data[0] != &p[6] {
		t.Fatal("decoded entries do not slice into the frame's payload")
	}
	if cap(es[0].Data) != 4 || cap(es[0].Extensions) != 2 {
		t.Fatalf("capacities %d, %d: an append would overwrite the next field", cap(es[0].Data), cap(es[0].Extensions))
	}
	_ = append(es[0].Data, 'x')
	if string(es[0].Extensions) != "bb" {
		t.Fatal("append to Data changed Extensions")
	}
}

// TestEncodeDoesNotCopyPayload: the buffers to write are the caller's
// slices themselves.
func TestEncodeDoesNotCopyPayload(t *testing.T) {
	data, ext := make([]byte, 1<<20), []byte("ext")
	var e encoder
	bufs, err := e.encode(&raft.AppendEntriesRequest{Entries: []*raft.Log{{Data: data, Extensions: ext}}}, "", DefaultMaxFrame, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(bufs) != 3 || &bufs[1][0] != &data[0] || &bufs[2][0] != &ext[0] {
		t.Fatalf("payload is not written from the caller's slices: %d buffers", len(bufs))
	}
}

// corrupt rebuilds a frame's checksums after change edited it, so that
// the decoder's structural checks (not the crc) must catch the edit.
func corrupt(b []byte, change func(b []byte)) []byte {
	b = bytes.Clone(b)
	change(b)
	mlen := binary.LittleEndian.Uint32(b[8:])
	if int(headerSize+mlen) <= len(b) {
		binary.LittleEndian.PutUint32(b[16:], crcOf(b[headerSize:headerSize+mlen]))
	}
	binary.LittleEndian.PutUint32(b[28:], crcOf(b[:28]))
	return b
}

func TestDecodeBadFrames(t *testing.T) {
	ae := frameBytes(t, samples()[0].msg, "", false)
	vote := frameBytes(t, samples()[5].msg, "", false)
	withCRC := frameBytes(t, samples()[1].msg, "", true)
	for _, c := range []struct {
		name string
		b    []byte
		want error
	}{
		{"empty", nil, ErrTruncated},
		{"short header", ae[:headerSize-1], ErrTruncated},
		{"garbage", bytes.Repeat([]byte("GET / HTTP/1.1\r\n"), 4), ErrMagic},
		{"msgpack transport", append([]byte{0, 0x87}, ae[2:]...), ErrMagic},
		{"version 2", corrupt(ae, func(b []byte) { b[4] = 2 }), ErrVersion},
		{"version 0", corrupt(ae, func(b []byte) { b[4] = 0 }), ErrVersion},
		{"header crc", func() []byte { b := bytes.Clone(ae); b[28] ^= 1; return b }(), ErrChecksum},
		{"metadata crc", func() []byte { b := bytes.Clone(ae); b[headerSize+1] ^= 1; return b }(), ErrChecksum},
		{"payload crc", func() []byte { b := bytes.Clone(withCRC); b[len(b)-1] ^= 1; return b }(), ErrChecksum},
		{"unknown kind", corrupt(ae, func(b []byte) { b[6] = 9 }), ErrMalformed},
		{"unknown flag", corrupt(ae, func(b []byte) { b[7] = 2 }), ErrMalformed},
		{"payload crc without flag", corrupt(ae, func(b []byte) { b[20] = 1 }), ErrMalformed},
		{"reserved", corrupt(ae, func(b []byte) { b[24] = 1 }), ErrMalformed},
		{"oversized", corrupt(ae, func(b []byte) { binary.LittleEndian.PutUint32(b[12:], 0xFFFFFFF0) }), ErrTooLarge},
		{"truncated body", ae[:len(ae)-1], ErrTruncated},
		{"trailing bytes", append(bytes.Clone(ae), 0), ErrMalformed},
		{"bad bool", corrupt(vote, func(b []byte) { b[len(b)-1] = 2 }), ErrMalformed},
		{"metadata too short", corrupt(vote, func(b []byte) {
			binary.LittleEndian.PutUint32(b[8:], binary.LittleEndian.Uint32(b[8:])-1)
			binary.LittleEndian.PutUint32(b[12:], 1)
		}), ErrMalformed},
		{"metadata too long", corrupt(append(bytes.Clone(vote), 0), func(b []byte) {
			binary.LittleEndian.PutUint32(b[8:], binary.LittleEndian.Uint32(b[8:])+1)
		}), ErrMalformed},
		{"error text past the end", corrupt(frameBytes(t, samples()[4].msg, samples()[4].rpcErr, false), func(b []byte) {
			binary.LittleEndian.PutUint32(b[headerSize:], 1000)
		}), ErrMalformed},
		{"field past the end", corrupt(vote, func(b []byte) { binary.LittleEndian.PutUint32(b[headerSize+8:], 1000) }), ErrMalformed},
		{"entry count past the end", corrupt(ae, func(b []byte) {
			off := headerSize + 8 + 4 + 6 + 4 + 13 + 8 + 4 + 13 + 8 + 8 + 8
			binary.LittleEndian.PutUint32(b[off:], 1<<30)
		}), ErrMalformed},
		{"data past the payload", corrupt(ae[:len(ae)-1], func(b []byte) {
			binary.LittleEndian.PutUint32(b[12:], binary.LittleEndian.Uint32(b[12:])-1)
		}), ErrMalformed},
		{"nanoseconds", corrupt(ae, func(b []byte) {
			off := headerSize + 8 + 4 + 6 + 4 + 13 + 8 + 4 + 13 + 8 + 8 + 8 + 4 + 8 + 8 + 1 + 8
			binary.LittleEndian.PutUint32(b[off:], 1e9)
		}), ErrMalformed},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, _, _, err := decodeAny(c.b, DefaultMaxFrame)
			if !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
		})
	}
	// A body over the configured cap is refused on both sides.
	if _, _, _, err := decodeAny(ae, len(ae)-headerSize-1); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("oversized for the cap: %v", err)
	}
	var e encoder
	if _, err := e.encode(samples()[0].msg, "", 100, false); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("encoding over the cap: %v", err)
	}
	if _, err := e.encode(&raft.AppendEntriesRequest{Entries: []*raft.Log{nil}}, "", DefaultMaxFrame, false); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("nil entry: %v", err)
	}
	if _, err := e.encode(struct{}{}, "", DefaultMaxFrame, false); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("unknown message: %v", err)
	}
	if _, err := e.encode(&raft.InstallSnapshotRequest{Size: -1}, "", DefaultMaxFrame, false); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("negative snapshot size: %v", err)
	}
	// A response of the wrong kind for the request.
	f, err := decodeFrame(frameBytes(t, samples()[3].msg, "", false), DefaultMaxFrame)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := decodeResponse(f, kindRequestVote, &raft.RequestVoteResponse{}); !errors.Is(err, ErrMalformed) {
		t.Fatalf("response of another kind: %v", err)
	}
	if _, err := decodeRequest(f); !errors.Is(err, ErrMalformed) {
		t.Fatalf("response decoded as a request: %v", err)
	}
}

func crcOf(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// FuzzDecodeFrame: any input either fails with one of the package's
// errors or decodes to a message that encodes back to the same bytes;
// never a panic, never an allocation past the cap.
func FuzzDecodeFrame(f *testing.F) {
	for _, s := range samples() {
		f.Add(frameBytes(f, s.msg, s.rpcErr, s.crc))
	}
	var e encoder
	r, _ := e.reject("no", DefaultMaxFrame)
	f.Add(bytes.Join(r, nil))
	f.Add([]byte("RBWF"))
	f.Fuzz(func(t *testing.T, b []byte) {
		msg, rpcErr, fr, err := decodeAny(b, 1<<20)
		if err != nil {
			if !isFrameErr(err) {
				t.Fatalf("error outside the package's set: %v", err)
			}
			return
		}
		if got := reencode(t, msg, rpcErr, fr); !bytes.Equal(got, b) {
			t.Fatalf("decode then encode differs:\n got %x\nwant %x", got, b)
		}
	})
}

// FuzzDecodeStream reads frames off a byte stream the way a connection
// is read (header first, magic and version as soon as they arrive, then
// the body): any input ends in io.EOF between frames or an error of the
// package, never a panic or a body past the cap.
func FuzzDecodeStream(f *testing.F) {
	var two []byte
	for _, s := range samples()[:3] {
		two = append(two, frameBytes(f, s.msg, s.rpcErr, s.crc)...)
	}
	f.Add(two)
	f.Add(two[:len(two)-5])
	f.Add([]byte("RBWF\x02\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		var h [headerSize]byte
		for {
			fr, err := readFrame(r, &h, 4096)
			if errors.Is(err, io.EOF) {
				return
			}
			if err != nil {
				if !isFrameErr(err) {
					t.Fatalf("error outside the package's set: %v", err)
				}
				return
			}
			if len(fr.body) > 4096 {
				t.Fatalf("body of %d bytes past the cap", len(fr.body))
			}
			if fr.kind&respFlag == 0 && fr.kind != kindReject {
				_, _ = decodeRequest(fr)
			}
		}
	})
}
