package fsm

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/robib/robib/volume"
)

// seedGolden adds the golden files matching pattern to the corpus, through
// add.
func seedGolden(f *testing.F, pattern string, add func(b []byte)) {
	files, err := filepath.Glob(filepath.Join(goldenDir, pattern))
	if err != nil || len(files) == 0 {
		f.Fatalf("no golden seeds %s: %v", pattern, err)
	}
	for _, file := range files {
		b, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		add(b)
	}
}

// FuzzDecodeState checks the state decoder (state file body and snapshot
// state record): it never panics, every error wraps errCorruptState, and
// whatever decodes re-encodes (as the current version) to bytes that decode
// to an equal value and that are themselves canonical.
func FuzzDecodeState(f *testing.F) {
	seedGolden(f, "state_record_v*.bin", func(b []byte) { f.Add(b) })
	seedGolden(f, "state_file_v*.bin", func(b []byte) {
		f.Add(b[len(stateFileMagic) : len(b)-4]) // the body
	})
	f.Add([]byte{stateVersion, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		in := bytes.Clone(data)
		img, err := decodeState(data)
		if !bytes.Equal(in, data) {
			t.Fatal("decodeState modified its input")
		}
		if err != nil {
			if !errors.Is(err, errCorruptState) {
				t.Fatalf("error %v does not wrap errCorruptState", err)
			}
			return
		}
		b := encodeState(img)
		if b[0] != stateVersion {
			t.Fatalf("re-encoded as version %d", b[0])
		}
		if data[0] == stateVersion && !bytes.Equal(b, data) {
			t.Fatalf("current version not canonical:\nin  %x\nout %x", data, b)
		}
		img2, err := decodeState(b)
		if err != nil {
			t.Fatalf("decodeState(encodeState(x)): %v", err)
		}
		if !reflect.DeepEqual(img, img2) {
			t.Fatalf("round trip differs:\n%#v\n%#v", img, img2)
		}
		if b2 := encodeState(img2); !bytes.Equal(b, b2) {
			t.Fatalf("second encoding differs")
		}
		// The state file framing around the same body.
		file := encodeStateFile(img)
		if got, err := parseStateFile(file); len(img.Volumes) == 0 && (err != nil || !reflect.DeepEqual(got, img)) {
			t.Fatalf("parseStateFile(state file of x) = %v, %v", got, err)
		} else if len(img.Volumes) != 0 && !errors.Is(err, errCorruptState) {
			t.Fatalf("state file with volumes: %v", err)
		}
	})
}

// checkingSink records a full stream's volume records and checks, as the
// restorer relies on, that each volume's records arrive in order and cover
// [0, size) exactly.
type checkingSink struct {
	t    *testing.T
	img  *stateImage
	cur  int
	off  int64
	recs []streamEvent
}

func (s *checkingSink) close() {
	if s.cur >= 0 && s.cur < len(s.img.Volumes) && s.off != s.img.Volumes[s.cur].Size {
		s.t.Fatalf("volume %d covered to %d of %d", s.cur, s.off, s.img.Volumes[s.cur].Size)
	}
}

func (s *checkingSink) begin(i int) error {
	s.close()
	if i != s.cur+1 {
		s.t.Fatalf("volume %d after %d", i, s.cur)
	}
	s.cur, s.off = i, 0
	s.recs = append(s.recs, streamEvent{Kind: "volume", I: i})
	return nil
}

func (s *checkingSink) at(off, n int64) {
	if off != s.off || n <= 0 || off+n > s.img.Volumes[s.cur].Size {
		s.t.Fatalf("record [%d, +%d) in volume %d at %d of %d", off, n, s.cur, s.off, s.img.Volumes[s.cur].Size)
	}
	s.off += n
}

type sinkAdapter struct{ s *checkingSink }

func (a sinkAdapter) volume(i int, _ volume.Meta) error { return a.s.begin(i) }
func (a sinkAdapter) data(off int64, p []byte) error {
	a.s.at(off, int64(len(p)))
	a.s.recs = append(a.s.recs, streamEvent{Kind: "data", Off: off, N: int64(len(p)), Data: bytes.Clone(p)})
	return nil
}
func (a sinkAdapter) zero(off, n int64) error {
	a.s.at(off, n)
	a.s.recs = append(a.s.recs, streamEvent{Kind: "zero", Off: off, N: n})
	return nil
}
func (a sinkAdapter) keep(off, n int64) error {
	a.s.at(off, n)
	a.s.recs = append(a.s.recs, streamEvent{Kind: "keep", Off: off, N: n})
	return nil
}

// parsedStream is everything a stream says.
type parsedStream struct {
	h    streamHeader
	img  *stateImage
	recs []streamEvent
	end  streamEnd
}

func parseStream(t *testing.T, b []byte) (*parsedStream, error) {
	rr := newRecordReader(bytes.NewReader(b))
	h, img, err := rr.readPrologue()
	if err != nil {
		return nil, err
	}
	p := &parsedStream{h: h, img: img}
	if h.Kind == kindFull {
		s := &checkingSink{t: t, img: img, cur: -1}
		if err := rr.readImage(h, img, sinkAdapter{s}); err != nil {
			return nil, err
		}
		s.close()
		if s.cur != len(img.Volumes)-1 {
			t.Fatalf("stream covered %d of %d volumes", s.cur+1, len(img.Volumes))
		}
		p.recs = s.recs
	}
	if p.end, err = rr.readEpilogue(); err != nil {
		return nil, err
	}
	return p, nil
}

// encodeParsed writes p back as a stream, record by record.
func encodeParsed(p *parsedStream) []byte {
	b := append([]byte(streamMagic), appendRecord(nil, recHeader, headerRecordPayload(p.h))...)
	b = appendRecord(b, recState, encodeState(p.img))
	if p.h.Base != nil {
		b = appendRecord(b, recBase, baseRecordPayload(p.h.Base))
	}
	for _, r := range p.recs {
		switch r.Kind {
		case "volume":
			b = appendRecord(b, recVolume, volumeRecordPayload(r.I, p.img.Volumes[r.I].Name))
		case "data":
			b = appendRecord(b, recData, r.Data)
		case "zero":
			b = appendRecord(b, recZero, leUint64(uint64(r.N)))
		case "keep":
			b = appendRecord(b, recKeep, leUint64(uint64(r.N)))
		}
	}
	return appendRecord(b, recEnd, endRecordPayload(p.end))
}

func leUint64(v uint64) []byte {
	b := make([]byte, 8)
	for i := range b {
		b[i] = byte(v >> (8 * i))
	}
	return b
}

// FuzzStream checks the snapshot stream parser: it never panics, every
// error wraps errCorruptStream, a full stream's records cover each volume
// exactly and in order, validateStream agrees with the record-by-record
// parse, and an accepted stream written back record by record parses to
// the same thing (and to the same bytes when its state record is of the
// current version).
func FuzzStream(f *testing.F) {
	seedGolden(f, "stream_*.bin", func(b []byte) { f.Add(b) })
	f.Add([]byte(streamMagic))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := parseStream(t, data)
		_, _, verr := validateStream(bytes.NewReader(data))
		if (err == nil) != (verr == nil) {
			t.Fatalf("parse: %v; validateStream: %v", err, verr)
		}
		if err != nil {
			if !errors.Is(err, errCorruptStream) {
				t.Fatalf("error %v does not wrap errCorruptStream", err)
			}
			return
		}
		b := encodeParsed(p)
		if data[len(streamMagic)+recOverhead+headerPayload+5] == stateVersion && !bytes.Equal(b, data) { // the state record's version byte
			t.Fatalf("written back differently:\nin  %x\nout %x", data, b)
		}
		p2, err := parseStream(t, b)
		if err != nil {
			t.Fatalf("written-back stream: %v", err)
		}
		if !reflect.DeepEqual(p, p2) {
			t.Fatalf("written-back stream parses differently:\n%#v\n%#v", p, p2)
		}
	})
}
